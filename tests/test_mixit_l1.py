"""The MixIT L1 loss on every backend that runs here (the ``impl`` fixture, tests/conftest.py) against the truth.

The truth is ``nrt_kernels.reference`` on the inputs in float64 on the CPU; every comparison uses the per-dtype
table of tests/tolerances.py.  Backends take float64 inputs where they can (the CUDA library: float32), so most
checks are exact up to the order of additions.  On a CPU machine this runs the reference, the C++ extension and
the Triton kernels under the interpreter; on a GPU machine (``TRITON_INTERPRET=0``) also the CUDA library and the
compiled Triton kernels.  For the CUDA library, build it once and point NRT_CUDA_LIB at it, so that no test pays
for a just-in-time build::

    python -m nrt_kernels._cuda_lib --build /tmp/nrt_cuda
    NRT_CUDA_LIB=/tmp/nrt_cuda/libnrt_kernels_cuda.so TRITON_INTERPRET=0 python -m pytest -q tests/test_mixit_l1.py

For impl="reference" the same tests check the front-end's routing and, in float32, the loop's own rounding.
Backend-only checks live in test_cpu_extension.py, test_cuda_library.py and test_triton_backend.py.
"""
import contextlib
import re
from functools import partial
from typing import NamedTuple, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close_to_truth, baseline_dtype, rows_choosing_like_reference

import nrt_kernels
from nrt_kernels import assignments, reference
from nrt_kernels.ops._operands import common_dtype, row_loss_dtype

OP = "mixit_l1"


# ----------------------------------------------------------------------------------------------
# The case setup: inputs, one run of a loss, and the comparison with the truth
# ----------------------------------------------------------------------------------------------


def make_inputs(batch, sources, mixtures, trailing=(2, 37), dtype=torch.float64, seed=0, integers=False):
    """CPU est (B, M, *trailing) and mixtures (B, N, *trailing) of ``dtype``: standard normals drawn in float64,
    or with ``integers`` values in {-1, 0, 1}, whose sums are exact in any order (candidates then tie exactly)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(rows):
        if integers:
            return torch.randint(-1, 2, (batch, rows, *trailing), generator=gen).to(dtype)
        return torch.randn(batch, rows, *trailing, generator=gen, dtype=torch.float64).to(dtype)

    return draw(sources), draw(mixtures)


class Run(NamedTuple):
    loss: torch.Tensor  # (B,) row losses
    assignment: torch.Tensor  # (B, M) int64
    grad_est: torch.Tensor
    grad_mixtures: Optional[torch.Tensor]  # None unless the mixtures required grad


def run(loss_fn, est, mixtures, *, mixtures_grad=True, **kwargs) -> Run:
    """Row losses, assignment and gradients of their weighted sum (weights 1..B: a row mix-up shows)."""
    est = est.detach().clone().requires_grad_(True)
    mixtures = mixtures.detach().clone().requires_grad_(mixtures_grad)
    loss, assignment = loss_fn(est, mixtures, reduction="none", return_assignment=True, **kwargs)
    weights = torch.arange(1, loss.shape[0] + 1, dtype=loss.dtype, device=loss.device)
    grads = torch.autograd.grad((loss * weights).sum(), (est, mixtures) if mixtures_grad else (est,))
    return Run(loss, assignment, grads[0], grads[1] if mixtures_grad else None)


def run_impl(impl, est, mixtures, **kwargs) -> Run:
    """``run`` of nrt_kernels.mixit_loss on this backend, the inputs moved to its device."""
    return run(partial(nrt_kernels.mixit_loss, impl=impl.name), est.to(impl.device), mixtures.to(impl.device),
               **kwargs)


def truth_and_baseline(est, mixtures, **kwargs) -> tuple[Run, Run]:
    """The reference in float64 (the truth) and in the baseline dtype of tests/tolerances.py, on the CPU."""
    est, mixtures = est.detach().cpu(), mixtures.detach().cpu()
    truth = run(reference.mixit_loss, est.double(), mixtures.double(), **kwargs)
    dtype = baseline_dtype(common_dtype(est, mixtures))
    baseline = truth if dtype == torch.float64 else run(reference.mixit_loss, est.to(dtype), mixtures.to(dtype),
                                                        **kwargs)
    return truth, baseline


def assert_matches_truth(impl, fast: Run, est, mixtures, *, rows=slice(None), **kwargs) -> Run:
    """Dtypes, the assignment, the losses and both gradients of ``fast`` against the truth (rows ``rows``)."""
    dtype = common_dtype(est, mixtures)
    assert fast.loss.dtype == (row_loss_dtype(dtype) if impl.fused else dtype)
    assert fast.grad_est.dtype == est.dtype
    truth, baseline = truth_and_baseline(est, mixtures, mixtures_grad=fast.grad_mixtures is not None, **kwargs)
    assert torch.equal(fast.assignment.cpu()[rows], truth.assignment[rows]), (fast.assignment, truth.assignment)
    assert_close_to_truth(fast.loss, baseline.loss, truth.loss, dtype)
    for got, loop, want in zip(fast[2:], baseline[2:], truth[2:]):
        if want is not None:
            assert_close_to_truth(got[rows], loop[rows], want[rows], dtype, "grad")
    return truth


def check(impl, est, mixtures, **kwargs) -> Run:
    """Run this backend on (est, mixtures) and compare everything with the truth; returns the backend's run."""
    fast = run_impl(impl, est, mixtures, **kwargs)
    kwargs.pop("mixtures_grad", None)
    assert_matches_truth(impl, fast, est, mixtures, **kwargs)
    return fast


CASES = [(m, n, p) for n in (2, 3) for m in range(1, 9) for p in ("generalized", "equal")
         if not (p == "equal" and m % n) and assignments.num_candidates(m, n, p) <= assignments.MAX_CANDIDATES]


# ----------------------------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sources,mixtures,partitions", CASES)
def test_matches_truth(impl, sources, mixtures, partitions):
    est, mix = make_inputs(3, sources, mixtures, trailing=(53,), dtype=impl.exact_dtype, seed=sources * 7 + mixtures)
    check(impl, est, mix, partitions=partitions)


# 12 sources: the largest subset table (2**12); more mixtures than sources; more mixtures than one CUDA block
# holds (groups of 4); more sources than the CUDA registers enumerate (its high/low split); a single mixture.
TABLE_SHAPES = [(12, 2, "generalized"), (1, 7, "generalized"), (6, 3, "equal"), (1, 6, "generalized"),
                (2, 5, "generalized"), (3, 4, "generalized"), (5, 4, "generalized"), (7, 2, "generalized"),
                (9, 2, "generalized"), (10, 2, "generalized"), (12, 1, "generalized"), (6, 1, "generalized"),
                (7, 1, "generalized"), (4, 4, "generalized")]


@pytest.mark.parametrize("sources,mixtures,partitions", TABLE_SHAPES)
def test_subset_table_shapes(impl, sources, mixtures, partitions):
    impl.skip_if_slow(2, sources, mixtures, 67)
    # 67: not a multiple of any vector width or lane block.
    est, mix = make_inputs(2, sources, mixtures, trailing=(67,), dtype=impl.exact_dtype, seed=sources * 11 + mixtures)
    check(impl, est, mix, partitions=partitions)


# Longer than one forward tile (4096) and backward tile (8192) of the C++ kernel, and not a multiple of its
# 16-element lane blocks: the fixed-order tile sum and the zero-padded tail.
LONG = 2 * 8192 + 37
# Lengths not divisible by the CUDA vector width take its scalar path; long rows are split into chunks.
LENGTHS = [(1, "generalized"), (3, "generalized"), (8, "generalized"), (1000, "generalized"), (4096, "generalized"),
           (LONG, "generalized"), (LONG, "equal"), (65537, "generalized"), (300_000, "generalized")]


@pytest.mark.parametrize("length,partitions", LENGTHS)
def test_row_lengths(impl, length, partitions):
    impl.skip_if_slow(2, 4, 2, length)
    # Short random rows often tie up to rounding (moving a source between two mixtures whose errors keep their
    # sign does not change the loss), so they use small integers, whose sums are exact.
    est, mix = make_inputs(2, 4, 2, trailing=(length,), dtype=impl.exact_dtype, seed=length % 1000,
                           integers=length < 100)
    check(impl, est, mix, partitions=partitions)


def test_float32_across_tiles(impl):
    # 2 x 4100 elements: two C++ forward tiles and a tail, more than one backward tile.
    est, mix = make_inputs(2, 4, 2, trailing=(2, 4100), dtype=torch.float32, seed=2)
    fast = check(impl, est, mix)
    assert fast.loss.dtype == torch.float32 and fast.grad_est.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sources,mixtures,partitions,trailing", [
    (4, 2, "generalized", (2, 3000)), (4, 2, "equal", (2, 500)), (3, 3, "generalized", (2, 500)),
    (8, 2, "generalized", (2, 500)), (6, 3, "equal", (2, 500))])
def test_half_precision_against_float64_truth(impl, dtype, sources, mixtures, partitions, trailing):
    # Loss and gradients within the float32 loop's error of the float64 truth plus the table's tolerance.
    impl.require(dtype)
    impl.skip_if_slow(3, sources, mixtures, trailing[0] * trailing[1])
    est, mix = make_inputs(3, sources, mixtures, trailing=trailing, dtype=dtype, seed=4 + sources)
    fast = check(impl, est, mix, partitions=partitions)
    assert fast.loss.dtype == torch.float32 and fast.grad_est.dtype == dtype and fast.grad_mixtures.dtype == dtype


def test_mixed_dtypes_promote(impl):
    impl.require_fused("it sums the sources in est's dtype before the mixtures promote it")
    est, mix = make_inputs(2, 4, 2, dtype=torch.bfloat16, seed=5)
    est, mix = est.to(impl.device).requires_grad_(True), mix.to(impl.device, torch.float32)
    loss = nrt_kernels.mixit_loss(est, mix, impl=impl.name, reduction="none")
    torch.testing.assert_close(loss.cpu(), reference.mixit_loss(est.cpu().float(), mix.cpu(), reduction="none"))
    (grad,) = torch.autograd.grad(loss.sum(), est)
    assert grad.dtype == torch.bfloat16


# dtype None: the backend's exact_dtype.
@pytest.mark.parametrize("sources,mixtures,partitions,dtype", [
    (4, 2, "generalized", torch.float64), (4, 2, "generalized", torch.float32), (4, 2, "equal", None),
    (3, 3, "generalized", None), (6, 2, "generalized", None), (7, 2, "generalized", None)])
def test_ties_resolve_like_torch_min(impl, sources, mixtures, partitions, dtype):
    dtype = dtype or impl.exact_dtype
    impl.require(dtype)
    est, mix = make_inputs(16, sources, mixtures, trailing=(5,), dtype=dtype, seed=6, integers=True)
    est[:, 1] = est[:, 0]  # identical sources: swapping them often ties
    candidate = reference.candidate_losses(est, mix, partitions)
    assert (candidate == candidate.min(1, keepdim=True).values).sum(1).gt(1).sum() >= 12, "test data must tie"
    truth = assert_matches_truth(impl, run_impl(impl, est, mix, partitions=partitions), est, mix,
                                 partitions=partitions)
    assert (truth.grad_est == 0).any(), "test data must hit err == 0, where the gradient is sign(0) = 0"


@pytest.mark.parametrize("where", ["est", "mixtures"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_propagates_like_reference(impl, where, value):
    est, mix = make_inputs(3, 4, 2, trailing=(4200,), dtype=impl.exact_dtype, seed=7)
    (est if where == "est" else mix)[1, 1, 4100] = value  # in the C++ kernel's second tile
    fast = check(impl, est, mix)
    assert not torch.isfinite(fast.loss[1]) and torch.isfinite(fast.loss[[0, 2]]).all()
    if value != value:
        assert torch.isnan(fast.loss[1])


def test_opposite_infinities_make_nan_candidates(impl):
    est, mix = make_inputs(2, 4, 2, trailing=(20,), dtype=impl.exact_dtype, seed=8)
    est[0, 0, 3], est[0, 2, 3] = float("inf"), float("-inf")
    loss, assignment = nrt_kernels.mixit_loss(est.to(impl.device), mix.to(impl.device), impl=impl.name,
                                              reduction="none", return_assignment=True)
    ref = reference.mixit_loss(est.double(), mix.double(), reduction="none", return_assignment=True)
    assert torch.isnan(loss[0]) and torch.isnan(ref[0][0])
    assert torch.equal(assignment.cpu(), ref[1])


def test_first_nan_candidate_wins_over_numbers(impl):
    # +inf in source 0 and in mixture 1: candidates that put source 0 into mixture 1 score inf - inf = NaN,
    # the others +inf.  With equal partitions candidate 0 is ({0, 1}, {2, 3}), so the first NaN comes later.
    est, mix = make_inputs(2, 4, 2, trailing=(20,), dtype=impl.exact_dtype, seed=8)
    est[1, 0, 3] = mix[1, 1, 3] = float("inf")
    candidates = reference.candidate_losses(est, mix, "equal")
    first_nan = int(torch.isnan(candidates[1]).nonzero()[0])
    assert first_nan > 0 and torch.isinf(candidates[1, :first_nan]).all()
    fast = check(impl, est, mix, partitions="equal")
    assert torch.isnan(fast.loss[1]) and torch.isfinite(fast.loss[0])
    assert torch.equal(fast.assignment[1].cpu(), assignments.candidate_assignments(4, 2, "equal")[first_nan])


def test_non_contiguous_and_multi_dim_trailing(impl):
    gen = torch.Generator().manual_seed(9)
    dtype = impl.exact_dtype
    est = torch.randn(2, 3, 40, 2, generator=gen, dtype=dtype).to(impl.device).transpose(2, 3)[:, :, :, ::2]
    mix = torch.randn(4, 2, 20, 2, generator=gen, dtype=dtype).to(impl.device).permute(0, 1, 3, 2)[::2]
    assert not est.is_contiguous() and not mix.is_contiguous()
    fast = run(partial(nrt_kernels.mixit_loss, impl=impl.name), est, mix)
    assert_matches_truth(impl, fast, est, mix)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_misaligned_storage_offset(impl, dtype):
    # A contiguous view one element into its storage is not 16-byte aligned: vectorised loads must notice.
    impl.require(dtype)
    est, mix = make_inputs(2, 4, 2, trailing=(1024,), dtype=dtype, seed=12)
    storage = torch.empty(est.numel() + 1, dtype=dtype, device=impl.device)
    storage[1:] = est.flatten().to(impl.device)
    est_view = storage[1:].view(est.shape)
    assert est_view.is_contiguous() and est_view.data_ptr() % 16 != 0
    fast = run(partial(nrt_kernels.mixit_loss, impl=impl.name), est_view, mix.to(impl.device))
    assert_matches_truth(impl, fast, est, mix)


# ----------------------------------------------------------------------------------------------
# Outputs, autograd, determinism, front-ends
# ----------------------------------------------------------------------------------------------


def test_outputs_order_shapes_and_est(impl):
    est, mix = make_inputs(3, 4, 2, trailing=(2, 11), dtype=impl.exact_dtype, seed=10)
    est, mix = est.to(impl.device).requires_grad_(True), mix.to(impl.device)
    loss, est_mix, assignment = nrt_kernels.mixit_loss(est, mix, impl=impl.name, return_est=True,
                                                       return_assignment=True)
    ref = reference.mixit_loss(est, mix, return_est=True, return_assignment=True)
    assert loss.shape == () and est_mix.shape == (3, 2, 2, 11) and assignment.shape == (3, 4)
    assert assignment.dtype == torch.int64
    torch.testing.assert_close(est_mix, ref[1])
    torch.testing.assert_close(loss, ref[0].to(loss.dtype))
    torch.testing.assert_close(assignment, ref[2])
    only_est = nrt_kernels.mixit_loss(est, mix, impl=impl.name, return_est=True)
    assert len(only_est) == 2 and only_est[1].shape == est_mix.shape
    # The remixed estimates are differentiable, like asteroid's.
    (grad,) = torch.autograd.grad(est_mix.sum(), est)
    torch.testing.assert_close(grad, torch.ones_like(est))


@pytest.mark.parametrize("mixtures_grad", [True, False])
def test_mixtures_gradient_only_when_required(impl, mixtures_grad):
    est, mix = make_inputs(2, 3, 2, trailing=(30,), dtype=impl.exact_dtype, seed=11)
    fast = check(impl, est, mix, mixtures_grad=mixtures_grad)
    assert (fast.grad_mixtures is not None) == mixtures_grad


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(impl, reduction):
    # Random values: no error is 0 and no two candidates tie, so the loss is smooth around them.
    impl.require(torch.float64)
    est, mix = make_inputs(2, 3, 2, trailing=(7,), seed=12)
    est, mix = est.to(impl.device).requires_grad_(True), mix.to(impl.device).requires_grad_(True)
    # Under the interpreter, fast_mode (random projections of the Jacobians instead of every column): seconds.
    assert torch.autograd.gradcheck(lambda e, m: nrt_kernels.mixit_loss(e, m, impl=impl.name, reduction=reduction),
                                    (est, mix), fast_mode=impl.interpreted)


@pytest.mark.parametrize("batch,length", [(3, 2000), (4, 150_001)])
def test_deterministic(impl, batch, length):
    impl.skip_if_slow(batch, 4, 2, 2 * length)
    est, mix = make_inputs(batch, 4, 2, trailing=(2, length), dtype=torch.float32, seed=13)
    first, again = run_impl(impl, est, mix), run_impl(impl, est, mix)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_module_matches_function(impl):
    est, mix = make_inputs(2, 4, 2, dtype=impl.exact_dtype, seed=14)
    est, mix = est.to(impl.device), mix.to(impl.device)
    module = nrt_kernels.MixITLoss(partitions="equal", impl=impl.name)
    assert "equal" in repr(module)
    torch.testing.assert_close(module(est, mix), reference.mixit_loss(est, mix, partitions="equal"))


@settings(max_examples=25, deadline=None)
@given(data=st.data(), batch=st.integers(1, 3), sources=st.integers(1, 6), mixtures=st.integers(1, 3),
       equal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fuzz_against_reference(impl, data, batch, sources, mixtures, equal, seed):
    # Lengths around the C++ kernel's 16-element lane blocks and 256-element subset-sum chunks (the interpreter:
    # shorter rows, to keep it to seconds).
    length = data.draw(st.integers(1, 70 if impl.interpreted else 600), label="length")
    partitions = "equal" if equal and sources % mixtures == 0 else "generalized"
    if assignments.num_candidates(sources, mixtures, partitions) > assignments.MAX_CANDIDATES:
        return
    est, mix = make_inputs(batch, sources, mixtures, trailing=(length,), dtype=impl.exact_dtype, seed=seed)
    fast = run_impl(impl, est, mix, partitions=partitions)
    truth, _ = truth_and_baseline(est, mix, partitions=partitions)
    # Short rows tie mathematically; a different choice is allowed only where the truth scores it equal.
    same = rows_choosing_like_reference(fast.assignment, truth.loss, truth.assignment, est.double(), mix.double())
    assert_matches_truth(impl, fast, est, mix, rows=same, partitions=partitions)


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
def test_bad_inputs_raise_like_reference(impl, name, make, kwargs):
    est, mix = make_inputs(2, 4, 2, trailing=(10,), dtype=impl.exact_dtype, seed=14)
    est, mix = make(est.to(impl.device), mix.to(impl.device))
    with pytest.raises((TypeError, ValueError)) as expected:
        reference.mixit_loss(est, mix, **kwargs)
    with pytest.raises(expected.type, match="^" + re.escape(str(expected.value)) + "$"):
        nrt_kernels.mixit_loss(est, mix, impl=impl.name, **kwargs)


def test_mixtures_made_under_inference_mode(impl):
    # Targets from a teacher run under torch.inference_mode() must still be usable as mixtures.
    est, mix = make_inputs(2, 4, 2, dtype=impl.exact_dtype, seed=16)
    est, mix = est.to(impl.device).requires_grad_(True), mix.to(impl.device)
    with torch.inference_mode():
        mix = mix * 1.0
    loss = nrt_kernels.mixit_loss(est, mix, impl=impl.name)
    (grad,) = torch.autograd.grad(loss, est)
    torch.testing.assert_close(loss, reference.mixit_loss(est, mix.clone()).to(loss.dtype))
    assert torch.isfinite(grad).all()


def test_custom_op_called_directly_on_the_current_stream(impl):
    # The custom op without the front-end; on CUDA from a side stream: the kernels must run on the caller's stream.
    impl.require_fused("it has no custom op")
    from nrt_kernels.ops.mixit_l1 import mixit_l1

    est, mix = make_inputs(2, 4, 2, trailing=(5000,), dtype=torch.float32, seed=14)
    on_cuda = impl.device == "cuda"
    stream = torch.cuda.Stream() if on_cuda else None
    with torch.cuda.stream(stream) if on_cuda else contextlib.nullcontext():
        flat_est, flat_mix = (t.to(impl.device, non_blocking=True).flatten(2) for t in (est, mix))
        row_loss, best = mixit_l1(flat_est, flat_mix, "generalized", impl.name)
    if on_cuda:
        stream.synchronize()
    truth, baseline = truth_and_baseline(est, mix, mixtures_grad=False)
    assert_close_to_truth(row_loss, baseline.loss, truth.loss, torch.float32)
    assert torch.equal(assignments.candidate_assignments(4, 2, "generalized")[best.cpu()], truth.assignment)
