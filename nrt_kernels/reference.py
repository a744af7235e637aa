"""Pure-PyTorch reference: the definition every fused path is tested against.

It mirrors asteroid's ``MixITLossWrapper`` with a per-example L1: a loop over every
candidate assignment that materialises its remixed estimates, ``torch.min`` over
candidates (first minimum wins, NaN wins over numbers), autograd for the gradient.
"""
from __future__ import annotations

import torch

from .assignments import candidate_groups
from .validate import NOISE_ROBUST_TERMS, check_mixit_inputs, check_noise_robust_inputs, check_pairing


def l1_per_example(est_mixtures: torch.Tensor, mixtures: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over everything but the batch dim: shape (B,)."""
    return (est_mixtures - mixtures).abs().flatten(1).mean(1)


def remix(est: torch.Tensor, assignment: torch.Tensor, num_mixtures: int) -> torch.Tensor:
    """Sum each row's sources into its mixtures, one row at a time (asteroid's ``reorder_source``):
    ``assignment`` is (B, M) mixture indices; returns (B, N, *)."""
    rows = []
    for b in range(est.shape[0]):
        mixed = []
        for n in range(num_mixtures):
            sources = [s for s in range(est.shape[1]) if assignment[b, s] == n]
            mixed.append(est[b, sources].sum(0) if sources else torch.zeros_like(est[b, 0]))
        rows.append(torch.stack(mixed))
    return torch.stack(rows)


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
    groups = candidate_groups(est.shape[1], num_mixtures, partitions)
    assignment = torch.empty(est.shape[0], est.shape[1], dtype=torch.int64, device=est.device)
    for b, candidate in enumerate(best.tolist()):
        for n, group in enumerate(groups[candidate]):
            assignment[b, list(group)] = n
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


# ----------------------------------------------------------------------------------------------
# Noise-robust losses V1 / V2: iSeparate-SDX's MixITnL1nMeanTeacher(V2) over the MixIT reference.
# ----------------------------------------------------------------------------------------------


def active_terms(version: str, weights, has_teacher: bool) -> dict:
    """``{term name: weight}`` of the terms a call computes, in iSeparate's order.

    A term runs when its weight is non-zero; the teacher term also needs teacher targets (iSeparate skips it
    on iterations where the mean teacher is disabled)."""
    active = {name: float(weight) for name, weight in zip(NOISE_ROBUST_TERMS[version], weights)
              if weight != 0 and (name != "teacher" or has_teacher)}
    if not active:
        raise ValueError(f"no term of the {version} loss is active with weights {list(weights)} "
                         f"(teacher targets {'given' if has_teacher else 'not given'})")
    return active


def loss_divisor(version: str, weights, active: dict, normalize: str) -> float:
    """V1 under "iseparate" divides by the sum of all its weights, even when the teacher term is skipped;
    V2 (either setting) and "active" divide by the weights of the terms computed."""
    if version == "v1" and normalize == "iseparate":
        return float(sum(weights))
    return float(sum(active.values()))


def pairing_rows(pairing, batch: int, num_sources: int, device) -> torch.Tensor:
    """(B, S) int64 pairing: ``None`` draws one ``torch.randperm(S)`` from the global generator for the whole
    batch (iSeparate), ``"per_example"`` one permutation per row; a tensor is checked and broadcast."""
    if pairing is None:
        rows = torch.randperm(num_sources)
    elif isinstance(pairing, str):
        if pairing != "per_example":
            raise ValueError(f'pairing must be None, "per_example" or an integer tensor, got {pairing!r}')
        rows = torch.stack([torch.randperm(num_sources) for _ in range(batch)])
    else:
        check_pairing(pairing, batch, num_sources, device)
        rows = pairing
    return rows.to(device=device, dtype=torch.int64).expand(batch, num_sources)


def noisy_mixtures(targets: torch.Tensor, rows: torch.Tensor, first_mixture_size=None) -> torch.Tensor:
    """(B, 2, *): row ``b`` sums the noisy stems ``rows[b, :k]`` into mixture 0 and the rest into mixture 1, with
    ``k = first_mixture_size``, by default S/2 (iSeparate's code takes 2)."""
    first = targets.shape[1] // 2 if first_mixture_size is None else first_mixture_size
    index = torch.arange(targets.shape[0], device=targets.device)[:, None]
    rows = rows.to(targets.device)
    return torch.stack([targets[index, rows[:, :first]].sum(1), targets[index, rows[:, first:]].sum(1)], dim=1)


def source_l1(est: torch.Tensor, targets: torch.Tensor, source_weights=None) -> torch.Tensor:
    """iSeparate's ``l1_loss``: |est - targets| averaged over trailing dims, then the batch, then a (weighted)
    mean over sources; half inputs are upcast to float32 like its ``.float()``."""
    dtype = torch.promote_types(torch.promote_types(est.dtype, targets.dtype), torch.float32)
    loss = (est.to(dtype) - targets.to(dtype)).abs()
    loss = loss.mean(dim=tuple(range(2, est.ndim))).mean(0)
    if source_weights is None:
        weights = loss.new_ones(est.shape[1])
        return (loss * weights).sum() / weights.sum()
    # Normalised in float64: weights such as 1e-46 or 1e39 would underflow or overflow in float32.
    weights = torch.as_tensor(source_weights, dtype=torch.float64, device=est.device)
    return (loss * (weights / weights.sum()).to(dtype)).sum()


def mixture_consistency_l1(est: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """V2's ``nn.L1Loss()(est.sum(1), targets.sum(1))``: the mean over batch and trailing dims."""
    return torch.nn.functional.l1_loss(est.sum(1), targets.sum(1))


def noise_robust_terms(est, targets, teacher_targets, active: dict, rows, *, source_weights=None,
                       mixit=mixit_loss, first_mixture_size=None) -> dict:
    """``{name: value}`` of the active terms; ``mixit(est, mixtures)`` scores the MixIT term (any backend)."""
    terms = {}
    if "l1" in active:
        terms["l1"] = source_l1(est, targets, source_weights)
    if "consistency" in active:
        terms["consistency"] = mixture_consistency_l1(est, targets)
    if "mixit" in active:
        terms["mixit"] = mixit(est, noisy_mixtures(targets, rows, first_mixture_size))
    if "teacher" in active:
        terms["teacher"] = source_l1(est, teacher_targets, source_weights)
    return terms


def combine_terms(terms: dict, active: dict, divisor: float) -> torch.Tensor:
    """``sum(weight * term) / divisor``, each weight divided by the divisor first, in float64: multiplying float32
    terms by weights such as 1e-46 or 1e39 would underflow or overflow (a NaN loss)."""
    loss = 0
    for name, value in terms.items():
        loss = loss + (active[name] / divisor) * value
    return loss


def noise_robust_loss(est, targets, *, version="v1", weights, teacher_targets=None, pairing=None,
                      normalize="iseparate", source_weights=None, return_terms=False, _first_mixture_size=None):
    """Reference V1/V2 noise-robust loss; same arguments and results as :func:`nrt_kernels.noise_robust_loss`."""
    check_noise_robust_inputs(est, targets, teacher_targets, version=version, weights=weights, normalize=normalize,
                              source_weights=source_weights, first_mixture_size=_first_mixture_size)
    active = active_terms(version, weights, teacher_targets is not None)
    # The permutation is drawn only when the MixIT term runs, so the global generator advances like iSeparate's.
    rows = pairing_rows(pairing, est.shape[0], est.shape[1], est.device) if "mixit" in active else None
    terms = noise_robust_terms(est, targets, teacher_targets, active, rows, source_weights=source_weights,
                               first_mixture_size=_first_mixture_size)
    loss = combine_terms(terms, active, loss_divisor(version, weights, active, normalize))
    if return_terms:
        return loss, {name: value.detach() for name, value in terms.items()}
    return loss
