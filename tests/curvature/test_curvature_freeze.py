"""freeze(): products at the parameters and buffers of the moment, whatever training does afterwards."""

from __future__ import annotations

import pytest
import torch

from diagnostics.curvature import GGNOperator, HessianOperator
from tests.cases import get_case
from tests.reference import dense_ggn, dense_hessian

OPERATORS = {"hessian": (HessianOperator, dense_hessian), "ggn": (GGNOperator, dense_ggn)}


def _train_a_little(model: torch.nn.Module) -> None:
    """What an optimizer step and a train-mode forward do: parameters and buffers changed in place."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=0.3)
        for b in model.buffers():
            if b.is_floating_point():
                b.mul_(1.5).add_(0.1)


@pytest.mark.parametrize("backend", ["fwd_rev", "rev_rev"])
@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("case", ["mlp", "cnn_bn", "transformer"])
def test_frozen_products_stay_those_of_the_frozen_point(case: str, kind: str, backend: str) -> None:
    c = get_case(case)
    op_cls, dense_fn = OPERATORS[kind]
    before = dense_fn(c.model, c.loss_fn, c.batches, [n for n, _ in c.model.named_parameters()], c.mode)
    frozen = op_cls(c.model, c.loss_fn, c.batches, backend=backend).freeze()
    live = op_cls(c.model, c.loss_fn, c.batches, backend=backend, max_cache_bytes=0)
    v = torch.randn(frozen.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first = frozen @ v
    _train_a_little(c.model)
    after = dense_fn(c.model, c.loss_fn, c.batches, frozen.param_names, c.mode)
    assert torch.allclose(first, before @ v, rtol=1e-10, atol=1e-12)
    assert torch.allclose(frozen @ v, before @ v, rtol=1e-10, atol=1e-12)
    assert torch.allclose(live @ v, after @ v, rtol=1e-10, atol=1e-12)  # control: the live operator moves
    assert not torch.allclose(after @ v, before @ v, rtol=1e-3)
    assert frozen.frozen and not live.frozen


def test_freeze_copies_and_leaves_the_model_alone() -> None:
    c = get_case("cnn_bn")
    op = HessianOperator(c.model, c.loss_fn, c.batches)
    params = {n: p.detach().clone() for n, p in c.model.named_parameters()}
    op.freeze()
    for n, p in c.model.named_parameters():
        assert torch.equal(p, params[n]) and op._state[n].data_ptr() != p.data_ptr()
    for n, b in c.model.named_buffers():
        assert op._state[n].data_ptr() != b.data_ptr()
