"""Build of nrt_kernels: the Python package plus the compiled CPU extension.

Environment switches (flash-attention style):
    NRT_SKIP_CPU_EXT=1   do not build the C++ CPU extension (csrc/mixit_l1.cpp, csrc/cpu/); impl="cpu" then
                         compiles it just in time on first use (nrt_kernels/_native.py), impl="auto" on CPU
                         falls back to the reference when that is impossible.
    NRT_SKIP_CUDA_LIB=1  do not build the CUDA library (csrc/cuda/) even where nvcc exists;
    NRT_FORCE_CUDA_LIB=1 fail the build when it cannot be built.

Install from a checkout with ``pip install --no-build-isolation -e .`` so that the build sees the installed torch.
"""
import importlib.util
import os
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_config():
    # Loaded by path: importing the nrt_kernels package needs torch, which a build-isolated install lacks.
    spec = importlib.util.spec_from_file_location("_nrt_build_config", os.path.join(ROOT, "nrt_kernels",
                                                                                      "build_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_config = _build_config()
ext_modules = []
cmdclass = {}
skipped = []  # what this build leaves out, said at the end where pip shows it

# --- C++ CPU extension: nrt_kernels._cpu ---------------------------------------------------------
if os.environ.get("NRT_SKIP_CPU_EXT") == "1":
    skipped.append("NRT_SKIP_CPU_EXT=1: the C++ CPU extension is not built (it is compiled just in time when needed)")
else:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        skipped.append("torch is not importable at build time, so the C++ CPU extension is not built; impl='cpu' "
                       "compiles it just in time on first use (needs a C++ compiler and ninja). To build it now, "
                       "install torch first and run: pip install --no-build-isolation .")
    else:
        ext_modules.append(CppExtension(
            name="nrt_kernels._cpu",
            sources=list(build_config.CPU_SOURCES),
            extra_compile_args=build_config.cpu_compile_args(),
            extra_link_args=list(build_config.CPU_LINK_ARGS),
        ))
        cmdclass["build_ext"] = BuildExtension

# --- CUDA library (csrc/cuda/, nvcc-built, loaded through ctypes by nrt_kernels/_cuda_lib.py) -----
# Built with build_ext when nvcc is found. NRT_SKIP_CUDA_LIB=1 skips it; NRT_FORCE_CUDA_LIB=1 makes a
# missing nvcc or a failed build an error. Without it, impl="cuda" compiles the library just in time on
# first use (needs nvcc then).
if os.environ.get("NRT_SKIP_CUDA_LIB") != "1":
    from setuptools.command.build_ext import build_ext as _setuptools_build_ext

    class BuildExtWithCudaLib(cmdclass.get("build_ext", _setuptools_build_ext)):
        def run(self):
            super().run()
            outdir = "nrt_kernels" if self.inplace else os.path.join(self.build_lib, "nrt_kernels")
            try:
                print("building", build_config.build_cuda_library(outdir, package_dir=os.path.join(ROOT,
                                                                                                   "nrt_kernels")))
            except build_config.BuildError as error:
                if os.environ.get("NRT_FORCE_CUDA_LIB") == "1":
                    raise
                warnings.warn(f"the CUDA library is not built ({str(error).splitlines()[0]}); impl='cuda' compiles "
                              "it just in time")

    cmdclass["build_ext"] = BuildExtWithCudaLib

# --- The C++/CUDA sources travel inside the package (nrt_kernels/csrc/), so an install that could not compile them
# can still build them just in time on first use.
from setuptools.command.build_py import build_py as _build_py


class BuildPyWithSources(_build_py):
    def run(self):
        super().run()
        for folder, _, files in os.walk(os.path.join(ROOT, "csrc")):
            relative = os.path.relpath(folder, ROOT)
            target = os.path.join(self.build_lib, "nrt_kernels", relative)
            self.mkpath(target)
            for name in files:
                self.copy_file(os.path.join(folder, name), os.path.join(target, name))


cmdclass["build_py"] = BuildPyWithSources

setup(
    name="nrt_kernels",
    version="0.1.0",
    description="Fused MixIT / PIT / mean-teacher losses for noise-robust training of source separators",
    packages=find_packages(include=["nrt_kernels", "nrt_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0; sys_platform == 'linux'"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "scipy"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["nrt-bench = nrt_kernels.bench:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

for message in skipped:
    # setuptools' warnings reach the user only with pip -v; a build that leaves a backend out must say so.
    warnings.warn(message)
