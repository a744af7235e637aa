"""The fused noise-robust loss (Triton under TRITON_INTERPRET=1, the C++ CPU kernel) against nrt_kernels.reference."""
import itertools

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tolerances import LOSS_TOLERANCE, assert_close_to_truth

import nrt_kernels
from nrt_kernels import reference
from nrt_kernels.ops.noise_robust_l1 import TERM_NAMES, noise_robust_l1

# On a GPU machine (TRITON_INTERPRET=0) the same tests run the compiled kernels on CUDA.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_backend_missing():
    from nrt_kernels import backends
    try:
        backends.resolve("noise_robust_l1", "cpu", "cpu")
    except backends.BackendUnavailable as error:
        return str(error)
    return None


# Every fused backend with the device its tensors live on: the Triton kernels and the C++ CPU kernel.
FUSED_BACKENDS = pytest.mark.parametrize("impl,device", [
    pytest.param("triton", DEVICE, id="triton"),
    pytest.param("cpu", "cpu", id="cpu", marks=pytest.mark.skipif(_cpu_backend_missing() is not None,
                                                                  reason="the CPU extension is not available")),
])
needs_cpu_backend = pytest.mark.skipif(_cpu_backend_missing() is not None, reason="the CPU extension is not available")
# Non-zero weights per version: dyadic, so the float64 comparisons are exact up to summation order.
NONZERO = {"v1": (1.5, 2.0, 0.5), "v2": (0.5, 0.25, 2.0, 1.0)}


def make_inputs(batch=3, sources=4, trailing=(2, 45), dtype=torch.float64, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    est, targets, teacher = (
        torch.randn(batch, sources, *trailing, generator=gen, dtype=torch.float64).to(device, dtype) for _ in range(3))
    pairing = torch.stack([torch.randperm(sources, generator=gen) for _ in range(batch)])
    return est, targets, teacher, pairing


def loss_terms_grad(fn, est, targets, **kwargs):
    est = est.detach().clone().requires_grad_(True)
    loss, terms = fn(est, targets, return_terms=True, **kwargs)
    (grad,) = torch.autograd.grad(loss * 3.0, est)
    return loss, terms, grad


def assert_same(fast, ref, rtol, atol):
    torch.testing.assert_close(fast[0], ref[0], rtol=rtol, atol=atol)
    assert fast[1].keys() == ref[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(fast[1][name], ref[1][name], rtol=rtol, atol=atol, msg=name)
    torch.testing.assert_close(fast[2], ref[2], rtol=rtol, atol=atol)


def weight_cases():
    for version, values in NONZERO.items():
        for on in itertools.product((False, True), repeat=len(values)):
            if any(on):
                yield version, tuple(v if o else 0 for v, o in zip(values, on))


@pytest.mark.parametrize("normalize", ["iseparate", "active"])
@pytest.mark.parametrize("with_teacher", [True, False])
@pytest.mark.parametrize("version,weights", list(weight_cases()))
@FUSED_BACKENDS
def test_every_weight_combination_matches_reference(version, weights, with_teacher, normalize, impl, device):
    est, targets, teacher, pairing = make_inputs(seed=len(weights) * 17 + sum(w != 0 for w in weights),
                                                 device=device)
    kwargs = dict(version=version, weights=list(weights), teacher_targets=teacher if with_teacher else None,
                  pairing=pairing, normalize=normalize)
    # The teacher term (last in both versions) runs only with teacher targets.
    if not (any(weights[:-1]) or (weights[-1] and with_teacher)):
        with pytest.raises(ValueError, match="no term"):
            nrt_kernels.noise_robust_loss(est, targets, impl=impl, **kwargs)
        with pytest.raises(ValueError, match="no term"):
            reference.noise_robust_loss(est, targets, **kwargs)
        return
    fast = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl=impl, **kwargs)
    ref = loss_terms_grad(reference.noise_robust_loss, est, targets, **kwargs)
    assert_same(fast, ref, rtol=1e-12, atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 4), sources=st.sampled_from([2, 4, 6]), length=st.integers(40, 700),
       version=st.sampled_from(["v1", "v2"]), weight_values=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=4,
                                                                   max_size=4),
       with_teacher=st.booleans(), normalize=st.sampled_from(["iseparate", "active"]),
       pairing_kind=st.sampled_from(["shared", "per_row"]), seed=st.integers(0, 2**16))
@FUSED_BACKENDS
def test_fuzz_matches_reference(batch, sources, length, version, weight_values, with_teacher, normalize, pairing_kind,
                                seed, impl, device):
    # Lengths >= 40: shorter rows can tie MixIT candidates mathematically, and a tie may resolve either way.
    weights = weight_values[: len(NONZERO[version])]
    assume(any(weights[:-1]) or (weights[-1] and with_teacher))
    est, targets, teacher, pairing = make_inputs(batch=batch, sources=sources, trailing=(length,), seed=seed,
                                                 device=device)
    kwargs = dict(version=version, weights=weights, teacher_targets=teacher if with_teacher else None,
                  pairing=pairing if pairing_kind == "per_row" else pairing[0], normalize=normalize)
    fast = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl=impl, **kwargs)
    ref = loss_terms_grad(reference.noise_robust_loss, est, targets, **kwargs)
    assert_same(fast, ref, rtol=1e-12, atol=1e-13)


@FUSED_BACKENDS
def test_normalizations_differ_only_when_teacher_skipped(impl, device):
    est, targets, teacher, pairing = make_inputs(seed=5, device=device)
    common = dict(version="v1", weights=[1, 2, 1], pairing=pairing, impl=impl)
    iseparate = nrt_kernels.noise_robust_loss(est, targets, normalize="iseparate", **common)
    active = nrt_kernels.noise_robust_loss(est, targets, normalize="active", **common)
    torch.testing.assert_close(iseparate * 4, active * 3, rtol=1e-12, atol=0)
    with_teacher = [nrt_kernels.noise_robust_loss(est, targets, teacher_targets=teacher, normalize=n, **common)
                    for n in ("iseparate", "active")]
    torch.testing.assert_close(with_teacher[0], with_teacher[1], rtol=0, atol=0)


@FUSED_BACKENDS
def test_float32_long_rows_default_pairing_draws_like_iseparate(impl, device):
    est, targets, teacher, _ = make_inputs(batch=2, trailing=(2, 3000), dtype=torch.float32, seed=7, device=device)
    kwargs = dict(version="v1", weights=[1, 2, 1], teacher_targets=teacher)
    torch.manual_seed(123)
    fast = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl=impl, **kwargs)
    after_fast = torch.rand(3)
    torch.manual_seed(123)
    ref = loss_terms_grad(reference.noise_robust_loss, est, targets, **kwargs)
    after_ref = torch.rand(3)
    # One torch.randperm(S) from the global generator, as iSeparate draws it.
    torch.manual_seed(123)
    torch.randperm(4)
    assert torch.equal(after_fast, after_ref) and torch.equal(after_fast, torch.rand(3))
    rtol, atol = LOSS_TOLERANCE[torch.float32]
    assert_same(fast, ref, rtol=rtol, atol=atol)


@FUSED_BACKENDS
def test_no_mixit_term_draws_no_pairing(impl, device):
    est, targets, teacher, _ = make_inputs(seed=8, device=device)
    torch.manual_seed(5)
    nrt_kernels.noise_robust_loss(est, targets, version="v2", weights=[1, 1, 0, 1], teacher_targets=teacher,
                                  impl=impl)
    drawn = torch.rand(2)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(2))


@FUSED_BACKENDS
def test_per_example_pairing_matches_reference(impl, device):
    est, targets, teacher, _ = make_inputs(batch=4, seed=9, device=device)
    kwargs = dict(version="v2", weights=[0.5, 0.5, 2, 0.5], teacher_targets=teacher, pairing="per_example")
    torch.manual_seed(3)
    fast = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl=impl, **kwargs)
    torch.manual_seed(3)
    ref = loss_terms_grad(reference.noise_robust_loss, est, targets, **kwargs)
    assert_same(fast, ref, rtol=1e-12, atol=1e-13)


@FUSED_BACKENDS
def test_explicit_pairing_shared_by_the_batch(impl, device):
    est, targets, teacher, _ = make_inputs(seed=10, device=device)
    pairing = torch.tensor([3, 1, 0, 2])
    kwargs = dict(version="v1", weights=[1, 2, 1], teacher_targets=teacher)
    fast = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl=impl, pairing=pairing, **kwargs)
    rows = loss_terms_grad(reference.noise_robust_loss, est, targets, pairing=pairing.expand(3, 4), **kwargs)
    assert_same(fast, rows, rtol=1e-12, atol=1e-13)
    # The MixIT term is the core op against the two mixtures of the pairing.
    mixtures = torch.stack([targets[:, [3, 1]].sum(1), targets[:, [0, 2]].sum(1)], dim=1)
    torch.testing.assert_close(fast[1]["mixit"], reference.mixit_loss(est, mixtures), rtol=1e-12, atol=0)


@pytest.mark.parametrize("sources", [2, 6, 8])
@FUSED_BACKENDS
def test_other_source_counts(sources, impl, device):
    # 8 sources: the MixIT search splits its 256 subsets over several programs (the "high" bits).
    est, targets, teacher, pairing = make_inputs(batch=2, sources=sources, trailing=(33,), seed=sources, device=device)
    kwargs = dict(version="v2", weights=[0.5, 0.5, 2, 0.5], teacher_targets=teacher, pairing=pairing)
    fast = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl=impl, **kwargs)
    ref = loss_terms_grad(reference.noise_robust_loss, est, targets, **kwargs)
    assert_same(fast, ref, rtol=1e-12, atol=1e-13)


@FUSED_BACKENDS
def test_source_weights_and_non_contiguous_inputs(impl, device):
    est, targets, teacher, pairing = make_inputs(trailing=(45, 2), seed=11, device=device)
    est, targets, teacher = (t.transpose(2, 3) for t in (est, targets, teacher))
    assert not est.is_contiguous()
    kwargs = dict(version="v2", weights=[1, 0.5, 2, 1], teacher_targets=teacher, pairing=pairing,
                  source_weights=[1.0, 2.0, 0.5, 0.5])
    fast = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl=impl, **kwargs)
    ref = loss_terms_grad(reference.noise_robust_loss, est, targets, **kwargs)
    assert_same(fast, ref, rtol=1e-12, atol=1e-13)


@FUSED_BACKENDS
def test_float64_gradcheck_through_the_fused_op(impl, device):
    est, targets, teacher, pairing = make_inputs(batch=2, trailing=(1, 6), seed=12, device=device)
    est.requires_grad_(True)

    def loss(est):
        return nrt_kernels.noise_robust_loss(est, targets, version="v2", weights=[0.5, 0.5, 2, 0.5],
                                             teacher_targets=teacher, pairing=pairing, impl=impl)

    assert torch.autograd.gradcheck(loss, (est,), eps=1e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@FUSED_BACKENDS
def test_half_precision_against_float64_truth(dtype, impl, device):
    est, targets, teacher, pairing = make_inputs(batch=2, trailing=(2, 300), dtype=dtype, seed=13, device=device)
    kwargs = dict(version="v1", weights=[1, 2, 1], teacher_targets=teacher, pairing=pairing)
    fast, _, grad = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl=impl, **kwargs)
    lowp = reference.noise_robust_loss(est, targets, **kwargs)
    truth = reference.noise_robust_loss(est.double(), targets.double(), **{**kwargs, "teacher_targets":
                                                                          teacher.double()})
    assert fast.dtype == torch.float32 and grad.dtype == dtype
    assert_close_to_truth(fast, lowp, truth, dtype)


@pytest.mark.parametrize("version,weights", [("v1", [1, 2, 1]), ("v2", [0.5, 0.5, 2, 0.5])])
@FUSED_BACKENDS
def test_exact_zero_errors_get_zero_gradient_like_autograd(version, weights, impl, device):
    # Silent stems and zero padding make est == target exactly: |0| has gradient 0 there, as autograd's abs.
    # Integer-valued inputs make every error (and every MixIT candidate's loss) exact, ties included.
    gen = torch.Generator().manual_seed(22)
    est, targets, teacher = (torch.randint(-1, 2, (3, 4, 2, 40), generator=gen).double().to(device) for _ in range(3))
    targets[:, 1] = 0.0
    est[:, 1, :, :20] = 0.0
    kwargs = dict(version=version, weights=weights, teacher_targets=teacher, pairing=torch.tensor([2, 0, 3, 1]))
    assert ((est - targets) == 0).float().mean() > 0.3
    fast = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl=impl, **kwargs)
    ref = loss_terms_grad(reference.noise_robust_loss, est, targets, **kwargs)
    assert_same(fast, ref, rtol=1e-12, atol=1e-13)


@FUSED_BACKENDS
def test_nan_in_teacher_targets_propagates(impl, device):
    est, targets, teacher, pairing = make_inputs(seed=14, device=device)
    teacher[1, 2, 0, 5] = float("nan")
    kwargs = dict(version="v1", weights=[1, 2, 1], teacher_targets=teacher, pairing=pairing)
    for fn, extra in ((nrt_kernels.noise_robust_loss, {"impl": impl}), (reference.noise_robust_loss, {})):
        loss, terms = fn(est, targets, return_terms=True, **kwargs, **extra)
        assert torch.isnan(loss) and torch.isnan(terms["teacher"])
        assert torch.isfinite(terms["l1"]) and torch.isfinite(terms["mixit"])


@FUSED_BACKENDS
def test_zero_weight_terms_do_not_read_their_inputs(impl, device):
    est, targets, teacher, pairing = make_inputs(seed=15, device=device)
    poisoned = torch.full_like(teacher, float("nan"))
    # Teacher weight 0: NaN teacher targets are never read.
    loss = nrt_kernels.noise_robust_loss(est, targets, version="v1", weights=[1, 2, 0], teacher_targets=poisoned,
                                         pairing=pairing, impl=impl)
    assert torch.isfinite(loss)
    # Only the teacher term: NaN noisy targets are never read.
    est.requires_grad_(True)
    loss = nrt_kernels.noise_robust_loss(est, poisoned, version="v2", weights=[0, 0, 0, 1], teacher_targets=teacher,
                                         impl=impl)
    (grad,) = torch.autograd.grad(loss, est)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, reference.source_l1(est, teacher), rtol=1e-12, atol=0)


@FUSED_BACKENDS
def test_inference_mode_teacher_targets_work_with_autograd(impl, device):
    est, targets, teacher, pairing = make_inputs(seed=16, device=device)
    with torch.inference_mode():
        teacher = teacher.clone()
    assert teacher.is_inference()
    kwargs = dict(version="v2", weights=[0, 1, 2, 1], teacher_targets=teacher, pairing=pairing)
    fast = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl=impl, **kwargs)
    ref = loss_terms_grad(reference.noise_robust_loss, est, targets, **kwargs)
    assert_same(fast, ref, rtol=1e-12, atol=1e-13)


@FUSED_BACKENDS
def test_targets_requiring_grad_take_the_reference_path(impl, device):
    est, targets, teacher, pairing = make_inputs(seed=17, device=device)
    targets.requires_grad_(True)
    loss = nrt_kernels.noise_robust_loss(est, targets, version="v1", weights=[1, 2, 0], pairing=pairing, impl=impl)
    (grad,) = torch.autograd.grad(loss, targets)
    targets_ref = targets.detach().clone().requires_grad_(True)
    expected = reference.noise_robust_loss(est, targets_ref, version="v1", weights=[1, 2, 0], pairing=pairing)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, targets_ref)[0], rtol=0, atol=0)


def test_module_and_auto_impl_on_cpu_avoid_the_interpreter(monkeypatch):
    est, targets, teacher, pairing = make_inputs(seed=18, device="cpu")
    criterion = nrt_kernels.NoiseRobustLoss(version="v2", impl="auto")
    kwargs = dict(weights=[0.5, 0.5, 2, 0.5], teacher_targets=teacher, pairing=pairing)
    # On the CPU, auto never runs the Triton kernels: break them and the call still works.
    from nrt_kernels import backends
    monkeypatch.setitem(backends._registry, ("noise_robust_l1", "triton"), None)
    monkeypatch.setitem(backends._registry, ("mixit_l1", "triton"), None)
    loss, terms = criterion(est, targets, return_terms=True, **kwargs)
    expected = reference.noise_robust_loss(est, targets, version="v2", **kwargs)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-13)
    assert set(terms) == {"l1", "consistency", "mixit", "teacher"}


@FUSED_BACKENDS
def test_custom_op_registration_passes_opcheck(impl, device):
    est, targets, teacher, pairing = make_inputs(batch=2, trailing=(20,), dtype=torch.float32, seed=19,
                                                 device=device)
    masks = torch.tensor([0b0011, 0b0101], dtype=torch.int32, device=est.device)
    args = (est.requires_grad_(True), targets, teacher, masks, est.new_empty(0), [1.0, 0.5, 2.0, 0.5], 4.0, impl)
    torch.library.opcheck(noise_robust_l1, args, test_utils=("test_schema", "test_faketensor",
                                                             "test_autograd_registration"))
    loss, terms, best = noise_robust_l1(*args)
    assert loss.shape == () and terms.shape == (len(TERM_NAMES),) and best.dtype == torch.int64


@pytest.mark.parametrize("bad,match", [
    (dict(est_shape=(2, 3, 2, 8)), "must be even"),
    (dict(teacher_shape=(2, 4, 2, 7)), "teacher_targets must have the shape"),
    (dict(targets_shape=(2, 4, 1, 8)), "targets must have the shape"),
    (dict(weights=[1, 2]), "needs 3 weights"),
    (dict(weights=[1, -1, 0]), ">= 0"),
    (dict(pairing=torch.tensor([0, 1, 1, 2])), "permutation"),
    (dict(pairing=torch.tensor([[0, 1, 2, 3], [3, 0, 1, 3]])), "permutation"),
    (dict(pairing=torch.tensor([0, 1, 2, 4], dtype=torch.uint8)), "permutation"),
    (dict(pairing=torch.tensor([[0, 1, 2, 3]] * 3)), "shape"),
    (dict(pairing="random"), "per_example"),
    (dict(normalize="sum"), "normalize"),
    (dict(version="v3"), "version"),
])
@pytest.mark.parametrize("impl", ["triton", "cpu", "reference"])
def test_bad_inputs_raise_clear_errors(bad, match, impl):
    est = torch.randn(bad.get("est_shape", (2, 4, 2, 8)))
    targets = torch.randn(bad.get("targets_shape", est.shape))
    teacher = torch.randn(bad.get("teacher_shape", est.shape))
    kwargs = dict(version=bad.get("version", "v1"), weights=bad.get("weights", [1, 2, 1]), teacher_targets=teacher,
                  pairing=bad.get("pairing"), normalize=bad.get("normalize", "iseparate"))
    with pytest.raises(ValueError, match=match):
        nrt_kernels.noise_robust_loss(est, targets, impl=impl, **kwargs)


@needs_cpu_backend
def test_cpu_backend_is_the_fused_kernel():
    from nrt_kernels import backends
    assert isinstance(backends.lookup("noise_robust_l1", "cpu"), backends.Kernel)
    assert backends.resolve("noise_robust_l1", "auto", "cpu") == "cpu"
    est, targets, teacher, pairing = make_inputs(seed=20, device="cpu")
    kwargs = dict(version="v2", weights=[0.5, 0.5, 2, 0.5], teacher_targets=teacher, pairing=pairing)
    fast = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl="cpu", **kwargs)
    ref = loss_terms_grad(reference.noise_robust_loss, est, targets, **kwargs)
    assert_same(fast, ref, rtol=1e-12, atol=1e-13)


@FUSED_BACKENDS
def test_fullgraph_compile_traces_the_fused_op(impl, device):
    est, targets, teacher, pairing = make_inputs(seed=21, device=device)

    def step(est, targets, teacher):
        leaf = est.detach().requires_grad_(True)
        loss = nrt_kernels.noise_robust_loss(leaf, targets, version="v1", weights=[1, 2, 1], teacher_targets=teacher,
                                             pairing=pairing, impl=impl)
        return loss, torch.autograd.grad(loss, leaf)[0]

    def forward(est, targets, teacher):
        return nrt_kernels.noise_robust_loss(est, targets, version="v1", weights=[1, 2, 1], teacher_targets=teacher,
                                             pairing=pairing, impl=impl)

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    leaf = est.detach().clone().requires_grad_(True)
    loss = compiled(leaf, targets, teacher)
    (grad,) = torch.autograd.grad(loss, leaf)
    expected_loss, expected_grad = step(est, targets, teacher)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@FUSED_BACKENDS
def test_nan_rows_stay_nan_and_the_gradient_is_autograds(impl, device):
    # NaN in est (row 1) and in a noisy stem (row 2): every MixIT candidate of those rows is NaN, so the first
    # one is kept (torch.min); sign(NaN) = 0 in the gradient, as autograd's abs backward.
    est, targets, teacher, pairing = make_inputs(seed=24, device=device)
    est[1, 2, 0, 5] = float("nan")
    targets[2, 0, 1, 7] = float("nan")
    kwargs = dict(version="v2", weights=[0.5, 0.5, 2, 0.5], teacher_targets=teacher, pairing=pairing)
    fast = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl=impl, **kwargs)
    ref = loss_terms_grad(reference.noise_robust_loss, est, targets, **kwargs)
    assert torch.isnan(fast[0]) and all(torch.isnan(value) for value in fast[1].values())
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# The C++ CPU kernel: rows longer than its tiles, any thread count
# ----------------------------------------------------------------------------------------------

# Longer than four forward tiles (4096) and two backward tiles (8192) of the kernel, and not a multiple of its
# 16-element lane blocks: exercises the fixed-order tile sums and the zero-padded tail.
CPU_LONG = 2 * 8192 + 37


@needs_cpu_backend
@pytest.mark.parametrize("source_weights", [None, [1.0, 2.0, 0.5, 0.5]])
@pytest.mark.parametrize("version,weights", [("v1", [1, 2, 1]), ("v2", [0.5, 0.25, 2, 1]), ("v2", [0, 1, 0, 0])])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernel_across_tiles_matches_reference(dtype, version, weights, source_weights):
    est, targets, teacher, pairing = make_inputs(batch=2, trailing=(CPU_LONG,), dtype=dtype, seed=23, device="cpu")
    kwargs = dict(version=version, weights=weights, teacher_targets=teacher, pairing=pairing,
                  source_weights=source_weights)
    fast = loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl="cpu", **kwargs)
    ref = loss_terms_grad(reference.noise_robust_loss, est, targets, **kwargs)
    assert fast[0].dtype == dtype and fast[2].dtype == dtype
    assert_same(fast, ref, *LOSS_TOLERANCE[dtype])


@needs_cpu_backend
@pytest.mark.parametrize("version,weights", [("v1", [1, 2, 1]), ("v2", [0.5, 0.25, 2, 1])])
# float32 and float64 sums round (bfloat16 inputs would sum exactly in float32 over a tile, in any order).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_bitwise_identical_for_any_thread_count(dtype, version, weights):
    # Fixed tiles and fixed-order sums: the thread count changes who computes a tile, never what is added.
    est, targets, teacher, pairing = make_inputs(batch=3, trailing=(2, CPU_LONG // 2), dtype=dtype, seed=25,
                                                 device="cpu")
    kwargs = dict(version=version, weights=weights, teacher_targets=teacher, pairing=pairing,
                  source_weights=[1.0, 2.0, 0.5, 0.5])
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(loss_terms_grad(nrt_kernels.noise_robust_loss, est, targets, impl="cpu", **kwargs))
    finally:
        torch.set_num_threads(threads)
    first = results[0]
    for other in results[1:]:
        assert torch.equal(other[0], first[0]) and torch.equal(other[2], first[2])
        assert all(torch.equal(other[1][name], first[1][name]) for name in first[1])


@FUSED_BACKENDS
def test_eager_path_equals_the_custom_op(impl, device):
    # Eager calls on plain tensors skip torch.library's dispatch; the custom op (what torch.compile traces) must
    # give the same loss, terms, best candidates and gradient, bit for bit.
    from nrt_kernels.ops.noise_robust_l1 import noise_robust_l1_loss
    est, targets, teacher, pairing = make_inputs(batch=2, trailing=(40,), dtype=torch.float32, seed=26, device=device)
    masks = torch.tensor([0b0011, 0b0101], dtype=torch.int32, device=est.device)
    args = (targets, teacher, masks, est.new_empty(0), [1.0, 0.5, 2.0, 0.5], 4.0, impl)
    results = []
    for op in (noise_robust_l1_loss, noise_robust_l1):
        leaf = est.detach().clone().requires_grad_(True)
        loss, terms, best = op(leaf, *args)
        (grad,) = torch.autograd.grad(loss * 3.0, leaf)
        results.append((loss, terms, best, grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@needs_cpu_backend
def test_fake_tensors_take_the_custom_op():
    # A FakeTensor has no data for a kernel: the front-end and the op must dispatch it to the fake implementations.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        est = torch.randn(2, 4, 2, 30, requires_grad=True)
        loss = nrt_kernels.noise_robust_loss(est, torch.randn(2, 4, 2, 30), version="v1", weights=[1, 2, 0],
                                             impl="cpu")
        loss.backward()
        assert loss.shape == () and est.grad.shape == est.shape
