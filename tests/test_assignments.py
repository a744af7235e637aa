import itertools

import pytest
import torch

from nrt_kernels import assignments


def asteroid_generalized(num_sources):
    """asteroid's generalized=True order, as its docs state it: group sizes 0..M for mixture 0, combinations order."""
    sources = range(num_sources)
    return [[list(group), [s for s in sources if s not in group]]
            for size in range(num_sources + 1) for group in itertools.combinations(sources, size)]


def asteroid_equal(sources, size, groups):
    """asteroid's generalized=False order: the first group in combinations order, the rest recursively."""
    if groups == 0:
        return [[]]
    return [[list(first), *tail]
            for first in itertools.combinations(sources, size)
            for tail in asteroid_equal([s for s in sources if s not in first], size, groups - 1)]


@pytest.mark.parametrize("num_sources", range(1, 9))
def test_generalized_two_mixtures_is_asteroid_order(num_sources):
    ours = [[list(g) for g in cand] for cand in assignments.candidate_groups(num_sources, 2, "generalized")]
    assert ours == asteroid_generalized(num_sources)


@pytest.mark.parametrize("num_sources,num_mixtures", [(2, 2), (4, 2), (6, 2), (8, 2), (3, 3), (6, 3), (4, 4)])
def test_equal_is_asteroid_order(num_sources, num_mixtures):
    ours = [[list(g) for g in cand] for cand in assignments.candidate_groups(num_sources, num_mixtures, "equal")]
    assert ours == asteroid_equal(list(range(num_sources)), num_sources // num_mixtures, num_mixtures)
    assert len(ours) == assignments.num_candidates(num_sources, num_mixtures, "equal")


@pytest.mark.parametrize("num_sources,num_mixtures", [(1, 3), (3, 3), (4, 3), (2, 4)])
def test_generalized_many_mixtures_covers_every_assignment_once(num_sources, num_mixtures):
    table = assignments.candidate_assignments(num_sources, num_mixtures, "generalized")
    rows = {tuple(r) for r in table.tolist()}
    assert len(rows) == table.shape[0] == num_mixtures**num_sources
    # Documented order: mixture 0's group grows first (size, then combinations), recursively.
    sizes = [int((r == 0).sum()) for r in table]
    assert sizes == sorted(sizes)


def test_masks_and_assignments_agree():
    masks = assignments.candidate_masks(5, 3, "generalized")
    table = assignments.candidate_assignments(5, 3, "generalized")
    for c in range(table.shape[0]):
        for n in range(3):
            expected = sum(1 << s for s in range(5) if table[c, s] == n)
            assert masks[c, n].item() == expected
    assert masks.dtype == torch.int32 and table.dtype == torch.int64


def test_tables_are_cached_per_device():
    a = assignments.candidate_masks(4, 2, "generalized", "cpu")
    assert a is assignments.candidate_masks(4, 2, "generalized", torch.device("cpu"))


def test_unknown_mode():
    with pytest.raises(ValueError, match="partitions"):
        assignments.candidate_groups(4, 2, "bogus")
