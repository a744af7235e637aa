"""The C++ CPU extension (impl="cpu", csrc/cpu/) against nrt_kernels.reference."""
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import LOSS_TOLERANCE, assert_close_to_truth, rows_choosing_like_reference

import nrt_kernels
from nrt_kernels import _native, assignments, backends, reference

IMPL = "cpu"
# Longer than one forward tile (4096) and backward tile (8192) of the kernel, and not a multiple of its
# 16-element lane blocks: exercises the fixed-order tile sum and the zero-padded tail.
LONG = 2 * 8192 + 37


@pytest.fixture(scope="module")
def native():
    return _native.load_cpu_extension()


def make_inputs(batch, sources, mixtures, trailing=(2, 37), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    est = torch.randn(batch, sources, *trailing, generator=gen, dtype=torch.float64).to(dtype)
    mix = torch.randn(batch, mixtures, *trailing, generator=gen, dtype=torch.float64).to(dtype)
    return est, mix


def loss_and_grads(fn, est, mixtures, **kwargs):
    """Row losses, assignment and the gradients of a row-weighted sum w.r.t. est and mixtures."""
    est = est.detach().clone().requires_grad_(True)
    mixtures = mixtures.detach().clone().requires_grad_(True)
    loss, assignment = fn(est, mixtures, reduction="none", return_assignment=True, **kwargs)
    weights = torch.arange(1, loss.shape[0] + 1, dtype=loss.dtype)
    grad_est, grad_mix = torch.autograd.grad((loss * weights).sum(), (est, mixtures))
    return loss, assignment, grad_est, grad_mix


def assert_matches_reference(est, mix, rtol=1e-12, atol=1e-12, **kwargs):
    fast = loss_and_grads(nrt_kernels.mixit_loss, est, mix, impl=IMPL, **kwargs)
    ref = loss_and_grads(reference.mixit_loss, est, mix, **kwargs)
    torch.testing.assert_close(fast[0], ref[0], rtol=rtol, atol=atol, equal_nan=True)
    assert torch.equal(fast[1], ref[1]), (fast[1], ref[1])
    torch.testing.assert_close(fast[2], ref[2], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fast[3], ref[3], rtol=0, atol=0, equal_nan=True)
    return fast


CASES = [(m, n, p) for n in (2, 3) for m in range(1, 9) for p in ("generalized", "equal")
         if not (p == "equal" and m % n) and assignments.num_candidates(m, n, p) <= assignments.MAX_CANDIDATES]


@pytest.mark.parametrize("sources,mixtures,partitions", CASES)
def test_matches_reference_float64(sources, mixtures, partitions):
    est, mix = make_inputs(3, sources, mixtures, trailing=(53,), seed=sources * 7 + mixtures)
    assert_matches_reference(est, mix, partitions=partitions)


@pytest.mark.parametrize("sources,mixtures,partitions", [(12, 2, "generalized"), (1, 7, "generalized"),
                                                          (6, 3, "equal")])
def test_extreme_table_sizes(sources, mixtures, partitions):
    # 12 sources: the largest subset table (2**12); 1 source into 7 mixtures: more mixtures than sources.
    est, mix = make_inputs(2, sources, mixtures, trailing=(41,), seed=sources)
    assert_matches_reference(est, mix, partitions=partitions)


@pytest.mark.parametrize("partitions", ["generalized", "equal"])
def test_matches_reference_float64_across_tiles(partitions):
    est, mix = make_inputs(2, 4, 2, trailing=(LONG,), seed=1)
    assert_matches_reference(est, mix, partitions=partitions)


def test_matches_reference_float32():
    est, mix = make_inputs(3, 4, 2, trailing=(2, LONG // 2), dtype=torch.float32, seed=2)
    fast = assert_matches_reference(est, mix, *LOSS_TOLERANCE[torch.float32])
    assert fast[0].dtype == torch.float32 and fast[2].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_against_float64_truth(dtype):
    est, mix = make_inputs(3, 4, 2, trailing=(2, 3000), dtype=dtype, seed=4)
    fast_loss, fast_assignment, fast_grad, fast_grad_mix = loss_and_grads(nrt_kernels.mixit_loss, est, mix, impl=IMPL)
    lowp_loss = reference.mixit_loss(est, mix, reduction="none")
    truth_loss, truth_assignment, truth_grad, truth_grad_mix = loss_and_grads(reference.mixit_loss, est.double(),
                                                                              mix.double())
    assert fast_loss.dtype == torch.float32 and fast_grad.dtype == dtype and fast_grad_mix.dtype == dtype
    assert_close_to_truth(fast_loss, lowp_loss, truth_loss, dtype)
    assert torch.equal(fast_assignment, truth_assignment)
    # Same signs as the truth; the only error is rounding grad / (N * D) to the input dtype.
    torch.testing.assert_close(fast_grad.double(), truth_grad, rtol=1e-2, atol=0)
    torch.testing.assert_close(fast_grad_mix.double(), truth_grad_mix, rtol=1e-2, atol=0)


def test_mixed_dtypes_promote():
    est, mix = make_inputs(2, 4, 2, dtype=torch.bfloat16, seed=5)
    est.requires_grad_(True)
    loss = nrt_kernels.mixit_loss(est, mix.float(), impl=IMPL, reduction="none")
    torch.testing.assert_close(loss, reference.mixit_loss(est.float(), mix.float(), reduction="none"))
    (grad,) = torch.autograd.grad(loss.sum(), est)
    assert grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_resolve_like_torch_min(dtype):
    # Small integers: every sum is exact in any order, so candidates tie exactly and often.
    gen = torch.Generator().manual_seed(6)
    est = torch.randint(-1, 2, (32, 4, 5), generator=gen).to(dtype)
    mix = torch.randint(-1, 2, (32, 2, 5), generator=gen).to(dtype)
    est[:, 1] = est[:, 0]  # identical sources: swapping them always ties
    candidate = reference.candidate_losses(est, mix)
    assert (candidate == candidate.min(1, keepdim=True).values).sum(1).gt(1).all(), "test data must tie"
    fast = assert_matches_reference(est, mix, rtol=0, atol=0)  # gradients include sign(0) = 0
    assert (fast[2] == 0).any(), "test data must hit err == 0"


@pytest.mark.parametrize("where", ["est", "mixtures"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_propagates_like_reference(where, value):
    est, mix = make_inputs(3, 4, 2, trailing=(5000,), seed=7)
    (est if where == "est" else mix)[1, 1, 4100] = value  # in the second tile
    fast = assert_matches_reference(est, mix)
    assert not torch.isfinite(fast[0][1]) and torch.isfinite(fast[0][[0, 2]]).all()
    if value != value:
        assert torch.isnan(fast[0][1])


def test_first_nan_candidate_wins_over_numbers():
    # +inf in source 0 and in mixture 1: candidates that put source 0 into mixture 1 score inf - inf = NaN,
    # the others +inf.  With equal partitions candidate 0 is ({0, 1}, {2, 3}), so the first NaN comes later.
    est, mix = make_inputs(2, 4, 2, trailing=(20,), seed=8)
    est[1, 0, 3] = mix[1, 1, 3] = float("inf")
    candidates = reference.candidate_losses(est, mix, "equal")
    first_nan = int(torch.isnan(candidates[1]).nonzero()[0])
    assert first_nan > 0 and torch.isinf(candidates[1, :first_nan]).all()
    loss, assignment = nrt_kernels.mixit_loss(est, mix, impl=IMPL, partitions="equal", reduction="none",
                                              return_assignment=True)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0])
    assert torch.equal(assignment[1], assignments.candidate_assignments(4, 2, "equal")[first_nan])
    assert_matches_reference(est, mix, partitions="equal")


def test_non_contiguous_and_multi_dim_trailing(native):
    gen = torch.Generator().manual_seed(9)
    est = torch.randn(2, 3, 40, 2, generator=gen, dtype=torch.float64).transpose(2, 3)[:, :, :, ::2]
    mix = torch.randn(4, 2, 20, 2, generator=gen, dtype=torch.float64).permute(0, 1, 3, 2)[::2]
    assert not est.is_contiguous() and not mix.is_contiguous()
    assert_matches_reference(est, mix)
    # The extension itself accepts strided (B, M, D) views too.
    flat_est, flat_mix = est.flatten(2), mix.flatten(2)
    masks = assignments.candidate_masks(3, 2, "generalized")
    strided = native.mixit_l1_forward(flat_est.transpose(1, 2).contiguous().transpose(1, 2), flat_mix, masks)
    dense = native.mixit_l1_forward(flat_est.contiguous(), flat_mix.contiguous(), masks)
    assert all(torch.equal(a, b) for a, b in zip(strided, dense))


def test_outputs_order_shapes_and_est():
    est, mix = make_inputs(3, 4, 2, trailing=(2, 11), seed=10)
    est.requires_grad_(True)
    loss, est_mix, assignment = nrt_kernels.mixit_loss(est, mix, impl=IMPL, return_est=True, return_assignment=True)
    ref = reference.mixit_loss(est, mix, return_est=True, return_assignment=True)
    assert loss.shape == () and est_mix.shape == (3, 2, 2, 11) and assignment.shape == (3, 4)
    torch.testing.assert_close(est_mix, ref[1])
    torch.testing.assert_close(loss, ref[0])
    torch.testing.assert_close(assignment, ref[2])


def test_only_est_gradient_when_mixtures_are_constant():
    est, mix = make_inputs(2, 3, 2, trailing=(30,), seed=11)
    est.requires_grad_(True)
    (grad,) = torch.autograd.grad(nrt_kernels.mixit_loss(est, mix, impl=IMPL), est)
    (expected,) = torch.autograd.grad(reference.mixit_loss(est, mix), est)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_gradcheck_float64():
    # Random values: no error is 0 and no two candidates tie, so the loss is smooth around them.
    est, mix = make_inputs(2, 3, 2, trailing=(7,), seed=12)
    assert torch.autograd.gradcheck(lambda e, m: nrt_kernels.mixit_loss(e, m, impl=IMPL, reduction="none"),
                                    (est.requires_grad_(True), mix.requires_grad_(True)))


def test_deterministic_across_runs_and_thread_counts():
    est, mix = make_inputs(3, 5, 2, trailing=(2, 9000), dtype=torch.float32, seed=13)
    first = loss_and_grads(nrt_kernels.mixit_loss, est, mix, impl=IMPL)
    second = loss_and_grads(nrt_kernels.mixit_loss, est, mix, impl=IMPL)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = loss_and_grads(nrt_kernels.mixit_loss, est, mix, impl=IMPL)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), sources=st.integers(1, 5), mixtures=st.integers(1, 3), length=st.integers(1, 600),
       equal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fuzz_against_reference(batch, sources, mixtures, length, equal, seed):
    # Lengths around the 16-element lane blocks and the 256-element subset-sum chunks of the kernel.
    partitions = "equal" if equal and sources % mixtures == 0 else "generalized"
    if assignments.num_candidates(sources, mixtures, partitions) > assignments.MAX_CANDIDATES:
        return
    est, mix = make_inputs(batch, sources, mixtures, trailing=(length,), seed=seed)
    fast = loss_and_grads(nrt_kernels.mixit_loss, est, mix, impl=IMPL, partitions=partitions)
    ref = loss_and_grads(reference.mixit_loss, est, mix, partitions=partitions)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-12, atol=1e-12)
    same = rows_choosing_like_reference(fast[1], ref[0], ref[1], est, mix)
    for got, want in zip(fast[2:], ref[2:]):
        torch.testing.assert_close(got[same], want[same], rtol=0, atol=0)


BAD_INPUTS = [
    ("not a tensor", lambda e, m: (e.tolist(), m), {}),
    ("integer dtype", lambda e, m: (e.long(), m), {}),
    ("too few dims", lambda e, m: (e[:, :, 0], m), {}),
    ("batch mismatch", lambda e, m: (e[:1], m), {}),
    ("trailing mismatch", lambda e, m: (e[..., :5], m), {}),
    ("empty", lambda e, m: (e[:, :, :0], m[:, :, :0]), {}),
    ("too many sources", lambda e, m: (e.repeat(1, 5, 1), m), {}),
    ("equal needs divisible", lambda e, m: (e[:, :3], m), {"partitions": "equal"}),
    ("unknown partitions", lambda e, m: (e, m), {"partitions": "all"}),
    ("unknown metric", lambda e, m: (e, m), {"metric": "l2"}),
    ("unknown reduction", lambda e, m: (e, m), {"reduction": "sum"}),
]


@pytest.mark.parametrize("name,make,kwargs", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_like_reference(name, make, kwargs):
    est, mix = make_inputs(2, 4, 2, trailing=(10,), seed=14)
    est, mix = make(est, mix)
    with pytest.raises((TypeError, ValueError)) as expected:
        reference.mixit_loss(est, mix, **kwargs)
    with pytest.raises(expected.type, match="^" + re.escape(str(expected.value)) + "$"):
        nrt_kernels.mixit_loss(est, mix, impl=IMPL, **kwargs)


def test_extension_checks_its_own_arguments(native):
    est, mix = make_inputs(2, 3, 2, trailing=(10,), seed=15)
    masks = assignments.candidate_masks(3, 2, "generalized")
    with pytest.raises(RuntimeError, match="one dtype"):
        native.mixit_l1_forward(est, mix.float(), masks)
    with pytest.raises(RuntimeError, match="masks"):
        native.mixit_l1_forward(est, mix, masks.long())
    _, best = native.mixit_l1_forward(est, mix, masks)
    with pytest.raises(RuntimeError, match="candidate index"):
        native.mixit_l1_backward(torch.ones(2, dtype=torch.float64), est, mix, best + len(masks), masks, False)


def _forget_cpu_backends(monkeypatch):
    # A fresh process as far as the CPU backends go: nothing loaded or registered.
    for op in ("mixit_l1", "noise_robust_l1"):
        monkeypatch.delitem(backends._registry, (op, "cpu"), raising=False)
        monkeypatch.delitem(sys.modules, backends.BACKEND_MODULES[(op, "cpu")], raising=False)
    monkeypatch.setattr(_native, "load_cpu_extension", _native.load_cpu_extension.__wrapped__)
    monkeypatch.setattr(backends, "_fallbacks_said", set())


def test_auto_prefers_the_extension_on_cpu(monkeypatch):
    assert backends.resolve("mixit_l1", "auto", "cpu") == "cpu"
    _forget_cpu_backends(monkeypatch)
    monkeypatch.setattr(_native, "_import_prebuilt", lambda: None)
    monkeypatch.setattr(_native, "_compile_just_in_time", lambda: (_ for _ in ()).throw(OSError("no compiler")))
    with pytest.warns(RuntimeWarning, match='impl="auto" runs mixit_l1 on the reference loop'):
        assert backends.resolve("mixit_l1", "auto", "cpu") == "reference"


def test_missing_extension_says_how_to_get_it(monkeypatch):
    def no_compiler():
        raise OSError("no C++ compiler found")

    _forget_cpu_backends(monkeypatch)
    monkeypatch.setattr(_native, "_import_prebuilt", lambda: None)
    monkeypatch.setattr(_native, "_compile_just_in_time", no_compiler)
    for op in ("mixit_l1", "noise_robust_l1"):
        with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e .") as error:
            backends.resolve(op, "cpu", "cpu")
        assert "no C++ compiler found" in str(error.value)
        # "auto" falls back to the reference, and says so once.
        with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler found"):
            assert backends.resolve(op, "auto", "cpu") == "reference"


def test_cpu_impl_rejects_other_devices():
    with pytest.raises(RuntimeError, match='impl="cpu" runs on CPU tensors'):
        backends.resolve("mixit_l1", "cpu", "cuda")


def test_import_compiles_nothing():
    code = "import sys, nrt_kernels; assert 'nrt_kernels._native' not in sys.modules, 'import loaded the extension'"
    subprocess.run([sys.executable, "-c", code], check=True)
