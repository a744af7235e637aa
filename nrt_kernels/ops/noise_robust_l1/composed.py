"""The noise-robust loss composed from other ops: a backend's MixIT L1 op with the other terms in PyTorch
(autograd differentiates them, targets included).

Every backend has a fused kernel (``triton.py``, ``cpu.py``); on any backend this composition runs when targets,
teacher targets or source weights require grad (the fused kernels differentiate est only).
"""
from __future__ import annotations

import torch

from ..mixit_l1 import mixit_l1_loss
from . import normalized_source_weights


def _source_l1(est, targets, source_weights):
    # |est - targets| per source (mean over batch and trailing elements), then a (weighted) mean over sources.
    dtype = torch.promote_types(torch.promote_types(est.dtype, targets.dtype), torch.float32)
    per_source = (est.to(dtype) - targets.to(dtype)).abs().transpose(0, 1).reshape(est.shape[1], -1).mean(1)
    if source_weights is None:
        return per_source.mean()
    return (per_source * normalized_source_weights(source_weights, dtype, est.device)).sum()


def _noisy_mixtures(targets, rows, first_mixture_size):
    # Mixture 0 sums the first stems of each row's pairing (half of them by default), mixture 1 the rest.
    first = targets.shape[1] // 2 if first_mixture_size is None else first_mixture_size
    rows = rows.to(targets.device).expand(targets.shape[0], -1)
    index = rows.view(*rows.shape, *(1,) * (targets.ndim - 2)).expand(-1, -1, *targets.shape[2:])
    paired = targets.gather(1, index)
    return torch.stack([paired[:, :first].sum(1), paired[:, first:].sum(1)], dim=1)


def composed_loss(est, targets, teacher_targets, scales: dict, rows, source_weights, mixit_impl: str,
                  first_mixture_size=None):
    terms = {}
    if "l1" in scales:
        terms["l1"] = _source_l1(est, targets, source_weights)
    if "consistency" in scales:
        dtype = torch.promote_types(torch.promote_types(est.dtype, targets.dtype), torch.float32)
        terms["consistency"] = (est.sum(1).to(dtype) - targets.sum(1).to(dtype)).abs().mean()
    if "mixit" in scales:
        terms["mixit"] = mixit_l1_loss(est, _noisy_mixtures(targets, rows, first_mixture_size), mixit_impl,
                                       partitions="generalized", reduction="mean", return_est=False,
                                       return_assignment=False)
    if "teacher" in scales:
        terms["teacher"] = _source_l1(est, teacher_targets, source_weights)
    loss = sum(scales[name] * value for name, value in terms.items())
    return loss, terms

