"""The Triton kernels (under TRITON_INTERPRET=1 on the CPU) against nrt_kernels.reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import LOSS_TOLERANCE, assert_close_to_truth, rows_choosing_like_reference

import nrt_kernels
from nrt_kernels import assignments, reference

IMPL = "triton"
# On a GPU machine (TRITON_INTERPRET=0) the same tests run the compiled kernels on CUDA.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(batch, sources, mixtures, trailing=(2, 37), dtype=torch.float64, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    est = torch.randn(batch, sources, *trailing, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    mix = torch.randn(batch, mixtures, *trailing, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    return est.requires_grad_(requires_grad), mix


def loss_and_grad(fn, est, mixtures, **kwargs):
    est = est.detach().clone().requires_grad_(True)
    loss, assignment = fn(est, mixtures, reduction="none", return_assignment=True, **kwargs)
    weights = torch.arange(1, loss.shape[0] + 1, dtype=loss.dtype, device=loss.device)
    (grad,) = torch.autograd.grad((loss * weights).sum(), est)
    return loss, assignment, grad


CASES = [(m, n, p) for n in (2, 3) for m in range(1, 9) for p in ("generalized", "equal")
         if not (p == "equal" and m % n) and assignments.num_candidates(m, n, p) <= assignments.MAX_CANDIDATES]


@pytest.mark.parametrize("sources,mixtures,partitions", CASES)
def test_matches_reference_float64(sources, mixtures, partitions):
    est, mix = make_inputs(2, sources, mixtures, trailing=(45,), seed=sources * 7 + mixtures)
    fast = loss_and_grad(nrt_kernels.mixit_loss, est, mix, partitions=partitions, impl=IMPL)
    ref = loss_and_grad(reference.mixit_loss, est, mix, partitions=partitions)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[2], ref[2], rtol=0, atol=0)


def test_matches_reference_float32_sdx_like():
    est, mix = make_inputs(3, 4, 2, trailing=(2, 3000), dtype=torch.float32, seed=3)
    fast = loss_and_grad(nrt_kernels.mixit_loss, est, mix, impl=IMPL)
    ref = loss_and_grad(reference.mixit_loss, est, mix)
    rtol, atol = LOSS_TOLERANCE[torch.float32]
    torch.testing.assert_close(fast[0], ref[0], rtol=rtol, atol=atol)
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[2], ref[2], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_against_float64_truth(dtype):
    est, mix = make_inputs(3, 4, 2, trailing=(2, 500), dtype=dtype, seed=4)
    fast_loss, fast_assignment, fast_grad = loss_and_grad(nrt_kernels.mixit_loss, est, mix, impl=IMPL)
    lowp_loss = reference.mixit_loss(est, mix, reduction="none")
    truth_loss, truth_assignment, truth_grad = loss_and_grad(reference.mixit_loss, est.double(), mix.double())
    assert fast_loss.dtype == torch.float32 and fast_grad.dtype == dtype
    assert_close_to_truth(fast_loss, lowp_loss, truth_loss, dtype)
    assert torch.equal(fast_assignment, truth_assignment)
    torch.testing.assert_close(fast_grad.double(), truth_grad, rtol=1e-2, atol=0)


def test_mixed_dtypes_promote():
    est, mix = make_inputs(2, 4, 2, dtype=torch.bfloat16, seed=5)
    loss = nrt_kernels.mixit_loss(est, mix.float(), impl=IMPL, reduction="none")
    torch.testing.assert_close(loss, reference.mixit_loss(est.float(), mix.float(), reduction="none"))
    (grad,) = torch.autograd.grad(loss.sum(), est)
    assert grad.dtype == torch.bfloat16


def test_ties_resolve_like_torch_min():
    # Small integers: every sum is exact in any order, so candidates tie exactly and often.
    gen = torch.Generator().manual_seed(6)
    est = torch.randint(-1, 2, (16, 4, 5), generator=gen).to(DEVICE, torch.float64)
    mix = torch.randint(-1, 2, (16, 2, 5), generator=gen).to(DEVICE, torch.float64)
    est[:, 1] = est[:, 0]  # identical sources: swapping them always ties
    candidate = reference.candidate_losses(est, mix)
    assert (candidate == candidate.min(1, keepdim=True).values).sum(1).gt(1).all(), "test data must tie"
    fast = loss_and_grad(nrt_kernels.mixit_loss, est, mix, impl=IMPL)
    ref = loss_and_grad(reference.mixit_loss, est, mix)
    # Sums are exact; only the final division by N * D may round differently (CUDA's mean multiplies).
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-15, atol=0)
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[2], ref[2], rtol=0, atol=0)  # sign(0) = 0 included


@pytest.mark.parametrize("where", ["est", "mixtures"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_propagates_like_reference(where, value):
    est, mix = make_inputs(3, 4, 2, trailing=(20,), seed=7)
    est, mix = est.detach().clone(), mix.clone()
    (est if where == "est" else mix)[1, 1, 5] = value
    fast = loss_and_grad(nrt_kernels.mixit_loss, est, mix, impl=IMPL)
    ref = loss_and_grad(reference.mixit_loss, est, mix)
    torch.testing.assert_close(fast[0], ref[0], equal_nan=True)
    assert not torch.isfinite(fast[0][1]) and torch.isfinite(fast[0][[0, 2]]).all()
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[2], ref[2], equal_nan=True)


def test_opposite_infinities_make_nan_candidates():
    est, mix = make_inputs(2, 4, 2, trailing=(20,), seed=8)
    est = est.detach().clone()
    est[0, 0, 3], est[0, 2, 3] = float("inf"), float("-inf")
    fast = nrt_kernels.mixit_loss(est, mix, impl=IMPL, reduction="none", return_assignment=True)
    ref = reference.mixit_loss(est, mix, reduction="none", return_assignment=True)
    assert torch.isnan(fast[0][0]) and torch.isnan(ref[0][0])
    assert torch.equal(fast[1], ref[1])


def test_non_contiguous_and_multi_dim_trailing():
    gen = torch.Generator().manual_seed(9)
    est = torch.randn(2, 3, 40, 2, generator=gen, dtype=torch.float64).to(DEVICE).transpose(2, 3)[:, :, :, ::2]
    mix = torch.randn(4, 2, 20, 2, generator=gen, dtype=torch.float64).to(DEVICE).permute(0, 1, 3, 2)[::2]
    assert not est.is_contiguous() and not mix.is_contiguous()
    fast = loss_and_grad(nrt_kernels.mixit_loss, est, mix, impl=IMPL)
    ref = loss_and_grad(reference.mixit_loss, est, mix)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[2], ref[2], rtol=0, atol=0)


def test_outputs_order_shapes_and_est():
    est, mix = make_inputs(3, 4, 2, trailing=(2, 11), seed=10)
    loss, est_mix, assignment = nrt_kernels.mixit_loss(est, mix, impl=IMPL, return_est=True, return_assignment=True)
    ref = reference.mixit_loss(est, mix, return_est=True, return_assignment=True)
    assert loss.shape == () and est_mix.shape == (3, 2, 2, 11) and assignment.shape == (3, 4)
    assert assignment.dtype == torch.int64
    torch.testing.assert_close(est_mix, ref[1])
    torch.testing.assert_close(loss, ref[0])
    only_est = nrt_kernels.mixit_loss(est, mix, impl=IMPL, return_est=True)
    assert len(only_est) == 2 and only_est[1].shape == est_mix.shape
    # The remixed estimates are differentiable, like asteroid's.
    (grad,) = torch.autograd.grad(est_mix.sum(), est)
    torch.testing.assert_close(grad, torch.ones_like(est))


def test_mixtures_gradient():
    est, mix = make_inputs(2, 3, 2, trailing=(30,), seed=11)
    mix = mix.requires_grad_(True)
    grads = torch.autograd.grad(nrt_kernels.mixit_loss(est, mix, impl=IMPL), (est, mix))
    expected = torch.autograd.grad(reference.mixit_loss(est, mix), (est, mix))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gradcheck_float64():
    est, mix = make_inputs(2, 3, 2, trailing=(6,), seed=12)
    mix = mix.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e, m: nrt_kernels.mixit_loss(e, m, impl=IMPL), (est, mix))


def test_deterministic():
    est, mix = make_inputs(3, 4, 2, trailing=(2, 2000), dtype=torch.float32, seed=13)
    first = loss_and_grad(nrt_kernels.mixit_loss, est, mix, impl=IMPL)
    second = loss_and_grad(nrt_kernels.mixit_loss, est, mix, impl=IMPL)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_module_matches_function():
    est, mix = make_inputs(2, 4, 2, seed=14)
    module = nrt_kernels.MixITLoss(partitions="equal", impl=IMPL)
    assert "equal" in repr(module)
    torch.testing.assert_close(module(est, mix), reference.mixit_loss(est, mix, partitions="equal"))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), sources=st.integers(1, 6), mixtures=st.integers(1, 3), length=st.integers(1, 70),
       equal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fuzz_against_reference(batch, sources, mixtures, length, equal, seed):
    partitions = "equal" if equal and sources % mixtures == 0 else "generalized"
    if assignments.num_candidates(sources, mixtures, partitions) > assignments.MAX_CANDIDATES:
        return
    est, mix = make_inputs(batch, sources, mixtures, trailing=(length,), seed=seed)
    fast = loss_and_grad(nrt_kernels.mixit_loss, est, mix, partitions=partitions, impl=IMPL)
    ref = loss_and_grad(reference.mixit_loss, est, mix, partitions=partitions)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-12, atol=1e-12)
    same = rows_choosing_like_reference(fast[1], ref[0], ref[1], est, mix)
    torch.testing.assert_close(fast[2][same], ref[2][same], rtol=0, atol=0)


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    est, mix = (t.cpu() for t in make_inputs(1, 2, 2, seed=15))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        nrt_kernels.mixit_loss(est, mix, impl="triton")


def test_mixtures_made_under_inference_mode():
    # Targets from a teacher run under torch.inference_mode() must still be usable as mixtures.
    est, mix = make_inputs(2, 4, 2, seed=16)
    with torch.inference_mode():
        mix = mix * 1.0
    loss = nrt_kernels.mixit_loss(est, mix, impl=IMPL)
    (grad,) = torch.autograd.grad(loss, est)
    torch.testing.assert_close(loss, reference.mixit_loss(est, mix.clone()))
    assert torch.isfinite(grad).all()
