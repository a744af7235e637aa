"""Pure-PyTorch reference: the definition every fused path is tested against.

It mirrors asteroid's ``MixITLossWrapper`` with a per-example L1: a loop over every
candidate assignment that materialises its remixed estimates, ``torch.min`` over
candidates (first minimum wins, NaN wins over numbers), autograd for the gradient.
"""
from __future__ import annotations

import torch

from .assignments import candidate_assignments, candidate_groups
from .validate import check_mixit_inputs


def l1_per_example(est_mixtures: torch.Tensor, mixtures: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over everything but the batch dim: shape (B,)."""
    return (est_mixtures - mixtures).abs().flatten(1).mean(1)


def remix(est: torch.Tensor, assignment: torch.Tensor, num_mixtures: int) -> torch.Tensor:
    """Sum each row's sources into its mixtures: ``assignment`` is (B, M) mixture indices; returns (B, N, *)."""
    trailing = (1,) * (est.ndim - 2)
    groups = [
        torch.where((assignment == n).view(*assignment.shape, *trailing), est, torch.zeros((), dtype=est.dtype,
                                                                                          device=est.device)).sum(1)
        for n in range(num_mixtures)
    ]
    return torch.stack(groups, dim=1)


def candidate_losses(est: torch.Tensor, mixtures: torch.Tensor, partitions: str = "generalized",
                     loss_func=l1_per_example) -> torch.Tensor:
    """(B, P) ``loss_func(remixed est, mixtures)`` of every candidate, in the order of ``nrt_kernels.assignments``."""
    groups = candidate_groups(est.shape[1], mixtures.shape[1], partitions)
    losses = [
        loss_func(torch.stack([est[:, list(group)].sum(1) for group in candidate], dim=1), mixtures)
        for candidate in groups
    ]
    return torch.stack(losses, dim=1)


def finish_mixit(row_loss, best, est, num_mixtures, *, partitions, reduction, return_est, return_assignment):
    """Reduce the per-row best losses and append the requested extras, in the documented order."""
    loss = row_loss.mean() if reduction == "mean" else row_loss
    if not (return_est or return_assignment):
        return loss
    assignment = candidate_assignments(est.shape[1], num_mixtures, partitions, est.device)[best]
    outputs = [loss]
    if return_est:
        outputs.append(remix(est, assignment, num_mixtures))
    if return_assignment:
        outputs.append(assignment)
    return tuple(outputs)


def mixit_loss(est, mixtures, *, metric="l1", partitions="generalized", reduction="mean", return_est=False,
               return_assignment=False):
    """Reference MixIT loss; same arguments and results as :func:`nrt_kernels.mixit_loss`."""
    check_mixit_inputs(est, mixtures, metric=metric, partitions=partitions, reduction=reduction)
    row_loss, best = torch.min(candidate_losses(est, mixtures, partitions), dim=1)
    return finish_mixit(row_loss, best, est, mixtures.shape[1], partitions=partitions, reduction=reduction,
                        return_est=return_est, return_assignment=return_assignment)
