"""GSNR, its summary, the gradient noise scale and the micro-batch variant against brute-force formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diagnostics.errors import DataError
from diagnostics.gradients import (
    gradient_noise_scale,
    gsnr,
    gsnr_summary,
    microbatch_gsnr,
    per_sample_gradients,
)
from tests.cases import get_case
from tests.reference import gsnr_bruteforce


def _per_sample() -> dict[str, torch.Tensor]:
    c = get_case("mlp")
    x = torch.cat([b[0] for b in c.batches])
    y = torch.cat([b[1] for b in c.batches])
    return per_sample_gradients(c.model, c.loss_fn, (x, y))


def test_gsnr_equals_bruteforce() -> None:
    ps = _per_sample()
    got = gsnr(ps)
    ref = gsnr_bruteforce(ps, eps=1e-20)
    for n in ps:
        assert got[n].shape == ps[n].shape[1:] and got[n].dtype == torch.float64
        np.testing.assert_allclose(got[n].numpy(), ref[n], rtol=1e-10, atol=0)


def test_gsnr_edge_cases() -> None:
    g = {"w": torch.tensor([[0.0, 2.0, 1.0], [0.0, 2.0, 3.0]])}
    r = gsnr(g)["w"]
    assert r[0] == 0  # zero mean, zero variance
    assert r[1] == 4.0 / 1e-20  # constant gradient: variance floored at eps
    assert r[2] == pytest.approx(4.0)  # mean 2, population variance 1
    with pytest.raises(DataError, match="at least 2"):
        gsnr({"w": torch.ones(1, 3)})
    with pytest.raises(DataError):
        gsnr({})


def test_gsnr_summary() -> None:
    ratios = {"a": torch.tensor([1.0, 2.0, 10.0, 3.0]), "b": torch.tensor([[5.0], [7.0], [0.0]])}
    s = gsnr_summary(ratios)
    assert s.mean == pytest.approx({"a": 4.0, "b": 4.0, "all": 28.0 / 7})
    assert s.median == pytest.approx({"a": 2.5, "b": 5.0, "all": 3.0})


def test_gradient_noise_scale_formula() -> None:
    ps = _per_sample()
    flat = np.concatenate([g.reshape(g.shape[0], -1).numpy() for g in ps.values()], axis=1)
    n = flat.shape[0]
    mean = flat.mean(0)
    trace = sum(((row - mean) ** 2).sum() for row in flat) / (n - 1)
    g2 = (mean**2).sum()
    assert gradient_noise_scale(ps, bias_corrected=False) == pytest.approx(trace / g2, rel=1e-12)
    corrected = g2 - trace / n
    expected = trace / corrected if corrected > 0 else math.inf
    assert gradient_noise_scale(ps) == pytest.approx(expected, rel=1e-12)


def test_gradient_noise_scale_pure_noise_is_infinite() -> None:
    g = {"w": torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])}
    assert gradient_noise_scale(g) == math.inf


def test_microbatch_gsnr_is_gsnr_over_microbatch_means() -> None:
    ps = _per_sample()  # 8 samples -> 4 micro-batches of 2
    micro = [{n: g[2 * m : 2 * m + 2].mean(0) for n, g in ps.items()} for m in range(4)]
    got = microbatch_gsnr(micro)
    stacked = {n: torch.stack([mb[n] for mb in micro]) for n in ps}
    ref = gsnr_bruteforce(stacked, eps=1e-20)
    for n in ps:
        np.testing.assert_allclose(got[n].numpy(), ref[n], rtol=1e-10)
    with pytest.raises(DataError, match="at least 2"):
        microbatch_gsnr(micro[:1])
