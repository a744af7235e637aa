"""Without triton (macOS, Windows, a CPU-only install) the package imports and every CPU path works; impl="triton"
says how to get it.  Run in a subprocess whose import system refuses triton."""
import subprocess
import sys

SCRIPT = r'''
import sys

class RefuseTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (refused by the test)")

sys.meta_path.insert(0, RefuseTriton())
import torch
import nrt_kernels
from nrt_kernels import reference

torch.manual_seed(0)
est = torch.randn(2, 4, 2, 30, dtype=torch.float64, requires_grad=True)
mixtures = torch.randn(2, 2, 2, 30, dtype=torch.float64)
targets, teacher = torch.randn(2, 4, 2, 30, dtype=torch.float64), torch.randn(2, 4, 2, 30, dtype=torch.float64)
for impl in ("auto", "cpu", "reference"):
    got = nrt_kernels.mixit_loss(est, mixtures, impl=impl)
    torch.testing.assert_close(got, reference.mixit_loss(est, mixtures), rtol=1e-12, atol=1e-12)
    kwargs = dict(weights=[1, 2, 1], teacher_targets=teacher, pairing=torch.tensor([2, 0, 3, 1]))
    got = nrt_kernels.noise_robust_loss(est, targets, impl=impl, **kwargs)
    torch.testing.assert_close(got, reference.noise_robust_loss(est, targets, **kwargs), rtol=1e-12, atol=1e-12)
for call in (lambda: nrt_kernels.mixit_loss(est, mixtures, impl="triton"),
             lambda: nrt_kernels.noise_robust_loss(est, targets, weights=[1, 0, 0], impl="triton")):
    try:
        call()
    except RuntimeError as error:
        assert "pip install triton" in str(error), error
    else:
        raise AssertionError('impl="triton" ran without triton')
loaded = sorted(name for name in sys.modules if name.split(".")[0] == "triton"
                or name.startswith("nrt_kernels.") and name.endswith(".triton"))
assert not loaded, loaded
print("ok")
'''


def test_cpu_paths_work_and_triton_says_how_to_get_it():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_import_loads_no_backend():
    code = ("import sys, nrt_kernels; loaded = [m for m in sys.modules if m.startswith('nrt_kernels.ops.') and "
            "m.rsplit('.', 1)[-1] in ('triton', 'cpu', 'cuda', '_triton_launch') or m in ('nrt_kernels._cpu', "
            "'nrt_kernels._native', 'nrt_kernels._cuda_lib')]; assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
