"""Public front-ends: thin wrappers that validate, pick a backend and call one op."""
from __future__ import annotations

import torch
from torch import nn

from . import reference
from .dispatch import resolve_impl
from .ops.mixit_l1 import mixit_l1
from .validate import check_mixit_inputs


def mixit_loss(est, mixtures, *, metric="l1", partitions="generalized", reduction="mean", return_est=False,
               return_assignment=False, impl="auto"):
    """MixIT loss with a per-example L1: the best assignment of sources to mixtures, per row.

    Args:
        est: (B, M, *) estimated sources.
        mixtures: (B, N, *) mixtures (or noisy stems) with the same trailing dims.
        metric: "l1", the mean absolute error over mixtures and trailing dims.
        partitions: "generalized" (every assignment, empty groups allowed) or "equal" (M // N sources each).
        reduction: "mean" over rows, or "none" for the (B,) row losses.
        return_est: also return the remixed estimates (B, N, *) of each row's best candidate.
        return_assignment: also return (B, M) int64, the mixture each source was assigned to.
        impl: "auto", "triton", "cuda", "cpu" or "reference".

    Returns:
        ``loss``, or a tuple ``(loss, est_mixtures?, assignment?)`` in that order.
        The loss is float32 for float16/bfloat16/float32 inputs on the fused paths.
    """
    check_mixit_inputs(est, mixtures, metric=metric, partitions=partitions, reduction=reduction)
    backend = resolve_impl(impl, est.device)
    if backend == "reference":
        return reference.mixit_loss(est, mixtures, metric=metric, partitions=partitions, reduction=reduction,
                                    return_est=return_est, return_assignment=return_assignment)
    batch, num_sources, num_mixtures = est.shape[0], est.shape[1], mixtures.shape[1]
    dtype = torch.promote_types(est.dtype, mixtures.dtype)
    # The kernels read (B, M, D) and (B, N, D) row-major: a non-contiguous input costs one copy here.
    flat_est = est.to(dtype).reshape(batch, num_sources, -1).contiguous()
    flat_mix = mixtures.to(dtype).reshape(batch, num_mixtures, -1).contiguous()
    row_loss, best = mixit_l1(flat_est, flat_mix, partitions, backend)
    return reference.finish_mixit(row_loss, best, est, num_mixtures, partitions=partitions, reduction=reduction,
                                  return_est=return_est, return_assignment=return_assignment)


class MixITLoss(nn.Module):
    """Module form of :func:`mixit_loss`; the keyword arguments are fixed at construction."""

    def __init__(self, *, metric="l1", partitions="generalized", reduction="mean", return_est=False,
                 return_assignment=False, impl="auto"):
        super().__init__()
        self.options = dict(metric=metric, partitions=partitions, reduction=reduction, return_est=return_est,
                            return_assignment=return_assignment, impl=impl)

    def forward(self, est, mixtures):
        return mixit_loss(est, mixtures, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
