"""Backend-neutral operand preparation shared by every op: dtypes and the (B, rows, D) layout the kernels read."""
from __future__ import annotations

import torch


def row_loss_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are accumulated and reported in float32; float64 stays float64 for gradcheck.
    return torch.float64 if dtype == torch.float64 else torch.float32


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def fused_operand(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` as the kernels read it: ``dtype``, (B, rows, D) row-major (a non-contiguous input costs one copy)."""
    # Each skipped no-op call saves microseconds of host time (a loss call on small inputs is host-bound).
    flat = tensor if tensor.dtype == dtype else tensor.to(dtype)
    if flat.ndim != 3:
        flat = flat.reshape(flat.shape[0], flat.shape[1], -1)
    flat = flat.contiguous()
    # Teacher outputs made under inference mode cannot be saved for backward: one copy makes them ordinary.
    # (torch.compile never sees inference tensors as graph inputs, and cannot trace the test.)
    if (not torch.compiler.is_compiling() and flat.is_inference() and torch.is_grad_enabled()
            and not torch.is_inference_mode_enabled()):
        flat = flat.clone()
    return flat


def reduced_rows(row_loss: torch.Tensor, mean: bool) -> torch.Tensor:
    """The rows' mean (0-dim) when ``mean``, else the (B,) rows: for backends whose kernels write rows only."""
    return row_loss.mean() if mean else row_loss


def row_gradients(grad: torch.Tensor, batch: int, mean: bool) -> torch.Tensor:
    """Contiguous (B,) gradients of the rows from the gradient of :func:`reduced_rows`' result: with ``mean``,
    autograd's own mean backward (expand, then divide by the count)."""
    return (grad.expand(batch) / batch if mean else grad).contiguous()
