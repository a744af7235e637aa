"""nrt_kernels.compat.MixITLossWrapper behaves like asteroid's wrapper: same arguments, same return shapes."""
import warnings

import pytest
import torch

from nrt_kernels import compat, reference
from nrt_kernels.assignments import candidate_assignments


class SingleSrcL1(torch.nn.Module):  # the shape of iSeparate's per-example L1, defined elsewhere
    def forward(self, est, target):
        return (est - target).abs().mean(dim=list(range(1, target.ndim)))


class SingleSrcL1Squared(torch.nn.Module):
    def forward(self, est, target):
        return ((est - target) ** 2).mean(dim=list(range(1, target.ndim)))


SingleSrcL1Lookalike = type("SingleSrcL1", (SingleSrcL1Squared,), {})  # right name, wrong loss


def inputs(seed=0, sources=4):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(3, sources, 50, generator=gen, dtype=torch.float64, requires_grad=True),
            torch.randn(3, 2, 50, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("loss_func", ["l1", compat.SingleSrcL1(), SingleSrcL1()])
@pytest.mark.parametrize("generalized", [True, False])
def test_fused_wrapper_matches_reference(loss_func, generalized):
    est, mix = inputs()
    wrapper = compat.MixITLossWrapper(loss_func, generalized=generalized, impl="triton")
    assert wrapper.fused
    partitions = "generalized" if generalized else "equal"
    loss, est_mix = wrapper(est, mix, return_est=True)
    ref_loss, ref_est = reference.mixit_loss(est, mix, partitions=partitions, return_est=True)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(est_mix, ref_est)
    rows = compat.MixITLossWrapper(loss_func, generalized=generalized, reduction="none", impl="triton")(est, mix)
    assert rows.shape == (3, 1)  # asteroid keeps the candidate dim for reduction="none"
    torch.testing.assert_close(rows[:, 0], reference.mixit_loss(est, mix, partitions=partitions, reduction="none"))


@pytest.mark.parametrize("loss_func", [SingleSrcL1Squared(), SingleSrcL1Lookalike()])
def test_other_losses_run_the_reference_loop_with_one_warning(loss_func):
    est, mix = inputs(1)
    wrapper = compat.MixITLossWrapper(loss_func)
    assert not wrapper.fused
    with pytest.warns(UserWarning, match="reference loop"):
        loss, est_mix = wrapper(est, mix, return_est=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapper(est, mix)
    squared = reference.candidate_losses(est, mix, "generalized", SingleSrcL1Squared())
    best_loss, best = squared.min(1)
    torch.testing.assert_close(loss, best_loss.mean())

    torch.testing.assert_close(est_mix, reference.remix(est, candidate_assignments(4, 2, "generalized")[best], 2))
