from setuptools import find_packages, setup

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
)
