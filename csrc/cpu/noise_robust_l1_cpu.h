// CPU kernels of the fused noise-robust loss, iSeparate-SDX V1/V2 (see nrt_kernels/ops/noise_robust_l1/ for the
// semantics, which these kernels share with the Triton kernels in triton.py there).
#pragma once

#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace nrt_kernels {

// est and targets (B, S, D) of one floating dtype; teacher (B, S, D) of that dtype, or empty when the teacher
// term is off; pair_masks (B,) int32 (bit s set: noisy stem s goes into mixture 0); source_weights (S,) in the
// accumulation dtype summing to 1, or empty; masks (P, 2) int32, nrt_kernels.assignments.candidate_masks(S, 2,
// "generalized"); weights the (l1, consistency, mixit, teacher) weights, 0 for a term that does not run (its
// inputs are not read).  Returns (loss () = sum(weights * terms) / divisor, terms (4,), best (B,) int64: each
// row's MixIT candidate, 0 without MixIT); loss and terms are float32, float64 for float64 input.
std::tuple<at::Tensor, at::Tensor, at::Tensor> noise_robust_l1_forward_cpu(
    const at::Tensor& est, const at::Tensor& targets, const at::Tensor& teacher, const at::Tensor& pair_masks,
    const at::Tensor& source_weights, const at::Tensor& masks, const std::vector<double>& weights, double divisor);

// grad_est (like est): grad_loss times the gradient of the loss, the sum of every active term's gradient.
at::Tensor noise_robust_l1_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& est, const at::Tensor& targets,
                                        const at::Tensor& teacher, const at::Tensor& pair_masks,
                                        const at::Tensor& source_weights, const at::Tensor& best,
                                        const at::Tensor& masks, const std::vector<double>& weights, double divisor);

}  // namespace nrt_kernels
