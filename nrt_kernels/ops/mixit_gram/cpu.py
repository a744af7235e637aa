"""C++ CPU backend of the Gram-metric MixIT op (``csrc/cpu/mixit_gram_cpu.cpp``); importing it loads (or builds)
the extension."""
from __future__ import annotations

from ... import backends
from ..._native import load_cpu_extension
from ...assignments import candidate_masks
from ...build_config import GRAM_METRIC_CODES
from . import OP

_extension = load_cpu_extension()  # raises NativeExtensionError saying how to get it


def forward(est, mixtures, partitions: str, metric: str, zero_mean: bool, eps: float, tau: float):
    masks = candidate_masks(est.shape[1], mixtures.shape[1], partitions)
    return _extension.mixit_gram_forward(est, mixtures, masks, GRAM_METRIC_CODES[metric], zero_mean, eps, tau)


def backward(grad_rows, dloss, est, mixtures, best, partitions: str, mixtures_grad: bool):
    masks = candidate_masks(est.shape[1], mixtures.shape[1], partitions)
    return _extension.mixit_gram_backward(grad_rows, dloss, est, mixtures, best, masks, mixtures_grad)


backends.register(OP, "cpu", backends.Kernel(forward, backward))
