"""``[P, K]`` products: looped and batched columns give the dense product; bad column modes are refused."""

from __future__ import annotations

import pytest
import torch

from diagnostics.curvature import GGNOperator, HessianOperator
from diagnostics.errors import ConfigError
from tests.cases import get_case
from tests.reference import dense_ggn, dense_hessian


@pytest.mark.parametrize("mode", ["auto", "loop", "batched"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("case", ["mlp", "regression"])
def test_column_modes_match_dense(case: str, kind: str, mode: str) -> None:
    c = get_case(case)
    cls, dense = (HessianOperator, dense_hessian) if kind == "hessian" else (GGNOperator, dense_ggn)
    op = cls(c.model, c.loss_fn, c.batches, backend="rev_rev", mode=c.mode, column_mode=mode)
    D = dense(c.model, c.loss_fn, c.batches, tuple(op.param_names), c.mode)
    V = torch.randn(op.num_params, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = op @ V
    assert float((out - D @ V).norm() / (D @ V).norm()) <= 1e-10
    assert op.num_matvecs == 4
    # Every column equals the single product (no cross-talk between columns in either mode).
    assert float((out[:, 2] - op @ V[:, 2]).norm() / out[:, 2].norm()) <= 1e-12


def test_gradient_is_a_copy_of_the_cached_one() -> None:
    c = get_case("mlp")
    op = HessianOperator(c.model, c.loss_fn, c.batches[0], mode=c.mode)
    g = op.gradient()
    g.zero_()
    assert float(op.gradient().norm()) > 0


def test_unknown_column_mode_is_refused() -> None:
    c = get_case("mlp")
    with pytest.raises(ConfigError, match="column_mode"):
        HessianOperator(c.model, c.loss_fn, c.batches, column_mode="vmap")
