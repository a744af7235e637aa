// CPU kernels of the fused Gram-metric MixIT (see nrt_kernels/ops/mixit_gram/__init__.py for the algorithm and
// semantics).
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace nrt_kernels {

// est (B, M, D) and mixtures (B, N, D) of one floating dtype; masks (P, N) int32 from
// nrt_kernels.assignments.candidate_masks; metric one of build_config.GRAM_METRIC_CODES; tau = 10^(-max_snr/10).
// Returns (row_loss (B,) float32, or float64 for float64 input: each row's first minimum over candidates, NaN
// first; best (B,) int64: its index; dloss (B, N, 5) float64: the derivative of the row loss with respect to the
// chosen candidate's Q, X, XX, S, T per mixture).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixit_gram_forward_cpu(const at::Tensor& est, const at::Tensor& mixtures,
                                                                      const at::Tensor& masks, int64_t metric,
                                                                      bool zero_mean, double eps, double tau);

// grad_rows (B,) and the forward's dloss: every source of mixture n gets grad_row (2 dQ remix_n + dX mix_n + dS),
// mixture n gets grad_row (dX remix_n + 2 dXX mix_n + dT) (an undefined tensor when !mixtures_grad).
std::tuple<at::Tensor, at::Tensor> mixit_gram_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& dloss,
                                                           const at::Tensor& est, const at::Tensor& mixtures,
                                                           const at::Tensor& best, const at::Tensor& masks,
                                                           bool mixtures_grad);

}  // namespace nrt_kernels
