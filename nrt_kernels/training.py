"""Training-loop pieces of iSeparate-SDX's noise-robust recipe: the EMA (mean) teacher, its targets, the schedules.

Typical step (see ``python/train_noise_robust.py``)::

    step = schedule(epoch, iteration)                 # weights of this epoch, teacher on this iteration?
    est = model(mixture)
    teacher = teacher_targets_v1(ema.separate, y) if step.teacher else None
    loss = criterion(est, y, weights=step.weights, teacher_targets=teacher)
    loss.backward(); optimizer.step(); ema.update(model); iteration += 1
"""
from __future__ import annotations

import bisect
import copy
import numbers
import operator
import os
import random
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel (and DataParallel) keep the real model in .module, torch.compile in ._orig_mod.
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _modules(model: nn.Module) -> list:
    """``list(model.modules())``: ``named_modules``' pre-order, each module once, without building the names
    (which on a CPU cost more than the foreach updates themselves)."""
    modules, stack, seen = [], [model], set()
    while stack:
        module = stack.pop()
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        modules.append(module)
        stack += reversed(module._modules.values())
    return modules


def _tensors(modules: list) -> tuple[list, list]:
    """``list(model.parameters()), list(model.buffers())`` of the model whose :func:`_modules` these are."""
    parameters, buffers = [], []
    for module in modules:
        parameters += module._parameters.values()
        buffers += module._buffers.values()
    return _present_once(parameters), _present_once(buffers)


def _present_once(tensors: list) -> list:
    # As parameters() / buffers() yield them: no None (Linear(bias=False)), a tensor shared by modules once.
    tensors = [tensor for tensor in tensors if tensor is not None]
    if len(set(map(id, tensors))) != len(tensors):
        tensors = list({id(tensor): tensor for tensor in tensors}.values())
    return tensors


def _check_pairs(online: list, average: list, what: str) -> None:
    if len(online) != len(average):
        raise ValueError(f"the model has {len(online)} {what}, the teacher {len(average)}: the teacher must be a "
                         f"copy of the model it follows")
    online_shapes, average_shapes = list(map(_shape, online)), list(map(_shape, average))
    if online_shapes != average_shapes:
        index = next(i for i, (a, b) in enumerate(zip(online_shapes, average_shapes)) if a != b)
        raise ValueError(f"the model's {what[:-1]} {index} has shape {tuple(online_shapes[index])}, the teacher's "
                         f"{tuple(average_shapes[index])}: the teacher must be a copy of the model it follows")


_shape, _device, _dtype = operator.attrgetter("shape"), operator.attrgetter("device"), operator.attrgetter("dtype")


def _group_by_target(sources: list, targets: list) -> list:
    """``[(sources, targets)]``, one group per device and dtype of the targets, every source converted to its
    target's: each group is one foreach call on uniform tensors (the fast path on CUDA)."""
    devices, dtypes = list(map(_device, targets)), list(map(_dtype, targets))
    if (targets and devices.count(devices[0]) == len(devices) and dtypes.count(dtypes[0]) == len(dtypes)
            and list(map(_dtype, sources)) == dtypes and list(map(_device, sources)) == devices):
        return [(sources, targets)]  # the usual case, without a Python loop over the tensors
    groups = {}
    for source, target, device, dtype in zip(sources, targets, devices, dtypes):
        if source.dtype != dtype or source.device != device:
            source = source.to(device=device, dtype=dtype)
        group = groups.setdefault((device, dtype), ([], []))
        group[0].append(source)
        group[1].append(target)
    return list(groups.values())


# torch._foreach_copy_ appeared in torch 2.1; before it, one copy_ per buffer.
_foreach_copy = getattr(torch, "_foreach_copy_", None)


class EMATeacher:
    """Exponential moving average of a model's parameters, used as the mean teacher.

    With ``unbiased=True`` (iSeparate's ``ModelEMA2``) the k-th update uses the weight ``1 / count_k`` with
    ``count_k = count_{k-1} * decay + 1``, so the first update copies the model and early averages are not
    biased towards the initial copy; otherwise the weight is ``1 - decay``.  Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9995, unbiased: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.unbiased = unbiased
        self.count = 0.0
        self._checked_pairing, self._checked_tensors = None, None
        self._teacher_modules = None
        self.model = copy.deepcopy(_unwrap(model)).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def update_weight(self) -> float:
        """Advance the count and return the weight of the online model in this update."""
        if not self.unbiased:
            return 1.0 - self.decay
        self.count = self.count * self.decay + 1.0
        return 1.0 / self.count

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average, ``p_ema = p_ema * (1 - w) + p * w`` for every parameter (``w`` from
        :meth:`update_weight`: ModelEMA2's formula), and a copy of every buffer.  One ``torch._foreach_lerp_``
        (``p_ema + w * (p - p_ema)``, one rounding of the result, computed in float32 for half dtypes) per
        (device, dtype) group of parameters and one ``_foreach_copy_`` per group of buffers, instead of two
        launches per tensor; within float32 rounding of ModelEMA2's ``mul_`` + ``add_`` (which round twice, and a
        foreach ``mul_`` would round (1 - w) to a half dtype: 0.9995 becomes 1.0 in bfloat16).  ``model`` may be
        wrapped in DDP / DataParallel / torch.compile; its parameters may live on other devices or in other
        dtypes than the teacher's (they are converted to the teacher's).  A model that does not match the teacher
        raises ValueError and changes nothing.  The teacher's module tree is walked once: to restructure it,
        assign a new ``self.model`` rather than new submodules."""
        model = _unwrap(model)
        online, online_buffers = _tensors(_modules(model))
        if self._teacher_modules is None or self._teacher_modules[0] is not self.model:
            self._teacher_modules = _modules(self.model)  # the teacher's tree is ours: walked once
        average, average_buffers = _tensors(self._teacher_modules)
        pairing = tuple(tuple(map(id, tensors)) for tensors in (online, average, online_buffers, average_buffers))
        if pairing != self._checked_pairing:
            _check_pairs(online, average, "parameters")
            _check_pairs(online_buffers, average_buffers, "buffers")
            # The shapes of the same tensors are checked once.  The checked tensors are kept referenced, so that
            # no new tensor can take one of their ids.
            self._checked_pairing, self._checked_tensors = pairing, (online, average, online_buffers, average_buffers)
        parameter_groups = _group_by_target(online, average)  # under no_grad: no detach needed
        buffer_groups = _group_by_target(online_buffers, average_buffers)
        weight = self.update_weight()  # only once every check has passed: a failed update changes nothing
        for sources, targets in parameter_groups:
            torch._foreach_lerp_(targets, sources, weight)
        for sources, targets in buffer_groups:
            if _foreach_copy is None:
                for source, target in zip(sources, targets):
                    target.copy_(source)
            else:
                _foreach_copy(targets, sources)

    def separate(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """The teacher's sources for input ``x``, under inference mode.  Keyword arguments (iSeparate's
        ``patch_length``) go to the model's own ``separate`` when it has one; otherwise the model is called."""
        with torch.inference_mode():
            if hasattr(self.model, "separate"):
                return self.model.separate(x, **kwargs)
            unused = {key: value for key, value in kwargs.items() if value is not None}
            if unused:
                raise TypeError(f"{type(self.model).__name__} has no separate() method to take {sorted(unused)}")
            return self.model(x)

    __call__ = separate

    def state_dict(self) -> dict:
        return {"state": self.model.state_dict(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        self.model.load_state_dict(state["state"])


def teacher_targets_v1(separate, targets: torch.Tensor) -> torch.Tensor:
    """V1 teacher targets: the teacher separates each noisy stem on its own (all B x S stems in one batched
    call) and its k-th outputs are summed over the stems: ``t_k = sum_s separate(y_s)[k]``, shape (B, K, *)."""
    batch, num_sources = targets.shape[:2]
    with torch.inference_mode():
        outputs = separate(targets.detach().reshape(batch * num_sources, *targets.shape[2:]))
    # Summed outside inference mode: the result is an ordinary tensor that autograd may save.
    return outputs.reshape(batch, num_sources, *outputs.shape[1:]).sum(1)


def teacher_targets_v2(separate, est: torch.Tensor) -> torch.Tensor:
    """V2 teacher targets: the teacher separates the detached output mixture ``sum_s est_s``, shape (B, K, *)."""
    with torch.inference_mode():
        return separate(est.detach().sum(1))


@dataclass(frozen=True)
class ScheduleStep:
    weights: tuple  # one weight per loss term, in the loss version's term order
    teacher: bool  # whether this iteration computes the teacher targets (and so the teacher term)


class LossSchedule:
    """Loss weights by epoch and the teacher term's cadence, as iSeparate's ``train_dist.py``.

    ``weights(epoch)`` (1-based epoch) is ``table[bisect_right(milestones, epoch - 1)]``: with milestones
    ``[100, 200]`` epochs 1-100 use row 0, 101-200 row 1, 201+ row 2.  ``teacher_enabled(iteration)`` is true
    every ``teacher_interval``-th global iteration (0-based, counted across epochs: 0, 2, 4, ... for 2).
    ``schedule(epoch, iteration)`` gives both; ``teacher`` is false where the teacher weight is 0.
    """

    def __init__(self, table, milestones, teacher_interval: int = 1, iterations_per_epoch: int | None = None,
                 epochs: int | None = None):
        table = [tuple(row) for row in table]
        milestones = list(milestones)
        if len(table) != len(milestones) + 1:
            raise ValueError(f"a table of {len(table)} rows needs {len(table) - 1} milestones, got {milestones}")
        if any(len(row) != len(table[0]) for row in table):
            raise ValueError(f"every row of the table needs the same number of weights, got {table}")
        if any(not isinstance(w, numbers.Real) or not w >= 0 for row in table for w in row):
            raise ValueError(f"weights must be numbers >= 0, got {table}")
        if milestones != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {milestones}")
        if teacher_interval < 1:
            raise ValueError(f"teacher_interval must be >= 1, got {teacher_interval}")
        self.table = table
        self.milestones = milestones
        self.teacher_interval = teacher_interval
        self.iterations_per_epoch = iterations_per_epoch
        self.epochs = epochs

    @classmethod
    def v1(cls) -> "LossSchedule":
        """Wavelet-HTDemucs: [l1, mixit, teacher] = [1,1,0] (epochs 1-100), [1,2,1] (101-200), [0,2,1] (201+);
        teacher every 2nd iteration; 300 iterations per epoch; a run of 300 epochs (100 per phase)."""
        return cls([[1, 1, 0], [1, 2, 1], [0, 2, 1]], [100, 200], teacher_interval=2, iterations_per_epoch=300,
                   epochs=300)

    @classmethod
    def v2(cls) -> "LossSchedule":
        """DWT-Transformer-UNet: [l1, consistency, mixit, teacher] = [1,0,2,0] (epochs 1-30),
        [0.5,0.5,2,0.5] (31-50), [0,1,2,1] (51+); teacher every 2nd iteration; 2500 iterations per epoch; a run
        of 70 epochs, 20 in the last phase (iSeparate does not say how long it ran; its config allows 350, and it
        saw V2 turn unstable when trained longer)."""
        return cls([[1, 0, 2, 0], [0.5, 0.5, 2, 0.5], [0, 1, 2, 1]], [30, 50], teacher_interval=2,
                   iterations_per_epoch=2500, epochs=70)

    def compressed(self, epochs: int) -> "LossSchedule":
        """The same table with its milestones scaled from this schedule's run of ``self.epochs`` epochs to one of
        ``epochs`` (each milestone at least 1): for short runs that pass through every phase."""
        if self.epochs is None:
            raise ValueError("compressed() needs the schedule's run length: construct it with epochs=")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        milestones = [max(1, round(m * epochs / self.epochs)) for m in self.milestones]
        return LossSchedule(self.table, milestones, teacher_interval=self.teacher_interval, epochs=epochs)

    def weights(self, epoch: int) -> tuple:
        if epoch < 1:
            raise ValueError(f"epochs are counted from 1, got {epoch}")
        return self.table[bisect.bisect_right(self.milestones, epoch - 1)]

    def teacher_enabled(self, iteration: int) -> bool:
        return iteration % self.teacher_interval == 0

    def __call__(self, epoch: int, iteration: int) -> ScheduleStep:
        weights = self.weights(epoch)
        return ScheduleStep(weights, weights[-1] != 0 and self.teacher_enabled(iteration))


def _generator_state(generator):
    """The state of a torch.Generator, a random.Random or a numpy Generator / RandomState, in types that
    ``torch.load(weights_only=True)`` reads back (tensors, numbers, strings, tuples, lists, dicts)."""
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, random.Random):
        return generator.getstate()
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(generator, numpy.random.Generator):
        return generator.bit_generator.state
    if numpy is not None and isinstance(generator, numpy.random.RandomState):
        return _numpy_legacy_state(generator.get_state(legacy=False))
    raise TypeError(f"generators must be torch.Generator, random.Random or numpy.random.Generator / RandomState, "
                    f"got {type(generator).__name__}")


def _set_generator_state(generator, state) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, random.Random):
        generator.setstate(state)
    elif isinstance(generator, sys.modules["numpy"].random.Generator):
        generator.bit_generator.state = state
    else:
        generator.set_state(_numpy_legacy_state(state, restore=True))


def _numpy_legacy_state(state: dict, restore: bool = False) -> dict:
    # MT19937's key is a uint32 array, which weights_only loading refuses: it travels as a list of ints.
    inner = dict(state["state"])
    if restore:
        import numpy

        inner["key"] = numpy.asarray(inner["key"], dtype=numpy.uint32)
    else:
        inner["key"] = inner["key"].tolist()
    return {**state, "state": inner}


def _schedule_config(schedule: LossSchedule) -> dict:
    return {"table": [list(row) for row in schedule.table], "milestones": list(schedule.milestones),
            "teacher_interval": schedule.teacher_interval}


class TrainingState:
    """Everything a training loop needs to continue exactly where it stopped, gathered and restored in one place:
    the model, the optimizer, the LR scheduler (if any), the EMA teacher with its count, the loop's position
    (``epoch``: epochs completed; ``iteration``: global iterations completed, the counter
    :class:`LossSchedule`'s teacher cadence reads), every global generator (torch's CPU generator, the CUDA
    generators once CUDA is initialised, python's ``random``, numpy's global one once numpy is imported) and the
    loop's own generators (``generators={"batches": torch.Generator(), ...}``: data order, pairings, noise).
    ``extra`` is a dict of the loop's own numbers, strings, lists or dicts, saved and restored with the rest.

    A loop that resumes from ``save``'s file with the same objects built the same way ends bitwise equal to one
    that never stopped, on the same device and torch version (tests/test_resume.py)::

        state = TrainingState(model, optimizer, teacher=ema, schedule=schedule, generators={"batches": gen})
        if resume: state.load(path)
        for epoch in range(state.epoch + 1, epochs + 1):
            for _ in range(iterations):
                step = schedule(epoch, state.iteration); ...; state.iteration += 1
            state.epoch = epoch
            state.save(path)

    Under DistributedDataParallel every rank has its own generator states: save one file per rank.
    """

    FORMAT = 1

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, teacher: EMATeacher | None = None,
                 scheduler=None, schedule: LossSchedule | None = None, generators: dict | None = None):
        self.model = model
        self.optimizer = optimizer
        self.teacher = teacher
        self.scheduler = scheduler
        self.schedule = schedule
        self.generators = dict(generators or {})
        for generator in self.generators.values():
            _generator_state(generator)  # a TypeError now rather than at the first save
        self.epoch = 0
        self.iteration = 0
        self.extra = {}

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if "numpy" in sys.modules:
            rng["numpy"] = _numpy_legacy_state(sys.modules["numpy"].random.get_state(legacy=False))
        state = {
            "format": self.FORMAT,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "generators": {name: _generator_state(generator) for name, generator in self.generators.items()},
            "extra": copy.deepcopy(self.extra),
        }
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.schedule is not None:
            state["schedule"] = _schedule_config(self.schedule)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore everything :meth:`state_dict` gathered.  Raises ValueError, before changing anything, when the
        state does not fit this loop (a teacher, scheduler or generator on one side only, another schedule)."""
        if state.get("format") != self.FORMAT:
            raise ValueError(f"not a TrainingState of format {self.FORMAT} (format {state.get('format')!r})")
        for name, present in (("teacher", self.teacher), ("scheduler", self.scheduler), ("schedule", self.schedule)):
            if (name in state) != (present is not None):
                where = "the saved state" if name in state else "this loop"
                raise ValueError(f"only {where} has a {name}: build the loop with the objects it was saved with")
        if sorted(state["generators"]) != sorted(self.generators):
            raise ValueError(f"the saved state has generators {sorted(state['generators'])}, this loop "
                             f"{sorted(self.generators)}")
        if self.schedule is not None and state["schedule"] != _schedule_config(self.schedule):
            raise ValueError(f"the saved state was trained with the schedule {state['schedule']}, this loop has "
                             f"{_schedule_config(self.schedule)}")
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for name, generator in self.generators.items():
            _set_generator_state(generator, state["generators"][name])
        self._set_global_rng(state["rng"])
        self.epoch = state["epoch"]
        self.iteration = state["iteration"]
        self.extra = copy.deepcopy(state["extra"])

    @staticmethod
    def _set_global_rng(rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "numpy" in rng:
            import numpy

            numpy.random.set_state(_numpy_legacy_state(rng["numpy"], restore=True))
        if "cuda" in rng:
            saved = len(rng["cuda"])
            present = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if present != saved:
                warnings.warn(f"the state holds the generators of {saved} CUDA devices, this process sees "
                              f"{present}: their draws will not continue where they stopped", stacklevel=3)
            if present:
                torch.cuda.set_rng_state_all(rng["cuda"][:present])

    def save(self, path) -> None:
        """Write :meth:`state_dict` with ``torch.save``, through a temporary file: a run killed while saving
        leaves the previous checkpoint intact."""
        path = os.fspath(path)
        temporary = f"{path}.tmp"
        torch.save(self.state_dict(), temporary)
        os.replace(temporary, path)

    def load(self, path, map_location="cpu") -> None:
        """Read a file :meth:`save` wrote (``torch.load(weights_only=True)``: nothing but tensors and plain data
        is unpickled) and restore it.  Tensors are copied into the model's and optimizer's own devices."""
        self.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))

