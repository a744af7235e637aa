// CPU kernels of the fused Gram-metric MixIT (see nrt_kernels/ops/mixit_gram/__init__.py for the algorithm and
// semantics).
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace nrt_kernels {

// est (B, M, D) and mixtures (B, N, D) of one floating dtype; masks (P, N) int32 from
// nrt_kernels.assignments.candidate_masks; metric one of build_config.GRAM_METRIC_CODES; tau = 10^(-max_snr/10).
// Returns (best (B,) int64: each row's first minimum over candidates, NaN first; stats (B, N, 5) float64: the
// chosen candidate's Q, X, XX, S, T per mixture).
std::tuple<at::Tensor, at::Tensor> mixit_gram_forward_cpu(const at::Tensor& est, const at::Tensor& mixtures,
                                                          const at::Tensor& masks, int64_t metric, bool zero_mean,
                                                          double eps, double tau);

// coefficients (B, N, 6) float64: every source of mixture n gets c0 * remix_n + c1 * mix_n + c2, mixture n gets
// c3 * remix_n + c4 * mix_n + c5 (an undefined tensor when !mixtures_grad).
std::tuple<at::Tensor, at::Tensor> mixit_gram_backward_cpu(const at::Tensor& coefficients, const at::Tensor& est,
                                                           const at::Tensor& mixtures, const at::Tensor& best,
                                                           const at::Tensor& masks, bool mixtures_grad);

}  // namespace nrt_kernels
