"""Exact resumption: TrainingState and python/train_noise_robust.py's --checkpoint / --resume / --save-state.

A run stopped after 2 epochs and resumed to 4 must end bitwise equal to one that ran 4 epochs straight: model,
teacher with its count, optimizer state, loop position and every generator.
"""
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nrt_kernels.training import EMATeacher, LossSchedule, TrainingState

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
import train_noise_robust  # noqa: E402

# Small enough for seconds on one thread; 3 iterations per epoch make the teacher's every-2nd-iteration phase
# shift across epochs, so a resumed global iteration counter matters.
TINY = ["--iterations", "3", "--examples", "16", "--length", "256", "--batch", "2", "--channels", "1",
        "--device", "cpu"]


def assert_bitwise_equal(actual, expected, where="state"):
    """Every tensor torch.equal (same dtype and shape), every other value ==, the same keys all the way down."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual, key=str) == sorted(expected, key=str), where
        for key in expected:
            assert_bitwise_equal(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_bitwise_equal(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_two_epochs_and_a_resume_to_four_equal_four_straight(tmp_path, version, one_thread, capsys):
    run = TINY + ["--version", version]
    train_noise_robust.main(run + ["--epochs", "4", "--checkpoint", str(tmp_path / "straight.pt"),
                                   "--save-state", str(tmp_path / "straight-final.pt")])
    train_noise_robust.main(run + ["--epochs", "2", "--schedule-epochs", "4", "--checkpoint",
                                   str(tmp_path / "stopped.pt")])
    torch.manual_seed(12345)  # a resumed process starts from whatever its generators hold
    random.seed(12345)
    train_noise_robust.main(run + ["--epochs", "4", "--resume", str(tmp_path / "stopped.pt"), "--checkpoint",
                                   str(tmp_path / "resumed.pt"), "--save-state", str(tmp_path / "resumed-final.pt")])
    assert "resumed from" in capsys.readouterr().out

    load = lambda name: torch.load(tmp_path / name, weights_only=True)  # noqa: E731
    straight, stopped, resumed = load("straight.pt"), load("stopped.pt"), load("resumed.pt")
    assert (stopped["epoch"], stopped["iteration"]) == (2, 6)
    assert (resumed["epoch"], resumed["iteration"]) == (4, 12)
    assert resumed["teacher"]["count"] == straight["teacher"]["count"] > stopped["teacher"]["count"]
    assert straight["optimizer"]["state"], "Adam's moments are part of what must match"
    assert_bitwise_equal(resumed, straight)
    assert_bitwise_equal(load("resumed-final.pt"), load("straight-final.pt"))
    final = load("straight-final.pt")
    assert sorted(final) == ["model", "teacher"]
    assert_bitwise_equal(final["teacher"], straight["teacher"]["state"])
    # The stopped run really is behind: otherwise the comparison above would prove nothing.
    assert not torch.equal(stopped["model"]["masks.weight"], straight["model"]["masks.weight"])


def test_a_resume_with_other_run_arguments_is_refused(tmp_path, one_thread):
    train_noise_robust.main(TINY + ["--epochs", "1", "--checkpoint", str(tmp_path / "run.pt")])
    with pytest.raises(SystemExit, match=r"--lr \(0.003 there, 0.01 here\)"):
        train_noise_robust.main(TINY + ["--epochs", "2", "--lr", "0.01", "--resume", str(tmp_path / "run.pt")])


class Noisy(nn.Module):
    """A model whose training draws from every kind of generator TrainingState restores."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)
        self.dropout = nn.Dropout(0.5)  # torch's global generator

    def forward(self, x):
        return self.dropout(self.norm(self.linear(x)))


def make_loop(seed=0):
    torch.manual_seed(seed)
    model = Noisy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    generators = {"data": torch.Generator().manual_seed(seed), "python": random.Random(seed),
                  "numpy": np.random.default_rng(seed), "legacy numpy": np.random.RandomState(seed)}
    state = TrainingState(model, optimizer, teacher=EMATeacher(model, decay=0.5), scheduler=scheduler,
                          schedule=LossSchedule.v1(), generators=generators)
    return state


def train_steps(state, steps):
    gens = state.generators
    for _ in range(steps):
        scale = gens["python"].random() + float(gens["numpy"].random()) + float(gens["legacy numpy"].rand())
        x = torch.randn(4, 3, generator=gens["data"]) * scale + random.random() + float(np.random.rand())
        loss = state.model(x).square().mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        state.teacher.update(state.model)
        state.iteration += 1


def test_training_state_restores_every_generator_scheduler_and_teacher(tmp_path):
    straight = make_loop()
    random.seed(1)
    np.random.seed(1)
    train_steps(straight, 6)

    stopped = make_loop()
    random.seed(1)
    np.random.seed(1)
    train_steps(stopped, 3)
    stopped.epoch, stopped.extra = 1, {"best": 0.5, "history": [1, 2]}
    stopped.save(tmp_path / "state.pt")
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    resumed = make_loop(seed=7)  # other initial weights and generators: all of it must be overwritten
    resumed.load(tmp_path / "state.pt")
    assert (resumed.epoch, resumed.iteration, resumed.extra) == (1, 3, {"best": 0.5, "history": [1, 2]})
    train_steps(resumed, 3)
    end, expected = resumed.state_dict(), straight.state_dict()
    end["epoch"], end["extra"] = expected["epoch"], expected["extra"]
    assert_bitwise_equal(end, expected)
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def test_training_state_refuses_a_state_that_does_not_fit(tmp_path):
    state = make_loop()
    saved = state.state_dict()
    model = Noisy()
    without_teacher = TrainingState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="only the saved state has a teacher"):
        without_teacher.load_state_dict(saved)
    other = make_loop()
    other.schedule = LossSchedule.v1().compressed(30)
    with pytest.raises(ValueError, match="schedule"):
        other.load_state_dict(saved)
    other = make_loop()
    other.generators.pop("numpy")
    with pytest.raises(ValueError, match="generators"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match="format"):
        state.load_state_dict({"model": {}})
    with pytest.raises(TypeError, match="generators must be"):
        TrainingState(model, torch.optim.SGD(model.parameters(), lr=0.1), generators={"bad": object()})
