"""Gradient statistics from per-sample (or per-micro-batch) gradients: GSNR and the gradient noise scale.

All functions are pure: tensors in, tensors or floats out, computed in float64 on the input's device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diagnostics.errors import DataError

__all__ = ["gsnr", "gsnr_summary", "GSNRSummary", "gradient_noise_scale", "microbatch_gsnr"]

#: Floor of the variance in the GSNR denominator (elements with zero variance and zero mean give 0).
GSNR_EPS = 1e-20


def _check(per_sample: Mapping[str, Tensor], what: str) -> None:
    if not per_sample:
        raise DataError(f"{what}: no gradients given")
    for name, g in per_sample.items():
        if g.ndim < 1 or g.shape[0] < 2:
            raise DataError(
                f"{what}: {name!r} has {g.shape[0] if g.ndim else 0} gradient(s); at least 2 are needed"
            )


def gsnr(per_sample: Mapping[str, Tensor], eps: float = GSNR_EPS) -> dict[str, Tensor]:
    """Gradient signal-to-noise ratio per parameter element (Liu et al. 2020).

    ``r_j = mean_i(g_ij)^2 / max(var_i(g_ij), eps)`` with the population variance (divide by N) over the
    N gradients ``g_i`` (leading dimension of each tensor).

    Args:
        per_sample: ``{name: Tensor[N, ...]}``, e.g. from :func:`per_sample_gradients`.
        eps: floor of the variance, so that constant elements give a finite ratio.

    Returns:
        ``{name: Tensor[...]}`` of float64 ratios, shaped like the parameters. Cost: two passes over the input.

    >>> gsnr({"w": torch.tensor([[1.0], [3.0]])})["w"]  # mean 2, variance 1
    tensor([4.], dtype=torch.float64)
    """
    _check(per_sample, "gsnr")
    out = {}
    for name, g in per_sample.items():
        g = g.detach().to(torch.float64)
        mean = g.mean(0)
        var = (g - mean).square().mean(0)
        out[name] = mean.square() / var.clamp_min(eps)
    return out


def _median(x: Tensor) -> float:
    # The average of the two middle values for an even count (torch.median returns the lower one).
    x = x.reshape(-1)
    k = x.numel()
    lo = torch.kthvalue(x.cpu(), (k + 1) // 2).values
    hi = torch.kthvalue(x.cpu(), k // 2 + 1).values
    return float((lo + hi) / 2)


@dataclass(frozen=True)
class GSNRSummary:
    """Mean and median of per-element GSNR, per parameter tensor and over all parameters (key ``"all"``).

    ``"all"`` pools every element of every tensor (a parameter-count-weighted aggregate).
    """

    mean: dict[str, float]
    median: dict[str, float]


def gsnr_summary(ratios: Mapping[str, Tensor]) -> GSNRSummary:
    """Summarise per-element GSNR (the output of :func:`gsnr` or :func:`microbatch_gsnr`).

    Returns:
        :class:`GSNRSummary` with ``mean`` and ``median`` dicts keyed by parameter name and ``"all"``
        (metrics ``gsnr_mean`` / ``gsnr_median``). Cost: one sort-free selection per tensor.
    """
    if not ratios:
        raise DataError("gsnr_summary: no ratios given")
    mean = {k: float(v.mean()) for k, v in ratios.items()}
    median = {k: _median(v) for k, v in ratios.items()}
    pooled = torch.cat([v.reshape(-1).to(torch.float64) for v in ratios.values()])
    mean["all"] = float(pooled.mean())
    median["all"] = _median(pooled)
    return GSNRSummary(mean=mean, median=median)


def gradient_noise_scale(per_sample: Mapping[str, Tensor], bias_corrected: bool = True) -> float:
    """Simple gradient noise scale ``B_simple = tr(Σ) / |G|²`` (McCandlish et al. 2018).

    Estimators over N per-sample gradients ``g_i`` (all tensors flattened together), with
    ``Ĝ = mean_i g_i``:

    * ``tr(Σ) ≈ S = sum_i |g_i − Ĝ|² / (N − 1)`` (unbiased);
    * ``|G|² ≈ |Ĝ|² − S / N`` (unbiased, since ``E|Ĝ|² = |G|² + tr(Σ)/N``) when ``bias_corrected``,
      else the plain ``|Ĝ|²`` (biased upwards, so B is biased downwards).

    Returns:
        ``B_simple`` as a float; ``math.inf`` when the corrected ``|G|²`` is not positive (the mean
        gradient is indistinguishable from noise at this N). Cost: two passes over the input.
    """
    _check(per_sample, "gradient_noise_scale")
    flat = torch.cat(
        [g.detach().reshape(g.shape[0], -1).to(torch.float64) for g in per_sample.values()], dim=1
    )
    n = flat.shape[0]
    mean = flat.mean(0)
    trace = float((flat - mean).square().sum() / (n - 1))
    g2 = float(mean.square().sum())
    if bias_corrected:
        g2 -= trace / n
    if g2 <= 0.0:
        return math.inf
    return trace / g2


def microbatch_gsnr(grads_list: Sequence[Mapping[str, Tensor]], eps: float = GSNR_EPS) -> dict[str, Tensor]:
    """GSNR across micro-batch (or data-parallel rank) gradients: a *different* metric from :func:`gsnr`.

    ``r_j = mean_m(G_mj)^2 / var_m(G_mj)`` over M micro-batch mean gradients. Averaging b samples divides
    the variance by about b, so this is roughly (micro-batch size) x the per-sample GSNR; store it as
    ``gsnr_microbatch_*``, never in the same series as ``gsnr_*``.

    Returns:
        ``{name: Tensor[...]}`` of float64 ratios. Cost: one stack and two passes.
    """
    if len(grads_list) < 2:
        raise DataError(f"microbatch_gsnr needs at least 2 micro-batch gradients, got {len(grads_list)}")
    names = list(grads_list[0])
    for i, g in enumerate(grads_list):
        if list(g) != names:
            raise DataError(
                f"microbatch_gsnr: micro-batch {i} has parameters {list(g)[:4]}..., expected {names[:4]}..."
            )
    return gsnr({k: torch.stack([g[k].detach() for g in grads_list]) for k in names}, eps=eps)
