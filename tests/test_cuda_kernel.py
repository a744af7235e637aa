"""The hand-written CUDA kernels (impl="cuda", csrc/cuda/mixit_l1_cuda.cu) against nrt_kernels.reference.

Every test but the build check needs a CUDA device and skips without one.  On a GPU machine, build the
library once and point NRT_CUDA_LIB at it, so that no test pays for a just-in-time build:

    python -m nrt_kernels._cuda_lib --build /tmp/nrt_cuda
    NRT_CUDA_LIB=/tmp/nrt_cuda/libnrt_kernels_cuda.so python -m pytest -q tests/test_cuda_kernel.py

The reference runs in float64 on the CPU: every comparison is "CUDA == float64 truth" within the
per-dtype tolerances of tests/tolerances.py.
"""
import os
import subprocess

import pytest
import torch
from tolerances import LOSS_TOLERANCE, assert_close_to_truth

import nrt_kernels
from nrt_kernels import _cuda_lib, assignments, build_config, reference

IMPL = "cuda"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_inputs(batch, sources, mixtures, trailing=(2, 37), dtype=torch.float32, seed=0, integers=False):
    gen = torch.Generator().manual_seed(seed)
    if integers:
        est = torch.randint(-1, 2, (batch, sources, *trailing), generator=gen).double()
        mix = torch.randint(-1, 2, (batch, mixtures, *trailing), generator=gen).double()
    else:
        est = torch.randn(batch, sources, *trailing, generator=gen, dtype=torch.float64)
        mix = torch.randn(batch, mixtures, *trailing, generator=gen, dtype=torch.float64)
    return est.to(dtype), mix.to(dtype)


def loss_and_grads(fn, est, mixtures, mixtures_grad=False, **kwargs):
    """(row losses, assignment, grad_est, grad_mixtures or None) of a weighted sum of the row losses."""
    est = est.detach().clone().requires_grad_(True)
    mixtures = mixtures.detach().clone().requires_grad_(mixtures_grad)
    loss, assignment = fn(est, mixtures, reduction="none", return_assignment=True, **kwargs)
    weights = torch.arange(1, loss.shape[0] + 1, dtype=loss.dtype, device=loss.device)
    inputs = (est, mixtures) if mixtures_grad else (est,)
    grads = torch.autograd.grad((loss * weights).sum(), inputs)
    return loss, assignment, grads[0], grads[1] if mixtures_grad else None


def cuda_run(est, mixtures, **kwargs):
    return loss_and_grads(nrt_kernels.mixit_loss, est.cuda(), mixtures.cuda(), impl=IMPL, **kwargs)


def truth_run(est, mixtures, **kwargs):
    return loss_and_grads(reference.mixit_loss, est.cpu().double(), mixtures.cpu().double(), **kwargs)


def assert_grad_matches(got, want, dtype):
    # Gradients are grad_row / (N * D) * sign(err): the float32 scale is rounded once more to a half type, so
    # allow one rounding of the dtype; a wrong sign is off by 100% or 200%.
    rtol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got.cpu().double(), want.to(dtype).double(), rtol=rtol, atol=0)


def assert_matches_truth(fast, truth, dtype=torch.float32, lowp_loss=None):
    loss, assignment, grad_est, grad_mix = (t.cpu() if t is not None else None for t in fast)
    assert loss.dtype == torch.float32 and grad_est.dtype == dtype
    if dtype == torch.float32:
        rtol, atol = LOSS_TOLERANCE[dtype]
        torch.testing.assert_close(loss.double(), truth[0], rtol=rtol, atol=atol, equal_nan=True)
    else:
        assert_close_to_truth(loss, lowp_loss, truth[0], dtype)
    assert torch.equal(assignment, truth[1])
    assert_grad_matches(grad_est, truth[2], dtype)
    if truth[3] is not None:
        assert_grad_matches(grad_mix, truth[3], dtype)


CASES = [(m, n, p) for n in (2, 3) for m in range(1, 9) for p in ("generalized", "equal")
         if not (p == "equal" and m % n) and assignments.num_candidates(m, n, p) <= assignments.MAX_CANDIDATES]


@needs_cuda
@pytest.mark.parametrize("sources,mixtures,partitions", CASES)
def test_matches_reference_float32(sources, mixtures, partitions):
    est, mix = make_inputs(3, sources, mixtures, trailing=(301,), seed=sources * 7 + mixtures)
    assert_matches_truth(cuda_run(est, mix, partitions=partitions), truth_run(est, mix, partitions=partitions))


# More mixtures than one block holds (groups of 4), more sources than the registers enumerate
# (high/low split), and a single mixture.
@needs_cuda
@pytest.mark.parametrize("sources,mixtures", [(1, 6), (2, 5), (3, 4), (5, 4), (7, 2), (9, 2), (10, 2), (12, 1),
                                              (6, 1), (7, 1), (4, 4)])
def test_wide_and_many_sources(sources, mixtures):
    est, mix = make_inputs(2, sources, mixtures, trailing=(203,), seed=sources * 11 + mixtures)
    assert_matches_truth(cuda_run(est, mix, mixtures_grad=True), truth_run(est, mix, mixtures_grad=True))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sources,mixtures,partitions", [(4, 2, "generalized"), (4, 2, "equal"), (3, 3, "generalized"),
                                                         (8, 2, "generalized"), (6, 3, "equal")])
def test_half_precision_against_float64_truth(dtype, sources, mixtures, partitions):
    est, mix = make_inputs(3, sources, mixtures, trailing=(2, 500), dtype=dtype, seed=4 + sources)
    lowp_loss = reference.mixit_loss(est, mix, partitions=partitions, reduction="none")
    assert_matches_truth(cuda_run(est, mix, partitions=partitions, mixtures_grad=True),
                         truth_run(est, mix, partitions=partitions, mixtures_grad=True), dtype, lowp_loss)


@needs_cuda
@pytest.mark.parametrize("length", [1, 3, 8, 1000, 4096, 65537, 300_000])
def test_lengths_vector_tails_and_chunks(length):
    # Lengths not divisible by the vector width take the scalar path; long rows are split into chunks.
    # Short random rows often tie up to rounding (moving a source between two mixtures whose errors keep
    # their sign does not change the loss), so they use small integers, whose sums are exact.
    est, mix = make_inputs(2, 4, 2, trailing=(length,), seed=length % 1000, integers=length < 100)
    assert_matches_truth(cuda_run(est, mix, mixtures_grad=True), truth_run(est, mix, mixtures_grad=True))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_misaligned_storage_offset(dtype):
    # A contiguous view one element into its storage is not 16-byte aligned: the kernels must notice.
    est, mix = make_inputs(2, 4, 2, trailing=(1024,), dtype=dtype, seed=12)
    est_storage = torch.empty(est.numel() + 1, dtype=dtype, device="cuda")
    est_storage[1:] = est.flatten().cuda()
    est_view = est_storage[1:].view(est.shape).requires_grad_(True)
    assert est_view.is_contiguous() and est_view.data_ptr() % 16 != 0
    loss, assignment = nrt_kernels.mixit_loss(est_view, mix.cuda(), impl=IMPL, reduction="none",
                                              return_assignment=True)
    (grad,) = torch.autograd.grad(loss.sum(), est_view)
    truth = truth_run(est, mix)
    assert torch.equal(assignment.cpu(), truth[1])
    weights = torch.arange(1, 3, dtype=torch.float64).view(2, 1, 1)
    assert_grad_matches(grad.cpu(), truth[2] / weights, dtype)


@needs_cuda
@pytest.mark.parametrize("sources,mixtures,partitions", [(4, 2, "generalized"), (4, 2, "equal"), (3, 3, "generalized"),
                                                         (6, 2, "generalized"), (7, 2, "generalized")])
def test_ties_resolve_like_torch_min(sources, mixtures, partitions):
    # Small integers: every sum is exact in any order, so candidates tie exactly and often.
    est, mix = make_inputs(16, sources, mixtures, trailing=(5,), seed=6, integers=True)
    est[:, 1] = est[:, 0]  # identical sources: swapping them always ties
    candidate = reference.candidate_losses(est, mix, partitions)
    assert (candidate == candidate.min(1, keepdim=True).values).sum(1).gt(1).sum() >= 12, "test data must tie"
    fast = cuda_run(est.float(), mix.float(), partitions=partitions, mixtures_grad=True)
    truth = truth_run(est, mix, partitions=partitions, mixtures_grad=True)
    assert torch.equal(fast[1].cpu(), truth[1])
    torch.testing.assert_close(fast[0].cpu().double(), truth[0], rtol=1e-7, atol=0)
    assert_grad_matches(fast[2].cpu(), truth[2], torch.float32)  # sign(0) = 0 included
    assert_grad_matches(fast[3].cpu(), truth[3], torch.float32)


@needs_cuda
@pytest.mark.parametrize("where", ["est", "mixtures"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_propagates_like_reference(where, value):
    est, mix = make_inputs(3, 4, 2, trailing=(20,), seed=7)
    (est if where == "est" else mix)[1, 1, 5] = value
    fast = cuda_run(est, mix)
    truth = truth_run(est, mix)
    torch.testing.assert_close(fast[0].cpu().double(), truth[0], equal_nan=True)
    assert not torch.isfinite(fast[0][1]) and torch.isfinite(fast[0][[0, 2]]).all()
    assert torch.equal(fast[1].cpu(), truth[1])
    torch.testing.assert_close(fast[2].cpu().double(), truth[2].float().double(), equal_nan=True)


@needs_cuda
def test_opposite_infinities_make_nan_candidates():
    est, mix = make_inputs(2, 4, 2, trailing=(20,), seed=8)
    est[0, 0, 3], est[0, 2, 3] = float("inf"), float("-inf")
    fast = nrt_kernels.mixit_loss(est.cuda(), mix.cuda(), impl=IMPL, reduction="none", return_assignment=True)
    ref = reference.mixit_loss(est.double(), mix.double(), reduction="none", return_assignment=True)
    assert torch.isnan(fast[0][0]) and torch.isnan(ref[0][0])
    assert torch.equal(fast[1].cpu(), ref[1])


@needs_cuda
def test_deterministic():
    est, mix = make_inputs(4, 4, 2, trailing=(2, 150_001), seed=13)
    first = cuda_run(est, mix, mixtures_grad=True)
    for _ in range(3):
        again = cuda_run(est, mix, mixtures_grad=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@needs_cuda
def test_non_contiguous_and_multi_dim_trailing():
    gen = torch.Generator().manual_seed(9)
    est = torch.randn(2, 3, 40, 2, generator=gen).cuda().transpose(2, 3)[:, :, :, ::2]
    mix = torch.randn(4, 2, 20, 2, generator=gen).cuda().permute(0, 1, 3, 2)[::2]
    assert not est.is_contiguous() and not mix.is_contiguous()
    fast = loss_and_grads(nrt_kernels.mixit_loss, est, mix, impl=IMPL, mixtures_grad=True)
    assert_matches_truth(fast, truth_run(est, mix, mixtures_grad=True))


@needs_cuda
def test_op_called_directly_and_on_current_stream():
    # The custom op with impl="cuda" on a side stream: the kernels must run on the caller's stream.
    est, mix = make_inputs(2, 4, 2, trailing=(5000,), seed=14)
    nrt_kernels.mixit_loss(est.cuda(), mix.cuda(), impl=IMPL)  # registers the backend
    from nrt_kernels.ops.mixit_l1 import mixit_l1

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        est_cuda, mix_cuda = est.cuda(non_blocking=True), mix.cuda(non_blocking=True)
        row_loss, best = mixit_l1(est_cuda.flatten(2), mix_cuda.flatten(2), "generalized", IMPL)
    stream.synchronize()
    truth = reference.mixit_loss(est.double(), mix.double(), reduction="none", return_assignment=True)
    torch.testing.assert_close(row_loss.cpu().double(), truth[0], rtol=1e-5, atol=1e-6)
    assignment = assignments.candidate_assignments(4, 2, "generalized")[best.cpu()]
    assert torch.equal(assignment, truth[1])


@needs_cuda
def test_float64_says_what_to_use():
    est, mix = make_inputs(2, 4, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        nrt_kernels.mixit_loss(est.cuda(), mix.cuda(), impl=IMPL)


def test_cpu_tensors_say_what_to_use():
    est, mix = make_inputs(2, 4, 2)
    with pytest.raises(RuntimeError, match='impl="cuda" runs on CUDA tensors'):
        nrt_kernels.mixit_loss(est, mix, impl=IMPL)


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
