"""Which implementation runs a call: ``impl=`` names and how ``"auto"`` picks one."""
from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "cuda", "cpu", "reference")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_triton_runnable(tensor: torch.Tensor) -> None:
    """The Triton launchers' own guard, for calls that reach the ops without going through resolve_impl."""
    if tensor.device.type != "cuda" and not triton_interpreted():
        raise RuntimeError(
            f'impl="triton" needs CUDA tensors, got a tensor on {tensor.device}; move the inputs to a GPU, use '
            'impl="auto"/"cpu"/"reference", or set TRITON_INTERPRET=1 before importing nrt_kernels to run the Triton '
            "kernels on the CPU (slow, for testing)")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_extension_available() -> bool:
    from . import _native

    return _native.cpu_extension_available()


def resolve_impl(impl: str, device: torch.device) -> str:
    """The backend that runs on ``device``: "triton", "cuda", "cpu" or "reference"; errors say how to get one."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        # Measured (benchmarks/RESULTS.md, H200): Triton as fast as the CUDA kernels at 4 sources, 1.7x faster at
        # 8; the C++ extension 24-124x faster than the reference loop on the CPU.
        if device.type == "cuda" and _triton_available():
            return "triton"
        # The CPU extension is imported (or compiled once) on first use; without it, the reference.
        if device.type == "cpu" and _cpu_extension_available():
            return "cpu"
        return "reference"
    if impl == "triton":
        if not _triton_available():
            raise RuntimeError('impl="triton" needs the triton package: pip install triton')
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f'impl="triton" runs on CUDA tensors, got {device}; move the inputs to a GPU, use impl="auto", or '
                "set TRITON_INTERPRET=1 before importing nrt_kernels to run the Triton kernels on the CPU (slow)")
        return "triton"
    if impl == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f'impl="cpu" runs on CPU tensors, got {device}; move the inputs with .cpu() or use '
                               'impl="auto"')
        from . import _native

        _native.ensure_cpu_backend()  # registers the backend; raises NativeExtensionError saying how to get it
        return "cpu"
    if impl == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f'impl="cuda" runs on CUDA tensors, got {device}; move the inputs to a GPU, or use '
                               'impl="auto"')
        from . import _cuda_lib

        _cuda_lib.ensure_registered()  # loads or builds the library; raises CudaLibraryError saying how to get it
        return "cuda"
    return impl
