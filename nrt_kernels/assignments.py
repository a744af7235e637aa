"""Candidate assignments of sources to mixtures: the one place that knows their order.

A candidate assigns every one of the ``M`` estimated sources to one of the ``N``
mixtures.  Every backend scores the candidates in the order given here and keeps
the first minimum, so the order decides how ties resolve.

``"generalized"``
    Every assignment (``N**M`` candidates, empty groups allowed).  Mixture 0 takes
    ``k = 0..M`` sources in ``itertools.combinations`` order, the remaining sources
    are split the same way among the remaining mixtures, and the last mixture takes
    what is left.  For ``N = 2`` this is exactly asteroid's ``generalized=True``
    order (``MixITLossWrapper.best_part_mixit_generalized``).
``"equal"``
    Groups of ``M // N`` sources each, in asteroid's ``generalized=False`` order
    (``best_part_mixit``: recursive combinations).  ``M % N != 0`` is an error.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch

PARTITION_MODES = ("generalized", "equal")

# Scoring is cheap per candidate, but the tables, the per-row search and the
# reference loop grow as N**M; 4096 covers M <= 12 sources into 2 mixtures and
# M <= 7 into 3 (generalized), far beyond what separation models produce.
MAX_CANDIDATES = 4096
# The fused kernels score every subset of sources (2**M of them) per mixture.
MAX_SOURCES = 12
# The Gram metrics (SI-SDR, SD-SDR, SNR, MSE, log-MSE) score a candidate from the Gram matrix alone, so the
# search costs O(N * M**2) per candidate whatever the signal length: 65536 covers 16 sources into 2 mixtures,
# 10 into 3 and 8 into 4.  (Their source limit, shared with the C++ kernels, is build_config.GRAM_MAX_SOURCES.)
GRAM_MAX_CANDIDATES = 65536


def num_candidates(num_sources: int, num_mixtures: int, partitions: str) -> int:
    if partitions == "generalized":
        return num_mixtures**num_sources
    group = num_sources // num_mixtures
    count = 1
    remaining = num_sources
    for _ in range(num_mixtures):
        count *= math.comb(remaining, group)
        remaining -= group
    return count




def _generalized_groups(sources: tuple[int, ...], num_mixtures: int):
    if num_mixtures == 1:
        yield (sources,)
        return
    for size in range(len(sources) + 1):
        for group in itertools.combinations(sources, size):
            rest = tuple(s for s in sources if s not in group)
            for tail in _generalized_groups(rest, num_mixtures - 1):
                yield (group, *tail)


def _equal_groups(sources: tuple[int, ...], group_size: int, num_mixtures: int):
    if num_mixtures == 0:
        yield ()
        return
    for group in itertools.combinations(sources, group_size):
        rest = tuple(s for s in sources if s not in group)
        for tail in _equal_groups(rest, group_size, num_mixtures - 1):
            yield (group, *tail)


@functools.lru_cache(maxsize=None)
def candidate_groups(num_sources: int, num_mixtures: int, partitions: str) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """All candidates in scoring order; candidate ``c`` lists, per mixture, its sources."""
    sources = tuple(range(num_sources))
    if partitions == "generalized":
        return tuple(_generalized_groups(sources, num_mixtures))
    if partitions == "equal":
        return tuple(_equal_groups(sources, num_sources // num_mixtures, num_mixtures))
    raise ValueError(f"partitions must be one of {PARTITION_MODES}, got {partitions!r}")


@functools.lru_cache(maxsize=None)
def _tables_cpu(num_sources: int, num_mixtures: int, partitions: str) -> tuple[torch.Tensor, torch.Tensor]:
    groups = candidate_groups(num_sources, num_mixtures, partitions)
    masks = torch.tensor(
        [[sum(1 << s for s in group) for group in candidate] for candidate in groups], dtype=torch.int32
    ).reshape(len(groups), num_mixtures)
    assignment = torch.empty(len(groups), num_sources, dtype=torch.int64)
    for c, candidate in enumerate(groups):
        for n, group in enumerate(candidate):
            assignment[c, list(group)] = n
    return masks, assignment


_device_tables: dict = {}


def _on_device(kind: str, num_sources: int, num_mixtures: int, partitions: str, device) -> torch.Tensor:
    device = torch.device(device)
    key = (kind, num_sources, num_mixtures, partitions, device)
    table = _device_tables.get(key)
    if table is None:
        masks, assignment = _tables_cpu(num_sources, num_mixtures, partitions)
        table = (masks if kind == "masks" else assignment).to(device)
        _device_tables[key] = table
    return table


# torch.compile takes the tables as constants instead of tracing how they are built.
@torch.compiler.assume_constant_result
def candidate_masks(num_sources: int, num_mixtures: int, partitions: str, device="cpu") -> torch.Tensor:
    """(P, N) int32: bit ``s`` of ``masks[c, n]`` is set when candidate ``c`` puts source ``s`` in mixture ``n``."""
    return _on_device("masks", num_sources, num_mixtures, partitions, device)


@torch.compiler.assume_constant_result
def candidate_assignments(num_sources: int, num_mixtures: int, partitions: str, device="cpu") -> torch.Tensor:
    """(P, M) int64: ``assignments[c, s]`` is the mixture that candidate ``c`` gives source ``s``."""
    return _on_device("assignment", num_sources, num_mixtures, partitions, device)
