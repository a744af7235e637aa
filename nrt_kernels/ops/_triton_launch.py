"""Launch machinery shared by every Triton op: accumulator dtypes, one-wave launch sizing, bounded plan caches,
the Triton-runnable guard and small jit helpers.  Imported only by the ops' ``triton.py`` modules."""
from __future__ import annotations

import collections
import warnings

import torch
import triton
import triton.language as tl

from ..backends import check_triton_device, triton_interpreted

# Recorded before any kernel below or in an op module is decorated: triton fixes interpretation per @triton.jit.
INTERPRETED = triton_interpreted()


def acc_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype for inputs of ``dtype``: float64 stays float64, everything else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_runnable(tensor: torch.Tensor) -> None:
    """The launchers' own guard, for calls that reach an op's custom op without going through the front-ends."""
    check_triton_device(tensor.device.type)


class PlanCache:
    """Launch plans by key (shape, dtype, device, options), least recently used dropped past ``maxsize``.

    A training run sees a handful of shapes; a sweep over many shapes must not keep every plan forever."""

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._plans: collections.OrderedDict = collections.OrderedDict()

    def get(self, key, make):
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = make()
            if len(self._plans) > self.maxsize:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def values(self):
        return list(self._plans.values())

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


_warned: set = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def programs_per_wave(kernel, kernel_args: tuple, kernel_kwargs: dict, device: torch.device) -> int:
    """How many programs of ``kernel`` (launched with these arguments) the GPU runs at once.

    Threads, registers and shared memory per SM decide; the register and shared-memory counts are the compiled
    kernel's own. Every op whose programs stride over a row launches exactly this many, so no half-empty tail
    wave follows the full ones.
    """
    if device.type != "cuda":
        # The interpreter: any count is correct; a small one makes the tests' short rows loop over several tiles.
        return 8
    props = torch.cuda.get_device_properties(device)
    threads = 32 * kernel_kwargs["num_warps"]
    per_sm = props.max_threads_per_multi_processor // threads
    try:
        compiled = kernel.warmup(*kernel_args, grid=(1,), **kernel_kwargs)
        getattr(compiled, "_init_handles", lambda: None)()  # loads the binary, which fills n_regs
        registers = -(-max(1, int(compiled.n_regs)) // 8) * 8  # allocated in units of 8 per thread
        per_sm = min(per_sm, props.regs_per_multiprocessor // (registers * threads))
        shared = int(getattr(compiled.metadata, "shared", 0))
        if shared:
            per_sm = min(per_sm, props.shared_memory_per_multiprocessor // shared)
    except Exception as error:  # an older Triton or torch: a moderate budget, said once (it costs speed)
        warn_once(f"nrt_kernels: could not read {kernel.fn.__name__}'s registers ({error!r}); sizing its launch "
                  "for 4 programs per SM, which may be slower")
        per_sm = min(per_sm, 4)
    return max(1, per_sm) * props.multi_processor_count


@triton.jit
def sign(x):
    # sign(0) = 0 and sign(NaN) = 0, exactly like autograd's abs backward.
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)
