"""Shared test setup: the Triton interpreter switch and the ``impl`` fixture every op's suite is parametrised over.

A suite declares the op it tests (``OP = "mixit_l1"``) and takes the ``impl`` fixture: one run per backend,
each skipped with the reason when it cannot run on this machine, so the same file checks the reference, the C++
extension and Triton under the interpreter on a CPU machine, and also the CUDA library and compiled Triton
(``TRITON_INTERPRET=0``) on a GPU machine.  ``NRT_TEST_IMPLS=triton,cuda`` (a comma list) runs only those.
"""
import dataclasses
import os

# The Triton kernels run on the CPU under the interpreter; it must be set before triton is imported.
# On a GPU machine, TRITON_INTERPRET=0 tests the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Impl:
    """One backend as the tests drive it: the ``impl=`` string and where its inputs live."""

    name: str
    device: str
    # Triton under TRITON_INTERPRET=1: numpy runs every program, about 1000x slower than the C++ kernels.
    interpreted: bool = False

    # The interpreter's time grows with the work it simulates, rows x mixtures x subsets x length, with short rows
    # costing what 512 elements do (per-program overhead): 1e6 of it is about 5 s on a busy 2-core machine.
    INTERPRETER_MAX_WORK = 1_000_000

    @property
    def fused(self) -> bool:
        """A fused kernel: half inputs accumulate in float32, the loss is float32, mixed dtypes promote first."""
        return self.name != "reference"

    @property
    def exact_dtype(self) -> torch.dtype:
        """The most precise input dtype this backend takes (the CUDA library has no float64 kernels)."""
        return torch.float32 if self.name == "cuda" else torch.float64

    def require(self, dtype: torch.dtype) -> None:
        """Skip unless this backend's contract covers inputs of ``dtype``."""
        if dtype == torch.float64 and self.name == "cuda":
            pytest.skip('impl="cuda" has no float64 kernels (it raises a TypeError, tests/test_cuda_library.py)')
        if dtype in HALF_DTYPES and not self.fused:
            pytest.skip("the reference computes in the input dtype: the float32-accumulation contract for half "
                        "inputs is the fused backends'")

    def require_fused(self, why: str) -> None:
        if not self.fused:
            pytest.skip(f"the reference is plain PyTorch: {why}")

    def skip_if_slow(self, batch: int, sources: int, mixtures: int, length: int) -> None:
        """Skip under the Triton interpreter when the case would take more than a few seconds."""
        work = batch * mixtures * (1 << sources) * max(length, 512)
        if self.interpreted and work > self.INTERPRETER_MAX_WORK:
            pytest.skip(f"too slow under the Triton interpreter ({batch} rows of {sources} sources into {mixtures} "
                        f"mixtures, {length} elements each); the compiled kernels run it on a GPU machine")


def _triton_impl() -> Impl:
    # Inputs live on the GPU when there is one: TRITON_INTERPRET=0 then runs the compiled kernels on CUDA.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return Impl("triton", "cuda" if torch.cuda.is_available() else "cpu", interpreted=interpreted)


IMPL_FACTORIES = {
    "reference": lambda: Impl("reference", "cpu"),
    "cpu": lambda: Impl("cpu", "cpu"),
    "triton": _triton_impl,
    "cuda": lambda: Impl("cuda", "cuda"),
}


def _selected_impls() -> list:
    names = [name.strip() for name in os.environ.get("NRT_TEST_IMPLS", ",".join(IMPL_FACTORIES)).split(",")]
    unknown = [name for name in names if name not in IMPL_FACTORIES]
    if unknown:
        raise pytest.UsageError(f"NRT_TEST_IMPLS names unknown impls {unknown}; choose from {list(IMPL_FACTORIES)}")
    return names


@pytest.fixture(scope="module", params=_selected_impls())
def impl(request) -> Impl:
    """Every backend that runs here, for the op named by the test module's ``OP``; the others skip, saying why."""
    from nrt_kernels import backends

    chosen = IMPL_FACTORIES[request.param]()
    if chosen.device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f'impl="{chosen.name}" needs a CUDA device')
    op = getattr(request.module, "OP", None)
    if op is None:
        raise RuntimeError(f"{request.module.__name__} uses the impl fixture without naming its OP")
    try:
        backends.resolve(op, chosen.name, chosen.device)
    except backends.BackendUnavailable as error:
        pytest.skip(str(error))
    return chosen
