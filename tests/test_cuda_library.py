"""The CUDA library itself (nrt_kernels/_cuda_lib.py, csrc/cuda/): building, its exported symbols, loading, and the
errors of impl="cuda".  Its numbers are checked by the op suites (test_mixit_l1.py runs impl="cuda" on a GPU)."""
import os
import subprocess

import pytest
import torch

import nrt_kernels
from nrt_kernels import _cuda_lib, build_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(build_config.find_nvcc() is None, reason="needs nvcc")
@pytest.mark.skipif(bool(os.environ.get(_cuda_lib.ENV_LIBRARY)), reason="NRT_CUDA_LIB names a library built already")
def test_build_exports_the_launchers(tmp_path):
    # One target keeps this to about half a minute on two cores; the CI compile check covers every target.
    path = _cuda_lib.build(tmp_path, gencodes=("arch=compute_90,code=sm_90",))
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True,
                             check=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if line.strip()}
    assert set(_cuda_lib.EXPORTED_SYMBOLS) <= exported
    lib = _cuda_lib._open(path, "the test build")  # loads without a GPU; checks the ABI version
    assert lib.nrt_cuda_error_string(1) == b"invalid argument"


def test_missing_nvcc_says_how(monkeypatch, tmp_path):
    monkeypatch.setattr(build_config, "find_nvcc", lambda: None)
    with pytest.raises(_cuda_lib.CudaLibraryError, match="nvcc was not found.*NRT_CUDA_LIB"):
        _cuda_lib.build(tmp_path)


def test_a_library_that_does_not_load_says_how(monkeypatch, tmp_path):
    # An explicit NRT_CUDA_LIB is the only library tried: a wrong one is an error, never a silent rebuild.
    not_a_library = tmp_path / "libnrt_kernels_cuda.so"
    not_a_library.write_bytes(b"not an ELF file")
    monkeypatch.setenv(_cuda_lib.ENV_LIBRARY, str(not_a_library))
    _cuda_lib._load_cached.cache_clear()
    try:
        with pytest.raises(_cuda_lib.CudaLibraryError, match=r"could not load .*\$NRT_CUDA_LIB.*--build"):
            _cuda_lib.load()
    finally:
        _cuda_lib._load_cached.cache_clear()


def test_cpu_tensors_say_what_to_use():
    est, mix = torch.randn(2, 4, 2, 37), torch.randn(2, 2, 2, 37)
    with pytest.raises(RuntimeError, match='impl="cuda" runs on CUDA tensors'):
        nrt_kernels.mixit_loss(est, mix, impl="cuda")


@needs_cuda
def test_float64_says_what_to_use():
    est, mix = torch.randn(2, 4, 2, 37, dtype=torch.float64), torch.randn(2, 2, 2, 37, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        nrt_kernels.mixit_loss(est.cuda(), mix.cuda(), impl="cuda")
