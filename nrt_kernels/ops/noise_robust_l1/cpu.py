"""C++ CPU backend of the fused noise-robust loss (``csrc/cpu/noise_robust_l1_cpu.cpp``): one pass forward over est,
targets and teacher targets for every active term including the MixIT search, one pass backward; importing it loads
(or builds) the extension."""
from __future__ import annotations

from ... import backends
from ..._native import load_cpu_extension
from ...assignments import candidate_masks
from . import NUM_MIXTURES, OP

_extension = load_cpu_extension()  # raises NativeExtensionError saying how to get it
_masks: dict[int, "torch.Tensor"] = {}  # source count -> candidate masks on the CPU (a dict hit: host time of small calls)


def _candidate_masks(num_sources: int):
    masks = _masks.get(num_sources)
    if masks is None:
        masks = _masks[num_sources] = candidate_masks(num_sources, NUM_MIXTURES, "generalized")
    return masks


def forward(est, targets, teacher, pair_masks, source_weights, weights, divisor):
    return _extension.noise_robust_l1_forward(est, targets, teacher, pair_masks, source_weights,
                                              _candidate_masks(est.shape[1]), weights, divisor)


def backward(grad_loss, est, targets, teacher, pair_masks, source_weights, best, weights, divisor):
    masks = _candidate_masks(est.shape[1])
    return _extension.noise_robust_l1_backward(grad_loss, est, targets, teacher, pair_masks, source_weights, best,
                                               masks, weights, divisor)


backends.register(OP, "cpu", backends.Kernel(forward, backward))
