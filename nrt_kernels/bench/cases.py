"""What the report runs: cases (a loss on fixed inputs) and the impls that compute them.

A :class:`Case` is a name, its inputs, the reference loss (the asteroid / iSeparate-style loop of
:mod:`nrt_kernels.reference`) and how an nrt_kernels impl computes the same loss.  Cases come in families, one per
loss (:data:`FAMILIES`); an op adds its benchmark by writing one function that builds its cases and appending one
:class:`CaseFamily` to :data:`FAMILIES`: the CLI, the timers, the memory counters, the table, CSV and plot and the
pytest-benchmark suite (benchmarks/) then take it as they take the MixIT and V1/V2 cases.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from functools import partial
from typing import Callable

import torch

from .. import reference
from ..assignments import MAX_SOURCES, num_candidates
from ..build_config import GRAM_MAX_SOURCES
from ..backends import BACKEND_MODULES, IMPLS, resolve

BASELINE = "pytorch"
COMPILED = "torch.compile"
# Backends of the front-ends; "auto" is one of them and "reference" is the baseline row.
BACKENDS = tuple(impl for impl in IMPLS if impl not in ("auto", "reference"))

SHAPES = {
    # (batch, stems, channels, samples): "small" keeps the whole CPU report under 2 minutes on 2 cores.
    "small": (2, 4, 2, 8192),
    "tiny": (2, 4, 1, 256),
    # SDX23 training batches: 16 x 7 s stereo at 44.1 kHz.
    "sdx": (16, 4, 2, 308700),
}


class Draw:
    """Seeded inputs of one case on the report's device and dtype (drawn in float32 on the CPU, then moved)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.device, self.dtype = device, dtype
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, dtype=torch.float32).to(device=self.device,
                                                                                      dtype=self.dtype)

    def randperm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator).to(self.device)


@dataclasses.dataclass(frozen=True)
class Case:
    """One loss on fixed inputs, timed as forward + backward into ``inputs["est"]`` on every impl.

    ``inputs(draw)`` returns a dict holding ``"est"`` (the tensor whose gradient is timed) and whatever else the
    loss reads: tensors (floating ones count towards the minimal bytes) and plain options. ``reference_loss(inputs)``
    is the loop every row is compared with; ``impl_loss(inputs, impl)`` the same loss on an nrt_kernels impl.
    """

    name: str
    op: str  # the op of nrt_kernels.backends whose impls run it
    loss: str  # the family's name in the CSV ("mixit", "v1", ...)
    shape: tuple[int, ...]  # est (B, M, C, T)
    inputs: Callable[[Draw], dict]
    reference_loss: Callable[[dict], torch.Tensor]
    impl_loss: Callable[[dict, str], torch.Tensor]
    # Candidate assignments per row the loop scores one by one: torch.compile of the loop unrolls them all, so big
    # ones are not compiled.
    candidates: int = 1
    partitions: str = ""


@dataclasses.dataclass(frozen=True)
class CaseFamily:
    """The cases of one loss: ``build(shape, max_sources=...)`` from the report's (B, S, C, T) shape."""

    names: str  # how its case names look, for the report's footer and errors
    description: str  # one line for the report's footer
    build: Callable[..., list]
    quick: tuple[str, ...]  # the cases --quick runs


# ----------------------------------------------------------------------------------------------
# MixIT L1: M = 2..max_sources estimated sources against 2 mixtures
# ----------------------------------------------------------------------------------------------


def _mixit_inputs(shape: tuple[int, ...], draw: Draw) -> dict:
    batch, _, channels, length = shape
    return {"est": draw.randn(*shape), "mixtures": draw.randn(batch, 2, channels, length)}


def _mixit_reference(partitions: str, inputs: dict) -> torch.Tensor:
    return reference.mixit_loss(inputs["est"], inputs["mixtures"], partitions=partitions)


def _mixit_impl(partitions: str, inputs: dict, impl: str) -> torch.Tensor:
    from ..losses import mixit_loss

    return mixit_loss(inputs["est"], inputs["mixtures"], partitions=partitions, impl=impl)


def mixit_cases(shape: tuple[int, ...], *, max_sources: int = 8, min_sources: int = 2) -> list[Case]:
    batch, _, channels, length = shape
    cases = []
    for sources in range(min_sources, min(max_sources, MAX_SOURCES) + 1):
        for partitions in ("generalized", "equal"):
            if partitions == "equal" and sources % 2:
                continue
            case_shape = (batch, sources, channels, length)
            cases.append(Case(f"mixit-{sources}-{partitions}", "mixit_l1", "mixit", case_shape,
                              partial(_mixit_inputs, case_shape), partial(_mixit_reference, partitions),
                              partial(_mixit_impl, partitions), num_candidates(sources, 2, partitions), partitions))
    return cases


# ----------------------------------------------------------------------------------------------
# MixIT with SI-SDR and with Google's log-MSE (the Gram metrics): M = 2..max_sources (up to 16) into 2 mixtures
# ----------------------------------------------------------------------------------------------

GRAM_CASE_METRICS = ("sisdr", "log_mse")


def _gram_reference(metric: str, inputs: dict) -> torch.Tensor:
    # The loop over every candidate with asteroid's MultiSrcNegSDR / Google's log-MSE on each remix.
    return reference.mixit_loss(inputs["est"], inputs["mixtures"], metric=metric)


def _gram_impl(metric: str, inputs: dict, impl: str) -> torch.Tensor:
    from ..losses import mixit_loss

    return mixit_loss(inputs["est"], inputs["mixtures"], metric=metric, impl=impl)


def gram_cases(shape: tuple[int, ...], *, max_sources: int = 8, min_sources: int = 2) -> list[Case]:
    batch, _, channels, length = shape
    cases = []
    for metric in GRAM_CASE_METRICS:
        for sources in range(min_sources, min(max_sources, GRAM_MAX_SOURCES) + 1):
            case_shape = (batch, sources, channels, length)
            cases.append(Case(f"{metric}-{sources}", "mixit_gram", f"mixit-{metric}", case_shape,
                              partial(_mixit_inputs, case_shape), partial(_gram_reference, metric),
                              partial(_gram_impl, metric), num_candidates(sources, 2, "generalized"), "generalized"))
    return cases


# ----------------------------------------------------------------------------------------------
# PIT with SI-SDR: M = 2, 3, 4, 8 and, past asteroid's limit of 9, 16, 24, 32 estimates against M targets
# ----------------------------------------------------------------------------------------------

PIT_CASE_SOURCES = (2, 3, 4, 8, 16, 24, 32)
# asteroid's PITLossWrapper searches every permutation up to this many sources, and runs scipy's Hungarian above.
ASTEROID_FACTORIAL_SOURCES = 3


def _pit_inputs(shape: tuple[int, ...], draw: Draw) -> dict:
    return {"est": draw.randn(*shape), "targets": draw.randn(*shape)}


def _pit_reference(inputs: dict) -> torch.Tensor:
    # asteroid's PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx"): its (B, M, M, T) pairwise SI-SDR, then the
    # factorial search or scipy's linear_sum_assignment per row on the host.
    return reference.pit_loss(inputs["est"], inputs["targets"], metric="sisdr", solver="auto")


def _pit_impl(inputs: dict, impl: str) -> torch.Tensor:
    from ..losses import pit_loss

    return pit_loss(inputs["est"], inputs["targets"], metric="sisdr", impl=impl)


def pit_cases(shape: tuple[int, ...], *, max_sources: int = 8, min_sources: int = 2) -> list[Case]:
    batch, _, channels, length = shape
    cases = []
    for sources in PIT_CASE_SOURCES:
        if not min_sources <= sources <= max_sources:
            continue
        case_shape = (batch, sources, channels, length)
        # The loop scores permutations one by one only in its factorial search; scipy solves a row at once.
        searched = math.factorial(sources) if sources <= ASTEROID_FACTORIAL_SOURCES else 1
        cases.append(Case(f"pit-sisdr-{sources}", "pit", "pit-sisdr", case_shape, partial(_pit_inputs, case_shape),
                          _pit_reference, _pit_impl, searched))
    return cases


# ----------------------------------------------------------------------------------------------
# The noise-robust losses V1 / V2 with every term active
# ----------------------------------------------------------------------------------------------

# The weights of the schedule phase where every term runs (V1 epochs 101-200, V2 epochs 31-50).
PHASE_WEIGHTS = {"v1": (1.0, 2.0, 1.0), "v2": (0.5, 0.5, 2.0, 0.5)}


def _noise_robust_inputs(version: str, shape: tuple[int, ...], draw: Draw) -> dict:
    est = draw.randn(*shape)
    pairing = draw.randperm(shape[1])
    # V1's teacher term compares with the teacher's separation of the targets, V2's with that of the output
    # mixture; either way the loss reads one more (B, S, C, T) tensor.
    return {"est": est, "targets": draw.randn(*shape), "pairing": pairing, "weights": PHASE_WEIGHTS[version],
            "teacher_targets": draw.randn(*shape)}


def _noise_robust_loss(version: str, loss_of: Callable, inputs: dict) -> torch.Tensor:
    return loss_of(inputs["est"], inputs["targets"], version=version, weights=inputs["weights"],
                   teacher_targets=inputs["teacher_targets"], pairing=inputs["pairing"])


def _noise_robust_impl(version: str, inputs: dict, impl: str) -> torch.Tensor:
    from ..losses import noise_robust_loss

    return _noise_robust_loss(version, partial(noise_robust_loss, impl=impl), inputs)


def noise_robust_cases(shape: tuple[int, ...], **_) -> list[Case]:
    # One fixed pairing: the MixIT term searches the stems into 2 mixtures.
    return [Case(version, "noise_robust_l1", version, shape, partial(_noise_robust_inputs, version, shape),
                 partial(_noise_robust_loss, version, reference.noise_robust_loss),
                 partial(_noise_robust_impl, version), num_candidates(shape[1], 2, "generalized"))
            for version in ("v1", "v2")]


FAMILIES = [
    CaseFamily("mixit-M-generalized, mixit-M-equal (M even)",
               "MixIT L1 of M estimated sources against 2 mixtures (every assignment / M/2 each)",
               mixit_cases, ("mixit-2-generalized", "mixit-4-generalized", "mixit-4-equal")),
    CaseFamily("v1, v2", "the noise-robust losses, all terms active", noise_robust_cases, ("v1", "v2")),
    CaseFamily("sisdr-M, log_mse-M", "MixIT of M sources against 2 mixtures (every assignment) with asteroid's "
               "SI-SDR / Google's log-MSE (one Gram pass)", gram_cases, ("sisdr-4", "log_mse-4")),
    CaseFamily("pit-sisdr-M (M = 2, 3, 4, 8, 16, 24, 32)", "PIT of M estimates against M targets with asteroid's "
               "SI-SDR (its PITLossWrapper: factorial search up to 3, scipy's Hungarian above)", pit_cases,
               ("pit-sisdr-4",)),
]


def build_cases(shape: tuple[int, ...], max_sources: int = 8) -> list[Case]:
    return [case for family in FAMILIES for case in family.build(shape, max_sources=max_sources)]


def select_cases(cases: list[Case], patterns: str | None) -> list[Case]:
    if not patterns:
        return cases
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    return [case for case in cases if any(fnmatch.fnmatchcase(case.name, p) for p in wanted)]


def quick_patterns() -> str:
    return ",".join(name for family in FAMILIES for name in family.quick)


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    inputs = case.inputs(Draw(device, dtype, seed))
    inputs["est"].requires_grad_(True)
    return inputs


def input_tensors(inputs: dict) -> list[torch.Tensor]:
    """The floating-point tensors a loss reads (an integer pairing is too small to count)."""
    return [value for value in inputs.values() if isinstance(value, torch.Tensor) and value.is_floating_point()]


def min_bytes(inputs: dict) -> int:
    """Forward reads every input once; backward reads them again and writes grad est."""
    read = sum(t.numel() * t.element_size() for t in input_tensors(inputs))
    est = inputs["est"]
    return 2 * read + est.numel() * est.element_size()


# ----------------------------------------------------------------------------------------------
# The impls: the loop, torch.compile of it, and the nrt_kernels backends
# ----------------------------------------------------------------------------------------------


def loss_function(case: Case, impl: str) -> Callable[[dict], torch.Tensor]:
    """``f(inputs) -> scalar loss`` for this case on this impl ("pytorch" is the reference loop)."""
    if impl == BASELINE:
        return case.reference_loss
    return partial(case.impl_loss, impl=impl)


def compiled_reference(case: Case) -> Callable[[dict], torch.Tensor]:
    """torch.compile of the reference loop's forward over the case's tensors (options are constants); autograd
    runs inductor's compiled backward."""
    torch._dynamo.reset()
    compiled = {}

    def loss(inputs: dict) -> torch.Tensor:
        names = [name for name, value in inputs.items() if isinstance(value, torch.Tensor)]
        if "fn" not in compiled:
            options = {name: value for name, value in inputs.items() if name not in names}
            compiled["fn"] = torch.compile(
                lambda *tensors: case.reference_loss({**options, **dict(zip(names, tensors))}), dynamic=False)
        return compiled["fn"](*(inputs[name] for name in names))

    return loss


def has_backend(case: Case, impl: str) -> bool:
    return impl in (BASELINE, COMPILED) or (case.op, impl) in BACKEND_MODULES


def probe_backend(impl: str, device: torch.device, allow_triton_on_cpu: bool) -> str | None:
    """None when ``impl`` runs forward + backward of a small MixIT case on ``device``; otherwise why not."""
    if impl == "triton" and device.type != "cuda" and not allow_triton_on_cpu:
        return "Triton needs a GPU (the Triton interpreter is far too slow to benchmark; name it with --impl to force)"
    try:
        resolve("mixit_l1", impl, device.type)
        from ..losses import mixit_loss

        est = torch.randn(2, 3, 1, 64, device=device, requires_grad=True)
        torch.autograd.grad(mixit_loss(est, torch.randn(2, 2, 1, 64, device=device), impl=impl), est)
    except Exception as error:  # noqa: BLE001 - any failure means "not available here", with its message
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


IMPL_CHOICES = (BASELINE, "compile", *BACKENDS)


def unknown_impls(names: list[str]) -> list[str]:
    return [name for name in names if name not in (*IMPL_CHOICES, COMPILED)]


def available_impls(requested: list[str] | None, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(impls to run, {impl: why skipped}); ``requested`` None means every one that runs here."""
    names = requested or [BASELINE, COMPILED, *BACKENDS]
    chosen, skipped = [], {}
    for name in names:
        name = COMPILED if name == "compile" else name
        if name in (BASELINE, COMPILED):
            chosen.append(name)
            continue
        reason = probe_backend(name, device, allow_triton_on_cpu=requested is not None)
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    return chosen, skipped
