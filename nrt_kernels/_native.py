"""The compiled CPU extension (``csrc/mixit_l1.cpp`` + ``csrc/cpu/``): importing it, or building it just in time.

Nothing here runs at ``import nrt_kernels``: :func:`load_cpu_extension` is called when an op's "cpu" backend module
(``nrt_kernels/ops/<op>/cpu.py``) is first imported.  It imports the module that
``setup.py`` built (``nrt_kernels._cpu``); failing that it compiles the same sources just in time
with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and ninja; about 10-20 s once, then
cached in the build directory, ``$NRT_KERNELS_BUILD_DIR`` or ``~/.cache/nrt_kernels``).
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

from . import build_config
from .backends import BackendUnavailable

_PACKAGE = Path(__file__).resolve().parent


def _source_root() -> Path:
    """Where csrc/ lives: the source checkout beside the package, else the copy an installed wheel carries."""
    checkout = _PACKAGE.parent
    return checkout if (checkout / build_config.CPU_SOURCES[0]).exists() else _PACKAGE

_HOW_TO_GET_IT = (
    'impl="cpu" needs the nrt_kernels CPU extension. Reinstall from a source checkout with a C++ compiler '
    "(pip install --no-build-isolation -e .), or install a C++ compiler (g++ or clang++) and ninja "
    "(pip install ninja) so that it is compiled just in time; set NRT_KERNELS_BUILD_DIR to choose where it is "
    'cached. impl="auto" and impl="reference" work without it.'
)


class NativeExtensionError(BackendUnavailable):
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
    if getattr(_cpu, "ABI_VERSION", None) != build_config.CPU_ABI_VERSION:
        return None
    # In a source checkout (editable install), C++ edited after the build wins: compile it just in time.
    sources = [_source_root() / name for name in (*build_config.CPU_SOURCES, *build_config.CPU_HEADERS)]
    built = os.path.getmtime(_cpu.__file__)
    if any(source.exists() and source.stat().st_mtime > built for source in sources):
        return None
    return _cpu


def _prebuilt_present() -> bool:
    return any(_PACKAGE.glob("_cpu.*"))


def _compile_just_in_time():
    from torch.utils import cpp_extension

    sources = [str(_source_root() / name) for name in build_config.CPU_SOURCES]
    missing = [source for source in sources if not os.path.exists(source)]
    if missing:
        raise NativeExtensionError(f"the C++ sources are not installed ({', '.join(missing)}). {_HOW_TO_GET_IT}")
    return cpp_extension.load(
        name="nrt_kernels_cpu", sources=sources, extra_cflags=build_config.cpu_compile_args(),
        extra_ldflags=list(build_config.CPU_LINK_ARGS),
        build_directory=str(_build_dir()), verbose=os.environ.get("NRT_KERNELS_VERBOSE_BUILD") == "1",
    )


@functools.lru_cache(maxsize=None)
def load_cpu_extension():
    """The loaded extension module (imported or built once per process); raises :class:`NativeExtensionError`."""
    module = _import_prebuilt()
    if module is not None:
        return module
    if not _prebuilt_present():
        warnings.warn("nrt_kernels was installed without its C++ CPU extension (NRT_SKIP_CPU_EXT=1, or a "
                      "build-isolated `pip install` that cannot see torch); compiling it just in time (the first "
                      "time 10-20 s, then cached). To build it at install time: pip install --no-build-isolation .",
                      RuntimeWarning, stacklevel=2)
    try:
        return _compile_just_in_time()
    except NativeExtensionError:
        raise
    except Exception as error:  # compiler missing, ninja missing, build failure: all say the same thing
        raise NativeExtensionError(f"building it failed ({type(error).__name__}: {error}). {_HOW_TO_GET_IT}") from error
