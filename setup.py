"""Build of nrt_kernels: the Python package plus the compiled CPU extension.

Environment switches (flash-attention style):
    NRT_SKIP_CPU_EXT=1   do not build the C++ CPU extension (csrc/mixit_l1.cpp, csrc/cpu/); impl="cpu" then
                         compiles it just in time on first use (nrt_kernels/_native.py), impl="auto" on CPU
                         falls back to the reference when that is impossible.
    NRT_SKIP_CUDA_LIB=1  do not build the CUDA library (csrc/cuda/) even where nvcc exists;
    NRT_FORCE_CUDA_LIB=1 fail the build when it cannot be built.

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
            sources=["csrc/mixit_l1.cpp", "csrc/cpu/mixit_l1_cpu.cpp", "csrc/cpu/pit_cpu.cpp"],
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
            extra_link_args=["-fopenmp"],
        ))
        cmdclass["build_ext"] = BuildExtension

# --- CUDA library (csrc/cuda/, nvcc-built, loaded through ctypes by nrt_kernels/_cuda_lib.py) -----
# Built with build_ext when nvcc is found. NRT_SKIP_CUDA_LIB=1 skips it; NRT_FORCE_CUDA_LIB=1 makes a
# missing nvcc or a failed build an error. Without it, impl="cuda" compiles the library just in time on
# first use (needs nvcc then).
if os.environ.get("NRT_SKIP_CUDA_LIB") != "1":
    import importlib.util

    from setuptools.command.build_ext import build_ext as _setuptools_build_ext

    def _cuda_lib_module():
        # Loaded by path: importing the nrt_kernels package would import triton and the ops.
        spec = importlib.util.spec_from_file_location(
            "_nrt_cuda_lib_build",
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "nrt_kernels", "_cuda_lib.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    class BuildExtWithCudaLib(cmdclass.get("build_ext", _setuptools_build_ext)):
        def run(self):
            super().run()
            cuda_lib = _cuda_lib_module()
            outdir = "nrt_kernels" if self.inplace else os.path.join(self.build_lib, "nrt_kernels")
            try:
                print("building", cuda_lib.build(outdir))
            except cuda_lib.CudaLibraryError as error:
                if os.environ.get("NRT_FORCE_CUDA_LIB") == "1":
                    raise
                warnings.warn(f"the CUDA library is not built ({error}); impl='cuda' compiles it just in time")

    cmdclass["build_ext"] = BuildExtWithCudaLib

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
    entry_points={"console_scripts": ["nrt-bench = nrt_kernels.bench:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
