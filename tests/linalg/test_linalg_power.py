"""Warm-started power steps against a float64 SVD."""

import pytest
import torch

from diagnostics.linalg.power import power_steps


def test_sigma_lies_between_the_start_vectors_gain_and_sigma1_and_converges():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 12, 7, generator=g, dtype=torch.float64)
    v0 = torch.randn(3, 7, generator=g, dtype=torch.float64)
    v0 = v0 / v0.norm(dim=1, keepdim=True)
    sigma1 = torch.linalg.svdvals(W)[:, 0]
    sigma, v = power_steps(W, v0, iters=1)
    start_gain = torch.linalg.vector_norm(W @ v0[..., None], dim=(1, 2))
    assert (sigma >= start_gain * (1 - 1e-12)).all() and (sigma <= sigma1 * (1 + 1e-12)).all()
    assert torch.allclose(v.norm(dim=1), torch.ones(3, dtype=torch.float64))
    sigma, v = power_steps(W, v0, iters=300)
    assert sigma.tolist() == pytest.approx(sigma1.tolist(), rel=1e-10)
    _, _, vh = torch.linalg.svd(W)
    assert (torch.einsum("gi,gi->g", v, vh[:, 0]).abs() - 1).abs().max() < 1e-8


def test_one_matrix_and_its_sign_kept():
    W = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    sigma, v = power_steps(W, torch.tensor([-0.6, 0.8], dtype=torch.float64), iters=60)
    assert sigma.dim() == 0 and float(sigma) == pytest.approx(3.0, rel=1e-12)
    assert v.tolist() == pytest.approx([-1.0, 0.0], abs=1e-12)  # a step never flips the sign
