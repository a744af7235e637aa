"""CPU forward+backward of the fused V1/V2 loss (impl="cpu"): against the iSeparate-style loop, the MixIT op alone,
and, on a tiny input, a plain PyTorch L1 (the host cost).  Every impl in the same run.

    python benchmarks/noise_robust_cpu.py [--threads 1] [--rounds 15] [--profile]

Kernel case (issue 14): B=4, S=4, C=2, T=44100, float32, V1 with every term ([1, 2, 1], teacher targets on); targets:
the fused op >= 20x the loop (nrt_kernels.reference, as iSeparate computes it) and within 1.6x of the MixIT op alone
(``mixit_loss(impl="cpu")`` on the same est and the pairing's two mixtures).  V2 ([0.5, 0.5, 2, 0.5]) is timed beside
it.  Host case: B=1, S=4, T=16; target: V1 fwd+bwd <= 2x ``(est - y).abs().mean()`` + backward.  Times are process CPU
time (with one thread, the compute cost, unaffected by other processes preempting this one); impls alternate round by
round so that a load change hits all of them alike, each turn after one untimed call: each op's steady state, its inputs
in the last-level cache as on its repeated calls.  A second table times the fused V1 and the MixIT op from memory: each
call right after a call of the loop, which evicts their inputs.
``--profile`` prints where the host time of the tiny V1 call goes (cProfile, by own time).

Allocator: as in bench_mixit_metrics_cpu.py, freed memory is kept for reuse (glibc's ``mallopt``; see
``nrt_kernels.bench.timing.reuse_freed_memory``), so that no impl pays page faults of a fresh 5.6 MB gradient that
another impl's order spared it; ``--fresh-pages`` leaves glibc's defaults.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import platform
import pstats
import statistics
import time

import torch

import nrt_kernels
from nrt_kernels import reference
from nrt_kernels.bench.report import cpu_model
from nrt_kernels.bench.timing import reuse_freed_memory

KERNEL_SHAPE = (4, 4, 2, 44100)
HOST_SHAPE = (1, 4, 16)
WEIGHTS = {"v1": [1, 2, 1], "v2": [0.5, 0.5, 2, 0.5]}
PAIRING = torch.tensor([2, 0, 3, 1])
FUSED_V1, MIXIT_OP, LOOP_V1 = "fused V1 (impl='cpu')", "MixIT op alone (mixit_loss cpu)", "iSeparate-style loop V1"


def make_inputs(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    est, targets, teacher = (torch.randn(shape, generator=gen) for _ in range(3))
    return est.requires_grad_(True), targets, teacher


def noise_robust_step(version, impl, est, targets, teacher, pairing=PAIRING):
    def step():
        est.grad = None
        loss_of = reference.noise_robust_loss if impl == "reference" else nrt_kernels.noise_robust_loss
        extra = {} if impl == "reference" else {"impl": impl}
        loss_of(est, targets, version=version, weights=WEIGHTS[version], teacher_targets=teacher, pairing=pairing,
                **extra).backward()
    return step


def mixit_step(est, targets):
    mixtures = reference.noisy_mixtures(targets, PAIRING.expand(targets.shape[0], -1))

    def step():
        est.grad = None
        nrt_kernels.mixit_loss(est, mixtures, impl="cpu").backward()
    return step


def plain_l1_step(est, targets):
    def step():
        est.grad = None
        (est - targets).abs().mean().backward()
    return step


def time_rounds(steps: dict, rounds: int, calls) -> dict:
    """{name: [microseconds per call, one value per round]}: each round times ``calls`` (a number, or {name:
    number}) calls of every step, each turn after one untimed call of its own.  (Without it the first call of a turn
    pays for what the step before it did to the caches: right after the iSeparate-style loop, which writes hundreds
    of MB of remixes a call, a V1 call took 4.2-4.6 ms instead of 2.6-2.7, and only the impl whose turn followed the
    loop's paid that.  ``time_after_eviction`` times that case for every impl alike.)"""
    times = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(3):
            step()
    for _ in range(rounds):
        for name, step in steps.items():
            count = calls[name] if isinstance(calls, dict) else calls
            step()
            begin = time.process_time()
            for _ in range(count):
                step()
            times[name].append(1e6 * (time.process_time() - begin) / count)
    return times


def time_after_eviction(steps: dict, evict, rounds: int) -> dict:
    """{name: [microseconds, one value per round]}: one call of every step, each right after an untimed ``evict()``
    that pushes the step's inputs out of the caches."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            evict()
            begin = time.process_time()
            step()
            times[name].append(1e6 * (time.process_time() - begin))
    return times


def print_table(times: dict, unit_ms: bool) -> None:
    scale, unit = (1e-3, "ms") if unit_ms else (1.0, "us")
    print(f"  {'impl':38s} {'median ' + unit:>10s} {'min ' + unit:>8s}")
    for name, values in times.items():
        print(f"  {name:38s} {statistics.median(values) * scale:10.3f} {min(values) * scale:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every impl")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per impl")
    parser.add_argument("--profile", action="store_true", help="cProfile the tiny V1 call's host time")
    parser.add_argument("--fresh-pages", action="store_true", help="leave glibc's allocator thresholds as they are")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reused = False if args.fresh_pages else reuse_freed_memory()

    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {cpu_model()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f} (before)")

    inputs = make_inputs(KERNEL_SHAPE)
    steps = {FUSED_V1: noise_robust_step("v1", "cpu", *inputs),
             MIXIT_OP: mixit_step(*inputs[:2]),
             "fused V2 (impl='cpu')": noise_robust_step("v2", "cpu", *inputs),
             LOOP_V1: noise_robust_step("v1", "reference", *inputs)}
    calls = {name: 1 if name == LOOP_V1 else 5 for name in steps}
    times = time_rounds(steps, args.rounds, calls)
    print(f"\nkernel case: B, S, C, T = {KERNEL_SHAPE}, float32, forward+backward, process CPU time, freed memory "
          f"{'reused (mallopt)' if reused else 'returned to the system (glibc default)'}")
    print_table(times, unit_ms=True)
    for statistic in (statistics.median, min):
        value = {name: statistic(values) for name, values in times.items()}
        fused = value[FUSED_V1]
        print(f"  by {statistic.__name__}: loop / fused V1 {value[LOOP_V1] / fused:.1f}x (target >= 20x); fused V1 / "
              f"MixIT op {fused / value[MIXIT_OP]:.2f}x (target <= 1.6x)")

    from_memory = {name: steps[name] for name in (FUSED_V1, MIXIT_OP)}
    times = time_after_eviction(from_memory, steps[LOOP_V1], args.rounds)
    print("\nthe same from memory: each call right after an untimed call of the loop (which evicts the inputs)")
    print_table(times, unit_ms=True)
    for statistic in (statistics.median, min):
        value = {name: statistic(values) for name, values in times.items()}
        print(f"  by {statistic.__name__}: fused V1 / MixIT op {value[FUSED_V1] / value[MIXIT_OP]:.2f}x")

    est, targets, teacher = make_inputs(HOST_SHAPE)
    v1 = noise_robust_step("v1", "cpu", est, targets, teacher, pairing=None)
    times = time_rounds({"plain L1 (est - y).abs().mean()": plain_l1_step(est, targets),
                         "fused V1 (impl='cpu', drawn pairing)": v1}, args.rounds, calls=2000)
    print(f"\nhost case: B, S, T = {HOST_SHAPE}, float32, forward+backward, process CPU time")
    print_table(times, unit_ms=False)
    for statistic in (statistics.median, min):
        value = {name: statistic(values) for name, values in times.items()}
        ratio = value["fused V1 (impl='cpu', drawn pairing)"] / value["plain L1 (est - y).abs().mean()"]
        print(f"  by {statistic.__name__}: fused V1 / plain L1 {ratio:.2f}x (target <= 2x)")
    print(f"load average {os.getloadavg()[0]:.2f} (after)")

    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [v1() for _ in range(5000)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
