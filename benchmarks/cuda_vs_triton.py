"""The hand-written CUDA kernels (impl="cuda") against the Triton kernels and the reference loop, on one GPU.

    python benchmarks/cuda_vs_triton.py [--json FILE]

For each shape (B, M sources, N mixtures, C channels, T samples; float32) it prints the median time
(triton.testing.do_bench) of forward+backward through ``nrt_kernels.mixit_loss`` per impl, then each
backend's forward launcher (partials + best-candidate kernels) and backward launcher alone, with GB/s over
the minimal bytes: the forward reads est and mixtures once; the backward reads them again and writes the
est gradient.  ``copy %`` compares with a device-to-device copy of the same number of bytes, and ``peak MiB``
is the memory allocated beyond the inputs while the call runs (the gradient included).  ``graph ms`` replays
forward+backward from a CUDA graph: eager, an isolated loss is bound by the host's launch overhead.  The
whole run takes well under a minute.
"""
from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

import nrt_kernels
from nrt_kernels import reference
from nrt_kernels.dispatch import resolve_impl
from nrt_kernels.ops import mixit_l1 as op

SHAPES = {  # name: (B, M, N, C, T)
    "sdx": (16, 4, 2, 2, 308700),
    "sdx-m8": (16, 8, 2, 2, 308700),
}
# The reference loop materialises every candidate's remix with autograd: 256 of them at M=8 need tens of GB.
REFERENCE_MAX_CANDIDATES = 16


def median_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def graph_ms(fn) -> float:
    """Median replay time of ``fn`` captured in a CUDA graph (an isolated loss is launch-bound when eager)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as error:  # noqa: BLE001 - report and go on: a backend may not be capturable
        print(f"graph capture failed: {type(error).__name__}: {error}")
        return float("nan")
    return median_ms(graph.replay)


def peak_extra_mib(fn) -> float:
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_gbps(num_bytes: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written) at this transfer size."""
    src = torch.empty(num_bytes // 8, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src)) / 1e6


def run_shape(name, batch, sources, mixtures, channels, samples):
    gen = torch.Generator(device="cuda").manual_seed(0)
    est = torch.randn(batch, sources, channels, samples, device="cuda", generator=gen).requires_grad_(True)
    mix = torch.randn(batch, mixtures, channels, samples, device="cuda", generator=gen)
    length = channels * samples
    elem = est.element_size()
    fwd_bytes = batch * (sources + mixtures) * length * elem
    bwd_bytes = fwd_bytes + batch * sources * length * elem
    copy_bw = copy_gbps(fwd_bytes + bwd_bytes)
    rows = []

    def row(impl, what, ms, num_bytes, peak=float("nan"), graph=float("nan")):
        gbps = num_bytes / ms / 1e6
        rows.append(dict(shape=name, impl=impl, what=what, ms=ms, gbps=gbps, copy_pct=100 * gbps / copy_bw,
                         graph_ms=graph, graph_gbps=num_bytes / graph / 1e6, peak_mib=peak))

    flat_est = est.detach().reshape(batch, sources, length)
    flat_mix = mix.reshape(batch, mixtures, length)
    candidates = nrt_kernels.assignments.num_candidates(sources, mixtures, "generalized")
    results = {}
    for impl in ("cuda", "triton", "reference"):
        if impl == "reference" and candidates > REFERENCE_MAX_CANDIDATES:
            continue
        try:
            resolve_impl(impl, est.device)  # registers the backend (and loads the CUDA library)
        except RuntimeError as error:
            print(f"{name}: skipping impl={impl}: {error}")
            continue

        def step(impl=impl):
            loss = nrt_kernels.mixit_loss(est, mix, impl=impl)
            torch.autograd.grad(loss, est)

        row(impl, "fwd+bwd", median_ms(step), fwd_bytes + bwd_bytes, peak_extra_mib(step),
            graph_ms(step) if impl != "reference" else float("nan"))
        if impl == "reference":
            continue
        forward, backward = op._BACKENDS[impl]
        row(impl, "forward", median_ms(lambda: forward(flat_est, flat_mix, "generalized")), fwd_bytes,
            peak_extra_mib(lambda: forward(flat_est, flat_mix, "generalized")))
        row_loss, best = forward(flat_est, flat_mix, "generalized")
        grad_rows = torch.ones_like(row_loss)
        run_backward = lambda: backward(grad_rows, flat_est, flat_mix, best, "generalized", False)  # noqa: E731
        row(impl, "backward", median_ms(run_backward), bwd_bytes, peak_extra_mib(run_backward))
        results[impl] = (row_loss, best, run_backward()[0])
    if len(results) < 2:
        return rows, copy_bw
    # The two backends must agree before their timings mean anything.
    torch.testing.assert_close(results["cuda"][0], results["triton"][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(results["cuda"][1], results["triton"][1]), "cuda and triton chose different candidates"
    assert torch.equal(results["cuda"][2], results["triton"][2]), "cuda and triton gradients differ"
    return rows, copy_bw


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    all_rows = []
    for name, shape in SHAPES.items():
        rows, copy_bw = run_shape(name, *shape)
        all_rows.extend(rows)
        batch, sources, mixtures, channels, samples = shape
        print(f"\n{name}: B={batch} M={sources} N={mixtures} C={channels} T={samples} float32; "
              f"device copy {copy_bw:.0f} GB/s")
        print(f"{'impl':<10} {'what':<9} {'ms':>8} {'GB/s':>7} {'copy %':>7} {'graph ms':>9} {'graph GB/s':>10} "
              f"{'peak MiB':>9}")
        for r in rows:
            print(f"{r['impl']:<10} {r['what']:<9} {r['ms']:8.3f} {r['gbps']:7.0f} {r['copy_pct']:7.1f} "
                  f"{r['graph_ms']:9.3f} {r['graph_gbps']:10.0f} {r['peak_mib']:9.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(all_rows, handle, indent=1)


if __name__ == "__main__":
    main()
