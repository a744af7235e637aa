// CPU kernels of the fused noise-robust loss (iSeparate-SDX V1/V2): L1 + mixture consistency + MixIT + teacher L1,
// the algorithm of the Triton kernels in nrt_kernels/ops/noise_robust_l1/triton.py on the subset search of subset_l1.h.
//
// Forward, stage 1 (parallel over (row, tile of D), fixed tiles): one pass over est, targets and teacher targets
// chunk by chunk.  Per source it adds |est - y| and |est - teacher| into that source's lane accumulators, sums the
// targets into the two mixtures of the row's pairing (and est and targets into their totals for the consistency
// term), then scores every subset of est against both mixtures (the MixIT search).  A tile reports
// 2 * 2**S MixIT partials, S l1 and S teacher partials (unweighted: source weights multiply the per-source totals
// once, at the end) and one consistency partial.  Stage 2 (per row) adds the tiles in
// increasing order and keeps the first minimum over candidates, NaN first; stage 3 (one thread) adds the rows in
// increasing order and combines the terms.  Every sum has a fixed order: results are bitwise identical for any
// number of threads.
//
// Backward (parallel over (row, tile)), one vector block at a time (backward_lanes), in registers: a pass over the
// sources' est and targets forms the sums behind the signs every source shares (the chosen candidate's two mixture
// errors, the consistency error); a second pass over the sources, their est and targets still in L1, adds each
// source's own l1 and teacher gradient and those: grad = the l1, teacher, consistency and MixIT gradients in that
// order.
//
// A term whose weight is 0 reads nothing and computes nothing.
#include "noise_robust_l1_cpu.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include "lane_vector.h"
#include "subset_l1.h"

namespace nrt_kernels {
namespace {

using namespace subset_l1;

constexpr int64_t kNumTerms = 4;
constexpr int64_t kMixtures = 2;  // the pairing forms two mixtures from the noisy stems

// Which terms run: a non-zero weight (and, for the teacher term, teacher targets).
struct ActiveTerms {
  bool l1, consistency, mixit, teacher, source_weighted;

  bool reads_targets() const { return l1 || consistency || mixit; }
};

ActiveTerms active_terms(const std::vector<double>& weights, const at::Tensor& teacher,
                         const at::Tensor& source_weights) {
  return {weights[0] != 0, weights[1] != 0, weights[2] != 0, weights[3] != 0 && teacher.numel() > 0,
          source_weights.numel() > 0};
}

// The per-source loops are compiled once per set of active terms (bits of kTerms), so each runs one branch-free
// pass over its inputs; the set is picked once per call (`term_set`).
constexpr int kL1 = 1, kConsistency = 2, kMixit = 4, kTeacher = 8, kNumTermSets = 16;

int term_set(const ActiveTerms& use) {
  return (use.l1 ? kL1 : 0) | (use.consistency ? kConsistency : 0) | (use.mixit ? kMixit : 0) |
         (use.teacher ? kTeacher : 0);
}

// table[terms] = Pick<terms>::value for every term set: the instantiation that runs a call.
template <template <int> class Pick, int... kTerms>
auto term_set_table(std::integer_sequence<int, kTerms...>) {
  using Function = decltype(Pick<0>::value);
  return std::array<Function, sizeof...(kTerms)>{Pick<kTerms>::value...};
}

template <template <int> class Pick>
auto for_term_set(int terms) {
  static const auto table = term_set_table<Pick>(std::make_integer_sequence<int, kNumTermSets>{});
  return table[terms];
}

// The values one forward tile reports, in this order.
struct TileLayout {
  int64_t num_sources, num_masks;

  int64_t mixit() const { return 0; }                             // [2][2**S] MixIT partials
  int64_t l1() const { return kMixtures * num_masks; }            // [S]
  int64_t teacher() const { return l1() + num_sources; }          // [S]
  int64_t consistency() const { return teacher() + num_sources; }  // [1]
  int64_t size() const { return consistency() + 1; }
};

// The mixture a noisy stem joins under the row's pairing: 0 when its bit is set.
inline int64_t pairing_mixture(int32_t pair_mask, int64_t source) { return ((pair_mask >> source) & 1) ? 0 : 1; }

// The look-ahead of both directions (subset_l1.h's prefetch): while the forward's loop over a source works on a
// block of a chunk, it asks for the same block of the source's next chunk; the backward asks, block by block, for
// every stream's block kBackwardChunk elements on.  A row's 3 * S input streams (and S gradient streams) are more than
// the hardware prefetchers follow, and the V1/V2 inputs rarely stay in the last-level cache between forward and
// backward; asked for block by block, the lines arrive spread over the whole chunk instead of in one burst at its
// top (measured slower: benchmarks/RESULTS.md).  A forward without MixIT streams with no search between its loads,
// and there the hardware prefetchers alone are faster: it asks for nothing.

// Asks for the element at `offset` of a source's inputs, those its terms read (y and teacher may be null otherwise).
template <int kTerms, typename scalar_t>
NRT_ALWAYS_INLINE void prefetch_inputs(const scalar_t* est, const scalar_t* y, const scalar_t* teacher,
                                       int64_t offset) {
  prefetch(est + offset);
  if constexpr ((kTerms & (kL1 | kConsistency | kMixit)) != 0) prefetch(y + offset);
  if constexpr ((kTerms & kTeacher) != 0) prefetch(teacher + offset);
}

// One source's share of a forward chunk of `count` elements, read straight from the inputs: |est - y| and
// |est - teacher| into the source's lanes (element i into lane i mod kLanes), est into `x` (its row of the
// subset table), y into its pairing mixture `mix`, est and y into the totals.
template <int kTerms, typename scalar_t, typename acc_t>
NRT_ISA_CLONES void source_partials(const scalar_t* __restrict__ est, const scalar_t* __restrict__ y,
                                    const scalar_t* __restrict__ teacher, int64_t count, acc_t* __restrict__ x,
                                    acc_t* __restrict__ mix, acc_t* __restrict__ est_total,
                                    acc_t* __restrict__ y_total, acc_t* __restrict__ l1_lanes,
                                    acc_t* __restrict__ teacher_lanes, int64_t ahead, int64_t ahead_count) {
  constexpr bool kTargets = (kTerms & (kL1 | kConsistency | kMixit)) != 0;
  acc_t l1[kLanes], dist[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    l1[l] = l1_lanes[l];
    dist[l] = teacher_lanes[l];
  }
  auto element = [&](int64_t i, int64_t l) {
    const acc_t e = static_cast<acc_t>(est[i]);
    if constexpr ((kTerms & kMixit) != 0) x[i] = e;
    if constexpr (kTargets) {
      const acc_t target = static_cast<acc_t>(y[i]);
      if constexpr ((kTerms & kL1) != 0) l1[l] += std::abs(e - target);
      if constexpr ((kTerms & kMixit) != 0) mix[i] += target;
      if constexpr ((kTerms & kConsistency) != 0) {
        est_total[i] += e;
        y_total[i] += target;
      }
    }
    if constexpr ((kTerms & kTeacher) != 0) dist[l] += std::abs(e - static_cast<acc_t>(teacher[i]));
  };
  const int64_t full = count - count % kLanes;
  for (int64_t b = 0; b < full; b += kLanes) {
    if (b < ahead_count) prefetch_inputs<kTerms>(est, y, teacher, ahead + b);
    for (int64_t l = 0; l < kLanes; ++l) element(b + l, l);
  }
  for (int64_t i = full; i < count; ++i) element(i, i - full);
  for (int64_t l = 0; l < kLanes; ++l) {
    l1_lanes[l] = l1[l];
    teacher_lanes[l] = dist[l];
  }
}

template <typename scalar_t, typename acc_t>
using SourcePartials = void (*)(const scalar_t*, const scalar_t*, const scalar_t*, int64_t, acc_t*, acc_t*, acc_t*,
                                acc_t*, acc_t*, acc_t*, int64_t, int64_t);

template <typename scalar_t, typename acc_t>
struct PickSourcePartials {
  template <int kTerms>
  struct For {
    static constexpr SourcePartials<scalar_t, acc_t> value = &source_partials<kTerms, scalar_t, acc_t>;
  };
};

// Stage 1 for one (row, tile) over [begin, end).  `workspace`: the [2**S][chunk] subset table (with MixIT; else
// one chunk for est), [2][chunk] mixtures, [2][chunk] totals, then the lane accumulators, one kLanes block per
// reported value.
template <typename scalar_t, typename acc_t>
NRT_ISA_CLONES void tile_partials(const scalar_t* est_row, const scalar_t* y_row, const scalar_t* teacher_row,
                                  int32_t pair_mask, ActiveTerms use, SourcePartials<scalar_t, acc_t> source_fn,
                                  TileLayout layout, int64_t length, int64_t begin, int64_t end, int64_t chunk,
                                  acc_t* workspace, acc_t* partial) {
  const int64_t num_sources = layout.num_sources;
  acc_t* __restrict__ sums = workspace;
  acc_t* __restrict__ mix = sums + (use.mixit ? layout.num_masks : 1) * chunk;
  acc_t* __restrict__ est_total = mix + kMixtures * chunk;
  acc_t* __restrict__ y_total = est_total + chunk;
  acc_t* __restrict__ lanes = y_total + chunk;
  std::fill(lanes, lanes + layout.size() * kLanes, acc_t(0));
  std::fill(sums, sums + chunk, acc_t(0));  // the empty subset

  for (int64_t start = begin; start < end; start += chunk) {
    const int64_t count = std::min(chunk, end - start);
    // Elements past `count` up to a whole lane block are zero in every row that is scored: they add exactly 0.
    const int64_t padded = ceil_div(count, kLanes) * kLanes;
    if (use.mixit) std::fill(mix, mix + kMixtures * chunk, acc_t(0));
    if (use.consistency) {
      std::fill(est_total, est_total + padded, acc_t(0));
      std::fill(y_total, y_total + padded, acc_t(0));
    }
    for (int64_t s = 0; s < num_sources; ++s) {
      acc_t* x = sums + (use.mixit ? (int64_t(1) << s) : 0) * chunk;  // with MixIT, its singleton row
      const int64_t offset = s * length + start;
      source_fn(est_row + offset, use.reads_targets() ? y_row + offset : nullptr,
                use.teacher ? teacher_row + offset : nullptr, count, x,
                mix + pairing_mixture(pair_mask, s) * chunk, est_total, y_total,
                lanes + (layout.l1() + s) * kLanes, lanes + (layout.teacher() + s) * kLanes, chunk,
                use.mixit ? look_ahead_count(start, count, chunk, end) : 0);
      std::fill(x + count, x + padded, acc_t(0));
    }
    if (use.consistency) accumulate_l1(est_total, y_total, padded, lanes + layout.consistency() * kLanes);
    if (use.mixit) score_subsets(sums, mix, num_sources, kMixtures, chunk, padded, lanes);
  }
  for (int64_t i = 0; i < layout.size(); ++i) partial[i] = lane_total(lanes + i * kLanes);
}

template <typename scalar_t>
void forward_impl(const at::Tensor& est, const at::Tensor& targets, const at::Tensor& teacher,
                  const at::Tensor& pair_masks, const at::Tensor& source_weights, const at::Tensor& masks,
                  const std::vector<double>& weights, double divisor, ActiveTerms use, at::Tensor& loss,
                  at::Tensor& terms, at::Tensor& best) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = est.size(0), num_sources = est.size(1), length = est.size(2);
  const int64_t num_masks = int64_t(1) << num_sources;
  const TileLayout layout{num_sources, num_masks};
  const int64_t per_tile = layout.size();
  const int64_t num_tiles = ceil_div(length, kTile);
  // Without MixIT no subset table is built: a larger chunk serves the elementwise terms.
  const int64_t chunk = use.mixit ? forward_chunk(num_masks) : 256;
  const scalar_t* est_data = est.const_data_ptr<scalar_t>();
  const scalar_t* y_data = use.reads_targets() ? targets.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* teacher_data = use.teacher ? teacher.const_data_ptr<scalar_t>() : nullptr;
  const int32_t* pair_data = pair_masks.const_data_ptr<int32_t>();
  std::vector<acc_t> partials(static_cast<size_t>(batch * num_tiles * per_tile));

  const auto source_fn = for_term_set<PickSourcePartials<scalar_t, acc_t>::template For>(term_set(use));
  at::parallel_for(0, batch * num_tiles, 1, [&](int64_t first, int64_t last) {
    const int64_t table = (use.mixit ? num_masks : 1) * chunk;
    std::vector<acc_t> workspace(static_cast<size_t>(table + (kMixtures + 2) * chunk + per_tile * kLanes));
    for (int64_t item = first; item < last; ++item) {
      const int64_t row = item / num_tiles, tile = item % num_tiles;
      const int64_t row_offset = row * num_sources * length;
      tile_partials<scalar_t, acc_t>(est_data + row_offset, y_data ? y_data + row_offset : nullptr,
                                     teacher_data ? teacher_data + row_offset : nullptr, pair_data[row], use,
                                     source_fn, layout, length, tile * kTile, std::min(length, (tile + 1) * kTile),
                                     chunk, workspace.data(), partials.data() + item * per_tile);
    }
  });

  // Stage 2, per row: the tiles in increasing order; the MixIT row loss of the row's first minimum.
  std::vector<acc_t> row_totals(static_cast<size_t>(batch * per_tile));
  std::vector<acc_t> row_loss(static_cast<size_t>(batch), acc_t(0));
  int64_t* best_data = best.data_ptr<int64_t>();
  const int32_t* mask_data = masks.const_data_ptr<int32_t>();
  const int64_t num_candidates = masks.size(0);
  const acc_t mixit_count = static_cast<acc_t>(kMixtures * length);
  at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const acc_t* row_partials = partials.data() + row * num_tiles * per_tile;
      acc_t* totals = row_totals.data() + row * per_tile;
      std::copy(row_partials, row_partials + per_tile, totals);
      for (int64_t tile = 1; tile < num_tiles; ++tile) {
        for (int64_t i = 0; i < per_tile; ++i) totals[i] += row_partials[tile * per_tile + i];
      }
      best_data[row] = 0;
      if (use.mixit) {
        acc_t chosen_total;
        select_candidate(totals + layout.mixit(), mask_data, num_candidates, kMixtures, num_masks, &best_data[row],
                         &chosen_total);
        row_loss[row] = chosen_total / mixit_count;
      }
    }
  });

  // Stage 3: the rows in increasing order, then the terms.  Source weights multiply per-source totals here.
  const acc_t* source_weight = use.source_weighted ? source_weights.const_data_ptr<acc_t>() : nullptr;
  const acc_t count = static_cast<acc_t>(batch) * static_cast<acc_t>(length);
  const acc_t source_count = use.source_weighted ? count : count * static_cast<acc_t>(num_sources);
  auto source_term = [&](int64_t first_value) {
    acc_t total = acc_t(0);
    for (int64_t s = 0; s < num_sources; ++s) {
      acc_t source_total = acc_t(0);
      for (int64_t row = 0; row < batch; ++row) source_total += row_totals[row * per_tile + first_value + s];
      total += use.source_weighted ? source_weight[s] * source_total : source_total;
    }
    return total / source_count;
  };
  acc_t value[kNumTerms] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  if (use.l1) value[0] = source_term(layout.l1());
  if (use.consistency) {
    acc_t total = acc_t(0);
    for (int64_t row = 0; row < batch; ++row) total += row_totals[row * per_tile + layout.consistency()];
    value[1] = total / count;
  }
  if (use.mixit) {
    acc_t total = acc_t(0);
    for (int64_t row = 0; row < batch; ++row) total += row_loss[row];
    value[2] = total / static_cast<acc_t>(batch);
  }
  if (use.teacher) value[3] = source_term(layout.teacher());
  const bool on[kNumTerms] = {use.l1, use.consistency, use.mixit, use.teacher};
  acc_t weighted = acc_t(0);
  acc_t* terms_data = terms.data_ptr<acc_t>();
  for (int64_t i = 0; i < kNumTerms; ++i) {
    if (on[i]) weighted += static_cast<acc_t>(weights[i]) * value[i];
    terms_data[i] = value[i];
  }
  *loss.data_ptr<acc_t>() = weighted / static_cast<acc_t>(divisor);
}

// The backward's lane blocks: kWidth values as one LaneVector (lane_vector.h; the kernels need a GNU-compatible
// compiler anyway: __restrict__, target clones), lowered to the ISA's registers.  Each source's sums stay in
// registers whatever the term set (written over local arrays, GCC's vectoriser left some term sets scalar), and no
// chunk buffer goes through L1 twice (chunk by chunk, V1's backward moved its bytes at half the rate of an l1 +
// teacher backward).  The width is one register where AVX-512 has it (16 floats, 8 doubles; 16 floats were 14-27 %
// faster than 8 there), 8 lanes otherwise: at 16 floats the AVX2 build spilled its 2-register vectors (2x slower).
// The backward is elementwise, so the width changes no result.
template <typename acc_t>
constexpr int64_t backward_lanes(Isa isa) {
  return isa == Isa::kAvx512 ? int64_t(64 / sizeof(acc_t)) : 8;
}

// The first `count` lanes of the kWidth-lane vector `v` into dst, converted to its dtype.
template <int64_t kWidth, typename scalar_t, typename Vector>
NRT_ALWAYS_INLINE void store_vector(const Vector& v, int64_t count, scalar_t* dst) {
  if constexpr (sizeof(Vector) == kWidth * sizeof(scalar_t)) {  // the accumulation dtype itself
    if (count == kWidth) {
      std::memcpy(dst, &v, sizeof v);
      return;
    }
  }
  for (int64_t l = 0; l < count; ++l) dst[l] = static_cast<scalar_t>(v[l]);
}

// The bits of the accumulation dtype that vector_sign works on.
template <typename acc_t>
struct FloatBits;
template <>
struct FloatBits<float> {
  using Int = int32_t;
  static constexpr Int kSign = INT32_MIN, kMagnitude = 0x7FFFFFFF, kInfinity = 0x7F800000, kOne = 0x3F800000;
  static constexpr int kTopBit = 31;
};
template <>
struct FloatBits<double> {
  using Int = int64_t;
  static constexpr Int kSign = INT64_MIN, kMagnitude = 0x7FFFFFFFFFFFFFFF, kInfinity = 0x7FF0000000000000,
                       kOne = 0x3FF0000000000000;
  static constexpr int kTopBit = 63;
};

// sign() lane by lane, bit for bit the values (x > 0) - (x < 0) of sign(): +-1 with x's sign bit, +0 where x is 0 or
// NaN.  In integer arithmetic on the bits: GCC 12 lowers a comparison of vectors wider than the ISA's registers lane
// by lane (with 16 lanes, the AVX2 build of this backward was 4x slower than the kernel it replaced), shifts and
// masks piecewise.
template <typename acc_t, typename Vector>
NRT_ALWAYS_INLINE Vector vector_sign(const Vector& x) {
  using Bits = FloatBits<acc_t>;
  typedef typename Bits::Int Ints __attribute__((vector_size(sizeof(Vector))));
  const Ints bits = (Ints)x;  // a vector cast: the same bits
  const Ints magnitude = bits & Bits::kMagnitude;
  // All ones where the magnitude is above infinity's (NaN) or 0, from the top bit of a difference.
  const Ints no_sign = ((Bits::kInfinity - magnitude) >> Bits::kTopBit) | ((magnitude - 1) >> Bits::kTopBit);
  return (Vector)(((bits & Bits::kSign) | Bits::kOne) & ~no_sign);
}

// The gradient coefficients of one call, each term's d loss / d |error| at grad_loss.
template <typename acc_t>
struct Coefficients {
  acc_t l1[kMaxSources], teacher[kMaxSources];  // per source: source weights folded in
  acc_t consistency, mixit;
};

// Backward for one row over [begin, end), one lane block at a time.  A first pass over the sources adds est into its
// mixture under the chosen candidate, y into its pairing mixture and both into the totals, in increasing source
// order as in the forward; the signs every source shares follow.  A second pass over the sources, their est and
// targets still in L1, adds each source's own terms and those: grad = the l1, teacher, consistency and MixIT
// gradients in that order, as the Triton backward adds them.
template <typename scalar_t, typename acc_t>
struct GradientTile {
  const scalar_t *est_row, *y_row, *teacher_row;
  const int64_t *chosen_mixture, *target_mixture;
  const Coefficients<acc_t>* coef;
  int64_t num_sources, length, begin, end;
  scalar_t* grad_row;
};

template <int kTerms, int64_t kWidth, typename scalar_t, typename acc_t>
NRT_ALWAYS_INLINE void tile_gradients(const GradientTile<scalar_t, acc_t>& tile) {
  static_assert(kLanes % kWidth == 0, "a look-ahead step is whole vector blocks");
  constexpr bool kMixitTerm = (kTerms & kMixit) != 0, kConsistencyTerm = (kTerms & kConsistency) != 0;
  using Vector = typename LaneVector<acc_t, kWidth>::type;
  const scalar_t* const est_row = tile.est_row;
  const scalar_t* const y_row = tile.y_row;
  const scalar_t* const teacher_row = tile.teacher_row;
  const int64_t* const chosen_mixture = tile.chosen_mixture;
  const int64_t* const target_mixture = tile.target_mixture;
  const Coefficients<acc_t>& coef = *tile.coef;
  const int64_t num_sources = tile.num_sources, length = tile.length, begin = tile.begin, end = tile.end;
  scalar_t* const grad_row = tile.grad_row;
  // Inlined into each ISA variant: left out of line (as GCC did for the larger term sets), a lambda is compiled for
  // the baseline ISA (V1's backward was then 7x slower).
  auto block = [&](int64_t start, int64_t count) NRT_INLINE_LAMBDA {
    // Each shared term's signed coefficient per lane (MixIT: per mixture of the chosen candidate).
    // (Named per mixture: vector arrays indexed by the mixture at run time went through memory, 20-25 % slower.)
    Vector mixit0 = {}, mixit1 = {}, consistency = {};
    if constexpr (kMixitTerm || kConsistencyTerm) {
      Vector est_mix0 = {}, est_mix1 = {}, y_mix0 = {}, y_mix1 = {}, est_total = {}, y_total = {};
      for (int64_t s = 0; s < num_sources; ++s) {
        const Vector e = load_vector<acc_t, kWidth>(est_row + s * length + start, count);
        const Vector y = load_vector<acc_t, kWidth>(y_row + s * length + start, count);
        if constexpr (kMixitTerm) {
          if (chosen_mixture[s] == 0) {
            est_mix0 += e;
          } else {
            est_mix1 += e;
          }
          if (target_mixture[s] == 0) {
            y_mix0 += y;
          } else {
            y_mix1 += y;
          }
        }
        if constexpr (kConsistencyTerm) {
          est_total += e;
          y_total += y;
        }
      }
      if constexpr (kMixitTerm) {
        mixit0 = coef.mixit * vector_sign<acc_t>(est_mix0 - y_mix0);
        mixit1 = coef.mixit * vector_sign<acc_t>(est_mix1 - y_mix1);
      }
      if constexpr (kConsistencyTerm) consistency = coef.consistency * vector_sign<acc_t>(est_total - y_total);
    }
    for (int64_t s = 0; s < num_sources; ++s) {
      const int64_t offset = s * length + start;
      const Vector e = load_vector<acc_t, kWidth>(est_row + offset, count);
      Vector g = {};
      if constexpr ((kTerms & kL1) != 0) {
        g += coef.l1[s] * vector_sign<acc_t>(e - load_vector<acc_t, kWidth>(y_row + offset, count));
      }
      if constexpr ((kTerms & kTeacher) != 0) {
        g += coef.teacher[s] * vector_sign<acc_t>(e - load_vector<acc_t, kWidth>(teacher_row + offset, count));
      }
      if constexpr (kConsistencyTerm) g += consistency;
      if constexpr (kMixitTerm) g += chosen_mixture[s] == 0 ? mixit0 : mixit1;
      store_vector<kWidth>(g, count, grad_row + offset);
    }
  };
  // kLanes elements a step: the look-ahead (prefetch_inputs), one line of every stream kBackwardChunk elements on,
  // then kLanes / kWidth vector blocks.
  for (int64_t start = begin; start < end; start += kLanes) {
    if (start + kBackwardChunk < end) {
      for (int64_t s = 0; s < num_sources; ++s) {
        const int64_t offset = s * length + start + kBackwardChunk;
        prefetch_inputs<kTerms>(est_row, y_row, teacher_row, offset);
        prefetch</*kForWrite=*/true>(grad_row + offset);
      }
    }
    for (int64_t first = start; first < std::min(end, start + kLanes); first += kWidth) {
      if (first + kWidth <= end) {
        block(first, kWidth);  // a constant count: plain vector loads and stores
      } else {
        block(first, end - first);  // the row's last elements
      }
    }
  }
}

// tile_gradients compiled for each ISA at its width (isa.h: one body would serve every target_clones clone at one
// width), in a table per ISA and term set.
template <typename scalar_t, typename acc_t>
struct PickTileGradients {
  using Tile = GradientTile<scalar_t, acc_t>;
  using Function = void (*)(const Tile&);
  template <int kTerms>
  static NRT_TARGET_AVX512 void avx512(const Tile& tile) {
    tile_gradients<kTerms, backward_lanes<acc_t>(Isa::kAvx512)>(tile);
  }
  template <int kTerms>
  static NRT_TARGET_AVX2 void avx2(const Tile& tile) {
    tile_gradients<kTerms, backward_lanes<acc_t>(Isa::kAvx2)>(tile);
  }
  template <int kTerms>
  static void baseline(const Tile& tile) {
    tile_gradients<kTerms, backward_lanes<acc_t>(Isa::kBaseline)>(tile);
  }
  template <Isa kIsa>
  struct On {
    template <int kTerms>
    struct For {
      static constexpr Function value = kIsa == Isa::kAvx512 ? &avx512<kTerms>
                                        : kIsa == Isa::kAvx2 ? &avx2<kTerms>
                                                             : &baseline<kTerms>;
    };
  };

  static Function pick(int terms) {
    if constexpr (NRT_ISA_DISPATCH) {
      const Isa isa = native_isa();
      if (isa == Isa::kAvx512) return for_term_set<On<Isa::kAvx512>::template For>(terms);
      if (isa == Isa::kAvx2) return for_term_set<On<Isa::kAvx2>::template For>(terms);
    }
    return for_term_set<On<Isa::kBaseline>::template For>(terms);
  }
};

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_loss, const at::Tensor& est, const at::Tensor& targets,
                   const at::Tensor& teacher, const at::Tensor& pair_masks, const at::Tensor& source_weights,
                   const at::Tensor& best, const at::Tensor& masks, const std::vector<double>& weights,
                   double divisor, ActiveTerms use, at::Tensor& grad_est) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = est.size(0), num_sources = est.size(1), length = est.size(2);
  const int64_t num_tiles = ceil_div(length, kBackwardTile);
  // d loss / d term = grad_loss * weight / divisor, then the term's mean: as the Triton backward forms them.
  const acc_t scale = *grad_loss.const_data_ptr<acc_t>() / static_cast<acc_t>(divisor);
  const acc_t count = static_cast<acc_t>(batch) * static_cast<acc_t>(length);
  const acc_t source_count = use.source_weighted ? count : count * static_cast<acc_t>(num_sources);
  const acc_t* source_weight = use.source_weighted ? source_weights.const_data_ptr<acc_t>() : nullptr;
  Coefficients<acc_t> coef;
  const acc_t coef_l1 = scale * static_cast<acc_t>(weights[0]) / source_count;
  const acc_t coef_teacher = scale * static_cast<acc_t>(weights[3]) / source_count;
  for (int64_t s = 0; s < num_sources; ++s) {
    coef.l1[s] = use.source_weighted ? coef_l1 * source_weight[s] : coef_l1;
    coef.teacher[s] = use.source_weighted ? coef_teacher * source_weight[s] : coef_teacher;
  }
  coef.consistency = scale * static_cast<acc_t>(weights[1]) / count;
  coef.mixit = scale * static_cast<acc_t>(weights[2]) / (count * static_cast<acc_t>(kMixtures));

  const scalar_t* est_data = est.const_data_ptr<scalar_t>();
  const scalar_t* y_data = use.reads_targets() ? targets.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* teacher_data = use.teacher ? teacher.const_data_ptr<scalar_t>() : nullptr;
  const int32_t* pair_data = pair_masks.const_data_ptr<int32_t>();
  const int64_t* best_data = best.const_data_ptr<int64_t>();
  const int32_t* mask_data = masks.const_data_ptr<int32_t>();
  scalar_t* grad_data = grad_est.data_ptr<scalar_t>();

  const auto gradients_fn = PickTileGradients<scalar_t, acc_t>::pick(term_set(use));
  at::parallel_for(0, batch * num_tiles, 1, [&](int64_t first, int64_t last) {
    int64_t chosen_mixture[kMaxSources] = {}, target_mixture[kMaxSources] = {};
    for (int64_t item = first; item < last; ++item) {
      // Last tile first: the backward starts where the forward ended, on inputs still in the cache (and ends where
      // the next forward starts).
      const int64_t reversed = batch * num_tiles - 1 - item;
      const int64_t row = reversed / num_tiles, tile = reversed % num_tiles;
      if (use.mixit) {
        const int32_t* candidate = mask_data + best_data[row] * kMixtures;
        for (int64_t s = 0; s < num_sources; ++s) {
          chosen_mixture[s] = ((candidate[0] >> s) & 1) ? 0 : 1;
          target_mixture[s] = pairing_mixture(pair_data[row], s);
        }
      }
      const int64_t row_offset = row * num_sources * length;
      gradients_fn({est_data + row_offset, y_data ? y_data + row_offset : nullptr,
                    teacher_data ? teacher_data + row_offset : nullptr, chosen_mixture, target_mixture, &coef,
                    num_sources, length, tile * kBackwardTile, std::min(length, (tile + 1) * kBackwardTile),
                    grad_data + row_offset});
    }
  });
}

void check_inputs(const at::Tensor& est, const at::Tensor& targets, const at::Tensor& teacher,
                  const at::Tensor& pair_masks, const at::Tensor& source_weights, const at::Tensor& masks,
                  const std::vector<double>& weights) {
  for (const at::Tensor* tensor : {&est, &targets, &teacher, &pair_masks, &source_weights, &masks}) {
    TORCH_CHECK(tensor->device().is_cpu(), "nrt_kernels CPU kernels need CPU tensors, got one on ",
                tensor->device());
    TORCH_CHECK(tensor->is_contiguous(), "the noise-robust CPU kernel reads contiguous tensors");
  }
  TORCH_CHECK(est.dim() == 3 && est.numel() > 0, "est must be a non-empty (B, S, D) tensor, got ", est.sizes());
  TORCH_CHECK(targets.sizes() == est.sizes() && targets.scalar_type() == est.scalar_type(),
              "targets must have the shape and dtype of est ", est.sizes(), " ", est.scalar_type(), ", got ",
              targets.sizes(), " ", targets.scalar_type());
  TORCH_CHECK(teacher.numel() == 0 || (teacher.sizes() == est.sizes() && teacher.scalar_type() == est.scalar_type()),
              "teacher must be empty or have the shape and dtype of est, got ", teacher.sizes(), " ",
              teacher.scalar_type());
  const int64_t num_sources = est.size(1);
  TORCH_CHECK(num_sources >= 1 && num_sources <= kMaxSources, "1 to ", kMaxSources, " sources are supported, got ",
              num_sources);
  TORCH_CHECK(pair_masks.scalar_type() == at::kInt && pair_masks.dim() == 1 && pair_masks.size(0) == est.size(0),
              "pair_masks must be (B,) int32, got ", pair_masks.sizes(), " ", pair_masks.scalar_type());
  const auto acc_dtype = est.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(source_weights.numel() == 0 ||
                  (source_weights.dim() == 1 && source_weights.size(0) == num_sources &&
                   source_weights.scalar_type() == acc_dtype),
              "source_weights must be empty or (S,) of the accumulation dtype ", acc_dtype, ", got ",
              source_weights.sizes(), " ", source_weights.scalar_type());
  TORCH_CHECK(masks.scalar_type() == at::kInt && masks.dim() == 2 && masks.size(1) == kMixtures &&
                  masks.size(0) == (int64_t(1) << num_sources),
              "masks must be the (2**S, 2) int32 generalized candidate masks, got ", masks.sizes(), " ",
              masks.scalar_type());
  TORCH_CHECK(weights.size() == kNumTerms, "weights must be the ", kNumTerms,
              " (l1, consistency, mixit, teacher) weights, got ", weights.size());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> noise_robust_l1_forward_cpu(
    const at::Tensor& est, const at::Tensor& targets, const at::Tensor& teacher, const at::Tensor& pair_masks,
    const at::Tensor& source_weights, const at::Tensor& masks, const std::vector<double>& weights, double divisor) {
  check_inputs(est, targets, teacher, pair_masks, source_weights, masks, weights);
  const ActiveTerms use = active_terms(weights, teacher, source_weights);
  const auto acc_dtype = est.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({}, est.options().dtype(acc_dtype));
  at::Tensor terms = at::empty({kNumTerms}, est.options().dtype(acc_dtype));
  at::Tensor best = at::empty({est.size(0)}, est.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, est.scalar_type(), "noise_robust_l1_forward_cpu", [&] {
    forward_impl<scalar_t>(est, targets, teacher, pair_masks, source_weights, masks, weights, divisor, use, loss,
                           terms, best);
  });
  return {loss, terms, best};
}

at::Tensor noise_robust_l1_backward_cpu(const at::Tensor& grad_loss_in, const at::Tensor& est,
                                        const at::Tensor& targets, const at::Tensor& teacher,
                                        const at::Tensor& pair_masks, const at::Tensor& source_weights,
                                        const at::Tensor& best_in, const at::Tensor& masks,
                                        const std::vector<double>& weights, double divisor) {
  check_inputs(est, targets, teacher, pair_masks, source_weights, masks, weights);
  const ActiveTerms use = active_terms(weights, teacher, source_weights);
  const auto acc_dtype = est.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_loss_in.numel() == 1, "grad_loss must be a scalar, got ", grad_loss_in.sizes());
  const at::Tensor grad_loss = grad_loss_in.to(acc_dtype).contiguous();
  const at::Tensor best = best_in.to(at::kLong).contiguous();
  TORCH_CHECK(best.dim() == 1 && best.size(0) == est.size(0), "best must be (B,), got ", best.sizes());
  if (use.mixit) {
    const int64_t* best_data = best.const_data_ptr<int64_t>();
    for (int64_t row = 0; row < best.size(0); ++row) {
      TORCH_CHECK(best_data[row] >= 0 && best_data[row] < masks.size(0), "best[", row, "] = ", best_data[row],
                  " is not a candidate index in [0, ", masks.size(0), ")");
    }
  }
  at::Tensor grad_est = at::empty_like(est);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, est.scalar_type(), "noise_robust_l1_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_loss, est, targets, teacher, pair_masks, source_weights, best, masks, weights,
                            divisor, use, grad_est);
  });
  return grad_est;
}

}  // namespace nrt_kernels
