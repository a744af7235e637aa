"""Triton backend of the Gram-metric MixIT op: the kernels and their launchers (the algorithm, its accuracy and
the selection margin are in the package docstring).

Forward, per call (est ``(B, M, D)``, mixtures ``(B, N, D)``, flattened and contiguous; ``K = M + N + 1`` signals
``[e_1..e_M, x_1..x_N, 1]``):

1. ``_gram_partials_kernel``, grid (workers, B): each program strides over an even share of a row's tiles of
   ``D``, loads the ``K`` signals' tile once, converts it to float64 and accumulates the tile's Gram with
   ``tl.dot`` in float64 (DMMA on sm_80+: exact products of float32/half inputs, float64 sums).  It stores the
   upper triangle, ``K (K + 1) / 2`` values; the launch is one wave, capped so the partials stay below
   :data:`GramConfig.max_partials_bytes`.
2. ``_gram_reduce_kernel``, grid (B,): adds the workers' partials in a fixed order (bitwise identical from run to
   run) into the symmetric (B, K, K) Gram.
3. ``_search_kernel``, grid (blocks, B): a program scores ``block_c`` candidates from the Gram alone (per mixture
   ``Q``, ``X``, ``S`` are masked sums of Gram entries) and keeps the first minimum of its block (NaN first).
4. ``_finish_kernel``, grid (B,): merges the blocks in candidate order and writes the row loss (the minimum),
   ``best`` and the derivative of the row loss with respect to the chosen candidate's statistics (B, N, 5).

Backward: ``_gram_backward_kernel``, grid (tiles, B), reads est and mixtures once, forms each mixture's remix ``r``
in float64 and writes ``g (2 dQ r + dX x + dS)`` to its sources (``g (dX r + 2 dXX x + dT)`` to the mixture).

Scalars the kernels use in float64 (signal length, eps, tau, ln 10) travel in a small float64 tensor kept in the
launch plan: Triton passes Python floats as float32, which would round eps and tau.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ... import backends
from ...assignments import candidate_masks, num_candidates
from .. import _triton_launch
from .._operands import row_loss_dtype
from .._triton_launch import PlanCache, check_runnable, programs_per_wave
from . import OP, STATISTICS

# The index a lane holds before it has seen a candidate: above every real one (at most 65536).
_NO_CANDIDATE = tl.constexpr(2147483647)

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gram_partials_kernel(
    est_ptr, mix_ptr, partials_ptr, D,
    NUM_SOURCES: tl.constexpr, NUM_MIXTURES: tl.constexpr, SIGNAL_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    worker = tl.program_id(0)
    row = tl.program_id(1)
    num_workers = tl.num_programs(0)
    NUM_SIGNALS: tl.constexpr = NUM_SOURCES + NUM_MIXTURES + 1
    NUM_ENTRIES: tl.constexpr = NUM_SIGNALS * (NUM_SIGNALS + 1) // 2

    signal = tl.arange(0, SIGNAL_PAD)
    is_est = signal < NUM_SOURCES
    is_mix = (signal >= NUM_SOURCES) & (signal < NUM_SOURCES + NUM_MIXTURES)
    is_one = signal == NUM_SOURCES + NUM_MIXTURES
    est_rows = est_ptr + row.to(tl.int64) * NUM_SOURCES * D + tl.where(is_est, signal, 0).to(tl.int64) * D
    mix_rows = (mix_ptr + row.to(tl.int64) * NUM_MIXTURES * D
                + tl.where(is_mix, signal - NUM_SOURCES, 0).to(tl.int64) * D)
    offsets = tl.arange(0, BLOCK_D)

    gram = tl.zeros((SIGNAL_PAD, SIGNAL_PAD), tl.float64)
    for start in tl.range(worker * BLOCK_D, D, num_workers * BLOCK_D):
        d = start + offsets
        in_bounds = (d < D)[None, :]
        e = tl.load(est_rows[:, None] + d[None, :], mask=is_est[:, None] & in_bounds, other=0.0)
        x = tl.load(mix_rows[:, None] + d[None, :], mask=is_mix[:, None] & in_bounds, other=0.0)
        # One row per signal (padding rows and lanes past D are 0); the constant row makes the sums Gram entries.
        signals = e.to(tl.float64) + x.to(tl.float64) + tl.where(is_one[:, None] & in_bounds, 1.0, 0.0)
        gram = tl.dot(signals, tl.trans(signals), gram)

    i = signal[:, None]
    j = signal[None, :]
    packed = i * NUM_SIGNALS - (i * (i - 1)) // 2 + (j - i)
    out = partials_ptr + (row * num_workers + worker).to(tl.int64) * NUM_ENTRIES
    tl.store(out + packed, gram, mask=(i <= j) & (j < NUM_SIGNALS))


@triton.jit
def _gram_reduce_kernel(partials_ptr, gram_ptr, num_workers, NUM_SIGNALS: tl.constexpr, SIGNAL_PAD: tl.constexpr):
    row = tl.program_id(0)
    NUM_ENTRIES: tl.constexpr = NUM_SIGNALS * (NUM_SIGNALS + 1) // 2
    i = tl.arange(0, SIGNAL_PAD)[:, None]
    j = tl.arange(0, SIGNAL_PAD)[None, :]
    low = tl.minimum(i, j)
    high = tl.maximum(i, j)
    inside = (i < NUM_SIGNALS) & (j < NUM_SIGNALS)
    packed = low * NUM_SIGNALS - (low * (low - 1)) // 2 + (high - low)
    rows = partials_ptr + row.to(tl.int64) * num_workers * NUM_ENTRIES
    total = tl.load(rows + packed, mask=inside, other=0.0)
    for worker in range(1, num_workers):  # workers in increasing order: the same additions on every run
        total += tl.load(rows + worker * NUM_ENTRIES + packed, mask=inside, other=0.0)
    tl.store(gram_ptr + row * NUM_SIGNALS * NUM_SIGNALS + i * NUM_SIGNALS + j, total, mask=inside)


@triton.jit
def _subset_energy(gram_row, masks, chosen, sources, NUM_SOURCES: tl.constexpr, NUM_SIGNALS: tl.constexpr):
    """||sum of the chosen sources||^2 per lane: the sum of <e_i, e_j> over chosen i and j.

    Masked with where, never multiplied by 0/1: a NaN or Inf source then reaches only the subsets that hold it."""
    energy = tl.zeros(masks.shape, tl.float64)
    for i in tl.static_range(NUM_SOURCES):
        gram_i = tl.load(gram_row + i * NUM_SIGNALS + sources, mask=sources < NUM_SOURCES, other=0.0)
        row_sum = tl.sum(tl.where(chosen, gram_i[None, :], 0.0), axis=1)
        energy += tl.where(((masks >> i) & 1) != 0, row_sum, 0.0)
    return energy


@triton.jit
def _metric_term(energy, cross, target_energy, est_sum, target_sum, length, eps, tau, ln10,
                 METRIC: tl.constexpr, ZERO_MEAN: tl.constexpr):
    """One mixture's loss from its statistics: ops.mixit_gram.metric_row_loss, term for term."""
    if METRIC == "mse":
        error = energy - 2.0 * cross + target_energy
        term = tl.where(error < 0, 0.0, error) / length
    elif METRIC == "log_mse":
        error = energy - 2.0 * cross + target_energy
        term = 10.0 * tl.log(tl.where(error < 0, 0.0, error) + tau * target_energy + eps) / ln10
    else:
        if ZERO_MEAN:
            energy = energy - est_sum * est_sum / length
            cross = cross - est_sum * target_sum / length
            target_energy = target_energy - target_sum * target_sum / length
        if METRIC == "snr":
            signal = tl.zeros(energy.shape, tl.float64) + target_energy
            noise = energy - 2.0 * cross + target_energy
        else:
            scale = cross / (target_energy + eps)
            signal = scale * scale * target_energy
            if METRIC == "sisdr":
                noise = energy - 2.0 * scale * cross + scale * scale * target_energy
            else:
                noise = energy - 2.0 * cross + target_energy
        # `where`, not maximum: maximum(NaN, 0) is 0 on the GPU, and a NaN row must stay NaN.
        noise = tl.where(noise < 0, 0.0, noise)
        term = -10.0 * tl.log(signal / (noise + eps) + eps) / ln10
    return term


@triton.jit
def _metric_partials(energy, cross, target_energy, est_sum, target_sum, length, eps, tau, ln10,
                     METRIC: tl.constexpr, ZERO_MEAN: tl.constexpr):
    """d(_metric_term)/d(Q, X, XX, S, T): mixit_gram_cpu.cpp's metric_partials, term for term (the derivative
    autograd takes of metric_row_loss: an energy clamped at 0 passes no gradient, a NaN passes on)."""
    zero = tl.zeros(energy.shape, tl.float64)
    if METRIC == "mse" or METRIC == "log_mse":
        error = energy - 2.0 * cross + target_energy
        passes = tl.where(error < 0, 0.0, 1.0)
        if METRIC == "mse":
            scale = zero + 1.0 / length
            extra = zero
        else:
            scale = 10.0 / ln10 / (tl.where(error < 0, 0.0, error) + tau * target_energy + eps)
            extra = scale * tau
        d_energy = scale * passes
        d_cross = -2.0 * scale * passes
        d_target_energy = scale * passes + extra
        d_est_sum = zero
        d_target_sum = zero
    else:
        a = energy
        c = cross
        b = target_energy
        if ZERO_MEAN:
            a = a - est_sum * est_sum / length
            c = c - est_sum * target_sum / length
            b = b - target_sum * target_sum / length
        noise = a - 2.0 * c + b
        noise_c = zero - 2.0
        noise_b = zero + 1.0
        if METRIC == "snr":
            signal = b
            signal_c = zero
            signal_b = zero + 1.0
        else:
            energy_eps = b + eps
            scale = c / energy_eps
            signal = scale * scale * b
            signal_c = 2.0 * scale * b / energy_eps
            signal_b = scale * scale * (1.0 - 2.0 * b / energy_eps)
            if METRIC == "sisdr":
                noise = a - 2.0 * scale * c + scale * scale * b
                noise_c = -4.0 * scale + 2.0 * scale * b / energy_eps
                noise_b = scale * scale * (3.0 - 2.0 * b / energy_eps)
        passes = tl.where(noise < 0, 0.0, 1.0)
        denominator = tl.where(noise < 0, 0.0, noise) + eps
        ratio = signal / denominator
        weight = -10.0 / ln10 / ((ratio + eps) * denominator)
        d_energy = -weight * ratio * passes
        d_cross = weight * (signal_c - ratio * passes * noise_c)
        d_target_energy = weight * (signal_b - ratio * passes * noise_b)
        if ZERO_MEAN:
            d_est_sum = -(2.0 * est_sum * d_energy + target_sum * d_cross) / length
            d_target_sum = -(est_sum * d_cross + 2.0 * target_sum * d_target_energy) / length
        else:
            d_est_sum = zero
            d_target_sum = zero
    return d_energy, d_cross, d_target_energy, d_est_sum, d_target_sum


@triton.jit
def _search_kernel(
    gram_ptr, masks_ptr, params_ptr, block_loss_ptr, block_cand_ptr, num_candidates,
    NUM_SOURCES: tl.constexpr, NUM_MIXTURES: tl.constexpr, SOURCE_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
    METRIC: tl.constexpr, ZERO_MEAN: tl.constexpr,
):
    block = tl.program_id(0)
    row = tl.program_id(1)
    num_blocks = tl.num_programs(0)
    NUM_SIGNALS: tl.constexpr = NUM_SOURCES + NUM_MIXTURES + 1
    ONES: tl.constexpr = NUM_SOURCES + NUM_MIXTURES
    length = tl.load(params_ptr)
    eps = tl.load(params_ptr + 1)
    tau = tl.load(params_ptr + 2)
    ln10 = tl.load(params_ptr + 3)

    cand = block * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = cand < num_candidates
    sources = tl.arange(0, SOURCE_PAD)
    real_source = sources < NUM_SOURCES
    gram_row = gram_ptr + row.to(tl.int64) * NUM_SIGNALS * NUM_SIGNALS
    est_sums = tl.load(gram_row + sources * NUM_SIGNALS + ONES, mask=real_source, other=0.0)

    total = tl.zeros((BLOCK_C,), tl.float64)
    for n in tl.static_range(NUM_MIXTURES):
        masks = tl.load(masks_ptr + cand * NUM_MIXTURES + n, mask=valid, other=0)
        chosen = ((masks[:, None] >> sources[None, :]) & 1) != 0
        energy = _subset_energy(gram_row, masks, chosen, sources, NUM_SOURCES, NUM_SIGNALS)
        mix_cross = tl.load(gram_row + sources * NUM_SIGNALS + NUM_SOURCES + n, mask=real_source, other=0.0)
        cross = tl.sum(tl.where(chosen, mix_cross[None, :], 0.0), axis=1)
        est_sum = tl.sum(tl.where(chosen, est_sums[None, :], 0.0), axis=1)
        target_energy = tl.load(gram_row + (NUM_SOURCES + n) * NUM_SIGNALS + NUM_SOURCES + n)
        target_sum = tl.load(gram_row + (NUM_SOURCES + n) * NUM_SIGNALS + ONES)
        total += _metric_term(energy, cross, target_energy, est_sum, target_sum, length, eps, tau, ln10, METRIC,
                              ZERO_MEAN)
    loss = total / NUM_MIXTURES

    # The block's first NaN if any (torch.min: NaN wins), else its first minimum.
    is_nan = loss != loss
    first_nan = tl.min(tl.where(valid & is_nan, cand, _NO_CANDIDATE), axis=0)
    numbers = valid & ~is_nan
    min_loss = tl.min(tl.where(numbers, loss, float("inf")), axis=0)
    first_min = tl.min(tl.where(numbers & (loss == min_loss), cand, _NO_CANDIDATE), axis=0)
    has_nan = first_nan != _NO_CANDIDATE
    out = row * num_blocks + block
    tl.store(block_loss_ptr + out, tl.where(has_nan, float("nan"), min_loss))
    tl.store(block_cand_ptr + out, tl.where(has_nan, first_nan, first_min))


@triton.jit
def _finish_kernel(
    gram_ptr, masks_ptr, params_ptr, block_loss_ptr, block_cand_ptr, row_loss_ptr, best_ptr, dloss_ptr, num_blocks,
    NUM_SOURCES: tl.constexpr, NUM_MIXTURES: tl.constexpr, MIX_PAD: tl.constexpr, SOURCE_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr, NUM_STATISTICS: tl.constexpr, METRIC: tl.constexpr, ZERO_MEAN: tl.constexpr,
):
    row = tl.program_id(0)
    NUM_SIGNALS: tl.constexpr = NUM_SOURCES + NUM_MIXTURES + 1
    ONES: tl.constexpr = NUM_SOURCES + NUM_MIXTURES
    # Each lane keeps the first NaN, else the first minimum, of the blocks it sees (in increasing order); the
    # lanes are merged at the end by (NaN first, loss, candidate index).
    lanes = tl.arange(0, BLOCK_B)
    lane_nan = tl.zeros((BLOCK_B,), tl.int32)
    lane_loss = tl.full((BLOCK_B,), float("inf"), tl.float64)
    lane_cand = tl.full((BLOCK_B,), _NO_CANDIDATE, tl.int32)
    for start in range(0, num_blocks, BLOCK_B):
        blocks = start + lanes
        present = blocks < num_blocks
        loss = tl.load(block_loss_ptr + row * num_blocks + blocks, mask=present, other=float("inf"))
        cand = tl.load(block_cand_ptr + row * num_blocks + blocks, mask=present, other=_NO_CANDIDATE)
        is_nan = loss != loss
        seen_nan = lane_nan != 0
        better = present & ((lane_cand == _NO_CANDIDATE) | (is_nan & ~seen_nan)
                            | (~is_nan & ~seen_nan & (loss < lane_loss)))
        lane_nan = tl.where(better, is_nan.to(tl.int32), lane_nan)
        lane_loss = tl.where(better, loss, lane_loss)
        lane_cand = tl.where(better, cand, lane_cand)
    seen_nan = lane_nan != 0
    first_nan = tl.min(tl.where(seen_nan, lane_cand, _NO_CANDIDATE), axis=0)
    min_loss = tl.min(tl.where(seen_nan, float("inf"), lane_loss), axis=0)
    first_min = tl.min(tl.where(~seen_nan & (lane_loss == min_loss), lane_cand, _NO_CANDIDATE), axis=0)
    has_nan = first_nan != _NO_CANDIDATE
    best = tl.where(has_nan, first_nan, first_min)
    tl.store(best_ptr + row, best.to(tl.int64))
    tl.store(row_loss_ptr + row, tl.where(has_nan, float("nan"), min_loss).to(row_loss_ptr.dtype.element_ty))

    # The derivative of the row loss with respect to the chosen candidate's statistics, one lane per mixture.
    mixes = tl.arange(0, MIX_PAD)
    real_mix = mixes < NUM_MIXTURES
    sources = tl.arange(0, SOURCE_PAD)
    real_source = sources < NUM_SOURCES
    gram_row = gram_ptr + row.to(tl.int64) * NUM_SIGNALS * NUM_SIGNALS
    masks = tl.load(masks_ptr + best * NUM_MIXTURES + mixes, mask=real_mix, other=0)
    chosen = ((masks[:, None] >> sources[None, :]) & 1) != 0
    energy = _subset_energy(gram_row, masks, chosen, sources, NUM_SOURCES, NUM_SIGNALS)
    mix_cross = tl.load(gram_row + sources[None, :] * NUM_SIGNALS + NUM_SOURCES + mixes[:, None],
                        mask=real_source[None, :] & real_mix[:, None], other=0.0)
    cross = tl.sum(tl.where(chosen, mix_cross, 0.0), axis=1)
    est_sums = tl.load(gram_row + sources * NUM_SIGNALS + ONES, mask=real_source, other=0.0)
    est_sum = tl.sum(tl.where(chosen, est_sums[None, :], 0.0), axis=1)
    target_energy = tl.load(gram_row + (NUM_SOURCES + mixes) * NUM_SIGNALS + NUM_SOURCES + mixes, mask=real_mix,
                            other=0.0)
    target_sum = tl.load(gram_row + (NUM_SOURCES + mixes) * NUM_SIGNALS + ONES, mask=real_mix, other=0.0)
    d_energy, d_cross, d_target_energy, d_est_sum, d_target_sum = _metric_partials(
        energy, cross, target_energy, est_sum, target_sum, tl.load(params_ptr), tl.load(params_ptr + 1),
        tl.load(params_ptr + 2), tl.load(params_ptr + 3), METRIC, ZERO_MEAN)
    out = dloss_ptr + (row * NUM_MIXTURES + mixes) * NUM_STATISTICS
    tl.store(out, d_energy / NUM_MIXTURES, mask=real_mix)
    tl.store(out + 1, d_cross / NUM_MIXTURES, mask=real_mix)
    tl.store(out + 2, d_target_energy / NUM_MIXTURES, mask=real_mix)
    tl.store(out + 3, d_est_sum / NUM_MIXTURES, mask=real_mix)
    tl.store(out + 4, d_target_sum / NUM_MIXTURES, mask=real_mix)


@triton.jit
def _store_rounded(pointers, value, mask):
    # float64 -> float16/bfloat16 through float32, as the C++ kernels convert (the interpreter's direct float64 ->
    # bfloat16 cast is wrong); float64 is stored as it is.
    if pointers.dtype.element_ty == tl.float64:
        tl.store(pointers, value, mask=mask)
    else:
        tl.store(pointers, value.to(tl.float32).to(pointers.dtype.element_ty), mask=mask)


@triton.jit
def _gram_backward_kernel(
    grad_rows_ptr, dloss_ptr, est_ptr, mix_ptr, masks_ptr, best_ptr, grad_est_ptr, grad_mix_ptr, D,
    NUM_SOURCES: tl.constexpr, NUM_MIXTURES: tl.constexpr, MIX_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    MIXTURES_GRAD: tl.constexpr,
):
    block = tl.program_id(0)
    row = tl.program_id(1)
    d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    in_bounds = d < D
    mixes = tl.arange(0, MIX_PAD)
    real_mix = mixes < NUM_MIXTURES
    est_row = est_ptr + row.to(tl.int64) * NUM_SOURCES * D
    mix_row = mix_ptr + row.to(tl.int64) * NUM_MIXTURES * D

    best = tl.load(best_ptr + row)
    masks = tl.load(masks_ptr + best * NUM_MIXTURES + mixes, mask=real_mix, other=0)
    remix = tl.zeros((MIX_PAD, BLOCK_D), tl.float64)
    for s in tl.static_range(NUM_SOURCES):
        x = tl.load(est_row + s * D + d, mask=in_bounds, other=0.0).to(tl.float64)
        remix += tl.where((((masks >> s) & 1) != 0)[:, None], x[None, :], 0.0)
    mix = tl.load(mix_row + mixes[:, None] * D + d[None, :], mask=real_mix[:, None] & in_bounds[None, :],
                  other=0.0).to(tl.float64)
    # dQ/dr = 2 r, dX/dr = x, dS/dr = 1; dX/dx = r, dXX/dx = 2 x, dT/dx = 1.
    upstream = tl.load(grad_rows_ptr + row).to(tl.float64)
    dloss = dloss_ptr + (row * NUM_MIXTURES + mixes) * 5
    d_energy = tl.load(dloss, mask=real_mix, other=0.0)[:, None] * upstream
    d_cross = tl.load(dloss + 1, mask=real_mix, other=0.0)[:, None] * upstream
    d_est_sum = tl.load(dloss + 3, mask=real_mix, other=0.0)[:, None] * upstream
    grad = 2.0 * d_energy * remix + d_cross * mix + d_est_sum

    grad_est_row = grad_est_ptr + row.to(tl.int64) * NUM_SOURCES * D
    for s in tl.static_range(NUM_SOURCES):
        source_grad = tl.sum(tl.where((((masks >> s) & 1) != 0)[:, None], grad, 0.0), axis=0)
        _store_rounded(grad_est_row + s * D + d, source_grad, in_bounds)
    if MIXTURES_GRAD:
        d_target_energy = tl.load(dloss + 2, mask=real_mix, other=0.0)[:, None] * upstream
        d_target_sum = tl.load(dloss + 4, mask=real_mix, other=0.0)[:, None] * upstream
        grad_mix_row = grad_mix_ptr + row.to(tl.int64) * NUM_MIXTURES * D
        _store_rounded(grad_mix_row + mixes[:, None] * D + d[None, :],
                       d_cross * remix + 2.0 * d_target_energy * mix + d_target_sum,
                       real_mix[:, None] & in_bounds[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GramConfig:
    """The Gram pass: ``block_d`` elements per tile and program step; at most ``max_partials_bytes`` of per-program
    partials (the launch takes fewer workers than a wave rather than more memory: the issue's budget is 1 MiB
    beyond inputs and gradient).  Not yet timed on a GPU."""

    block_d: int = 64
    num_warps: int = 4
    max_partials_bytes: int = 512 * 1024


def default_gram_config(dtype: torch.dtype) -> GramConfig:
    # 2-byte inputs at 4 warps compiled with a stack frame for sm_90 (16-24 bytes, with 40-72 registers; ptxas 12.x,
    # tests/compile_check.py); at 2 warps without one.
    return GramConfig(num_warps=2 if dtype.itemsize == 2 else 4)


@dataclass(frozen=True)
class SearchConfig:
    """``block_c`` candidates per search program (the per-lane Gram sums of 128 candidates x 16 sources in float64
    fit the registers of 4 warps; 512 spill); ``merge_lanes`` lanes merge a row's block winners."""

    block_c: int = 128
    num_warps: int = 4
    merge_lanes: int = 128


def default_search_config() -> SearchConfig:
    # The interpreter runs a program's numpy operations at about the same cost whatever the block, and the tests
    # search up to 65536 candidates: it takes large blocks (few lanes, so the tests still merge several per lane).
    return SearchConfig(block_c=4096, merge_lanes=4) if _triton_launch.INTERPRETED else SearchConfig()


@dataclass(frozen=True)
class BackwardConfig:
    """One program per (row, tile of ``block_d``); float64 arithmetic on (N, block_d) remixes.  Not yet timed."""

    block_d: int = 512
    num_warps: int = 8


_plans = PlanCache()


def _signal_pad(num_signals: int) -> int:
    return max(16, triton.next_power_of_2(num_signals))  # tl.dot needs every dim >= 16


def _source_pad(num_sources: int) -> int:
    return max(2, triton.next_power_of_2(num_sources))


def _make_plan(est, mixtures, partitions, metric, zero_mean, eps, tau, gram_config, search_config) -> dict:
    batch, num_sources, length = est.shape
    num_mixtures = mixtures.shape[1]
    num_signals = num_sources + num_mixtures + 1
    num_entries = num_signals * (num_signals + 1) // 2
    gram_kwargs = dict(NUM_SOURCES=num_sources, NUM_MIXTURES=num_mixtures, SIGNAL_PAD=_signal_pad(num_signals),
                       BLOCK_D=gram_config.block_d, num_warps=gram_config.num_warps)
    wave = programs_per_wave(_gram_partials_kernel, (est, mixtures, est.new_empty(0, dtype=torch.float64), length),
                             gram_kwargs, est.device)
    budget = max(1, gram_config.max_partials_bytes // (8 * num_entries * batch))
    workers = max(1, min(triton.cdiv(length, gram_config.block_d), wave // batch, budget))
    count = num_candidates(num_sources, num_mixtures, partitions)
    block_c = min(search_config.block_c, triton.next_power_of_2(count))
    common = dict(NUM_SOURCES=num_sources, NUM_MIXTURES=num_mixtures, SOURCE_PAD=_source_pad(num_sources))
    return dict(
        workers=workers, num_entries=num_entries, num_signals=num_signals, count=count,
        num_blocks=triton.cdiv(count, block_c), gram_kwargs=gram_kwargs,
        reduce_kwargs=dict(NUM_SIGNALS=num_signals, SIGNAL_PAD=_signal_pad(num_signals), num_warps=4),
        search_kwargs=dict(**common, BLOCK_C=block_c, METRIC=metric, ZERO_MEAN=zero_mean,
                           num_warps=search_config.num_warps),
        finish_kwargs=dict(**common, MIX_PAD=triton.next_power_of_2(num_mixtures), BLOCK_B=search_config.merge_lanes,
                           NUM_STATISTICS=len(STATISTICS), METRIC=metric, ZERO_MEAN=zero_mean, num_warps=4),
        # float64 scalars for the kernels (length, eps, tau, ln 10), made once per plan (never during graph capture).
        params=torch.tensor([float(length), eps, tau, math.log(10.0)], dtype=torch.float64, device=est.device),
    )


def forward(est: torch.Tensor, mixtures: torch.Tensor, partitions: str, metric: str, zero_mean: bool, eps: float,
            tau: float, gram_config: GramConfig | None = None, search_config: SearchConfig | None = None):
    check_runnable(est)
    gram_config = gram_config or default_gram_config(est.dtype)
    search_config = search_config or default_search_config()
    key = (tuple(est.shape), mixtures.shape[1], est.dtype, est.device, partitions, metric, zero_mean, eps, tau,
           gram_config, search_config)
    plan = _plans.get(key, lambda: _make_plan(est, mixtures, partitions, metric, zero_mean, eps, tau, gram_config,
                                              search_config))
    batch, num_sources, length = est.shape
    num_mixtures = mixtures.shape[1]
    device = est.device
    partials = torch.empty(batch, plan["workers"], plan["num_entries"], dtype=torch.float64, device=device)
    _gram_partials_kernel[(plan["workers"], batch)](est, mixtures, partials, length, **plan["gram_kwargs"])
    gram = torch.empty(batch, plan["num_signals"], plan["num_signals"], dtype=torch.float64, device=device)
    _gram_reduce_kernel[(batch,)](partials, gram, plan["workers"], **plan["reduce_kwargs"])
    masks = candidate_masks(num_sources, num_mixtures, partitions, device)
    block_loss = torch.empty(batch, plan["num_blocks"], dtype=torch.float64, device=device)
    block_cand = torch.empty(batch, plan["num_blocks"], dtype=torch.int32, device=device)
    _search_kernel[(plan["num_blocks"], batch)](gram, masks, plan["params"], block_loss, block_cand, plan["count"],
                                                **plan["search_kwargs"])
    row_loss = torch.empty(batch, dtype=row_loss_dtype(est.dtype), device=device)
    best = torch.empty(batch, dtype=torch.int64, device=device)
    dloss = torch.empty(batch, num_mixtures, len(STATISTICS), dtype=torch.float64, device=device)
    _finish_kernel[(batch,)](gram, masks, plan["params"], block_loss, block_cand, row_loss, best, dloss,
                             plan["num_blocks"], **plan["finish_kwargs"])
    return row_loss, best, dloss


def backward(grad_rows, dloss, est, mixtures, best, partitions: str, mixtures_grad: bool,
             config: BackwardConfig = BackwardConfig()):
    check_runnable(est)
    batch, num_sources, length = est.shape
    num_mixtures = mixtures.shape[1]
    grad_est = torch.empty_like(est)
    grad_mix = torch.empty_like(mixtures) if mixtures_grad else None
    _gram_backward_kernel[(triton.cdiv(length, config.block_d), batch)](
        grad_rows, dloss, est, mixtures, candidate_masks(num_sources, num_mixtures, partitions, est.device), best,
        grad_est, grad_mix if mixtures_grad else grad_est, length,
        NUM_SOURCES=num_sources, NUM_MIXTURES=num_mixtures, MIX_PAD=triton.next_power_of_2(num_mixtures),
        BLOCK_D=config.block_d, MIXTURES_GRAD=mixtures_grad, num_warps=config.num_warps,
    )
    return grad_est, grad_mix


backends.register(OP, "triton", backends.Kernel(forward, backward))
