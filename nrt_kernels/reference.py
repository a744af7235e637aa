"""Pure-PyTorch reference: the definition every fused path is tested against.

It mirrors asteroid's ``MixITLossWrapper`` with a per-example loss (L1; asteroid 0.7.0's ``MultiSrcNegSDR`` and
``MultiSrcMSE``; Google's thresholded log-MSE): a loop over every candidate assignment that materialises its
remixed estimates, ``torch.min`` over candidates (first minimum wins, NaN wins over numbers), autograd for the
gradient.
"""
from __future__ import annotations

import itertools
import math

import torch

from .assignments import candidate_groups
from .validate import NOISE_ROBUST_TERMS, check_mixit_inputs, check_noise_robust_inputs, check_pairing
from .validate import check_pit_inputs


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
               return_assignment=False, zero_mean=None, eps=None, max_snr=None):
    """Reference MixIT loss; same arguments and results as :func:`nrt_kernels.mixit_loss`."""
    options = check_mixit_inputs(est, mixtures, metric=metric, partitions=partitions, reduction=reduction,
                                 zero_mean=zero_mean, eps=eps, max_snr=max_snr)
    loss_func = per_example_loss(metric, options)
    row_loss, best = torch.min(candidate_losses(est, mixtures, partitions, loss_func), dim=1)
    return finish_mixit(row_loss, best, est, mixtures.shape[1], partitions=partitions, reduction=reduction,
                        return_est=return_est, return_assignment=return_assignment)


# ----------------------------------------------------------------------------------------------
# The bilinear MixIT metrics: asteroid 0.7.0's MultiSrcNegSDR (SI-SDR, SD-SDR, SNR) and MultiSrcMSE, Google's
# thresholded log-MSE (google-research/sound-separation, models/neurips2020_mixit/model.py with
# models/train/mixit.py). Each takes remixed estimates and mixtures (B, N, *), flattens the trailing dims into one
# signal per mixture (what reshaping to (B, N, -1) before calling asteroid gives) and returns (B,).
# ----------------------------------------------------------------------------------------------


def neg_sdr_per_example(est_mixtures: torch.Tensor, mixtures: torch.Tensor, sdr_type: str = "sisdr",
                        zero_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """asteroid 0.7.0 ``MultiSrcNegSDR(sdr_type, zero_mean, take_log=True)`` with its EPS equal to ``eps``.

    The same tensor operations in asteroid's order, EPS in asteroid's three places: added to the target's energy
    (SI-SDR and SD-SDR scale the target by <est, target> / (||target||^2 + EPS)), to the noise energy in the
    denominator, and inside the log: ``-mean over mixtures of 10 log10(||scaled||^2 / (||noise||^2 + EPS) + EPS)``,
    noise = est - scaled target (SI-SDR) or est - target (SD-SDR, SNR; SNR's numerator is ||target||^2).
    (asteroid 0.7.0's constructor ignores its ``EPS`` argument and always stores 1e-8; here ``eps`` is used.)
    """
    est = est_mixtures.flatten(2)
    target = mixtures.flatten(2)
    if zero_mean:
        target = target - torch.mean(target, dim=2, keepdim=True)
        est = est - torch.mean(est, dim=2, keepdim=True)
    if sdr_type in ("sisdr", "sdsdr"):
        dot = torch.sum(est * target, dim=2, keepdim=True)
        target_energy = torch.sum(target**2, dim=2, keepdim=True) + eps
        scaled_target = dot * target / target_energy
    else:
        scaled_target = target
    noise = est - (scaled_target if sdr_type == "sisdr" else target)
    sdr = torch.sum(scaled_target**2, dim=2) / (torch.sum(noise**2, dim=2) + eps)
    sdr = 10 * torch.log10(sdr + eps)
    return -torch.mean(sdr, dim=-1)


def mse_per_example(est_mixtures: torch.Tensor, mixtures: torch.Tensor) -> torch.Tensor:
    """asteroid's ``MultiSrcMSE`` (an alias of ``SingleSrcMSE``): (mixture - est)^2 averaged over all but the batch."""
    return ((mixtures - est_mixtures) ** 2).flatten(1).mean(1)


def log_mse_per_example(est_mixtures: torch.Tensor, mixtures: torch.Tensor, max_snr: float = 30.0,
                        eps: float = 1e-8) -> torch.Tensor:
    """Google's MixIT loss: ``log_mse_loss(mixture, remix, max_snr)`` per mixture, averaged over the mixtures:
    10 log10(||x - r||^2 + 10^(-max_snr/10) ||x||^2 + eps), eps being Google's log stabilizer (1e-8)."""
    target = mixtures.flatten(2)
    err_pow = torch.sum(torch.square(target - est_mixtures.flatten(2)), dim=-1)
    bias = 10.0 ** (-max_snr / 10.0) * torch.sum(torch.square(target), dim=-1)
    return torch.mean(10.0 * (torch.log(bias + err_pow + eps) / math.log(10.0)), dim=1)


def per_example_loss(metric: str, options):
    """``loss_func(est_mixtures, mixtures) -> (B,)`` of a metric with its (validated) options."""
    if metric == "l1":
        return l1_per_example
    if metric == "mse":
        return mse_per_example
    if metric == "log_mse":
        return lambda est_mixtures, mixtures: log_mse_per_example(est_mixtures, mixtures, options.max_snr,
                                                                  options.eps)
    return lambda est_mixtures, mixtures: neg_sdr_per_example(est_mixtures, mixtures, metric, options.zero_mean,
                                                              options.eps)


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


# ----------------------------------------------------------------------------------------------
# PIT: asteroid 0.7.0's pairwise losses and PITLossWrapper algorithm, as asteroid computes them.
# A pairwise matrix is (B, M, M) with [b, i, j] = loss(est_i, target_j); a permutation ``perm`` (B, M) holds the
# est index matched to each target (asteroid's ``batch_indices``: ``est[b, perm[b]]`` lines up with the targets).
# ----------------------------------------------------------------------------------------------


class PairwiseNegSDR(torch.nn.Module):
    """asteroid.losses.PairwiseNegSDR: (B, n, T) est and targets -> (B, n, n) negative SI-SDR / SD-SDR / SNR in dB.

    ``EPS`` sits where asteroid puts it: in the target energy, the noise energy and the log."""

    def __init__(self, sdr_type, zero_mean=True, take_log=True, EPS=1e-8):
        super().__init__()
        assert sdr_type in ("snr", "sisdr", "sdsdr")
        self.sdr_type, self.zero_mean, self.take_log, self.EPS = sdr_type, zero_mean, take_log, EPS

    def forward(self, est_targets, targets):
        if targets.size() != est_targets.size() or targets.ndim != 3:
            raise TypeError(f"Inputs must be of shape [batch, n_src, time], got {targets.size()} and "
                            f"{est_targets.size()} instead")
        if self.zero_mean:
            targets = targets - torch.mean(targets, dim=2, keepdim=True)
            est_targets = est_targets - torch.mean(est_targets, dim=2, keepdim=True)
        s_target = torch.unsqueeze(targets, dim=1)
        s_estimate = torch.unsqueeze(est_targets, dim=2)
        if self.sdr_type in ("sisdr", "sdsdr"):
            pair_wise_dot = torch.sum(s_estimate * s_target, dim=3, keepdim=True)
            s_target_energy = torch.sum(s_target**2, dim=3, keepdim=True) + self.EPS
            pair_wise_proj = pair_wise_dot * s_target / s_target_energy
        else:
            pair_wise_proj = s_target.repeat(1, s_target.shape[2], 1, 1)
        e_noise = s_estimate - s_target if self.sdr_type in ("sdsdr", "snr") else s_estimate - pair_wise_proj
        pair_wise_sdr = torch.sum(pair_wise_proj**2, dim=3) / (torch.sum(e_noise**2, dim=3) + self.EPS)
        if self.take_log:
            pair_wise_sdr = 10 * torch.log10(pair_wise_sdr + self.EPS)
        return -pair_wise_sdr


class SingleSrcNegSDR(torch.nn.Module):
    """asteroid.losses.SingleSrcNegSDR: (B, T) -> (B,). asteroid ignores its ``EPS`` argument (always 1e-8)."""

    def __init__(self, sdr_type, zero_mean=True, take_log=True, reduction="none", EPS=1e-8):
        super().__init__()
        assert sdr_type in ("snr", "sisdr", "sdsdr")
        self.sdr_type, self.zero_mean, self.take_log, self.reduction, self.EPS = (sdr_type, zero_mean, take_log,
                                                                                   reduction, 1e-8)

    def forward(self, est_target, target):
        if target.size() != est_target.size() or target.ndim != 2:
            raise TypeError(f"Inputs must be of shape [batch, time], got {target.size()} and {est_target.size()} "
                            "instead")
        if self.zero_mean:
            target = target - torch.mean(target, dim=1, keepdim=True)
            est_target = est_target - torch.mean(est_target, dim=1, keepdim=True)
        if self.sdr_type in ("sisdr", "sdsdr"):
            dot = torch.sum(est_target * target, dim=1, keepdim=True)
            scaled_target = dot * target / (torch.sum(target**2, dim=1, keepdim=True) + self.EPS)
        else:
            scaled_target = target
        e_noise = est_target - target if self.sdr_type in ("sdsdr", "snr") else est_target - scaled_target
        losses = torch.sum(scaled_target**2, dim=1) / (torch.sum(e_noise**2, dim=1) + self.EPS)
        if self.take_log:
            losses = 10 * torch.log10(losses + self.EPS)
        losses = losses.mean() if self.reduction == "mean" else losses
        return -losses


class MultiSrcNegSDR(torch.nn.Module):
    """asteroid.losses.MultiSrcNegSDR: (B, n, T) -> (B,), the mean over sources of the matched pairs' negative SDR."""

    def __init__(self, sdr_type, zero_mean=True, take_log=True, EPS=1e-8):
        super().__init__()
        assert sdr_type in ("snr", "sisdr", "sdsdr")
        self.sdr_type, self.zero_mean, self.take_log, self.EPS = sdr_type, zero_mean, take_log, 1e-8

    def forward(self, est_targets, targets):
        if targets.size() != est_targets.size() or targets.ndim != 3:
            raise TypeError(f"Inputs must be of shape [batch, n_src, time], got {targets.size()} and "
                            f"{est_targets.size()} instead")
        if self.zero_mean:
            targets = targets - torch.mean(targets, dim=2, keepdim=True)
            est_targets = est_targets - torch.mean(est_targets, dim=2, keepdim=True)
        if self.sdr_type in ("sisdr", "sdsdr"):
            pair_wise_dot = torch.sum(est_targets * targets, dim=2, keepdim=True)
            scaled_targets = pair_wise_dot * targets / (torch.sum(targets**2, dim=2, keepdim=True) + self.EPS)
        else:
            scaled_targets = targets
        e_noise = est_targets - targets if self.sdr_type in ("sdsdr", "snr") else est_targets - scaled_targets
        pair_wise_sdr = torch.sum(scaled_targets**2, dim=2) / (torch.sum(e_noise**2, dim=2) + self.EPS)
        if self.take_log:
            pair_wise_sdr = 10 * torch.log10(pair_wise_sdr + self.EPS)
        return -torch.mean(pair_wise_sdr, dim=-1)


class PairwiseMSE(torch.nn.Module):
    """asteroid.losses.PairwiseMSE: (B, n, *) -> (B, n, n) mean squared error."""

    def forward(self, est_targets, targets):
        if targets.size() != est_targets.size() or targets.ndim < 3:
            raise TypeError(f"Inputs must be of shape [batch, n_src, *], got {targets.size()} and "
                            f"{est_targets.size()} instead")
        pw_loss = (targets.unsqueeze(1) - est_targets.unsqueeze(2)) ** 2
        return pw_loss.mean(dim=list(range(3, pw_loss.ndim)))


class SingleSrcMSE(torch.nn.Module):
    """asteroid.losses.SingleSrcMSE (also asteroid's MultiSrcMSE): (B, *) -> (B,) mean squared error."""

    def forward(self, est_targets, targets):
        if targets.size() != est_targets.size() or targets.ndim < 2:
            raise TypeError(f"Inputs must be of shape [batch, *], got {targets.size()} and {est_targets.size()} "
                            "instead")
        loss = (targets - est_targets) ** 2
        return loss.mean(dim=list(range(1, loss.ndim)))


def pairwise_l1(est_targets, targets):
    """(B, n, *) -> (B, n, n): mean |est_i - target_j|."""
    return (targets.unsqueeze(1) - est_targets.unsqueeze(2)).abs().flatten(3).mean(3)


def pairwise_log_mse(est_targets, targets, max_snr=30.0):
    """(B, n, *) -> (B, n, n): the MixIT paper's thresholded log-MSE, 10 log10(||t - e||^2 + tau ||t||^2 + 1e-8)
    with tau = 10^(-max_snr / 10) (google-research/sound-separation's ``log_mse_loss``)."""
    err_pow = ((targets.unsqueeze(1) - est_targets.unsqueeze(2)) ** 2).flatten(3).sum(3)
    ref_pow = (targets**2).flatten(2).sum(2).unsqueeze(1)
    return 10 * torch.log10(err_pow + 10 ** (-max_snr / 10) * ref_pow + 1e-8)


def pairwise_losses(est, targets, *, metric="sisdr", zero_mean=True, eps=1e-8, max_snr=30.0):
    """(B, M, M) pairwise loss matrix of ``metric`` over (B, M, *) inputs, trailing dims flattened into one signal."""
    est, targets = est.flatten(2), targets.flatten(2)
    if metric in ("sisdr", "sdsdr", "snr"):
        return PairwiseNegSDR(metric, zero_mean=zero_mean, EPS=eps)(est, targets)
    if metric == "mse":
        return PairwiseMSE()(est, targets)
    if metric == "l1":
        return pairwise_l1(est, targets)
    return pairwise_log_mse(est, targets, max_snr)


def get_pw_losses(loss_func, est_targets, targets, **kwargs):
    """asteroid's ``get_pw_losses``: a single-source ``loss_func`` called for every (est, target) pair."""
    batch_size, n_src, *_ = targets.shape
    pair_wise_losses = targets.new_empty(batch_size, n_src, n_src)
    for est_idx, est_src in enumerate(est_targets.transpose(0, 1)):
        for target_idx, target_src in enumerate(targets.transpose(0, 1)):
            pair_wise_losses[:, est_idx, target_idx] = loss_func(est_src, target_src, **kwargs)
    return pair_wise_losses


def find_best_perm_factorial(pair_wise_losses, perm_reduce=None, **kwargs):
    """asteroid's factorial search: every permutation in ``itertools.permutations`` order, ``torch.min`` (first
    minimum). Its one-hot einsum multiplies every entry by 0 or 1, so a non-finite entry makes every permutation NaN
    and the row picks the first, the identity."""
    n_src = pair_wise_losses.shape[-1]
    pwl = pair_wise_losses.transpose(-1, -2)
    perms = pwl.new_tensor(list(itertools.permutations(range(n_src))), dtype=torch.long)
    idx = torch.unsqueeze(perms, 2)
    if perm_reduce is None:
        perms_one_hot = pwl.new_zeros((*perms.size(), n_src)).scatter_(2, idx, 1)
        loss_set = torch.einsum("bij,pij->bp", [pwl, perms_one_hot])
        loss_set /= n_src
    else:
        pwl_set = pwl[:, torch.arange(n_src), idx.squeeze(-1)]
        loss_set = perm_reduce(pwl_set, **kwargs)
    min_loss, min_loss_idx = torch.min(loss_set, dim=1)
    batch_indices = torch.stack([perms[m] for m in min_loss_idx], dim=0)
    return min_loss, batch_indices


def linear_assignment(cost):
    """Exact minimum-cost assignment of a square float matrix: ``cols[r]`` is the column of row ``r``.

    The shortest-augmenting-path Hungarian algorithm with row and column potentials (Kuhn-Munkres as
    Jonker and Volgenant run it), O(n^3), as plain loops. It stands in for scipy's ``linear_sum_assignment``
    (asteroid's Hungarian), which the tests check it against."""
    n = len(cost)
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    row_of = [0] * (n + 1)  # row_of[c]: the row (1-based) matched to column c; column 0 is the path's root
    for row in range(1, n + 1):
        row_of[0] = row
        col0, min_slack, way, used = 0, [inf] * (n + 1), [0] * (n + 1), [False] * (n + 1)
        while True:
            used[col0] = True
            row0, delta, col1 = row_of[col0], inf, 0
            for col in range(1, n + 1):
                if not used[col]:
                    slack = cost[row0 - 1][col - 1] - u[row0] - v[col]
                    if slack < min_slack[col]:
                        min_slack[col], way[col] = slack, col0
                    if min_slack[col] < delta:
                        delta, col1 = min_slack[col], col
            for col in range(n + 1):
                if used[col]:
                    u[row_of[col]] += delta
                    v[col] -= delta
                else:
                    min_slack[col] -= delta
            col0 = col1
            if row_of[col0] == 0:
                break
        while col0:
            col1 = way[col0]
            row_of[col0] = row_of[col1]
            col0 = col1
    cols = [0] * n
    for col in range(1, n + 1):
        cols[row_of[col] - 1] = col - 1
    return cols


def find_best_perm_hungarian(pair_wise_losses):
    """asteroid's Hungarian search (its scipy call replaced by :func:`linear_assignment`). Rows with a non-finite
    entry get a NaN loss and the identity, like the factorial search."""
    pwl = pair_wise_losses.transpose(-1, -2)
    n_src = pwl.shape[-1]
    rows = pwl.detach().double().cpu()
    identity = list(range(n_src))
    batch_indices = torch.tensor([linear_assignment(row.tolist()) if torch.isfinite(row).all() else identity
                                  for row in rows], dtype=torch.long).to(pwl.device)
    min_loss = torch.gather(pwl, 2, batch_indices[..., None]).mean([-1, -2])
    finite = torch.isfinite(pwl).flatten(1).all(1)
    return torch.where(finite, min_loss, torch.full_like(min_loss, float("nan"))), batch_indices


def find_best_perm(pair_wise_losses, perm_reduce=None, **kwargs):
    """asteroid's dispatch: the factorial search up to 3 sources or with a ``perm_reduce``, Hungarian above."""
    if perm_reduce is not None or pair_wise_losses.shape[-1] <= 3:
        return find_best_perm_factorial(pair_wise_losses, perm_reduce=perm_reduce, **kwargs)
    return find_best_perm_hungarian(pair_wise_losses)


def reorder_source(source, batch_indices):
    """asteroid's ``reorder_source``: row ``b`` of the result is ``source[b, batch_indices[b]]``."""
    return torch.stack([torch.index_select(s, 0, b) for s, b in zip(source, batch_indices)])


def best_perm_from_perm_avg_loss(loss_func, est_targets, targets, **kwargs):
    """asteroid's ``perm_avg`` search: ``loss_func(est[:, perm], targets)`` for every permutation, first minimum."""
    n_src = targets.shape[1]
    perms = torch.tensor(list(itertools.permutations(range(n_src))), dtype=torch.long)
    loss_set = torch.stack([loss_func(est_targets[:, perm], targets, **kwargs) for perm in perms], dim=1)
    min_loss, min_loss_idx = torch.min(loss_set, dim=1)
    batch_indices = torch.stack([perms[m] for m in min_loss_idx], dim=0)
    return min_loss, batch_indices


def pit_wrapper_loss(loss_func, pit_from, est_targets, targets, *, perm_reduce=None, return_est=False,
                     reduce_kwargs=None, **kwargs):
    """asteroid's ``PITLossWrapper(loss_func, pit_from, perm_reduce).forward(...)``, step by step."""
    if pit_from == "perm_avg":
        min_loss, batch_indices = best_perm_from_perm_avg_loss(loss_func, est_targets, targets, **kwargs)
    else:
        if pit_from == "pw_mtx":
            pw_losses = loss_func(est_targets, targets, **kwargs)
        else:
            pw_losses = get_pw_losses(loss_func, est_targets, targets, **kwargs)
        if pw_losses.ndim != 3 or pw_losses.shape[0] != targets.shape[0]:
            raise ValueError(f"the pairwise loss must be (batch, n_src, n_src), got {tuple(pw_losses.shape)}")
        min_loss, batch_indices = find_best_perm(pw_losses, perm_reduce=perm_reduce, **(reduce_kwargs or {}))
    mean_loss = torch.mean(min_loss)
    if not return_est:
        return mean_loss
    return mean_loss, reorder_source(est_targets, batch_indices.to(est_targets.device))


def finish_pit(row_loss, perm, est, *, reduction, return_est, return_perm):
    """Reduce the per-row losses and append the requested extras, in the documented order (loss, est, perm)."""
    loss = row_loss.mean() if reduction == "mean" else row_loss
    if not (return_est or return_perm):
        return loss
    outputs = [loss]
    if return_est:
        outputs.append(reorder_source(est, perm))
    if return_perm:
        outputs.append(perm)
    return tuple(outputs)


def pit_loss(est, targets, *, metric="sisdr", reduction="mean", return_est=False, return_perm=False,
             solver="auto", zero_mean=True, eps=1e-8, max_snr=30.0):
    """Reference PIT loss; same arguments and results as :func:`nrt_kernels.pit_loss`.

    The pairwise matrix is asteroid's, in the input dtype; ``"exhaustive"`` is asteroid's factorial search,
    ``"hungarian"`` its Hungarian search, ``"auto"`` asteroid's own choice between them (factorial up to 3 sources).
    """
    check_pit_inputs(est, targets, metric=metric, solver=solver, reduction=reduction, zero_mean=zero_mean, eps=eps,
                     max_snr=max_snr)
    pw = pairwise_losses(est, targets, metric=metric, zero_mean=zero_mean, eps=eps, max_snr=max_snr)
    search = {"auto": find_best_perm, "exhaustive": find_best_perm_factorial, "hungarian": find_best_perm_hungarian}
    row_loss, perm = search[solver](pw)
    return finish_pit(row_loss, perm.to(est.device), est, reduction=reduction, return_est=return_est,
                      return_perm=return_perm)
