"""The hand-written CUDA kernels (``csrc/cuda/mixit_l1_cuda.cu``): building and loading the library.

The kernels include no torch header: plain ``nvcc`` builds them into a shared library (cudart linked
statically, so only the driver's ``libcuda`` is needed at run time) and this module drives it through
``ctypes`` with raw ``data_ptr()``s and the caller's current stream.  Torch allocates every output and
the forward's scratch, so the caching allocator and stream semantics stay torch's.

Nothing here runs at ``import nrt_kernels``: :func:`load` is called when ``nrt_kernels/ops/mixit_l1/cuda.py`` (the
"cuda" backend) is first imported.  The library is taken from, in order:

1. ``$NRT_CUDA_LIB``, the path of a prebuilt library;
2. ``nrt_kernels/libnrt_kernels_cuda.so``, built next to the package by ``setup.py`` (skipped when the
   ``.cu`` of a source checkout is newer);
3. a just-in-time ``nvcc`` build, cached in ``$NRT_KERNELS_BUILD_DIR``, ``$TORCH_EXTENSIONS_DIR`` or
   ``~/.cache/nrt_kernels`` under a name that hashes the source and the flags (once; 94 kernel instances
   take a few minutes on two cores, well under a minute on sixteen).

``python -m nrt_kernels._cuda_lib --build OUTDIR`` builds the library into ``OUTDIR``.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import os
import sys
import threading
from pathlib import Path

from . import build_config
from .backends import BackendUnavailable

LIBRARY_NAME = build_config.CUDA_LIBRARY_NAME
ENV_LIBRARY = "NRT_CUDA_LIB"
EXPORTED_SYMBOLS = ("nrt_cuda_abi_version", "nrt_cuda_error_string", "nrt_mixit_l1_forward_workspace",
                    "nrt_mixit_l1_forward", "nrt_mixit_l1_backward")

_PACKAGE_DIR = Path(__file__).resolve().parent

_HOW_TO_GET_IT = (
    'impl="cuda" needs the nrt_kernels CUDA library (csrc/cuda/mixit_l1_cuda.cu). Build it with '
    "`python -m nrt_kernels._cuda_lib --build DIR` and point NRT_CUDA_LIB at DIR/" + LIBRARY_NAME + ", reinstall "
    "from a source checkout with nvcc on PATH, or put nvcc (CUDA >= 12) on PATH / set CUDA_HOME so it is compiled "
    'just in time. impl="triton" and impl="reference" work without it.'
)


class CudaLibraryError(BackendUnavailable):
    """The CUDA library could not be found, built or loaded; the message says how to get it."""


# ----------------------------------------------------------------------------------------------
# Building (the nvcc command itself is build_config's, shared with setup.py)
# ----------------------------------------------------------------------------------------------


def source_path() -> Path:
    try:
        return build_config.cuda_source_path(_PACKAGE_DIR)
    except build_config.BuildError as error:
        raise CudaLibraryError(f"{error}. {_HOW_TO_GET_IT}") from None


def build(outdir, *, nvcc: str | None = None, output_name: str = LIBRARY_NAME, gencodes=build_config.GENCODES,
          verbose: bool = False) -> Path:
    """Compile the library into ``outdir/output_name`` and return its path (atomic: built aside, then renamed)."""
    try:
        return build_config.build_cuda_library(outdir, package_dir=_PACKAGE_DIR, nvcc=nvcc, output_name=output_name,
                                               gencodes=gencodes, verbose=verbose)
    except build_config.BuildError as error:
        raise CudaLibraryError(f"{error}. {_HOW_TO_GET_IT}") from None


def _cache_dir() -> Path:
    root = (os.environ.get("NRT_KERNELS_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
            or os.path.join(os.path.expanduser("~"), ".cache", "nrt_kernels"))
    return Path(root) / "cuda"


def _cached_name() -> str:
    digest = hashlib.sha256(source_path().read_bytes())
    digest.update(" ".join((*build_config.nvcc_flags(), *build_config.GENCODES)).encode())
    return f"libnrt_kernels_cuda-{digest.hexdigest()[:16]}.so"


def _source_newer_than(library: Path) -> bool:
    try:
        return source_path().stat().st_mtime > library.stat().st_mtime
    except CudaLibraryError:
        return False  # no source installed: the packaged library is all there is


def _candidate_paths():
    """(path, where it came from) in lookup order; the JIT entry is built on demand."""
    env = os.environ.get(ENV_LIBRARY)
    if env:
        yield Path(env), f"${ENV_LIBRARY}"
        return  # an explicit library is the only one tried: a wrong path must not silently fall back
    packaged = _PACKAGE_DIR / LIBRARY_NAME
    # In a checkout whose .cu was edited after the build, the packaged library is stale: rebuild instead.
    if packaged.exists() and not _source_newer_than(packaged):
        yield packaged, "the package directory"
    yield None, "a just-in-time build"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

_i64 = ctypes.c_int64
_int = ctypes.c_int
_ptr = ctypes.c_void_p


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.nrt_cuda_abi_version.restype = _int
    lib.nrt_cuda_abi_version.argtypes = []
    lib.nrt_cuda_error_string.restype = ctypes.c_char_p
    lib.nrt_cuda_error_string.argtypes = [_int]
    lib.nrt_mixit_l1_forward_workspace.restype = _int
    lib.nrt_mixit_l1_forward_workspace.argtypes = [_i64, _int, _int, _i64, _int, ctypes.POINTER(_i64)]
    lib.nrt_mixit_l1_forward.restype = _int
    lib.nrt_mixit_l1_forward.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _int, _int, _i64, _int, _int,
                                         _ptr]
    lib.nrt_mixit_l1_backward.restype = _int
    lib.nrt_mixit_l1_backward.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _int, _int, _i64, _int, _ptr]
    return lib


def _open(path: Path, origin: str) -> ctypes.CDLL:
    try:
        lib = _declare(ctypes.CDLL(str(path)))
    except (OSError, AttributeError) as error:
        raise CudaLibraryError(f"could not load {path} (from {origin}): {error}. {_HOW_TO_GET_IT}") from error
    version = lib.nrt_cuda_abi_version()
    if version != build_config.CUDA_ABI_VERSION:
        raise CudaLibraryError(f"{path} (from {origin}) has ABI version {version}, this nrt_kernels needs "
                               f"{build_config.CUDA_ABI_VERSION}: rebuild it. {_HOW_TO_GET_IT}")
    return lib


_load_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _load_cached() -> ctypes.CDLL:
    problems = []
    for path, origin in _candidate_paths():
        if path is None:
            path = _cache_dir() / _cached_name()
            if not path.exists():
                build(path.parent, output_name=path.name)
            return _open(path, origin)
        try:
            return _open(path, origin)
        except CudaLibraryError as error:
            if origin == f"${ENV_LIBRARY}":
                raise
            problems.append(str(error))  # a stale packaged library: fall through to the JIT build
    raise CudaLibraryError("; ".join(problems) or _HOW_TO_GET_IT)


def load() -> ctypes.CDLL:
    """The loaded library (found or built once per process); raises CudaLibraryError saying how to get it."""
    with _load_lock:
        return _load_cached()


def check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        message = lib.nrt_cuda_error_string(code).decode(errors="replace")
        raise RuntimeError(f"nrt_kernels CUDA {what} failed: {message} (cudaError {code})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nrt_kernels._cuda_lib", description=__doc__.split("\n")[0])
    parser.add_argument("--build", metavar="OUTDIR", required=True, help=f"write OUTDIR/{LIBRARY_NAME}")
    parser.add_argument("--nvcc", help="the nvcc to use (default: PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    parser.add_argument("--verbose", action="store_true", help="print the nvcc command")
    args = parser.parse_args(argv)
    try:
        path = build(args.build, nvcc=args.nvcc, verbose=args.verbose)
    except CudaLibraryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
