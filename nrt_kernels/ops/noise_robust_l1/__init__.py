"""The fused noise-robust loss op (iSeparate-SDX V1/V2), backend-neutral: custom ops, fake, autograd, and the
production logic around them (active terms, divisor, pairing masks, source weights).

Terms, each a mean over the batch: ``l1`` = |est - targets| (a weighted mean over sources), ``consistency`` (V2) =
|sum_s est - sum_s targets|, ``mixit`` = the generalized MixIT L1 of est against the two mixtures that a pairing
forms from the noisy targets, ``teacher`` = the l1 against teacher targets.

Kernel backends (``triton.py``, ``cuda`` being the same Triton kernel; ``cpu.py``, the C++ kernel) register
``forward(est, targets, teacher, pair_masks, source_weights, weights, divisor) -> (loss, terms, best)`` and
``backward(grad_loss, est, targets, teacher, pair_masks, source_weights, best, weights, divisor) -> grad_est``.
``composed.py`` computes the loss from a backend's MixIT op and PyTorch terms when targets require grad.
Eager calls on plain tensors go through :func:`noise_robust_l1_loss`, which skips torch.library's dispatch.
"""
from __future__ import annotations

import torch

from ... import backends
from .._eager import direct_apply, takes_direct_path
from .._operands import row_loss_dtype

OP = "noise_robust_l1"
# Term order of the fused op's ``weights`` and ``terms``: a V1 call leaves "consistency" at 0.
TERM_NAMES = ("l1", "consistency", "mixit", "teacher")
NUM_MIXTURES = 2


@torch.library.custom_op("nrt_kernels::noise_robust_l1", mutates_args=())
def noise_robust_l1(est: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor, pair_masks: torch.Tensor,
                    source_weights: torch.Tensor, weights: list[float], divisor: float,
                    impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted noise-robust loss of contiguous (B, S, D) est against targets (and teacher targets).

    ``weights`` are the (l1, consistency, mixit, teacher) weights, 0 for a term that does not run; ``teacher``
    is empty when the teacher term is off, ``source_weights`` empty for a plain mean over sources (else (S,),
    summing to 1).  Returns ``(loss, terms, best)``: the scalar ``sum(weights * terms) / divisor``, the (4,)
    term values (0 for inactive terms) and the (B,) int64 MixIT candidate of each row (0 without MixIT).
    Loss and terms are float32 (float64 for float64 inputs).
    """
    return backends.lookup(OP, impl).forward(est, targets, teacher, pair_masks, source_weights, weights, divisor)


@noise_robust_l1.register_fake
def _noise_robust_l1_fake(est, targets, teacher, pair_masks, source_weights, weights, divisor, impl):
    dtype = row_loss_dtype(est.dtype)
    return (est.new_empty((), dtype=dtype), est.new_empty(len(TERM_NAMES), dtype=dtype),
            est.new_empty(est.shape[0], dtype=torch.int64))


@torch.library.custom_op("nrt_kernels::noise_robust_l1_backward", mutates_args=())
def noise_robust_l1_backward(grad_loss: torch.Tensor, est: torch.Tensor, targets: torch.Tensor,
                             teacher: torch.Tensor, pair_masks: torch.Tensor, source_weights: torch.Tensor,
                             best: torch.Tensor, weights: list[float], divisor: float, impl: str) -> torch.Tensor:
    """Gradient of ``noise_robust_l1``'s loss with respect to est."""
    return _backend_backward(grad_loss, est, targets, teacher, pair_masks, source_weights, best, weights, divisor,
                             impl)


def _backend_backward(grad_loss, est, targets, teacher, pair_masks, source_weights, best, weights, divisor, impl):
    return backends.lookup(OP, impl).backward(grad_loss.contiguous(), est, targets, teacher, pair_masks,
                                              source_weights, best, weights, divisor)


@noise_robust_l1_backward.register_fake
def _noise_robust_l1_backward_fake(grad_loss, est, targets, teacher, pair_masks, source_weights, best, weights,
                                   divisor, impl):
    return torch.empty_like(est)


def _setup_context(ctx, inputs, output):
    est, targets, teacher, pair_masks, source_weights, weights, divisor, impl = inputs
    _, terms, best = output
    ctx.save_for_backward(est, targets, teacher, pair_masks, source_weights, best)
    ctx.weights = weights
    ctx.divisor = divisor
    ctx.impl = impl
    ctx.mark_non_differentiable(terms, best)
    # Outputs without a gradient reach the backward as None, not as zeros made for it (host time of a small call).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_terms, _grad_best, run_backward=noise_robust_l1_backward):
    est, targets, teacher, pair_masks, source_weights, best = ctx.saved_tensors
    grad_est = None
    if ctx.needs_input_grad[0] and grad_loss is not None:  # None: no gradient reached the loss
        grad_est = run_backward(grad_loss, est, targets, teacher, pair_masks, source_weights, best, ctx.weights,
                                ctx.divisor, ctx.impl)
    return grad_est, None, None, None, None, None, None, None


noise_robust_l1.register_autograd(_backward, setup_context=_setup_context)


def _backward_setup_context(ctx, inputs, output):
    grad_loss, est, targets, teacher, pair_masks, source_weights, best, weights, divisor, impl = inputs
    ctx.save_for_backward(est, targets, teacher, pair_masks, source_weights, best)
    ctx.weights = weights
    ctx.divisor = divisor
    ctx.impl = impl
    ctx.loss_dtype = grad_loss.dtype


def _double_backward(ctx, grad_grad_est):
    # The gradient is linear in grad_loss and piecewise constant in est (signs of the errors): its derivatives are
    # the gradient of a unit grad_loss, and zero for est (almost everywhere, as autograd's own abs backward gives).
    est, targets, teacher, pair_masks, source_weights, best = ctx.saved_tensors
    grad_grad_loss = None
    if ctx.needs_input_grad[0]:
        unit = noise_robust_l1_backward(est.new_ones((), dtype=ctx.loss_dtype), est, targets, teacher, pair_masks,
                                        source_weights, best, ctx.weights, ctx.divisor, ctx.impl)
        grad_grad_loss = (grad_grad_est.to(ctx.loss_dtype) * unit.to(ctx.loss_dtype)).sum()
    return (grad_grad_loss, torch.zeros_like(est) if ctx.needs_input_grad[1] else None, *(None,) * 8)


noise_robust_l1_backward.register_autograd(_double_backward, setup_context=_backward_setup_context)


class _EagerNoiseRobustL1(torch.autograd.Function):
    """``noise_robust_l1`` and its autograd on the eager path (:mod:`.._eager`): the same backend functions and
    context.  Its forward takes ``ctx`` (no ``setup_context``): ``apply`` then binds no signature."""

    @staticmethod
    def forward(ctx, est, targets, teacher, pair_masks, source_weights, weights, divisor, impl):
        inputs = (est, targets, teacher, pair_masks, source_weights, weights, divisor, impl)
        output = backends.lookup(OP, impl).forward(est, targets, teacher, pair_masks, source_weights, weights, divisor)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_loss, grad_terms, grad_best):
        # Grad mode is on only under create_graph=True: then the backward op, which has its own derivative.
        run_backward = noise_robust_l1_backward if torch.is_grad_enabled() else _backend_backward
        return _backward(ctx, grad_loss, grad_terms, grad_best, run_backward=run_backward)


_apply_eager = direct_apply(_EagerNoiseRobustL1)


def noise_robust_l1_loss(est, targets, teacher, pair_masks, source_weights, weights: list[float], divisor: float,
                         impl: str):
    """``noise_robust_l1`` with autograd: the custom op where :func:`takes_direct_path` says so, the eager path
    otherwise."""
    if not takes_direct_path(est, targets, teacher):
        return noise_robust_l1(est, targets, teacher, pair_masks, source_weights, weights, divisor, impl)
    return _apply_eager(est, targets, teacher, pair_masks, source_weights, weights, divisor, impl)


def active_terms(terms: tuple, weights, has_teacher: bool) -> dict:
    """``{term name: weight}`` of the terms a call computes: a non-zero weight, and for the teacher term teacher
    targets (iSeparate skips it on iterations where the mean teacher is off)."""
    active = {name: float(weight) for name, weight in zip(terms, weights)
              if weight != 0 and (name != "teacher" or has_teacher)}
    if not active:
        raise ValueError(f"no term of the loss is active with weights {list(weights)} "
                         f"(teacher targets {'given' if has_teacher else 'not given'})")
    return active


def loss_divisor(version: str, weights, active: dict, normalize: str) -> float:
    """V1 under "iseparate" divides by the sum of all its weights, even when the teacher term is skipped;
    V2 (either setting) and "active" divide by the weights of the terms computed."""
    return float(sum(weights)) if version == "v1" and normalize == "iseparate" else float(sum(active.values()))


def draw_pairing(pairing, batch: int, num_sources: int) -> torch.Tensor:
    """int64 pairing rows, (S,) for one pairing of the whole batch or (B, S) for one per row: ``None`` draws one
    ``torch.randperm(S)`` from the global generator for the batch (iSeparate), ``"per_example"`` one per row; a
    (validated) tensor stays where it is."""
    if pairing is None:
        return torch.randperm(num_sources)
    if isinstance(pairing, str):
        return torch.stack([torch.randperm(num_sources) for _ in range(batch)])
    return pairing.to(torch.int64)


def pair_masks(rows: torch.Tensor | None, batch: int, num_sources: int, device,
               first_mixture_size: int | None = None) -> torch.Tensor:
    """(B,) int32: bit ``s`` set when noisy stem ``s`` is among the first ``first_mixture_size`` (default: half)
    of its row's pairing (mixture 0)."""
    if rows is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    first = num_sources // 2 if first_mixture_size is None else first_mixture_size
    if rows.device.type == "cpu" and type(rows) is torch.Tensor and not torch.compiler.is_compiling():
        # Host rows as Python ints: one small tensor instead of five small ops (a quarter of the host time of a
        # small call).  Traced or fake rows have no values to read.
        if rows.ndim == 1:
            masks = torch.full((batch,), sum(1 << source for source in rows.tolist()[:first]), dtype=torch.int32)
        else:
            masks = torch.tensor([sum(1 << source for source in row[:first]) for row in rows.tolist()],
                                 dtype=torch.int32)
        return masks if device.type == "cpu" else masks.to(device, non_blocking=True)
    first_stems = rows[..., :first]
    masks = torch.bitwise_left_shift(torch.ones_like(first_stems), first_stems).sum(-1).to(torch.int32)
    # Pairings drawn here (or given) on the host stay there until they are (B,) masks: one small copy.
    return masks.expand(batch).contiguous().to(device, non_blocking=True)


def normalized_source_weights(source_weights, dtype: torch.dtype, device) -> torch.Tensor:
    """(S,) weights summing to 1 in the accumulation dtype, or an empty tensor for a plain mean over sources."""
    if source_weights is None:
        return torch.empty(0, dtype=row_loss_dtype(dtype), device=device)
    # Normalised in float64: weights such as 1e-46 or 1e39 would underflow or overflow in float32.
    weights = torch.as_tensor(source_weights, dtype=torch.float64, device=device).reshape(-1)
    return (weights / weights.sum()).to(row_loss_dtype(dtype)).contiguous()
