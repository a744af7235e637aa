"""Triton backend of the MixIT L1 op: the kernels and their launchers (see the package docstring for the algorithm).

Forward, per batch row ``b`` (est ``(B, M, D)``, mixtures ``(B, N, D)``, flattened and contiguous):

1. ``_subset_l1_partials_kernel``: a program owns one row, an even, strided share of its
   tiles of ``D`` (the launch is one wave, sized from the compiled kernel's registers) and
   one block of source subsets.  It loads the ``M`` source tiles and ``N`` mixture tiles
   once, forms the subset sums in registers and accumulates ``|subset_sum - mix_n|``
   for every (mixture, subset) pair.
2. ``_select_best_kernel`` (:func:`select_best`, shared with the noise-robust op): one program
   per row adds the per-program partials in a fixed order (bitwise identical from run to run),
   scores every candidate of ``nrt_kernels.assignments`` and keeps the first minimum (NaN
   beats numbers, like ``torch.min``).

Backward: ``_mixit_l1_backward_kernel`` reads est, mixtures and each row's chosen
candidate and writes ``grad_est = grad_row * sign(err of the source's mixture) / (N * D)``
(and ``-grad_row * sign(err) / (N * D)`` for the mixtures when they require grad).

Tile settings are arguments (:class:`PartialsConfig`, :class:`BackwardConfig`); the defaults are the measured ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ... import backends
from ...assignments import candidate_masks, num_candidates
from .._operands import reduced_rows, row_gradients, row_loss_dtype
from .._triton_launch import PlanCache, acc_dtype, check_runnable, programs_per_wave, sign

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _subset_l1_partials_kernel(
    est_ptr, mix_ptr, partials_ptr,
    D,
    NUM_SOURCES: tl.constexpr, NUM_MIXTURES: tl.constexpr, MIX_PAD: tl.constexpr,
    LOW_SOURCES: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    # Subsets are split as mask = high * 2**LOW_SOURCES + low: the program's `high` bits pick a
    # fixed base sum, the low sources are enumerated in registers (2**LOW_SOURCES at once).
    # The `worker` programs of a row stride over its blocks, so every program gets the same work and
    # the launch is sized to fit the GPU in one wave (no tail of half-empty waves).
    high = tl.program_id(0)
    worker = tl.program_id(1)
    row = tl.program_id(2)
    num_workers = tl.num_programs(1)
    NUM_LOW_MASKS: tl.constexpr = 1 << LOW_SOURCES
    NUM_MASKS: tl.constexpr = 1 << NUM_SOURCES

    low_masks = tl.arange(0, NUM_LOW_MASKS)
    mix_rows = tl.arange(0, MIX_PAD)
    offsets = tl.arange(0, BLOCK_D)
    est_row = est_ptr + row.to(tl.int64) * NUM_SOURCES * D
    mix_row = mix_ptr + row.to(tl.int64) * NUM_MIXTURES * D

    acc = tl.zeros((MIX_PAD, NUM_LOW_MASKS, BLOCK_D), ACC_DTYPE)
    for start in tl.range(worker * BLOCK_D, D, num_workers * BLOCK_D, num_stages=LOOP_STAGES):
        d = start + offsets
        in_bounds = d < D
        # -0.0 is the additive identity that the compiler may fold away (x + -0.0 == x for every x).
        base = tl.full((BLOCK_D,), -0.0, ACC_DTYPE)
        for s in tl.static_range(LOW_SOURCES, NUM_SOURCES):
            x = tl.load(est_row + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
            base += tl.where(((high >> (s - LOW_SOURCES)) & 1) != 0, x, -0.0)
        sums = tl.broadcast_to(base[None, :], (NUM_LOW_MASKS, BLOCK_D))
        for s in tl.static_range(LOW_SOURCES):
            x = tl.load(est_row + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
            sums += tl.where((((low_masks >> s) & 1) != 0)[:, None], x[None, :], -0.0)
        mix = tl.load(
            mix_row + mix_rows[:, None] * D + d[None, :],
            mask=(mix_rows[:, None] < NUM_MIXTURES) & in_bounds[None, :], other=0.0,
        ).to(ACC_DTYPE)
        # Out-of-bounds lanes load 0 for sources and mixtures, so they add exactly 0.
        acc += tl.abs(sums[None, :, :] - mix[:, None, :])

    partial = tl.sum(acc, axis=2)
    out = partials_ptr + (row * num_workers + worker) * (NUM_MIXTURES * NUM_MASKS)
    tl.store(
        out + mix_rows[:, None] * NUM_MASKS + high * NUM_LOW_MASKS + low_masks[None, :],
        partial, mask=(mix_rows < NUM_MIXTURES)[:, None],
    )


@triton.jit
def _select_best_kernel(
    partials_ptr, masks_ptr, row_loss_ptr, best_ptr,
    num_chunks, num_candidates, count,
    NUM_MIXTURES: tl.constexpr, NUM_MASKS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_C)
    chunk_lanes = tl.arange(0, BLOCK_T)
    row_partials = partials_ptr + row * num_chunks * (NUM_MIXTURES * NUM_MASKS)
    # Each lane keeps the first minimum of the candidates it sees (in increasing order);
    # the lanes are merged at the end by (key, candidate index).
    best_key = tl.full((BLOCK_C,), float("inf"), ACC_DTYPE)
    best_cand = tl.full((BLOCK_C,), 2147483647, tl.int32)
    for first in range(0, num_candidates, BLOCK_C):
        cand = first + lanes
        valid = cand < num_candidates
        total = tl.zeros((BLOCK_C,), ACC_DTYPE)
        for n in tl.static_range(NUM_MIXTURES):
            mask = tl.load(masks_ptr + cand * NUM_MIXTURES + n, mask=valid, other=0)
            # A (chunks x candidates) tile per step: the chunk loop is short, so it is not latency-bound.
            for chunk in range(0, num_chunks, BLOCK_T):
                chunks = chunk + chunk_lanes
                tile = tl.load(
                    row_partials + chunks[:, None] * (NUM_MIXTURES * NUM_MASKS) + n * NUM_MASKS + mask[None, :],
                    mask=(chunks < num_chunks)[:, None] & valid[None, :], other=0.0,
                )
                total += tl.sum(tile, axis=0)
        # Losses are >= 0, so -1 ranks NaN first: a NaN anywhere in a row makes the row NaN.
        key = tl.where(total != total, -1.0, total)
        # A lane's first valid candidate always counts, so rows whose every candidate is +inf still pick one.
        better = valid & ((key < best_key) | (best_cand == 2147483647))
        best_key = tl.where(better, key, best_key)
        best_cand = tl.where(better, cand, best_cand)
    min_key = tl.min(best_key, axis=0)
    chosen = tl.min(tl.where(best_key == min_key, best_cand, 2147483647), axis=0)
    row_loss = tl.where(min_key < 0, float("nan"), min_key) / count
    tl.store(row_loss_ptr + row, row_loss)
    tl.store(best_ptr + row, chosen.to(tl.int64))


@triton.jit
def _mixit_l1_backward_kernel(
    grad_rows_ptr, est_ptr, mix_ptr, masks_ptr, best_ptr, grad_est_ptr, grad_mix_ptr,
    D, count,
    NUM_SOURCES: tl.constexpr, NUM_MIXTURES: tl.constexpr, MIX_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, MIXTURES_GRAD: tl.constexpr,
):
    block = tl.program_id(0)
    row = tl.program_id(1)
    d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    in_bounds = d < D
    mix_rows = tl.arange(0, MIX_PAD)
    real_mix = mix_rows < NUM_MIXTURES
    est_row = est_ptr + row.to(tl.int64) * NUM_SOURCES * D
    mix_row = mix_ptr + row.to(tl.int64) * NUM_MIXTURES * D

    best = tl.load(best_ptr + row)
    masks = tl.load(masks_ptr + best * NUM_MIXTURES + mix_rows, mask=real_mix, other=0)
    sums = tl.full((MIX_PAD, BLOCK_D), -0.0, ACC_DTYPE)
    for s in tl.static_range(NUM_SOURCES):
        x = tl.load(est_row + s * D + d, mask=in_bounds, other=0.0).to(ACC_DTYPE)
        sums += tl.where((((masks >> s) & 1) != 0)[:, None], x[None, :], -0.0)
    mix = tl.load(mix_row + mix_rows[:, None] * D + d[None, :], mask=real_mix[:, None] & in_bounds[None, :],
                  other=0.0).to(ACC_DTYPE)
    err_sign = sign(sums - mix)
    scale = tl.load(grad_rows_ptr + row).to(ACC_DTYPE) / count

    grad_est_row = grad_est_ptr + row.to(tl.int64) * NUM_SOURCES * D
    for s in tl.static_range(NUM_SOURCES):
        source_sign = tl.sum(tl.where((((masks >> s) & 1) != 0)[:, None], err_sign, 0.0), axis=0)
        tl.store(grad_est_row + s * D + d, (scale * source_sign).to(grad_est_ptr.dtype.element_ty), mask=in_bounds)
    if MIXTURES_GRAD:
        grad_mix_row = grad_mix_ptr + row.to(tl.int64) * NUM_MIXTURES * D
        tl.store(grad_mix_row + mix_rows[:, None] * D + d[None, :],
                 (-scale * err_sign).to(grad_mix_ptr.dtype.element_ty), mask=real_mix[:, None] & in_bounds[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartialsConfig:
    """Tile shape of the partials kernel: subset sums over the ``low_sources`` lowest sources are enumerated in
    registers; ``loop_stages`` tiles' loads are in flight at once (above 1 Triton copies later tiles into shared
    memory with cp.async while one is summed; a 2-byte element per thread is too small for it and loads directly;
    compiled for sm_90 without spills at 2-4, swept by benchmarks/tune_mixit_gpu.py --tune)."""

    low_sources: int
    block_d: int
    num_warps: int = 4
    loop_stages: int = 1


def default_partials_config(num_sources: int, num_mixtures: int) -> PartialsConfig:
    # Subset sums and accumulators live in registers, (1 + mixtures) * 2**low of them per element a
    # thread holds; past ~48 they spill (measured on an H200: 2 elements per thread at M=4 ran 2.5x slower).
    low_sources = min(num_sources, 5)
    values_per_element = (1 + triton.next_power_of_2(num_mixtures)) << low_sources
    elements_per_thread = min(4, 1 << (max(1, 48 // values_per_element).bit_length() - 1))
    num_warps = 4
    return PartialsConfig(low_sources, 32 * num_warps * elements_per_thread, num_warps)


@dataclass(frozen=True)
class BackwardConfig:
    """One program per (row, tile of ``block_d``). Measured on an H200 at B=16, M=4, N=2, D=617400: 512 x 16
    warps reached 93% of copy bandwidth, 1024 x 4 warps 75%."""

    block_d: int = 512
    num_warps: int = 16


_forward_plans = PlanCache()


def forward_plan(est: torch.Tensor, mixtures: torch.Tensor, partitions: str, config: PartialsConfig) -> dict:
    """Grid and arguments of the partials kernel for this shape, dtype, device and config, worked out once."""
    key = (tuple(est.shape), mixtures.shape[1], est.dtype, est.device, partitions, config)
    return _forward_plans.get(key, lambda: _make_forward_plan(est, mixtures, config))


def _make_forward_plan(est: torch.Tensor, mixtures: torch.Tensor, config: PartialsConfig) -> dict:
    batch, num_sources, length = est.shape
    num_mixtures = mixtures.shape[1]
    highs = 1 << (num_sources - config.low_sources)
    partials_kwargs = dict(NUM_SOURCES=num_sources, NUM_MIXTURES=num_mixtures,
                           MIX_PAD=triton.next_power_of_2(num_mixtures), LOW_SOURCES=config.low_sources,
                           BLOCK_D=config.block_d, ACC_DTYPE=acc_dtype(est.dtype), LOOP_STAGES=config.loop_stages,
                           num_warps=config.num_warps)
    # One wave of programs, split evenly over rows and subset blocks; never more workers than blocks.
    wave = programs_per_wave(_subset_l1_partials_kernel,
                             (est, mixtures, est.new_empty(0, dtype=row_loss_dtype(est.dtype)), length),
                             partials_kwargs, est.device)
    num_chunks = max(1, min(triton.cdiv(length, config.block_d), wave // (batch * highs)))
    return dict(partials_shape=(batch, num_chunks, num_mixtures, 1 << num_sources),
                partials_grid=(highs, num_chunks, batch), partials_kwargs=partials_kwargs)


def select_best(partials: torch.Tensor, row_loss: torch.Tensor, best: torch.Tensor, num_sources: int,
                partitions: str, length: int) -> None:
    """The selection stage over per-(mixture, subset) partials laid out (B, chunks, N, 2**M).

    Writes each row's first best candidate (NaN first) to ``best`` and its loss, the partials' sum over
    chunks and mixtures divided by N * length, to ``row_loss``. Shared by every Triton op with a MixIT term.
    """
    batch, num_chunks, num_mixtures, num_masks = partials.shape
    count = num_candidates(num_sources, num_mixtures, partitions)
    block_c = min(256, triton.next_power_of_2(count))
    _select_best_kernel[(batch,)](
        partials, candidate_masks(num_sources, num_mixtures, partitions, partials.device), row_loss, best,
        num_chunks, count, float(num_mixtures * length),
        NUM_MIXTURES=num_mixtures, NUM_MASKS=num_masks, BLOCK_C=block_c,
        BLOCK_T=min(triton.next_power_of_2(num_chunks), max(1, 4096 // block_c)),
        ACC_DTYPE=acc_dtype(partials.dtype), num_warps=4,
    )


def forward(est: torch.Tensor, mixtures: torch.Tensor, partitions: str, config: PartialsConfig | None = None, *,
            mean: bool = False):
    check_runnable(est)
    config = config or default_partials_config(est.shape[1], mixtures.shape[1])
    plan = forward_plan(est, mixtures, partitions, config)
    batch, length = est.shape[0], est.shape[2]
    loss_dtype = row_loss_dtype(est.dtype)
    partials = torch.empty(plan["partials_shape"], dtype=loss_dtype, device=est.device)
    _subset_l1_partials_kernel[plan["partials_grid"]](est, mixtures, partials, length, **plan["partials_kwargs"])
    row_loss = torch.empty(batch, dtype=loss_dtype, device=est.device)
    best = torch.empty(batch, dtype=torch.int64, device=est.device)
    select_best(partials, row_loss, best, est.shape[1], partitions, length)
    return reduced_rows(row_loss, mean), best


def backward(grad, est, mixtures, best, partitions: str, mixtures_grad: bool,
             config: BackwardConfig = BackwardConfig(), *, mean: bool = False):
    check_runnable(est)
    batch, num_sources, length = est.shape
    grad_rows = row_gradients(grad, batch, mean)
    num_mixtures = mixtures.shape[1]
    grad_est = torch.empty_like(est)
    grad_mix = torch.empty_like(mixtures) if mixtures_grad else None
    _mixit_l1_backward_kernel[(triton.cdiv(length, config.block_d), batch)](
        grad_rows, est, mixtures, candidate_masks(num_sources, num_mixtures, partitions, est.device), best,
        grad_est, grad_mix if mixtures_grad else grad_est, length, float(num_mixtures * length),
        NUM_SOURCES=num_sources, NUM_MIXTURES=num_mixtures, MIX_PAD=triton.next_power_of_2(num_mixtures),
        BLOCK_D=config.block_d, ACC_DTYPE=acc_dtype(est.dtype), MIXTURES_GRAD=mixtures_grad,
        num_warps=config.num_warps,
    )
    return grad_est, grad_mix


backends.register("mixit_l1", "triton", backends.Kernel(forward, backward))
