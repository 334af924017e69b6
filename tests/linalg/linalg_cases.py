"""Matrices with known spectra for the linalg tests (float64)."""

from __future__ import annotations

import numpy as np
import torch


def with_spectrum(eigenvalues, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q``."""
    ev = np.asarray(eigenvalues, dtype=np.float64)
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((ev.size, ev.size)))
    return torch.tensor((Q * ev) @ Q.T)


def wishart(P: int = 200, N: int = 400, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P, N))
    return torch.tensor(X @ X.T / N)


def network_like(P: int = 300, outliers: int = 10, seed: int = 0) -> torch.Tensor:
    """A bulk near zero (both signs) plus a few large positive outliers, as in network Hessians."""
    return with_spectrum(network_spectrum(P, outliers, seed), seed)


def network_spectrum(P: int, outliers: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bulk = np.abs(rng.standard_normal(P - outliers)) * 0.05 - 0.01 * np.abs(rng.standard_normal(P - outliers))
    return np.concatenate([bulk, np.sort(rng.uniform(1.0, 20.0, outliers))])


def rng_snapshot():
    """The global torch, numpy and python RNG states, to check that estimators leave them alone."""
    import random

    return torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def assert_rng_unchanged(before) -> None:
    after = rng_snapshot()
    assert torch.equal(before[0], after[0]), "global torch RNG was used"
    assert np.array_equal(before[1], after[1]), "global numpy RNG was used"
    assert before[2] == after[2], "global python RNG was used"
