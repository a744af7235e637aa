"""Fused noise-robust loss (iSeparate-SDX V1/V2): L1 + mixture consistency + MixIT + mean-teacher L1.

Inputs, flattened and contiguous: est ``(B, S, D)``, noisy targets ``(B, S, D)``, teacher targets ``(B, S, D)``
(empty when the teacher term is off), ``pair_masks`` ``(B,)`` int32 (bit ``s`` set: noisy stem ``s`` goes into
mixture 0, the others into mixture 1) and optional normalised per-source weights ``(S,)``.

Forward, three launches:

1. ``_noise_robust_partials_kernel``: a program owns one row, an even, strided share of its tiles of ``D``
   (the launch is one wave, sized from the compiled kernel's registers) and one block of source subsets (as
   ``ops/mixit_l1.py``).  It reads every source tile of est, targets and teacher targets once and
   accumulates, in registers, the two mixtures of the pairing (formed from the targets), every subset sum of
   est against both mixtures (the MixIT search, ``2 * 2**S`` partials), ``|est - y|``, ``|sum est - sum y|`` and
   ``|est - teacher|``.  It writes the MixIT partials in ``mixit_l1``'s layout and three term partials per program.
2. ``mixit_l1.select_best`` (shared with the core op): per row, the best candidate and its row loss.
3. ``_combine_terms_kernel``: one program sums the term partials in a fixed order (deterministic) and writes
   the four term values and the weighted, normalised loss.

Backward, one launch: ``_noise_robust_backward_kernel`` re-reads est, targets and teacher targets and writes
``grad_est``, the sum of every active term's gradient.

A term whose weight is 0 is a ``constexpr`` flag: its inputs are never read and its arithmetic is compiled out.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from ..assignments import candidate_masks
from .. import dispatch
from .mixit_l1 import programs_per_wave, row_loss_dtype, select_best

# Term order of the fused op's ``weights`` and ``terms``: a V1 call leaves "consistency" at 0.
TERM_NAMES = ("l1", "consistency", "mixit", "teacher")
NUM_MIXTURES = 2
MIXTURES = tl.constexpr(NUM_MIXTURES)  # the kernels' copy: globals read inside @triton.jit must be constexprs

_BACKENDS: dict[str, tuple[Callable, Callable]] = {}


def register_backend(name: str, forward: Callable, backward: Callable) -> None:
    """``forward(est, targets, teacher, pair_masks, source_weights, weights, divisor) -> (loss, terms, best)``;
    ``backward(grad_loss, est, targets, teacher, pair_masks, source_weights, best, weights, divisor) -> grad_est``."""
    _BACKENDS[name] = (forward, backward)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sign(x):
    # sign(0) = 0 and sign(NaN) = 0, exactly like autograd's abs backward.
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)


@triton.jit
def _as_acc(n, ACC_DTYPE: tl.constexpr):
    # Integer arguments equal to 1 arrive as constexprs: adding a 0-d tensor makes every case a tensor.
    return (tl.zeros((), tl.int32) + n).to(ACC_DTYPE)


@triton.jit
def _float_acc(x, ACC_DTYPE: tl.constexpr):
    # Float arguments are fp32 scalars when compiled and Python floats when interpreted: promote either.
    return tl.zeros((), ACC_DTYPE) + x


@triton.jit
def _noise_robust_partials_kernel(
    est_ptr, y_ptr, teacher_ptr, pair_ptr, source_weights_ptr, mix_partials_ptr, term_partials_ptr,
    D,
    NUM_SOURCES: tl.constexpr, LOW_SOURCES: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
    LOOP_STAGES: tl.constexpr, USE_L1: tl.constexpr, USE_CONSISTENCY: tl.constexpr, USE_MIXIT: tl.constexpr,
    USE_TEACHER: tl.constexpr, SOURCE_WEIGHTED: tl.constexpr,
):
    # Subsets are split as mask = high * 2**LOW_SOURCES + low (see mixit_l1): the program's `high` bits pick
    # which of the high sources join every sum, the low sources are enumerated in registers. The `worker`
    # programs of a row stride over its tiles: the launch is one wave of equal programs (see mixit_l1).
    high = tl.program_id(0)
    worker = tl.program_id(1)
    row = tl.program_id(2)
    num_workers = tl.num_programs(1)
    NUM_LOW_MASKS: tl.constexpr = 1 << LOW_SOURCES
    NUM_MASKS: tl.constexpr = 1 << NUM_SOURCES
    NEED_Y: tl.constexpr = USE_L1 or USE_CONSISTENCY or USE_MIXIT

    low_masks = tl.arange(0, NUM_LOW_MASKS)
    mix_rows = tl.arange(0, MIXTURES)
    offsets = tl.arange(0, BLOCK_D)
    row_offset = row.to(tl.int64) * NUM_SOURCES * D
    if USE_MIXIT:
        pair = tl.load(pair_ptr + row)

    acc_mix = tl.zeros((MIXTURES, NUM_LOW_MASKS, BLOCK_D), ACC_DTYPE)
    acc_l1 = tl.zeros((BLOCK_D,), ACC_DTYPE)
    acc_consistency = tl.zeros((BLOCK_D,), ACC_DTYPE)
    acc_teacher = tl.zeros((BLOCK_D,), ACC_DTYPE)
    for start in tl.range(worker * BLOCK_D, D, num_workers * BLOCK_D, num_stages=LOOP_STAGES):
        d = start + offsets
        in_bounds = d < D
        # -0.0 is the additive identity that the compiler may fold away (x + -0.0 == x for every x).
        sums = tl.full((NUM_LOW_MASKS, BLOCK_D), -0.0, ACC_DTYPE)
        mix = tl.full((MIXTURES, BLOCK_D), -0.0, ACC_DTYPE)
        est_total = tl.full((BLOCK_D,), -0.0, ACC_DTYPE)
        y_total = tl.full((BLOCK_D,), -0.0, ACC_DTYPE)
        for s in tl.static_range(NUM_SOURCES):
            # Out-of-bounds lanes load 0 everywhere, so every term adds exactly 0 there.
            x = tl.load(est_ptr + row_offset + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
            if SOURCE_WEIGHTED:
                weight = tl.load(source_weights_ptr + s).to(ACC_DTYPE)
            if NEED_Y:
                y = tl.load(y_ptr + row_offset + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
            if USE_L1:
                if SOURCE_WEIGHTED:
                    acc_l1 += weight * tl.abs(x - y)
                else:
                    acc_l1 += tl.abs(x - y)
            if USE_TEACHER:
                t = tl.load(teacher_ptr + row_offset + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
                if SOURCE_WEIGHTED:
                    acc_teacher += weight * tl.abs(x - t)
                else:
                    acc_teacher += tl.abs(x - t)
            if USE_CONSISTENCY:
                est_total += x
                y_total += y
            if USE_MIXIT:
                # The noisy stem joins mixture 0 when its pairing bit is set, mixture 1 otherwise.
                target_mixture = 1 - ((pair >> s) & 1)
                mix += tl.where((mix_rows == target_mixture)[:, None], y[None, :], -0.0)
                if s < LOW_SOURCES:
                    sums += tl.where((((low_masks >> s) & 1) != 0)[:, None], x[None, :], -0.0)
                else:
                    sums += tl.where(((high >> (s - LOW_SOURCES)) & 1) != 0, x, -0.0)[None, :]
        if USE_MIXIT:
            acc_mix += tl.abs(sums[None, :, :] - mix[:, None, :])
        if USE_CONSISTENCY:
            acc_consistency += tl.abs(est_total - y_total)

    part = row * num_workers + worker
    if USE_MIXIT:
        partial = tl.sum(acc_mix, axis=2)
        out = mix_partials_ptr + part * (MIXTURES * NUM_MASKS)
        tl.store(out + mix_rows[:, None] * NUM_MASKS + high * NUM_LOW_MASKS + low_masks[None, :], partial)
    # Every `high` program sees the same elements: only the first reports the elementwise terms.
    first = high == 0
    tl.store(term_partials_ptr + part * 3 + 0, tl.sum(acc_l1, axis=0), mask=first)
    tl.store(term_partials_ptr + part * 3 + 1, tl.sum(acc_consistency, axis=0), mask=first)
    tl.store(term_partials_ptr + part * 3 + 2, tl.sum(acc_teacher, axis=0), mask=first)


@triton.jit
def _combine_terms_kernel(
    row_loss_ptr, term_partials_ptr, terms_ptr, loss_ptr,
    batch, num_parts, D,
    weight_l1, weight_consistency, weight_mixit, weight_teacher, divisor,
    NUM_SOURCES: tl.constexpr, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr,
    USE_L1: tl.constexpr, USE_CONSISTENCY: tl.constexpr, USE_MIXIT: tl.constexpr, USE_TEACHER: tl.constexpr,
    SOURCE_WEIGHTED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    l1 = tl.zeros((BLOCK,), ACC_DTYPE)
    consistency = tl.zeros((BLOCK,), ACC_DTYPE)
    teacher = tl.zeros((BLOCK,), ACC_DTYPE)
    for first in range(0, num_parts, BLOCK):
        part = first + lanes
        valid = part < num_parts
        l1 += tl.load(term_partials_ptr + part * 3 + 0, mask=valid, other=0.0)
        consistency += tl.load(term_partials_ptr + part * 3 + 1, mask=valid, other=0.0)
        teacher += tl.load(term_partials_ptr + part * 3 + 2, mask=valid, other=0.0)
    mixit = tl.zeros((BLOCK,), ACC_DTYPE)
    if USE_MIXIT:
        for first in range(0, batch, BLOCK):
            rows = first + lanes
            mixit += tl.load(row_loss_ptr + rows, mask=rows < batch, other=0.0)
    # Counts are formed in the accumulation dtype: exact, however large B * D grows.
    count = _as_acc(batch, ACC_DTYPE) * _as_acc(D, ACC_DTYPE)
    source_count = count if SOURCE_WEIGHTED else count * NUM_SOURCES
    l1_value = tl.sum(l1, axis=0) / source_count
    consistency_value = tl.sum(consistency, axis=0) / count
    mixit_value = tl.sum(mixit, axis=0) / _as_acc(batch, ACC_DTYPE)
    teacher_value = tl.sum(teacher, axis=0) / source_count
    loss = tl.zeros((), ACC_DTYPE)
    if USE_L1:
        loss += _float_acc(weight_l1, ACC_DTYPE) * l1_value
    if USE_CONSISTENCY:
        loss += _float_acc(weight_consistency, ACC_DTYPE) * consistency_value
    if USE_MIXIT:
        loss += _float_acc(weight_mixit, ACC_DTYPE) * mixit_value
    if USE_TEACHER:
        loss += _float_acc(weight_teacher, ACC_DTYPE) * teacher_value
    tl.store(terms_ptr + 0, l1_value)
    tl.store(terms_ptr + 1, consistency_value)
    tl.store(terms_ptr + 2, mixit_value)
    tl.store(terms_ptr + 3, teacher_value)
    tl.store(loss_ptr, loss / _float_acc(divisor, ACC_DTYPE))


@triton.jit
def _noise_robust_backward_kernel(
    grad_loss_ptr, est_ptr, y_ptr, teacher_ptr, pair_ptr, source_weights_ptr, masks_ptr, best_ptr, grad_est_ptr,
    D, batch, weight_l1, weight_consistency, weight_mixit, weight_teacher, divisor,
    NUM_SOURCES: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
    USE_L1: tl.constexpr, USE_CONSISTENCY: tl.constexpr, USE_MIXIT: tl.constexpr, USE_TEACHER: tl.constexpr,
    SOURCE_WEIGHTED: tl.constexpr,
):
    block = tl.program_id(0)
    row = tl.program_id(1)
    d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    in_bounds = d < D
    mix_rows = tl.arange(0, MIXTURES)
    row_offset = row.to(tl.int64) * NUM_SOURCES * D

    scale = tl.load(grad_loss_ptr).to(ACC_DTYPE) / _float_acc(divisor, ACC_DTYPE)
    count = _as_acc(batch, ACC_DTYPE) * _as_acc(D, ACC_DTYPE)
    source_count = count if SOURCE_WEIGHTED else count * NUM_SOURCES
    coef_l1 = scale * _float_acc(weight_l1, ACC_DTYPE) / source_count
    coef_teacher = scale * _float_acc(weight_teacher, ACC_DTYPE) / source_count
    coef_consistency = scale * _float_acc(weight_consistency, ACC_DTYPE) / count
    coef_mixit = scale * _float_acc(weight_mixit, ACC_DTYPE) / (count * MIXTURES)

    if USE_MIXIT or USE_CONSISTENCY:
        # The signs every source shares: the consistency error and the chosen candidate's mixture errors.
        if USE_MIXIT:
            pair = tl.load(pair_ptr + row)
            best = tl.load(best_ptr + row)
            chosen = tl.load(masks_ptr + best * MIXTURES + mix_rows)
        sums = tl.full((MIXTURES, BLOCK_D), -0.0, ACC_DTYPE)
        mix = tl.full((MIXTURES, BLOCK_D), -0.0, ACC_DTYPE)
        est_total = tl.full((BLOCK_D,), -0.0, ACC_DTYPE)
        y_total = tl.full((BLOCK_D,), -0.0, ACC_DTYPE)
        for s in tl.static_range(NUM_SOURCES):
            x = tl.load(est_ptr + row_offset + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
            y = tl.load(y_ptr + row_offset + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
            if USE_CONSISTENCY:
                est_total += x
                y_total += y
            if USE_MIXIT:
                target_mixture = 1 - ((pair >> s) & 1)
                mix += tl.where((mix_rows == target_mixture)[:, None], y[None, :], -0.0)
                sums += tl.where((((chosen >> s) & 1) != 0)[:, None], x[None, :], -0.0)
        mixture_sign = _sign(sums - mix)
        consistency_grad = coef_consistency * _sign(est_total - y_total)

    grad_row = grad_est_ptr + row_offset
    for s in tl.static_range(NUM_SOURCES):
        grad = tl.zeros((BLOCK_D,), ACC_DTYPE)
        if USE_L1 or USE_TEACHER:
            x = tl.load(est_ptr + row_offset + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
            source_grad = tl.zeros((BLOCK_D,), ACC_DTYPE)
            if USE_L1:
                y = tl.load(y_ptr + row_offset + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
                source_grad += coef_l1 * _sign(x - y)
            if USE_TEACHER:
                t = tl.load(teacher_ptr + row_offset + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
                source_grad += coef_teacher * _sign(x - t)
            if SOURCE_WEIGHTED:
                source_grad *= tl.load(source_weights_ptr + s).to(ACC_DTYPE)
            grad += source_grad
        if USE_CONSISTENCY:
            grad += consistency_grad
        if USE_MIXIT:
            grad += coef_mixit * tl.sum(tl.where((((chosen >> s) & 1) != 0)[:, None], mixture_sign, 0.0), axis=0)
        tl.store(grad_row + s * D + d, grad.to(grad_est_ptr.dtype.element_ty), mask=in_bounds)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_TL_ACC = {torch.float64: tl.float64}


def _acc_dtype(dtype: torch.dtype):
    return _TL_ACC.get(dtype, tl.float32)


def _flags(weights, teacher: torch.Tensor, source_weights: torch.Tensor) -> dict:
    use = [weight != 0 for weight in weights]
    return dict(USE_L1=use[0], USE_CONSISTENCY=use[1], USE_MIXIT=use[2], USE_TEACHER=use[3] and teacher.numel() > 0,
                SOURCE_WEIGHTED=source_weights.numel() > 0)


# Tile settings of the partials kernel (benchmarks/noise_robust_gpu.py --tune times alternatives).
# With the MixIT search, the subset sums and accumulators live in registers, 3 * 2**low values per element a
# thread holds, beside the term accumulators: at 4 sources (48 values) one element per thread avoids spills
# (the core op measured 2 elements per thread at 4 sources 2.5x slower on an H200).
PARTIALS_WARPS = 4
PARTIALS_MIXIT_VALUES_PER_THREAD = 48
PARTIALS_ELEMENTWISE_PER_THREAD = 8
# Tiles whose loads are in flight at once (see mixit_l1.PARTIALS_STAGES): compiled for sm_90 without spills at 2-4,
# not yet timed; benchmarks/noise_robust_gpu.py --tune sweeps it on a GPU.
PARTIALS_STAGES = 1

_partials_plans: dict = {}


def _partials_plan(inputs: tuple, flags: dict) -> dict:
    """Grid and constexprs of the partials kernel for these inputs' shape, dtypes and device and this term set.

    ``inputs``: the kernel's first five arguments (est, targets, teacher, pair_masks, source_weights, with
    stand-ins as launched).
    """
    est = inputs[0]
    key = (tuple(est.shape), tuple(x.dtype for x in inputs), est.device, tuple(flags.items()))
    plan = _partials_plans.get(key)
    if plan is not None:
        return plan
    batch, num_sources, length = est.shape
    if flags["USE_MIXIT"]:
        low_sources = min(num_sources, 5)
        elements_per_thread = max(1, min(4, PARTIALS_MIXIT_VALUES_PER_THREAD // (3 << low_sources)))
    else:
        low_sources, elements_per_thread = 0, PARTIALS_ELEMENTWISE_PER_THREAD
    highs = 1 << (num_sources - low_sources) if flags["USE_MIXIT"] else 1
    block_d = 32 * PARTIALS_WARPS * elements_per_thread
    kwargs = dict(NUM_SOURCES=num_sources, LOW_SOURCES=low_sources, BLOCK_D=block_d, ACC_DTYPE=_acc_dtype(est.dtype),
                  LOOP_STAGES=PARTIALS_STAGES, num_warps=PARTIALS_WARPS, **flags)
    # One wave of equal programs, as the core op's partials (measured there); never more workers than tiles.
    stand_in = est.new_empty(0, dtype=row_loss_dtype(est.dtype))
    wave = programs_per_wave(_noise_robust_partials_kernel, (*inputs, stand_in, stand_in, length), kwargs, est.device)
    num_workers = max(1, min(triton.cdiv(length, block_d), wave // (batch * highs)))
    plan = dict(grid=(highs, num_workers, batch), kwargs=kwargs)
    _partials_plans[key] = plan
    return plan


def triton_forward(est, targets, teacher, pair_masks, source_weights, weights, divisor):
    dispatch.check_triton_runnable(est)
    batch, num_sources, length = est.shape
    acc_dtype = row_loss_dtype(est.dtype)
    flags = _flags(weights, teacher, source_weights)
    # Unused pointers still need a tensor: est stands in for them, never read.
    inputs = (est, targets, teacher if flags["USE_TEACHER"] else est, pair_masks,
              source_weights if flags["SOURCE_WEIGHTED"] else est)
    plan = _partials_plan(inputs, flags)
    num_workers = plan["grid"][1]
    term_partials = torch.empty(batch, num_workers, 3, dtype=acc_dtype, device=est.device)
    # Without the MixIT term no partials are written: term_partials stands in as the (unused) pointer.
    mix_partials = (torch.empty(batch, num_workers, NUM_MIXTURES, 1 << num_sources, dtype=acc_dtype,
                                device=est.device) if flags["USE_MIXIT"] else term_partials)
    _noise_robust_partials_kernel[plan["grid"]](*inputs, mix_partials, term_partials, length, **plan["kwargs"])
    if flags["USE_MIXIT"]:
        row_loss = torch.empty(batch, dtype=acc_dtype, device=est.device)
        best = torch.empty(batch, dtype=torch.int64, device=est.device)
        select_best(mix_partials, row_loss, best, num_sources, "generalized", length)
    else:
        row_loss, best = term_partials, torch.zeros(batch, dtype=torch.int64, device=est.device)
    terms = torch.empty(len(TERM_NAMES), dtype=acc_dtype, device=est.device)
    loss = torch.empty((), dtype=acc_dtype, device=est.device)
    _combine_terms_kernel[(1,)](
        row_loss, term_partials, terms, loss,
        batch, batch * num_workers, length, *[float(w) for w in weights], float(divisor),
        NUM_SOURCES=num_sources, BLOCK=min(1024, triton.next_power_of_2(max(batch * num_workers, batch))),
        ACC_DTYPE=_acc_dtype(est.dtype), **flags,
    )
    return loss, terms, best


# One program per (row, tile): it re-reads every source tile of est, targets and teacher targets once.
# One element per thread, many warps: the setting the core op's backward measured best on an H200
# (512 x 16 warps at 93% of copy bandwidth, 1024 x 4 at 75%); benchmarks/noise_robust_gpu.py --tune rechecks it.
BACKWARD_BLOCK_D = 512
BACKWARD_WARPS = 16


def triton_backward(grad_loss, est, targets, teacher, pair_masks, source_weights, best, weights, divisor):
    dispatch.check_triton_runnable(est)
    batch, num_sources, length = est.shape
    flags = _flags(weights, teacher, source_weights)
    grad_est = torch.empty_like(est)
    block_d = BACKWARD_BLOCK_D
    _noise_robust_backward_kernel[(triton.cdiv(length, block_d), batch)](
        grad_loss, est, targets, teacher if flags["USE_TEACHER"] else est, pair_masks,
        source_weights if flags["SOURCE_WEIGHTED"] else est,
        candidate_masks(num_sources, NUM_MIXTURES, "generalized", est.device), best, grad_est,
        length, batch, *[float(w) for w in weights], float(divisor),
        NUM_SOURCES=num_sources, BLOCK_D=block_d, ACC_DTYPE=_acc_dtype(est.dtype), num_warps=BACKWARD_WARPS,
        **flags,
    )
    return grad_est


register_backend("triton", triton_forward, triton_backward)


# ----------------------------------------------------------------------------------------------
# torch.library ops and autograd
# ----------------------------------------------------------------------------------------------


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
    forward, _ = _BACKENDS[impl]
    return forward(est, targets, teacher, pair_masks, source_weights, weights, divisor)


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
    _, backward = _BACKENDS[impl]
    return backward(grad_loss.contiguous(), est, targets, teacher, pair_masks, source_weights, best, weights,
                    divisor)


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


def _backward(ctx, grad_loss, _grad_terms, _grad_best):
    est, targets, teacher, pair_masks, source_weights, best = ctx.saved_tensors
    grad_est = None
    if ctx.needs_input_grad[0]:
        grad_est = noise_robust_l1_backward(grad_loss, est, targets, teacher, pair_masks, source_weights, best,
                                            ctx.weights, ctx.divisor, ctx.impl)
    return grad_est, None, None, None, None, None, None, None


noise_robust_l1.register_autograd(_backward, setup_context=_setup_context)
