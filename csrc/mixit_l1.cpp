// Python entry of the CPU kernels (the extension module nrt_kernels._cpu): pybind11 functions on plain
// tensors.  The torch.library ops, their fake implementations and autograd live in nrt_kernels/ops/<op>/;
// nrt_kernels/ops/<op>/cpu.py registers these functions as that op's "cpu" backend.
#include <torch/csrc/utils/pybind.h>

#include "cpu/mixit_gram_cpu.h"
#include "cpu/mixit_l1_cpu.h"
#include "cpu/noise_robust_l1_cpu.h"
#include "cpu/pit_cpu.h"
#include "nrt_config.h"


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nrt_kernels CPU kernels (fused MixIT: L1 and the Gram metrics; fused PIT; fused noise-robust loss)";
  // build_config.CPU_ABI_VERSION: nrt_kernels/_native.py rebuilds a stale prebuilt module instead of crashing.
  m.attr("ABI_VERSION") = NRT_ABI_VERSION;
  m.def("mixit_l1_forward", &nrt_kernels::mixit_l1_forward_cpu, pybind11::arg("est"), pybind11::arg("mixtures"),
        pybind11::arg("masks"), pybind11::arg("mean"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "(est (B, M, D), mixtures (B, N, D), masks (P, N) int32, mean) -> (row_loss (B,) or their mean (), "
        "best (B,) int64)");
  m.def("mixit_l1_backward", &nrt_kernels::mixit_l1_backward_cpu, pybind11::arg("grad_rows"), pybind11::arg("est"),
        pybind11::arg("mixtures"), pybind11::arg("best"), pybind11::arg("masks"), pybind11::arg("mixtures_grad"),
        pybind11::arg("mean"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "(grad_rows (B,), or with mean the 0-dim grad of their mean, est, mixtures, best, masks, mixtures_grad, "
        "mean) -> (grad_est like est, grad_mixtures like mixtures or None)");
  m.def("pit_forward", &nrt_kernels::pit_forward_cpu, pybind11::arg("est"), pybind11::arg("targets"),
        pybind11::arg("metric"), pybind11::arg("hungarian"), pybind11::arg("zero_mean"), pybind11::arg("eps"),
        pybind11::arg("max_snr"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "(est (B, M, T), targets (B, M, T), ...) -> (row_loss (B,), perm (B, M) int64, coeffs (B, M, 6) float64)");
  m.def("pit_backward", &nrt_kernels::pit_backward_cpu, pybind11::arg("grad_rows"), pybind11::arg("est"),
        pybind11::arg("targets"), pybind11::arg("perm"), pybind11::arg("coeffs"), pybind11::arg("metric"),
        pybind11::arg("targets_grad"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "-> (grad_est like est, grad_targets like targets or None)");
  m.def("noise_robust_l1_forward", &nrt_kernels::noise_robust_l1_forward_cpu, pybind11::arg("est"),
        pybind11::arg("targets"), pybind11::arg("teacher"), pybind11::arg("pair_masks"),
        pybind11::arg("source_weights"), pybind11::arg("masks"), pybind11::arg("weights"), pybind11::arg("divisor"),
        pybind11::call_guard<pybind11::gil_scoped_release>(), "-> (loss (), terms (4,), best (B,) int64)");
  m.def("noise_robust_l1_backward", &nrt_kernels::noise_robust_l1_backward_cpu, pybind11::arg("grad_loss"),
        pybind11::arg("est"), pybind11::arg("targets"), pybind11::arg("teacher"), pybind11::arg("pair_masks"),
        pybind11::arg("source_weights"), pybind11::arg("best"), pybind11::arg("masks"), pybind11::arg("weights"),
        pybind11::arg("divisor"), pybind11::call_guard<pybind11::gil_scoped_release>(), "-> grad_est like est");
  m.def("mixit_gram_forward", &nrt_kernels::mixit_gram_forward_cpu, pybind11::arg("est"), pybind11::arg("mixtures"),
        pybind11::arg("masks"), pybind11::arg("metric"), pybind11::arg("zero_mean"), pybind11::arg("eps"),
        pybind11::arg("tau"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "(est (B, M, D), mixtures (B, N, D), masks (P, N) int32, metric code, zero_mean, eps, tau) -> "
        "(row_loss (B,), best (B,) int64, dloss (B, N, 5) float64)");
  m.def("mixit_gram_backward", &nrt_kernels::mixit_gram_backward_cpu, pybind11::arg("grad_rows"),
        pybind11::arg("dloss"), pybind11::arg("est"), pybind11::arg("mixtures"), pybind11::arg("best"),
        pybind11::arg("masks"), pybind11::arg("mixtures_grad"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "-> (grad_est like est, grad_mixtures like mixtures or None)");
}
