"""Fused PIT (permutation invariant training): custom ops, fake implementations and autograd, for every backend.

Per batch row, est and targets flattened to ``(M, T)``:

1. **Pairwise statistics, one pass over est and targets.**  For the bilinear metrics (SI-SDR, SD-SDR, SNR, MSE,
   log-MSE) every cross product ``<e_i, t_j>``, the energies ``<e_i, e_i>``, ``<t_j, t_j>`` and the sums of
   ``e_i`` and ``t_j`` (for ``zero_mean``); for L1 the ``M * M`` sums ``|e_i - t_j|``.  Method: the inputs are
   converted to float64 and multiplied and accumulated there.  A product of two float32 (or half) values has at
   most 48 significant bits, so it is exact in float64, and the float64 sums add about ``T * 2**-53`` relative
   error.  That matters at high SDR, where ``||e - a t||^2 = <e,e> - 2 a <e,t> + a^2 <t,t>`` is a difference of
   nearly equal numbers: from a float32 Gram, SI-SDR was off by 0.016 dB at 40 dB and 1.04 dB at 60 dB (T=32000;
   the float32 PyTorch loop, which subtracts before it squares, by 6e-6 dB; benchmarks/RESULTS.md).  In float64
   the cancellation costs about 6 of 16 digits at 60 dB, so the criterion of issue 12 (error <= 2x the float32
   loop's + 0.01 dB, -30..+60 dB) holds; tests/test_pit.py checks it.  Zero-mean statistics follow from the raw
   ones in float64 (``<e',t'> = <e,t> - sum(e) sum(t) / T``); sums of squares formed this way are clamped at 0
   before EPS.
2. **The (B, M, M) loss matrix** ``P[b, i, j] = metric(est_i, target_j)`` from the statistics, in float64.
3. **The solver, on the device, without a host sync.**  ``"exhaustive"``: every permutation in
   ``itertools.permutations`` order (M <= 8), the first minimum of ``sum_j P[perm[j], j]``.  ``"hungarian"``:
   the exact linear assignment (shortest augmenting paths with potentials, O(M^3), any M up to 32).  A row with
   a non-finite entry gets a NaN loss and the identity permutation, exactly what asteroid's one-hot einsum gives.
4. **The backward's coefficients** of each row's chosen pairs: for the bilinear metrics the gradient of
   ``P[i, j]`` is a combination of the two signals, ``grad e_i = c0 e_i + c1 t_j + c2`` and
   ``grad t_j = c3 e_i + c4 t_j + c5`` (the constants undo the means), so the backward is one elementwise pass
   through the permutation; for L1 ``c0 = 1 / (M T)`` scales ``sign(e_i - t_j)``.

Double backward (``create_graph=True``) differentiates :func:`matched_pair_losses`, the same formulas in float64
PyTorch on the M matched pairs (O(B M T) memory, never the (B, M, M, T) pairs); a plain training step never runs it.

The backends (``triton.py``, ``cpu.py``) register ``forward(est, targets, metric, hungarian, zero_mean, eps,
max_snr) -> (row_loss, perm, coeffs)`` and ``backward(grad_rows, est, targets, perm, coeffs, metric, targets_grad)
-> (grad_est, grad_targets or None)`` (``metric`` an index into :data:`METRICS`) with :mod:`nrt_kernels.backends`.
"""
from __future__ import annotations

import functools
import itertools

import torch

from ... import backends
from ...build_config import PIT_MAX_EXHAUSTIVE_SOURCES, PIT_METRICS, PIT_NUM_COEFFS
from .._operands import common_dtype, fused_operand, row_loss_dtype

OP = "pit"
# The metric index every kernel reads (build_config passes it to the C++ kernels as -D macros).
METRICS = PIT_METRICS
NUM_COEFFS = PIT_NUM_COEFFS
# Sources up to which solver="auto" scores every permutation. Measured on the CPU (benchmarks/RESULTS.md): the
# Hungarian solver is as fast at 2-5 sources and faster above (0.054 vs 0.105 ms at 6, 0.073 vs 11.7 at 8), so
# the exhaustive search is kept only where asteroid keeps it (up to 3 sources), for asteroid's tie order.
AUTO_EXHAUSTIVE_MAX = 3

def resolve_solver(solver: str, num_sources: int) -> str:
    """"exhaustive" or "hungarian" for a validated ``solver`` argument."""
    if solver == "auto":
        return "exhaustive" if num_sources <= AUTO_EXHAUSTIVE_MAX else "hungarian"
    return solver


@functools.lru_cache(maxsize=None)
def _permutations_cpu(num_sources: int) -> torch.Tensor:
    return torch.tensor(list(itertools.permutations(range(num_sources))), dtype=torch.int8)


_permutation_tables: dict = {}


def permutation_table(num_sources: int, device) -> torch.Tensor:
    """(M!, M) int8: every permutation in ``itertools.permutations`` order, cached per device."""
    if num_sources > PIT_MAX_EXHAUSTIVE_SOURCES:
        raise ValueError(f"no permutation table beyond {PIT_MAX_EXHAUSTIVE_SOURCES} sources, got {num_sources}")
    key = (num_sources, str(device))
    table = _permutation_tables.get(key)
    if table is None:
        table = _permutation_tables[key] = _permutations_cpu(num_sources).to(device)
    return table


# ----------------------------------------------------------------------------------------------
# torch.library ops and autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("nrt_kernels::pit", mutates_args=())
def pit(est: torch.Tensor, targets: torch.Tensor, metric: str, solver: str, impl: str, zero_mean: bool, eps: float,
        max_snr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row best-permutation loss of contiguous (B, M, T) est against (B, M, T) targets.

    ``solver`` is "exhaustive" or "hungarian". Returns ``(row_loss, perm, coeffs)``: ``row_loss`` (B,) float32
    (float64 for float64 input), ``perm`` (B, M) int64 (``est[b, perm[b]]`` lines up with the targets) and the
    backward's coefficients (B, M, NUM_COEFFS) float64.
    """
    return backends.lookup(OP, impl).forward(est, targets, METRICS.index(metric), solver == "hungarian", zero_mean,
                                             eps, max_snr)


@pit.register_fake
def _pit_fake(est, targets, metric, solver, impl, zero_mean, eps, max_snr):
    batch, num_sources = est.shape[:2]
    return (est.new_empty(batch, dtype=row_loss_dtype(est.dtype)), est.new_empty(batch, num_sources,
                                                                                 dtype=torch.int64),
            est.new_empty(batch, num_sources, NUM_COEFFS, dtype=torch.float64))


@torch.library.custom_op("nrt_kernels::pit_backward", mutates_args=())
def pit_backward(grad_rows: torch.Tensor, est: torch.Tensor, targets: torch.Tensor, perm: torch.Tensor,
                 coeffs: torch.Tensor, metric: str, impl: str, targets_grad: bool, zero_mean: bool, eps: float,
                 max_snr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``pit``'s row losses; the targets' gradient is empty unless ``targets_grad``. ``zero_mean``,
    ``eps`` and ``max_snr`` (already in ``coeffs``) are there for the double backward."""
    grad_est, grad_targets = backends.lookup(OP, impl).backward(grad_rows.to(torch.float64).contiguous(), est,
                                                                targets, perm, coeffs, METRICS.index(metric),
                                                                targets_grad)
    return grad_est, grad_targets if targets_grad else targets.new_empty(0)


@pit_backward.register_fake
def _pit_backward_fake(grad_rows, est, targets, perm, coeffs, metric, impl, targets_grad, zero_mean, eps, max_snr):
    return torch.empty_like(est), torch.empty_like(targets) if targets_grad else targets.new_empty(0)


def _setup_context(ctx, inputs, output):
    est, targets, metric, _solver, impl, zero_mean, eps, max_snr = inputs
    _, perm, coeffs = output
    ctx.save_for_backward(est, targets, perm, coeffs)
    ctx.options = (metric, impl, zero_mean, eps, max_snr)
    ctx.mark_non_differentiable(perm, coeffs)
    # Outputs without a gradient reach the backward as None, not as zeros made for it (host time of a small call).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_rows, _grad_perm, _grad_coeffs):
    if grad_rows is None:  # no gradient reached the loss
        return (None,) * 8
    est, targets, perm, coeffs = ctx.saved_tensors
    metric, impl, zero_mean, eps, max_snr = ctx.options
    targets_grad = ctx.needs_input_grad[1]
    grad_est, grad_targets = pit_backward(grad_rows, est, targets, perm, coeffs, metric, impl, targets_grad,
                                          zero_mean, eps, max_snr)
    return (grad_est if ctx.needs_input_grad[0] else None, grad_targets if targets_grad else None,
            None, None, None, None, None, None)


pit.register_autograd(_backward, setup_context=_setup_context)


def matched_pair_losses(est, targets, perm, metric: str, zero_mean: bool, eps: float, max_snr: float):
    """(B, M) float64 loss of each target and its matched estimate: the kernels' formulas (statistics, then the
    metric, sums of squares clamped at 0) in differentiable PyTorch."""
    est = torch.gather(est.double(), 1, perm[..., None].expand(est.shape))
    targets = targets.double()
    if metric == "l1":
        return (est - targets).abs().mean(-1)
    if zero_mean and metric in ("sisdr", "sdsdr", "snr"):
        est = est - est.mean(-1, keepdim=True)
        targets = targets - targets.mean(-1, keepdim=True)
    x, y, z = (est * est).sum(-1), (targets * targets).sum(-1), (est * targets).sum(-1)
    if metric == "mse":
        return (x - 2 * z + y).clamp_min(0) / est.shape[-1]
    if metric == "log_mse":
        return 10 * torch.log10((x - 2 * z + y).clamp_min(0) + 10 ** (-max_snr / 10) * y + 1e-8)
    scale = z / (y + eps)
    num = y if metric == "snr" else scale * scale * y
    den = x - 2 * scale * z + scale * scale * y if metric == "sisdr" else x - 2 * z + y
    return -10 * torch.log10(num / (den.clamp_min(0) + eps) + eps)


def _backward_setup_context(ctx, inputs, output):
    grad_rows, est, targets, perm, _coeffs, metric, _impl, targets_grad, zero_mean, eps, max_snr = inputs
    ctx.save_for_backward(grad_rows, est, targets, perm)
    ctx.options = (metric, zero_mean, eps, max_snr)
    ctx.targets_grad = targets_grad


def _double_backward(ctx, grad_grad_est, grad_grad_targets):
    grad_rows, est, targets, perm = ctx.saved_tensors
    wanted = [i for i in range(3) if ctx.needs_input_grad[i]]
    leaves = [grad_rows.detach().double(), est.detach(), targets.detach()]
    with torch.enable_grad():
        for i in wanted:
            leaves[i].requires_grad_(True)
        est_leaf, targets_leaf = leaves[1].requires_grad_(True), leaves[2].requires_grad_(True)
        rows = matched_pair_losses(est_leaf, targets_leaf, perm, *ctx.options).mean(1)
        grad_est, grad_targets = torch.autograd.grad((rows * leaves[0]).sum(), (est_leaf, targets_leaf),
                                                     create_graph=True)
        outer = grad_est.new_zeros(())
        if grad_grad_est is not None:
            outer = outer + (grad_est * grad_grad_est.double()).sum()
        if ctx.targets_grad and grad_grad_targets is not None and grad_grad_targets.numel():
            outer = outer + (grad_targets * grad_grad_targets.double()).sum()
        found = torch.autograd.grad(outer, [leaves[i] for i in wanted], allow_unused=True) if wanted else ()
    results = [None, None, None]
    for i, value in zip(wanted, found):
        like = (grad_rows, est, targets)[i]
        results[i] = torch.zeros_like(like) if value is None else value.to(like.dtype)
    return (*results, None, None, None, None, None, None, None, None)


pit_backward.register_autograd(_double_backward, setup_context=_backward_setup_context)


def finish(row_loss, perm, est, *, reduction, return_est, return_perm):
    """Reduce the per-row losses and append the requested extras, in the documented order (loss, est, perm)."""
    loss = row_loss.mean() if reduction == "mean" else row_loss
    if not (return_est or return_perm):
        return loss
    outputs = [loss]
    if return_est:
        outputs.append(torch.gather(est, 1, perm.view(*perm.shape, *(1,) * (est.ndim - 2)).expand_as(est)))
    if return_perm:
        outputs.append(perm)
    return tuple(outputs)


def pit_loss(est, targets, impl: str, *, metric, reduction, return_est, return_perm, solver, zero_mean, eps,
             max_snr):
    """The fused PIT loss of validated inputs with a resolved kernel backend ``impl``."""
    dtype = common_dtype(est, targets)
    row_loss, perm, _ = pit(fused_operand(est, dtype), fused_operand(targets, dtype), metric,
                            resolve_solver(solver, est.shape[1]), impl, zero_mean, float(eps), float(max_snr))
    return finish(row_loss, perm, est, reduction=reduction, return_est=return_est, return_perm=return_perm)
