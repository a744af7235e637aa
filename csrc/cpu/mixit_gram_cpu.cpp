// CPU kernels of the fused Gram-metric MixIT: the same algorithm as the Triton kernels in
// nrt_kernels/ops/mixit_gram/triton.py (see nrt_kernels/ops/mixit_gram/__init__.py for the why).
//
// Forward, stage 1 (parallel over (row, tile of D)): the Gram matrix of the K = M + N + 1 signals
// [e_1..e_M, x_1..x_N, 1] over the tile, in float64 from exact products (a float32 or half product is exact in
// float64).  Each pair accumulates in kLanes lanes, element d in lane d mod kLanes, so the order of additions is
// fixed.  Stage 2 (per row) adds the tiles in increasing order; stage 3 (parallel over (row, block of
// candidates)) scores every candidate from the Gram alone and keeps the first minimum, NaN first (torch.min);
// the blocks are merged in order, the minimum is the row loss, and its derivative with respect to the chosen
// candidate's statistics is written for the backward.  Tiles and blocks are constants,
// not derived from the thread count, so results are bitwise identical for any number of threads.
//
// Backward (parallel over (row, tile of D)): each mixture's remix r in float64, then g (2 dQ r + dX x + dS) for
// its sources and g (dX r + 2 dXX x + dT) for the mixture, rounded once to the gradient's dtype.
#include "mixit_gram_cpu.h"

#include "../nrt_config.h"
#include "isa.h"
#include "lane_vector.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

namespace nrt_kernels {
namespace {

// Lanes per Gram pair: a fixed-size local array the compiler keeps in SIMD registers without -march (16 doubles:
// two AVX-512 or four AVX2 vectors, enough independent sums to hide the add latency).
constexpr int64_t kLanes = 16;
// Pairs (i, j..j+3) accumulated together: signal i is loaded once for four products.
constexpr int64_t kPairBlock = 4;
// Elements of D per Gram work item: a constant, so the partial sums and hence every result are the same for any
// thread count.  Elements converted to float64 at once: K + 3 rows of kChunk doubles stay in L1/L2.
constexpr int64_t kTile = 8192;
constexpr int64_t kChunk = 256;
// Candidates per search work item.
constexpr int64_t kSearchBlock = 4096;
// Elements of D per backward work item, and per pass (the chunk's remixes stay in L1).
constexpr int64_t kBackwardTile = 8192;
constexpr int64_t kBackwardChunk = 512;
constexpr int64_t kMaxSources = NRT_GRAM_MAX_SOURCES;
constexpr int64_t kStatistics = 5;  // Q, X, XX, S, T (nrt_kernels.ops.mixit_gram.STATISTICS)
// 10 / ln 10: dB per neper, d(10 log10 v) = kDbPerNeper dv / v.
constexpr double kDbPerNeper = 4.342944819032518276511289;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows [0, M) of `buf` get the sources, [M, M + N) the mixtures, row M + N the constant 1, each over `count`
// elements from `start`, zero-padded to `padded`; the kPairBlock - 1 rows after them stay zero.
template <typename scalar_t>
NRT_ISA_CLONES void load_signals(const scalar_t* est_row, const scalar_t* mix_row, int64_t num_sources,
                                 int64_t num_mixtures, int64_t length, int64_t start, int64_t count, int64_t padded,
                                 double* buf) {
  for (int64_t s = 0; s < num_sources + num_mixtures; ++s) {
    const scalar_t* __restrict__ src =
        s < num_sources ? est_row + s * length + start : mix_row + (s - num_sources) * length + start;
    double* __restrict__ dst = buf + s * kChunk;
    for (int64_t l = 0; l < count; ++l) dst[l] = static_cast<double>(src[l]);
    for (int64_t l = count; l < padded; ++l) dst[l] = 0.0;
  }
  double* __restrict__ ones = buf + (num_sources + num_mixtures) * kChunk;
  for (int64_t l = 0; l < padded; ++l) ones[l] = l < count ? 1.0 : 0.0;
}

// lanes[(i * width + j) * kLanes + l] += sum over elements e = l (mod kLanes) of buf[i][e] * buf[j][e], for
// i <= j < i + kPairBlock * ceil((K - i) / kPairBlock); width = K + kPairBlock - 1.
NRT_ISA_CLONES void gram_chunk(const double* buf, int64_t num_signals, int64_t padded, double* lanes) {
  const int64_t width = num_signals + kPairBlock - 1;
  for (int64_t i = 0; i < num_signals; ++i) {
    const double* __restrict__ a = buf + i * kChunk;
    for (int64_t j = i; j < num_signals; j += kPairBlock) {
      const double* __restrict__ b0 = buf + j * kChunk;
      const double* __restrict__ b1 = b0 + kChunk;
      const double* __restrict__ b2 = b1 + kChunk;
      const double* __restrict__ b3 = b2 + kChunk;
      double* __restrict__ out = lanes + (i * width + j) * kLanes;
      double acc0[kLanes], acc1[kLanes], acc2[kLanes], acc3[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) {
        acc0[l] = out[l];
        acc1[l] = out[kLanes + l];
        acc2[l] = out[2 * kLanes + l];
        acc3[l] = out[3 * kLanes + l];
      }
      for (int64_t e = 0; e < padded; e += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const double x = a[e + l];
          acc0[l] += x * b0[e + l];
          acc1[l] += x * b1[e + l];
          acc2[l] += x * b2[e + l];
          acc3[l] += x * b3[e + l];
        }
      }
      for (int64_t l = 0; l < kLanes; ++l) {
        out[l] = acc0[l];
        out[kLanes + l] = acc1[l];
        out[2 * kLanes + l] = acc2[l];
        out[3 * kLanes + l] = acc3[l];
      }
    }
  }
}

// The Gram of one (row, tile): partial[i * K + j] for i <= j.  `workspace` holds (K + kPairBlock - 1) * kChunk +
// K * (K + kPairBlock - 1) * kLanes doubles.
template <typename scalar_t>
void gram_tile(const scalar_t* est_row, const scalar_t* mix_row, int64_t num_sources, int64_t num_mixtures,
               int64_t length, int64_t begin, int64_t end, double* workspace, double* partial) {
  const int64_t num_signals = num_sources + num_mixtures + 1;
  const int64_t width = num_signals + kPairBlock - 1;
  double* buf = workspace;
  double* lanes = buf + width * kChunk;
  std::fill(buf, lanes + num_signals * width * kLanes, 0.0);
  for (int64_t start = begin; start < end; start += kChunk) {
    const int64_t count = std::min(kChunk, end - start);
    const int64_t padded = ceil_div(count, kLanes) * kLanes;
    load_signals<scalar_t>(est_row, mix_row, num_sources, num_mixtures, length, start, count, padded, buf);
    gram_chunk(buf, num_signals, padded, lanes);
  }
  for (int64_t i = 0; i < num_signals; ++i) {
    for (int64_t j = i; j < num_signals; ++j) {
      const double* pair = lanes + (i * width + j) * kLanes;
      double total = 0.0;
      for (int64_t l = 0; l < kLanes; ++l) total += pair[l];
      partial[i * num_signals + j] = total;
    }
  }
}

// Few signals (M + N <= kMaxRegisterSignals): every product and sum of an 8-element block stays in a vector
// register (M = 4 sources and 2 mixtures: 21 products, 6 sums and 6 inputs of 8 doubles, the 32 AVX-512
// registers), and the inputs are converted as they are loaded: one pass, no float64 copy.  GCC/Clang vector
// types keep the accumulators in registers (plain arrays stay on the stack).
constexpr int kMaxRegisterSignals = 6;
constexpr int64_t kRegisterLanes = 8;
using Lanes8 = LaneVector<double, kRegisterLanes>::type;

// The register-blocked step over one block: the sums and products of its K signals.
template <int K, typename scalar_t>
inline void accumulate_block(const scalar_t* const* rows, int64_t e, int64_t valid, Lanes8* sums, Lanes8* products) {
  Lanes8 v[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) v[k] = load_vector<double, kRegisterLanes>(rows[k] + e, valid);
#pragma GCC unroll 8
  for (int i = 0; i < K; ++i) {
    sums[i] += v[i];
#pragma GCC unroll 8
    for (int j = i; j < K; ++j) products[i * K - i * (i - 1) / 2 + (j - i)] += v[i] * v[j];
  }
}

template <int K, typename scalar_t>
NRT_ISA_CLONES void gram_tile_registers(const scalar_t* est_row, const scalar_t* mix_row, int64_t num_sources,
                                        int64_t length, int64_t begin, int64_t end, double* partial) {
  constexpr int kPairs = K * (K + 1) / 2;
  constexpr int kSignals = K + 1;  // with the constant signal
  const scalar_t* rows[K];
  for (int k = 0; k < K; ++k) {
    rows[k] = k < num_sources ? est_row + k * length + begin : mix_row + (k - num_sources) * length + begin;
  }
  Lanes8 products[kPairs] = {};
  Lanes8 sums[K] = {};
  const int64_t count = end - begin;
  const int64_t full = count / kRegisterLanes * kRegisterLanes;
  for (int64_t e = 0; e < full; e += kRegisterLanes) {
    accumulate_block<K, scalar_t>(rows, e, kRegisterLanes, sums, products);
  }
  if (full < count) accumulate_block<K, scalar_t>(rows, full, count - full, sums, products);
  for (int i = 0; i < K; ++i) {
    for (int j = i; j < K; ++j) {
      const Lanes8 pair = products[i * K - i * (i - 1) / 2 + (j - i)];
      double total = 0.0;
      for (int64_t l = 0; l < kRegisterLanes; ++l) total += pair[l];
      partial[i * kSignals + j] = total;
    }
    double total = 0.0;
    for (int64_t l = 0; l < kRegisterLanes; ++l) total += sums[i][l];
    partial[i * kSignals + K] = total;
  }
  partial[K * kSignals + K] = static_cast<double>(count);
}

// The Gram of one (row, tile), register-blocked when the signals are few.
template <typename scalar_t>
void gram_tile_any(const scalar_t* est_row, const scalar_t* mix_row, int64_t num_sources, int64_t num_mixtures,
                   int64_t length, int64_t begin, int64_t end, double* workspace, double* partial) {
  switch (num_sources + num_mixtures) {
    case 2: return gram_tile_registers<2, scalar_t>(est_row, mix_row, num_sources, length, begin, end, partial);
    case 3: return gram_tile_registers<3, scalar_t>(est_row, mix_row, num_sources, length, begin, end, partial);
    case 4: return gram_tile_registers<4, scalar_t>(est_row, mix_row, num_sources, length, begin, end, partial);
    case 5: return gram_tile_registers<5, scalar_t>(est_row, mix_row, num_sources, length, begin, end, partial);
    case 6: return gram_tile_registers<6, scalar_t>(est_row, mix_row, num_sources, length, begin, end, partial);
    default:
      static_assert(kMaxRegisterSignals == 6, "one case per signal count up to kMaxRegisterSignals");
      return gram_tile<scalar_t>(est_row, mix_row, num_sources, num_mixtures, length, begin, end, workspace, partial);
  }
}

struct MetricParams {
  int64_t metric;
  bool zero_mean;
  double length, eps, tau;
};

// One mixture's loss from its statistics: nrt_kernels.ops.mixit_gram.metric_row_loss, term for term.
inline double metric_term(double energy, double cross, double target_energy, double est_sum, double target_sum,
                          const MetricParams& p) {
  if (p.metric == NRT_METRIC_MSE || p.metric == NRT_METRIC_LOG_MSE) {
    double error = energy - 2.0 * cross + target_energy;
    error = error < 0.0 ? 0.0 : error;  // NaN stays NaN (std::max would keep whichever comes first)
    return p.metric == NRT_METRIC_MSE ? error / p.length : 10.0 * std::log10(error + p.tau * target_energy + p.eps);
  }
  if (p.zero_mean) {
    energy = energy - est_sum * est_sum / p.length;
    cross = cross - est_sum * target_sum / p.length;
    target_energy = target_energy - target_sum * target_sum / p.length;
  }
  double signal, noise;
  if (p.metric == NRT_METRIC_SNR) {
    signal = target_energy;
    noise = energy - 2.0 * cross + target_energy;
  } else {
    const double scale = cross / (target_energy + p.eps);
    signal = scale * scale * target_energy;
    noise = p.metric == NRT_METRIC_SISDR ? energy - 2.0 * scale * cross + scale * scale * target_energy
                                         : energy - 2.0 * cross + target_energy;
  }
  noise = noise < 0.0 ? 0.0 : noise;
  return -10.0 * std::log10(signal / (noise + p.eps) + p.eps);
}

// d(metric_term)/d(Q, X, XX, S, T) into out[0..4]: the derivative autograd takes of metric_row_loss (an energy
// clamped at 0 passes no gradient; a NaN passes on).  With a = Q, c = X, b = XX after centering, the SDRs are
// -kDbPerNeper ln(rho + eps) with rho = signal / (noise + eps); the chain through the centering gives S and T.
inline void metric_partials(double energy, double cross, double target_energy, double est_sum, double target_sum,
                            const MetricParams& p, double* out) {
  if (p.metric == NRT_METRIC_MSE || p.metric == NRT_METRIC_LOG_MSE) {
    const double error = energy - 2.0 * cross + target_energy;
    const double pass = error < 0.0 ? 0.0 : 1.0;
    const double scale = p.metric == NRT_METRIC_MSE
                             ? 1.0 / p.length
                             : kDbPerNeper / ((error < 0.0 ? 0.0 : error) + p.tau * target_energy + p.eps);
    out[0] = scale * pass;
    out[1] = -2.0 * scale * pass;
    out[2] = scale * pass + (p.metric == NRT_METRIC_MSE ? 0.0 : scale * p.tau);
    out[3] = out[4] = 0.0;
    return;
  }
  double a = energy, c = cross, b = target_energy;
  if (p.zero_mean) {
    a = a - est_sum * est_sum / p.length;
    c = c - est_sum * target_sum / p.length;
    b = b - target_sum * target_sum / p.length;
  }
  // signal and noise with their derivatives in c and b (d signal/da = 0, d noise/da = 1); SD-SDR's and SNR's noise
  // is ||est - target||^2.
  double signal, signal_c, signal_b;
  double noise = a - 2.0 * c + b, noise_c = -2.0, noise_b = 1.0;
  if (p.metric == NRT_METRIC_SNR) {
    signal = b;
    signal_c = 0.0;
    signal_b = 1.0;
  } else {
    const double energy_eps = b + p.eps, scale = c / energy_eps;
    signal = scale * scale * b;
    signal_c = 2.0 * scale * b / energy_eps;
    signal_b = scale * scale * (1.0 - 2.0 * b / energy_eps);
    if (p.metric == NRT_METRIC_SISDR) {
      noise = a - 2.0 * scale * c + scale * scale * b;
      noise_c = -4.0 * scale + 2.0 * scale * b / energy_eps;
      noise_b = scale * scale * (3.0 - 2.0 * b / energy_eps);
    }
  }
  const double pass = noise < 0.0 ? 0.0 : 1.0;
  const double denominator = (noise < 0.0 ? 0.0 : noise) + p.eps;
  const double ratio = signal / denominator;
  const double weight = -kDbPerNeper / ((ratio + p.eps) * denominator);
  const double d_a = -weight * ratio * pass;
  const double d_c = weight * (signal_c - ratio * pass * noise_c);
  const double d_b = weight * (signal_b - ratio * pass * noise_b);
  out[0] = d_a;
  out[1] = d_c;
  out[2] = d_b;
  out[3] = p.zero_mean ? -(2.0 * est_sum * d_a + target_sum * d_c) / p.length : 0.0;
  out[4] = p.zero_mean ? -(est_sum * d_c + 2.0 * target_sum * d_b) / p.length : 0.0;
}

// Q, X and S of the sources in `mask` from the row's Gram `g` (K x K, symmetric): Q = sum over i, j in the mask
// of G[i][j], X = sum over i of G[i][x_col], S = sum over i of G[i][ones]; only the mask's entries are read, so a
// NaN source reaches only the subsets that hold it.
inline void subset_statistics(const double* g, int64_t num_signals, int64_t x_col, int64_t ones_col, uint32_t mask,
                              double& energy, double& cross, double& est_sum) {
  energy = cross = est_sum = 0.0;
  for (uint32_t rest = mask; rest != 0; rest &= rest - 1) {
    const int64_t i = __builtin_ctz(rest);
    const double* gi = g + i * num_signals;
    double lower = 0.0;
    for (uint32_t below = mask & ((uint32_t(1) << i) - 1); below != 0; below &= below - 1) {
      lower += gi[__builtin_ctz(below)];
    }
    energy += gi[i] + 2.0 * lower;
    cross += gi[x_col];
    est_sum += gi[ones_col];
  }
}

double candidate_loss(const double* g, const int32_t* candidate, int64_t num_sources, int64_t num_mixtures,
                      const MetricParams& p) {
  const int64_t num_signals = num_sources + num_mixtures + 1, ones = num_sources + num_mixtures;
  double total = 0.0;
  for (int64_t n = 0; n < num_mixtures; ++n) {
    double energy, cross, est_sum;
    subset_statistics(g, num_signals, num_sources + n, ones, static_cast<uint32_t>(candidate[n]), energy, cross,
                      est_sum);
    const double* gx = g + (num_sources + n) * num_signals;
    total += metric_term(energy, cross, gx[num_sources + n], est_sum, gx[ones], p);
  }
  return total / static_cast<double>(num_mixtures);
}

// First NaN, else first minimum, of candidates [first, last): torch.min's choice.
struct Choice {
  double loss;
  int64_t index;
};

Choice search_block(const double* g, const int32_t* masks, int64_t first, int64_t last, int64_t num_sources,
                    int64_t num_mixtures, const MetricParams& p) {
  Choice best{0.0, -1};
  for (int64_t c = first; c < last; ++c) {
    const double loss = candidate_loss(g, masks + c * num_mixtures, num_sources, num_mixtures, p);
    if (std::isnan(loss)) return {loss, c};
    if (best.index < 0 || loss < best.loss) best = {loss, c};
  }
  return best;
}

template <typename scalar_t>
void forward_impl(const at::Tensor& est, const at::Tensor& mixtures, const at::Tensor& masks, const MetricParams& p,
                  at::Tensor& row_loss, at::Tensor& best, at::Tensor& dloss) {
  const int64_t batch = est.size(0), num_sources = est.size(1), length = est.size(2);
  const int64_t num_mixtures = mixtures.size(1), num_candidates = masks.size(0);
  const int64_t num_signals = num_sources + num_mixtures + 1, ones = num_sources + num_mixtures;
  const int64_t gram_size = num_signals * num_signals;
  const int64_t num_tiles = ceil_div(length, kTile);
  const scalar_t* est_data = est.const_data_ptr<scalar_t>();
  const scalar_t* mix_data = mixtures.const_data_ptr<scalar_t>();
  const int32_t* mask_data = masks.const_data_ptr<int32_t>();

  std::vector<double> partials(static_cast<size_t>(batch * num_tiles * gram_size), 0.0);
  const int64_t width = num_signals + kPairBlock - 1;
  at::parallel_for(0, batch * num_tiles, 1, [&](int64_t first, int64_t last) {
    std::vector<double> workspace(static_cast<size_t>(width * kChunk + num_signals * width * kLanes));
    for (int64_t item = first; item < last; ++item) {
      const int64_t row = item / num_tiles, tile = item % num_tiles;
      gram_tile_any<scalar_t>(est_data + row * num_sources * length, mix_data + row * num_mixtures * length,
                              num_sources, num_mixtures, length, tile * kTile, std::min(length, (tile + 1) * kTile),
                              workspace.data(), partials.data() + item * gram_size);
    }
  });

  // Tiles in increasing order, then mirrored: G[j][i] = G[i][j].
  std::vector<double> grams(static_cast<size_t>(batch * gram_size));
  at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      double* g = grams.data() + row * gram_size;
      const double* tiles = partials.data() + row * num_tiles * gram_size;
      std::copy(tiles, tiles + gram_size, g);
      for (int64_t tile = 1; tile < num_tiles; ++tile) {
        for (int64_t k = 0; k < gram_size; ++k) g[k] += tiles[tile * gram_size + k];
      }
      for (int64_t i = 0; i < num_signals; ++i) {
        for (int64_t j = i + 1; j < num_signals; ++j) g[j * num_signals + i] = g[i * num_signals + j];
      }
    }
  });

  const int64_t num_blocks = ceil_div(num_candidates, kSearchBlock);
  std::vector<Choice> choices(static_cast<size_t>(batch * num_blocks));
  at::parallel_for(0, batch * num_blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t row = item / num_blocks, block = item % num_blocks;
      choices[item] = search_block(grams.data() + row * gram_size, mask_data, block * kSearchBlock,
                                   std::min(num_candidates, (block + 1) * kSearchBlock), num_sources, num_mixtures,
                                   p);
    }
  });

  int64_t* best_data = best.data_ptr<int64_t>();
  double* dloss_data = dloss.data_ptr<double>();
  for (int64_t row = 0; row < batch; ++row) {
    Choice chosen = choices[row * num_blocks];
    for (int64_t block = 1; block < num_blocks && !std::isnan(chosen.loss); ++block) {
      const Choice& next = choices[row * num_blocks + block];
      if (std::isnan(next.loss) || next.loss < chosen.loss) chosen = next;
    }
    best_data[row] = chosen.index;
    // The row loss is the minimum the search found; float32 for float32/half inputs.
    if (row_loss.scalar_type() == at::kDouble) {
      row_loss.data_ptr<double>()[row] = chosen.loss;
    } else {
      row_loss.data_ptr<float>()[row] = static_cast<float>(chosen.loss);
    }
    const double* g = grams.data() + row * gram_size;
    const int32_t* candidate = mask_data + chosen.index * num_mixtures;
    for (int64_t n = 0; n < num_mixtures; ++n) {
      double energy, cross, est_sum;
      subset_statistics(g, num_signals, num_sources + n, ones, static_cast<uint32_t>(candidate[n]), energy, cross,
                        est_sum);
      const double* gx = g + (num_sources + n) * num_signals;
      double* out = dloss_data + (row * num_mixtures + n) * kStatistics;
      metric_partials(energy, cross, gx[num_sources + n], est_sum, gx[ones], p, out);
      for (int64_t k = 0; k < kStatistics; ++k) out[k] /= static_cast<double>(num_mixtures);
    }
  }
}

// Backward for one row over [begin, end): `coef` holds per mixture (c0..c5), every source of it getting
// c0 r + c1 x + c2 and the mixture c3 r + c4 x + c5.  `remix` is a [num_mixtures][kBackwardChunk] float64
// workspace, `grad` a [num_mixtures][kBackwardChunk] one of the gradient's dtype (each mixture's gradient is
// rounded once and copied to its sources); grad_mix_row may be null.
constexpr int64_t kCoefficients = 6;

template <typename scalar_t>
NRT_ISA_CLONES void linear_gradients(const scalar_t* est_row, const scalar_t* mix_row, const int64_t* owner,
                                     const double* coef, int64_t num_sources, int64_t num_mixtures, int64_t length,
                                     int64_t begin, int64_t end, double* remix, scalar_t* grad,
                                     scalar_t* grad_est_row, scalar_t* grad_mix_row) {
  bool started[kMaxSources] = {};  // a mixture's remix starts as its first source (no zero fill)
  for (int64_t start = begin; start < end; start += kBackwardChunk) {
    const int64_t size = std::min(kBackwardChunk, end - start);
    std::fill(started, started + num_mixtures, false);
    for (int64_t s = 0; s < num_sources; ++s) {
      const scalar_t* __restrict__ x = est_row + s * length + start;
      double* __restrict__ r = remix + owner[s] * kBackwardChunk;
      if (started[owner[s]]) {
        for (int64_t l = 0; l < size; ++l) r[l] += static_cast<double>(x[l]);
      } else {
        for (int64_t l = 0; l < size; ++l) r[l] = static_cast<double>(x[l]);
        started[owner[s]] = true;
      }
    }
    for (int64_t n = 0; n < num_mixtures; ++n) {
      double* __restrict__ r = remix + n * kBackwardChunk;
      if (!started[n]) std::fill(r, r + size, 0.0);  // a mixture without sources
      const scalar_t* __restrict__ x = mix_row + n * length + start;
      scalar_t* __restrict__ g = grad + n * kBackwardChunk;
      const double* c = coef + n * kCoefficients;
      const double c0 = c[0], c1 = c[1], c2 = c[2];
      for (int64_t l = 0; l < size; ++l) g[l] = static_cast<scalar_t>(c0 * r[l] + c1 * static_cast<double>(x[l]) + c2);
      if (grad_mix_row != nullptr) {
        scalar_t* __restrict__ out = grad_mix_row + n * length + start;
        const double c3 = c[3], c4 = c[4], c5 = c[5];
        for (int64_t l = 0; l < size; ++l) {
          out[l] = static_cast<scalar_t>(c3 * r[l] + c4 * static_cast<double>(x[l]) + c5);
        }
      }
    }
    for (int64_t s = 0; s < num_sources; ++s) {
      std::memcpy(grad_est_row + s * length + start, grad + owner[s] * kBackwardChunk,
                  static_cast<size_t>(size) * sizeof(scalar_t));
    }
  }
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_rows, const at::Tensor& dloss, const at::Tensor& est,
                   const at::Tensor& mixtures, const at::Tensor& best, const at::Tensor& masks, at::Tensor& grad_est,
                   at::Tensor* grad_mix) {
  const int64_t batch = est.size(0), num_sources = est.size(1), length = est.size(2);
  const int64_t num_mixtures = mixtures.size(1);
  const int64_t num_tiles = ceil_div(length, kBackwardTile);
  const scalar_t* est_data = est.const_data_ptr<scalar_t>();
  const scalar_t* mix_data = mixtures.const_data_ptr<scalar_t>();
  const double* grad_data = grad_rows.const_data_ptr<double>();
  const double* dloss_data = dloss.const_data_ptr<double>();
  const int64_t* best_data = best.const_data_ptr<int64_t>();
  const int32_t* mask_data = masks.const_data_ptr<int32_t>();
  scalar_t* grad_est_data = grad_est.data_ptr<scalar_t>();
  scalar_t* grad_mix_data = grad_mix != nullptr ? grad_mix->data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, batch * num_tiles, 1, [&](int64_t first, int64_t last) {
    std::vector<double> remix(static_cast<size_t>(num_mixtures * kBackwardChunk));
    std::vector<scalar_t> grad(static_cast<size_t>(num_mixtures * kBackwardChunk));
    std::vector<double> coef(static_cast<size_t>(num_mixtures * kCoefficients));
    int64_t owner[kMaxSources] = {};
    for (int64_t item = first; item < last; ++item) {
      const int64_t row = item / num_tiles, tile = item % num_tiles;
      const int32_t* candidate = mask_data + best_data[row] * num_mixtures;
      for (int64_t n = 0; n < num_mixtures; ++n) {
        for (int64_t s = 0; s < num_sources; ++s) {
          if ((candidate[n] >> s) & 1) owner[s] = n;
        }
        // dQ/dr = 2 r, dX/dr = x, dS/dr = 1; dX/dx = r, dXX/dx = 2 x, dT/dx = 1.
        const double* d = dloss_data + (row * num_mixtures + n) * kStatistics;
        const double g = grad_data[row];
        double* c = coef.data() + n * kCoefficients;
        c[0] = g * 2.0 * d[0], c[1] = g * d[1], c[2] = g * d[3];
        c[3] = g * d[1], c[4] = g * 2.0 * d[2], c[5] = g * d[4];
      }
      linear_gradients<scalar_t>(est_data + row * num_sources * length, mix_data + row * num_mixtures * length,
                                 owner, coef.data(), num_sources, num_mixtures,
                                 length, tile * kBackwardTile, std::min(length, (tile + 1) * kBackwardTile),
                                 remix.data(), grad.data(), grad_est_data + row * num_sources * length,
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
  TORCH_CHECK(mixtures.size(1) >= 1, "at least one mixture, got ", mixtures.sizes());
  TORCH_CHECK(est.numel() > 0 && mixtures.numel() > 0, "empty input");
  TORCH_CHECK(masks.scalar_type() == at::kInt && masks.dim() == 2 && masks.size(1) == mixtures.size(1) &&
                  masks.size(0) >= 1,
              "masks must be (candidates, N) int32, got ", masks.sizes(), " ", masks.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixit_gram_forward_cpu(const at::Tensor& est_in,
                                                                      const at::Tensor& mixtures_in,
                                                                      const at::Tensor& masks_in, int64_t metric,
                                                                      bool zero_mean, double eps, double tau) {
  check_inputs(est_in, mixtures_in, masks_in);
  TORCH_CHECK(metric == NRT_METRIC_SISDR || metric == NRT_METRIC_SDSDR || metric == NRT_METRIC_SNR ||
                  metric == NRT_METRIC_MSE || metric == NRT_METRIC_LOG_MSE,
              "unknown metric code ", metric);
  const at::Tensor est = est_in.contiguous(), mixtures = mixtures_in.contiguous(), masks = masks_in.contiguous();
  const auto loss_dtype = est.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({est.size(0)}, est.options().dtype(loss_dtype));
  at::Tensor best = at::empty({est.size(0)}, est.options().dtype(at::kLong));
  at::Tensor dloss = at::empty({est.size(0), mixtures.size(1), kStatistics}, est.options().dtype(at::kDouble));
  const MetricParams params{metric, zero_mean, static_cast<double>(est.size(2)), eps, tau};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, est.scalar_type(), "mixit_gram_forward_cpu", [&] {
    forward_impl<scalar_t>(est, mixtures, masks, params, row_loss, best, dloss);
  });
  return {row_loss, best, dloss};
}

std::tuple<at::Tensor, at::Tensor> mixit_gram_backward_cpu(const at::Tensor& grad_rows_in, const at::Tensor& dloss_in,
                                                           const at::Tensor& est_in, const at::Tensor& mixtures_in,
                                                           const at::Tensor& best_in, const at::Tensor& masks_in,
                                                           bool mixtures_grad) {
  check_inputs(est_in, mixtures_in, masks_in);
  const at::Tensor est = est_in.contiguous(), mixtures = mixtures_in.contiguous(), masks = masks_in.contiguous();
  const at::Tensor grad_rows = grad_rows_in.to(at::kDouble).contiguous();
  const at::Tensor dloss = dloss_in.to(at::kDouble).contiguous();
  const at::Tensor best = best_in.to(at::kLong).contiguous();
  TORCH_CHECK(dloss.dim() == 3 && dloss.size(0) == est.size(0) && dloss.size(1) == mixtures.size(1) &&
                  dloss.size(2) == kStatistics,
              "dloss must be (B, N, ", kStatistics, "), got ", dloss.sizes());
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, est.scalar_type(), "mixit_gram_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_rows, dloss, est, mixtures, best, masks, grad_est,
                            mixtures_grad ? &grad_mix : nullptr);
  });
  return {grad_est, grad_mix};
}

}  // namespace nrt_kernels
