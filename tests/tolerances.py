"""One tolerance table, losses and gradients per input dtype, for every test that checks a backend against the truth.

The truth is the reference (``nrt_kernels.reference``, the asteroid / iSeparate loop) run on the same inputs
converted to float64.  The criterion is ml-cross-entropy's: a backend may be off the truth by no more than the
PyTorch loop is, plus the table's tolerance, element by element::

    |fast - truth| <= |baseline - truth| + atol + rtol * |truth|

with the baseline the PyTorch loop in :func:`baseline_dtype` (float32 for float32 and half inputs, as a user who
calls ``.float()`` before asteroid gets it; the truth itself for float64, so there the bound is atol + rtol|truth|).
Where the truth is NaN or +-Inf the backend must give exactly that.

Losses: the fused backends accumulate in float32 in another order than the loop (tiles, per-program partials),
so they get a relative 1e-5 beyond the loop's own error; float64 sums differ only by reordering (1e-12).
Gradients: ``grad_row * sign(err) / (N * D)``, which the loop computes in the gradient's dtype and a fused backend
in float32 before one rounding to the input dtype (the CUDA library multiplies by the reciprocal): two roundings of
the gradient's dtype, rtol = its machine epsilon, atol = 0 (an exact zero, sign(0) = 0, must stay exactly zero).
Half-precision gradients are therefore checked against the float64 truth within the float32 loop's error plus one
epsilon of the half type (bfloat16 2**-7, float16 2**-10): a wrong sign or scale is off by 100 % or more.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Tolerance(NamedTuple):
    rtol: float
    atol: float


class DtypeTolerances(NamedTuple):
    loss: Tolerance
    grad: Tolerance


def _grad_tolerance(dtype: torch.dtype) -> Tolerance:
    return Tolerance(torch.finfo(dtype).eps, 0.0)


TOLERANCES = {
    torch.float64: DtypeTolerances(Tolerance(1e-12, 1e-12), _grad_tolerance(torch.float64)),
    torch.float32: DtypeTolerances(Tolerance(1e-5, 1e-6), _grad_tolerance(torch.float32)),
    torch.bfloat16: DtypeTolerances(Tolerance(1e-5, 1e-6), _grad_tolerance(torch.bfloat16)),
    torch.float16: DtypeTolerances(Tolerance(1e-5, 1e-6), _grad_tolerance(torch.float16)),
}
# (rtol, atol) of losses, the table's loss column, for comparisons with the reference run in the same dtype.
LOSS_TOLERANCE = {dtype: tuple(entry.loss) for dtype, entry in TOLERANCES.items()}


def baseline_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the PyTorch loop that a backend given inputs of ``dtype`` is held to."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close_to_truth(fast, baseline, truth, dtype, quantity="loss"):
    """``fast`` is at least as close to the float64 ``truth`` as the PyTorch ``baseline``, plus the table's
    tolerance for ``quantity`` ("loss" or "grad") of inputs of ``dtype``, element by element (module docstring)."""
    rtol, atol = getattr(TOLERANCES[dtype], quantity)
    fast, baseline, truth = (t.detach().cpu().double() for t in (fast, baseline, truth))
    assert fast.shape == truth.shape, f"{quantity}: shape {tuple(fast.shape)} != {tuple(truth.shape)}"
    finite = torch.isfinite(truth)
    same_nonfinite = torch.where(torch.isnan(truth), torch.isnan(fast), fast == truth)
    assert same_nonfinite[~finite].all(), f"{quantity}: the truth's NaN/Inf is not where the backend's is"
    fast_err = (fast - truth).abs()
    bound = (baseline - truth).abs() + atol + rtol * truth.abs()
    bad = finite & ~(fast_err <= bound)  # a NaN error fails too
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{quantity} ({dtype}): {int(bad.sum())} of {truth.numel()} elements off the float64 truth by more than "
            f"the PyTorch loop in {baseline_dtype(dtype)} plus rtol={rtol:.3g}, atol={atol:.3g}; first at {index}: "
            f"backend {fast[index].item():.9g}, loop {baseline[index].item():.9g}, truth {truth[index].item():.9g}")


def rows_choosing_like_reference(fast_assignment, ref_loss, ref_assignment, est, mixtures):
    """Rows where the fast path chose the reference's assignment; the others must be exact ties.

    Short signals make candidates tie mathematically (moving a source between two mixtures whose errors keep
    their sign leaves the L1 unchanged), and which one rounds lowest depends on the order of additions. A
    different choice is allowed only there: the reference must score it equal to its own up to rounding.
    """
    from nrt_kernels import reference

    fast_assignment, ref_assignment = fast_assignment.cpu(), ref_assignment.cpu()
    est, mixtures = est.detach().cpu(), mixtures.detach().cpu()
    same = (fast_assignment == ref_assignment).all(1)
    chosen = reference.l1_per_example(reference.remix(est, fast_assignment, mixtures.shape[1]), mixtures)
    torch.testing.assert_close(chosen[~same], ref_loss[~same].cpu().to(chosen.dtype), rtol=1e-12, atol=1e-12)
    return same

# The Gram metrics (tests/test_mixit_metrics.py).  float64: (rtol, atol) of fused losses against the float64 loop,
# which evaluate the same expressions in another order (measured differences ~1e-14).  float32: the issue's
# criterion, error <= 2x the float32 loop's + this many dB against a float64 evaluation.
GRAM_FLOAT64_TOLERANCE = (1e-10, 1e-10)
GRAM_SLACK_DB = 0.01
