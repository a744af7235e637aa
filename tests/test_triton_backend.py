"""The Triton backend's own guards (its numbers are checked by the op suites, e.g. test_mixit_l1.py)."""
import pytest
import torch

import nrt_kernels

pytest.importorskip("triton")


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    est, mix = torch.randn(1, 2, 2, 37, dtype=torch.float64), torch.randn(1, 2, 2, 37, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        nrt_kernels.mixit_loss(est, mix, impl="triton")
