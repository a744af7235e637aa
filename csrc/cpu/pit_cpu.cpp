// CPU kernels of the fused PIT loss: the same algorithm as the Triton kernels in nrt_kernels/ops/pit/triton.py.
//
// Forward, stage 1 (parallel over (row, tile of T)): the tile's pairwise statistics, in float64 from float64
// copies of the inputs (a product of two float32 / half values is exact in float64): for the bilinear metrics
// every <e_i, t_j>, <e_i, e_i>, <t_j, t_j> and the sums of e_i and t_j; for L1 every sum |e_i - t_j|.
// Stage 2 (per row): the tiles' statistics added in a fixed order, the (M, M) loss matrix, the best permutation
// (every permutation in itertools.permutations order, or an exact Hungarian assignment) and the backward's
// coefficients of the chosen pairs.  Tiles are fixed, so results are bitwise identical for any thread count.
#include "pit_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include "../nrt_config.h"
#include "isa.h"

namespace nrt_kernels {
namespace {

// nrt_kernels/build_config.py's PIT_METRICS order, PIT_MAX_SOURCES and PIT_NUM_COEFFS.
enum Metric : int64_t {
  kSiSdr = NRT_PIT_METRIC_SISDR,
  kSdSdr = NRT_PIT_METRIC_SDSDR,
  kSnr = NRT_PIT_METRIC_SNR,
  kMse = NRT_PIT_METRIC_MSE,
  kL1 = NRT_PIT_METRIC_L1,
  kLogMse = NRT_PIT_METRIC_LOG_MSE,
};
constexpr int64_t kMaxSources = NRT_PIT_MAX_SOURCES;
constexpr int64_t kMaxExhaustiveSources = NRT_PIT_MAX_EXHAUSTIVE_SOURCES;
constexpr int64_t kCoeffs = NRT_PIT_NUM_COEFFS;
// Elements of T per forward work item: a constant (not derived from the thread count), so the partial statistics
// and hence every result are bitwise identical whatever the number of threads.
constexpr int64_t kTile = 4096;
// Elements per backward work item.
constexpr int64_t kBackwardTile = 8192;
// Every statistic sums into kLanes accumulators, lane l taking the elements d = l mod kLanes: a fixed-size local
// array the compiler keeps in SIMD registers without -march (8 doubles: 2 AVX2 or 1 AVX-512 vector).
constexpr int64_t kLanes = 8;
constexpr double kLn10 = 2.302585092994045684;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is_sdr(int64_t metric) { return metric == kSiSdr || metric == kSdSdr || metric == kSnr; }

// Statistics per row: L1 the M*M sums |e_i - t_j| ([i * M + j]); the bilinear metrics those M*M cross products
// followed by <e_i, e_i>, <t_j, t_j>, sum e_i, sum t_j (M each).
int64_t stats_size(int64_t metric, int64_t m) { return metric == kL1 ? m * m : m * m + 4 * m; }

// Elements per pass over a tile: the float64 copies of the M est and M target chunks stay in L1 (32 KiB).
int64_t forward_chunk(int64_t m) {
  return std::max<int64_t>(kLanes, std::min<int64_t>(256, 1024 / m) / kLanes * kLanes);
}

double lane_sum(const double* acc) {
  double total = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// Stage 1 for one (row, tile): partial[...] += the statistics of [begin, end).  `buffer` holds 2 * M * chunk
// doubles: the chunk's est and target copies, zero-padded to a whole number of lanes (padding adds exactly 0).
template <typename scalar_t>
NRT_ISA_CLONES void pairwise_partials(const scalar_t* est_row, const scalar_t* tgt_row, int64_t m, int64_t length,
                                      int64_t begin, int64_t end, int64_t chunk, bool l1, double* buffer,
                                      double* partial) {
  double* __restrict__ e = buffer;
  double* __restrict__ t = buffer + m * chunk;
  for (int64_t start = begin; start < end; start += chunk) {
    const int64_t count = std::min(chunk, end - start);
    const int64_t padded = ceil_div(count, kLanes) * kLanes;
    for (int64_t s = 0; s < m; ++s) {
      const scalar_t* __restrict__ es = est_row + s * length + start;
      const scalar_t* __restrict__ ts = tgt_row + s * length + start;
      double* __restrict__ ed = e + s * chunk;
      double* __restrict__ td = t + s * chunk;
      for (int64_t l = 0; l < count; ++l) ed[l] = static_cast<double>(es[l]);
      for (int64_t l = 0; l < count; ++l) td[l] = static_cast<double>(ts[l]);
      for (int64_t l = count; l < padded; ++l) ed[l] = td[l] = 0.0;
    }
    for (int64_t i = 0; i < m; ++i) {
      const double* __restrict__ ei = e + i * chunk;
      for (int64_t j = 0; j < m; ++j) {
        const double* __restrict__ tj = t + j * chunk;
        double acc[kLanes] = {};
        if (l1) {
          for (int64_t b = 0; b < padded; b += kLanes) {
            for (int64_t l = 0; l < kLanes; ++l) acc[l] += std::abs(ei[b + l] - tj[b + l]);
          }
        } else {
          for (int64_t b = 0; b < padded; b += kLanes) {
            for (int64_t l = 0; l < kLanes; ++l) acc[l] += ei[b + l] * tj[b + l];
          }
        }
        partial[i * m + j] += lane_sum(acc);
      }
    }
    if (l1) continue;
    for (int64_t s = 0; s < m; ++s) {
      const double* __restrict__ es = e + s * chunk;
      const double* __restrict__ ts = t + s * chunk;
      double ee[kLanes] = {}, tt[kLanes] = {}, se[kLanes] = {}, st[kLanes] = {};
      for (int64_t b = 0; b < padded; b += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          ee[l] += es[b + l] * es[b + l];
          tt[l] += ts[b + l] * ts[b + l];
          se[l] += es[b + l];
          st[l] += ts[b + l];
        }
      }
      partial[m * m + s] += lane_sum(ee);
      partial[m * m + m + s] += lane_sum(tt);
      partial[m * m + 2 * m + s] += lane_sum(se);
      partial[m * m + 3 * m + s] += lane_sum(st);
    }
  }
}

// One (est i, target j) pair of a row: energies x = <e, e>, y = <t, t> and cross z = <e, t> of the signals the
// metric reads (zero-mean ones for the SDR metrics with zero_mean), and the means it removed.
struct Pair {
  double x, y, z, mean_e, mean_t;
};

Pair pair_of(const double* stats, int64_t m, int64_t i, int64_t j, int64_t length, bool centered) {
  Pair p{stats[m * m + i], stats[m * m + m + j], stats[i * m + j], 0.0, 0.0};
  if (centered) {
    const double sum_e = stats[m * m + 2 * m + i], sum_t = stats[m * m + 3 * m + j];
    p.mean_e = sum_e / static_cast<double>(length);
    p.mean_t = sum_t / static_cast<double>(length);
    p.x -= sum_e * p.mean_e;
    p.y -= sum_t * p.mean_t;
    p.z -= sum_e * p.mean_t;
  }
  return p;
}

// The pair's loss and its partial derivatives (dx, dy, dz) with respect to x, y and z.  Sums of squares formed
// from the statistics (||e - a t||^2 = x - 2 a z + a^2 y) are clamped at 0 before EPS is added: rounding may
// take them an ulp below.
double pair_loss(int64_t metric, const Pair& p, double eps, double tau, int64_t length, double* grad) {
  double dx = 0.0, dy = 0.0, dz = 0.0, loss;
  if (is_sdr(metric)) {
    double num, den, nx = 0.0, ny = 0.0, nz = 0.0, gx = 1.0, gy = 1.0, gz = -2.0;
    if (metric == kSnr) {
      num = p.y;
      ny = 1.0;
      den = p.x - 2.0 * p.z + p.y;
    } else {
      const double energy = p.y + eps, a = p.z / energy;
      num = a * a * p.y;
      nz = 2.0 * a * p.y / energy;
      ny = a * a - 2.0 * a * a * p.y / energy;
      if (metric == kSiSdr) {
        den = p.x - 2.0 * a * p.z + a * a * p.y;
        gz = -4.0 * a + 2.0 * a * p.y / energy;
        gy = 3.0 * a * a - 2.0 * a * a * p.y / energy;
      } else {
        den = p.x - 2.0 * p.z + p.y;
      }
    }
    if (den < 0.0) den = gx = gy = gz = 0.0;
    den += eps;
    const double ratio = num / den;
    loss = -10.0 * std::log10(ratio + eps);
    const double d_ratio = -10.0 / (kLn10 * (ratio + eps));
    dx = d_ratio * (nx / den - ratio * gx / den);
    dy = d_ratio * (ny / den - ratio * gy / den);
    dz = d_ratio * (nz / den - ratio * gz / den);
  } else {
    double err = p.x - 2.0 * p.z + p.y;
    double ex = 1.0, ey = 1.0, ez = -2.0;
    if (err < 0.0) err = ex = ey = ez = 0.0;
    if (metric == kMse) {
      const double inv = 1.0 / static_cast<double>(length);
      loss = err * inv;
      dx = ex * inv, dy = ey * inv, dz = ez * inv;
    } else {  // kLogMse
      const double arg = err + tau * p.y + 1e-8;
      loss = 10.0 * std::log10(arg);
      const double d_arg = 10.0 / (kLn10 * arg);
      dx = ex * d_arg, dy = (ey + tau) * d_arg, dz = ez * d_arg;
    }
  }
  if (grad != nullptr) grad[0] = dx, grad[1] = dy, grad[2] = dz;
  return loss;
}

// Exact minimum-cost assignment of targets (rows) to estimates (columns) of a finite matrix: the
// shortest-augmenting-path Hungarian algorithm with potentials, O(M^3) (reference.linear_assignment).
void hungarian(const double* loss, int64_t m, int64_t* perm) {
  const double inf = std::numeric_limits<double>::infinity();
  double u[kMaxSources + 1] = {}, v[kMaxSources + 1] = {}, slack[kMaxSources + 1];
  int64_t row_of[kMaxSources + 1] = {}, way[kMaxSources + 1];
  bool used[kMaxSources + 1];
  for (int64_t row = 1; row <= m; ++row) {
    row_of[0] = row;
    int64_t col0 = 0;
    std::fill(slack, slack + m + 1, inf);
    std::fill(used, used + m + 1, false);
    do {
      used[col0] = true;
      const int64_t row0 = row_of[col0];
      double delta = inf;
      int64_t col1 = 0;
      for (int64_t col = 1; col <= m; ++col) {
        if (used[col]) continue;
        // cost[target row0 - 1][est col - 1] = loss[est, target]
        const double reduced = loss[(col - 1) * m + (row0 - 1)] - u[row0] - v[col];
        if (reduced < slack[col]) slack[col] = reduced, way[col] = col0;
        if (slack[col] < delta) delta = slack[col], col1 = col;
      }
      for (int64_t col = 0; col <= m; ++col) {
        if (used[col]) {
          u[row_of[col]] += delta;
          v[col] -= delta;
        } else {
          slack[col] -= delta;
        }
      }
      col0 = col1;
    } while (row_of[col0] != 0);
    do {
      const int64_t col1 = way[col0];
      row_of[col0] = row_of[col1];
      col0 = col1;
    } while (col0 != 0);
  }
  for (int64_t col = 1; col <= m; ++col) perm[row_of[col] - 1] = col - 1;
}

double permutation_total(const double* loss, int64_t m, const int64_t* perm) {
  double total = 0.0;
  for (int64_t j = 0; j < m; ++j) total += loss[perm[j] * m + j];
  return total;
}

// The first minimum over every permutation in lexicographic (itertools.permutations) order.
void exhaustive(const double* loss, int64_t m, int64_t* perm) {
  int64_t candidate[kMaxSources];
  std::iota(candidate, candidate + m, int64_t(0));
  std::copy(candidate, candidate + m, perm);
  double best = permutation_total(loss, m, candidate);
  while (std::next_permutation(candidate, candidate + m)) {
    const double total = permutation_total(loss, m, candidate);
    if (total < best) {
      best = total;
      std::copy(candidate, candidate + m, perm);
    }
  }
}

template <typename scalar_t>
void forward_impl(const at::Tensor& est, const at::Tensor& targets, int64_t metric, bool use_hungarian,
                  bool zero_mean, double eps, double max_snr, at::Tensor& row_loss, at::Tensor& perm,
                  at::Tensor& coeffs) {
  const int64_t batch = est.size(0), m = est.size(1), length = est.size(2);
  const int64_t num_tiles = ceil_div(length, kTile), size = stats_size(metric, m), chunk = forward_chunk(m);
  const bool l1 = metric == kL1, centered = zero_mean && is_sdr(metric);
  const double tau = std::pow(10.0, -max_snr / 10.0);
  const scalar_t* est_data = est.const_data_ptr<scalar_t>();
  const scalar_t* tgt_data = targets.const_data_ptr<scalar_t>();
  std::vector<double> partials(static_cast<size_t>(batch * num_tiles * size), 0.0);

  at::parallel_for(0, batch * num_tiles, 1, [&](int64_t first, int64_t last) {
    std::vector<double> buffer(static_cast<size_t>(2 * m * chunk));
    for (int64_t item = first; item < last; ++item) {
      const int64_t row = item / num_tiles, tile = item % num_tiles;
      pairwise_partials<scalar_t>(est_data + row * m * length, tgt_data + row * m * length, m, length,
                                  tile * kTile, std::min(length, (tile + 1) * kTile), chunk, l1, buffer.data(),
                                  partials.data() + item * size);
    }
  });

  int64_t* perm_data = perm.data_ptr<int64_t>();
  double* coeff_data = coeffs.data_ptr<double>();
  at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
    std::vector<double> stats(static_cast<size_t>(size)), loss(static_cast<size_t>(m * m));
    for (int64_t row = first; row < last; ++row) {
      const double* row_partials = partials.data() + row * num_tiles * size;
      std::copy(row_partials, row_partials + size, stats.begin());
      for (int64_t tile = 1; tile < num_tiles; ++tile) {
        for (int64_t k = 0; k < size; ++k) stats[k] += row_partials[tile * size + k];
      }
      bool finite = true;
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < m; ++j) {
          loss[i * m + j] = l1 ? stats[i * m + j] / static_cast<double>(length)
                               : pair_loss(metric, pair_of(stats.data(), m, i, j, length, centered), eps, tau,
                                           length, nullptr);
          finite = finite && std::isfinite(loss[i * m + j]);
        }
      }
      int64_t* row_perm = perm_data + row * m;
      // A non-finite entry makes the row NaN and picks the identity, as asteroid's one-hot einsum does.
      if (!finite) {
        std::iota(row_perm, row_perm + m, int64_t(0));
      } else if (use_hungarian) {
        hungarian(loss.data(), m, row_perm);
      } else {
        exhaustive(loss.data(), m, row_perm);
      }
      const double total = permutation_total(loss.data(), m, row_perm) / static_cast<double>(m);
      const double value = finite ? total : std::numeric_limits<double>::quiet_NaN();
      if (row_loss.scalar_type() == at::kDouble) {
        row_loss.data_ptr<double>()[row] = value;
      } else {
        row_loss.data_ptr<float>()[row] = static_cast<float>(value);
      }
      const double inv_m = 1.0 / static_cast<double>(m);
      for (int64_t j = 0; j < m; ++j) {
        double* c = coeff_data + (row * m + j) * kCoeffs;
        std::fill(c, c + kCoeffs, 0.0);
        if (l1) {
          c[0] = inv_m / static_cast<double>(length);
          continue;
        }
        const Pair p = pair_of(stats.data(), m, row_perm[j], j, length, centered);
        double d[3];
        pair_loss(metric, p, eps, tau, length, d);
        // grad_e = 2 dx e' + dz t', grad_t = dz e' + 2 dy t' with e' = e - mean_e, t' = t - mean_t.
        c[0] = 2.0 * d[0] * inv_m, c[1] = d[2] * inv_m, c[2] = -(c[0] * p.mean_e + c[1] * p.mean_t);
        c[3] = d[2] * inv_m, c[4] = 2.0 * d[1] * inv_m, c[5] = -(c[3] * p.mean_e + c[4] * p.mean_t);
      }
    }
  });
}

template <typename scalar_t>
NRT_ISA_CLONES void pair_gradients(const scalar_t* e, const scalar_t* t, int64_t count, const double* c, double g,
                                   bool l1, scalar_t* grad_e, scalar_t* grad_t) {
  if (l1) {
    const double scale = g * c[0];
    for (int64_t l = 0; l < count; ++l) {
      const double err = static_cast<double>(e[l]) - static_cast<double>(t[l]);
      // sign(0) = sign(NaN) = 0, like the MixIT L1 kernels.
      grad_e[l] = static_cast<scalar_t>(scale * (static_cast<double>(err > 0.0) - static_cast<double>(err < 0.0)));
    }
    if (grad_t != nullptr) {
      for (int64_t l = 0; l < count; ++l) grad_t[l] = static_cast<scalar_t>(-static_cast<double>(grad_e[l]));
    }
    return;
  }
  const double a0 = g * c[0], a1 = g * c[1], a2 = g * c[2];
  for (int64_t l = 0; l < count; ++l) {
    grad_e[l] = static_cast<scalar_t>(a0 * static_cast<double>(e[l]) + a1 * static_cast<double>(t[l]) + a2);
  }
  if (grad_t != nullptr) {
    const double b0 = g * c[3], b1 = g * c[4], b2 = g * c[5];
    for (int64_t l = 0; l < count; ++l) {
      grad_t[l] = static_cast<scalar_t>(b0 * static_cast<double>(e[l]) + b1 * static_cast<double>(t[l]) + b2);
    }
  }
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_rows, const at::Tensor& est, const at::Tensor& targets,
                   const at::Tensor& perm, const at::Tensor& coeffs, int64_t metric, at::Tensor& grad_est,
                   at::Tensor* grad_targets) {
  const int64_t batch = est.size(0), m = est.size(1), length = est.size(2);
  const int64_t num_tiles = ceil_div(length, kBackwardTile);
  const scalar_t* est_data = est.const_data_ptr<scalar_t>();
  const scalar_t* tgt_data = targets.const_data_ptr<scalar_t>();
  const double* grad_data = grad_rows.const_data_ptr<double>();
  const int64_t* perm_data = perm.const_data_ptr<int64_t>();
  const double* coeff_data = coeffs.const_data_ptr<double>();
  scalar_t* grad_est_data = grad_est.data_ptr<scalar_t>();
  scalar_t* grad_tgt_data = grad_targets != nullptr ? grad_targets->data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, batch * m * num_tiles, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t row = item / (m * num_tiles), j = item / num_tiles % m, tile = item % num_tiles;
      const int64_t i = perm_data[row * m + j];
      const int64_t begin = tile * kBackwardTile, count = std::min(length, begin + kBackwardTile) - begin;
      const int64_t e_offset = (row * m + i) * length + begin, t_offset = (row * m + j) * length + begin;
      pair_gradients<scalar_t>(est_data + e_offset, tgt_data + t_offset, count, coeff_data + (row * m + j) * kCoeffs,
                               grad_data[row], metric == kL1, grad_est_data + e_offset,
                               grad_tgt_data != nullptr ? grad_tgt_data + t_offset : nullptr);
    }
  });
}

void check_inputs(const at::Tensor& est, const at::Tensor& targets, int64_t metric) {
  TORCH_CHECK(est.device().is_cpu() && targets.device().is_cpu(), "nrt_kernels CPU kernels need CPU tensors, got ",
              est.device(), " and ", targets.device());
  TORCH_CHECK(est.dim() == 3 && est.sizes() == targets.sizes(), "est and targets must both be (B, M, T), got ",
              est.sizes(), " and ", targets.sizes());
  TORCH_CHECK(est.scalar_type() == targets.scalar_type(), "est and targets must have one dtype, got ",
              est.scalar_type(), " and ", targets.scalar_type());
  TORCH_CHECK(est.size(1) >= 1 && est.size(1) <= kMaxSources, "at most ", kMaxSources, " sources, got ",
              est.size(1));
  TORCH_CHECK(est.numel() > 0, "empty input");
  TORCH_CHECK(metric == kSiSdr || metric == kSdSdr || metric == kSnr || metric == kMse || metric == kL1 ||
                  metric == kLogMse,
              "unknown metric index ", metric);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> pit_forward_cpu(const at::Tensor& est_in, const at::Tensor& targets_in,
                                                               int64_t metric, bool hungarian, bool zero_mean,
                                                               double eps, double max_snr) {
  check_inputs(est_in, targets_in, metric);
  TORCH_CHECK(hungarian || est_in.size(1) <= kMaxExhaustiveSources, "the exhaustive solver supports at most ",
              kMaxExhaustiveSources, " sources, got ", est_in.size(1));
  const at::Tensor est = est_in.contiguous(), targets = targets_in.contiguous();
  const int64_t batch = est.size(0), m = est.size(1);
  const auto loss_dtype = est.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({batch}, est.options().dtype(loss_dtype));
  at::Tensor perm = at::empty({batch, m}, est.options().dtype(at::kLong));
  at::Tensor coeffs = at::empty({batch, m, kCoeffs}, est.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, est.scalar_type(), "pit_forward_cpu", [&] {
    forward_impl<scalar_t>(est, targets, metric, hungarian, zero_mean, eps, max_snr, row_loss, perm, coeffs);
  });
  return {row_loss, perm, coeffs};
}

std::tuple<at::Tensor, at::Tensor> pit_backward_cpu(const at::Tensor& grad_rows_in, const at::Tensor& est_in,
                                                    const at::Tensor& targets_in, const at::Tensor& perm_in,
                                                    const at::Tensor& coeffs_in, int64_t metric, bool targets_grad) {
  check_inputs(est_in, targets_in, metric);
  const at::Tensor est = est_in.contiguous(), targets = targets_in.contiguous();
  const int64_t batch = est.size(0), m = est.size(1);
  const at::Tensor grad_rows = grad_rows_in.to(at::kDouble).contiguous();
  const at::Tensor perm = perm_in.to(at::kLong).contiguous();
  const at::Tensor coeffs = coeffs_in.to(at::kDouble).contiguous();
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == batch, "grad_rows must be (B,), got ", grad_rows.sizes());
  TORCH_CHECK(perm.dim() == 2 && perm.size(0) == batch && perm.size(1) == m, "perm must be (B, M), got ",
              perm.sizes());
  TORCH_CHECK(coeffs.dim() == 3 && coeffs.size(0) == batch && coeffs.size(1) == m && coeffs.size(2) == kCoeffs,
              "coeffs must be (B, M, ", kCoeffs, "), got ", coeffs.sizes());
  const int64_t* perm_data = perm.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < perm.numel(); ++k) {
    TORCH_CHECK(perm_data[k] >= 0 && perm_data[k] < m, "perm holds ", perm_data[k], ", not an index in [0, ", m, ")");
  }
  at::Tensor grad_est = at::empty_like(est);
  at::Tensor grad_targets = targets_grad ? at::empty_like(targets) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, est.scalar_type(), "pit_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_rows, est, targets, perm, coeffs, metric, grad_est,
                            targets_grad ? &grad_targets : nullptr);
  });
  return {grad_est, grad_targets};
}

}  // namespace nrt_kernels
