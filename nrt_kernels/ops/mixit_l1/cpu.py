"""C++ CPU backend of the MixIT L1 op (``csrc/cpu/mixit_l1_cpu.cpp``); importing it loads (or builds) the extension."""
from __future__ import annotations

from ... import backends
from ..._native import load_cpu_extension
from ...assignments import candidate_masks

_extension = load_cpu_extension()  # raises NativeExtensionError saying how to get it


def forward(est, mixtures, partitions: str, *, mean: bool = False):
    masks = candidate_masks(est.shape[1], mixtures.shape[1], partitions)
    return _extension.mixit_l1_forward(est, mixtures, masks, mean)


def backward(grad, est, mixtures, best, partitions: str, mixtures_grad: bool, *, mean: bool = False):
    masks = candidate_masks(est.shape[1], mixtures.shape[1], partitions)
    return _extension.mixit_l1_backward(grad, est, mixtures, best, masks, mixtures_grad, mean)


backends.register("mixit_l1", "cpu", backends.Kernel(forward, backward))
