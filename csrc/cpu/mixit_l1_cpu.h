// CPU kernels of the fused MixIT L1 (see nrt_kernels/ops/mixit_l1.py for the algorithm and semantics).
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace nrt_kernels {

// est (B, M, D) and mixtures (B, N, D) of one floating dtype; masks (P, N) int32 from
// nrt_kernels.assignments.candidate_masks.  Returns (row_loss (B,) float32, or float64 for
// float64 input; best (B,) int64): each row's first minimum over candidates, NaN first.  With
// `mean` the loss is the rows' mean (0-dim), computed as torch's mean of them.
std::tuple<at::Tensor, at::Tensor> mixit_l1_forward_cpu(const at::Tensor& est, const at::Tensor& mixtures,
                                                        const at::Tensor& masks, bool mean);

// grad_est = grad_rows / (N * D) * sign(err of the source's mixture); grad_mixtures = -that per
// mixture, or an undefined tensor when !mixtures_grad.  `grad` is the (B,) grad_rows, or with `mean`
// the 0-dim gradient of the rows' mean (grad_rows = grad / B, as autograd's mean backward gives).
std::tuple<at::Tensor, at::Tensor> mixit_l1_backward_cpu(const at::Tensor& grad, const at::Tensor& est,
                                                         const at::Tensor& mixtures, const at::Tensor& best,
                                                         const at::Tensor& masks, bool mixtures_grad, bool mean);

}  // namespace nrt_kernels
