"""Noise-robust V1/V2 loss, forward+backward on a CUDA device: fused vs reference vs torch.compile(reference).

    python benchmarks/noise_robust_gpu.py [--check] [--tune] [--no-compile] [--shape B S C T]

Default shape: B=16, S=4, C=2, T=308700 (7 s at 44.1 kHz), fp32, every term of the heaviest phase on
(V1 [1, 2, 1] with teacher targets, V2 [0.5, 0.5, 2, 0.5]).  Prints per (version, impl): the median ms of
forward+backward, eager (triton.testing.do_bench) and replayed from a CUDA graph (the device time, without
launch overhead), GB/s over the minimal bytes (est, targets and teacher targets read in forward and again in
backward, grad written) and the peak memory beyond the inputs and the gradient.
``--check`` first compares the compiled kernels with the reference on CUDA for every weight combination;
``--tune`` times the partials and backward kernels under other tile configurations.
"""
from __future__ import annotations

import argparse
import itertools
import traceback

import torch

from nrt_kernels import noise_robust_loss, reference
from nrt_kernels.bench.memory import peak_bytes_cuda
from nrt_kernels.bench.timing import time_cuda, time_cuda_graph
from nrt_kernels.ops import noise_robust_l1 as noise_robust_op
from nrt_kernels.ops.mixit_l1.triton import BackwardConfig
from nrt_kernels.ops.noise_robust_l1 import triton as op

CASES = {"v1": [1, 2, 1], "v2": [0.5, 0.5, 2, 0.5]}
PAIRING = [2, 0, 3, 1]


def make_inputs(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    est, targets, teacher = (torch.randn(shape, generator=gen, device="cuda", dtype=dtype) for _ in range(3))
    return est, targets, teacher


def loss_fn(impl, version, weights, pairing):
    if impl == "reference":
        return lambda est, y, t: reference.noise_robust_loss(est, y, version=version, weights=weights,
                                                             teacher_targets=t, pairing=pairing)
    return lambda est, y, t: noise_robust_loss(est, y, version=version, weights=weights, teacher_targets=t,
                                               pairing=pairing, impl=impl)


def fwd_bwd(fn, est, targets, teacher):
    leaf = est.detach().requires_grad_(True)
    return lambda: torch.autograd.grad(fn(leaf, targets, teacher), leaf)


def measure(fn, est, targets, teacher, graph=False):
    """(eager ms, graph ms or None, extra MiB) of forward+backward."""
    step = fwd_bwd(fn, est, targets, teacher)
    step()  # compile / warm up
    ms = time_cuda(step, rep_ms=100)
    extra = peak_bytes_cuda(step, est.device) - est.numel() * est.element_size()  # less the grad it returns
    graph_ms = None
    if graph:
        try:
            graph_ms = time_cuda_graph(step, rep_ms=100)
        except Exception as error:  # an impl that syncs or copies from the host cannot be captured
            print(f"  not capturable: {error!r}"[:200], flush=True)
    return ms, graph_ms, extra / 2**20


def check(shape_small=(3, 4, 2, 5000)) -> int:
    """Compiled kernels against the reference on CUDA, every weight combination; returns the failure count."""
    failures = 0
    combos = []
    for version, values in {"v1": (1.5, 2.0, 0.5), "v2": (0.5, 0.25, 2.0, 1.0)}.items():
        for on in itertools.product((False, True), repeat=len(values)):
            if any(on):
                combos.append((version, [v if o else 0 for v, o in zip(values, on)], torch.float32, shape_small))
    combos += [("v2", [0.5, 0.5, 2, 0.5], torch.float64, (2, 4, 2, 777)), ("v1", [1, 2, 1], torch.float16, shape_small),
               ("v2", [0.5, 0.5, 2, 0.5], torch.float32, (2, 8, 1, 999)),
               ("v2", [0.5, 0.5, 2, 0.5], torch.float32, (2, 2, 1, 3001)),
               ("v1", [1, 2, 1], torch.float32, (16, 4, 2, 308700))]
    for version, weights, dtype, shape in combos:
        try:
            est, targets, teacher = make_inputs(shape, dtype, seed=len(combos))
            pairing = torch.randperm(shape[1])
            results = []
            for impl in ("triton", "reference"):
                leaf = est.detach().clone().requires_grad_(True)
                loss, terms = noise_robust_loss(leaf, targets, version=version, weights=weights, teacher_targets=teacher,
                                                pairing=pairing, impl=impl, return_terms=True)
                (grad,) = torch.autograd.grad(loss, leaf)
                results.append((loss.double(), {k: v.double() for k, v in terms.items()}, grad.double()))
            (loss_f, terms_f, grad_f), (loss_r, terms_r, grad_r) = results
            rtol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3}[dtype]
            ok = torch.allclose(loss_f, loss_r, rtol=rtol, atol=0) and terms_f.keys() == terms_r.keys() and all(
                torch.allclose(terms_f[k], terms_r[k], rtol=rtol, atol=0) for k in terms_r)
            # A sign flips where an error rounds to ~0 differently: allow a tiny fraction of grad elements.
            scale = grad_r.abs().max()
            bad = ((grad_f - grad_r).abs() > rtol * scale + 1e-30).double().mean().item()
            ok = ok and bad < 1e-4
            failures += not ok
            print(f"check {'ok  ' if ok else 'FAIL'} {version} {weights} {dtype} {tuple(shape)}: loss "
                  f"{loss_f.item():.7g} vs {loss_r.item():.7g}, grad mismatch fraction {bad:.2e}", flush=True)
        except Exception:
            failures += 1
            print(f"check FAIL {version} {weights} {dtype} {tuple(shape)}:\n{traceback.format_exc()}", flush=True)
    return failures


def tune(shape):
    """Tile sweeps of the V1 kernels (every term on), launched directly with each config and timed by CUDA-graph
    replay (the device time: eager steps can be launch-bound)."""
    est, targets, teacher = make_inputs(shape)
    flat = [x.reshape(x.shape[0], x.shape[1], -1).contiguous() for x in (est, targets, teacher)]
    rows = torch.tensor(PAIRING, device="cuda").expand(shape[0], -1)
    masks = noise_robust_op.pair_masks(rows, shape[0], shape[1], est.device)
    no_source_weights = flat[0].new_empty(0)
    weights, divisor = [1.0, 0.0, 2.0, 1.0], 4.0
    args = (*flat, masks, no_source_weights, weights, divisor)
    expected_loss, _, best = op.forward(*args)
    print("partials kernel (V1 forward: partials, selection, combine), (elements/thread, warps, loop stages): ms",
          flush=True)
    for per_thread, warps, stages in ((1, 4, 1), (1, 4, 2), (1, 4, 3), (1, 4, 4), (1, 8, 1), (1, 8, 3), (2, 4, 1)):
        config = op.PartialsConfig(num_warps=warps, mixit_values_per_thread=48 * per_thread, loop_stages=stages)
        try:
            same = torch.allclose(op.forward(*args, config=config)[0], expected_loss, rtol=1e-5, atol=0)
            ms = time_cuda_graph(lambda: op.forward(*args, config=config), rep_ms=40)
            print(f"  ({per_thread}, {warps}, {stages}): {ms:.4f}{'' if same else '  WRONG LOSS'}", flush=True)
        except Exception as error:
            print(f"  ({per_thread}, {warps}, {stages}): failed {error!r}")
    print("backward kernel (V1), (BLOCK_D, warps): ms", flush=True)
    grad_loss = torch.ones((), device="cuda")
    for block_d, warps in ((512, 16), (512, 8), (1024, 16), (1024, 4), (2048, 8)):
        config = BackwardConfig(block_d, warps)
        ms = time_cuda_graph(lambda: op.backward(grad_loss, *flat, masks, no_source_weights, best, weights, divisor,
                                                 config=config), rep_ms=40)
        print(f"  ({block_d}, {warps}): {ms:.4f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=(16, 4, 2, 308700), metavar=("B", "S", "C", "T"))
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if args.check:
        print(f"check: {check()} failures", flush=True)
    if args.tune:
        tune(tuple(args.shape))
    est, targets, teacher = make_inputs(tuple(args.shape))
    # On the device, so that every impl's step can be captured in a CUDA graph (no host copy inside).
    pairing = torch.tensor(PAIRING if args.shape[1] == 4 else list(range(args.shape[1])), device="cuda")
    rows = []
    for version, weights in CASES.items():
        impls = ["triton", "reference"] + ([] if args.no_compile else ["compile"])
        for impl in impls:
            try:
                if impl == "compile":
                    fn = torch.compile(loss_fn("reference", version, weights, pairing))
                else:
                    fn = loss_fn(impl, version, weights, pairing)
                ms, graph_ms, extra = measure(fn, est, targets, teacher, graph=True)
            except Exception as error:
                print(f"{version} {impl}: failed {error!r}", flush=True)
                continue
            # Minimal traffic: est, targets, teacher read in forward and backward, grad written.
            best = min(ms, graph_ms or ms)
            gbps = 7 * est.numel() * est.element_size() / best / 1e6
            rows.append((version, impl, ms, graph_ms, gbps, extra))
            print(f"{version:>3} {impl:>10} eager {ms:9.4f} ms graph {graph_ms or float('nan'):9.4f} ms "
                  f"{gbps:8.1f} GB/s {extra:10.2f} MiB extra", flush=True)
    if "triton" in [impl for _, impl, *_ in rows]:
        print("partials launch plans (grid, constexprs):", *op._partials_plans.values(), sep="\n  ")
    print("\n| version | impl | eager ms | graph ms | GB/s (best) | extra MiB |\n|---|---|---|---|---|---|")
    for version, impl, ms, graph_ms, gbps, extra in rows:
        graph_cell = f"{graph_ms:.4f}" if graph_ms is not None else "not capturable"
        print(f"| {version} | {impl} | {ms:.4f} | {graph_cell} | {gbps:.0f} | {extra:.2f} |")
    for version, impl, ms, graph_ms, _, extra in rows:
        if version == "v1" and impl == "triton" and tuple(args.shape) == (16, 4, 2, 308700):
            # Judged on the device time (graph replay), as the core op's targets; eager is reported beside it.
            device_ms = graph_ms if graph_ms is not None else ms
            verdict = "meets" if device_ms <= 0.5 and extra <= 1.0 else "MISSES"
            graph_text = f"graph {graph_ms:.3f} ms, " if graph_ms is not None else "no graph, "
            print(f"\nissue 5 target (V1 fused fwd+bwd <= 0.5 ms, <= 1 MiB extra on an H100): {verdict} "
                  f"({graph_text}eager {ms:.3f} ms, {extra:.2f} MiB on {torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
