"""PIT benchmark: forward + backward of fused ``nrt_kernels.pit_loss`` against the loops people train with.

    python benchmarks/pit_bench.py                 # the full table (CPU: about 10 minutes on one thread)
    python benchmarks/pit_bench.py --quick         # small shapes, seconds (a smoke run)

Baselines, on the same inputs (float32, SI-SDR):
- ``asteroid``: asteroid 0.7.0's ``PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")``: the (B, M, M, T)
  pairwise tensors of ``PairwiseNegSDR``, then its factorial search up to 3 sources and scipy's
  ``linear_sum_assignment`` per row above (the matrix copied to the host), as asteroid does. asteroid refuses
  M >= 10 (and its (16, 32, 32, 32000) float32 intermediates would take 2 GiB each).
- ``torchmetrics``: torchmetrics' ``permutation_invariant_training(preds, target,
  scale_invariant_signal_distortion_ratio, mode="speaker-wise")``: M^2 calls of the metric on (B, T) slices, then
  scipy's assignment (M >= 3) or every permutation (M = 2). Re-implemented here, not imported. From 16 sources
  on it is the only baseline, the "scipy-Hungarian loop".
- ``nrt cpu`` (and ``nrt triton`` on a GPU): ``pit_loss(..., impl=...)``, solver="auto".
The CPU rows run on one thread (``torch.set_num_threads(1)``). The "solver" table times the solvers alone (short
signals, so the pairwise pass is negligible): it is the measurement behind ``solver="auto"``'s crossover.
"""
from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

import nrt_kernels
from nrt_kernels import reference


def asteroid_pit(est, targets):
    """asteroid's PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx") forward, with its scipy Hungarian."""
    pw_losses = reference.PairwiseNegSDR("sisdr")(est, targets)
    if pw_losses.shape[-1] <= 3:
        min_loss, _ = reference.find_best_perm_factorial(pw_losses)
    else:
        pwl = pw_losses.transpose(-1, -2)
        batch_indices = torch.tensor(np.array([linear_sum_assignment(m)[1] for m in pwl.detach().cpu()]),
                                     device=pwl.device)
        min_loss = torch.gather(pwl, 2, batch_indices[..., None]).mean([-1, -2])
    return torch.mean(min_loss)


def torchmetrics_si_sdr(preds, target):
    """torchmetrics' scale_invariant_signal_distortion_ratio (zero_mean=False), (B, T) -> (B,)."""
    eps = torch.finfo(preds.dtype).eps
    alpha = ((preds * target).sum(-1, keepdim=True) + eps) / ((target**2).sum(-1, keepdim=True) + eps)
    target_scaled = alpha * target
    noise = target_scaled - preds
    return 10 * torch.log10(((target_scaled**2).sum(-1) + eps) / ((noise**2).sum(-1) + eps))


def torchmetrics_pit(est, targets):
    """torchmetrics' permutation_invariant_training(mode="speaker-wise", eval_func="max"), as a loss."""
    batch, sources = targets.shape[:2]
    metric = torch.stack([torch.stack([torchmetrics_si_sdr(est[:, i], targets[:, j]) for i in range(sources)], -1)
                          for j in range(sources)], 1)  # (B, target, est)
    if sources >= 3:
        best = torch.tensor(np.array([linear_sum_assignment(m, maximize=True)[1] for m in metric.detach().cpu()]),
                            device=metric.device)
        value = torch.gather(metric, 2, best[..., None]).mean([-1, -2])
    else:
        perms = torch.tensor(list(itertools.permutations(range(sources))), device=metric.device)
        values = metric[:, torch.arange(sources), perms].mean(-1)  # (B, P)
        value = values.max(1).values
    return -value.mean()


def fused(impl):
    return lambda est, targets: nrt_kernels.pit_loss(est, targets, impl=impl)


def time_step(fn, est, targets, *, repeats, device):
    """Median seconds of loss + backward, after one warm-up call."""
    def step():
        est.grad = None
        fn(est, targets).backward()

    step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def capture_cuda_graph(est, targets):
    """A CUDA graph of the Triton forward + backward: capture fails on any host sync."""
    static_est = est.detach().clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            nrt_kernels.pit_loss(static_est, targets, impl="triton").backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nrt_kernels.pit_loss(static_est, targets, impl="triton").backward()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20 / 1e3


def make_inputs(batch, sources, length, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randn(batch, sources, length, generator=gen)
    est = targets.flip(1) + 0.5 * torch.randn(batch, sources, length, generator=gen)
    return est.to(device).requires_grad_(True), targets.to(device)


def loss_table(cases, device, repeats, impls):
    print(f"\n{'case':28s} {'impl':18s} {'ms':>10s} {'speedup':>8s}")
    rows = []
    for batch, sources, length in cases:
        est, targets = make_inputs(batch, sources, length, device)
        baselines = [("torchmetrics", torchmetrics_pit)]
        if sources < 10:
            baselines.insert(0, ("asteroid", asteroid_pit))
        timings = [(name, time_step(fn, est, targets, repeats=repeats, device=device)) for name, fn in baselines]
        timings += [(f"nrt {impl}", time_step(fused(impl), est, targets, repeats=repeats, device=device))
                    for impl in impls]
        first = timings[0][1]
        for name, seconds in timings:
            case = f"B={batch} M={sources} T={length}"
            print(f"{case:28s} {name:18s} {seconds * 1e3:10.3f} {first / seconds:7.1f}x")
            rows.append((case, name, seconds))
        if device == "cuda":
            print(f"{'':28s} {'nrt triton graph':18s} {capture_cuda_graph(est, targets) * 1e3:10.3f}")
    return rows


def solver_table(batch, sources_list, repeats, impl, device):
    print(f"\nsolver alone ({impl}, B={batch}, T=64, forward only)\n{'M':>3s} {'exhaustive ms':>14s} "
          f"{'hungarian ms':>13s}")
    for sources in sources_list:
        est, targets = make_inputs(batch, sources, 64, device)
        est = est.detach()
        results = []
        for solver in ("exhaustive", "hungarian"):
            def run(solver=solver):
                nrt_kernels.pit_loss(est, targets, solver=solver, impl=impl)
            run()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            results.append(statistics.median(times))
        print(f"{sources:3d} {results[0] * 1e3:14.3f} {results[1] * 1e3:13.3f}")


def check_cpu_targets(repeats):
    """Issue 13's CPU targets: B=8, M=4 (and 8), T=32000 SI-SDR fwd+bwd, impl="cpu" vs asteroid's pw_mtx."""
    print("\nCPU targets (1 thread): impl=\"cpu\" vs asteroid pw_mtx, B=8, T=32000")
    passed = True
    for sources, target in ((4, 5.0), (8, 20.0)):
        est, targets = make_inputs(8, sources, 32000, "cpu")
        loop = time_step(asteroid_pit, est, targets, repeats=repeats, device="cpu")
        ours = time_step(fused("cpu"), est, targets, repeats=repeats, device="cpu")
        ok = loop / ours >= target
        passed &= ok
        print(f"M={sources}: asteroid {loop * 1e3:.2f} ms, cpu {ours * 1e3:.3f} ms, {loop / ours:.1f}x "
              f"(target >= {target:.0f}x: {'met' if ok else 'NOT met'})")
    return passed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = ["triton"] if device == "cuda" else ["cpu"]
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'} "
          f"(1 CPU thread); torch {torch.__version__}, python {platform.python_version()}")
    if args.quick:
        repeats = args.repeats or 2
        loss_table([(2, 2, 1000), (2, 4, 1000), (2, 16, 1000)], device, repeats, impls)
        solver_table(4, (2, 4, 6), repeats, impls[0], device)
        return 0
    repeats = args.repeats or 5
    cases = [(16, m, 32000) for m in (2, 3, 4, 8, 16, 24, 32)]
    loss_table(cases, device, repeats, impls)
    solver_table(16, range(2, 9), repeats, impls[0], device)
    met = check_cpu_targets(repeats) if device == "cpu" else True
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
