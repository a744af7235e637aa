"""CUDA backend of the MixIT L1 op: the nvcc-built library (``csrc/cuda/mixit_l1_cuda.cu``, loaded by
:mod:`nrt_kernels._cuda_lib`) driven through ctypes with raw ``data_ptr()``s and the caller's current stream.
Torch allocates every output and the forward's scratch, so the caching allocator and stream semantics stay torch's.
"""
from __future__ import annotations

import contextlib
import ctypes

import torch

from ... import backends
from ..._cuda_lib import check, load
from ...assignments import candidate_masks, num_candidates
from ...build_config import CUDA_DTYPE_CODES
from .._operands import reduced_rows, row_gradients

_library = load()  # raises CudaLibraryError saying how to get it
_DTYPE_CODES = {getattr(torch, name): code for name, code in CUDA_DTYPE_CODES.items()}
_i64 = ctypes.c_int64


def _check_inputs(est: torch.Tensor, mixtures: torch.Tensor) -> int:
    if est.device.type != "cuda" or mixtures.device != est.device:
        raise RuntimeError(f'impl="cuda" needs est and mixtures on one CUDA device, got {est.device} and '
                           f"{mixtures.device}")
    if est.dtype != mixtures.dtype or est.dtype not in _DTYPE_CODES:
        raise TypeError(f'impl="cuda" supports float32, bfloat16 and float16 inputs of one dtype, got {est.dtype} and '
                        f'{mixtures.dtype}; use impl="triton" or impl="reference" for float64')
    return _DTYPE_CODES[est.dtype]


def _on_device(device: torch.device):
    # The launchers use the calling thread's current device: switch only when it differs (the guard
    # costs more than a launch).
    return contextlib.nullcontext() if device.index == torch.cuda.current_device() else torch.cuda.device(device)


_workspace_floats: dict = {}


def _forward_workspace(lib, device, sizes) -> int:
    """Scratch floats of the forward for these sizes on this device (the plan depends on the device only)."""
    key = (device.index, *sizes)
    floats = _workspace_floats.get(key)
    if floats is None:
        out = _i64(0)
        check(lib, lib.nrt_mixit_l1_forward_workspace(*sizes, ctypes.byref(out)), "forward planning")
        floats = _workspace_floats[key] = out.value
    return floats


def forward(est: torch.Tensor, mixtures: torch.Tensor, partitions: str, *, mean: bool = False):
    dtype = _check_inputs(est, mixtures)
    lib = _library
    est, mixtures = est.contiguous(), mixtures.contiguous()
    batch, num_sources, length = est.shape
    num_mixtures = mixtures.shape[1]
    device = est.device
    with _on_device(device):
        workspace_floats = _forward_workspace(lib, device, (batch, num_sources, num_mixtures, length, dtype))
        workspace = torch.empty(workspace_floats, dtype=torch.float32, device=device)
        masks = candidate_masks(num_sources, num_mixtures, partitions, device)
        row_loss = torch.empty(batch, dtype=torch.float32, device=device)
        best = torch.empty(batch, dtype=torch.int64, device=device)
        code = lib.nrt_mixit_l1_forward(
            est.data_ptr(), mixtures.data_ptr(), masks.data_ptr(), workspace.data_ptr(), workspace_floats,
            row_loss.data_ptr(), best.data_ptr(), batch, num_sources, num_mixtures, length,
            num_candidates(num_sources, num_mixtures, partitions), dtype, torch.cuda.current_stream(device).cuda_stream)
        check(lib, code, "forward")
    return reduced_rows(row_loss, mean), best


def backward(grad, est, mixtures, best, partitions: str, mixtures_grad: bool, *, mean: bool = False):
    dtype = _check_inputs(est, mixtures)
    lib = _library
    est, mixtures = est.contiguous(), mixtures.contiguous()
    batch, num_sources, length = est.shape
    num_mixtures = mixtures.shape[1]
    device = est.device
    with _on_device(device):
        grad_rows = row_gradients(grad, batch, mean).to(device=device, dtype=torch.float32).contiguous()
        best = best.to(device=device, dtype=torch.int64).contiguous()
        grad_est = torch.empty_like(est)
        grad_mix = torch.empty_like(mixtures) if mixtures_grad else None
        code = lib.nrt_mixit_l1_backward(
            grad_rows.data_ptr(), est.data_ptr(), mixtures.data_ptr(),
            candidate_masks(num_sources, num_mixtures, partitions, device).data_ptr(), best.data_ptr(),
            grad_est.data_ptr(), grad_mix.data_ptr() if grad_mix is not None else None,
            batch, num_sources, num_mixtures, length, dtype, torch.cuda.current_stream(device).cuda_stream)
        check(lib, code, "backward")
    return grad_est, grad_mix


backends.register("mixit_l1", "cuda", backends.Kernel(forward, backward))
