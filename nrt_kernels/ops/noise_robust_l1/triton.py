"""Triton backend of the fused noise-robust loss (iSeparate-SDX V1/V2): L1 + consistency + MixIT + teacher L1.

Inputs, flattened and contiguous: est ``(B, S, D)``, noisy targets ``(B, S, D)``, teacher targets ``(B, S, D)``
(empty when the teacher term is off), ``pair_masks`` ``(B,)`` int32 (bit ``s`` set: noisy stem ``s`` goes into
mixture 0, the others into mixture 1) and optional normalised per-source weights ``(S,)``.

Forward, three launches:

1. ``_noise_robust_partials_kernel``: a program owns one row, an even, strided share of its tiles of ``D``
   (the launch is one wave, sized from the compiled kernel's registers) and one block of source subsets (as
   the MixIT L1 op).  It reads every source tile of est, targets and teacher targets once and
   accumulates, in registers, the two mixtures of the pairing (formed from the targets), every subset sum of
   est against both mixtures (the MixIT search, ``2 * 2**S`` partials), ``|est - y|``, ``|sum est - sum y|`` and
   ``|est - teacher|``.  It writes the MixIT partials in ``mixit_l1``'s layout and three term partials per program.
2. ``mixit_l1.triton.select_best`` (shared with the core op): per row, the best candidate and its row loss.
3. ``_combine_terms_kernel``: one program sums the term partials in a fixed order (deterministic) and writes
   the four term values and the weighted, normalised loss.

Backward, one launch: ``_noise_robust_backward_kernel`` re-reads est, targets and teacher targets and writes
``grad_est``, the sum of every active term's gradient.

A term whose weight is 0 is a ``constexpr`` flag: its inputs are never read and its arithmetic is compiled out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ... import backends
from ...assignments import candidate_masks
from .._operands import row_loss_dtype
from .._triton_launch import PlanCache, acc_dtype, check_runnable, programs_per_wave, sign
from ..mixit_l1.triton import BackwardConfig, select_best
from . import NUM_MIXTURES, TERM_NAMES

MIXTURES = tl.constexpr(NUM_MIXTURES)  # the kernels' copy: globals read inside @triton.jit must be constexprs


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


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
        mixture_sign = sign(sums - mix)
        consistency_grad = coef_consistency * sign(est_total - y_total)

    grad_row = grad_est_ptr + row_offset
    for s in tl.static_range(NUM_SOURCES):
        grad = tl.zeros((BLOCK_D,), ACC_DTYPE)
        if USE_L1 or USE_TEACHER:
            x = tl.load(est_ptr + row_offset + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
            source_grad = tl.zeros((BLOCK_D,), ACC_DTYPE)
            if USE_L1:
                y = tl.load(y_ptr + row_offset + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
                source_grad += coef_l1 * sign(x - y)
            if USE_TEACHER:
                t = tl.load(teacher_ptr + row_offset + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
                source_grad += coef_teacher * sign(x - t)
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

def _flags(weights, teacher: torch.Tensor, source_weights: torch.Tensor) -> dict:
    use = [weight != 0 for weight in weights]
    return dict(USE_L1=use[0], USE_CONSISTENCY=use[1], USE_MIXIT=use[2], USE_TEACHER=use[3] and teacher.numel() > 0,
                SOURCE_WEIGHTED=source_weights.numel() > 0)


@dataclass(frozen=True)
class PartialsConfig:
    """Tile settings of the partials kernel (benchmarks/noise_robust_gpu.py --tune times alternatives).

    With the MixIT search, the subset sums and accumulators live in registers, 3 * 2**low values per element a
    thread holds, beside the term accumulators: at 4 sources (48 values) one element per thread avoids spills
    (the core op measured 2 elements per thread at 4 sources 2.5x slower on an H200). ``loop_stages``: tiles
    whose loads are in flight at once (see mixit_l1.triton.PartialsConfig), compiled for sm_90 without spills at
    2-4, not yet timed."""

    num_warps: int = 4
    mixit_values_per_thread: int = 48
    elementwise_per_thread: int = 8
    loop_stages: int = 1


_partials_plans = PlanCache()


def partials_plan(inputs: tuple, flags: dict, config: PartialsConfig) -> dict:
    """Grid and constexprs of the partials kernel for these inputs' shape, dtypes and device and this term set.

    ``inputs``: the kernel's first five arguments (est, targets, teacher, pair_masks, source_weights, with
    stand-ins as launched).
    """
    est = inputs[0]
    key = (tuple(est.shape), tuple(x.dtype for x in inputs), est.device, tuple(flags.items()), config)
    return _partials_plans.get(key, lambda: _make_partials_plan(inputs, flags, config))


def _make_partials_plan(inputs: tuple, flags: dict, config: PartialsConfig) -> dict:
    est = inputs[0]
    batch, num_sources, length = est.shape
    if flags["USE_MIXIT"]:
        low_sources = min(num_sources, 5)
        elements_per_thread = max(1, min(4, config.mixit_values_per_thread // (3 << low_sources)))
    else:
        low_sources, elements_per_thread = 0, config.elementwise_per_thread
    highs = 1 << (num_sources - low_sources) if flags["USE_MIXIT"] else 1
    block_d = 32 * config.num_warps * elements_per_thread
    kwargs = dict(NUM_SOURCES=num_sources, LOW_SOURCES=low_sources, BLOCK_D=block_d, ACC_DTYPE=acc_dtype(est.dtype),
                  LOOP_STAGES=config.loop_stages, num_warps=config.num_warps, **flags)
    # One wave of equal programs, as the core op's partials (measured there); never more workers than tiles.
    stand_in = est.new_empty(0, dtype=row_loss_dtype(est.dtype))
    wave = programs_per_wave(_noise_robust_partials_kernel, (*inputs, stand_in, stand_in, length), kwargs, est.device)
    num_workers = max(1, min(triton.cdiv(length, block_d), wave // (batch * highs)))
    return dict(grid=(highs, num_workers, batch), kwargs=kwargs)


def forward(est, targets, teacher, pair_masks, source_weights, weights, divisor,
            config: PartialsConfig = PartialsConfig()):
    check_runnable(est)
    batch, num_sources, length = est.shape
    loss_dtype = row_loss_dtype(est.dtype)
    flags = _flags(weights, teacher, source_weights)
    # Unused pointers still need a tensor: est stands in for them, never read.
    inputs = (est, targets, teacher if flags["USE_TEACHER"] else est, pair_masks,
              source_weights if flags["SOURCE_WEIGHTED"] else est)
    plan = partials_plan(inputs, flags, config)
    num_workers = plan["grid"][1]
    term_partials = torch.empty(batch, num_workers, 3, dtype=loss_dtype, device=est.device)
    # Without the MixIT term no partials are written: term_partials stands in as the (unused) pointer.
    mix_partials = (torch.empty(batch, num_workers, NUM_MIXTURES, 1 << num_sources, dtype=loss_dtype,
                                device=est.device) if flags["USE_MIXIT"] else term_partials)
    _noise_robust_partials_kernel[plan["grid"]](*inputs, mix_partials, term_partials, length, **plan["kwargs"])
    if flags["USE_MIXIT"]:
        row_loss = torch.empty(batch, dtype=loss_dtype, device=est.device)
        best = torch.empty(batch, dtype=torch.int64, device=est.device)
        select_best(mix_partials, row_loss, best, num_sources, "generalized", length)
    else:
        row_loss, best = term_partials, torch.zeros(batch, dtype=torch.int64, device=est.device)
    terms = torch.empty(len(TERM_NAMES), dtype=loss_dtype, device=est.device)
    loss = torch.empty((), dtype=loss_dtype, device=est.device)
    _combine_terms_kernel[(1,)](
        row_loss, term_partials, terms, loss,
        batch, batch * num_workers, length, *[float(w) for w in weights], float(divisor),
        NUM_SOURCES=num_sources, BLOCK=min(1024, triton.next_power_of_2(max(batch * num_workers, batch))),
        ACC_DTYPE=acc_dtype(est.dtype), **flags,
    )
    return loss, terms, best


# One program per (row, tile): it re-reads every source tile of est, targets and teacher targets once. The core
# op's measured backward config (one element per thread, many warps); benchmarks/noise_robust_gpu.py --tune
# rechecks it.
def backward(grad_loss, est, targets, teacher, pair_masks, source_weights, best, weights, divisor,
             config: BackwardConfig = BackwardConfig()):
    check_runnable(est)
    batch, num_sources, length = est.shape
    flags = _flags(weights, teacher, source_weights)
    grad_est = torch.empty_like(est)
    _noise_robust_backward_kernel[(triton.cdiv(length, config.block_d), batch)](
        grad_loss, est, targets, teacher if flags["USE_TEACHER"] else est, pair_masks,
        source_weights if flags["SOURCE_WEIGHTED"] else est,
        candidate_masks(num_sources, NUM_MIXTURES, "generalized", est.device), best, grad_est,
        length, batch, *[float(w) for w in weights], float(divisor),
        NUM_SOURCES=num_sources, BLOCK_D=config.block_d, ACC_DTYPE=acc_dtype(est.dtype), num_warps=config.num_warps,
        **flags,
    )
    return grad_est


backends.register("noise_robust_l1", "triton", backends.Kernel(forward, backward))


