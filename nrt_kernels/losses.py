"""Public front-ends: thin wrappers that validate, pick a backend and call one op."""
from __future__ import annotations

import torch
from torch import nn

from . import reference
from .dispatch import resolve_impl
from .ops.mixit_l1 import mixit_l1
from .ops import pit as pit_op
from .ops.noise_robust_l1 import TERM_NAMES, noise_robust_l1
from .validate import check_mixit_inputs
from .validate import check_noise_robust_inputs
from .validate import check_pit_inputs


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
    flat_est = _fused_operand(est, dtype, batch, num_sources)
    flat_mix = _fused_operand(mixtures, dtype, batch, num_mixtures)
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


def _fused_operand(tensor: torch.Tensor, dtype: torch.dtype, batch: int, rows: int) -> torch.Tensor:
    # The kernels read (B, rows, D) row-major: a non-contiguous input costs one copy here.
    flat = tensor.to(dtype).reshape(batch, rows, -1).contiguous()
    # Teacher outputs made under inference mode cannot be saved for backward: one copy makes them ordinary.
    # (torch.compile never sees inference tensors as graph inputs, and cannot trace the test.)
    if (not torch.compiler.is_compiling() and flat.is_inference() and torch.is_grad_enabled()
            and not torch.is_inference_mode_enabled()):
        flat = flat.clone()
    return flat


def noise_robust_loss(est, targets, *, version="v1", weights, teacher_targets=None, pairing=None,
                      normalize="iseparate", source_weights=None, return_terms=False, impl="auto"):
    """iSeparate-SDX's noise-robust training loss (V1: Wavelet-HTDemucs, V2: DWT-Transformer-UNet).

    Terms, each a mean over the batch: ``l1`` = |est - targets| (iSeparate's l1_loss: mean over trailing dims,
    batch, then a weighted mean over sources); ``consistency`` (V2) = |sum_s est - sum_s targets|; ``mixit`` = the
    generalized MixIT L1 of est against the two mixtures that the pairing forms from the noisy targets;
    ``teacher`` = l1(est, teacher_targets).

    Args:
        est: (B, S, *) estimated sources, S even.
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
        source_weights: optional (S,) weights of the sources in the l1 and teacher terms.
        return_terms: also return ``{term name: detached value}`` of the computed terms.
        impl: "auto", "triton" (one fused op), "cuda"/"cpu" (the MixIT op of that backend, the other terms in
            PyTorch) or "reference".  Targets or teacher targets that require grad take the reference path.

    Under DistributedDataParallel each process's loss is the mean over its own shard; with equal shards DDP's
    gradient averaging gives exactly the gradient of the full-batch loss (tests/test_ddp.py).  The default
    pairing is drawn per process (the same one only where every rank seeds its generator alike).

    Returns:
        ``loss`` (float32, float64 for float64 inputs on the fused path), or ``(loss, terms)``.
    """
    check_noise_robust_inputs(est, targets, teacher_targets, version=version, weights=weights, normalize=normalize,
                              source_weights=source_weights)
    active = reference.active_terms(version, weights, teacher_targets is not None)
    backend = resolve_impl(impl, est.device)
    target_grad = targets.requires_grad or ("teacher" in active and teacher_targets.requires_grad)
    if backend == "reference" or (target_grad and torch.is_grad_enabled()):
        return reference.noise_robust_loss(est, targets, version=version, weights=weights,
                                           teacher_targets=teacher_targets, pairing=pairing, normalize=normalize,
                                           source_weights=source_weights, return_terms=return_terms)
    divisor = reference.loss_divisor(version, weights, active, normalize)
    batch, num_sources = est.shape[:2]
    # Pairings drawn here (or given) on the host stay there until they are (B,) masks: one small copy.
    rows_device = pairing.device if isinstance(pairing, torch.Tensor) else torch.device("cpu")
    rows = reference.pairing_rows(pairing, batch, num_sources, rows_device) if "mixit" in active else None
    if backend != "triton":
        terms = reference.noise_robust_terms(
            est, targets, teacher_targets, active, rows, source_weights=source_weights,
            mixit=lambda est_, mixtures: mixit_loss(est_, mixtures, impl=backend))
        loss = reference.combine_terms(terms, active, divisor)
        return (loss, {name: value.detach() for name, value in terms.items()}) if return_terms else loss

    dtype = torch.promote_types(est.dtype, targets.dtype)
    if "teacher" in active:
        dtype = torch.promote_types(dtype, teacher_targets.dtype)
    flat_est = _fused_operand(est, dtype, batch, num_sources)
    flat_targets = _fused_operand(targets, dtype, batch, num_sources)
    flat_teacher = (_fused_operand(teacher_targets, dtype, batch, num_sources) if "teacher" in active
                    else flat_est.new_empty(0))
    if rows is None:
        pair_masks = torch.zeros(batch, dtype=torch.int32, device=est.device)
    else:
        first_half = rows[:, : num_sources // 2]
        pair_masks = torch.bitwise_left_shift(torch.ones_like(first_half), first_half).sum(1).to(torch.int32)
        pair_masks = pair_masks.to(est.device, non_blocking=True)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if source_weights is None:
        flat_source_weights = torch.empty(0, dtype=acc_dtype, device=est.device)
    else:
        flat_source_weights = torch.as_tensor(source_weights, dtype=acc_dtype, device=est.device).reshape(-1)
        flat_source_weights = (flat_source_weights / flat_source_weights.sum()).contiguous()
    op_weights = [active.get(name, 0.0) for name in TERM_NAMES]
    loss, term_values, _ = noise_robust_l1(flat_est, flat_targets, flat_teacher, pair_masks, flat_source_weights,
                                           op_weights, divisor, backend)
    if return_terms:
        return loss, {name: term_values[TERM_NAMES.index(name)] for name in active}
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
    if impl == "cuda":
        raise ValueError('pit_loss has no hand-written CUDA kernels; use impl="triton" (or "auto") on CUDA tensors')
    backend = resolve_impl(impl, est.device)
    if backend == "reference":
        return reference.pit_loss(est, targets, metric=metric, reduction=reduction, return_est=return_est,
                                  return_perm=return_perm, solver=solver, zero_mean=zero_mean, eps=eps,
                                  max_snr=max_snr)
    batch, num_sources = est.shape[:2]
    dtype = torch.promote_types(est.dtype, targets.dtype)
    row_loss, perm, _ = pit_op.pit(_fused_operand(est, dtype, batch, num_sources),
                                _fused_operand(targets, dtype, batch, num_sources), metric,
                                pit_op.resolve_solver(solver, num_sources), backend, zero_mean, float(eps),
                                float(max_snr))
    return reference.finish_pit(row_loss, perm, est, reduction=reduction, return_est=return_est,
                                return_perm=return_perm)


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
