"""The hand-written CUDA kernels (``csrc/cuda/mixit_l1_cuda.cu``): building, loading, and the "cuda" backend.

The kernels include no torch header: plain ``nvcc`` builds them into a shared library (cudart linked
statically, so only the driver's ``libcuda`` is needed at run time) and this module drives it through
``ctypes`` with raw ``data_ptr()``s and the caller's current stream.  Torch allocates every output and
the forward's scratch, so the caching allocator and stream semantics stay torch's.

Nothing here runs at ``import nrt_kernels``: :func:`ensure_registered` is called the first time
``impl="cuda"`` is resolved.  The library is taken from, in order:

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
import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

# Must equal nrt_cuda_abi_version() in the .cu: a library built from other sources is refused.
ABI_VERSION = 1
LIBRARY_NAME = "libnrt_kernels_cuda.so"
ENV_LIBRARY = "NRT_CUDA_LIB"
EXPORTED_SYMBOLS = ("nrt_cuda_abi_version", "nrt_cuda_error_string", "nrt_mixit_l1_forward_workspace",
                    "nrt_mixit_l1_forward", "nrt_mixit_l1_backward")

_PACKAGE_DIR = Path(__file__).resolve().parent
# A source checkout keeps csrc/ beside the package; an installed wheel may ship the file as package data.
_SOURCE_CANDIDATES = (_PACKAGE_DIR.parent / "csrc" / "cuda" / "mixit_l1_cuda.cu", _PACKAGE_DIR / "csrc" / "mixit_l1_cuda.cu")

# sm_80 machine code also runs on sm_86/sm_89; sm_90 covers H100/H200; the compute_90 PTX lets newer
# GPUs JIT it.  --threads 0 compiles the targets in parallel.
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static", "--threads", "0")
GENCODES = ("arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90")


def nvcc_command(nvcc: str, output, gencodes=GENCODES) -> list[str]:
    return [nvcc, *NVCC_FLAGS, *(f"-gencode={code}" for code in gencodes), str(source_path()), "-o", str(output)]

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_HOW_TO_GET_IT = (
    'impl="cuda" needs the nrt_kernels CUDA library (csrc/cuda/mixit_l1_cuda.cu). Build it with '
    "`python -m nrt_kernels._cuda_lib --build DIR` and point NRT_CUDA_LIB at DIR/" + LIBRARY_NAME + ", reinstall "
    "from a source checkout with nvcc on PATH, or put nvcc (CUDA >= 12) on PATH / set CUDA_HOME so it is compiled "
    'just in time. impl="triton" and impl="reference" work without it.'
)


class CudaLibraryError(RuntimeError):
    """The CUDA library could not be found, built or loaded; the message says how to get it."""


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


def source_path() -> Path:
    for path in _SOURCE_CANDIDATES:
        if path.exists():
            return path
    raise CudaLibraryError(f"the CUDA source is not installed (looked for {', '.join(map(str, _SOURCE_CANDIDATES))}). "
                           f"{_HOW_TO_GET_IT}")


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


def build(outdir, *, nvcc: str | None = None, output_name: str = LIBRARY_NAME, gencodes=GENCODES,
          verbose: bool = False) -> Path:
    """Compile the library into ``outdir/output_name`` and return its path (atomic: built aside, then renamed)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise CudaLibraryError(f"nvcc was not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin. {_HOW_TO_GET_IT}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    target = outdir / output_name
    with tempfile.TemporaryDirectory(dir=outdir, prefix=".build-") as scratch:
        partial = Path(scratch) / output_name
        command = nvcc_command(nvcc, partial, gencodes)
        if verbose:
            print(" ".join(command), file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise CudaLibraryError(f"nvcc failed ({' '.join(command)}):\n{result.stdout}{result.stderr}")
        os.replace(partial, target)
    return target


def _cache_dir() -> Path:
    root = (os.environ.get("NRT_KERNELS_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
            or os.path.join(os.path.expanduser("~"), ".cache", "nrt_kernels"))
    return Path(root) / "cuda"


def _cached_name() -> str:
    digest = hashlib.sha256(source_path().read_bytes())
    digest.update(" ".join((*NVCC_FLAGS, *GENCODES)).encode())
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
    if version != ABI_VERSION:
        raise CudaLibraryError(f"{path} (from {origin}) has ABI version {version}, this nrt_kernels needs "
                               f"{ABI_VERSION}: rebuild it. {_HOW_TO_GET_IT}")
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


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        message = lib.nrt_cuda_error_string(code).decode(errors="replace")
        raise RuntimeError(f"nrt_kernels CUDA {what} failed: {message} (cudaError {code})")


# ----------------------------------------------------------------------------------------------
# The "cuda" backend
# ----------------------------------------------------------------------------------------------


def _check_inputs(est: torch.Tensor, mixtures: torch.Tensor) -> int:
    if est.device.type != "cuda" or mixtures.device != est.device:
        raise RuntimeError(f'impl="cuda" needs est and mixtures on one CUDA device, got {est.device} and '
                           f"{mixtures.device}")
    if est.dtype != mixtures.dtype or est.dtype not in _DTYPE_CODES:
        raise TypeError(f'impl="cuda" supports float32, bfloat16 and float16 inputs of one dtype, got {est.dtype} and '
                        f'{mixtures.dtype}; use impl="triton" or impl="reference" for float64')
    return _DTYPE_CODES[est.dtype]


def _on_device(device: torch.device):
    # The launchers use the calling thread's current device: switch only when it differs (the guard
    # costs more than a launch).
    return contextlib.nullcontext() if device.index == torch.cuda.current_device() else torch.cuda.device(device)


_workspace_floats: dict = {}


def _forward_workspace(lib, device, sizes) -> int:
    """Scratch floats of the forward for these sizes on this device (the plan depends on the device only)."""
    key = (device.index, *sizes)
    floats = _workspace_floats.get(key)
    if floats is None:
        out = _i64(0)
        _check(lib, lib.nrt_mixit_l1_forward_workspace(*sizes, ctypes.byref(out)), "forward planning")
        floats = _workspace_floats[key] = out.value
    return floats


def cuda_forward(est: torch.Tensor, mixtures: torch.Tensor, partitions: str):
    from .assignments import candidate_masks, num_candidates

    dtype = _check_inputs(est, mixtures)
    lib = load()
    est, mixtures = est.contiguous(), mixtures.contiguous()
    batch, num_sources, length = est.shape
    num_mixtures = mixtures.shape[1]
    device = est.device
    with _on_device(device):
        workspace_floats = _forward_workspace(lib, device, (batch, num_sources, num_mixtures, length, dtype))
        workspace = torch.empty(workspace_floats, dtype=torch.float32, device=device)
        masks = candidate_masks(num_sources, num_mixtures, partitions, device)
        row_loss = torch.empty(batch, dtype=torch.float32, device=device)
        best = torch.empty(batch, dtype=torch.int64, device=device)
        code = lib.nrt_mixit_l1_forward(
            est.data_ptr(), mixtures.data_ptr(), masks.data_ptr(), workspace.data_ptr(), workspace_floats,
            row_loss.data_ptr(), best.data_ptr(), batch, num_sources, num_mixtures, length,
            num_candidates(num_sources, num_mixtures, partitions), dtype, torch.cuda.current_stream(device).cuda_stream)
        _check(lib, code, "forward")
    return row_loss, best


def cuda_backward(grad_rows, est, mixtures, best, partitions: str, mixtures_grad: bool):
    from .assignments import candidate_masks

    dtype = _check_inputs(est, mixtures)
    lib = load()
    est, mixtures = est.contiguous(), mixtures.contiguous()
    batch, num_sources, length = est.shape
    num_mixtures = mixtures.shape[1]
    device = est.device
    with _on_device(device):
        grad_rows = grad_rows.to(device=device, dtype=torch.float32).contiguous()
        best = best.to(device=device, dtype=torch.int64).contiguous()
        grad_est = torch.empty_like(est)
        grad_mix = torch.empty_like(mixtures) if mixtures_grad else None
        code = lib.nrt_mixit_l1_backward(
            grad_rows.data_ptr(), est.data_ptr(), mixtures.data_ptr(),
            candidate_masks(num_sources, num_mixtures, partitions, device).data_ptr(), best.data_ptr(),
            grad_est.data_ptr(), grad_mix.data_ptr() if grad_mix is not None else None,
            batch, num_sources, num_mixtures, length, dtype, torch.cuda.current_stream(device).cuda_stream)
        _check(lib, code, "backward")
    return grad_est, grad_mix


_registered = False


def ensure_registered() -> None:
    """Load (or build) the library and register the "cuda" backend; CudaLibraryError says how to get it."""
    global _registered
    if _registered:
        return
    load()
    from .ops.mixit_l1 import register_backend

    register_backend("cuda", cuda_forward, cuda_backward)
    _registered = True


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
