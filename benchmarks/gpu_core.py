"""MixIT L1 on a CUDA device: every impl against the asteroid-style loop and torch.compile of it.

    python benchmarks/gpu_core.py [--tune] [--json FILE]

Prints one row per (shape, impl): median ms of forward+backward, eager and replayed from a CUDA graph
(an isolated loss is launch-bound), GB/s over the minimal bytes (est+mixtures read in forward and again
in backward, grad written), the fraction of the measured device copy bandwidth, and the peak memory
beyond inputs and grad.  ``--tune`` also times the forward kernel under alternative tile configurations.
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
    "sdx-b32": (32, 4, 2, 2, 308700),
    "sdx-m8": (16, 8, 2, 2, 308700),
}


def copy_bandwidth() -> float:
    src = torch.empty(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6  # GB/s, bytes read + written


def median_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def graph_ms(loss_fn, est, mix) -> float:
    # Capture on a side stream with a leaf made there: autograd then never touches the legacy stream.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        leaf = est.detach().clone().requires_grad_(True)

        def step():
            return torch.autograd.grad(loss_fn(leaf, mix), leaf)

        for _ in range(3):
            step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    return median_ms(graph.replay)


def extra_memory_mib(step, est) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base - est.numel() * est.element_size()) / 2**20


def measure(name, loss_fn, est, mix, fwd_bytes, bwd_bytes, bandwidth, graphs=True):
    def step():
        return torch.autograd.grad(loss_fn(est, mix), est)

    eager = median_ms(step)
    replay = graph_ms(loss_fn, est, mix) if graphs else float("nan")
    best = min(eager, replay) if graphs else eager
    gbps = (fwd_bytes + bwd_bytes) / best / 1e6
    return dict(impl=name, eager_ms=eager, graph_ms=replay, gbps=gbps, roofline=gbps / bandwidth,
                extra_mib=extra_memory_mib(step, est))


def tune_forward(est, mix, bandwidth, fwd_bytes):
    """Forward time under other tile shapes; the launch still sizes one wave from the compiled kernel."""
    rows = []
    original = op.forward_config
    sources = est.shape[1]
    for low in sorted({min(sources, 5), min(sources, 4)}):
        for elements_per_thread in (1, 2):
            for num_warps in (4, 8):
                def config(*_args, e=elements_per_thread, w=num_warps, lo=low):
                    return lo, 32 * w * e, w
                op.forward_config = config
                op._forward_plans.clear()
                key = dict(low=low, ept=elements_per_thread, warps=num_warps)
                try:
                    ms = median_ms(lambda: op.triton_forward(est, mix, "generalized"))
                    rows.append(dict(key, fwd_ms=ms, roofline=fwd_bytes / ms / 1e6 / bandwidth))
                except Exception as error:  # a configuration that does not compile is reported, not fatal
                    rows.append(dict(key, error=str(error)[:80]))
                finally:
                    op.forward_config = original
                    op._forward_plans.clear()
    return rows


def tune_backward(est, mix, bandwidth, bwd_bytes):
    rows = []
    _, best = op.triton_forward(est, mix, "generalized")
    grad_rows = torch.full((est.shape[0],), 1.0 / est.shape[0], device=est.device)
    original = (op.BACKWARD_BLOCK_D, op.BACKWARD_WARPS)
    for block in (256, 512, 1024):
        for warps in (4, 8, 16):
            op.BACKWARD_BLOCK_D, op.BACKWARD_WARPS = block, warps
            try:
                ms = median_ms(lambda: op.triton_backward(grad_rows, est, mix, best, "generalized", False))
                rows.append(dict(block=block, warps=warps, bwd_ms=ms, roofline=bwd_bytes / ms / 1e6 / bandwidth))
            except Exception as error:
                rows.append(dict(block=block, warps=warps, error=str(error)[:80]))
            finally:
                op.BACKWARD_BLOCK_D, op.BACKWARD_WARPS = original
    return rows


def host_overhead_ms(loss_fn, est, mix, steps=50):
    """Wall time per eager step with no synchronisation inside: the host's cost when it exceeds the GPU's."""
    import time

    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(steps):
        torch.autograd.grad(loss_fn(est, mix), est)
    host = (time.perf_counter() - begin) / steps
    torch.cuda.synchronize()
    total = (time.perf_counter() - begin) / steps
    return 1e3 * host, 1e3 * total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the loop (sdx only)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    print(f"device {props.name}, {props.multi_processor_count} SMs, copy bandwidth {bandwidth:.0f} GB/s, "
          f"torch {torch.__version__}")
    results = []
    for shape in args.shapes.split(","):
        batch, sources, mixtures, channels, length = SHAPES[shape]
        gen = torch.Generator(device="cuda").manual_seed(0)
        est = torch.randn(batch, sources, channels, length, device="cuda", generator=gen, requires_grad=True)
        mix = torch.randn(batch, mixtures, channels, length, device="cuda", generator=gen)
        in_bytes = (est.numel() + mix.numel()) * 4
        fwd_bytes, bwd_bytes = in_bytes, in_bytes + est.numel() * 4

        loss = nrt_kernels.mixit_loss(est, mix, impl="triton", reduction="none")
        truth = reference.mixit_loss(est.double(), mix.double(), reduction="none")
        rel = ((loss.double() - truth).abs().max() / truth.abs().max()).item()
        print(f"[{shape}] triton vs float64 reference: max rel err {rel:.2e}")

        impls = {"triton": lambda e, m: nrt_kernels.mixit_loss(e, m, impl="triton")}
        for native in ("cuda",):
            try:
                resolve_impl(native, est.device)
                impls[native] = lambda e, m, n=native: nrt_kernels.mixit_loss(e, m, impl=n)
            except Exception as error:
                print(f"[{shape}] impl={native} unavailable: {error}")
        impls["loop (asteroid-style)"] = reference.mixit_loss
        if args.compile and shape == "sdx":
            impls["torch.compile(loop)"] = torch.compile(reference.mixit_loss)
        for name, fn in impls.items():
            row = measure(name, fn, est, mix, fwd_bytes, bwd_bytes, bandwidth,
                          graphs=name in ("triton", "cuda"))  # the loop indexes with host lists: not capturable
            row["shape"] = shape
            results.append(row)
            print(f"[{shape}] {name:24s} eager {row['eager_ms']:8.3f} ms  graph {row['graph_ms']:8.3f} ms  "
                  f"{row['gbps']:7.0f} GB/s  {100 * row['roofline']:5.1f}% of copy  extra {row['extra_mib']:9.2f} MiB")
        fwd_only = median_ms(lambda: op.triton_forward(est.detach().reshape(batch, sources, -1),
                                                       mix.reshape(batch, mixtures, -1), "generalized"))
        print(f"[{shape}] triton forward kernels alone {fwd_only:.3f} ms "
              f"({100 * fwd_bytes / fwd_only / 1e6 / bandwidth:.1f}% of copy)")
        flat_est = est.detach().reshape(batch, sources, -1)
        flat_mix = mix.reshape(batch, mixtures, -1)
        host, total = host_overhead_ms(impls["triton"], est, mix)
        print(f"[{shape}] triton eager: host {host:.3f} ms/step issuing, {total:.3f} ms/step with the GPU")
        if args.tune and shape in ("sdx", "sdx-m8"):
            for row in tune_forward(flat_est, flat_mix, bandwidth, fwd_bytes):
                print(f"[{shape}] tune-fwd {row}")
                results.append(dict(row, shape=shape, impl="tune-fwd"))
        if args.tune and shape == "sdx":
            for row in tune_backward(flat_est, flat_mix, bandwidth, bwd_bytes):
                print(f"[{shape}] tune-bwd {row}")
                results.append(dict(row, shape=shape, impl="tune-bwd"))
        del est, mix
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(device=props.name, copy_gbps=bandwidth, torch=torch.__version__, rows=results), handle,
                      indent=1)


if __name__ == "__main__":
    main()
