"""nrt_kernels.training: schedules, the EMA teacher and its targets."""
import pytest
import torch
from torch import nn

from nrt_kernels.training import EMATeacher, LossSchedule, teacher_targets_v1, teacher_targets_v2


@pytest.mark.parametrize("epoch,expected", [
    (1, (1, 1, 0)), (100, (1, 1, 0)), (101, (1, 2, 1)), (200, (1, 2, 1)), (201, (0, 2, 1)), (1491, (0, 2, 1)),
])
def test_v1_schedule_boundaries(epoch, expected):
    assert LossSchedule.v1().weights(epoch) == expected


@pytest.mark.parametrize("epoch,expected", [
    (1, (1, 0, 2, 0)), (30, (1, 0, 2, 0)), (31, (0.5, 0.5, 2, 0.5)), (50, (0.5, 0.5, 2, 0.5)), (51, (0, 1, 2, 1)),
    (350, (0, 1, 2, 1)),
])
def test_v2_schedule_boundaries(epoch, expected):
    assert LossSchedule.v2().weights(epoch) == expected


def test_teacher_runs_every_second_global_iteration_when_weighted():
    schedule = LossSchedule.v1()
    assert schedule.iterations_per_epoch == 300 and LossSchedule.v2().iterations_per_epoch == 2500
    assert [schedule(150, i).teacher for i in range(5)] == [True, False, True, False, True]
    # Epochs 1-100 weight the teacher 0: it never runs, whatever the iteration.
    assert not any(schedule(100, i).teacher for i in range(4))
    # The counter is global (iSeparate's `iteration`), so an odd epoch length shifts the phase across epochs.
    assert schedule(101, 300).teacher and not schedule(101, 301).teacher
    assert schedule(101, 300).weights == (1, 2, 1)


def test_custom_table_and_invalid_schedules():
    schedule = LossSchedule([[1, 0], [0, 1]], [5], teacher_interval=3)
    assert schedule.weights(5) == (1, 0) and schedule.weights(6) == (0, 1)
    assert [schedule(6, i).teacher for i in range(4)] == [True, False, False, True]
    with pytest.raises(ValueError, match="milestones"):
        LossSchedule([[1, 0], [0, 1]], [5, 10])
    with pytest.raises(ValueError, match="increasing"):
        LossSchedule([[1], [1], [1]], [10, 5])
    with pytest.raises(ValueError, match="from 1"):
        schedule.weights(0)


def test_ema_values_after_k_updates_match_hand_computation():
    model = nn.Linear(3, 2)
    decay = 0.9
    ema = EMATeacher(model, decay=decay, unbiased=True)
    values = [torch.full_like(model.weight, float(k)) for k in (3, -1, 5, 2)]
    for value in values:
        with torch.no_grad():
            model.weight.copy_(value)
        ema.update(model)
    # count: 1, 1.9, 2.71, 3.439; weights 1/count; the first update copies the model.
    expected = torch.zeros_like(model.weight)
    count = 0.0
    for value in values:
        count = count * decay + 1
        expected = expected * (1 - 1 / count) + value / count
    torch.testing.assert_close(ema.model.weight, expected, rtol=1e-6, atol=1e-6)
    assert ema.count == pytest.approx(3.439)
    # Unbiased EMA after k updates = sum_j decay**(k-1-j) v_j / sum_j decay**(k-1-j).
    powers = [decay ** (3 - j) for j in range(4)]
    closed_form = sum(p * v for p, v in zip(powers, values)) / sum(powers)
    torch.testing.assert_close(ema.model.weight, closed_form, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_biased_ema_and_buffers_are_copied():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMATeacher(model, decay=0.75, unbiased=False)
    start = ema.model[0].bias.clone()
    with torch.no_grad():
        model[0].bias.fill_(4.0)
        model[1].running_mean.fill_(7.0)
    ema.update(model)
    torch.testing.assert_close(ema.model[0].bias, 0.75 * start + 0.25 * 4.0)
    torch.testing.assert_close(ema.model[1].running_mean, torch.full((2,), 7.0))


class SplitInTwo(nn.Module):
    """(N, C, T) -> (N, 2, C, T): a tiny "separator" with one weight."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.25))

    def forward(self, x):
        return torch.stack([self.gain * x, (1 - self.gain) * x.flip(-1)], dim=1)


class WithSeparate(SplitInTwo):
    def separate(self, x, patch_length=None):
        assert patch_length is None
        return self(x) + 1


def test_separate_runs_under_inference_mode_and_forwards_patch_length():
    ema = EMATeacher(SplitInTwo())
    x = torch.randn(3, 2, 5)
    out = ema.separate(x)
    assert out.is_inference() and out.shape == (3, 2, 2, 5)
    with pytest.raises(TypeError, match="patch_length"):
        ema.separate(x, patch_length=7)
    assert torch.equal(ema.separate(x, patch_length=None), out)
    with_separate = EMATeacher(WithSeparate())
    torch.testing.assert_close(with_separate.separate(x, patch_length=None), with_separate.model(x) + 1)


def test_teacher_targets_v1_sums_each_stems_separation():
    teacher = SplitInTwo()
    y = torch.randn(2, 4, 2, 9)
    calls = []

    def separate(x):
        calls.append(x.shape)
        return teacher(x)

    targets = teacher_targets_v1(separate, y)
    assert calls == [(8, 2, 9)]  # every stem of every row in one batched call
    expected = sum(teacher(y[:, s]) for s in range(4))
    torch.testing.assert_close(targets, expected.detach())
    assert targets.shape == (2, 2, 2, 9) and not targets.is_inference() and not targets.requires_grad


def test_teacher_targets_v2_separates_the_detached_output_mixture():
    teacher = SplitInTwo()
    est = torch.randn(2, 2, 3, 7, requires_grad=True)
    targets = teacher_targets_v2(EMATeacher(teacher).separate, est)
    torch.testing.assert_close(targets, teacher(est.detach().sum(1)).detach())
    assert not targets.requires_grad


def test_wrapped_models_are_unwrapped_and_state_round_trips():
    model = nn.Linear(2, 2)
    ema = EMATeacher(nn.DataParallel(model), decay=0.5)
    assert isinstance(ema.model, nn.Linear)
    ema.update(nn.DataParallel(model))
    ema.update(model)
    restored = EMATeacher(nn.Linear(2, 2), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.count == ema.count == pytest.approx(1.5)
    torch.testing.assert_close(restored.model.weight, ema.model.weight)
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(model, decay=1.0)
