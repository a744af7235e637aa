"""The "triton" backend of the PIT op (algorithm and accuracy: ``nrt_kernels.ops.pit``).

Forward, three launches and no host sync (CUDA-graph capturable):

1. ``_pit_partials_kernel``, grid (workers, B): a program owns one row and an even, strided share of its tiles of
   ``T`` (one wave of programs in all, sized from the compiled kernel's registers).  It loads the tile's ``M``
   estimates and ``M`` targets once, converted to float64, and accumulates the pairwise statistics: the cross
   products as one float64 ``tl.dot`` per tile (DMMA on sm_80+; the products of float32 values are exact), the
   energies and sums alongside; for L1 ``sum |e_i - t_j|`` for every pair.  Sources are padded to ``MP`` (a power
   of two, at least 16 for ``tl.dot``) with masked loads that read nothing.
2. ``_pit_matrix_kernel``, one program per row: adds the workers' partials in a fixed order (bitwise identical from
   run to run) and writes the row's statistics and its (MP, MP) float64 loss matrix.
3. ``_pit_solve_kernel``, one program (one warp) per row: the exhaustive search over the
   ``itertools.permutations`` table or the Hungarian algorithm with the columns in the warp's lanes, then the
   chosen pairs' backward coefficients.

Backward: ``_pit_backward_kernel``, grid (tiles, M, B), reads est_{perm[j]} and target_j and writes both gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backends
from .._operands import row_loss_dtype
from .._triton_launch import PlanCache, check_runnable, programs_per_wave
from . import METRICS, NUM_COEFFS, OP, permutation_table

# The metric indices (build_config.PIT_METRICS order) as constexpr globals the kernels can compare against.
_SISDR, _SDSDR, _SNR, _MSE, _L1, _LOG_MSE = (tl.constexpr(METRICS.index(name)) for name in
                                               ("sisdr", "sdsdr", "snr", "mse", "l1", "log_mse"))


@triton.jit
def _pit_partials_kernel(
    est_ptr, tgt_ptr, partials_ptr,
    T,
    M: tl.constexpr, MP: tl.constexpr, BLOCK_D: tl.constexpr, IS_L1: tl.constexpr,
):
    worker = tl.program_id(0)
    row = tl.program_id(1)
    num_workers = tl.num_programs(0)
    STATS: tl.constexpr = MP * MP + 4 * MP
    rows = tl.arange(0, MP)
    offsets = tl.arange(0, BLOCK_D)
    est_row = est_ptr + row.to(tl.int64) * M * T
    tgt_row = tgt_ptr + row.to(tl.int64) * M * T
    real = rows < M

    cross = tl.zeros((MP, MP), tl.float64)
    ee = tl.zeros((MP,), tl.float64)
    tt = tl.zeros((MP,), tl.float64)
    se = tl.zeros((MP,), tl.float64)
    st = tl.zeros((MP,), tl.float64)
    for start in range(worker * BLOCK_D, T, num_workers * BLOCK_D):
        d = start + offsets
        mask = real[:, None] & (d < T)[None, :]
        # Padded sources and out-of-bounds lanes load 0 and add exactly 0 (L1: their entries are never read).
        tgt = tl.load(tgt_row + rows[:, None] * T + d[None, :], mask=mask, other=0.0).to(tl.float64)
        if IS_L1:
            for i in tl.static_range(M):
                e_i = tl.load(est_row + i * T + d, mask=d < T, other=0.0).to(tl.float64)
                dist = tl.sum(tl.abs(tgt - e_i[None, :]), axis=1)
                cross += tl.where((rows == i)[:, None], dist[None, :], 0.0)
        else:
            est = tl.load(est_row + rows[:, None] * T + d[None, :], mask=mask, other=0.0).to(tl.float64)
            cross += tl.dot(est, tl.trans(tgt))
            ee += tl.sum(est * est, axis=1)
            tt += tl.sum(tgt * tgt, axis=1)
            se += tl.sum(est, axis=1)
            st += tl.sum(tgt, axis=1)
    out = partials_ptr + (row * num_workers + worker).to(tl.int64) * STATS
    tl.store(out + rows[:, None] * MP + rows[None, :], cross)
    if not IS_L1:
        tl.store(out + MP * MP + rows, ee)
        tl.store(out + MP * MP + MP + rows, tt)
        tl.store(out + MP * MP + 2 * MP + rows, se)
        tl.store(out + MP * MP + 3 * MP + rows, st)


@triton.jit
def _pair_loss(x, y, z, eps, tau, T, METRIC: tl.constexpr):
    """Loss of (est, target) pairs from their energies x, y and cross z, and its derivatives (dx, dy, dz).

    The same formulas as csrc/cpu/pit_cpu.cpp's pair_loss; sums of squares are clamped at 0 before EPS."""
    if METRIC == _MSE or METRIC == _LOG_MSE:
        err = x - 2.0 * z + y
        keep = tl.where(err < 0.0, 0.0, 1.0).to(tl.float64)
        err = err * keep
        if METRIC == _MSE:
            loss = err / T
            scale = keep / T
            dx, dy, dz = scale, scale, -2.0 * scale
        else:
            arg = err + tau * y + 1e-8
            loss = 10.0 * tl.log(arg) / 2.302585092994045684
            d_arg = 10.0 / (2.302585092994045684 * arg)
            dx, dy, dz = keep * d_arg, (keep + tau) * d_arg, -2.0 * keep * d_arg
    else:
        energy = y + eps
        a = z / energy
        if METRIC == _SNR:
            num = y
            nx, ny, nz = 0.0 * x, 1.0 + 0.0 * x, 0.0 * x
            den = x - 2.0 * z + y
            gx, gy, gz = 1.0 + 0.0 * x, 1.0 + 0.0 * x, -2.0 + 0.0 * x
        else:
            num = a * a * y
            nx, ny, nz = 0.0 * x, a * a - 2.0 * a * a * y / energy, 2.0 * a * y / energy
            if METRIC == _SISDR:
                den = x - 2.0 * a * z + a * a * y
                gx, gy, gz = 1.0 + 0.0 * x, 3.0 * a * a - 2.0 * a * a * y / energy, -4.0 * a + 2.0 * a * y / energy
            else:  # sdsdr
                den = x - 2.0 * z + y
                gx, gy, gz = 1.0 + 0.0 * x, 1.0 + 0.0 * x, -2.0 + 0.0 * x
        keep = tl.where(den < 0.0, 0.0, 1.0).to(tl.float64)
        den = den * keep + eps
        ratio = num / den
        loss = -10.0 * tl.log(ratio + eps) / 2.302585092994045684
        d_ratio = -10.0 / (2.302585092994045684 * (ratio + eps))
        dx = d_ratio * (nx - ratio * gx * keep) / den
        dy = d_ratio * (ny - ratio * gy * keep) / den
        dz = d_ratio * (nz - ratio * gz * keep) / den
    return loss, dx, dy, dz


@triton.jit
def _pit_matrix_kernel(
    partials_ptr, stats_ptr, loss_ptr, scalars_ptr,
    num_workers, T,
    M: tl.constexpr, MP: tl.constexpr, METRIC: tl.constexpr, CENTERED: tl.constexpr,
):
    row = tl.program_id(0)
    STATS: tl.constexpr = MP * MP + 4 * MP
    eps = tl.load(scalars_ptr)
    tau = tl.load(scalars_ptr + 1)
    rows = tl.arange(0, MP)
    pair = rows[:, None] * MP + rows[None, :]
    row_partials = partials_ptr + row.to(tl.int64) * num_workers * STATS
    cross = tl.zeros((MP, MP), tl.float64)
    for worker in range(0, num_workers):
        cross += tl.load(row_partials + worker * STATS + pair)
    row_stats = stats_ptr + row.to(tl.int64) * STATS
    tl.store(row_stats + pair, cross)
    if METRIC == _L1:
        loss = cross / T
    else:
        vectors = tl.arange(0, 4 * MP)
        sums = tl.zeros((4 * MP,), tl.float64)
        for worker in range(0, num_workers):
            sums += tl.load(row_partials + worker * STATS + MP * MP + vectors)
        tl.store(row_stats + MP * MP + vectors, sums)
        ee = tl.load(row_stats + MP * MP + rows)
        tt = tl.load(row_stats + MP * MP + MP + rows)
        x = ee[:, None] + 0.0 * cross
        y = tt[None, :] + 0.0 * cross
        z = cross
        if CENTERED:
            se = tl.load(row_stats + MP * MP + 2 * MP + rows)
            st = tl.load(row_stats + MP * MP + 3 * MP + rows)
            x = x - (se * se / T)[:, None]
            y = y - (st * st / T)[None, :]
            z = z - se[:, None] * st[None, :] / T
        loss, _, _, _ = _pair_loss(x, y, z, eps, tau, T, METRIC)
    real = (rows < M)[:, None] & (rows < M)[None, :]
    tl.store(loss_ptr + row.to(tl.int64) * MP * MP + pair, tl.where(real, loss, 0.0))


@triton.jit
def _pit_solve_kernel(
    loss_ptr, stats_ptr, table_ptr, scalars_ptr, row_loss_ptr, perm_ptr, coeffs_ptr,
    num_perms, T,
    M: tl.constexpr, MP: tl.constexpr, CP: tl.constexpr, METRIC: tl.constexpr, CENTERED: tl.constexpr,
    HUNGARIAN: tl.constexpr, BLOCK_P: tl.constexpr, NUM_COEFFS: tl.constexpr,
):
    row = tl.program_id(0)
    STATS: tl.constexpr = MP * MP + 4 * MP
    # Column lanes: est indices 0..M-1, and lane M stands for the Hungarian search's root (column 0 of the
    # textbook's 1-based arrays). Row lanes index targets.
    lanes = tl.arange(0, CP)
    row_loss_matrix = loss_ptr + row.to(tl.int64) * MP * MP
    rows2 = tl.arange(0, MP)
    full = tl.load(row_loss_matrix + rows2[:, None] * MP + rows2[None, :])
    bad = (full != full) | (tl.abs(full) == float("inf"))
    finite = tl.max(tl.where(bad, 1, 0)) == 0

    if HUNGARIAN:
        DUMMY: tl.constexpr = M
        real_col = lanes < M
        u = tl.zeros((CP,), tl.float64)  # indexed by target row
        v = tl.zeros((CP,), tl.float64)  # indexed by column
        row_of = tl.full((CP,), -1, tl.int32)
        for target in range(0, M):
            row_of = tl.where(lanes == DUMMY, target, row_of)
            col0 = tl.sum(tl.where(lanes == DUMMY, lanes, 0))
            min_slack = tl.full((CP,), float("inf"), tl.float64)
            way = tl.full((CP,), DUMMY, tl.int32)
            used = lanes < 0
            in_tree = lanes < 0
            searching = col0 >= 0
            while searching:
                used = used | (lanes == col0)
                row0 = tl.sum(tl.where(lanes == col0, row_of, 0))
                in_tree = in_tree | (lanes == row0)
                u_row0 = tl.sum(tl.where(lanes == row0, u, 0.0))
                cost = tl.load(row_loss_matrix + lanes * MP + row0, mask=real_col, other=0.0)
                free = real_col & (~used)
                reduced = cost - u_row0 - v
                better = free & (reduced < min_slack)
                min_slack = tl.where(better, reduced, min_slack)
                way = tl.where(better, col0, way)
                candidates = tl.where(free, min_slack, float("inf"))
                delta = tl.min(candidates)
                col1 = tl.min(tl.where(free & (candidates == delta), lanes, CP))
                u = tl.where(in_tree, u + delta, u)
                v = tl.where(used, v - delta, v)
                min_slack = tl.where(used, min_slack, min_slack - delta)
                col0 = col1
                searching = tl.sum(tl.where(lanes == col0, row_of, 0)) >= 0
            augmenting = col0 != DUMMY
            while augmenting:
                col1 = tl.sum(tl.where(lanes == col0, way, 0))
                moved = tl.sum(tl.where(lanes == col1, row_of, 0))
                row_of = tl.where(lanes == col0, moved, row_of)
                col0 = col1
                augmenting = col0 != DUMMY
        # perm[target] = the column whose matched row is that target.
        owner = (row_of[None, :] == lanes[:, None]) & real_col[None, :]
        perm = tl.sum(tl.where(owner, lanes[None, :], 0), axis=1)
        perm = tl.where(finite, perm, lanes)
    else:
        perm_lanes = tl.arange(0, BLOCK_P)
        best_key = tl.full((BLOCK_P,), float("inf"), tl.float64)
        best_index = tl.full((BLOCK_P,), 2147483647, tl.int32)
        for first in range(0, num_perms, BLOCK_P):
            index = first + perm_lanes
            valid = index < num_perms
            total = tl.zeros((BLOCK_P,), tl.float64)
            for j in tl.static_range(M):
                est_index = tl.load(table_ptr + index * M + j, mask=valid, other=0).to(tl.int32)
                total += tl.load(row_loss_matrix + est_index * MP + j)
            # Each lane sees increasing indices, so a strict < keeps its first minimum.
            better = valid & (total < best_key)
            best_key = tl.where(better, total, best_key)
            best_index = tl.where(better, index, best_index)
        min_key = tl.min(best_key)
        chosen = tl.min(tl.where(best_key == min_key, best_index, 2147483647))
        chosen = tl.where(finite, chosen, 0)  # index 0 is the identity
        perm = tl.load(table_ptr + chosen * M + lanes, mask=lanes < M, other=0).to(tl.int32)

    target_lane = lanes < M
    chosen_loss = tl.load(row_loss_matrix + perm * MP + lanes, mask=target_lane, other=0.0)
    row_loss = tl.sum(chosen_loss) / M
    row_loss = tl.where(finite, row_loss, float("nan"))
    tl.store(row_loss_ptr + row, row_loss)
    tl.store(perm_ptr + row * M + lanes, perm.to(tl.int64), mask=target_lane)

    coeffs = coeffs_ptr + (row * M + lanes).to(tl.int64) * NUM_COEFFS
    if METRIC == _L1:  # sign(e - t) / (M T)
        tl.store(coeffs, (tl.zeros((CP,), tl.float64) + 1.0) / (M * T), mask=target_lane)
        for k in tl.static_range(1, NUM_COEFFS):
            tl.store(coeffs + k, tl.zeros((CP,), tl.float64), mask=target_lane)
    else:
        eps = tl.load(scalars_ptr)
        tau = tl.load(scalars_ptr + 1)
        row_stats = stats_ptr + row.to(tl.int64) * STATS
        x = tl.load(row_stats + MP * MP + perm, mask=target_lane, other=0.0)
        y = tl.load(row_stats + MP * MP + MP + lanes, mask=target_lane, other=0.0)
        z = tl.load(row_stats + perm * MP + lanes, mask=target_lane, other=0.0)
        mean_e = tl.zeros((CP,), tl.float64)
        mean_t = tl.zeros((CP,), tl.float64)
        if CENTERED:
            sum_e = tl.load(row_stats + MP * MP + 2 * MP + perm, mask=target_lane, other=0.0)
            sum_t = tl.load(row_stats + MP * MP + 3 * MP + lanes, mask=target_lane, other=0.0)
            mean_e = sum_e / T
            mean_t = sum_t / T
            x = x - sum_e * mean_e
            y = y - sum_t * mean_t
            z = z - sum_e * mean_t
        _, dx, dy, dz = _pair_loss(x, y, z, eps, tau, T, METRIC)
        # grad_e = 2 dx e' + dz t', grad_t = dz e' + 2 dy t' with e' = e - mean_e, t' = t - mean_t; 1/M of the mean.
        c0 = 2.0 * dx / M
        c1 = dz / M
        c3 = dz / M
        c4 = 2.0 * dy / M
        tl.store(coeffs, c0, mask=target_lane)
        tl.store(coeffs + 1, c1, mask=target_lane)
        tl.store(coeffs + 2, -(c0 * mean_e + c1 * mean_t), mask=target_lane)
        tl.store(coeffs + 3, c3, mask=target_lane)
        tl.store(coeffs + 4, c4, mask=target_lane)
        tl.store(coeffs + 5, -(c3 * mean_e + c4 * mean_t), mask=target_lane)


@triton.jit
def _pit_backward_kernel(
    grad_rows_ptr, est_ptr, tgt_ptr, perm_ptr, coeffs_ptr, grad_est_ptr, grad_tgt_ptr,
    T,
    M: tl.constexpr, BLOCK_D: tl.constexpr, IS_L1: tl.constexpr, TARGETS_GRAD: tl.constexpr,
    NUM_COEFFS: tl.constexpr,
):
    block = tl.program_id(0)
    j = tl.program_id(1)
    row = tl.program_id(2)
    d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    in_bounds = d < T
    i = tl.load(perm_ptr + row * M + j)
    e_offset = (row.to(tl.int64) * M + i) * T
    t_offset = (row.to(tl.int64) * M + j) * T
    e = tl.load(est_ptr + e_offset + d, mask=in_bounds, other=0.0).to(tl.float64)
    t = tl.load(tgt_ptr + t_offset + d, mask=in_bounds, other=0.0).to(tl.float64)
    g = tl.load(grad_rows_ptr + row)
    coeffs = coeffs_ptr + (row * M + j).to(tl.int64) * NUM_COEFFS
    if IS_L1:
        err = e - t
        # sign(0) = sign(NaN) = 0, like the MixIT L1 kernels.
        grad_e = g * tl.load(coeffs) * tl.where(err > 0, 1.0, tl.where(err < 0, -1.0, 0.0))
        grad_t = -grad_e
    else:
        grad_e = (g * tl.load(coeffs)) * e + (g * tl.load(coeffs + 1)) * t + g * tl.load(coeffs + 2)
        grad_t = (g * tl.load(coeffs + 3)) * e + (g * tl.load(coeffs + 4)) * t + g * tl.load(coeffs + 5)
    if grad_est_ptr.dtype.element_ty != tl.float64:
        # Half outputs round through float32, as the C++ kernels' c10::Half / BFloat16 conversions do (the
        # interpreter cannot convert float64 to bfloat16 directly).
        grad_e = grad_e.to(tl.float32)
        grad_t = grad_t.to(tl.float32)
    tl.store(grad_est_ptr + e_offset + d, grad_e.to(grad_est_ptr.dtype.element_ty), mask=in_bounds)
    if TARGETS_GRAD:
        tl.store(grad_tgt_ptr + t_offset + d, grad_t.to(grad_tgt_ptr.dtype.element_ty), mask=in_bounds)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def padded_sources(num_sources: int) -> int:
    """MP: sources padded to a power of two, at least 16 (tl.dot's smallest tile)."""
    return max(16, triton.next_power_of_2(num_sources))


def partials_block(num_sources: int) -> int:
    # Two (MP, BLOCK_D) float64 tiles per program: 1024 elements each keeps them at 16 values a thread (4 warps).
    return 1024 // padded_sources(num_sources)


PARTIALS_WARPS = 4
# One (MP, MP) float64 tile per row: at 4 warps ptxas caps an MP = 16 tile at 40 registers and spills (sm_90).
MATRIX_WARPS = {16: 2, 32: 4}
# The Hungarian search is sequential over at most 64 column lanes: one warp, its reductions are shuffles. The
# exhaustive search scores EXHAUSTIVE_BLOCK permutations a step: 4 warps hold 4 a thread without spilling.
HUNGARIAN_WARPS = 1
EXHAUSTIVE_WARPS = 4
EXHAUSTIVE_BLOCK = 512
BACKWARD_BLOCK_D = 1024
BACKWARD_WARPS = 4

_plans = PlanCache()


def _plan(est: torch.Tensor, metric: int) -> dict:
    return _plans.get((tuple(est.shape), est.dtype, est.device, metric), lambda: _make_plan(est, metric))


def _make_plan(est: torch.Tensor, metric: int) -> dict:
    batch, num_sources, length = est.shape
    mp = padded_sources(num_sources)
    block_d = partials_block(num_sources)
    kwargs = dict(M=num_sources, MP=mp, BLOCK_D=block_d, IS_L1=metric == _L1.value, num_warps=PARTIALS_WARPS)
    wave = programs_per_wave(_pit_partials_kernel, (est, est, est.new_empty(0, dtype=torch.float64), length),
                             kwargs, est.device)
    num_workers = max(1, min(triton.cdiv(length, block_d), wave // batch))
    return dict(num_workers=num_workers, partials_kwargs=kwargs, stats=mp * mp + 4 * mp, mp=mp)


_scalars = PlanCache()


def _metric_scalars(eps: float, max_snr: float, device) -> torch.Tensor:
    """(eps, tau) as a float64 device tensor: Triton passes Python floats as float32, which would round EPS and tau.
    Cached, so that a CUDA-graph capture after the first call copies nothing from the host."""
    return _scalars.get((eps, max_snr, str(device)), lambda: torch.tensor(
        [eps, 10.0 ** (-max_snr / 10.0)], dtype=torch.float64, device=device))


def triton_forward(est, targets, metric, hungarian, zero_mean, eps, max_snr):
    check_runnable(est)
    batch, num_sources, length = est.shape
    plan = _plan(est, metric)
    mp, num_workers, stats_size = plan["mp"], plan["num_workers"], plan["stats"]
    device = est.device
    partials = torch.empty(batch, num_workers, stats_size, dtype=torch.float64, device=device)
    _pit_partials_kernel[(num_workers, batch)](est, targets, partials, length, **plan["partials_kwargs"])
    stats = torch.empty(batch, stats_size, dtype=torch.float64, device=device)
    loss_matrix = torch.empty(batch, mp, mp, dtype=torch.float64, device=device)
    centered = zero_mean and metric in (_SISDR.value, _SDSDR.value, _SNR.value)
    scalars = _metric_scalars(eps, max_snr, device)
    _pit_matrix_kernel[(batch,)](partials, stats, loss_matrix, scalars, num_workers, length, M=num_sources, MP=mp,
                                 METRIC=metric, CENTERED=centered, num_warps=MATRIX_WARPS[mp])
    row_loss = torch.empty(batch, dtype=row_loss_dtype(est.dtype), device=device)
    perm = torch.empty(batch, num_sources, dtype=torch.int64, device=device)
    coeffs = torch.empty(batch, num_sources, NUM_COEFFS, dtype=torch.float64, device=device)
    table = perm.new_empty(0, dtype=torch.int8) if hungarian else permutation_table(num_sources, device)
    _pit_solve_kernel[(batch,)](
        loss_matrix, stats, table, scalars, row_loss, perm, coeffs, table.shape[0], length,
        M=num_sources, MP=mp, CP=triton.next_power_of_2(num_sources + 1), METRIC=metric, CENTERED=centered,
        HUNGARIAN=hungarian, BLOCK_P=min(EXHAUSTIVE_BLOCK, triton.next_power_of_2(max(1, table.shape[0]))),
        NUM_COEFFS=NUM_COEFFS, num_warps=HUNGARIAN_WARPS if hungarian else EXHAUSTIVE_WARPS,
    )
    return row_loss, perm, coeffs


def triton_backward(grad_rows, est, targets, perm, coeffs, metric, targets_grad):
    check_runnable(est)
    batch, num_sources, length = est.shape
    grad_est = torch.empty_like(est)
    grad_targets = torch.empty_like(targets) if targets_grad else None
    _pit_backward_kernel[(triton.cdiv(length, BACKWARD_BLOCK_D), num_sources, batch)](
        grad_rows, est, targets, perm, coeffs, grad_est, grad_targets if targets_grad else grad_est, length,
        M=num_sources, BLOCK_D=BACKWARD_BLOCK_D, IS_L1=metric == _L1.value, TARGETS_GRAD=targets_grad,
        NUM_COEFFS=NUM_COEFFS, num_warps=BACKWARD_WARPS,
    )
    return grad_est, grad_targets


backends.register(OP, "triton", backends.Kernel(triton_forward, triton_backward))
