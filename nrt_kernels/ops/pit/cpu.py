"""The "cpu" backend of the PIT op: the C++ kernels of csrc/cpu/pit_cpu.cpp in the nrt_kernels CPU extension."""
from __future__ import annotations

from ... import _native
from . import register_backend

_module = _native.load_cpu_extension()  # raises NativeExtensionError saying how to get it


def cpu_forward(est, targets, metric, hungarian, zero_mean, eps, max_snr):
    return _module.pit_forward(est, targets, metric, hungarian, zero_mean, eps, max_snr)


def cpu_backward(grad_rows, est, targets, perm, coeffs, metric, targets_grad):
    return _module.pit_backward(grad_rows, est, targets, perm, coeffs, metric, targets_grad)


register_backend("cpu", cpu_forward, cpu_backward)
