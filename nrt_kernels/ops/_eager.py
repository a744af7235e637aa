"""The eager path every fused op shares: an ``autograd.Function`` over the backend functions instead of the
torch.library custom op, for calls that no tracer, tensor subclass or torch.func wrapper can see.  It does the same
work with about half the host time of a tiny forward + backward on a CPU (benchmarks/host_overhead.py); torch.compile,
FakeTensors and tensor subclasses keep the custom op, which also serves double backward.
"""
from __future__ import annotations

import torch

_is_functorch_tensor = torch._C._functorch.is_functorch_wrapped_tensor


def direct_apply(function: type[torch.autograd.Function]):
    """``function.apply`` without ``torch.autograd.Function.apply``'s Python wrapper, which unwraps torch.func
    tensors before calling the C apply beneath it: about 3 us less a call where :func:`takes_direct_path` holds."""
    return super(torch.autograd.Function, function).apply


def takes_direct_path(*tensors: torch.Tensor) -> bool:
    """True unless torch.compile traces the call, or a tensor is a subclass (such as a FakeTensor) or a torch.func
    wrapper that outlived its transform: those need the custom op's dispatch."""
    if torch.compiler.is_compiling():
        return False
    return all(type(tensor) is torch.Tensor and not _is_functorch_tensor(tensor) for tensor in tensors)
