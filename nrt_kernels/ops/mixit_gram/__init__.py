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
first, like ``torch.min``).  3. The chosen candidate's statistics ``(Q, X, XX, S, T)`` per mixture come back as a
``(B, N, 5)`` float64 tensor, and :func:`metric_row_loss` turns them into the row loss in PyTorch: the returned loss
is that one expression, which autograd (and torch.compile) differentiate like any other.

Backward.  The op's only differentiable output is the statistics, and dQ/dr = 2 r, dX/dr = x, dS/dr = 1,
dX/dx = r, dXX/dx = 2 x, dT/dx = 1: so each source of mixture ``n`` gets ``2 gQ r_n + gX x_n + gS`` and the mixture
``gX r_n + 2 gXX x_n + gT`` (:func:`gram_coefficients`).  One pass reads est and mixtures and writes the gradients;
the metric's own derivative (EPS, zero-mean, the log) is autograd's, through :func:`metric_row_loss`.

Accuracy.  The Gram is accumulated in float64 from exact products: the product of two float32 (or float16 /
bfloat16) values is exact in float64 (48 <= 53 significand bits), so only the float64 additions round.  A float32
Gram would not do: the noise energy ``Q - X^2/XX`` of an estimate at 60 dB SDR is a difference of numbers 10^6 times
larger than itself, so float32's 1e-7 becomes 10 % (0.4 dB); float64's 1e-16 becomes 1e-10 (well inside the
criterion, error <= 2x the float32 loop's + 0.01 dB from -30 to +60 dB: tests/test_mixit_metrics.py measures it
for losses and gradients).  The search and the statistics are float64 too, and so is the backward's arithmetic
(the remix and ``a r + b x + c``, whose terms cancel as much at high SDR), rounded once to the gradient's dtype.
float64 inputs: the products round in float64, like the float64 loop's.  Where the noise energy rounds below 0
(estimates within ~1e-16 of exact) it is clamped to 0, so the loss stays finite and the metric's EPS decides.

Selection.  A candidate's float64 loss from the Gram equals the float64 loop's up to rounding (~1e-13 relative);
the two choose differently only where two candidates' losses differ by less than :data:`SELECTION_MARGIN` (relative
to 1 + |loss|).  Exact ties (identical sources, integer-valued signals) resolve to the first candidate, like the
reference, whenever the Gram sums are exact.

Backends (``triton.py``, ``cpu.py``; the CUDA library computes only the L1) register ``forward(est, mixtures,
partitions, metric, zero_mean, eps, tau) -> (best (B,) int64, stats (B, N, 5) float64)`` and ``backward(coefficients
(B, N, 6) float64, est, mixtures, best, partitions, mixtures_grad) -> (grad_est, grad_mixtures or None)`` with
:mod:`nrt_kernels.backends`, where ``grad_e = c0 r + c1 x + c2`` for every source of a mixture and
``grad_x = c3 r + c4 x + c5``.
"""
from __future__ import annotations

import torch

from ... import backends
from .._operands import common_dtype, fused_operand, row_loss_dtype
from ..mixit_l1 import finish

OP = "mixit_gram"
# The statistics of each (row, mixture) of the chosen candidate, in the order of the last dim of ``stats``.
STATISTICS = ("Q", "X", "XX", "S", "T")
# Two candidates whose float64 losses differ by less than this (relative to 1 + |loss|) may be chosen either way:
# 1e4 times the ~1e-13 by which the Gram's float64 evaluation and the float64 loop's differ.
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
    :mod:`nrt_kernels.compat` checks a user's loss object with it)."""
    est = est_mixtures.flatten(2).double()
    target = mixtures.flatten(2).double()
    return torch.stack([(est * est).sum(-1), (est * target).sum(-1), (target * target).sum(-1), est.sum(-1),
                        target.sum(-1)], dim=-1)


def gram_coefficients(grad_stats: torch.Tensor) -> torch.Tensor:
    """(B, N, 6) float64: the gradient of the statistics as ``grad_e = c0 r + c1 x + c2`` (every source of the
    mixture) and ``grad_x = c3 r + c4 x + c5`` (the mixture)."""
    g_energy, g_cross, g_target_energy, g_est_sum, g_target_sum = grad_stats.double().unbind(-1)
    return torch.stack([2 * g_energy, g_cross, g_est_sum, g_cross, 2 * g_target_energy, g_target_sum],
                       dim=-1).contiguous()


@torch.library.custom_op("nrt_kernels::mixit_gram", mutates_args=())
def mixit_gram(est: torch.Tensor, mixtures: torch.Tensor, partitions: str, metric: str, zero_mean: bool, eps: float,
               tau: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Best candidate of every row for a Gram metric, contiguous (B, M, D) est against (B, N, D) mixtures.

    Returns ``(best, stats)``: ``best`` (B,) int64, the chosen candidate in ``nrt_kernels.assignments`` order, and
    ``stats`` (B, N, 5) float64, its :data:`STATISTICS` per mixture (see :func:`metric_row_loss`).
    """
    return backends.lookup(OP, impl).forward(est, mixtures, partitions, metric, zero_mean, eps, tau)


@mixit_gram.register_fake
def _mixit_gram_fake(est, mixtures, partitions, metric, zero_mean, eps, tau, impl):
    batch, num_mixtures = est.shape[0], mixtures.shape[1]
    return (est.new_empty(batch, dtype=torch.int64),
            est.new_empty(batch, num_mixtures, len(STATISTICS), dtype=torch.float64))


@torch.library.custom_op("nrt_kernels::mixit_gram_backward", mutates_args=())
def mixit_gram_backward(grad_stats: torch.Tensor, est: torch.Tensor, mixtures: torch.Tensor, best: torch.Tensor,
                        partitions: str, impl: str, mixtures_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of est (and of the mixtures when ``mixtures_grad``, else empty) from those of ``stats``."""
    grad_est, grad_mix = backends.lookup(OP, impl).backward(gram_coefficients(grad_stats), est, mixtures, best,
                                                            partitions, mixtures_grad)
    return grad_est, grad_mix if mixtures_grad else mixtures.new_empty(0)


@mixit_gram_backward.register_fake
def _mixit_gram_backward_fake(grad_stats, est, mixtures, best, partitions, impl, mixtures_grad):
    return torch.empty_like(est), torch.empty_like(mixtures) if mixtures_grad else mixtures.new_empty(0)


def _setup_context(ctx, inputs, output):
    est, mixtures, partitions, *_, impl = inputs
    best, _ = output
    ctx.save_for_backward(est, mixtures, best)
    ctx.partitions = partitions
    ctx.impl = impl
    ctx.mark_non_differentiable(best)


def _backward(ctx, _grad_best, grad_stats):
    est, mixtures, best = ctx.saved_tensors
    mixtures_grad = ctx.needs_input_grad[1]
    grad_est, grad_mix = mixit_gram_backward(grad_stats, est, mixtures, best, ctx.partitions, ctx.impl,
                                             mixtures_grad)
    return (grad_est if ctx.needs_input_grad[0] else None, grad_mix if mixtures_grad else None,
            None, None, None, None, None, None)


mixit_gram.register_autograd(_backward, setup_context=_setup_context)


def mixit_gram_loss(est, mixtures, impl: str, *, metric: str, options, partitions, reduction, return_est,
                    return_assignment):
    """The fused MixIT loss of validated inputs for a Gram metric with validated ``options`` and a resolved
    kernel backend ``impl``."""
    dtype = common_dtype(est, mixtures)
    zero_mean = bool(options.zero_mean)
    eps = options.eps if options.eps is not None else 0.0
    tau = 10.0 ** (-options.max_snr / 10.0) if options.max_snr is not None else 0.0
    flat_est, flat_mix = fused_operand(est, dtype), fused_operand(mixtures, dtype)
    best, stats = mixit_gram(flat_est, flat_mix, partitions, metric, zero_mean, eps, tau, impl)
    row_loss = metric_row_loss(stats, flat_est.shape[2], metric, zero_mean, eps, tau).to(row_loss_dtype(dtype))
    return finish(row_loss, best, est, mixtures.shape[1], partitions=partitions, reduction=reduction,
                  return_est=return_est, return_assignment=return_assignment)
