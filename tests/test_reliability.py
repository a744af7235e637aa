"""Regression tests for the defects an adversarial pass over the public API found (issue 11), one test per defect,
each over every impl that runs here (reference, cpu, Triton under the interpreter).  Defect 5 (iSeparate's stem
split in the compat modules) is tested in test_compat_noise_robust.py beside its transcription of iSeparate."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from tolerances import LOSS_TOLERANCE

import nrt_kernels
from nrt_kernels import backends, compat, reference
from nrt_kernels.assignments import candidate_assignments

IMPLS = ["reference", "cpu", "triton"]
FUSED = ["cpu", "triton"]


def require(impl):
    try:
        backends.resolve("mixit_l1", impl, "cpu")
    except backends.BackendUnavailable as error:  # the C++ extension could not be built here
        pytest.skip(str(error))


def sources_and_mixtures(batch=2, sources=4, trailing=(2, 9), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, sources, *trailing, generator=gen, dtype=dtype),
            torch.randn(batch, 2, *trailing, generator=gen, dtype=dtype))


def noise_robust_inputs(batch=2, sources=4, trailing=(2, 9), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    est, targets, teacher = (torch.randn(batch, sources, *trailing, generator=gen, dtype=dtype) for _ in range(3))
    return est, targets, teacher, torch.randperm(sources, generator=gen)


# 1 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [True, None])
@pytest.mark.parametrize("impl", FUSED)  # the reference reads the chosen candidates on the host: not traceable
def test_dynamic_shape_compile_returns_est_and_assignment(impl, dynamic):
    require(impl)
    wrapper = compat.MixITLossWrapper("l1", impl=impl)

    def step(est, mixtures):
        loss, est_mixtures, assignment = nrt_kernels.mixit_loss(est, mixtures, return_est=True,
                                                                 return_assignment=True, impl=impl)
        compat_loss, compat_mixtures = wrapper(est, mixtures, return_est=True)
        return loss, est_mixtures, assignment, compat_loss, compat_mixtures

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    # With the default `dynamic`, the second call recompiles with symbolic sizes: the source count among them.
    for sources, length in [(4, 6), (3, 6), (3, 11), (5, 11)]:
        est, mixtures = sources_and_mixtures(sources=sources, trailing=(length,), seed=sources + length)
        est.requires_grad_(True)
        got = compiled(est, mixtures)
        want = step(est, mixtures)
        for name, a, b in zip(("loss", "est", "assignment", "compat loss", "compat est"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
        (grad,) = torch.autograd.grad(got[0] + got[1].sum(), est)
        (want_grad,) = torch.autograd.grad(want[0] + want[1].sum(), est)
        torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    best = torch.tensor([5, 0, 15])
    torch.library.opcheck(torch.ops.nrt_kernels.best_assignment.default, (best, 4, 2, "generalized"))


# 2 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version,weights", [("v1", [1, 2, 1]), ("v2", [0.5, 0.5, 2, 0.5])])
@pytest.mark.parametrize("impl", IMPLS)
def test_source_weights_requiring_grad_get_their_gradient(impl, version, weights):
    require(impl)
    est, targets, teacher, pairing = noise_robust_inputs(seed=2)
    kwargs = dict(version=version, weights=weights, teacher_targets=teacher, pairing=pairing)

    def loss_and_grads(fn, **extra):
        leaf = est.clone().requires_grad_(True)
        source_weights = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64, requires_grad=True)
        loss = fn(leaf, targets, source_weights=source_weights, **kwargs, **extra)
        return (loss, *torch.autograd.grad(loss, (leaf, source_weights)))

    got = loss_and_grads(nrt_kernels.noise_robust_loss, impl=impl)
    want = loss_and_grads(reference.noise_robust_loss)
    for name, a, b in zip(("loss", "est grad", "source_weights grad"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=name)
    assert want[2].abs().sum() > 0


# 3 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source_weights,error,match", [
    ([1.0, 1.0, 1.0], ValueError, "one weight per source"),
    ([1.0, -1.0, 1.0, -1.0], ValueError, r"finite and >= 0, got -1.0 for source 1"),
    (torch.tensor([1.0, -1.0, 1.0, -1.0]), ValueError, r"finite and >= 0, got -1.0 for source 1"),
    ([1.0, 1.0, float("nan"), 1.0], ValueError, "finite and >= 0, got nan for source 2"),
    ([1.0, 1.0, 1.0, float("inf")], ValueError, "finite and >= 0, got inf for source 3"),
    ([0, 0, 0, 0], ValueError, "not all be 0"),
    (torch.zeros(4), ValueError, "not all be 0"),
    (["a", 1, 1, 1], TypeError, "numbers"),
    (torch.ones(4, dtype=torch.complex64), TypeError, "real"),
])
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_source_weights_raise_like_bad_loss_weights(impl, source_weights, error, match):
    require(impl)
    est, targets, teacher, pairing = noise_robust_inputs(seed=3)
    for version, weights in (("v1", [1, 2, 1]), ("v2", [1, 0, 0, 1])):
        with pytest.raises(error, match=match):
            nrt_kernels.noise_robust_loss(est, targets, version=version, weights=weights, teacher_targets=teacher,
                                          pairing=pairing, source_weights=source_weights, impl=impl)


# 4 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-46, 1e39])  # below float32's smallest subnormal / above its largest number
@pytest.mark.parametrize("impl", IMPLS)
def test_weights_outside_float32_range_give_the_finite_loss(impl, scale):
    require(impl)
    est, targets, teacher, pairing = noise_robust_inputs(dtype=torch.float32, seed=4)
    cases = [
        (dict(weights=[1, 0, 0]), dict(weights=[scale, 0, 0])),
        (dict(weights=[1, 2, 1]), dict(weights=[scale, 2 * scale, scale])),
        (dict(weights=[1, 2, 1], source_weights=[1, 2, 1, 1]),
         dict(weights=[1, 2, 1], source_weights=[scale, 2 * scale, scale, scale])),
    ]
    rtol, atol = LOSS_TOLERANCE[torch.float32]
    for plain, scaled in cases:
        results = []
        for options in (plain, scaled):
            leaf = est.clone().requires_grad_(True)
            loss = nrt_kernels.noise_robust_loss(leaf, targets, teacher_targets=teacher, pairing=pairing, impl=impl,
                                                 **options)
            results.append((loss, torch.autograd.grad(loss, leaf)[0]))
        (loss, grad), (scaled_loss, scaled_grad) = results
        assert torch.isfinite(scaled_loss) and torch.isfinite(scaled_grad).all(), scaled
        torch.testing.assert_close(scaled_loss, loss, rtol=rtol, atol=atol)
        torch.testing.assert_close(scaled_grad, grad, rtol=rtol, atol=atol)


# 6 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_works_and_functorch_says_which_impl_does(impl):
    require(impl)
    est, targets, teacher, pairing = noise_robust_inputs(batch=1, trailing=(3,), seed=6)
    mixtures = torch.randn(1, 2, 3, dtype=torch.float64)

    def mixit(e, m, mixit_impl=impl):
        return nrt_kernels.mixit_loss(e, m, reduction="none", impl=mixit_impl)

    def noise_robust(e, noise_robust_impl=impl):
        return nrt_kernels.noise_robust_loss(e, targets, weights=[1, 2, 1], teacher_targets=teacher, pairing=pairing,
                                             impl=noise_robust_impl)

    # The gradient is piecewise constant in est and mixtures (zero second derivative almost everywhere) and linear
    # in the incoming gradient: gradgradcheck checks both against finite differences...
    torch.autograd.gradgradcheck(mixit, (est.clone().requires_grad_(True), mixtures.clone().requires_grad_(True)),
                                 fast_mode=True)
    torch.autograd.gradgradcheck(noise_robust, (est.clone().requires_grad_(True),), fast_mode=True)

    # ...and the same derivatives through a model equal the reference's: a gradient penalty, and the derivative
    # of a gradient with respect to the incoming gradient.
    est, targets, teacher, pairing = noise_robust_inputs(batch=3, trailing=(2, 5), seed=7)
    mixtures = torch.randn(3, 2, 2, 5, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh()).double()
    incoming = torch.rand(3, dtype=torch.float64)
    weights = torch.randn_like(est)

    def second_derivatives(loss_impl):
        estimates = model(est)
        loss = mixit(estimates, mixtures, loss_impl).mean() + noise_robust(estimates, loss_impl)
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        penalty = torch.autograd.grad(sum((g ** 2).sum() for g in grads), list(model.parameters()))
        leaf, rows = est.clone().requires_grad_(True), incoming.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(mixit(leaf, mixtures, loss_impl), leaf, rows, create_graph=True)
        return (*penalty, *torch.autograd.grad((grad * weights).sum(), (leaf, rows), allow_unused=True))

    for got, want in zip(second_derivatives(impl), second_derivatives("reference"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)

    # torch.func transforms and forward-mode AD: the reference computes them, the fused ops say so.
    est = est.detach()
    tangent = torch.randn_like(est)
    for call in (lambda e: mixit(e, mixtures).sum(), noise_robust):
        leaf = est.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(call(leaf), leaf)
        if impl == "reference":
            torch.testing.assert_close(torch.func.grad(call)(est), grad)
            with torch.autograd.forward_ad.dual_level():
                dual = call(torch.autograd.forward_ad.make_dual(est, tangent))
                torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(dual).tangent, (grad * tangent).sum())
            continue
        with pytest.raises(NotImplementedError, match=r'torch\.func.*impl="reference"'):
            torch.func.grad(call)(est)
        with torch.autograd.forward_ad.dual_level(), pytest.raises(NotImplementedError,
                                                                   match=r'forward-mode AD.*impl="reference"'):
            call(torch.autograd.forward_ad.make_dual(est, tangent))


# 7 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("impl", IMPLS)
def test_float8_inputs_raise_the_dtype_type_error(impl, dtype):
    require(impl)
    est, mixtures = sources_and_mixtures(seed=7)
    match = r"float16, bfloat16, float32, float64\), got torch\.float8"
    with pytest.raises(TypeError, match=match):
        nrt_kernels.mixit_loss(est.to(dtype), mixtures, impl=impl)
    with pytest.raises(TypeError, match=match):
        nrt_kernels.mixit_loss(est, mixtures.to(dtype), impl=impl)
    est, targets, teacher, _ = noise_robust_inputs(seed=7)
    for args in ((est.to(dtype), targets, teacher), (est, targets, teacher.to(dtype))):
        with pytest.raises(TypeError, match=match):
            nrt_kernels.noise_robust_loss(args[0], args[1], weights=[1, 0, 1], teacher_targets=args[2], impl=impl)


# 8 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_l1_string_loss_with_extra_keyword_arguments_raises_type_error(impl):
    require(impl)
    est, mixtures = sources_and_mixtures(seed=8)
    wrapper = compat.MixITLossWrapper("l1", impl=impl)
    with pytest.raises(TypeError, match=r"'l1'.*keyword arguments.*foo"):
        wrapper(est, mixtures, foo=1)
    # A loss module that takes keyword arguments gets them, as asteroid passes them.
    class ScaledL1(torch.nn.Module):
        def forward(self, est, target, scale=1.0):
            return scale * (est - target).abs().flatten(1).mean(1)

    with pytest.warns(UserWarning, match="reference loop"):
        scaled = compat.MixITLossWrapper(ScaledL1(), impl=impl)(est, mixtures, scale=3.0)
    torch.testing.assert_close(scaled, 3.0 * reference.mixit_loss(est, mixtures))


# 9 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_pairing_on_another_device_names_both_devices(impl):
    require(impl)
    est, targets, teacher, pairing = noise_robust_inputs(seed=9)
    for bad in (pairing.to("meta"), pairing.expand(2, 4).to("meta")):
        with pytest.raises(ValueError, match=r"pairing must be on the CPU or on the device of est \(cpu\), got meta"):
            nrt_kernels.noise_robust_loss(est, targets, weights=[1, 2, 1], teacher_targets=teacher, pairing=bad,
                                          impl=impl)


# 10 ------------------------------------------------------------------------------------------------------------
def squared_error(est, target):
    return ((est - target) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("loss_func", ["l1", compat.SingleSrcL1(), squared_error])
@pytest.mark.parametrize("impl", IMPLS)
def test_compat_remixes_have_the_targets_dtype_like_asteroid(impl, loss_func):
    require(impl)
    est, mixtures = sources_and_mixtures(seed=10)
    per_example = squared_error if loss_func is squared_error else reference.l1_per_example
    for est_dtype, mixtures_dtype in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        e, m = est.to(est_dtype).requires_grad_(True), mixtures.to(mixtures_dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a loss other than an L1 runs the reference loop, with a warning
            _, est_mixtures = compat.MixITLossWrapper(loss_func, impl=impl)(e, m, return_est=True)
        # asteroid scores the candidates in the promoted dtype and writes the remixes into zeros_like(targets).
        best = reference.candidate_losses(e, m, "generalized", per_example).argmin(1)
        want = reference.remix(e, candidate_assignments(4, 2, "generalized")[best], 2).to(mixtures_dtype)
        assert est_mixtures.dtype == mixtures_dtype
        torch.testing.assert_close(est_mixtures, want, rtol=0, atol=0)
        (grad,) = torch.autograd.grad(est_mixtures.sum(), e)
        assert grad.dtype == est_dtype


# 12 ------------------------------------------------------------------------------------------------------------
def test_triton_plan_caches_keep_at_most_64_plans():
    require("triton")
    from nrt_kernels.ops.mixit_l1 import triton as mixit_triton
    from nrt_kernels.ops.noise_robust_l1 import triton as noise_robust_triton

    config = mixit_triton.default_partials_config(2, 2)
    flags = dict(USE_L1=True, USE_CONSISTENCY=False, USE_MIXIT=False, USE_TEACHER=False, SOURCE_WEIGHTED=False)
    for length in range(1, 201):  # a sweep over 200 shapes
        est, mixtures = torch.empty(1, 2, length), torch.empty(1, 2, length)
        mixit_triton.forward_plan(est, mixtures, "generalized", config)
        noise_robust_triton.partials_plan((est, est, est, torch.empty(1, dtype=torch.int32), est), flags,
                                          noise_robust_triton.PartialsConfig())
        assert len(mixit_triton._forward_plans) <= 64 and len(noise_robust_triton._partials_plans) <= 64
    assert len(mixit_triton._forward_plans) == 64
    # Least recently used first out: a plan in use survives a sweep of new shapes.
    recent = mixit_triton.forward_plan(torch.empty(1, 2, 150), mixtures, "generalized", config)
    for length in range(201, 300):
        mixit_triton.forward_plan(torch.empty(1, 2, length), mixtures, "generalized", config)
        assert mixit_triton.forward_plan(torch.empty(1, 2, 150), mixtures, "generalized", config) is recent


# 13 ------------------------------------------------------------------------------------------------------------
LATE_INTERPRETER = r"""
import os
import torch
import nrt_kernels
from nrt_kernels import backends

backends.lookup("mixit_l1", "triton")  # the Triton kernels load for the GPU: TRITON_INTERPRET is unset
os.environ["TRITON_INTERPRET"] = "1"
est, mixtures = torch.randn(2, 3, 8), torch.randn(2, 2, 8)
for call in (lambda: nrt_kernels.mixit_loss(est, mixtures, impl="triton"),
             lambda: nrt_kernels.noise_robust_loss(est[:, :2], est[:, 2:].expand(2, 2, 8).contiguous(),
                                                   weights=[1, 1, 0], impl="triton")):
    try:
        call()
    except backends.BackendUnavailable as error:
        assert "set it before" in str(error), error
    else:
        raise AssertionError("impl='triton' ran after TRITON_INTERPRET was set late")
print("ok")
"""


def test_triton_interpret_set_after_loading_the_kernels_says_so():
    pytest.importorskip("triton")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", LATE_INTERPRETER], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
