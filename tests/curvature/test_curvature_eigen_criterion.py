"""``lanczos(criterion="eigenvalue")`` on network Hessians: eigenvalues to the asked relative accuracy with
no more products than the residual test."""

from __future__ import annotations

import pytest
import torch

from diagnostics.curvature import HessianOperator
from diagnostics.errors import ConfigError
from diagnostics.linalg import lanczos
from tests.cases import get_case
from tests.reference import dense_hessian


@pytest.mark.parametrize("case", ["mlp", "cnn_bn"])
def test_eigenvalue_criterion_meets_its_tolerance(case: str) -> None:
    c = get_case(case)
    H = HessianOperator(c.model, c.loss_fn, c.batches, mode=c.mode)
    truth = torch.linalg.eigvalsh(dense_hessian(c.model, c.loss_fn, c.batches, tuple(H.param_names), c.mode))
    top = truth.flip(0)[:3]
    for tol in (1e-3, 1e-6):
        fast = lanczos(H, k=3, tol=tol, criterion="eigenvalue", return_eigenvectors=False)
        slow = lanczos(H, k=3, tol=tol, return_eigenvectors=False)
        assert fast.all_converged and fast.settings["criterion"] == "eigenvalue"
        assert float(((fast.eigenvalues - top).abs() / top.abs()).max()) <= tol
        assert fast.num_matvecs <= slow.num_matvecs


def test_unknown_criterion_is_refused() -> None:
    with pytest.raises(ConfigError, match="criterion"):
        lanczos(torch.eye(4, dtype=torch.float64), k=1, criterion="ritz")
