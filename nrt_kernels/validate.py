"""Input checks shared by every backend: one copy, so every path fails the same way."""
from __future__ import annotations

import collections.abc
import math
import numbers
from typing import NamedTuple

import torch

from .assignments import GRAM_MAX_CANDIDATES, MAX_CANDIDATES, MAX_SOURCES, PARTITION_MODES, num_candidates
from .build_config import GRAM_MAX_SOURCES, GRAM_METRIC_CODES, PIT_MAX_EXHAUSTIVE_SOURCES, PIT_MAX_SOURCES, PIT_METRICS

REDUCTIONS = ("mean", "none")
# "l1" runs the subset-sum kernels; the others are bilinear in the signals and run through one Gram pass.
GRAM_METRICS = tuple(GRAM_METRIC_CODES)
METRICS = ("l1", *GRAM_METRICS)
# The options each metric reads (an option given to a metric that does not read it is an error, not ignored), and
# their defaults: asteroid's zero_mean=True and EPS=1e-8, Google's max_snr=30 dB (whose log stabilizer is 1e-8 too).
METRIC_OPTIONS = {"l1": (), "sisdr": ("zero_mean", "eps"), "sdsdr": ("zero_mean", "eps"), "snr": ("zero_mean", "eps"),
                  "mse": (), "log_mse": ("eps", "max_snr")}
OPTION_DEFAULTS = {"zero_mean": True, "eps": 1e-8, "max_snr": 30.0}
# (max sources, max candidates) per metric. L1 scores all 2**M subsets per element; the Gram metrics read M + N
# signals once per element and score candidates from the Gram alone, so 16 sources into 2 mixtures (65536
# candidates) or 8 into 3 (6561) cost one pass over the data plus a search independent of its length.
CANDIDATE_LIMITS = {metric: (GRAM_MAX_SOURCES, GRAM_MAX_CANDIDATES) for metric in GRAM_METRICS}
CANDIDATE_LIMITS["l1"] = (MAX_SOURCES, MAX_CANDIDATES)


class MetricOptions(NamedTuple):
    """The options of a MixIT metric after defaults: ``None`` where the metric does not read the option."""

    zero_mean: bool | None = None
    eps: float | None = None
    max_snr: float | None = None


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


# float8 types are floating point too, but no kernel reads them (and torch cannot promote or sum them).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in FLOAT_DTYPES)
        raise TypeError(f"{name} must have a floating-point dtype ({names}), got {tensor.dtype}")


def check_metric_options(metric: str, *, zero_mean=None, eps=None, max_snr=None) -> MetricOptions:
    """The metric's options with defaults filled in; an option the metric does not read raises ValueError."""
    check_choice("metric", metric, METRICS)
    if zero_mean is None and eps is None and max_snr is None:
        return _DEFAULT_OPTIONS[metric]  # the common call, without the dicts below (a small call is host-bound)
    given = {"zero_mean": zero_mean, "eps": eps, "max_snr": max_snr}
    reads = METRIC_OPTIONS[metric]
    for name, value in given.items():
        if value is not None and name not in reads:
            readers = [m for m, options in METRIC_OPTIONS.items() if name in options]
            raise ValueError(f"{name}={value!r} does not apply to metric={metric!r} (only to {', '.join(readers)}); "
                             f"leave it unset")
    options = {name: OPTION_DEFAULTS[name] if given[name] is None else given[name] for name in reads}
    if "zero_mean" in options and not isinstance(options["zero_mean"], bool):
        raise TypeError(f"zero_mean must be True or False, got {options['zero_mean']!r}")
    for name in ("eps", "max_snr"):
        if name not in options:
            continue
        value = options[name]
        if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
        options[name] = float(value)
    if "eps" in options and not (0 <= options["eps"] < math.inf):
        raise ValueError(f"eps must be finite and >= 0, got {options['eps']!r}")
    if "max_snr" in options and (math.isnan(options["max_snr"]) or options["max_snr"] == -math.inf):
        raise ValueError(f"max_snr must be a number of dB (inf for no threshold), got {options['max_snr']!r}")
    return MetricOptions(**options)


_DEFAULT_OPTIONS = {metric: MetricOptions(**{name: OPTION_DEFAULTS[name] for name in reads})
                    for metric, reads in METRIC_OPTIONS.items()}


def check_mixit_inputs(est: torch.Tensor, mixtures: torch.Tensor, *, metric="l1", partitions="generalized",
                       reduction="mean", zero_mean=None, eps=None, max_snr=None) -> MetricOptions:
    """Raise TypeError/ValueError naming the problem; return the metric's options when the call is valid."""
    for name, tensor in (("est", est), ("mixtures", mixtures)):
        check_float_tensor(name, tensor)
        if tensor.ndim < 3:
            raise ValueError(f"{name} must have shape (batch, sources or mixtures, *trailing) with at least one "
                             f"trailing dim, got shape {tuple(tensor.shape)}")
    options = check_metric_options(metric, zero_mean=zero_mean, eps=eps, max_snr=max_snr)
    check_choice("partitions", partitions, PARTITION_MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    if est.device != mixtures.device:
        raise ValueError(f"est and mixtures must be on the same device, got {est.device} and {mixtures.device}")
    if est.shape[0] != mixtures.shape[0]:
        raise ValueError(f"batch mismatch: est has {est.shape[0]} rows, mixtures has {mixtures.shape[0]}")
    if est.shape[2:] != mixtures.shape[2:]:
        raise ValueError(f"trailing dims mismatch: est has {tuple(est.shape[2:])}, mixtures has "
                         f"{tuple(mixtures.shape[2:])}")
    if est.numel() == 0 or mixtures.numel() == 0:
        raise ValueError(f"empty input: est has shape {tuple(est.shape)}, mixtures has shape {tuple(mixtures.shape)}")
    num_sources, num_mixtures = est.shape[1], mixtures.shape[1]
    max_sources, max_candidates = CANDIDATE_LIMITS[metric]
    if num_sources > max_sources:
        raise ValueError(f"at most {max_sources} sources are supported with metric={metric!r}, got {num_sources}")
    if partitions == "equal" and num_sources % num_mixtures != 0:
        raise ValueError(f'partitions="equal" needs the number of sources ({num_sources}) to be divisible by the '
                         f'number of mixtures ({num_mixtures}); use partitions="generalized"')
    count = num_candidates(num_sources, num_mixtures, partitions)
    if count > max_candidates:
        raise ValueError(f"too many candidate assignments: {num_sources} sources into {num_mixtures} mixtures "
                         f"({partitions}) gives {count}, the limit with metric={metric!r} is {max_candidates}")
    return options


# ----------------------------------------------------------------------------------------------
# Noise-robust losses (V1/V2): est and noisy targets (B, S, *), optional teacher targets.
# ----------------------------------------------------------------------------------------------

NOISE_ROBUST_TERMS = {"v1": ("l1", "mixit", "teacher"), "v2": ("l1", "consistency", "mixit", "teacher")}
NORMALIZATIONS = ("iseparate", "active")


def check_noise_robust_inputs(est, targets, teacher_targets=None, *, version="v1", weights=None,
                              normalize="iseparate", source_weights=None, first_mixture_size=None) -> None:
    """Raise TypeError/ValueError naming the problem; return nothing when the call is valid.

    ``first_mixture_size``: how many stems of a pairing form MixIT mixture 0; None for half of them."""
    check_choice("version", version, tuple(NOISE_ROBUST_TERMS))
    check_choice("normalize", normalize, NORMALIZATIONS)
    tensors = [("est", est), ("targets", targets)]
    if teacher_targets is not None:
        tensors.append(("teacher_targets", teacher_targets))
    for name, tensor in tensors:
        check_float_tensor(name, tensor)
        if tensor.shape != est.shape:
            raise ValueError(f"{name} must have the shape of est {tuple(est.shape)}, got {tuple(tensor.shape)}")
        if tensor.device != est.device:
            raise ValueError(f"{name} must be on the device of est ({est.device}), got {tensor.device}")
    if est.ndim < 3:
        raise ValueError(f"est must have shape (batch, sources, *trailing) with at least one trailing dim, got shape "
                         f"{tuple(est.shape)}")
    if est.numel() == 0:
        raise ValueError(f"empty input: est has shape {tuple(est.shape)}")
    num_sources = est.shape[1]
    if num_sources > MAX_SOURCES:
        raise ValueError(f"at most {MAX_SOURCES} sources are supported, got {num_sources}")
    names = NOISE_ROBUST_TERMS[version]
    if weights is None or len(weights) != len(names):
        raise ValueError(f"version {version!r} needs {len(names)} weights for the terms {names}, got {weights!r}")
    for name, weight in zip(names, weights):
        # The type test first: an ABC instance check costs microseconds, a lot for a loss call on small inputs.
        if type(weight) not in (int, float) and (isinstance(weight, torch.Tensor)
                                                 or not isinstance(weight, numbers.Real)):
            raise TypeError(f"weights must be Python numbers, got {type(weight).__name__} for the {name} term")
        if not weight >= 0 or weight == float("inf"):
            raise ValueError(f"weights must be finite and >= 0, got {weight!r} for the {name} term")
    if weights[names.index("mixit")] != 0 and first_mixture_size is None and num_sources % 2:
        raise ValueError(f"the MixIT term splits the {num_sources} noisy stems into two mixtures of equal size, so the "
                         f"number of sources must be even (or the MixIT weight 0), got {num_sources}")
    if source_weights is not None:
        check_source_weights(source_weights, num_sources)


def check_source_weights(source_weights, num_sources: int) -> None:
    """One finite, non-negative weight per source, not all 0: a sequence of numbers or a real tensor."""
    if isinstance(source_weights, torch.Tensor):
        if source_weights.dtype.is_complex or source_weights.dtype == torch.bool:
            raise TypeError(f"source_weights must be real numbers, got a {source_weights.dtype} tensor")
        count = source_weights.numel()
    else:
        if not isinstance(source_weights, collections.abc.Sequence) and not hasattr(source_weights, "__array__"):
            raise TypeError(f"source_weights must be a sequence of numbers or a tensor, got "
                            f"{type(source_weights).__name__}")
        count = len(source_weights)
        for index, weight in enumerate(source_weights):
            if isinstance(weight, torch.Tensor) or not isinstance(weight, numbers.Real):
                raise TypeError(f"source_weights must be numbers (or a tensor), got {type(weight).__name__} for "
                                f"source {index}")
    if count != num_sources:
        raise ValueError(f"source_weights needs one weight per source ({num_sources}), got {count}")
    # Values are checked on the host: lists and CPU tensors (a GPU tensor would cost a sync), not while
    # torch.compile traces (a data-dependent branch).
    if isinstance(source_weights, torch.Tensor):
        if source_weights.device.type != "cpu" or torch.compiler.is_compiling():
            return
        source_weights = source_weights.detach().reshape(-1).tolist()
    for index, weight in enumerate(source_weights):
        if not weight >= 0 or weight == float("inf"):
            raise ValueError(f"source_weights must be finite and >= 0, got {weight!r} for source {index}")
    if not any(source_weights):
        raise ValueError(f"source_weights must not all be 0 (the l1 and teacher terms are means weighted by them), "
                         f"got {list(source_weights)}")


def check_pairing_option(pairing, batch: int, num_sources: int, device: torch.device) -> None:
    """``pairing`` of the noise-robust loss (of est on ``device``): None, "per_example" or an explicit permutation
    tensor."""
    if isinstance(pairing, str):
        if pairing != "per_example":
            raise ValueError(f'pairing must be None, "per_example" or an integer tensor, got {pairing!r}')
    elif pairing is not None:
        check_pairing(pairing, batch, num_sources, device)


def check_pairing(pairing: torch.Tensor, batch: int, num_sources: int, device: torch.device) -> None:
    """An explicit pairing: a permutation of the sources, (S,) for the whole batch or (B, S) one per row, on the
    CPU (where ``torch.randperm`` draws it) or on ``device``, the device of est."""
    if not isinstance(pairing, torch.Tensor):
        raise TypeError(f'pairing must be None, "per_example" or an integer tensor, got {pairing!r}')
    if pairing.dtype.is_floating_point or pairing.dtype.is_complex or pairing.dtype == torch.bool:
        raise TypeError(f"pairing must be an integer tensor, got {pairing.dtype}")
    if pairing.shape not in ((num_sources,), (batch, num_sources)):
        raise ValueError(f"pairing must have shape ({num_sources},) or ({batch}, {num_sources}), got "
                         f"{tuple(pairing.shape)}")
    if pairing.device.type != "cpu" and pairing.device != torch.device(device):
        raise ValueError(f"pairing must be on the CPU or on the device of est ({device}), got {pairing.device}")
    # Checking the values needs them on the host: done for CPU pairings only (never a GPU sync) and not while
    # torch.compile traces (a data-dependent branch).
    # On the host as Python ints: a fifth of the host time of five small tensor ops (a small call is host-bound).
    if pairing.device.type == "cpu" and not torch.compiler.is_compiling():
        values = pairing.tolist()
        expected = list(range(num_sources))
        if any(sorted(row) != expected for row in (values if pairing.ndim == 2 else [values])):
            raise ValueError(f"pairing must be a permutation of 0..{num_sources - 1} (per row), got {values}")


# ----------------------------------------------------------------------------------------------
# PIT: est and targets (B, M, *), a pairwise metric, a permutation solver.
# ----------------------------------------------------------------------------------------------

SDR_METRICS = ("sisdr", "sdsdr", "snr")
PIT_SOLVERS = ("auto", "exhaustive", "hungarian")


def check_pit_inputs(est, targets, *, metric="sisdr", solver="auto", reduction="mean", zero_mean=True, eps=1e-8,
                     max_snr=30.0) -> None:
    """Raise TypeError/ValueError naming the problem; return nothing when the call is valid."""
    for name, tensor in (("est", est), ("targets", targets)):
        check_float_tensor(name, tensor)
        if tensor.ndim < 3:
            raise ValueError(f"{name} must have shape (batch, sources, *trailing) with at least one trailing dim, "
                             f"got shape {tuple(tensor.shape)}")
    check_choice("metric", metric, PIT_METRICS)
    check_choice("solver", solver, PIT_SOLVERS)
    check_choice("reduction", reduction, REDUCTIONS)
    if est.device != targets.device:
        raise ValueError(f"est and targets must be on the same device, got {est.device} and {targets.device}")
    if est.shape[0] != targets.shape[0]:
        raise ValueError(f"batch mismatch: est has {est.shape[0]} rows, targets has {targets.shape[0]}")
    if est.shape[1] != targets.shape[1]:
        raise ValueError(f"PIT needs as many estimates as targets: est has {est.shape[1]} sources, targets has "
                         f"{targets.shape[1]}")
    if est.shape[2:] != targets.shape[2:]:
        raise ValueError(f"trailing dims mismatch: est has {tuple(est.shape[2:])}, targets has "
                         f"{tuple(targets.shape[2:])}")
    if est.numel() == 0:
        raise ValueError(f"empty input: est has shape {tuple(est.shape)}")
    num_sources = est.shape[1]
    if num_sources > PIT_MAX_SOURCES:
        raise ValueError(f"at most {PIT_MAX_SOURCES} sources are supported, got {num_sources}")
    if solver == "exhaustive" and num_sources > PIT_MAX_EXHAUSTIVE_SOURCES:
        raise ValueError(f'solver="exhaustive" scores all {num_sources}! permutations and supports at most '
                         f'{PIT_MAX_EXHAUSTIVE_SOURCES} sources, got {num_sources}; use solver="hungarian" (exact, any '
                         f'M up to {PIT_MAX_SOURCES}) or "auto"')
    for name, value in (("eps", eps), ("max_snr", max_snr)):
        if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real) \
                or value != value or abs(value) == float("inf"):
            raise TypeError(f"{name} must be a finite Python number, got {value!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not isinstance(zero_mean, bool):
        raise TypeError(f"zero_mean must be True or False, got {zero_mean!r}")
    # Options that a metric does not read: a non-default value is a mistake worth saying.
    if metric not in SDR_METRICS and (zero_mean is not True or eps != 1e-8):
        raise ValueError(f"zero_mean and eps apply to the SDR metrics {SDR_METRICS} only, got zero_mean="
                         f"{zero_mean!r}, eps={eps!r} with metric={metric!r}")
    if metric != "log_mse" and max_snr != 30.0:
        raise ValueError(f'max_snr applies to metric="log_mse" only, got max_snr={max_snr!r} with metric={metric!r}')
