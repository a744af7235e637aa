"""Memory one forward + backward step allocates beyond its inputs: torch.profiler on a CPU, the caching
allocator's peak on CUDA."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

import torch

from .timing import synchronize


@contextlib.contextmanager
def _quiet_stderr():
    # The CPU profiler's kineto backend prints start/stop lines on fd 2, between the progress bar's updates.
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes_cpu(step: Callable) -> int:
    """Peak of live tensor bytes allocated by one ``step`` (its own allocations only), from torch.profiler.

    Every CPU tensor allocation and free goes through c10's allocator, which reports to the profiler with
    profile_memory=True; inductor's buffers included. Python objects and allocator caching are not counted.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = step()
            del result
    events = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def peak_bytes_cuda(step: Callable, device: torch.device) -> int:
    """torch.cuda.max_memory_allocated during one ``step``, minus what was allocated before it (the inputs)."""
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return peak - base
