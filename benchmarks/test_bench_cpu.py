"""CPU forward+backward of the MixIT L1: the C++ extension against the asteroid-style loop and torch.compile of it.

    python -m pytest benchmarks/test_bench_cpu.py [--nrt-compile] --benchmark-json cpu.json
    python benchmarks/test_bench_cpu.py [--no-compile] [--repeats 30]     # one table, all three in the same run

The shape is the CPU target of issue 4: B=4, M=4 estimated sources, N=2 mixtures, C=2 channels, T=44100
samples, float32, generalized partitions (16 candidates).  The targets are >= 15x the loop and >= 10x
torch.compile of it; the memory-bandwidth bound (est and mixtures read twice, grad written) is about 1 ms.

Allocator note: glibc serves every same-size large allocation with a fresh mmap, so each step's 5.6 MB
gradient is page-faulted in again (~1-2 ms on a VM, more than the kernels themselves).  Every impl pays
it; MALLOC_MMAP_THRESHOLD_=1000000000 (or jemalloc/tcmalloc) removes it and shows the kernel cost.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import pytest
import torch

import nrt_kernels
from nrt_kernels import reference
from nrt_kernels.bench.report import cpu_model

SHAPE = dict(batch=4, sources=4, mixtures=2, channels=2, samples=44100)


def make_inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, m, n, c, t = (SHAPE[key] for key in ("batch", "sources", "mixtures", "channels", "samples"))
    est = torch.randn(b, m, c, t, generator=gen, dtype=dtype).requires_grad_(True)
    mixtures = torch.randn(b, n, c, t, generator=gen, dtype=dtype)
    return est, mixtures


def forward_backward(loss_of):
    """One training-step's worth of loss work: forward, then backward into est."""
    def step(est, mixtures):
        est.grad = None
        loss_of(est, mixtures).backward()
    return step


def loop_loss(est, mixtures):
    return reference.mixit_loss(est, mixtures)


def cpu_loss(est, mixtures):
    return nrt_kernels.mixit_loss(est, mixtures, impl="cpu")


def compiled_loop_loss():
    return torch.compile(loop_loss, dynamic=False)


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@pytest.mark.benchmark(group="cpu-mixit-l1-fwd-bwd")
def test_cpu_extension(benchmark, inputs):
    step = forward_backward(cpu_loss)
    step(*inputs)
    benchmark(step, *inputs)


@pytest.mark.benchmark(group="cpu-mixit-l1-fwd-bwd")
def test_pytorch_loop(benchmark, inputs):
    benchmark(forward_backward(loop_loss), *inputs)


@pytest.mark.benchmark(group="cpu-mixit-l1-fwd-bwd")
def test_torch_compile_loop(benchmark, inputs, pytestconfig):
    if not pytestconfig.getoption("--nrt-compile", default=False):
        pytest.skip("inductor takes tens of seconds on a CPU; pass --nrt-compile")
    step = forward_backward(compiled_loop_loss())
    step(*inputs)
    benchmark(step, *inputs)


# ----------------------------------------------------------------------------------------------
# Script: one table
# ----------------------------------------------------------------------------------------------


def time_ms(step, inputs, clock=time.perf_counter) -> float:
    begin = clock()
    step(*inputs)
    return 1e3 * (clock() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed runs per impl")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the loop")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for every impl")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process CPU clock instead of the wall clock: with --threads 1 it is "
                             "the compute cost, unaffected by other processes preempting this one (a shared "
                             "machine preempts a 2 ms step far more often, relatively, than a 100 ms one)")
    args = parser.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = make_inputs()
    steps = {"cpu extension": forward_backward(cpu_loss), "pytorch loop": forward_backward(loop_loss)}
    if not args.no_compile:
        begin = time.perf_counter()
        steps["torch.compile loop"] = forward_backward(compiled_loop_loss())
        steps["torch.compile loop"](*inputs)
        print(f"torch.compile: first call {time.perf_counter() - begin:.1f} s")
    # Each impl runs back to back (warm-up, then the timed runs), as in a training loop; interleaving them
    # would time every step right after another impl has evicted the caches and left threads spinning.
    # The fast path runs first and again last: a gap between the two means the machine got busier.
    order = [*steps, "cpu extension"]
    times = {name: [] for name in steps}
    for position, name in enumerate(order):
        for _ in range(3):
            steps[name](*inputs)
        runs = [time_ms(steps[name], inputs, clock) for _ in range(args.rounds)]
        times[name if position < len(steps) else "cpu extension (again)"] = runs

    bytes_moved = 2 * (inputs[0].nbytes + inputs[1].nbytes) + inputs[0].nbytes
    fast = statistics.median(times["cpu extension"] + times["cpu extension (again)"])
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {cpu_model()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"shape {SHAPE}, float32, forward+backward, {args.rounds} rounds, "
          f"{'process CPU' if args.cpu_time else 'wall'} time, load average {os.getloadavg()[0]:.2f}")
    print(f"  {'impl':20s} {'median ms':>10s} {'min ms':>8s} {'GB/s':>7s} {'cpu ext speed-up':>17s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:20s} {median:10.2f} {min(values):8.2f} {bytes_moved / median / 1e6:7.2f} "
              f"{median / fast:16.1f}x")


if __name__ == "__main__":
    main()
