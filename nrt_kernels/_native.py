"""The compiled CPU extension (``csrc/mixit_l1.cpp`` + ``csrc/cpu/``): loading it and registering the "cpu" backend.

Nothing here runs at ``import nrt_kernels``: :func:`load_cpu_extension` is called the first time
``impl="cpu"`` (or ``impl="auto"`` on CPU tensors) is resolved.  It imports the module that
``setup.py`` built (``nrt_kernels._cpu``); failing that it compiles the same sources just in time
with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and ninja; about 10-20 s once, then
cached in the build directory, ``$NRT_KERNELS_BUILD_DIR`` or ``~/.cache/nrt_kernels``).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

# Must equal kAbiVersion in csrc/mixit_l1.cpp: a prebuilt module from older sources is rebuilt.
ABI_VERSION = 2

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ("mixit_l1.cpp", "cpu/mixit_l1_cpu.cpp", "cpu/pit_cpu.cpp")
# No -march: the module must run on any x86-64 / aarch64 CPU, not only the build machine's.
# -fopenmp makes at::parallel_for (inlined from ATen headers) use torch's OpenMP thread pool.
# -ffp-contract=off: no multiply-add is fused, so every ISA clone (NRT_ISA_CLONES) rounds alike.
COMPILE_ARGS = ("-O3", "-fopenmp", "-ffp-contract=off")
LINK_ARGS = ("-fopenmp",)

_HOW_TO_GET_IT = (
    'impl="cpu" needs the nrt_kernels CPU extension. Reinstall from a source checkout with a C++ compiler '
    "(pip install --no-build-isolation -e .), or install a C++ compiler (g++ or clang++) and ninja "
    "(pip install ninja) so that it is compiled just in time; set NRT_KERNELS_BUILD_DIR to choose where it is "
    'cached. impl="auto" and impl="reference" work without it.'
)


class NativeExtensionError(RuntimeError):
    """The CPU extension could not be imported or built; the message says how to get it."""


def _build_dir() -> Path:
    root = os.environ.get("NRT_KERNELS_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nrt_kernels")
    # One directory per torch build: the module links against libtorch's C++ ABI.
    path = Path(root) / f"torch-{torch.__version__}".replace("+", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _import_prebuilt():
    try:
        from . import _cpu
    except ImportError:
        return None
    if getattr(_cpu, "ABI_VERSION", None) != ABI_VERSION:
        return None
    # In a source checkout (editable install), C++ edited after the build wins: compile it just in time.
    sources = [_CSRC / name for name in _SOURCES] + [_CSRC / "cpu" / "mixit_l1_cpu.h", _CSRC / "cpu" / "pit_cpu.h"]
    built = os.path.getmtime(_cpu.__file__)
    if any(source.exists() and source.stat().st_mtime > built for source in sources):
        return None
    return _cpu


def _compile_just_in_time():
    from torch.utils import cpp_extension

    sources = [str(_CSRC / name) for name in _SOURCES]
    missing = [source for source in sources if not os.path.exists(source)]
    if missing:
        raise NativeExtensionError(f"the C++ sources are not installed ({', '.join(missing)}). {_HOW_TO_GET_IT}")
    return cpp_extension.load(
        name="nrt_kernels_cpu", sources=sources, extra_cflags=list(COMPILE_ARGS), extra_ldflags=list(LINK_ARGS),
        build_directory=str(_build_dir()), verbose=os.environ.get("NRT_KERNELS_VERBOSE_BUILD") == "1",
    )


@functools.lru_cache(maxsize=None)
def _load():
    module = _import_prebuilt()
    if module is None:
        try:
            module = _compile_just_in_time()
        except NativeExtensionError:
            raise
        except Exception as error:  # compiler missing, ninja missing, build failure: all say the same thing
            raise NativeExtensionError(f"building it failed ({type(error).__name__}: {error}). {_HOW_TO_GET_IT}") \
                from error
    _register(module)
    return module


def load_cpu_extension():
    """The loaded extension module, with the "cpu" backend registered; raises :class:`NativeExtensionError`."""
    return _load()


@functools.lru_cache(maxsize=None)
def _available() -> bool:
    try:
        _load()
    except NativeExtensionError:
        return False
    return True


# The two checks below run inside mixit_loss, which torch.compile traces: marked constant, dynamo calls them
# once at trace time (loading or building the extension there) instead of tracing the import machinery.
@torch.compiler.assume_constant_result
def cpu_extension_available() -> bool:
    """Whether :func:`load_cpu_extension` succeeds (it is tried once, compiling if needed)."""
    return _available()


@torch.compiler.assume_constant_result
def ensure_cpu_backend() -> bool:
    """Load the extension and register the "cpu" backend; raises :class:`NativeExtensionError` saying how to get it."""
    _load()
    return True


def _register(module) -> None:
    from .assignments import candidate_masks
    from .ops.mixit_l1 import register_backend

    def cpu_forward(est, mixtures, partitions):
        masks = candidate_masks(est.shape[1], mixtures.shape[1], partitions)
        return module.mixit_l1_forward(est, mixtures, masks)

    def cpu_backward(grad_rows, est, mixtures, best, partitions, mixtures_grad):
        masks = candidate_masks(est.shape[1], mixtures.shape[1], partitions)
        return module.mixit_l1_backward(grad_rows, est, mixtures, best, masks, mixtures_grad)

    register_backend("cpu", cpu_forward, cpu_backward)
