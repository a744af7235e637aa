"""Build of nrt_kernels: the Python package plus the compiled CPU extension.

Environment switches (flash-attention style):
    NRT_SKIP_CPU_EXT=1   do not build the C++ CPU extension (csrc/mixit_l1.cpp, csrc/cpu/); impl="cpu" then
                         compiles it just in time on first use (nrt_kernels/_native.py), impl="auto" on CPU
                         falls back to the reference when that is impossible.

Install from a checkout with ``pip install --no-build-isolation -e .`` so that the build sees the installed torch.
"""
import os
import warnings

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}

# --- C++ CPU extension: nrt_kernels._cpu ---------------------------------------------------------
if os.environ.get("NRT_SKIP_CPU_EXT") == "1":
    warnings.warn("NRT_SKIP_CPU_EXT=1: not building the CPU extension (it is compiled just in time when needed)")
else:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        warnings.warn("torch is not importable at build time (use pip install --no-build-isolation), so the CPU "
                      "extension is not built; it is compiled just in time when needed")
    else:
        # No -march: the wheel must run on any CPU of the architecture, not only the build machine's.
        # Keep these flags equal to COMPILE_ARGS / LINK_ARGS in nrt_kernels/_native.py (the JIT build).
        ext_modules.append(CppExtension(
            name="nrt_kernels._cpu",
            sources=["csrc/mixit_l1.cpp", "csrc/cpu/mixit_l1_cpu.cpp"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        ))
        cmdclass["build_ext"] = BuildExtension

# --- CUDA library (csrc/cuda/, nvcc-built, loaded through ctypes by nrt_kernels/_cuda_lib.py) -----
# Hook for its build step: append to ext_modules / cmdclass here, leaving the CPU part above as is.

setup(
    name="nrt_kernels",
    version="0.1.0",
    description="Fused MixIT / mean-teacher L1 losses for noise-robust training of source separators",
    packages=find_packages(include=["nrt_kernels", "nrt_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0; sys_platform == 'linux'", "numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
