"""The fused MixIT L1 op, backend-neutral: torch.library custom ops, fake implementations, autograd, finishing.

A candidate's error is a sum of ``N`` per-(mixture, subset) errors, so every backend scores every subset of
sources once per mixture (``N * 2**M`` terms per element instead of ``N * N**M``) and keeps each row's first
best candidate (NaN first, like ``torch.min``); the backward reads est, mixtures and the chosen candidate and
writes ``grad_est = grad_row * sign(err of the source's mixture) / (N * D)`` in one pass.

The backends (``triton.py``, ``cpu.py``, ``cuda.py``) register ``forward(est, mixtures, partitions, *, mean=False)
-> (row_loss, or its mean when ``mean``; best)`` and ``backward(grad, est, mixtures, best, partitions, mixtures_grad,
*, mean=False) -> (grad_est, grad_mixtures or None)``, ``grad`` being the rows' (B,) gradient or, with ``mean``,
the 0-dim gradient of their mean, with :mod:`nrt_kernels.backends`; autograd, torch.compile and the front-ends never
care which one ran.  The C++ backend folds the mean into its kernels (two Python-dispatched ops less per eager call),
the GPU backends take :func:`.._operands.reduced_rows` / :func:`.._operands.row_gradients`.
"""
from __future__ import annotations

import torch

from ... import backends
from ...assignments import candidate_assignments
from .._eager import direct_apply, takes_direct_path
from .._operands import common_dtype, fused_operand, reduced_rows, row_gradients, row_loss_dtype

OP = "mixit_l1"


@torch.library.custom_op("nrt_kernels::mixit_l1", mutates_args=())
def mixit_l1(est: torch.Tensor, mixtures: torch.Tensor, partitions: str, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row best-candidate MixIT L1 of contiguous (B, M, D) est against (B, N, D) mixtures.

    Returns ``(row_loss, best)``: ``row_loss`` (B,) float32 (float64 for float64 input) and
    ``best`` (B,) int64, the index of the chosen candidate in ``nrt_kernels.assignments`` order.
    """
    return backends.lookup(OP, impl).forward(est, mixtures, partitions)


@mixit_l1.register_fake
def _mixit_l1_fake(est, mixtures, partitions, impl):
    batch = est.shape[0]
    return est.new_empty(batch, dtype=row_loss_dtype(est.dtype)), est.new_empty(batch, dtype=torch.int64)


@torch.library.custom_op("nrt_kernels::mixit_l1_backward", mutates_args=())
def mixit_l1_backward(grad_rows: torch.Tensor, est: torch.Tensor, mixtures: torch.Tensor, best: torch.Tensor,
                      partitions: str, impl: str, mixtures_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``mixit_l1``'s row losses; the mixtures' gradient is empty unless ``mixtures_grad``."""
    grad_est, grad_mix = backends.lookup(OP, impl).backward(grad_rows, est, mixtures, best, partitions, mixtures_grad)
    return grad_est, grad_mix if mixtures_grad else mixtures.new_empty(0)


@mixit_l1_backward.register_fake
def _mixit_l1_backward_fake(grad_rows, est, mixtures, best, partitions, impl, mixtures_grad):
    return torch.empty_like(est), torch.empty_like(mixtures) if mixtures_grad else mixtures.new_empty(0)


def _setup_context(ctx, inputs, output):
    est, mixtures, partitions, impl = inputs
    _, best = output
    ctx.save_for_backward(est, mixtures, best)
    ctx.partitions = partitions
    ctx.impl = impl
    ctx.mark_non_differentiable(best)
    # Outputs without a gradient reach the backward as None, not as zeros made for it (host time of a small call).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_rows, _grad_best):
    if grad_rows is None:  # no gradient reached the loss
        return None, None, None, None
    est, mixtures, best = ctx.saved_tensors
    mixtures_grad = ctx.needs_input_grad[1]
    grad_est, grad_mix = mixit_l1_backward(grad_rows, est, mixtures, best, ctx.partitions, ctx.impl, mixtures_grad)
    return (grad_est if ctx.needs_input_grad[0] else None, grad_mix if mixtures_grad else None, None, None)


mixit_l1.register_autograd(_backward, setup_context=_setup_context)


def _backward_setup_context(ctx, inputs, output):
    grad_rows, est, mixtures, best, partitions, impl, mixtures_grad = inputs
    ctx.save_for_backward(est, mixtures, best)
    ctx.partitions = partitions
    ctx.impl = impl
    ctx.mixtures_grad = mixtures_grad
    ctx.rows_dtype = grad_rows.dtype


def _double_backward(ctx, grad_grad_est, grad_grad_mix):
    # The gradient is linear in grad_rows and piecewise constant in est and mixtures (signs of the errors), so its
    # derivatives are: for grad_rows, the gradient of a unit grad_rows; for est and mixtures, zero (almost
    # everywhere, as autograd's own abs backward gives).
    est, mixtures, best = ctx.saved_tensors
    grad_grad_rows = None
    if ctx.needs_input_grad[0]:
        unit_est, unit_mix = mixit_l1_backward(est.new_ones(est.shape[0], dtype=ctx.rows_dtype), est, mixtures, best,
                                               ctx.partitions, ctx.impl, ctx.mixtures_grad)
        pairs = [(grad_grad_est, unit_est)] + ([(grad_grad_mix, unit_mix)] if ctx.mixtures_grad else [])
        grad_grad_rows = sum((outer.to(ctx.rows_dtype) * unit.to(ctx.rows_dtype)).flatten(1).sum(1)
                             for outer, unit in pairs)
    return (grad_grad_rows, torch.zeros_like(est) if ctx.needs_input_grad[1] else None,
            torch.zeros_like(mixtures) if ctx.needs_input_grad[2] else None, None, None, None, None)


mixit_l1_backward.register_autograd(_double_backward, setup_context=_backward_setup_context)


class _EagerMixitL1(torch.autograd.Function):
    """``mixit_l1`` and its autograd on the eager path (:mod:`.._eager`), the mean of the rows folded into the
    backend's forward and backward (two ops and an autograd node less).  Its forward takes ``ctx`` (no
    ``setup_context``): ``apply`` then binds no signature."""

    @staticmethod
    def forward(ctx, est, mixtures, partitions, impl, mean):
        loss, best = backends.lookup(OP, impl).forward(est, mixtures, partitions, mean=mean)
        _setup_context(ctx, (est, mixtures, partitions, impl), (loss, best))
        ctx.mean = mean
        return loss, best

    @staticmethod
    def backward(ctx, grad_loss, _grad_best):
        if grad_loss is None:  # no gradient reached the loss
            return None, None, None, None, None
        est, mixtures, best = ctx.saved_tensors
        mixtures_grad = ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            # Only under create_graph=True: the backward op, which has its own derivative.
            grad_est, grad_mix = mixit_l1_backward(row_gradients(grad_loss, best.shape[0], ctx.mean), est, mixtures,
                                                   best, ctx.partitions, ctx.impl, mixtures_grad)
        else:
            grad_est, grad_mix = backends.lookup(OP, ctx.impl).backward(grad_loss, est, mixtures, best, ctx.partitions,
                                                                        mixtures_grad, mean=ctx.mean)
        return grad_est if ctx.needs_input_grad[0] else None, grad_mix if mixtures_grad else None, None, None, None


_apply_eager = direct_apply(_EagerMixitL1)


def mixit_l1_reduced(est, mixtures, partitions: str, impl: str, mean: bool):
    """``mixit_l1`` with autograd, the row losses averaged when ``mean``: the custom op where
    :func:`takes_direct_path` says so, the eager path otherwise."""
    if not takes_direct_path(est, mixtures):
        row_loss, best = mixit_l1(est, mixtures, partitions, impl)
        return reduced_rows(row_loss, mean), best
    return _apply_eager(est, mixtures, partitions, impl, mean)


def remix(est: torch.Tensor, assignment: torch.Tensor, num_mixtures: int) -> torch.Tensor:
    """(B, N, *): each row's sources summed into the mixtures ``assignment`` (B, M) gives them.

    A masked sum per mixture, not a one-hot product: a NaN or Inf source then reaches only its own mixture."""
    chosen = assignment.view(*assignment.shape, *(1,) * (est.ndim - 2))
    zero = est.new_zeros(())
    return torch.stack([torch.where(chosen == n, est, zero).sum(1) for n in range(num_mixtures)], dim=1)


# The table lookup is an op of its own: under dynamic shapes the source and mixture counts are symbolic, and the
# (constant) tables can only be built from concrete ints, which the op's body receives.
@torch.library.custom_op("nrt_kernels::best_assignment", mutates_args=())
def best_assignment(best: torch.Tensor, num_sources: int, num_mixtures: int, partitions: str) -> torch.Tensor:
    """(B, M) int64: the mixture that each row's chosen candidate ``best`` (B,) gives every source."""
    return candidate_assignments(num_sources, num_mixtures, partitions, best.device)[best]


@best_assignment.register_fake
def _best_assignment_fake(best, num_sources, num_mixtures, partitions):
    return best.new_empty(best.shape[0], num_sources)


def finish(loss, best, est, num_mixtures, *, partitions, return_est, return_assignment):
    """The (reduced) loss and the requested extras, in the documented order."""
    if not (return_est or return_assignment):
        return loss
    assignment = best_assignment(best, est.shape[1], num_mixtures, partitions)
    outputs = [loss]
    if return_est:
        outputs.append(remix(est, assignment, num_mixtures))
    if return_assignment:
        outputs.append(assignment)
    return tuple(outputs)


def mixit_l1_loss(est, mixtures, impl: str, *, partitions, reduction, return_est, return_assignment):
    """The fused MixIT L1 of validated inputs with a resolved kernel backend ``impl``."""
    dtype = common_dtype(est, mixtures)
    loss, best = mixit_l1_reduced(fused_operand(est, dtype), fused_operand(mixtures, dtype), partitions, impl,
                                  reduction == "mean")
    return finish(loss, best, est, mixtures.shape[1], partitions=partitions, return_est=return_est,
                  return_assignment=return_assignment)
