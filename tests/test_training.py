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


def modelema2_reference(model_states, decay, unbiased, start):
    """iSeparate's ModelEMA2, per tensor, out of place: for each state of the model in turn,
    ``count = count * decay + 1; w = 1 / count`` (``w = 1 - decay`` when biased) and, with its operations,
    ``p_ema = p_ema * (1 - w) + p * w``.  Returns the teacher's parameters and the count."""
    average = [tensor.clone() for tensor in start]
    count = 0.0
    for state in model_states:
        if unbiased:
            count = count * decay + 1
            weight = 1 / count
        else:
            weight = 1 - decay
        average = [torch.add(a * (1 - weight), p.to(a.dtype), alpha=weight) for a, p in zip(average, state)]
    return average, count


class MixedModel(nn.Module):
    """Parameters of several shapes and dtypes, a BatchNorm's buffers (one of them int64)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 5)
        self.half = nn.Linear(4, 3).to(torch.bfloat16)
        self.double = nn.Linear(3, 2).double()
        self.norm = nn.BatchNorm1d(3)


def perturbed_states(model, updates, seed=0):
    """Yield ``updates`` times after moving every parameter and buffer of ``model`` in place to new values."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(updates):
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(noise.to(tensor.dtype) if tensor.is_floating_point() else tensor + 1)
        yield [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("unbiased", [True, False])
def test_foreach_update_equals_modelema2_per_tensor_loop(unbiased):
    model = MixedModel()
    ema = EMATeacher(model, decay=0.8, unbiased=unbiased)
    start = [p.detach().clone() for p in ema.model.parameters()]
    states = []
    for state in perturbed_states(model, 5):
        ema.update(model)
        states.append(state)
    expected, count = modelema2_reference(states, 0.8, unbiased, start)
    assert ema.count == count  # the same float arithmetic; 0.0 when biased (the count is not advanced)
    truth, _ = modelema2_reference(states, 0.8, unbiased, [p.double() for p in start])  # the formula in float64
    scale = max(tensor.abs().max().item() for tensors in [*states, start] for tensor in tensors)
    for (name, actual), wanted, exact in zip(ema.model.named_parameters(), expected, truth):
        assert actual.dtype == wanted.dtype, name
        eps = torch.finfo(actual.dtype).eps
        error, modelema2_error = (actual.double() - exact).abs().max(), (wanted.double() - exact).abs().max()
        # lerp rounds once per update, ModelEMA2's mul_ + add_ twice: no further from the formula than it.
        assert error <= 5 * eps * scale and error <= modelema2_error + eps * scale, name
        if actual.dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(actual, wanted, rtol=4 * eps, atol=4 * eps * scale)
    for (name, actual), wanted in zip(ema.model.named_buffers(), model.buffers()):
        assert torch.equal(actual, wanted), name  # buffers are copied, including num_batches_tracked


def test_teacher_in_another_dtype_averages_in_its_own():
    # A bfloat16 model followed by a float32 teacher: the model's parameters are converted, then averaged.
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).to(torch.bfloat16)
    ema = EMATeacher(model, decay=0.5)
    ema.model.float()
    start = [p.detach().clone() for p in ema.model.parameters()]
    states = []
    for state in perturbed_states(model, 3):
        ema.update(model)
        states.append(state)
    expected, _ = modelema2_reference(states, 0.5, True, start)
    for actual, wanted in zip(ema.model.parameters(), expected):
        assert actual.dtype == torch.float32
        torch.testing.assert_close(actual, wanted, rtol=1.3e-6, atol=1e-7)


def test_buffers_fall_back_to_per_tensor_copies_without_foreach_copy(monkeypatch):
    import nrt_kernels.training as training

    monkeypatch.setattr(training, "_foreach_copy", None)
    model = MixedModel()
    ema = EMATeacher(model)
    next(perturbed_states(model, 1))
    ema.update(model)
    for actual, wanted in zip(ema.model.buffers(), model.buffers()):
        assert torch.equal(actual, wanted)


def test_models_that_do_not_match_the_teacher_raise_and_change_nothing():
    ema = EMATeacher(nn.Linear(3, 2), decay=0.5)
    before = {name: tensor.clone() for name, tensor in ema.model.state_dict().items()}
    with pytest.raises(ValueError, match="the model has 4 parameters, the teacher 2"):
        ema.update(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(2, 4\), the teacher.s \(2, 3\)"):
        ema.update(nn.Linear(4, 2))
    with_buffer = nn.Linear(3, 2)
    with_buffer.register_buffer("steps", torch.zeros(()))
    with pytest.raises(ValueError, match="the model has 1 buffers, the teacher 0"):
        ema.update(with_buffer)
    assert ema.count == 0.0
    assert all(torch.equal(ema.model.state_dict()[name], tensor) for name, tensor in before.items())


def test_ddp_and_compiled_models_are_unwrapped():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    model = MixedModel().float()
    compiled = torch.compile(model)  # compiles nothing until it is called
    assert isinstance(EMATeacher(compiled).model, MixedModel)
    # A real DistributedDataParallel over torch's in-process fake backend: no sockets (a one-process gloo group
    # hung here once in five runs on a busy machine); tests/test_ddp.py trains over gloo in two processes.
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(model)
        ema, plain = EMATeacher(wrapped, decay=0.7), EMATeacher(model, decay=0.7)
        assert isinstance(ema.model, MixedModel)
        for _ in perturbed_states(model, 2):
            ema.update(wrapped)
            plain.update(compiled)
    finally:
        dist.destroy_process_group()
    for actual, wanted in zip(ema.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(actual, wanted)


def test_teacher_split_over_devices_gets_a_group_per_device():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMATeacher(model, decay=0.6)
    ema.model[1:].to("meta")  # a second device without a GPU: no values, but a foreach group of its own
    start = [p.detach().clone() for p in ema.model[0].parameters()]
    states = []
    for state in perturbed_states(model, 3):
        ema.update(model)
        states.append(state[:2])
    expected, count = modelema2_reference(states, 0.6, True, start)
    assert ema.count == count
    for actual, wanted in zip(ema.model[0].parameters(), expected):
        torch.testing.assert_close(actual, wanted, rtol=1.3e-6, atol=1e-6)
    assert all(t.is_meta for t in [*ema.model[1].parameters(), *ema.model[2].buffers()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parameters_on_several_devices_and_a_teacher_on_the_cpu():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).cuda())  # e.g. a model split over devices
    on_devices, on_cpu = EMATeacher(model, decay=0.6), EMATeacher(model, decay=0.6)
    on_cpu.model.cpu()  # ModelEMA2(device="cpu")
    start = [p.detach().clone() for p in on_devices.model.parameters()]
    states = []
    for state in perturbed_states(model, 3):
        on_devices.update(model)
        on_cpu.update(model)
        states.append(state)
    expected, _ = modelema2_reference(states, 0.6, True, start)
    for actual, cpu, wanted in zip(on_devices.model.parameters(), on_cpu.model.parameters(), expected):
        assert actual.device == wanted.device and cpu.device.type == "cpu"
        torch.testing.assert_close(actual, wanted)
        torch.testing.assert_close(cpu, wanted.cpu())


def test_update_walks_tensors_in_parameters_and_buffers_order():
    from nrt_kernels.training import _modules, _tensors

    # Shared modules, a tied weight, a missing bias, nested containers: the walk EMATeacher.update makes lists
    # the tensors exactly as model.parameters() / model.buffers() do (its errors count in that order).
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.Sequential(nn.Linear(2, 3, bias=False), shared, nn.BatchNorm1d(3)),
                          nn.ModuleList([nn.Identity(), nn.Conv1d(3, 2, 1)]))
    model.tied = nn.Linear(2, 2)
    model.tied.weight = shared.weight
    parameters, buffers = _tensors(_modules(model))
    assert [id(p) for p in parameters] == [id(p) for p in model.parameters()]
    assert [id(b) for b in buffers] == [id(b) for b in model.buffers()]
    ema = EMATeacher(model, decay=0.5)
    next(perturbed_states(model, 1))
    ema.update(model)  # the unbiased first update copies the model
    for actual, wanted in zip(ema.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(actual, wanted)
    assert ema.model.tied.weight is ema.model[0].weight  # the copy keeps the tie
