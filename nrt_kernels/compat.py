"""Drop-in replacements for the classes training code already imports.

``from asteroid.losses import MixITLossWrapper`` becomes
``from nrt_kernels.compat import MixITLossWrapper``; nothing else changes.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import reference
from .losses import mixit_loss


class SingleSrcL1(nn.Module):
    """Per-example L1, ``|est - target|`` averaged over all but the batch dim: shape (B,)."""

    def forward(self, est_targets, targets):
        return reference.l1_per_example(est_targets, targets)


def _is_per_example_l1(loss_func) -> bool:
    if isinstance(loss_func, str):
        return loss_func == "l1"
    if isinstance(loss_func, SingleSrcL1):
        return True
    if type(loss_func).__name__ != "SingleSrcL1":
        return False
    # A class of that name from elsewhere (iSeparate's, a user's): fuse it only if it computes a per-example L1.
    generator = torch.Generator().manual_seed(0)
    est = torch.randn(3, 2, 5, 7, generator=generator, dtype=torch.float64)
    target = torch.randn(3, 2, 5, 7, generator=generator, dtype=torch.float64)
    try:
        with torch.no_grad():
            value = loss_func(est, target)
    except Exception:
        return False
    expected = reference.l1_per_example(est, target)
    return isinstance(value, torch.Tensor) and value.shape == expected.shape and torch.allclose(value, expected)


class MixITLossWrapper(nn.Module):
    """asteroid's ``MixITLossWrapper(loss_func, generalized=True, reduction="mean")``, fused for a per-example L1.

    ``forward(est_targets, targets, return_est=False)`` returns what asteroid returns: the mean loss (or the
    (B, 1) row losses for ``reduction="none"``) and, with ``return_est``, the remixed estimates (B, N, *).
    A ``loss_func`` that is not a per-example L1 (``"l1"``, :class:`SingleSrcL1` or a class of that name that
    computes one) runs the reference loop over every partition, with a one-time warning.
    """

    def __init__(self, loss_func, generalized=True, reduction="mean", impl="auto"):
        super().__init__()
        self.loss_func = loss_func
        self.generalized = generalized
        self.reduction = reduction
        self.impl = impl
        self.fused = _is_per_example_l1(loss_func)
        self._warned = False

    def forward(self, est_targets, targets, return_est=False, **kwargs):
        partitions = "generalized" if self.generalized else "equal"
        if self.fused and not kwargs:
            outputs = mixit_loss(est_targets, targets, partitions=partitions, reduction="none", return_est=return_est,
                                 impl=self.impl)
            row_loss, est_mixtures = outputs if return_est else (outputs, None)
        else:
            if not self._warned:
                warnings.warn(f"nrt_kernels fuses only a per-example L1; {self.loss_func!r} runs the reference loop "
                              "over every partition", stacklevel=2)
                self._warned = True
            losses = reference.candidate_losses(est_targets, targets, partitions,
                                                lambda mixed, target: self.loss_func(mixed, target, **kwargs))
            row_loss, best = torch.min(losses, dim=1)
            est_mixtures = reference.finish_mixit(row_loss, best, est_targets, targets.shape[1], partitions=partitions,
                                                  reduction="none", return_est=True, return_assignment=False)[1]
        loss = row_loss.mean() if self.reduction == "mean" else row_loss[:, None]
        return (loss, est_mixtures) if return_est else loss
