"""C++ CPU backend of the PIT op (``csrc/cpu/pit_cpu.cpp``); importing it loads (or builds) the extension."""
from __future__ import annotations

from ... import backends
from ..._native import load_cpu_extension

_extension = load_cpu_extension()  # raises NativeExtensionError saying how to get it


def forward(est, targets, metric: int, hungarian: bool, zero_mean: bool, eps: float, max_snr: float):
    return _extension.pit_forward(est, targets, metric, hungarian, zero_mean, eps, max_snr)


def backward(grad_rows, est, targets, perm, coeffs, metric: int, targets_grad: bool):
    return _extension.pit_backward(grad_rows, est, targets, perm, coeffs, metric, targets_grad)


backends.register("pit", "cpu", backends.Kernel(forward, backward))
