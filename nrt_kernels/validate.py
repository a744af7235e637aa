"""Input checks shared by every backend: one copy, so every path fails the same way."""
from __future__ import annotations

import torch

from .assignments import MAX_CANDIDATES, MAX_SOURCES, PARTITION_MODES, num_candidates

REDUCTIONS = ("mean", "none")
METRICS = ("l1",)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_mixit_inputs(est: torch.Tensor, mixtures: torch.Tensor, *, metric="l1", partitions="generalized",
                       reduction="mean") -> None:
    """Raise TypeError/ValueError naming the problem; return nothing when the call is valid."""
    for name, tensor in (("est", est), ("mixtures", mixtures)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype (float16, bfloat16, float32, float64), "
                            f"got {tensor.dtype}")
        if tensor.ndim < 3:
            raise ValueError(f"{name} must have shape (batch, sources or mixtures, *trailing) with at least one "
                             f"trailing dim, got shape {tuple(tensor.shape)}")
    check_choice("metric", metric, METRICS)
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
    if num_sources > MAX_SOURCES:
        raise ValueError(f"at most {MAX_SOURCES} sources are supported, got {num_sources}")
    if partitions == "equal" and num_sources % num_mixtures != 0:
        raise ValueError(f'partitions="equal" needs the number of sources ({num_sources}) to be divisible by the '
                         f'number of mixtures ({num_mixtures}); use partitions="generalized"')
    count = num_candidates(num_sources, num_mixtures, partitions)
    if count > MAX_CANDIDATES:
        raise ValueError(f"too many candidate assignments: {num_sources} sources into {num_mixtures} mixtures "
                         f"({partitions}) gives {count}, the limit is {MAX_CANDIDATES}")
