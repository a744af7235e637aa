"""The backend registry of every op: which implementation runs a call, and how it is loaded.

``impl=`` names: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"``, ``"reference"``.  An op's kernel backends live in
``nrt_kernels/ops/<op>/<impl>.py`` (listed in :data:`BACKEND_MODULES`); such a module is imported the first time
its impl is resolved or called, and registers its functions with :func:`register`.  So ``import nrt_kernels``
imports neither triton nor the C++ extension nor the CUDA library, and an op called with an impl nothing has
registered yet loads it instead of failing.

``"reference"`` is the plain-PyTorch definition in ``nrt_kernels.reference``; the front-ends call it directly.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any, Callable, NamedTuple

import torch

IMPLS = ("auto", "triton", "cuda", "cpu", "reference")

# (op, impl) -> the module that registers that backend when imported.  An op without an entry for an impl has no
# such backend; "reference" is never listed (the front-ends run it).
BACKEND_MODULES = {
    ("mixit_l1", "triton"): "nrt_kernels.ops.mixit_l1.triton",
    ("mixit_l1", "cpu"): "nrt_kernels.ops.mixit_l1.cpu",
    ("mixit_l1", "cuda"): "nrt_kernels.ops.mixit_l1.cuda",
    ("noise_robust_l1", "triton"): "nrt_kernels.ops.noise_robust_l1.triton",
    # The CUDA library holds the MixIT L1 kernels; on CUDA the fused V1/V2 op is the Triton kernel, so there is
    # one GPU implementation of it to keep exact (README, "Backends").
    ("noise_robust_l1", "cuda"): "nrt_kernels.ops.noise_robust_l1.triton",
    ("noise_robust_l1", "cpu"): "nrt_kernels.ops.noise_robust_l1.cpu",
    ("pit", "triton"): "nrt_kernels.ops.pit.triton",
    ("pit", "cpu"): "nrt_kernels.ops.pit.cpu",
    # MixIT with SI-SDR, SD-SDR, SNR, MSE or log-MSE (one Gram pass); the CUDA library computes only the L1.
    ("mixit_gram", "triton"): "nrt_kernels.ops.mixit_gram.triton",
    ("mixit_gram", "cpu"): "nrt_kernels.ops.mixit_gram.cpu",
}


class Kernel(NamedTuple):
    """A backend of a torch.library op: the functions its custom ops call (signatures: the op's module)."""

    forward: Callable
    backward: Callable


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says how to get it."""


_registry: dict[tuple[str, str], Any] = {}


def register(op: str, impl: str, implementation: Any) -> None:
    """Called by a backend module when it is imported: ``implementation`` is a :class:`Kernel` (or, for a
    composition of other ops, whatever that op's module documents)."""
    _registry[(op, impl)] = implementation


def lookup(op: str, impl: str):
    """The registered implementation of ``op`` for a resolved ``impl``, importing its module on first use."""
    implementation = _registry.get((op, impl))
    if implementation is None:
        _load(op, impl)
        implementation = _registry[(op, impl)]
    return implementation


def _load(op: str, impl: str) -> None:
    module = BACKEND_MODULES.get((op, impl))
    if module is None:
        raise BackendUnavailable(f'{op} has no impl="{impl}" backend; use impl="auto" or impl="reference"')
    if impl == "triton" or module.endswith(".triton"):
        _require_triton()
    importlib.import_module(module)  # registers itself; a missing extension or library raises saying how to get it


def _require_triton() -> None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise BackendUnavailable('impl="triton" needs the triton package: pip install triton (Linux; on other '
                                 'systems use impl="cpu" or impl="auto")') from error


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_kernels_interpreted() -> bool | None:
    """Whether nrt_kernels' Triton kernels were loaded under the interpreter (None: none loaded yet).

    triton decides at each ``@triton.jit`` whether a kernel is interpreted; every kernel module imports
    ``ops/_triton_launch.py`` first, which records the setting."""
    module = sys.modules.get("nrt_kernels.ops._triton_launch")
    return None if module is None else module.INTERPRETED


def check_triton_device(device_type: str) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors when its kernels were loaded under TRITON_INTERPRET=1."""
    if device_type == "cuda":
        return
    if not triton_interpreted():
        raise BackendUnavailable(
            f'impl="triton" runs on CUDA tensors, got a {device_type} tensor; move the inputs to a GPU, use '
            'impl="auto"/"cpu"/"reference", or set TRITON_INTERPRET=1 before the first Triton call to run the Triton '
            "kernels on the CPU (slow, for testing)")
    if _triton_kernels_interpreted() is False:
        raise BackendUnavailable(
            "TRITON_INTERPRET=1 was set after nrt_kernels' Triton kernels were loaded for the GPU; set it before "
            "the first Triton call (before importing triton) to run them on the CPU")


def check_autograd_transforms(op: str, *tensors: torch.Tensor) -> None:
    """The fused ops' autograd formulas (torch.library.register_autograd) do not run under torch.func transforms in
    torch 2.13 (pytorch/pytorch#170834), and they have no forward-mode formula (dual inputs would silently lose
    their tangents): say so, and which impl does, instead of torch's setup_context error or a wrong result."""
    unsupported = None
    if torch._C._are_functorch_transforms_active():
        unsupported = "torch.func transforms (grad, vmap, jacrev, jvp, ...)"
    # Tangents exist only inside a dual level (forward_ad.dual_level); outside one, skip looking (host time).
    elif (not torch.compiler.is_compiling() and torch.autograd.forward_ad._current_level >= 0
          and any(torch.autograd.forward_ad.unpack_dual(tensor).tangent is not None for tensor in tensors)):
        unsupported = "forward-mode AD (dual tensors)"
    if unsupported:
        raise NotImplementedError(
            f"nrt_kernels' fused {op} op does not support {unsupported}; impl=\"reference\" (plain PyTorch, slower) "
            "does. Double backward (create_graph=True) works on every impl")


def _unavailable_reason(op: str, impl: str) -> str | None:
    try:
        lookup(op, impl)
    except BackendUnavailable as error:
        return str(error)
    return None


_fallbacks_said: set = set()


def _say_fallback(op: str, impl: str, reason: str) -> None:
    # "auto" on the CPU without the extension runs a loop 20-100x slower: said once, not hidden.
    if (op, impl) not in _fallbacks_said:
        _fallbacks_said.add((op, impl))
        warnings.warn(f'nrt_kernels: impl="auto" runs {op} on the reference loop because impl="{impl}" is '
                      f"unavailable: {reason}", RuntimeWarning, stacklevel=4)


# resolve() runs inside the front-ends, which torch.compile traces: marked constant (its arguments are strings),
# dynamo calls it once at trace time instead of tracing the import machinery.
@torch.compiler.assume_constant_result
def resolve(op: str, impl: str, device_type: str) -> str:
    """The backend of ``op`` that runs on ``device_type``: "triton", "cuda", "cpu" or "reference".

    ``"auto"`` takes Triton on CUDA tensors (measured as fast as the CUDA kernels at 4 sources and 1.7x faster at
    8 on an H200, benchmarks/RESULTS.md), the C++ extension on CPU tensors (24-124x the reference loop), else the
    reference.  An explicit impl that cannot run raises :class:`BackendUnavailable` (or the extension's or the
    library's own error) saying how to get it.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device_type == "cuda" and _unavailable_reason(op, "triton") is None:
            return "triton"
        if device_type == "cpu" and (op, "cpu") in BACKEND_MODULES:
            reason = _unavailable_reason(op, "cpu")
            if reason is None:
                return "cpu"
            _say_fallback(op, "cpu", reason)
        return "reference"
    if impl == "reference":
        return impl
    if impl == "triton":
        _require_triton()
        check_triton_device(device_type)
    elif device_type != impl:
        where = "a GPU" if impl == "cuda" else "the CPU with .cpu()"
        raise BackendUnavailable(f'impl="{impl}" runs on {impl.upper()} tensors, got a {device_type} tensor; move '
                                 f'the inputs to {where}, or use impl="auto"')
    lookup(op, impl)
    return impl
