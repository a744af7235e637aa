"""Host cost of one loss step on a tiny CPU input, where only the Python / dispatcher work is left.

    python benchmarks/host_overhead.py [--rounds 15] [--samples 3] [--calls 200] [--wall] [--profile]

On B=1, M=4, N=2, T=16 float32 with one thread, it times forward + backward (``torch.autograd.grad`` into est) of

* ``plain L1``: the four-op PyTorch L1 ``(est_mix - mix).abs().mean()`` and its backward (the yardstick),
* ``mixit_loss(impl="cpu")``,
* ``noise_robust_loss`` V1 (weights [1, 2, 1], teacher targets, a fixed pairing, impl="cpu"),
* ``mixit custom op``: the same MixIT step through the torch.library custom op (the path torch.compile and
  FakeTensors take) instead of the eager ``autograd.Function``: what the eager path saves,

in rounds, the steps taking turns; a step's time in a round is the fastest of ``--samples`` timings of ``--calls``
calls (noise only ever adds time), and its ratio to the plain L1 is taken within the round, so a change in the
machine's load hits both sides of a ratio alike.  It prints each step's median over the rounds and the median of its
per-round ratios (issue 10's targets: mixit_loss <= 1.5x, V1 <= 2x).  Then it breaks the mixit_loss step into
its stages, each timed alone on the same inputs the way the front-end calls it: input validation, backend
resolution, operand preparation, the eager forward (autograd node + the C++ kernel, which is timed alone beside
it) and the backward (autograd engine + the C++ kernel).  ``--profile`` adds cProfile's view of the same step.

Times are the CPU time of this thread (``time.thread_time``), so other processes preempting it do not count;
``--wall`` times the wall clock instead.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import os
import pstats
import statistics
import time

import torch

import nrt_kernels
from nrt_kernels import backends
from nrt_kernels._native import load_cpu_extension
from nrt_kernels.bench.report import cpu_model
from nrt_kernels.ops import mixit_l1 as mixit_op
from nrt_kernels.ops._operands import common_dtype, fused_operand
from nrt_kernels.validate import check_mixit_inputs

SHAPE = dict(batch=1, sources=4, mixtures=2, samples=16)


CLOCK = time.thread_time_ns


def fastest_us(fn, *, samples: int, calls: int) -> float:
    """The fastest of ``samples`` timings of ``calls`` back-to-back calls, in microseconds per call."""
    for _ in range(calls):
        fn()
    per_call = []
    for _ in range(samples):
        gc.collect()
        gc.disable()
        begin = CLOCK()
        for _ in range(calls):
            fn()
        per_call.append((CLOCK() - begin) / calls / 1e3)
        gc.enable()
    return min(per_call)


def make_steps():
    gen = torch.Generator().manual_seed(0)
    b, m, n, t = (SHAPE[key] for key in ("batch", "sources", "mixtures", "samples"))
    est = torch.randn(b, m, t, generator=gen).requires_grad_(True)
    mixtures = torch.randn(b, n, t, generator=gen)
    est_mix = torch.randn(b, n, t, generator=gen).requires_grad_(True)
    targets, teacher = torch.randn(b, m, t, generator=gen), torch.randn(b, m, t, generator=gen)
    pairing = torch.tensor([2, 0, 3, 1])

    def plain_l1():
        return torch.autograd.grad((est_mix - mixtures).abs().mean(), est_mix)

    def mixit():
        return torch.autograd.grad(nrt_kernels.mixit_loss(est, mixtures, impl="cpu"), est)

    def mixit_custom_op():
        check_mixit_inputs(est, mixtures, metric="l1", partitions="generalized", reduction="mean")
        backend = backends.resolve("mixit_l1", "cpu", est.device.type)
        dtype = common_dtype(est, mixtures)
        row_loss, _ = mixit_op.mixit_l1(fused_operand(est, dtype), fused_operand(mixtures, dtype), "generalized",
                                        backend)
        return torch.autograd.grad(row_loss.mean(), est)

    def v1():
        loss = nrt_kernels.noise_robust_loss(est, targets, version="v1", weights=[1, 2, 1], teacher_targets=teacher,
                                             pairing=pairing, impl="cpu")
        return torch.autograd.grad(loss, est)

    return ({"plain L1": plain_l1, "mixit_loss cpu": mixit, "noise_robust_loss V1 cpu": v1,
             "mixit custom op": mixit_custom_op}, (est, mixtures))


def mixit_stages(est, mixtures):
    """The stages of mixit_loss's eager step, each a callable doing just that stage on the front-end's inputs."""
    extension = load_cpu_extension()
    masks = nrt_kernels.assignments.candidate_masks(est.shape[1], mixtures.shape[1], "generalized")
    dtype = common_dtype(est, mixtures)
    flat_est, flat_mix = fused_operand(est, dtype), fused_operand(mixtures, dtype)
    loss, best = mixit_op.mixit_l1_reduced(flat_est, flat_mix, "generalized", "cpu", True)

    def backward():
        # retain_graph: the same graph is differentiated every call, so only the backward itself is timed.
        return torch.autograd.grad(loss, est, retain_graph=True)

    return {
        "validation (check_mixit_inputs)": lambda: check_mixit_inputs(est, mixtures, metric="l1",
                                                                      partitions="generalized", reduction="mean"),
        "backends.resolve": lambda: backends.resolve("mixit_l1", "cpu", est.device.type),
        "operands (common_dtype + 2x fused_operand)": lambda: (fused_operand(est, common_dtype(est, mixtures)),
                                                              fused_operand(mixtures, common_dtype(est, mixtures))),
        "eager forward (autograd node + kernel + mean)": lambda: mixit_op.mixit_l1_reduced(
            flat_est, flat_mix, "generalized", "cpu", True),
        "  of which the C++ forward kernel (+ mean)": lambda: extension.mixit_l1_forward(flat_est.detach(), flat_mix,
                                                                                        masks, True),
        "backward (engine + autograd node + kernel)": backward,
        "  of which the C++ backward kernel": lambda: extension.mixit_l1_backward(
            loss.detach(), flat_est.detach(), flat_mix, best, masks, False, True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds of the steps taking turns (median reported)")
    parser.add_argument("--samples", type=int, default=3, help="timings per step and round (the fastest counts)")
    parser.add_argument("--calls", type=int, default=200, help="calls per timing")
    parser.add_argument("--profile", action="store_true", help="also print cProfile's view of the mixit_loss step")
    parser.add_argument("--wall", action="store_true", help="time the wall clock instead of this thread's CPU time")
    args = parser.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter_ns
    torch.set_num_threads(1)
    steps, (est, mixtures) = make_steps()

    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(fastest_us(step, samples=args.samples, calls=args.calls))
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {cpu_model()}, "
          f"1 thread, torch {torch.__version__}, nrt_kernels {nrt_kernels.__version__}, load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"shape {SHAPE}, float32; forward + backward; {args.rounds} rounds, each the fastest of {args.samples} "
          f"timings of {args.calls} calls; {'wall clock' if args.wall else 'thread CPU time'}\n")
    print(f"  {'step':28s} {'us':>8s} {'x plain L1':>11s}  {'range over rounds'}")
    for name, values in times.items():
        ratios = [value / plain for value, plain in zip(values, times["plain L1"])]
        print(f"  {name:28s} {statistics.median(values):8.1f} {statistics.median(ratios):10.2f}x  "
              f"{min(ratios):.2f}-{max(ratios):.2f}x")

    stages = mixit_stages(est, mixtures)
    print("\nmixit_loss(impl='cpu') by stage (each timed alone on the same inputs):")
    total = 0.0
    for name, stage in stages.items():
        us = statistics.median(fastest_us(stage, samples=args.samples, calls=args.calls) for _ in range(5))
        total += 0 if name.startswith("  ") else us
        print(f"  {name:46s} {us:8.1f} us")
    print(f"  {'sum of the stages':46s} {total:8.1f} us (the whole step: "
          f"{statistics.median(times['mixit_loss cpu']):.1f} us)")

    if args.profile:
        profiler = cProfile.Profile()
        step = steps["mixit_loss cpu"]
        profiler.enable()
        for _ in range(20 * args.calls):
            step()
        profiler.disable()
        print(f"\ncProfile of {20 * args.calls} mixit_loss steps (own time):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
