"""nrt_kernels.compat.MixITnL1nMeanTeacher(V2) against a plain-PyTorch transcription of iSeparate-SDX's losses.

The transcription below follows iSeparate's ``iSeparate/losses/pairwise.py`` step by step (asteroid's generalized
MixIT with a per-example L1 written as a brute-force loop), so a seeded call of both draws the same pairing.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from tolerances import LOSS_TOLERANCE

from nrt_kernels import NoiseRobustLoss, backends
from nrt_kernels.compat import MixITnL1nMeanTeacher, MixITnL1nMeanTeacherV2
from nrt_kernels.validate import NOISE_ROBUST_TERMS


def iseparate_l1(output, target):
    output, target = output.float(), target.float()
    weights = output.new_ones(output.shape[1])
    loss = F.l1_loss(output, target, reduction="none").mean(dim=tuple(range(2, output.dim()))).mean(0)
    return (loss * weights).sum() / weights.sum()


def asteroid_generalized_mixit(est, mixtures):
    num_sources = est.shape[1]
    losses = []
    for assignment in itertools.product(range(2), repeat=num_sources):
        remix = torch.stack([sum((est[:, s] for s in range(num_sources) if assignment[s] == n),
                                 torch.zeros_like(est[:, 0])) for n in range(2)], dim=1)
        losses.append((remix - mixtures).abs().flatten(1).mean(1))
    return torch.stack(losses, dim=1).min(dim=1).values.mean()


def random_pair_mixtures(y):
    perm = torch.randperm(y.shape[1])
    return torch.stack([y[:, perm[:2]].sum(dim=1), y[:, perm[2:]].sum(dim=1)], dim=1)


def iseparate_v1(outputs, targets, ema_model=None, weights=None, mean_teacher_enable=False):
    weights = [1, 0, 0] if weights is None else weights
    loss = 0
    if weights[0] != 0:
        loss += weights[0] * iseparate_l1(outputs["y_hat"], targets["y"])
    if weights[1] != 0:
        loss += weights[1] * asteroid_generalized_mixit(outputs["y_hat"], random_pair_mixtures(targets["y"]))
    if weights[2] != 0 and ema_model is not None and mean_teacher_enable:
        with torch.inference_mode():
            y = targets["y"]
            batch, num_sources = y.shape[:2]
            separated = ema_model.separate(y.detach().reshape(batch * num_sources, *y.shape[2:]), patch_length=None)
            teacher = separated.reshape(batch, num_sources, *separated.shape[1:]).sum(dim=1)
        loss += weights[2] * iseparate_l1(outputs["y_hat"], teacher)
    return loss / sum(weights)


def iseparate_v2(outputs, targets, ema_model=None, weights=None, mean_teacher_enable=False):
    weights = [1, 1, 0, 0, 0] if weights is None else weights
    divisor = 0
    loss = 0
    if weights[0] != 0:
        loss += weights[0] * iseparate_l1(outputs["y_hat"], targets["y"])
        divisor += weights[0]
    if weights[1] != 0:
        loss += weights[1] * F.l1_loss(outputs["y_hat"].sum(dim=1), targets["y"].sum(dim=1))
        divisor += weights[1]
    if weights[2] != 0:
        loss += weights[2] * asteroid_generalized_mixit(outputs["y_hat"], random_pair_mixtures(targets["y"]))
        divisor += weights[2]
    if weights[3] != 0 and ema_model is not None and mean_teacher_enable:
        with torch.inference_mode():
            teacher = ema_model.separate(outputs["y_hat"].detach().sum(dim=1), patch_length=None)
        loss += weights[3] * iseparate_l1(outputs["y_hat"], teacher)
        divisor += weights[3]
    return loss / divisor


class FakeTeacher:
    """iSeparate's EMA model interface: ``separate(x (N, C, T), patch_length=None) -> (N, S, C, T)``."""

    def __init__(self, sources=4):
        self.gains = torch.tensor([0.5, -1.0, 0.25, 2.0, -0.75, 1.5])[:sources]

    def separate(self, x, patch_length=None):
        assert patch_length is None
        return self.gains.view(1, -1, 1, 1) * x[:, None] + 0.125 * x.flip(-1)[:, None]


def inputs(seed, sources=4):
    gen = torch.Generator().manual_seed(seed)
    est = torch.randn(2, sources, 2, 50, generator=gen)
    y = torch.randn(2, sources, 2, 50, generator=gen)
    return est, y


def run(loss_module, est, y, seed, **kwargs):
    est = est.clone().requires_grad_(True)
    torch.manual_seed(seed)
    loss = loss_module({"y_hat": est}, {"y": y}, **kwargs)
    (grad,) = torch.autograd.grad(loss, est)
    return loss, grad


V1_WEIGHTS = [[1, 1, 0], [1, 2, 1], [0, 2, 1], None]
V2_WEIGHTS = [[1, 0, 2, 0], [0.5, 0.5, 2, 0.5], [0, 1, 2, 1], [1, 1, 2, 1, 0], None]


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("teacher_on", [True, False])
@pytest.mark.parametrize("version,weights", [("v1", w) for w in V1_WEIGHTS] + [("v2", w) for w in V2_WEIGHTS])
def test_matches_iseparate_transcription(version, weights, teacher_on, impl):
    module = MixITnL1nMeanTeacher(impl=impl) if version == "v1" else MixITnL1nMeanTeacherV2(impl=impl)
    transcription = iseparate_v1 if version == "v1" else iseparate_v2
    est, y = inputs(seed=len(weights or []) + 3 * teacher_on)
    kwargs = dict(ema_model=FakeTeacher(), weights=weights, mean_teacher_enable=teacher_on)
    loss, grad = run(module, est, y, seed=11, **kwargs)
    expected_loss, expected_grad = run(transcription, est, y, seed=11, **kwargs)
    rtol, atol = LOSS_TOLERANCE[torch.float32]
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_without_ema_model_the_teacher_term_is_skipped(version):
    module = MixITnL1nMeanTeacher(impl="triton") if version == "v1" else MixITnL1nMeanTeacherV2(impl="triton")
    transcription = iseparate_v1 if version == "v1" else iseparate_v2
    weights = [1, 2, 1] if version == "v1" else [0.5, 0.5, 2, 0.5]
    est, y = inputs(seed=21)
    loss, grad = run(module, est, y, seed=4, weights=weights, mean_teacher_enable=True)
    expected_loss, expected_grad = run(transcription, est, y, seed=4, weights=weights, mean_teacher_enable=True)
    rtol, atol = LOSS_TOLERANCE[torch.float32]
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=atol)


def test_pairing_is_drawn_before_the_teacher_runs():
    # A teacher that consumes the global generator must not change which pairing the MixIT term uses.
    class RandomTeacher(FakeTeacher):
        def separate(self, x, patch_length=None):
            torch.rand(1)
            return super().separate(x, patch_length)

    est, y = inputs(seed=22)
    kwargs = dict(ema_model=RandomTeacher(), weights=[1, 2, 1], mean_teacher_enable=True)
    loss, _ = run(MixITnL1nMeanTeacher(impl="triton"), est, y, seed=8, **kwargs)
    expected, _ = run(iseparate_v1, est, y, seed=8, **kwargs)
    rtol, atol = LOSS_TOLERANCE[torch.float32]
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl", ["triton", "cpu", "reference"])
@pytest.mark.parametrize("sources", [2, 3, 5, 6])
@pytest.mark.parametrize("version,weights", [("v1", [1, 2, 1]), ("v1", [1, 0, 1]), ("v2", [0.5, 0.5, 2, 0.5]),
                                             ("v2", [1, 1, 0, 1])])
def test_any_number_of_stems_splits_like_iseparate(version, weights, sources, impl):
    # iSeparate forms mixture 0 from perm[:2] and mixture 1 from perm[2:] for any S, and computes the loss for
    # odd S; the native NoiseRobustLoss splits S/2 + S/2 and needs an even S only for its MixIT term.
    try:
        backends.resolve("noise_robust_l1", impl, "cpu")
    except backends.BackendUnavailable as error:
        pytest.skip(str(error))
    module = MixITnL1nMeanTeacher(impl=impl) if version == "v1" else MixITnL1nMeanTeacherV2(impl=impl)
    transcription = iseparate_v1 if version == "v1" else iseparate_v2
    est, y = inputs(seed=sources, sources=sources)
    kwargs = dict(ema_model=FakeTeacher(sources), weights=weights, mean_teacher_enable=True)
    loss, grad = run(module, est, y, seed=5, **kwargs)
    expected_loss, expected_grad = run(transcription, est, y, seed=5, **kwargs)
    rtol, atol = LOSS_TOLERANCE[torch.float32]
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=atol)

    native = NoiseRobustLoss(version, impl=impl)
    mixit_weight = weights[NOISE_ROBUST_TERMS[version].index("mixit")]
    if sources % 2 and mixit_weight:
        with pytest.raises(ValueError, match="must be even"):
            native(est, y, weights=weights)
    elif not mixit_weight:
        torch.testing.assert_close(native(est, y, weights=weights), run(transcription, est, y, seed=5,
                                                                        weights=weights)[0], rtol=rtol, atol=atol)
