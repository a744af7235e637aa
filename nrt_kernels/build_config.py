"""Constants shared by Python, the C++ extension and the CUDA library: the one place they are written.

Imports nothing but the standard library, so that ``setup.py`` can load it by path before torch or the package
is importable. The compiled code receives these values as ``-D`` macros (:func:`defines`), never as literals.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Bumped whenever a compiled signature changes: a prebuilt module or library from other sources is refused and
# rebuilt instead of crashing.
CPU_ABI_VERSION = 6
CUDA_ABI_VERSION = 2

# The fused L1 kernels score every subset of sources (2**M of them) per mixture.
MAX_SOURCES = 12
# The Gram-metric kernels (SI-SDR, SD-SDR, SNR, MSE, log-MSE) read M + N signals per element and search candidates
# from the Gram matrix: 16 sources (65536 candidates into 2 mixtures).
GRAM_MAX_SOURCES = 16

# The Gram-metric MixIT op's metric argument (nrt_kernels/ops/mixit_gram, csrc/cpu/mixit_gram_cpu.cpp).
GRAM_METRIC_CODES = {"sisdr": 0, "sdsdr": 1, "snr": 2, "mse": 3, "log_mse": 4}

# PIT: the Hungarian kernels keep a row's columns in one warp's lanes (32 sources); the exhaustive solver scores
# M! permutations (40320 at 8). The metric order is the index every PIT kernel reads; the backward reads
# PIT_NUM_COEFFS coefficients per (row, target).
PIT_MAX_SOURCES = 32
PIT_MAX_EXHAUSTIVE_SOURCES = 8
PIT_METRICS = ("sisdr", "sdsdr", "snr", "mse", "l1", "log_mse")
PIT_NUM_COEFFS = 6

# Input dtypes of the CUDA library's C interface.
CUDA_DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}

# The C++ extension nrt_kernels._cpu: sources relative to the repository root.
CPU_SOURCES = ("csrc/mixit_l1.cpp", "csrc/cpu/mixit_l1_cpu.cpp", "csrc/cpu/mixit_gram_cpu.cpp", "csrc/cpu/pit_cpu.cpp",
               "csrc/cpu/noise_robust_l1_cpu.cpp")
CPU_HEADERS = ("csrc/nrt_config.h", "csrc/cpu/isa.h", "csrc/cpu/subset_l1.h", "csrc/cpu/lane_vector.h",
               "csrc/cpu/mixit_l1_cpu.h", "csrc/cpu/mixit_gram_cpu.h", "csrc/cpu/pit_cpu.h",
               "csrc/cpu/noise_robust_l1_cpu.h")
# No -march: the module must run on any x86-64 / aarch64 CPU, not only the build machine's.
# -fopenmp makes at::parallel_for (inlined from ATen headers) use torch's OpenMP thread pool.
# -ffp-contract=off: no multiply-add is fused, so every ISA clone (NRT_ISA_CLONES) rounds alike.
CPU_COMPILE_ARGS = ("-O3", "-fopenmp", "-ffp-contract=off")
CPU_LINK_ARGS = ("-fopenmp",)

# The CUDA library: sm_80 machine code also runs on sm_86/sm_89; sm_90 covers H100/H200; the compute_90 PTX lets
# newer GPUs JIT it. --threads 0 compiles the targets in parallel.
CUDA_SOURCE = "csrc/cuda/mixit_l1_cuda.cu"
CUDA_LIBRARY_NAME = "libnrt_kernels_cuda.so"
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static", "--threads", "0")
GENCODES = ("arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90")


def defines(abi_version: int) -> tuple[str, ...]:
    """The ``-D`` flags every compiled source is built with."""
    codes = tuple(f"-DNRT_DTYPE_{name.upper()}={code}" for name, code in CUDA_DTYPE_CODES.items())
    codes += tuple(f"-DNRT_METRIC_{name.upper()}={code}" for name, code in GRAM_METRIC_CODES.items())
    pit = (f"-DNRT_PIT_MAX_SOURCES={PIT_MAX_SOURCES}", f"-DNRT_PIT_MAX_EXHAUSTIVE_SOURCES={PIT_MAX_EXHAUSTIVE_SOURCES}",
           f"-DNRT_PIT_NUM_COEFFS={PIT_NUM_COEFFS}",
           *(f"-DNRT_PIT_METRIC_{name.upper()}={index}" for index, name in enumerate(PIT_METRICS)))
    return (f"-DNRT_ABI_VERSION={abi_version}", f"-DNRT_MAX_SOURCES={MAX_SOURCES}",
            f"-DNRT_GRAM_MAX_SOURCES={GRAM_MAX_SOURCES}", *codes, *pit)


def cpu_compile_args() -> list[str]:
    return [*CPU_COMPILE_ARGS, *defines(CPU_ABI_VERSION)]


def nvcc_flags() -> list[str]:
    return [*NVCC_FLAGS, *defines(CUDA_ABI_VERSION)]


class BuildError(RuntimeError):
    """nvcc or the CUDA source is missing, or the build failed."""


def cuda_source_path(package_dir) -> Path:
    """The .cu of a source checkout (csrc/ beside the package), or a copy shipped inside the package."""
    package_dir = Path(package_dir)
    candidates = (package_dir.parent / CUDA_SOURCE, package_dir / "csrc" / Path(CUDA_SOURCE).name)
    for path in candidates:
        if path.exists():
            return path
    raise BuildError(f"the CUDA source is not installed (looked for {', '.join(map(str, candidates))})")


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


def nvcc_command(nvcc: str, source, output, gencodes=GENCODES) -> list[str]:
    return [nvcc, *nvcc_flags(), *(f"-gencode={code}" for code in gencodes), str(source), "-o", str(output)]


def build_cuda_library(outdir, *, package_dir, nvcc: str | None = None, output_name: str = CUDA_LIBRARY_NAME,
                       gencodes=GENCODES, verbose: bool = False) -> Path:
    """Compile the CUDA library into ``outdir/output_name`` and return its path (built aside, then renamed)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc was not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin")
    source = cuda_source_path(package_dir)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    target = outdir / output_name
    with tempfile.TemporaryDirectory(dir=outdir, prefix=".build-") as scratch:
        partial = Path(scratch) / output_name
        command = nvcc_command(nvcc, source, partial, gencodes)
        if verbose:
            print(" ".join(command), file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"nvcc failed ({' '.join(command)}):\n{result.stdout}{result.stderr}")
        os.replace(partial, target)
    return target
