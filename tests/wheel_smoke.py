"""CI's check of a built wheel, run from outside the source tree in a venv that has torch but no triton:
the package imports, carries its compiled CPU extension and sources, and the CPU paths match the reference."""
import importlib.util
import pathlib
import sys
import warnings

import torch

import nrt_kernels
from nrt_kernels import backends, reference

package = pathlib.Path(nrt_kernels.__file__).parent
assert "site-packages" in str(package), f"imported from {package}, not from the installed wheel"
assert importlib.util.find_spec("triton") is None, "this venv must not have triton"
for name in ("nrt_kernels.ops.mixit_l1", "nrt_kernels.ops.noise_robust_l1", "nrt_kernels.ops.pit", "nrt_kernels.bench"):
    assert importlib.util.find_spec(name) is not None, f"the wheel lacks {name}"
assert any(package.glob("_cpu.*")), "the wheel lacks the compiled CPU extension"
assert (package / "csrc" / "mixit_l1.cpp").exists(), "the wheel lacks the C++ sources (for just-in-time builds)"

with warnings.catch_warnings():
    warnings.simplefilter("error")  # no just-in-time build, no fallback to the reference
    assert backends.resolve("mixit_l1", "auto", "cpu") == "cpu"
    assert backends.resolve("noise_robust_l1", "auto", "cpu") == "cpu"
    assert backends.resolve("pit", "auto", "cpu") == "cpu"

torch.manual_seed(0)
est = torch.randn(3, 4, 2, 100, requires_grad=True)
mixtures, targets, teacher = torch.randn(3, 2, 2, 100), torch.randn(3, 4, 2, 100), torch.randn(3, 4, 2, 100)
for fast, slow in (
    (lambda: nrt_kernels.mixit_loss(est, mixtures), lambda: reference.mixit_loss(est, mixtures)),
    (lambda: nrt_kernels.noise_robust_loss(est, targets, weights=[1, 2, 1], teacher_targets=teacher,
                                           pairing=torch.tensor([3, 1, 0, 2])),
     lambda: reference.noise_robust_loss(est, targets, weights=[1, 2, 1], teacher_targets=teacher,
                                         pairing=torch.tensor([3, 1, 0, 2]))),
    (lambda: nrt_kernels.pit_loss(est, targets, solver="hungarian"),
     lambda: reference.pit_loss(est, targets, solver="hungarian")),
):
    loss, expected = fast(), slow()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, est)[0], torch.autograd.grad(expected, est)[0],
                               rtol=1e-5, atol=1e-7)
try:
    nrt_kernels.mixit_loss(est, mixtures, impl="triton")
except RuntimeError as error:
    assert "pip install triton" in str(error), error
else:
    raise AssertionError('impl="triton" ran without triton')
print(f"wheel smoke ok: {package}, torch {torch.__version__}, python {sys.version.split()[0]}")
