"""The noise-robust loss composed from other ops, for a backend without a fused V1/V2 kernel: that backend's
MixIT L1 op with the other terms in PyTorch (autograd differentiates them, targets included).

The "cpu" backend (``cpu.py``) is this composition until a fused C++ kernel exists; on any backend it runs when
targets or teacher targets require grad (the fused kernels differentiate est only).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..mixit_l1 import mixit_l1_loss


class Composition(NamedTuple):
    """What a backend without a fused kernel registers: ``loss(est, targets, teacher_targets, active, rows,
    divisor, source_weights, mixit_impl) -> (loss, {term: value})``."""

    loss: Callable


def _source_l1(est, targets, source_weights):
    # |est - targets| per source (mean over batch and trailing elements), then a (weighted) mean over sources.
    dtype = torch.promote_types(torch.promote_types(est.dtype, targets.dtype), torch.float32)
    per_source = (est.to(dtype) - targets.to(dtype)).abs().transpose(0, 1).reshape(est.shape[1], -1).mean(1)
    if source_weights is None:
        return per_source.mean()
    weights = torch.as_tensor(source_weights, dtype=dtype, device=est.device).reshape(-1)
    return (per_source * weights).sum() / weights.sum()


def _noisy_mixtures(targets, rows):
    # Mixture 0 sums the stems in the first half of each row's pairing, mixture 1 the rest.
    half = targets.shape[1] // 2
    rows = rows.to(targets.device)
    index = rows.view(*rows.shape, *(1,) * (targets.ndim - 2)).expand(-1, -1, *targets.shape[2:])
    paired = targets.gather(1, index)
    return torch.stack([paired[:, :half].sum(1), paired[:, half:].sum(1)], dim=1)


def composed_loss(est, targets, teacher_targets, active: dict, rows, divisor: float, source_weights,
                  mixit_impl: str):
    terms = {}
    if "l1" in active:
        terms["l1"] = _source_l1(est, targets, source_weights)
    if "consistency" in active:
        dtype = torch.promote_types(torch.promote_types(est.dtype, targets.dtype), torch.float32)
        terms["consistency"] = (est.sum(1).to(dtype) - targets.sum(1).to(dtype)).abs().mean()
    if "mixit" in active:
        terms["mixit"] = mixit_l1_loss(est, _noisy_mixtures(targets, rows), mixit_impl, partitions="generalized", reduction="mean",
                                       return_est=False, return_assignment=False)
    if "teacher" in active:
        terms["teacher"] = _source_l1(est, teacher_targets, source_weights)
    loss = sum(active[name] * value for name, value in terms.items()) / divisor
    return loss, terms

