"""torch.compile(fullgraph=True) traces through the custom ops: no graph break, same numbers as eager.

Every path that runs on the CPU is checked: Triton (under the interpreter), the C++ extension, and "auto".
"""
import pytest
import torch

import nrt_kernels
from nrt_kernels import backends

IMPLS = ["triton", "cpu", "auto"]


def require(impl):
    try:
        backends.resolve("mixit_l1", impl, "cpu")
    except backends.BackendUnavailable as error:  # the C++ extension could not be built here
        pytest.skip(str(error))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_training_step_has_no_graph_break(impl, backend):
    require(impl)
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4 * 2 * 16)
    x = torch.randn(3, 16)
    mixtures = torch.randn(3, 2, 2, 16)

    def step(x, mixtures):
        est = model(x).view(3, 4, 2, 16)
        return nrt_kernels.mixit_loss(est, mixtures, impl=impl, return_assignment=True)

    torch._dynamo.reset()
    loss, assignment = torch.compile(step, fullgraph=True, backend=backend)(x, mixtures)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    eager_loss, eager_assignment = step(x, mixtures)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    assert torch.equal(assignment, eager_assignment)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)
    explanation = torch._dynamo.explain(step)(x, mixtures)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("impl", ["triton", "cpu"])
def test_opcheck_custom_ops(impl):
    require(impl)
    gen = torch.Generator().manual_seed(1)
    est = torch.randn(2, 3, 10, generator=gen, dtype=torch.float64)
    mixtures = torch.randn(2, 2, 10, generator=gen, dtype=torch.float64)
    torch.library.opcheck(torch.ops.nrt_kernels.mixit_l1.default, (est, mixtures, "generalized", impl),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
