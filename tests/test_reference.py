"""The reference against a brute-force loop written here, and the shared input validation."""
import itertools

import pytest
import torch

import nrt_kernels
from nrt_kernels import reference


def brute_force(est, mixtures, partitions):
    """Every assignment by itertools.product, kept when it fits the mode; returns (row losses, assignment)."""
    batch, num_sources, num_mixtures = est.shape[0], est.shape[1], mixtures.shape[1]
    losses, rows = [], []
    for b in range(batch):
        best, best_assignment = None, None
        for assignment in itertools.product(range(num_mixtures), repeat=num_sources):
            if partitions == "equal" and any(assignment.count(n) != num_sources // num_mixtures
                                             for n in range(num_mixtures)):
                continue
            err = 0.0
            for n in range(num_mixtures):
                remix = sum((est[b, s] for s in range(num_sources) if assignment[s] == n), torch.zeros_like(est[b, 0]))
                err += (remix - mixtures[b, n]).abs().sum().item()
            err /= mixtures[b].numel()
            if best is None or err < best - 1e-12:
                best, best_assignment = err, assignment
        losses.append(best)
        rows.append(best_assignment)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(rows)


@pytest.mark.parametrize("num_sources,num_mixtures,partitions", [
    (1, 2, "generalized"), (3, 2, "generalized"), (4, 2, "generalized"), (4, 2, "equal"), (3, 3, "generalized"),
    (6, 3, "equal"), (5, 1, "generalized"), (4, 4, "equal"),
])
def test_reference_matches_brute_force(num_sources, num_mixtures, partitions):
    gen = torch.Generator().manual_seed(num_sources * 10 + num_mixtures)
    est = torch.randn(3, num_sources, 2, 9, generator=gen, dtype=torch.float64)
    mixtures = torch.randn(3, num_mixtures, 2, 9, generator=gen, dtype=torch.float64)
    loss, assignment = reference.mixit_loss(est, mixtures, partitions=partitions, reduction="none",
                                            return_assignment=True)
    expected_loss, expected_assignment = brute_force(est, mixtures, partitions)
    torch.testing.assert_close(loss, expected_loss)
    assert torch.equal(assignment, expected_assignment)


def test_reference_return_est_and_mean():
    gen = torch.Generator().manual_seed(1)
    est = torch.randn(4, 4, 30, generator=gen, dtype=torch.float64)
    mixtures = torch.randn(4, 2, 30, generator=gen, dtype=torch.float64)
    loss, est_mix, assignment = reference.mixit_loss(est, mixtures, return_est=True, return_assignment=True)
    rows = reference.mixit_loss(est, mixtures, reduction="none")
    torch.testing.assert_close(loss, rows.mean())
    for b in range(4):
        for n in range(2):
            torch.testing.assert_close(est_mix[b, n], est[b, assignment[b] == n].sum(0))
    torch.testing.assert_close(rows, (est_mix - mixtures).abs().mean((1, 2)))


def test_reference_gradcheck():
    gen = torch.Generator().manual_seed(2)
    est = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    mixtures = torch.randn(2, 2, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, m: reference.mixit_loss(e, m), (est, mixtures))


# ------------------------------------------------------------------------------------------------
# Bad input: one validation shared by every impl, so every impl raises the same error.
# ------------------------------------------------------------------------------------------------

def _ok(batch=2, sources=4, mixtures=2, length=8, dtype=torch.float32):
    return torch.randn(batch, sources, length, dtype=dtype), torch.randn(batch, mixtures, length, dtype=dtype)


BAD_INPUTS = [
    ("wrong ndim", lambda: (torch.randn(2, 4), torch.randn(2, 2)), {}, ValueError, "trailing dim"),
    ("ndim mismatch", lambda: (torch.randn(2, 4, 3, 8), torch.randn(2, 2, 24)), {}, ValueError, "trailing dims"),
    ("batch mismatch", lambda: (torch.randn(2, 4, 8), torch.randn(3, 2, 8)), {}, ValueError, "batch"),
    ("trailing mismatch", lambda: (torch.randn(2, 4, 8), torch.randn(2, 2, 9)), {}, ValueError, "trailing dims"),
    ("not divisible", lambda: _ok(sources=5), {"partitions": "equal"}, ValueError, "divisible"),
    ("too many candidates", lambda: _ok(sources=8, mixtures=3), {}, ValueError, "too many candidate"),
    ("too many sources", lambda: _ok(sources=13, mixtures=1), {}, ValueError, "at most 12 sources"),
    ("integer dtype", lambda: (torch.ones(2, 4, 8, dtype=torch.int32), torch.ones(2, 2, 8, dtype=torch.int32)), {},
     TypeError, "floating-point"),
    ("not a tensor", lambda: ([[1.0]], torch.randn(2, 2, 8)), {}, TypeError, "torch.Tensor"),
    ("empty", lambda: (torch.randn(2, 4, 0), torch.randn(2, 2, 0)), {}, ValueError, "empty"),
    ("mixed devices", lambda: (torch.randn(2, 4, 8), torch.randn(2, 2, 8, device="meta")), {}, ValueError,
     "same device"),
    ("bad partitions", lambda: _ok(), {"partitions": "all"}, ValueError, "partitions must be one of"),
    ("bad reduction", lambda: _ok(), {"reduction": "sum"}, ValueError, "reduction must be one of"),
    ("bad metric", lambda: _ok(), {"metric": "l2"}, ValueError, "metric must be one of"),
]


@pytest.mark.parametrize("impl", ["reference", "triton", "auto"])
@pytest.mark.parametrize("name,make,kwargs,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_named_error(impl, name, make, kwargs, error, message):
    est, mixtures = make()
    with pytest.raises(error, match=message):
        nrt_kernels.mixit_loss(est, mixtures, impl=impl, **kwargs)


def test_unknown_impl():
    est, mixtures = _ok()
    with pytest.raises(ValueError, match="impl must be one of"):
        nrt_kernels.mixit_loss(est, mixtures, impl="fast")
