"""torch.compile(fullgraph=True) traces through the custom ops: no graph break, same numbers as eager."""
import pytest
import torch

import nrt_kernels


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_has_no_graph_break(backend):
    impl = "triton"
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4 * 2 * 16)
    x = torch.randn(3, 16)
    mixtures = torch.randn(3, 2, 2, 16)

    def step(x, mixtures):
        est = model(x).view(3, 4, 2, 16)
        loss, assignment = nrt_kernels.mixit_loss(est, mixtures, impl=impl, return_assignment=True)
        return loss, assignment

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss, assignment = compiled(x, mixtures)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    eager_loss, eager_assignment = step(x, mixtures)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    assert torch.equal(assignment, eager_assignment)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)
    explanation = torch._dynamo.explain(step)(x, mixtures)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_opcheck_custom_ops():
    gen = torch.Generator().manual_seed(1)
    est = torch.randn(2, 3, 10, generator=gen, dtype=torch.float64)
    mixtures = torch.randn(2, 2, 10, generator=gen, dtype=torch.float64)
    torch.library.opcheck(torch.ops.nrt_kernels.mixit_l1.default, (est, mixtures, "generalized", "triton"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
