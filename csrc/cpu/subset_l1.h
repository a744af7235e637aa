// The MixIT subset search shared by the CPU kernels of the MixIT L1 (mixit_l1_cpu.cpp) and of the fused
// noise-robust loss (noise_robust_l1_cpu.cpp): lane accumulators, the chunked table of subset sums scored
// against every mixture, and the first-minimum choice over candidates.
//
// For every mixture n and every subset mask of the M sources, E[n][mask] = sum_d |S_mask(d) - mix_n(d)|, where
// the subset sums are built incrementally, S[mask] = S[mask without its highest bit] + est[highest bit].  A
// candidate's error is a sum of N of these terms, so N * 2**M partials cover all N**M candidates and nothing of
// size (candidates x D) is ever formed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../nrt_config.h"
#include "isa.h"
#include "lane_vector.h"

namespace nrt_kernels {
namespace subset_l1 {

// Every accumulated quantity sums into kLanes accumulators, lane l taking the elements d = l mod kLanes: a
// fixed-size local array that the compiler keeps in SIMD registers without -march (16 floats: 4 SSE or 2 AVX
// vectors).  Inputs are loaded in blocks of kLanes, zero-padded at the end of D.
constexpr int64_t kLanes = 16;
// Elements of D per forward work item.  It is a constant, not derived from the thread count, so the partials
// and hence every result are bitwise identical whatever the number of threads.  4096 keeps the partials
// buffer (N * 2**M values per tile) far below the input size and gives enough work items for a few threads at
// audio lengths.
constexpr int64_t kTile = 4096;
// Elements of D per backward work item, and per pass over its sources (the MixIT L1 backward; the fused V1/V2
// backward asks for its lines that far ahead): the chunk's errors, its input lines and the next chunk's lines asked
// for ahead stay in L1 together (at 512 they did not; measured slower: benchmarks/RESULTS.md).
constexpr int64_t kBackwardTile = 8192;
constexpr int64_t kBackwardChunk = 256;
// build_config.MAX_SOURCES: the subset table has 2**M entries.
constexpr int64_t kMaxSources = NRT_MAX_SOURCES;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Asks for the cache line at `address` ahead of its use (`kForWrite`: to be written).  The kernels read several
// streams a chunk at a time with a long computation between the chunks, which the hardware prefetchers do not
// follow; each asks for its next chunk while it works on the current one.  A hint only: no result changes.
template <bool kForWrite = false>
NRT_ALWAYS_INLINE void prefetch(const void* address) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(address, kForWrite ? 1 : 0);
#endif
}

// How many elements of a chunk of `count` at `start` have their next chunk, `ahead` elements on, before `end`.
inline int64_t look_ahead_count(int64_t start, int64_t count, int64_t ahead, int64_t end) {
  return std::max<int64_t>(0, std::min(count, end - start - ahead));
}

// Asks for the `count` elements at `src + offset` (one line per kLanes elements; no address is formed for 0).
template <bool kForWrite = false, typename scalar_t>
NRT_ALWAYS_INLINE void prefetch_elements(const scalar_t* src, int64_t offset, int64_t count) {
  for (int64_t b = 0; b < count; b += kLanes) prefetch<kForWrite>(src + offset + b);
}

// Loads `count` (<= kLanes) elements converted to the accumulation type, zero-padded: padded lanes add exactly
// 0 to every |a - b| term whose operands are both padded.
template <typename scalar_t, typename acc_t>
NRT_ALWAYS_INLINE void load_lanes(const scalar_t* __restrict__ src, int64_t count, acc_t* __restrict__ dst) {
  if (count == kLanes) {
    // As one vector: GCC assembled the element-wise copy from scalar inserts (a fifth of the MixIT forward).
    const auto block = load_vector<acc_t, kLanes>(src, kLanes);
    std::memcpy(dst, &block, sizeof block);
  } else {
    for (int64_t l = 0; l < kLanes; ++l) dst[l] = l < count ? static_cast<acc_t>(src[l]) : acc_t(0);
  }
}

// Loads `count` elements of one row into a chunk buffer, zero-padded to whole lane blocks, and asks block by block
// for the first `ahead_count` elements `ahead` elements on.
template <typename scalar_t, typename acc_t>
NRT_ALWAYS_INLINE void load_chunk(const scalar_t* src, int64_t count, acc_t* dst, int64_t ahead, int64_t ahead_count) {
  for (int64_t b = 0; b < count; b += kLanes) {
    if (b < ahead_count) prefetch(src + ahead + b);
    load_lanes(src + b, std::min(kLanes, count - b), dst + b);
  }
}

// sign(0) = sign(NaN) = 0, like autograd's abs backward.
template <typename acc_t>
NRT_ALWAYS_INLINE acc_t sign(acc_t x) {
  return static_cast<acc_t>(x > acc_t(0)) - static_cast<acc_t>(x < acc_t(0));
}

// lanes[l] += |a - b| over `padded` (a multiple of kLanes) elements, lane l taking the elements l mod kLanes.
template <typename acc_t>
NRT_ALWAYS_INLINE void accumulate_l1(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t padded,
                                     acc_t* __restrict__ lanes) {
  acc_t acc[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) acc[l] = lanes[l];
  for (int64_t start = 0; start < padded; start += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += std::abs(a[start + l] - b[start + l]);
  }
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = acc[l];
}

// accumulate_l1 of subsets a0 and a1 against mixtures b0 and b1 at once, into lanes0 (a0 - b0), lanes0 + kLanes
// (a1 - b0), lanes1 (a0 - b1) and lanes1 + kLanes (a1 - b1): each block of a subset or a mixture is loaded once for two
// sums, and the four sums are independent chains in registers (pair by pair, each add waited for the one before it:
// the MixIT forward was 12-22 % slower).  Each sum still adds its blocks in increasing order: the same bits as
// accumulate_l1 pair by pair.
template <typename acc_t>
NRT_ALWAYS_INLINE void accumulate_l1_2x2(const acc_t* __restrict__ a0, const acc_t* __restrict__ a1,
                                         const acc_t* __restrict__ b0, const acc_t* __restrict__ b1, int64_t padded,
                                         acc_t* __restrict__ lanes0, acc_t* __restrict__ lanes1) {
  acc_t acc00[kLanes], acc10[kLanes], acc01[kLanes], acc11[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    acc00[l] = lanes0[l];
    acc10[l] = lanes0[kLanes + l];
    acc01[l] = lanes1[l];
    acc11[l] = lanes1[kLanes + l];
  }
  for (int64_t start = 0; start < padded; start += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t x0 = a0[start + l], x1 = a1[start + l], y0 = b0[start + l], y1 = b1[start + l];
      acc00[l] += std::abs(x0 - y0);
      acc10[l] += std::abs(x1 - y0);
      acc01[l] += std::abs(x0 - y1);
      acc11[l] += std::abs(x1 - y1);
    }
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    lanes0[l] = acc00[l];
    lanes0[kLanes + l] = acc10[l];
    lanes1[l] = acc01[l];
    lanes1[kLanes + l] = acc11[l];
  }
}

// The lanes' total, in a fixed order.
template <typename acc_t>
NRT_ALWAYS_INLINE acc_t lane_total(const acc_t* lanes) {
  acc_t total = acc_t(0);
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Elements of D whose subset sums are formed before they are scored: the (2**M, chunk) table of subset sums
// stays in L1/L2 (32 KiB of floats), and each (mixture, subset) pair then streams through the whole chunk with
// its accumulators in registers instead of reloading them per 16 elements.
inline int64_t forward_chunk(int64_t num_masks) {
  int64_t chunk = 256;
  while (chunk > kLanes && chunk * num_masks > 8192) chunk /= 2;
  return chunk;
}

// Scores one chunk: `sums` is the [2**M][chunk] table with row 0 zero (the empty subset) and the singleton rows
// 1 << s holding source s, `mix` the [N][chunk] mixtures, both zero-padded to `padded` (a multiple of kLanes).
// Fills the other subset rows and adds |S_mask - mix_n| into lanes[(n * 2**M + mask) * kLanes + l].
template <typename acc_t>
NRT_ALWAYS_INLINE void score_subsets(acc_t* sums, const acc_t* mix, int64_t num_sources, int64_t num_mixtures,
                                     int64_t chunk, int64_t padded, acc_t* lanes) {
  const int64_t num_masks = int64_t(1) << num_sources;
  // Singletons are the sources themselves; every other subset adds its highest source to a smaller one, so
  // S = ((x_a + x_b) + x_c) for a < b < c: the left-to-right order of the reference's sum over sources.
  // Candidates that tie mathematically (common for short signals) then also tie after rounding, and the first
  // one wins, as in the reference.
  int64_t highest = 1;
  for (int64_t mask = 3; mask < num_masks; ++mask) {
    if ((mask & (mask - 1)) == 0) {  // a singleton, already loaded
      highest = mask;
      continue;
    }
    const acc_t* __restrict__ prev = sums + (mask ^ highest) * chunk;
    const acc_t* __restrict__ x = sums + highest * chunk;
    acc_t* __restrict__ sum = sums + mask * chunk;
    for (int64_t l = 0; l < padded; ++l) sum[l] = prev[l] + x[l];
  }
  if (num_mixtures == 2) {  // MixIT's case, V1's and V2's: two subsets (2**M is even) against both mixtures at once
    for (int64_t mask = 0; mask < num_masks; mask += 2) {
      accumulate_l1_2x2(sums + mask * chunk, sums + (mask + 1) * chunk, mix, mix + chunk, padded,
                        lanes + mask * kLanes, lanes + (num_masks + mask) * kLanes);
    }
    return;
  }
  for (int64_t mask = 0; mask < num_masks; ++mask) {
    for (int64_t n = 0; n < num_mixtures; ++n) {
      accumulate_l1(sums + mask * chunk, mix + n * chunk, padded, lanes + (n * num_masks + mask) * kLanes);
    }
  }
}

// The candidate a row keeps, given its per-(mixture, subset) totals [N][2**M] and the (P, N) candidate masks:
// torch.min semantics, the first NaN over every number, otherwise the first minimum.
template <typename acc_t>
inline void select_candidate(const acc_t* totals, const int32_t* masks, int64_t num_candidates, int64_t num_mixtures,
                             int64_t num_masks, int64_t* chosen, acc_t* chosen_total) {
  *chosen = 0;
  *chosen_total = acc_t(0);
  for (int64_t c = 0; c < num_candidates; ++c) {
    acc_t total = acc_t(0);
    for (int64_t n = 0; n < num_mixtures; ++n) total += totals[n * num_masks + masks[c * num_mixtures + n]];
    if (std::isnan(total)) {
      *chosen = c;
      *chosen_total = total;
      return;
    }
    if (c == 0 || total < *chosen_total) {
      *chosen = c;
      *chosen_total = total;
    }
  }
}

}  // namespace subset_l1
}  // namespace nrt_kernels
