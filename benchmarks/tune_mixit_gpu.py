"""The Triton MixIT kernels on a CUDA device, one at a time: their times, tile sweeps and the host's cost.

    python benchmarks/tune_mixit_gpu.py [--shape 16,4,2,2,308700] [--tune] [--json FILE]

``python -m nrt_kernels.bench`` compares whole forward + backward steps across impls; this script looks inside
the Triton one: the forward (partials + selection) and the backward kernel alone against the memory roofline
(replayed from CUDA graphs, so that the host's launch cost does not hide the kernels' time),
with ``--tune`` the same under other tile shapes (forward: low sources, elements per thread, warps, pipelined
loop stages; backward: tile and warps), and the host's time per eager step (an isolated loss is launch-bound on
a slow host). It prints the forward's launch plan too: programs per SM as sized from the compiled registers.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import nrt_kernels
from nrt_kernels.bench.timing import copy_bandwidth, time_cuda, time_cuda_graph
from nrt_kernels.ops.mixit_l1 import triton as op


# (elements per thread, warps, pipelined loop stages) of the forward sweep.
FORWARD_TILES = ((1, 4, 1), (1, 4, 2), (1, 4, 3), (1, 4, 4), (1, 8, 1), (1, 8, 3), (2, 4, 1), (2, 4, 3))


def forward_sweep(est, mix, fwd_bytes, bandwidth):
    rows = []
    expected_loss, expected_best = op.forward(est, mix, "generalized")
    sources = est.shape[1]
    for low in sorted({min(sources, 5), min(sources, 4)}):
        for elements_per_thread, num_warps, stages in FORWARD_TILES:
            config = op.PartialsConfig(low, 32 * num_warps * elements_per_thread, num_warps, stages)
            key = dict(low=low, elements_per_thread=elements_per_thread, warps=num_warps, stages=stages)
            try:
                row_loss, best = op.forward(est, mix, "generalized", config)
                same = torch.equal(best, expected_best) and torch.allclose(row_loss, expected_loss, rtol=1e-5, atol=0)
                ms = time_cuda_graph(lambda: op.forward(est, mix, "generalized", config), rep_ms=100)
                rows.append(dict(key, forward_ms=ms, roofline=fwd_bytes / ms / 1e6 / bandwidth, same_result=same))
            except Exception as error:  # a shape that does not compile is reported, not fatal
                rows.append(dict(key, error=str(error)[:100]))
    return rows


def backward_sweep(est, mix, best, bwd_bytes, bandwidth):
    rows = []
    grad_rows = torch.full((est.shape[0],), 1.0 / est.shape[0], device=est.device)
    for block in (256, 512, 1024):
        for warps in (4, 8, 16):
            config = op.BackwardConfig(block, warps)
            try:
                ms = time_cuda_graph(
                    lambda: op.backward(grad_rows, est, mix, best, "generalized", False, config), rep_ms=100)
                rows.append(dict(block=block, warps=warps, backward_ms=ms, roofline=bwd_bytes / ms / 1e6 / bandwidth))
            except Exception as error:
                rows.append(dict(block=block, warps=warps, error=str(error)[:100]))
    return rows


def host_ms_per_step(est, mix, steps=50):
    """(issuing, with the GPU): wall ms per eager step with no synchronisation inside, then after synchronising."""
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(steps):
        torch.autograd.grad(nrt_kernels.mixit_loss(est, mix, impl="triton"), est)
    issuing = (time.perf_counter() - begin) / steps
    torch.cuda.synchronize()
    return 1e3 * issuing, 1e3 * (time.perf_counter() - begin) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="16,4,2,2,308700", help="B,M,N,C,T")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    batch, sources, mixtures, channels, length = (int(v) for v in args.shape.split(","))

    device = torch.device("cuda", torch.cuda.current_device())
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth:.0f} GB/s, torch {torch.__version__}")
    gen = torch.Generator(device=device).manual_seed(0)
    est = torch.randn(batch, sources, channels * length, device=device, generator=gen)
    mix = torch.randn(batch, mixtures, channels * length, device=device, generator=gen)
    fwd_bytes = (est.numel() + mix.numel()) * 4
    bwd_bytes = fwd_bytes + est.numel() * 4

    _, best = op.forward(est, mix, "generalized")
    plan = op.forward_plan(est, mix, "generalized", op.default_partials_config(sources, mixtures))
    highs, workers, _ = plan["partials_grid"]
    programs_per_sm = highs * workers * batch / torch.cuda.get_device_properties(device).multi_processor_count
    print(f"forward plan: grid {plan['partials_grid']}, {programs_per_sm:.1f} programs per SM, "
          f"{plan['partials_kwargs']}")
    grad_rows = torch.full((batch,), 1.0 / batch, device=device)
    forward = time_cuda_graph(lambda: op.forward(est, mix, "generalized"), rep_ms=200)
    backward = time_cuda_graph(lambda: op.backward(grad_rows, est, mix, best, "generalized", False), rep_ms=200)
    forward_eager = time_cuda(lambda: op.forward(est, mix, "generalized"), rep_ms=200)
    leaf = est.clone().requires_grad_(True)
    issuing, total = host_ms_per_step(leaf, mix)
    result = dict(device=torch.cuda.get_device_name(), copy_gbps=bandwidth, shape=args.shape,
                  forward_programs_per_sm=programs_per_sm,
                  forward_ms=forward, backward_ms=backward, forward_eager_ms=forward_eager, host_issuing_ms=issuing,
                  host_total_ms=total)
    print(f"forward (partials + selection) {forward:.3f} ms, {100 * fwd_bytes / forward / 1e6 / bandwidth:.1f}% "
          f"of copy; backward {backward:.3f} ms, {100 * bwd_bytes / backward / 1e6 / bandwidth:.1f}% of copy "
          f"(CUDA-graph replay; the forward eager: {forward_eager:.3f} ms)")
    print(f"eager step: the host issues it in {issuing:.3f} ms, {total:.3f} ms with the GPU")
    if args.tune:
        result["forward_sweep"] = forward_sweep(est, mix, fwd_bytes, bandwidth)
        result["backward_sweep"] = backward_sweep(est, mix, best, bwd_bytes, bandwidth)
        for row in result["forward_sweep"] + result["backward_sweep"]:
            print(row)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
