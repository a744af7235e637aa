"""Public front-ends: thin wrappers that validate, pick a backend and call one op."""
from __future__ import annotations

import torch
from torch import nn

from . import backends
from .ops import noise_robust_l1 as noise_robust_op
from .ops import pit as pit_op
from .ops._operands import common_dtype, fused_operand
from .ops import mixit_gram as mixit_gram_op
from .ops.mixit_l1 import mixit_l1_loss
from .ops.noise_robust_l1.composed import composed_loss
from .validate import NOISE_ROBUST_TERMS, check_mixit_inputs, check_noise_robust_inputs, check_pairing_option
from .validate import check_pit_inputs


def _reference():
    # impl="reference" runs the independent definition; the fused paths never import it.
    from . import reference

    return reference


def mixit_loss(est, mixtures, *, metric="l1", partitions="generalized", reduction="mean", return_est=False,
               return_assignment=False, impl="auto", zero_mean=None, eps=None, max_snr=None):
    """MixIT loss: the best assignment of sources to mixtures, per row, under a per-example metric.

    Args:
        est: (B, M, *) estimated sources.
        mixtures: (B, N, *) mixtures (or noisy stems) with the same trailing dims; the trailing dims are flattened
            into one signal per source and mixture.
        metric: per candidate, with remixes r_n and mixtures x_n, averaged over the mixtures:
            "l1": mean |r_n - x_n| (over mixtures and elements);
            "sisdr", "sdsdr", "snr": asteroid 0.7.0's ``MultiSrcNegSDR(metric, zero_mean, EPS=eps)``, the negative
            SI-SDR / SD-SDR / SNR in dB;
            "mse": asteroid's ``MultiSrcMSE``, mean (r_n - x_n)^2;
            "log_mse": Google's MixIT loss, 10 log10(||x_n - r_n||^2 + 10^(-max_snr/10) ||x_n||^2 + eps).
        partitions: "generalized" (every assignment, empty groups allowed) or "equal" (M // N sources each).
        reduction: "mean" over rows, or "none" for the (B,) row losses.
        return_est: also return the remixed estimates (B, N, *) of each row's best candidate.
        return_assignment: also return (B, M) int64, the mixture each source was assigned to.
        impl: "auto", "triton", "cuda" (L1 only), "cpu" or "reference".
        zero_mean: SDR metrics only (default True): remove each signal's mean first.
        eps: SDR metrics (asteroid's EPS) and log_mse (the log's stabilizer); default 1e-8.
        max_snr: log_mse only (default 30 dB): the threshold, tau = 10^(-max_snr/10).
        An option given to a metric that does not read it raises ValueError.

    Returns:
        ``loss``, or a tuple ``(loss, est_mixtures?, assignment?)`` in that order.
        The loss is float32 for float16/bfloat16/float32 inputs on the fused paths (float64 for float64).
    """
    options = check_mixit_inputs(est, mixtures, metric=metric, partitions=partitions, reduction=reduction,
                                 zero_mean=zero_mean, eps=eps, max_snr=max_snr)
    op = "mixit_l1" if metric == "l1" else mixit_gram_op.OP
    if op == mixit_gram_op.OP and impl == "cuda":
        raise backends.BackendUnavailable(f'impl="cuda" (the nvcc-built library) computes only metric="l1"; for '
                                          f'metric={metric!r} use impl="triton" or impl="auto" on CUDA tensors')
    backend = backends.resolve(op, impl, est.device.type)
    if backend == "reference":
        return _reference().mixit_loss(est, mixtures, metric=metric, partitions=partitions, reduction=reduction,
                                       return_est=return_est, return_assignment=return_assignment,
                                       zero_mean=zero_mean, eps=eps, max_snr=max_snr)
    backends.check_autograd_transforms(op, est, mixtures)
    if op == "mixit_l1":
        return mixit_l1_loss(est, mixtures, backend, partitions=partitions, reduction=reduction,
                             return_est=return_est, return_assignment=return_assignment)
    return mixit_gram_op.mixit_gram_loss(est, mixtures, backend, metric=metric, options=options,
                                         partitions=partitions, reduction=reduction, return_est=return_est,
                                         return_assignment=return_assignment)


class MixITLoss(nn.Module):
    """Module form of :func:`mixit_loss`; the keyword arguments are fixed at construction."""

    def __init__(self, *, metric="l1", partitions="generalized", reduction="mean", return_est=False,
                 return_assignment=False, impl="auto", zero_mean=None, eps=None, max_snr=None):
        super().__init__()
        self.options = dict(metric=metric, partitions=partitions, reduction=reduction, return_est=return_est,
                            return_assignment=return_assignment, impl=impl)
        # Only the options given: the metric's defaults apply to the rest, and a wrong one fails on the first call.
        self.options.update({name: value for name, value in
                             (("zero_mean", zero_mean), ("eps", eps), ("max_snr", max_snr)) if value is not None})

    def forward(self, est, mixtures):
        return mixit_loss(est, mixtures, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


def noise_robust_loss(est, targets, *, version="v1", weights, teacher_targets=None, pairing=None,
                      normalize="iseparate", source_weights=None, return_terms=False, impl="auto",
                      _first_mixture_size=None):
    """iSeparate-SDX's noise-robust training loss (V1: Wavelet-HTDemucs, V2: DWT-Transformer-UNet).

    Terms, each a mean over the batch: ``l1`` = |est - targets| (iSeparate's l1_loss: mean over trailing dims,
    batch, then a weighted mean over sources); ``consistency`` (V2) = |sum_s est - sum_s targets|; ``mixit`` = the
    generalized MixIT L1 of est against the two mixtures that the pairing forms from the noisy targets;
    ``teacher`` = l1(est, teacher_targets).

    Args:
        est: (B, S, *) estimated sources (S even when the MixIT term runs).
        targets: (B, S, *) noisy target stems.
        version: "v1" (weights for l1, mixit, teacher) or "v2" (l1, consistency, mixit, teacher).
        weights: one non-negative number per term; a term with weight 0 is not computed (its inputs not read).
        teacher_targets: (B, S, *) teacher outputs (:func:`nrt_kernels.training.teacher_targets_v1` / ``_v2``), or
            None on iterations without the teacher term.
        pairing: None (one ``torch.randperm(S)`` from the global generator for the batch, drawn only when the
            MixIT term runs), "per_example" (one per row) or an explicit (S,) / (B, S) permutation: its first S/2
            stems form mixture 0, the rest mixture 1.
        normalize: "iseparate" (V1 divides by the sum of all three weights even when the teacher term is skipped;
            V2 by the weights of the computed terms) or "active" (the weights of the computed terms).
        source_weights: optional (S,) weights of the sources in the l1 and teacher terms (finite, >= 0, not all
            0; values checked for lists and CPU tensors).
        return_terms: also return ``{term name: detached value}`` of the computed terms.
        impl: "auto", "triton" (one fused op; "cuda" runs the same Triton kernel), "cpu" (the fused C++ op) or
            "reference".  Targets, teacher targets or source weights that require
            grad take the composed path (the backend's MixIT op, the other terms in PyTorch), which differentiates
            them too.

    Under DistributedDataParallel each process's loss is the mean over its own shard; with equal shards DDP's
    gradient averaging gives exactly the gradient of the full-batch loss (tests/test_ddp.py).  The default
    pairing is drawn per process (the same one only where every rank seeds its generator alike).

    ``_first_mixture_size`` (internal) is the number of stems of a pairing that form mixture 0 instead of S/2:
    iSeparate's code takes the first 2 for any S, which the compat modules reproduce.

    Returns:
        ``loss`` (float32, float64 for float64 inputs on the fused path), or ``(loss, terms)``.
    """
    check_noise_robust_inputs(est, targets, teacher_targets, version=version, weights=weights, normalize=normalize,
                              source_weights=source_weights, first_mixture_size=_first_mixture_size)
    batch, num_sources = est.shape[:2]
    check_pairing_option(pairing, batch, num_sources, est.device)
    backend = backends.resolve(noise_robust_op.OP, impl, est.device.type)
    if backend == "reference":
        return _reference().noise_robust_loss(est, targets, version=version, weights=weights,
                                              teacher_targets=teacher_targets, pairing=pairing, normalize=normalize,
                                              source_weights=source_weights, return_terms=return_terms,
                                              _first_mixture_size=_first_mixture_size)
    backends.check_autograd_transforms(noise_robust_op.OP, est, targets,
                                       *([teacher_targets] if teacher_targets is not None else []))
    active = noise_robust_op.active_terms(NOISE_ROBUST_TERMS[version], weights, teacher_targets is not None)
    divisor = noise_robust_op.loss_divisor(version, weights, active, normalize)
    # Each weight over the divisor, in float64 here: the kernels take float32 scalars, in which weights such as 1e-46
    # or 1e39 would underflow or overflow (a NaN loss); the ratios lie in (0, 1].
    scales = {name: weight / divisor for name, weight in active.items()}
    # The permutation is drawn only when the MixIT term runs, so the global generator advances like iSeparate's.
    rows = noise_robust_op.draw_pairing(pairing, batch, num_sources) if "mixit" in active else None
    # The fused kernels differentiate est only; autograd differentiates the composition in everything else.
    other_grad = (targets.requires_grad or ("teacher" in active and teacher_targets.requires_grad)
                  or (isinstance(source_weights, torch.Tensor) and source_weights.requires_grad))
    if other_grad and torch.is_grad_enabled():
        loss, terms = composed_loss(est, targets, teacher_targets, scales, rows, source_weights, backend,
                                    _first_mixture_size)
        return (loss, {name: value.detach() for name, value in terms.items()}) if return_terms else loss

    dtype = common_dtype(est, targets, *([teacher_targets] if "teacher" in active else []))
    flat_est = fused_operand(est, dtype)
    flat_teacher = fused_operand(teacher_targets, dtype) if "teacher" in active else flat_est.new_empty(0)
    masks = noise_robust_op.pair_masks(rows, batch, num_sources, est.device, _first_mixture_size)
    loss, term_values, _ = noise_robust_op.noise_robust_l1_loss(
        flat_est, fused_operand(targets, dtype), flat_teacher, masks,
        noise_robust_op.normalized_source_weights(source_weights, dtype, est.device),
        [scales.get(name, 0.0) for name in noise_robust_op.TERM_NAMES], 1.0, backend)
    if return_terms:
        return loss, {name: term_values[noise_robust_op.TERM_NAMES.index(name)] for name in active}
    return loss


class NoiseRobustLoss(nn.Module):
    """Module form of :func:`noise_robust_loss`: version, normalization, source weights and backend are fixed at
    construction; ``forward(est, targets, *, weights, teacher_targets=None, pairing=None, return_terms=False)``."""

    def __init__(self, version="v1", normalize="iseparate", impl="auto", source_weights=None):
        super().__init__()
        self.version = version
        self.normalize = normalize
        self.impl = impl
        self.source_weights = source_weights

    def forward(self, est, targets, *, weights, teacher_targets=None, pairing=None, return_terms=False):
        return noise_robust_loss(est, targets, version=self.version, weights=weights, teacher_targets=teacher_targets,
                                 pairing=pairing, normalize=self.normalize, source_weights=self.source_weights,
                                 return_terms=return_terms, impl=self.impl)

    def extra_repr(self) -> str:
        return f"version={self.version!r}, normalize={self.normalize!r}, impl={self.impl!r}"


def pit_loss(est, targets, *, metric="sisdr", reduction="mean", return_est=False, return_perm=False, solver="auto",
             impl="auto", zero_mean=True, eps=1e-8, max_snr=30.0):
    """Permutation invariant loss: per row, the best matching of estimates to targets under a pairwise metric.

    ``P[b, i, j] = metric(est[b, i], targets[b, j])``; a row's loss is ``min over permutations p of
    mean_j P[b, p[j], j]``. The gradient flows through the chosen permutation only.

    Args:
        est: (B, M, *) estimated sources; trailing dims are flattened into one signal.
        targets: (B, M, *) target sources.
        metric: "sisdr", "sdsdr", "snr" (asteroid's ``PairwiseNegSDR``: negative SDR in dB), "mse" (asteroid's
            ``PairwiseMSE``), "l1" (mean absolute error) or "log_mse" (the MixIT paper's thresholded log-MSE,
            ``10 log10(||t - e||^2 + tau ||t||^2 + 1e-8)``, ``tau = 10**(-max_snr / 10)``).
        reduction: "mean" over rows, or "none" for the (B,) row losses.
        return_est: also return the reordered estimates (B, M, *), ``est[b, perm[b]]``.
        return_perm: also return (B, M) int64, the est index matched to each target (asteroid's batch_indices).
        solver: "exhaustive" (every permutation, M <= 8; ties go to the first in ``itertools.permutations``
            order), "hungarian" (exact linear assignment, M <= 32; ties may resolve differently, the loss is the
            same minimum) or "auto" (exhaustive up to 3 sources, as asteroid; Hungarian above).
        impl: "auto", "triton", "cpu" or "reference".
        zero_mean, eps: the SDR metrics' mean removal and asteroid's EPS (target energy, noise energy, log).
        max_snr: log-MSE's threshold in dB.

    Returns:
        ``loss``, or a tuple ``(loss, est?, perm?)`` in that order. The loss is float32 for float16/bfloat16/
        float32 inputs on the fused paths, float64 for float64. A row whose pairwise matrix has a non-finite
        entry gets a NaN loss and the identity permutation.
    """
    check_pit_inputs(est, targets, metric=metric, solver=solver, reduction=reduction, zero_mean=zero_mean, eps=eps,
                     max_snr=max_snr)
    backend = backends.resolve(pit_op.OP, impl, est.device.type)
    options = dict(metric=metric, reduction=reduction, return_est=return_est, return_perm=return_perm,
                   solver=solver, zero_mean=zero_mean, eps=eps, max_snr=max_snr)
    if backend == "reference":
        return _reference().pit_loss(est, targets, **options)
    backends.check_autograd_transforms(pit_op.OP, est, targets)
    return pit_op.pit_loss(est, targets, backend, **options)


class PITLoss(nn.Module):
    """Module form of :func:`pit_loss`; the keyword arguments are fixed at construction."""

    def __init__(self, *, metric="sisdr", reduction="mean", return_est=False, return_perm=False, solver="auto",
                 impl="auto", zero_mean=True, eps=1e-8, max_snr=30.0):
        super().__init__()
        self.options = dict(metric=metric, reduction=reduction, return_est=return_est, return_perm=return_perm,
                            solver=solver, impl=impl, zero_mean=zero_mean, eps=eps, max_snr=max_snr)

    def forward(self, est, targets):
        return pit_loss(est, targets, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
