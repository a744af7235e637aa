// CPU kernels of the fused PIT loss (see nrt_kernels/ops/pit/__init__.py for the algorithm and semantics).
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace nrt_kernels {

// est and targets (B, M, T) of one floating dtype.  metric: the index in nrt_kernels.ops.pit.METRICS;
// hungarian: the solver (false: every permutation in itertools.permutations order).  Returns
// (row_loss (B,) float32, or float64 for float64 input; perm (B, M) int64, the est index matched to each
// target; coeffs (B, M, 6) float64, the backward's per-(row, target) coefficients).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pit_forward_cpu(const at::Tensor& est, const at::Tensor& targets,
                                                               int64_t metric, bool hungarian, bool zero_mean,
                                                               double eps, double max_snr);

// grad_est[b, perm[b, j]] = grad_rows[b] * (c0 * est + c1 * target_j + c2), grad_targets[b, j] likewise with
// c3..c5 (L1: c0 * sign(est - target_j) and its negative); grad_targets undefined when !targets_grad.
std::tuple<at::Tensor, at::Tensor> pit_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& est,
                                                    const at::Tensor& targets, const at::Tensor& perm,
                                                    const at::Tensor& coeffs, int64_t metric, bool targets_grad);

}  // namespace nrt_kernels
