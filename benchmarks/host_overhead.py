"""Host cost of one loss step on a tiny CPU input, where only the Python / dispatcher work is left.

    python benchmarks/host_overhead.py [--samples 25] [--calls 200] [--wall] [--profile]

On B=1, M=4, N=2, T=16 float32 with one thread, it times forward + backward (``torch.autograd.grad`` into est) of

* ``plain L1``: the four-op PyTorch L1 ``(est_mix - mix).abs().mean()`` and its backward (the yardstick),
* ``mixit_loss(impl="cpu")``,
* ``noise_robust_loss`` V1 (weights [1, 2, 1], teacher targets, a fixed pairing, impl="cpu"),

in the same run, interleaved, and prints each one's median and its ratio to the plain L1 (issue 10's targets:
mixit_loss <= 1.5x, V1 <= 2x once its CPU path is one fused op).  Then it breaks the mixit_loss step into its
stages, each timed alone on the same inputs the way the front-end calls it: input validation, backend
resolution, operand preparation, the custom op's forward (dispatcher + autograd node; the C++ kernel alone
beside it), finishing (the mean), and the backward (autograd engine + the backward custom op; kernel alone
beside it).  ``--profile`` adds cProfile's view of the same step (the functions with the most own time).

For comparison it also times ``autograd.Function``: the same C++ kernels behind a plain ``torch.autograd.Function``
instead of the torch.library custom op (validation and operand preparation included): what the step would cost
without the custom op's Python dispatch in eager mode.  It is a measurement, not a production path.

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


def median_us(fn, *, samples: int, calls: int) -> float:
    """Median over ``samples`` of the mean time of ``calls`` back-to-back calls, in microseconds."""
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
    return statistics.median(per_call)


class _KernelsFunction(torch.autograd.Function):
    """The C++ MixIT kernels behind a plain autograd.Function: the yardstick for the custom op's dispatch cost."""

    @staticmethod
    def forward(ctx, est, mixtures, partitions, impl):
        row_loss, best = backends.lookup("mixit_l1", impl).forward(est, mixtures, partitions)
        ctx.save_for_backward(est, mixtures, best)
        ctx.partitions, ctx.impl = partitions, impl
        ctx.mark_non_differentiable(best)
        return row_loss, best

    @staticmethod
    def backward(ctx, grad_rows, _grad_best):
        est, mixtures, best = ctx.saved_tensors
        grad_est, grad_mix = backends.lookup("mixit_l1", ctx.impl).backward(
            grad_rows.contiguous(), est, mixtures, best, ctx.partitions, ctx.needs_input_grad[1])
        return grad_est, grad_mix, None, None


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

    def kernels_function():
        check_mixit_inputs(est, mixtures, metric="l1", partitions="generalized", reduction="mean")
        backend = backends.resolve("mixit_l1", "cpu", est.device.type)
        dtype = common_dtype(est, mixtures)
        row_loss, _ = _KernelsFunction.apply(fused_operand(est, dtype), fused_operand(mixtures, dtype), "generalized",
                                             backend)
        return torch.autograd.grad(row_loss.mean(), est)

    def v1():
        loss = nrt_kernels.noise_robust_loss(est, targets, version="v1", weights=[1, 2, 1], teacher_targets=teacher,
                                             pairing=pairing, impl="cpu")
        return torch.autograd.grad(loss, est)

    return ({"plain L1": plain_l1, "mixit_loss cpu": mixit, "noise_robust_loss V1 cpu": v1,
             "autograd.Function": kernels_function}, (est, mixtures))


def mixit_stages(est, mixtures):
    """The stages of mixit_l1_loss's step, each a callable doing just that stage on the front-end's inputs."""
    extension = load_cpu_extension()
    masks = nrt_kernels.assignments.candidate_masks(est.shape[1], mixtures.shape[1], "generalized")
    dtype = common_dtype(est, mixtures)
    flat_est, flat_mix = fused_operand(est, dtype), fused_operand(mixtures, dtype)
    row_loss, best = mixit_op.mixit_l1(flat_est, flat_mix, "generalized", "cpu")
    loss = row_loss.mean()
    grad_rows = torch.ones_like(row_loss)

    def backward():
        # retain_graph: the same graph is differentiated every call, so only the backward itself is timed.
        return torch.autograd.grad(loss, est, retain_graph=True)

    return {
        "validation (check_mixit_inputs)": lambda: check_mixit_inputs(est, mixtures, metric="l1",
                                                                      partitions="generalized", reduction="mean"),
        "backends.resolve": lambda: backends.resolve("mixit_l1", "cpu", est.device.type),
        "operands (common_dtype + 2x fused_operand)": lambda: (fused_operand(est, common_dtype(est, mixtures)),
                                                              fused_operand(mixtures, common_dtype(est, mixtures))),
        "custom op forward (dispatch + autograd node)": lambda: mixit_op.mixit_l1(flat_est, flat_mix, "generalized",
                                                                                   "cpu"),
        "  of which the C++ forward kernel": lambda: extension.mixit_l1_forward(flat_est.detach(), flat_mix, masks),
        "the mean of the rows": lambda: row_loss.mean(),
        "backward (engine + backward custom op)": backward,
        "  of which the C++ backward kernel": lambda: extension.mixit_l1_backward(
            grad_rows, flat_est.detach(), flat_mix, best, masks, False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=25, help="timed samples per step (median reported)")
    parser.add_argument("--calls", type=int, default=200, help="calls per sample")
    parser.add_argument("--profile", action="store_true", help="also print cProfile's view of the mixit_loss step")
    parser.add_argument("--wall", action="store_true", help="time the wall clock instead of this thread's CPU time")
    args = parser.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter_ns
    torch.set_num_threads(1)
    steps, (est, mixtures) = make_steps()

    # Interleaved rounds, so that a change in the machine's load hits every step alike.
    times = {name: [] for name in steps}
    for _ in range(5):
        for name, step in steps.items():
            times[name].append(median_us(step, samples=max(1, args.samples // 5), calls=args.calls))
    plain = statistics.median(times["plain L1"])
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {cpu_model()}, "
          f"1 thread, torch {torch.__version__}, nrt_kernels {nrt_kernels.__version__}, load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"shape {SHAPE}, float32; forward + backward, median of {args.samples} samples x {args.calls} calls, "
          f"{'wall clock' if args.wall else 'thread CPU time'}\n")
    print(f"  {'step':28s} {'us':>8s} {'x plain L1':>11s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:28s} {median:8.1f} {median / plain:10.2f}x")

    stages = mixit_stages(est, mixtures)
    print("\nmixit_loss(impl='cpu') by stage (each timed alone on the same inputs):")
    total = 0.0
    for name, stage in stages.items():
        us = median_us(stage, samples=args.samples, calls=args.calls)
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
