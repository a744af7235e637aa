// CPU kernels of the fused MixIT L1: the same two-stage algorithm as the Triton kernels in
// nrt_kernels/ops/mixit_l1.py.
//
// Forward, stage 1 (parallel over (row, tile of D)): the subset search of subset_l1.h, the N * 2**M partials
// E[n][mask] of every tile.  Stage 2 (per row) adds the tiles in a fixed order and keeps the first minimum over
// candidates, NaN first (torch.min semantics).
#include "mixit_l1_cpu.h"

#include "../nrt_config.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include "subset_l1.h"

namespace nrt_kernels {
namespace {

using namespace subset_l1;

// Stage 1 for one (row, tile): partial[n * 2**M + mask] = sum over [begin, end) of |S_mask - mix_n|.
// `workspace` holds (2**M + N) * chunk + N * 2**M * kLanes accumulators.
template <typename scalar_t, typename acc_t>
NRT_ISA_CLONES void subset_l1_partials(const scalar_t* est_row, const scalar_t* mix_row, int64_t num_sources,
                                       int64_t num_mixtures, int64_t length, int64_t begin, int64_t end, int64_t chunk,
                                       acc_t* workspace, acc_t* partial) {
  const int64_t num_masks = int64_t(1) << num_sources;
  acc_t* __restrict__ sums = workspace;                       // [num_masks][chunk]
  acc_t* __restrict__ mix = sums + num_masks * chunk;         // [num_mixtures][chunk]
  acc_t* __restrict__ lanes = mix + num_mixtures * chunk;     // [num_mixtures * num_masks][kLanes]
  std::fill(lanes, lanes + num_mixtures * num_masks * kLanes, acc_t(0));
  std::fill(sums, sums + chunk, acc_t(0));  // the empty subset

  for (int64_t start = begin; start < end; start += chunk) {
    const int64_t count = std::min(chunk, end - start);
    // Each stream asks for its next chunk block by block while it loads this one (subset_l1.h, prefetch).
    const int64_t ahead_count = look_ahead_count(start, count, chunk, end);
    for (int64_t s = 0; s < num_sources; ++s) {
      load_chunk(est_row + s * length + start, count, sums + (int64_t(1) << s) * chunk, chunk, ahead_count);
    }
    for (int64_t n = 0; n < num_mixtures; ++n) {
      load_chunk(mix_row + n * length + start, count, mix + n * chunk, chunk, ahead_count);
    }
    score_subsets(sums, mix, num_sources, num_mixtures, chunk, ceil_div(count, kLanes) * kLanes, lanes);
  }
  for (int64_t i = 0; i < num_mixtures * num_masks; ++i) partial[i] = lane_total(lanes + i * kLanes);
}

template <typename scalar_t>
void forward_impl(const at::Tensor& est, const at::Tensor& mixtures, const at::Tensor& masks, at::Tensor& row_loss,
                  at::Tensor& best) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = est.size(0), num_sources = est.size(1), length = est.size(2);
  const int64_t num_mixtures = mixtures.size(1), num_candidates = masks.size(0);
  const int64_t num_masks = int64_t(1) << num_sources;
  const int64_t num_tiles = ceil_div(length, kTile);
  const int64_t per_tile = num_mixtures * num_masks;
  const int64_t chunk = forward_chunk(num_masks);
  const scalar_t* est_data = est.const_data_ptr<scalar_t>();
  const scalar_t* mix_data = mixtures.const_data_ptr<scalar_t>();
  const int32_t* mask_data = masks.const_data_ptr<int32_t>();
  std::vector<acc_t> partials(static_cast<size_t>(batch * num_tiles * per_tile));

  at::parallel_for(0, batch * num_tiles, 1, [&](int64_t first, int64_t last) {
    std::vector<acc_t> workspace(static_cast<size_t>((num_masks + num_mixtures) * chunk + per_tile * kLanes));
    for (int64_t item = first; item < last; ++item) {
      const int64_t row = item / num_tiles, tile = item % num_tiles;
      subset_l1_partials<scalar_t, acc_t>(est_data + row * num_sources * length,
                                          mix_data + row * num_mixtures * length, num_sources, num_mixtures,
                                          length, tile * kTile, std::min(length, (tile + 1) * kTile), chunk,
                                          workspace.data(), partials.data() + item * per_tile);
    }
  });

  acc_t* loss_data = row_loss.data_ptr<acc_t>();
  int64_t* best_data = best.data_ptr<int64_t>();
  const acc_t count = static_cast<acc_t>(num_mixtures * length);
  at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
    std::vector<acc_t> totals(static_cast<size_t>(per_tile));
    for (int64_t row = first; row < last; ++row) {
      // Tiles in increasing order: the same additions in the same order on every run.
      const acc_t* row_partials = partials.data() + row * num_tiles * per_tile;
      std::copy(row_partials, row_partials + per_tile, totals.begin());
      for (int64_t tile = 1; tile < num_tiles; ++tile) {
        for (int64_t i = 0; i < per_tile; ++i) totals[i] += row_partials[tile * per_tile + i];
      }
      int64_t chosen;
      acc_t chosen_total;
      select_candidate(totals.data(), mask_data, num_candidates, num_mixtures, num_masks, &chosen, &chosen_total);
      loss_data[row] = chosen_total / count;
      best_data[row] = chosen;
    }
  });
}

// Backward for one row over [begin, end): grad = scale * sign(err of the source's mixture), chunk by chunk.
// `grad` is a [num_mixtures][kBackwardChunk] workspace; grad_mix_row may be null.
template <typename scalar_t, typename acc_t>
NRT_ISA_CLONES void sign_gradients(const scalar_t* est_row, const scalar_t* mix_row, const int64_t* owner,
                                   int64_t num_sources, int64_t num_mixtures, int64_t length, int64_t begin,
                                   int64_t end, acc_t scale, acc_t* grad, scalar_t* grad_est_row,
                                   scalar_t* grad_mix_row) {
  // Plain loops over a chunk with a runtime trip count: each one vectorises (with the dtype conversion).
  for (int64_t start = begin; start < end; start += kBackwardChunk) {
    const int64_t size = std::min(kBackwardChunk, end - start);
    // err_n = (sum of the sources assigned to n, in increasing source order) - mix_n.
    std::fill(grad, grad + num_mixtures * kBackwardChunk, acc_t(0));
    // Each stream asks for its next chunk (and the gradient's lines for writing) before it reads this one.
    const int64_t ahead_count = look_ahead_count(start, size, kBackwardChunk, end);
    for (int64_t s = 0; s < num_sources; ++s) {
      const scalar_t* __restrict__ x = est_row + s * length + start;
      acc_t* __restrict__ err = grad + owner[s] * kBackwardChunk;
      prefetch_elements(x, kBackwardChunk, ahead_count);
      prefetch_elements</*kForWrite=*/true>(grad_est_row + s * length + start, kBackwardChunk, ahead_count);
      for (int64_t l = 0; l < size; ++l) err[l] += static_cast<acc_t>(x[l]);
    }
    for (int64_t n = 0; n < num_mixtures; ++n) {
      const scalar_t* __restrict__ m = mix_row + n * length + start;
      acc_t* __restrict__ g = grad + n * kBackwardChunk;
      prefetch_elements(m, kBackwardChunk, ahead_count);
      for (int64_t l = 0; l < size; ++l) g[l] = scale * sign(g[l] - static_cast<acc_t>(m[l]));
    }
    for (int64_t s = 0; s < num_sources; ++s) {
      const acc_t* __restrict__ g = grad + owner[s] * kBackwardChunk;
      scalar_t* __restrict__ out = grad_est_row + s * length + start;
      for (int64_t l = 0; l < size; ++l) out[l] = static_cast<scalar_t>(g[l]);
    }
    if (grad_mix_row != nullptr) {
      for (int64_t n = 0; n < num_mixtures; ++n) {
        const acc_t* __restrict__ g = grad + n * kBackwardChunk;
        scalar_t* __restrict__ out = grad_mix_row + n * length + start;
        for (int64_t l = 0; l < size; ++l) out[l] = static_cast<scalar_t>(-g[l]);
      }
    }
  }
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_rows, const at::Tensor& est, const at::Tensor& mixtures,
                   const at::Tensor& best, const at::Tensor& masks, at::Tensor& grad_est, at::Tensor* grad_mix) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = est.size(0), num_sources = est.size(1), length = est.size(2);
  const int64_t num_mixtures = mixtures.size(1);
  const int64_t num_tiles = ceil_div(length, kBackwardTile);
  const scalar_t* est_data = est.const_data_ptr<scalar_t>();
  const scalar_t* mix_data = mixtures.const_data_ptr<scalar_t>();
  const acc_t* grad_data = grad_rows.const_data_ptr<acc_t>();
  const int64_t* best_data = best.const_data_ptr<int64_t>();
  const int32_t* mask_data = masks.const_data_ptr<int32_t>();
  scalar_t* grad_est_data = grad_est.data_ptr<scalar_t>();
  scalar_t* grad_mix_data = grad_mix != nullptr ? grad_mix->data_ptr<scalar_t>() : nullptr;
  const acc_t count = static_cast<acc_t>(num_mixtures * length);

  at::parallel_for(0, batch * num_tiles, 1, [&](int64_t first, int64_t last) {
    std::vector<acc_t> workspace(static_cast<size_t>(num_mixtures * kBackwardChunk));
    acc_t* __restrict__ grad = workspace.data();  // [num_mixtures][kBackwardChunk]: err, then the gradient
    int64_t owner[kMaxSources] = {};
    for (int64_t item = first; item < last; ++item) {
      const int64_t row = item / num_tiles, tile = item % num_tiles;
      const int32_t* candidate = mask_data + best_data[row] * num_mixtures;
      for (int64_t n = 0; n < num_mixtures; ++n) {
        for (int64_t s = 0; s < num_sources; ++s) {
          if ((candidate[n] >> s) & 1) owner[s] = n;
        }
      }
      // grad_rows / (N * D) first, like autograd's mean backward, then times the sign.
      const acc_t scale = grad_data[row] / count;
      sign_gradients<scalar_t, acc_t>(est_data + row * num_sources * length, mix_data + row * num_mixtures * length,
                                      owner, num_sources, num_mixtures, length, tile * kBackwardTile,
                                      std::min(length, (tile + 1) * kBackwardTile), scale, grad,
                                      grad_est_data + row * num_sources * length,
                                      grad_mix_data != nullptr ? grad_mix_data + row * num_mixtures * length : nullptr);
    }
  });
}

void check_inputs(const at::Tensor& est, const at::Tensor& mixtures, const at::Tensor& masks) {
  TORCH_CHECK(est.device().is_cpu() && mixtures.device().is_cpu() && masks.device().is_cpu(),
              "nrt_kernels CPU kernels need CPU tensors, got est on ", est.device(), " and mixtures on ",
              mixtures.device());
  TORCH_CHECK(est.dim() == 3 && mixtures.dim() == 3, "est and mixtures must be (B, M, D) and (B, N, D), got ",
              est.sizes(), " and ", mixtures.sizes());
  TORCH_CHECK(est.scalar_type() == mixtures.scalar_type(), "est and mixtures must have one dtype, got ",
              est.scalar_type(), " and ", mixtures.scalar_type());
  TORCH_CHECK(est.size(0) == mixtures.size(0) && est.size(2) == mixtures.size(2),
              "est and mixtures must agree in batch and length, got ", est.sizes(), " and ", mixtures.sizes());
  TORCH_CHECK(est.size(1) >= 1 && est.size(1) <= kMaxSources, "at most ", kMaxSources, " sources, got ",
              est.size(1));
  TORCH_CHECK(est.numel() > 0 && mixtures.numel() > 0, "empty input");
  TORCH_CHECK(masks.scalar_type() == at::kInt && masks.dim() == 2 && masks.size(1) == mixtures.size(1) &&
                  masks.size(0) >= 1,
              "masks must be (candidates, N) int32, got ", masks.sizes(), " ", masks.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mixit_l1_forward_cpu(const at::Tensor& est_in, const at::Tensor& mixtures_in,
                                                        const at::Tensor& masks_in, bool mean) {
  check_inputs(est_in, mixtures_in, masks_in);
  const at::Tensor est = est_in.contiguous(), mixtures = mixtures_in.contiguous(), masks = masks_in.contiguous();
  const auto loss_dtype = est.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({est.size(0)}, est.options().dtype(loss_dtype));
  at::Tensor best = at::empty({est.size(0)}, est.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, est.scalar_type(), "mixit_l1_forward_cpu", [&] {
    forward_impl<scalar_t>(est, mixtures, masks, row_loss, best);
  });
  // The mean here, not in Python: one op dispatched from Python less, the host time that small calls are made of.
  return {mean ? row_loss.mean() : row_loss, best};
}

std::tuple<at::Tensor, at::Tensor> mixit_l1_backward_cpu(const at::Tensor& grad, const at::Tensor& est_in,
                                                         const at::Tensor& mixtures_in, const at::Tensor& best_in,
                                                         const at::Tensor& masks_in, bool mixtures_grad, bool mean) {
  check_inputs(est_in, mixtures_in, masks_in);
  const at::Tensor est = est_in.contiguous(), mixtures = mixtures_in.contiguous(), masks = masks_in.contiguous();
  const auto acc_dtype = est.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(!mean || grad.dim() == 0, "the gradient of the rows' mean must be 0-dim, got ", grad.sizes());
  // autograd's mean backward, bit for bit: the gradient expanded over the rows, divided by their count.
  const at::Tensor grad_rows = (mean ? grad.expand({est.size(0)}).div(est.size(0)) : grad).to(acc_dtype).contiguous();
  const at::Tensor best = best_in.to(at::kLong).contiguous();
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == est.size(0) && best.dim() == 1 &&
                  best.size(0) == est.size(0),
              "grad_rows and best must be (B,), got ", grad_rows.sizes(), " and ", best.sizes());
  const int64_t* best_data = best.const_data_ptr<int64_t>();
  for (int64_t row = 0; row < best.size(0); ++row) {
    TORCH_CHECK(best_data[row] >= 0 && best_data[row] < masks.size(0), "best[", row, "] = ", best_data[row],
                " is not a candidate index in [0, ", masks.size(0), ")");
  }
  at::Tensor grad_est = at::empty_like(est);
  at::Tensor grad_mix = mixtures_grad ? at::empty_like(mixtures) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, est.scalar_type(), "mixit_l1_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_rows, est, mixtures, best, masks, grad_est, mixtures_grad ? &grad_mix : nullptr);
  });
  return {grad_est, grad_mix};
}

}  // namespace nrt_kernels
