"""Timers of one forward + backward step: the CPU wall clock, triton's do_bench on CUDA, CUDA-graph replay, and the
copy bandwidth that the report's %copy column divides by.  GPU scripts in benchmarks/ use the same timers."""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import statistics
import time
from typing import Callable

import torch


def reuse_freed_memory() -> bool:
    """glibc: serve large allocations from the heap and never trim it (M_MMAP_THRESHOLD = 32 MiB, its maximum;
    M_TRIM_THRESHOLD = 1 GiB), as a caching allocator would.  By default glibc returns a freed gradient-sized block
    (a few MB) to the system and page-faults a fresh one in on the next step (1-2 ms on a VM, more than a fused
    loss), and which of the impls that take turns pays it depends on their order.  Returns whether it could."""
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or name is None:
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) and libc.mallopt(m_trim_threshold, 1 << 30))


def fwd_bwd_step(loss_of: Callable, inputs: dict) -> Callable:
    """The timed step: the loss of ``inputs``, then its gradient with respect to ``inputs["est"]``."""
    est = inputs["est"]

    def step():
        # autograd.grad, not .backward(): no accumulation into est.grad, so backward only writes grad est.
        (grad,) = torch.autograd.grad(loss_of(inputs), est)
        return grad

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(step: Callable, *, warmup: int, min_repeats: int, budget_s: float, max_repeats: int = 200) -> float:
    """Median wall-clock ms of ``step`` after ``warmup`` calls, timed until ``budget_s`` (``min_repeats`` at least)."""
    if min_repeats < 1:
        raise ValueError(f"min_repeats must be >= 1, got {min_repeats}")
    for _ in range(warmup):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < max_repeats):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    return 1e3 * statistics.median(times)


def time_cuda(step: Callable, *, rep_ms: int) -> float:
    from triton.testing import do_bench

    return do_bench(step, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")


def time_cuda_graph(step: Callable, *, rep_ms: int) -> float:
    """Median ms of replaying one captured forward + backward: what is left once launch overhead is gone."""
    # The graph's private memory pool cannot reuse blocks cached for the eager runs: hand them back first.
    torch.cuda.empty_cache()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    # Autograd and the caching allocator must have seen the step on the capture stream before capture.
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    try:
        return time_cuda(graph.replay, rep_ms=rep_ms)
    finally:
        del graph
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """GB/s of a large tensor copy on ``device``: bytes read + bytes written / median time."""
    numel = (1 << 28) if device.type == "cuda" else (1 << (23 if quick else 25))  # 1 GiB / 32 or 128 MiB fp32
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        ms = time_cuda(lambda: dst.copy_(src), rep_ms=200)
    else:
        ms = time_cpu(lambda: dst.copy_(src), warmup=2, min_repeats=5, budget_s=0.3 if quick else 1.0)
    del src, dst
    return 2 * numel * 4 / (ms * 1e-3) / 1e9
