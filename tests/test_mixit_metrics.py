"""MixIT with the Gram metrics (SI-SDR, SD-SDR, SNR, MSE, log-MSE): every fused impl against nrt_kernels.reference.

The reference is the asteroid 0.7.0 / Google loop (one remix per candidate, the metric on it, torch.min); the
fused impls (C++ "cpu", Triton under the interpreter, or compiled on CUDA when a GPU is present) compute the same
numbers from one Gram pass.  Shapes stay tiny where Triton is interpreted.
"""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import GRAM_FLOAT64_TOLERANCE, GRAM_SLACK_DB, assert_close_to_truth

import nrt_kernels
from nrt_kernels import assignments, backends, compat, reference
from nrt_kernels.ops import mixit_gram

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METRICS = ("sisdr", "sdsdr", "snr", "mse", "log_mse")
SDR_METRICS = ("sisdr", "sdsdr", "snr")


def available(impl):
    try:
        backends.resolve(mixit_gram.OP, impl, torch.device(DEVICE).type)
    except backends.BackendUnavailable:
        return False
    return True


FUSED = [impl for impl in ("cpu", "triton") if available(impl)]
IMPLS = ["reference", *FUSED]


def make_inputs(batch, sources, mixtures, trailing=(2, 23), dtype=torch.float64, seed=0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    est = torch.randn(batch, sources, *trailing, generator=gen, dtype=torch.float64) + offset
    mix = torch.randn(batch, mixtures, *trailing, generator=gen, dtype=torch.float64) + offset
    return est.to(DEVICE, dtype), mix.to(DEVICE, dtype)


def loss_and_grads(fn, est, mixtures, **kwargs):
    """Row losses, assignment and the gradients of a row-weighted sum w.r.t. est and mixtures."""
    est = est.detach().clone().requires_grad_(True)
    mixtures = mixtures.detach().clone().requires_grad_(True)
    loss, assignment = fn(est, mixtures, reduction="none", return_assignment=True, **kwargs)
    weights = torch.arange(1, loss.shape[0] + 1, dtype=loss.dtype, device=loss.device)
    grad_est, grad_mix = torch.autograd.grad((loss * weights).sum(), (est, mixtures))
    return loss, assignment, grad_est, grad_mix


def run(impl, est, mixtures, **kwargs):
    fn = reference.mixit_loss if impl == "reference" else nrt_kernels.mixit_loss
    if impl != "reference":
        kwargs["impl"] = impl
    return loss_and_grads(fn, est, mixtures, **kwargs)


def candidate_losses(est, mixtures, metric, partitions="generalized", **options):
    """(B, P) float64 reference losses of every candidate, all candidates at once (the M=16 case has 65536): the
    reference metric applied to every remix, the candidates stacked along the batch dim."""
    groups = assignments.candidate_groups(est.shape[1], mixtures.shape[1], partitions)
    onehot = torch.zeros(len(groups), mixtures.shape[1], est.shape[1], dtype=torch.float64)
    for c, candidate in enumerate(groups):
        for n, group in enumerate(candidate):
            onehot[c, n, list(group)] = 1
    flat = est.detach().cpu().double().flatten(2)
    remixes = torch.einsum("pnm,bmd->bpnd", onehot, flat)
    batch, count = remixes.shape[:2]
    targets = mixtures.detach().cpu().double().flatten(2)[:, None].expand(-1, count, -1, -1)
    loss_func = reference.per_example_loss(metric, nrt_kernels.validate.check_metric_options(metric, **options))
    return loss_func(remixes.reshape(batch * count, *remixes.shape[2:]),
                     targets.reshape(batch * count, *targets.shape[2:])).view(batch, count)


def gradients_of_choice(est, mixtures, assignment, metric, **options):
    """The reference metric's gradients (of the row-weighted sum, as :func:`loss_and_grads`) through the given
    assignment alone: what the loop's autograd gives, less the 0 * NaN it adds from the other candidates."""
    est = est.detach().clone().requires_grad_(True)
    mixtures = mixtures.detach().clone().requires_grad_(True)
    remix = reference.remix(est, assignment, mixtures.shape[1])
    loss_func = reference.per_example_loss(metric, nrt_kernels.validate.check_metric_options(metric, **options))
    loss = loss_func(remix, mixtures)
    weights = torch.arange(1, loss.shape[0] + 1, dtype=loss.dtype, device=loss.device)
    return torch.autograd.grad((loss * weights).sum(), (est, mixtures))


def assert_choice_within_margin(assignment, candidates, metric_partitions):
    """The fused choice is the float64 reference's first minimum, or ties it within SELECTION_MARGIN."""
    num_sources, num_mixtures, partitions = metric_partitions
    table = assignments.candidate_assignments(num_sources, num_mixtures, partitions)
    chosen = (assignment.cpu()[:, None, :] == table[None]).all(-1).float().argmax(1)
    best_loss, best = candidates.min(1)
    chosen_loss = candidates.gather(1, chosen[:, None])[:, 0]
    margin = mixit_gram.SELECTION_MARGIN * (1 + best_loss.abs())
    assert ((chosen_loss - best_loss) <= margin).all(), (chosen, best, chosen_loss - best_loss)
    return chosen == best


# ----------------------------------------------------------------------------------------------
# Exactness in float64 and the options
# ----------------------------------------------------------------------------------------------

CASES = [(metric, 4, 2, "generalized", {}) for metric in METRICS] + [
    ("sisdr", 4, 2, "equal", {}), ("sisdr", 3, 3, "generalized", {"zero_mean": False}),
    ("sdsdr", 6, 3, "equal", {"eps": 1e-3}), ("snr", 1, 2, "generalized", {"zero_mean": False}),
    ("log_mse", 5, 2, "generalized", {"max_snr": 10.0, "eps": 1e-4}), ("mse", 2, 1, "generalized", {}),
    ("sisdr", 9, 2, "generalized", {}),
]


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("metric,sources,mixtures,partitions,options", CASES)
def test_matches_reference_float64(impl, metric, sources, mixtures, partitions, options):
    # A mean offset makes zero_mean matter.
    est, mix = make_inputs(3, sources, mixtures, seed=sources * 7 + mixtures, offset=0.3)
    fast = run(impl, est, mix, metric=metric, partitions=partitions, **options)
    ref = run("reference", est, mix, metric=metric, partitions=partitions, **options)
    rtol, atol = GRAM_FLOAT64_TOLERANCE
    torch.testing.assert_close(fast[0], ref[0], rtol=rtol, atol=atol)
    assert torch.equal(fast[1], ref[1])
    for got, want in zip(fast[2:], ref[2:]):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * want.abs().max().item())


@pytest.mark.parametrize("impl", FUSED)
@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), sources=st.integers(1, 6), mixtures=st.integers(1, 3), length=st.integers(8, 70),
       equal=st.booleans(), metric=st.sampled_from(METRICS), zero_mean=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_against_reference(impl, batch, sources, mixtures, length, equal, metric, zero_mean, seed):
    partitions = "equal" if equal and sources % mixtures == 0 else "generalized"
    options = {"zero_mean": zero_mean} if metric in SDR_METRICS else {}
    est, mix = make_inputs(batch, sources, mixtures, trailing=(length,), seed=seed, offset=0.1)
    fast = run(impl, est, mix, metric=metric, partitions=partitions, **options)
    candidates = candidate_losses(est, mix, metric, partitions, **options)
    assert_choice_within_margin(fast[1], candidates, (sources, mixtures, partitions))
    # At least 8 samples: shorter signals reach SI-SDRs of 80 dB and more (one sample is always a scaled copy of
    # the mixture), where the noise energy is below the float64 rounding of ||r||^2 and EPS decides; the loss then
    # errs by ~1e-16 ||r||^2 / EPS relative and the gradient by far more (documented, beyond the criterion's range).
    torch.testing.assert_close(fast[0].cpu(), candidates.min(1).values, rtol=1e-7, atol=1e-10)
    for got, want in zip(fast[2:], gradients_of_choice(est, mix, fast[1], metric, **options)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * (1 + want.abs().max().item()))


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_float64(impl, metric):
    est, mix = make_inputs(2, 3, 2, trailing=(6,), seed=12, offset=0.2)
    est, mix = est.requires_grad_(True), mix.requires_grad_(True)
    # The interpreter runs a call in ~0.1 s: a random projection of the Jacobian there, all of it in C++.
    assert torch.autograd.gradcheck(lambda e, m: nrt_kernels.mixit_loss(e, m, metric=metric, impl=impl), (est, mix),
                                    fast_mode=impl == "triton")


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("metric", ["sisdr", "log_mse"])
def test_double_backward(impl, metric):
    est, mix = make_inputs(1, 3, 2, trailing=(4,), seed=17, offset=0.2)

    def loss(e, m, loss_impl=impl):
        return nrt_kernels.mixit_loss(e, m, metric=metric, reduction="none", impl=loss_impl)

    assert torch.autograd.gradgradcheck(loss, (est.clone().requires_grad_(True), mix.clone().requires_grad_(True)),
                                        fast_mode=True)

    # A gradient penalty through a model, and the derivative with respect to the incoming gradient, as the loop's.
    est, mix = make_inputs(3, 4, 2, trailing=(2, 5), seed=18, offset=0.2)
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh()).double().to(DEVICE)
    incoming = torch.rand(3, dtype=torch.float64, device=DEVICE)
    weights = torch.randn_like(est)

    def second_derivatives(loss_impl):
        leaf = est.clone().requires_grad_(True)
        rows = incoming.clone().requires_grad_(True)
        grads = torch.autograd.grad(loss(model(leaf), mix, loss_impl).mean(), list(model.parameters()),
                                    create_graph=True)
        penalty = torch.autograd.grad(sum((g ** 2).sum() for g in grads), list(model.parameters()))
        (grad,) = torch.autograd.grad(loss(leaf, mix, loss_impl), leaf, rows, create_graph=True)
        return (*penalty, *torch.autograd.grad((grad * weights).sum(), (leaf, rows)))

    for got, want in zip(second_derivatives(impl), second_derivatives("reference"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("impl", IMPLS)
def test_options_change_the_loss_as_the_reference_says(impl):
    est, mix = make_inputs(2, 4, 2, seed=3, offset=0.5)
    values = {}
    for name, options in {"default": {}, "no_zero_mean": {"zero_mean": False}, "eps": {"eps": 1.0}}.items():
        values[name] = run(impl, est, mix, metric="sisdr", **options)[0]
        torch.testing.assert_close(values[name], run("reference", est, mix, metric="sisdr", **options)[0])
    assert not torch.allclose(values["default"], values["no_zero_mean"])
    assert not torch.allclose(values["default"], values["eps"])
    for max_snr in (0.0, 30.0, float("inf")):
        got = run(impl, est, mix, metric="log_mse", max_snr=max_snr)[0]
        torch.testing.assert_close(got, run("reference", est, mix, metric="log_mse", max_snr=max_snr)[0])


def test_reference_is_asteroid_and_google_formulas():
    # The reference's metrics on one remix, against the formulas written out (asteroid 0.7.0 places EPS on the
    # target energy, the noise energy and inside the log; Google's stabilizer is inside the log).
    gen = torch.Generator().manual_seed(4)
    est, target = torch.randn(2, 3, 50, generator=gen, dtype=torch.float64), torch.randn(2, 3, 50, generator=gen,
                                                                                            dtype=torch.float64)
    eps = 1e-3
    e, t = est - est.mean(-1, keepdim=True), target - target.mean(-1, keepdim=True)
    scale = (e * t).sum(-1, keepdim=True) / ((t * t).sum(-1, keepdim=True) + eps)
    sisdr = 10 * torch.log10((scale * t).pow(2).sum(-1) / ((e - scale * t).pow(2).sum(-1) + eps) + eps)
    sdsdr = 10 * torch.log10((scale * t).pow(2).sum(-1) / ((e - t).pow(2).sum(-1) + eps) + eps)
    snr = 10 * torch.log10(t.pow(2).sum(-1) / ((e - t).pow(2).sum(-1) + eps) + eps)
    for name, expected in (("sisdr", sisdr), ("sdsdr", sdsdr), ("snr", snr)):
        torch.testing.assert_close(reference.neg_sdr_per_example(est, target, name, True, eps), -expected.mean(-1))
    log_mse = 10 * torch.log10((target - est).pow(2).sum(-1) + 1e-2 * target.pow(2).sum(-1) + eps).mean(-1)
    torch.testing.assert_close(reference.log_mse_per_example(est, target, 20.0, eps), log_mse)
    torch.testing.assert_close(reference.mse_per_example(est, target), (est - target).pow(2).mean((1, 2)))


# ----------------------------------------------------------------------------------------------
# float32 accuracy from -30 to +60 dB, half precision, selection
# ----------------------------------------------------------------------------------------------


def inputs_at_sdr(sdr_db, batch=3, length=3000, seed=0):
    """Four sources whose pairs form the two mixtures; the estimates are the sources plus noise at ``sdr_db``
    (and a mean offset, which zero_mean removes)."""
    gen = torch.Generator().manual_seed(seed)
    sources = torch.randn(batch, 4, length, generator=gen, dtype=torch.float64) + 0.1
    mixtures = torch.stack([sources[:, 0] + sources[:, 1], sources[:, 2] + sources[:, 3]], dim=1)
    noise = torch.randn(batch, 4, length, generator=gen, dtype=torch.float64) * 10 ** (-sdr_db / 20)
    return (sources + noise).float().to(DEVICE), mixtures.float().to(DEVICE)


def relative_max_error(got, truth):
    return ((got.double() - truth).abs().max() / truth.abs().max()).item()


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("sdr_db", [-30.0, 0.0, 30.0, 60.0])
def test_float32_accuracy_against_float64(impl, metric, sdr_db):
    # The criterion: the loss's error against a float64 evaluation is at most 2x the float32 loop's + 0.01
    # dB (MSE, not in dB: the same slack as a ratio), and likewise for the gradients relative to their largest
    # entry (there the slack is 1e-4 of it: a fused gradient is as exact as float32 can store it).
    est, mix = inputs_at_sdr(sdr_db)
    fast = run(impl, est, mix, metric=metric)
    loop = run("reference", est, mix, metric=metric)
    truth = run("reference", est.double(), mix.double(), metric=metric)
    assert fast[0].dtype == torch.float32 and fast[2].dtype == torch.float32
    if metric == "mse":
        fast_err = ((fast[0].double() - truth[0]).abs() / truth[0]).max().item()
        loop_err = ((loop[0].double() - truth[0]).abs() / truth[0]).max().item()
        slack = 10 ** (GRAM_SLACK_DB / 10) - 1
    else:
        fast_err = (fast[0].double() - truth[0]).abs().max().item()
        loop_err = (loop[0].double() - truth[0]).abs().max().item()
        slack = GRAM_SLACK_DB
    assert fast_err <= 2 * loop_err + slack, (fast_err, loop_err)
    assert torch.equal(fast[1], truth[1])
    for got_fast, got_loop, want in zip(fast[2:], loop[2:], truth[2:]):
        assert relative_max_error(got_fast, want) <= 2 * relative_max_error(got_loop, want) + 1e-4


@pytest.mark.parametrize("impl", FUSED)
def test_float32_high_sdr_is_beyond_a_float32_gram(impl):
    # At 60 dB the fused loss is far more exact than the loop (what a float32 Gram would lose, the float64 one keeps):
    # measured, not assumed, so a Gram accumulated in float32 fails here.
    est, mix = inputs_at_sdr(60.0, length=20000)
    fast = run(impl, est, mix, metric="sisdr")[0]
    truth = run("reference", est.double(), mix.double(), metric="sisdr")[0]
    assert (fast.double() - truth).abs().max().item() < 1e-4


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", ["sisdr", "log_mse"])
def test_half_precision_against_float64_truth(impl, dtype, metric):
    est, mix = inputs_at_sdr(10.0, length=500)
    est, mix = est.to(dtype), mix.to(dtype)
    fast = run(impl, est, mix, metric=metric)
    lowp = reference.mixit_loss(est, mix, metric=metric, reduction="none")
    truth = run("reference", est.double(), mix.double(), metric=metric)
    assert fast[0].dtype == torch.float32 and fast[2].dtype == dtype and fast[3].dtype == dtype
    # The loop in float16 overflows its sums of squares (NaN rows); where it does not, the fused loss is at least as
    # close to the truth, and it is close everywhere.
    finite = torch.isfinite(lowp)
    if finite.any():
        assert_close_to_truth(fast[0][finite], lowp[finite], truth[0][finite], dtype)
    assert (fast[0].double() - truth[0]).abs().max() < 1e-3
    assert torch.equal(fast[1], truth[1])
    torch.testing.assert_close(fast[2].double(), truth[2], rtol=1e-2, atol=1e-2 * truth[2].abs().max().item())


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("metric", METRICS)
def test_selection_matches_float64_reference(impl, metric):
    # Many rows of float32 noise, where candidates lie close together: the fused choice is the float64 reference's
    # first minimum, or within SELECTION_MARGIN of it.
    est, mix = make_inputs(24, 5, 2, trailing=(40,), dtype=torch.float32, seed=21)
    loss, assignment = nrt_kernels.mixit_loss(est, mix, metric=metric, impl=impl, reduction="none",
                                              return_assignment=True)
    candidates = candidate_losses(est, mix, metric)
    same = assert_choice_within_margin(assignment, candidates, (5, 2, "generalized"))
    assert same.float().mean() > 0.9
    torch.testing.assert_close(loss.double().cpu(), candidates.min(1).values, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", FUSED)
def test_exact_ties_resolve_like_torch_min(impl):
    # Integer signals: every Gram sum is exact, identical sources and identical mixtures tie exactly.
    gen = torch.Generator().manual_seed(6)
    est = torch.randint(-2, 3, (8, 4, 6), generator=gen).to(DEVICE, torch.float64)
    mix = torch.randint(-2, 3, (8, 2, 6), generator=gen).to(DEVICE, torch.float64)
    est[:, 1] = est[:, 0]
    mix[:, 1] = mix[:, 0]
    for metric in METRICS:
        candidates = reference.candidate_losses(est, mix, "generalized", reference.per_example_loss(
            metric, nrt_kernels.validate.check_metric_options(metric)))
        assert (candidates == candidates.min(1, keepdim=True).values).sum(1).gt(1).all(), "test data must tie"
        fast = run(impl, est, mix, metric=metric)
        ref = run("reference", est, mix, metric=metric)
        assert torch.equal(fast[1], ref[1]), metric
        torch.testing.assert_close(fast[0], ref[0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Many sources: 16 into 2 mixtures (65536 candidates), 8 into 3 (6561)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("sources,mixtures,metric", [(16, 2, "sisdr"), (8, 3, "log_mse"), (10, 3, "snr")])
def test_many_sources(impl, sources, mixtures, metric):
    est, mix = make_inputs(1, sources, mixtures, trailing=(12,), seed=sources, offset=0.1)
    fast = loss_and_grads(nrt_kernels.mixit_loss, est, mix, metric=metric, impl=impl)
    candidates = candidate_losses(est, mix, metric)
    assert candidates.shape[1] == mixtures**sources
    assert_choice_within_margin(fast[1], candidates, (sources, mixtures, "generalized"))
    torch.testing.assert_close(fast[0].cpu(), candidates.min(1).values, rtol=1e-10, atol=1e-10)
    # The gradient through the chosen candidate, as the reference loop gives it for that one candidate.
    for got, want in zip(fast[2:], gradients_of_choice(est, mix, fast[1], metric)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())


def test_limits_per_metric():
    est, mix = make_inputs(1, 13, 2, trailing=(4,))
    nrt_kernels.mixit_loss(est, mix, metric="sisdr", impl=FUSED[0] if FUSED else "reference")
    with pytest.raises(ValueError, match="at most 12 sources are supported with metric='l1'"):
        nrt_kernels.mixit_loss(est, mix)
    est17, _ = make_inputs(1, 17, 2, trailing=(4,))
    with pytest.raises(ValueError, match="at most 16 sources are supported with metric='sisdr'"):
        nrt_kernels.mixit_loss(est17, mix, metric="sisdr")
    est11, mix3 = make_inputs(1, 11, 3, trailing=(4,))
    with pytest.raises(ValueError, match="177147, the limit with metric='mse' is 65536"):
        nrt_kernels.mixit_loss(est11, mix3, metric="mse")


# ----------------------------------------------------------------------------------------------
# NaN, Inf, bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("where", ["est", "mixtures"])
def test_nan_rows_stay_nan(impl, metric, where):
    est, mix = make_inputs(3, 4, 2, trailing=(20,), seed=7)
    (est if where == "est" else mix)[1, 1, 5] = float("nan")
    fast = run(impl, est, mix, metric=metric)
    ref = run("reference", est, mix, metric=metric)
    assert torch.isnan(fast[0][1]) and torch.isfinite(fast[0][[0, 2]]).all()
    torch.testing.assert_close(fast[0], ref[0], equal_nan=True)
    assert torch.equal(fast[1], ref[1])
    rows = [0, 2]
    for got, want, of_choice in zip(fast[2:], ref[2:], gradients_of_choice(est, mix, ref[1], metric)):
        torch.testing.assert_close(got[rows], want[rows], rtol=1e-9, atol=1e-9 * want[rows].abs().max())
        # The NaN row: the chosen candidate's own gradient, NaN where the NaN reaches (the loop's autograd spreads
        # it further, as 0 * NaN, through the candidates it did not choose).
        torch.testing.assert_close(got[1], of_choice[1], equal_nan=True, rtol=1e-9,
                                   atol=1e-9 * want[rows].abs().max())
        assert torch.isnan(want[1]).any() and (torch.isnan(got[1]) <= torch.isnan(want[1])).all()
    assert torch.isnan(fast[2][1]).any()


@pytest.mark.parametrize("impl", FUSED)
def test_a_later_nan_candidate_wins_like_torch_min(impl):
    # SI-SDR with eps=0 and two silent sources: the candidates that put both into one mixture score 0/0 = NaN (the
    # silent remix's projection and noise are both 0); in the "equal"
    # order the first of them is candidate 1 (({0, 2}, {1, 3})), after a finite candidate 0.
    est, mix = make_inputs(2, 4, 2, trailing=(30,), seed=19)
    est[:, [0, 2]] = 0
    metric = "sisdr"
    fast = run(impl, est, mix, metric=metric, partitions="equal", eps=0.0)
    ref = run("reference", est, mix, metric=metric, partitions="equal", eps=0.0)
    candidates = reference.candidate_losses(est, mix, "equal", reference.per_example_loss(
        metric, nrt_kernels.validate.check_metric_options(metric, eps=0.0)))
    assert torch.isfinite(candidates[:, 0]).all() and torch.isnan(candidates[:, 1]).all()
    assert torch.isnan(fast[0]).all() and torch.equal(fast[1], ref[1])


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("metric", METRICS)
def test_inf_never_picks_a_finite_candidate_silently(impl, metric):
    est, mix = make_inputs(3, 4, 2, trailing=(20,), seed=8)
    est[1, 2, 3] = float("inf")
    fast = run(impl, est, mix, metric=metric)
    ref = run("reference", est, mix, metric=metric)
    torch.testing.assert_close(fast[0][[0, 2]], ref[0][[0, 2]])
    # Inf makes the row NaN or Inf (a finite reference value, e.g. SNR's 10 log10(EPS) bound, may become NaN).
    assert not torch.isfinite(fast[0][1]) or fast[0][1] == ref[0][1]


@pytest.mark.parametrize("call,error,match", [
    (dict(metric="sisnr"), ValueError, "metric must be one of"),
    (dict(metric="mse", zero_mean=True), ValueError, "zero_mean=True does not apply to metric='mse'"),
    (dict(metric="sisdr", max_snr=30.0), ValueError, "max_snr=30.0 does not apply to metric='sisdr'"),
    (dict(metric="l1", eps=1e-8), ValueError, "eps=1e-08 does not apply to metric='l1'"),
    (dict(metric="sisdr", eps=-1.0), ValueError, "eps must be finite and >= 0"),
    (dict(metric="sisdr", eps=float("nan")), ValueError, "eps must be finite and >= 0"),
    (dict(metric="sisdr", eps=torch.tensor(1e-8)), TypeError, "eps must be a Python number"),
    (dict(metric="sisdr", zero_mean=1), TypeError, "zero_mean must be True or False"),
    (dict(metric="log_mse", max_snr=float("nan")), ValueError, "max_snr must be a number of dB"),
    (dict(metric="sisdr", impl="cuda"), backends.BackendUnavailable, 'computes only metric="l1"'),
])
def test_bad_options_say_what_is_wrong(call, error, match):
    est, mix = make_inputs(2, 3, 2)
    for fn in (nrt_kernels.mixit_loss, reference.mixit_loss):
        if "impl" in call and fn is reference.mixit_loss:
            continue
        with pytest.raises(error, match=match):
            fn(est, mix, **call)


# ----------------------------------------------------------------------------------------------
# Layout, outputs, determinism, compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", FUSED)
def test_non_contiguous_multi_dim_trailing_and_outputs(impl):
    gen = torch.Generator().manual_seed(9)
    est = torch.randn(2, 3, 40, 2, generator=gen, dtype=torch.float64).to(DEVICE).transpose(2, 3)[:, :, :, ::2]
    mix = torch.randn(4, 2, 20, 2, generator=gen, dtype=torch.float64).to(DEVICE).permute(0, 1, 3, 2)[::2]
    assert not est.is_contiguous() and not mix.is_contiguous()
    fast = run(impl, est, mix, metric="sdsdr")
    ref = run("reference", est, mix, metric="sdsdr")
    torch.testing.assert_close(fast[0], ref[0])
    torch.testing.assert_close(fast[2], ref[2])
    loss, est_mix, assignment = nrt_kernels.mixit_loss(est, mix, metric="sdsdr", impl=impl, return_est=True,
                                                       return_assignment=True)
    ref_loss, ref_est_mix, ref_assignment = reference.mixit_loss(est, mix, metric="sdsdr", return_est=True,
                                                                 return_assignment=True)
    assert loss.shape == () and est_mix.shape == (2, 2, 2, 20) and assignment.dtype == torch.int64
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(est_mix, ref_est_mix)
    assert torch.equal(assignment, ref_assignment)


@pytest.mark.parametrize("impl", FUSED)
def test_mixed_dtypes_module_and_inference_mode_mixtures(impl):
    est, mix = make_inputs(2, 4, 2, dtype=torch.bfloat16, seed=5)
    loss = nrt_kernels.mixit_loss(est.requires_grad_(True), mix.float(), metric="snr", impl=impl, reduction="none")
    torch.testing.assert_close(loss, reference.mixit_loss(est.float(), mix.float(), metric="snr", reduction="none"))
    assert torch.autograd.grad(loss.sum(), est)[0].dtype == torch.bfloat16
    module = nrt_kernels.MixITLoss(metric="log_mse", max_snr=20.0, impl=impl)
    assert "log_mse" in repr(module) and "max_snr=20.0" in repr(module)
    est64, mix64 = make_inputs(2, 4, 2, seed=6)
    with torch.inference_mode():
        teacher_mix = mix64 * 1.0
    est64.requires_grad_(True)
    value = module(est64, teacher_mix)
    torch.testing.assert_close(value, reference.mixit_loss(est64, mix64, metric="log_mse", max_snr=20.0))
    assert torch.isfinite(torch.autograd.grad(value, est64)[0]).all()


@pytest.mark.parametrize("impl", FUSED)
def test_deterministic_and_long_signals(impl):
    # Longer than one C++ Gram tile (8192) and not a multiple of any tile, lane block or Triton tile.
    length = 2 * 8192 + 37 if impl == "cpu" else 1000 + 37
    est, mix = make_inputs(2, 4, 2, trailing=(length,), dtype=torch.float32, seed=13, offset=0.2)
    first = run(impl, est, mix, metric="sisdr")
    second = run(impl, est, mix, metric="sisdr")
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    truth = run("reference", est.double(), mix.double(), metric="sisdr")
    torch.testing.assert_close(first[0].double(), truth[0], rtol=1e-6, atol=1e-5)


@pytest.mark.skipif("cpu" not in FUSED or DEVICE != "cpu", reason="the C++ extension on CPU tensors")
def test_cpu_results_do_not_depend_on_the_thread_count():
    est, mix = make_inputs(3, 6, 2, trailing=(2, 9000), dtype=torch.float32, seed=14)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpu", est, mix, metric="sisdr")
        torch.set_num_threads(max(2, threads))
        many = run("cpu", est, mix, metric="sisdr")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("metric", ["sisdr", "log_mse"])
def test_compiled_training_step_has_no_graph_break(impl, metric):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4 * 2 * 16).to(DEVICE)
    x, mixtures = torch.randn(3, 16, device=DEVICE), torch.randn(3, 2, 2, 16, device=DEVICE)

    def step(x, mixtures):
        est = model(x).view(3, 4, 2, 16)
        return nrt_kernels.mixit_loss(est, mixtures, metric=metric, impl=impl, return_assignment=True)

    torch._dynamo.reset()
    loss, assignment = torch.compile(step, fullgraph=True, backend="aot_eager")(x, mixtures)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    eager_loss, eager_assignment = step(x, mixtures)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    assert torch.equal(assignment, eager_assignment)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)
    explanation = torch._dynamo.explain(step)(x, mixtures)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("impl", FUSED)
def test_opcheck_custom_ops(impl):
    est, mix = make_inputs(2, 3, 2, trailing=(10,), seed=1)
    torch.library.opcheck(torch.ops.nrt_kernels.mixit_gram.default,
                          (est, mix, "generalized", "sisdr", True, 1e-8, 0.0, impl),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------------------------
# compat.MixITLossWrapper: asteroid's own loss objects are fused
# ----------------------------------------------------------------------------------------------


class MultiSrcNegSDR(torch.nn.Module):
    """The shape of asteroid 0.7.0's class: its attributes (its constructor stores EPS = 1e-8 whatever it is
    given) and its forward (3-D inputs only)."""

    def __init__(self, sdr_type, zero_mean=True, take_log=True, EPS=1e-8):
        super().__init__()
        self.sdr_type, self.zero_mean, self.take_log, self.EPS = sdr_type, zero_mean, take_log, 1e-8

    def forward(self, est_targets, targets):
        if targets.size() != est_targets.size() or targets.ndim != 3:
            raise TypeError(f"Inputs must be of shape [batch, n_src, time], got {targets.size()}")
        neg_sdr = reference.neg_sdr_per_example(est_targets, targets, self.sdr_type, self.zero_mean, self.EPS)
        return neg_sdr if self.take_log else -(10 ** (-neg_sdr / 10))  # the ratio (up to EPS), not in dB


class SingleSrcMSE(torch.nn.Module):  # asteroid's MultiSrcMSE is this class
    def forward(self, est_targets, targets):
        return ((targets - est_targets) ** 2).mean(dim=list(range(1, targets.ndim)))


class NonPitSDR(MultiSrcNegSDR):  # asteroid's legacy subclass
    pass


LooksLikeSDR = type("MultiSrcNegSDR", (SingleSrcMSE,), {"sdr_type": "sisdr", "zero_mean": True, "EPS": 1e-8,
                                                          "take_log": True})  # right name and fields, wrong loss


@pytest.mark.parametrize("loss_func,metric,options", [
    (MultiSrcNegSDR("sisdr"), "sisdr", {}), (MultiSrcNegSDR("sdsdr", zero_mean=False), "sdsdr", {"zero_mean": False}),
    (NonPitSDR("snr"), "snr", {}), (SingleSrcMSE(), "mse", {}), ("log_mse", "log_mse", {}),
])
@pytest.mark.parametrize("generalized", [True, False])
def test_wrapper_fuses_asteroids_losses(loss_func, metric, options, generalized):
    est, mix = make_inputs(3, 4, 2, trailing=(50,), seed=15)
    wrapper = compat.MixITLossWrapper(loss_func, generalized=generalized, impl=FUSED[0] if FUSED else "reference")
    assert wrapper.fused
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, est_mix = wrapper(est, mix, return_est=True)
    partitions = "generalized" if generalized else "equal"
    ref_loss, ref_est = reference.mixit_loss(est, mix, metric=metric, partitions=partitions, return_est=True,
                                             **options)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(est_mix, ref_est)
    if not isinstance(loss_func, str):
        # ... and equal to asteroid's loop over its own loss object.
        looped = reference.candidate_losses(est, mix, partitions, loss_func).min(1).values.mean()
        torch.testing.assert_close(loss, looped)
    rows = compat.MixITLossWrapper(loss_func, generalized=generalized, reduction="none")(est, mix)
    assert rows.shape == (3, 1)


@pytest.mark.parametrize("loss_func", [LooksLikeSDR(), MultiSrcNegSDR("sisdr", take_log=False)])
def test_wrapper_runs_other_losses_on_the_loop(loss_func):
    est, mix = make_inputs(2, 4, 2, trailing=(50,), seed=16)
    wrapper = compat.MixITLossWrapper(loss_func)
    assert not wrapper.fused
    with pytest.warns(UserWarning, match="reference loop"):
        loss = wrapper(est, mix)
    torch.testing.assert_close(loss, reference.candidate_losses(est, mix, "generalized", loss_func).min(1).values.mean())


def test_report_has_si_sdr_and_log_mse_rows_up_to_16_sources():
    from nrt_kernels.bench import cases

    names = [case.name for case in cases.build_cases((2, 4, 1, 64), max_sources=16)]
    assert [f"{metric}-{m}" for metric in ("sisdr", "log_mse") for m in range(2, 17)] == \
        [name for name in names if name.startswith(("sisdr-", "log_mse-"))]
    assert "mixit-12-equal" in names and "mixit-13-generalized" not in names  # the L1 keeps its own limit
    case = next(case for case in cases.build_cases((2, 4, 1, 64)) if case.name == "sisdr-3")
    inputs = cases.make_inputs(case, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(case.impl_loss(inputs, impl="reference"), case.reference_loss(inputs))
    assert case.candidates == 8 and case.op == mixit_gram.OP
