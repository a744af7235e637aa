"""The fused MixIT op for the bilinear metrics (SI-SDR, SD-SDR, SNR, MSE, thresholded log-MSE), backend-neutral:
torch.library custom ops, fake implementations, autograd and the metric itself.

Why one Gram pass is enough: with ``r_n`` the remix of mixture ``n`` (the sum of the sources a candidate gives it)
and ``x_n`` the mixture, every metric of a candidate reads, per mixture, only

    Q = ||r_n||^2 = sum over i, j in S_n of <e_i, e_j>      X = <r_n, x_n> = sum over i in S_n of <e_i, x_n>
    XX = ||x_n||^2      S = sum_t r_n(t) = sum over i in S_n of sum_t e_i(t)      T = sum_t x_n(t)

(zero-mean centering subtracts S^2/D, S*T/D and T^2/D from Q, X and XX).  So:

Forward.  1. One pass over est and mixtures builds, per row, the Gram matrix of the ``M + N + 1`` signals
``[e_1..e_M, x_1..x_N, 1]`` (the constant signal gives the sums).  2. A search over every candidate of
:mod:`nrt_kernels.assignments`, in tiles of candidates (no ``(B, P, N)`` tensor beyond a tile), scores each one from
the Gram entries alone, O(N M^2) work per candidate whatever the signal length, and keeps the first minimum (NaN
first, like ``torch.min``).  3. The row loss is that minimum; with it the backend returns the derivative of the row
loss with respect to the chosen candidate's statistics ``(Q, X, XX, S, T)`` per mixture, a ``(B, N, 5)`` float64
tensor.  :func:`metric_row_loss` is the same metric written in PyTorch: the definition the kernels follow term for
term (their derivative is the one autograd takes of it), used by the double backward and by
:mod:`nrt_kernels.compat`; the tests hold the kernels' losses and gradients to the reference loop.

Backward.  dQ/dr = 2 r, dX/dr = x, dS/dr = 1, dX/dx = r, dXX/dx = 2 x, dT/dx = 1: so every source of mixture ``n``
gets ``g (2 dQ r_n + dX x_n + dS)`` and the mixture ``g (dX r_n + 2 dXX x_n + dT)``, ``g`` being the row's upstream
gradient.  One pass reads est and mixtures and writes the gradients.  Double backward (gradient penalties) writes
the chosen candidate's gradient in PyTorch and lets autograd differentiate it once more.

Accuracy.  The Gram is accumulated in float64 from exact products: the product of two float32 (or float16 /
bfloat16) values is exact in float64 (48 <= 53 significand bits), so only the float64 additions round.  A float32
Gram would not do: the noise energy ``Q - X^2/XX`` of an estimate at 60 dB SDR is a difference of numbers 10^6 times
larger than itself, so float32's 1e-7 becomes about 10 % (0.4 dB); float64's 1e-16 becomes 1e-10.  Measured by
tests/test_mixit_metrics.py: error <= 2x the float32 loop's + 0.01 dB from -30 to +60 dB, for losses and
gradients (in practice ~1e-6 dB, the float32 rounding of the result); a float32 Gram fails those tests at 60 dB.  The search and the statistics are float64 too, and so is the backward's arithmetic
(the remix and ``a r + b x + c``, whose terms cancel as much at high SDR), rounded once to the gradient's dtype.
float64 inputs: the products round in float64, like the float64 loop's.  The limit of the method: far above the
criterion's 60 dB, where the noise energy falls below the float64 rounding of ||r||^2 (1e-16 of it) and toward EPS
(one- or two-sample signals get there: a single sample is always a scaled copy of the mixture), the loss errs by
~1e-16 ||r||^2 / EPS relative and the gradient by more; a noise energy that rounds below 0 is clamped to 0, so the
loss stays finite and EPS decides.

Selection.  A candidate's float64 loss from the Gram equals the float64 loop's up to rounding (~1e-15 relative in
the tests);
the two choose differently only where two candidates' losses differ by less than :data:`SELECTION_MARGIN` (relative
to 1 + |loss|).  Exact ties (identical sources, integer-valued signals) resolve to the first candidate, like the
reference, whenever the Gram sums are exact.

Backends (``triton.py``, ``cpu.py``; the CUDA library computes only the L1) register ``forward(est, mixtures,
partitions, metric, zero_mean, eps, tau) -> (row_loss (B,), best (B,) int64, dloss (B, N, 5) float64)`` and
``backward(grad_rows, dloss, est, mixtures, best, partitions, mixtures_grad) -> (grad_est, grad_mixtures or None)``
with :mod:`nrt_kernels.backends`.
"""
from __future__ import annotations

import torch

from ... import backends
from ...assignments import candidate_assignments
from .._operands import common_dtype, fused_operand, row_loss_dtype
from ..mixit_l1 import finish, remix

OP = "mixit_gram"
# The statistics of each (row, mixture) of the chosen candidate, in the order of the last dim of ``dloss``.
STATISTICS = ("Q", "X", "XX", "S", "T")
# Two candidates whose float64 losses differ by less than this (relative to 1 + |loss|) may be chosen either way:
# far above the ~1e-15 by which the Gram's float64 evaluation and the float64 loop's differ, far below any difference
# between candidates that matters for training.
SELECTION_MARGIN = 1e-9


def metric_row_loss(stats: torch.Tensor, length: int, metric: str, zero_mean: bool, eps: float,
                    tau: float) -> torch.Tensor:
    """(B,) float64 row losses from per-mixture statistics (B, N, 5) of signals of ``length`` samples.

    The metrics of :mod:`nrt_kernels.reference` written on inner products: asteroid's MultiSrcNegSDR (EPS on the
    target energy, on the noise energy and inside the log), MultiSrcMSE, and Google's log-MSE with
    ``tau = 10 ** (-max_snr / 10)``; each averaged over the mixtures.
    """
    energy, cross, target_energy, est_sum, target_sum = stats.unbind(-1)
    if metric in ("mse", "log_mse"):
        error = _nonnegative(energy - 2 * cross + target_energy)
        per_mixture = error / length if metric == "mse" else 10 * torch.log10(error + tau * target_energy + eps)
        return per_mixture.mean(-1)
    if zero_mean:
        energy = energy - est_sum * est_sum / length
        cross = cross - est_sum * target_sum / length
        target_energy = target_energy - target_sum * target_sum / length
    if metric == "snr":
        signal, noise = target_energy, energy - 2 * cross + target_energy
    else:
        scale = cross / (target_energy + eps)
        signal = scale * scale * target_energy
        noise = (energy - 2 * scale * cross + scale * scale * target_energy if metric == "sisdr"
                 else energy - 2 * cross + target_energy)
    sdr = 10 * torch.log10(signal / (_nonnegative(noise) + eps) + eps)
    return -sdr.mean(-1)


def _nonnegative(energy: torch.Tensor) -> torch.Tensor:
    # An energy that rounds below 0 is 0.  `where`, not clamp: clamp's backward zeroes a NaN's gradient, where
    # passes it on, so the gradient of a NaN row is NaN as the chosen candidate's own gradient is.
    return torch.where(energy < 0, torch.zeros_like(energy), energy)


def mixture_statistics(est_mixtures: torch.Tensor, mixtures: torch.Tensor) -> torch.Tensor:
    """(B, N, 5) float64 statistics of remixed estimates against mixtures, in plain PyTorch (small inputs only:
    :mod:`nrt_kernels.compat` checks a user's loss object with it, the tests the kernels' derivatives)."""
    est = est_mixtures.flatten(2).double()
    target = mixtures.flatten(2).double()
    return torch.stack([(est * est).sum(-1), (est * target).sum(-1), (target * target).sum(-1), est.sum(-1),
                        target.sum(-1)], dim=-1)


@torch.library.custom_op("nrt_kernels::mixit_gram", mutates_args=())
def mixit_gram(est: torch.Tensor, mixtures: torch.Tensor, partitions: str, metric: str, zero_mean: bool, eps: float,
               tau: float, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best candidate of every row for a Gram metric, contiguous (B, M, D) est against (B, N, D) mixtures.

    Returns ``(row_loss, best, dloss)``: ``row_loss`` (B,) float32 (float64 for float64 input), ``best`` (B,) int64,
    the chosen candidate in ``nrt_kernels.assignments`` order, and ``dloss`` (B, N, 5) float64, the derivative of
    the row loss with respect to the chosen candidate's :data:`STATISTICS` per mixture.
    """
    return backends.lookup(OP, impl).forward(est, mixtures, partitions, metric, zero_mean, eps, tau)


@mixit_gram.register_fake
def _mixit_gram_fake(est, mixtures, partitions, metric, zero_mean, eps, tau, impl):
    batch, num_mixtures = est.shape[0], mixtures.shape[1]
    return (est.new_empty(batch, dtype=row_loss_dtype(est.dtype)), est.new_empty(batch, dtype=torch.int64),
            est.new_empty(batch, num_mixtures, len(STATISTICS), dtype=torch.float64))


@torch.library.custom_op("nrt_kernels::mixit_gram_backward", mutates_args=())
def mixit_gram_backward(grad_rows: torch.Tensor, dloss: torch.Tensor, est: torch.Tensor, mixtures: torch.Tensor,
                        best: torch.Tensor, partitions: str, metric: str, zero_mean: bool, eps: float, tau: float,
                        impl: str, mixtures_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``mixit_gram``'s row losses; the mixtures' gradient is empty unless ``mixtures_grad``.  (The
    metric's options are its double backward's.)"""
    grad_est, grad_mix = backends.lookup(OP, impl).backward(grad_rows.contiguous(), dloss, est, mixtures, best,
                                                            partitions, mixtures_grad)
    return grad_est, grad_mix if mixtures_grad else mixtures.new_empty(0)


@mixit_gram_backward.register_fake
def _mixit_gram_backward_fake(grad_rows, dloss, est, mixtures, best, partitions, metric, zero_mean, eps, tau, impl,
                              mixtures_grad):
    return torch.empty_like(est), torch.empty_like(mixtures) if mixtures_grad else mixtures.new_empty(0)


def _setup_context(ctx, inputs, output):
    est, mixtures, partitions, metric, zero_mean, eps, tau, impl = inputs
    _, best, dloss = output
    ctx.save_for_backward(est, mixtures, best, dloss)
    ctx.options = (partitions, metric, zero_mean, eps, tau, impl)
    ctx.mark_non_differentiable(best, dloss)
    # Outputs without a gradient reach the backward as None, not as zeros made for it (host time of a small call).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_rows, _grad_best, _grad_dloss):
    if grad_rows is None:  # no gradient reached the loss
        return (None,) * 8
    est, mixtures, best, dloss = ctx.saved_tensors
    mixtures_grad = ctx.needs_input_grad[1]
    grad_est, grad_mix = mixit_gram_backward(grad_rows, dloss, est, mixtures, best, *ctx.options, mixtures_grad)
    return (grad_est if ctx.needs_input_grad[0] else None, grad_mix if mixtures_grad else None,
            None, None, None, None, None, None)


mixit_gram.register_autograd(_backward, setup_context=_setup_context)


def _backward_setup_context(ctx, inputs, output):
    grad_rows, _, est, mixtures, best, partitions, metric, zero_mean, eps, tau, _, mixtures_grad = inputs
    ctx.save_for_backward(grad_rows, est, mixtures, best)
    ctx.options = (partitions, metric, zero_mean, eps, tau)
    ctx.mixtures_grad = mixtures_grad


def _double_backward(ctx, grad_grad_est, grad_grad_mix):
    # Second derivatives (gradient penalties) are rare: the chosen candidate's gradient written in PyTorch (its
    # remix, statistics and metric_row_loss, the selection held fixed), differentiated once more by autograd.
    grad_rows, est, mixtures, best = ctx.saved_tensors
    partitions, metric, zero_mean, eps, tau = ctx.options
    with torch.enable_grad():
        rows, sources, targets = (t.detach().requires_grad_(True) for t in (grad_rows, est, mixtures))
        assignment = candidate_assignments(est.shape[1], mixtures.shape[1], partitions, est.device)[best]
        stats = mixture_statistics(remix(sources, assignment, mixtures.shape[1]), targets)
        row_loss = metric_row_loss(stats, est.shape[2], metric, zero_mean, eps, tau)
        grad_est, grad_mix = torch.autograd.grad(row_loss, (sources, targets), rows.to(row_loss.dtype),
                                                 create_graph=True)
        outer = sum((grad * outer_grad).sum() for grad, outer_grad in
                    ((grad_est, grad_grad_est), (grad_mix, grad_grad_mix if ctx.mixtures_grad else None))
                    if outer_grad is not None)
        grad_grad_rows, grad_sources, grad_targets = torch.autograd.grad(outer, (rows, sources, targets),
                                                                         allow_unused=True)
    needs = ctx.needs_input_grad
    return (grad_grad_rows if needs[0] else None, None, grad_sources if needs[2] else None,
            grad_targets if needs[3] else None, *(None,) * 8)


mixit_gram_backward.register_autograd(_double_backward, setup_context=_backward_setup_context)


def mixit_gram_loss(est, mixtures, impl: str, *, metric: str, options, partitions, reduction, return_est,
                    return_assignment):
    """The fused MixIT loss of validated inputs for a Gram metric with validated ``options`` and a resolved
    kernel backend ``impl``."""
    dtype = common_dtype(est, mixtures)
    zero_mean = bool(options.zero_mean)
    eps = options.eps if options.eps is not None else 0.0
    tau = 10.0 ** (-options.max_snr / 10.0) if options.max_snr is not None else 0.0
    row_loss, best, _ = mixit_gram(fused_operand(est, dtype), fused_operand(mixtures, dtype), partitions, metric,
                                   zero_mean, eps, tau, impl)
    loss = row_loss.mean() if reduction == "mean" else row_loss
    return finish(loss, best, est, mixtures.shape[1], partitions=partitions, return_est=return_est,
                  return_assignment=return_assignment)
