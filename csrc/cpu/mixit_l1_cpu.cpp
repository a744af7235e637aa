// CPU kernels of the fused MixIT L1: the same two-stage algorithm as the Triton kernels in
// nrt_kernels/ops/mixit_l1.py.
//
// Forward, stage 1 (parallel over (row, tile of D)): for every mixture n and every subset mask of
// the M sources, E[n][mask] = sum_d |S_mask(d) - mix_n(d)| over the tile, where the subset sums are
// built incrementally, S[mask] = S[mask without its highest bit] + est[highest bit].  A candidate's
// error is a sum of N of these terms, so N * 2**M partials cover all N**M candidates and nothing of
// size (candidates x D) is ever formed.  Stage 2 (per row) adds the tiles in a fixed order and keeps
// the first minimum over candidates, NaN first (torch.min semantics).
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

namespace nrt_kernels {
namespace {

// Every (mixture, subset) pair sums into kLanes accumulators, lane l taking the elements d = l mod kLanes:
// a fixed-size local array that the compiler keeps in SIMD registers without -march (16 floats: 4 SSE or
// 2 AVX vectors).  Inputs are loaded in blocks of kLanes, zero-padded at the end of D.
constexpr int64_t kLanes = 16;
// Elements of D per forward work item.  It is a constant, not derived from the thread count, so the
// partials and hence every result are bitwise identical whatever the number of threads.  4096 keeps
// the partials buffer (N * 2**M values per tile) far below the input size and gives enough work items
// for a few threads at audio lengths.
constexpr int64_t kTile = 4096;
// Elements of D per backward work item, and per pass over its sources (the chunk's errors stay in L1).
constexpr int64_t kBackwardTile = 8192;
constexpr int64_t kBackwardChunk = 512;
// build_config.MAX_SOURCES: the subset table has 2**M entries.
constexpr int64_t kMaxSources = NRT_MAX_SOURCES;

// Runtime ISA dispatch (function multiversioning through an ifunc resolver): the two hot functions are
// compiled for AVX-512, AVX2 and the baseline, and the loader picks the best the CPU has, so the module
// needs no -march and still runs on any x86-64.  Every clone performs the same IEEE additions in the same
// order (no multiply feeds an add, so no FMA can form), hence results are bitwise identical across CPUs.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define NRT_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NRT_ISA_CLONES
#endif

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Loads `count` (<= kLanes) elements converted to the accumulation type, zero-padded: padded lanes
// add exactly 0 to every |subset sum - mixture| term.
template <typename scalar_t, typename acc_t>
inline void load_lanes(const scalar_t* __restrict__ src, int64_t count, acc_t* __restrict__ dst) {
  if (count == kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) dst[l] = static_cast<acc_t>(src[l]);
  } else {
    for (int64_t l = 0; l < kLanes; ++l) dst[l] = l < count ? static_cast<acc_t>(src[l]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
inline void store_lanes(const acc_t* __restrict__ src, int64_t count, scalar_t* __restrict__ dst) {
  if (count == kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) dst[l] = static_cast<scalar_t>(src[l]);
  } else {
    for (int64_t l = 0; l < count; ++l) dst[l] = static_cast<scalar_t>(src[l]);
  }
}

// Elements of D whose subset sums are formed before they are scored: the (2**M, chunk) table of
// subset sums stays in L1/L2 (32 KiB of floats), and each (mixture, subset) pair then streams
// through the whole chunk with its accumulators in registers instead of reloading them per 16 elements.
int64_t forward_chunk(int64_t num_masks) {
  int64_t chunk = 256;
  while (chunk > kLanes && chunk * num_masks > 8192) chunk /= 2;
  return chunk;
}

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
    const int64_t blocks = ceil_div(count, kLanes);
    // Singletons are the sources themselves; every other subset adds its highest source to a smaller one, so
    // S = ((x_a + x_b) + x_c) for a < b < c: the left-to-right order of the reference's sum over sources.
    // Candidates that tie mathematically (common for short signals) then also tie after rounding, and the
    // first one wins, as in the reference.
    for (int64_t s = 0; s < num_sources; ++s) {
      for (int64_t b = 0; b < blocks; ++b) {
        load_lanes(est_row + s * length + start + b * kLanes, std::min(kLanes, count - b * kLanes),
                   sums + (int64_t(1) << s) * chunk + b * kLanes);
      }
    }
    for (int64_t n = 0; n < num_mixtures; ++n) {
      for (int64_t b = 0; b < blocks; ++b) {
        load_lanes(mix_row + n * length + start + b * kLanes, std::min(kLanes, count - b * kLanes),
                   mix + n * chunk + b * kLanes);
      }
    }
    const int64_t padded = blocks * kLanes;
    int64_t highest = 1;
    for (int64_t mask = 3; mask < num_masks; ++mask) {
      if ((mask & (mask - 1)) == 0) {  // a singleton, already loaded
        highest = mask;
        continue;
      }
      const int64_t rest = mask ^ highest;
      const acc_t* __restrict__ prev = sums + rest * chunk;
      const acc_t* __restrict__ x = sums + highest * chunk;
      acc_t* __restrict__ sum = sums + mask * chunk;
      for (int64_t l = 0; l < padded; ++l) sum[l] = prev[l] + x[l];
    }
    for (int64_t mask = 0; mask < num_masks; ++mask) {
      const acc_t* __restrict__ sum = sums + mask * chunk;
      for (int64_t n = 0; n < num_mixtures; ++n) {
        const acc_t* __restrict__ m = mix + n * chunk;
        acc_t* __restrict__ total = lanes + (n * num_masks + mask) * kLanes;
        acc_t acc[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) acc[l] = total[l];
        for (int64_t b = 0; b < padded; b += kLanes) {
          for (int64_t l = 0; l < kLanes; ++l) acc[l] += std::abs(sum[b + l] - m[b + l]);
        }
        for (int64_t l = 0; l < kLanes; ++l) total[l] = acc[l];
      }
    }
  }
  for (int64_t i = 0; i < num_mixtures * num_masks; ++i) {
    acc_t total = acc_t(0);
    for (int64_t l = 0; l < kLanes; ++l) total += lanes[i * kLanes + l];
    partial[i] = total;
  }
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
      int64_t chosen = 0;
      acc_t chosen_total = acc_t(0);
      for (int64_t c = 0; c < num_candidates; ++c) {
        acc_t total = acc_t(0);
        for (int64_t n = 0; n < num_mixtures; ++n) total += totals[n * num_masks + mask_data[c * num_mixtures + n]];
        // torch.min: the first NaN wins over every number; otherwise the first minimum.
        if (std::isnan(total)) {
          chosen = c;
          chosen_total = total;
          break;
        }
        if (c == 0 || total < chosen_total) {
          chosen = c;
          chosen_total = total;
        }
      }
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
    for (int64_t s = 0; s < num_sources; ++s) {
      const scalar_t* __restrict__ x = est_row + s * length + start;
      acc_t* __restrict__ err = grad + owner[s] * kBackwardChunk;
      for (int64_t l = 0; l < size; ++l) err[l] += static_cast<acc_t>(x[l]);
    }
    for (int64_t n = 0; n < num_mixtures; ++n) {
      const scalar_t* __restrict__ m = mix_row + n * length + start;
      acc_t* __restrict__ g = grad + n * kBackwardChunk;
      for (int64_t l = 0; l < size; ++l) {
        const acc_t err = g[l] - static_cast<acc_t>(m[l]);
        // sign(0) = sign(NaN) = 0, like autograd's abs backward.
        const acc_t sign = static_cast<acc_t>(err > acc_t(0)) - static_cast<acc_t>(err < acc_t(0));
        g[l] = scale * sign;
      }
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
                                                        const at::Tensor& masks_in) {
  check_inputs(est_in, mixtures_in, masks_in);
  const at::Tensor est = est_in.contiguous(), mixtures = mixtures_in.contiguous(), masks = masks_in.contiguous();
  const auto loss_dtype = est.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({est.size(0)}, est.options().dtype(loss_dtype));
  at::Tensor best = at::empty({est.size(0)}, est.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, est.scalar_type(), "mixit_l1_forward_cpu", [&] {
    forward_impl<scalar_t>(est, mixtures, masks, row_loss, best);
  });
  return {row_loss, best};
}

std::tuple<at::Tensor, at::Tensor> mixit_l1_backward_cpu(const at::Tensor& grad_rows_in, const at::Tensor& est_in,
                                                         const at::Tensor& mixtures_in, const at::Tensor& best_in,
                                                         const at::Tensor& masks_in, bool mixtures_grad) {
  check_inputs(est_in, mixtures_in, masks_in);
  const at::Tensor est = est_in.contiguous(), mixtures = mixtures_in.contiguous(), masks = masks_in.contiguous();
  const auto acc_dtype = est.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor grad_rows = grad_rows_in.to(acc_dtype).contiguous();
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
