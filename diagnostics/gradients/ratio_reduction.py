"""GSNR's summaries and the noise scale's parts reduced parameter by parameter: :class:`GSNRReduction`.

For a large model the per-sample gradients are formed one parameter at a time (from the training step:
:meth:`~diagnostics.gradients.training_capture.TrainingStepCapture.reduction`). This reduces each
parameter's as it comes to what GSNR and the noise scale need: the corrected ratio of every element
(float64, laid end to end), the running sums of the variances and of the squared means, and the moments
of the tensors with a floored variance, whose raw ratio is not an affine map of the corrected one. The
model-wide vectors of means and variances that :class:`~diagnostics.gradients.stats.GradientMoments`
holds (two float64 values per element: 2 GB at GPT-2 small) are never formed, and the corrected ratio is
computed while each chunk of moments is still in the cache rather than in a pass of its own.

The summaries are those of :meth:`GradientMoments.summaries` to the last bit (the same operations on the
same numbers); the noise parts to the rounding of another summation order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diagnostics.errors import DataError
from diagnostics.gradients.stats import GSNR_EPS, NoiseScaleParts, _computable, _moments, moment_chunks
from diagnostics.gradients.summaries import GSNRSummary, corrected_into, raw_into, summaries_of_ratios

__all__ = ["GSNRReduction"]


class GSNRReduction:
    """Both GSNR summaries and the noise scale's parts of N per-sample gradients, fed one parameter at a time.

    Args:
        layout: each parameter's name and shape, in the order the summaries list them.
        n: the number of per-sample gradients N (>= 2).
        device: where the ratios are kept (the parameters' device).
        eps: the variance floor of the ratios (:data:`~diagnostics.gradients.stats.GSNR_EPS`).

    Feed every parameter once, with :meth:`add` (its ``[N, *shape]`` per-sample gradients) or :meth:`zero`
    (no sample reached it), then read :meth:`summaries` and :meth:`noise_parts`. Memory: one float64 per
    element, plus the float64 moments of the tensors that have a floored variance (elements no sample's
    gradient moves, such as unused position embeddings).
    """

    def __init__(self, layout: Sequence[tuple[str, torch.Size]], n: int, device: torch.device | str,
                 eps: float = GSNR_EPS) -> None:
        if n < 2:
            raise DataError(f"GSNRReduction needs N >= 2 per-sample gradients, got {n}")
        self.n, self.eps = int(n), float(eps)
        self.names = [name for name, _ in layout]
        self.sizes = [math.prod(shape) for _, shape in layout]
        self._place: dict[str, tuple[int, int]] = {}
        at = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            self._place[name] = (at, at + size)
            at += size
        self.corrected = torch.empty(at, dtype=torch.float64, device=device)
        self._trace = torch.zeros((), dtype=torch.float64, device=device)
        self._sqmean = torch.zeros((), dtype=torch.float64, device=device)
        #: the float64 means and variances (flat) of the tensors with a floored variance
        self._floored: dict[str, tuple[Tensor, Tensor]] = {}
        self._fed: set[str] = set()
        self._summaries: tuple[GSNRSummary, GSNRSummary] | None = None
        self._in_torch: bool | None = None  # None: torch off the CPU, numpy on it (True: torch anyway)

    def add(self, name: str, per_sample: Tensor) -> None:
        """Reduce parameter ``name``'s ``[N, *shape]`` per-sample gradients.

        Cost: the two passes of the moments over them, a few over the parameter's elements while each
        chunk is in the cache, and one host synchronisation (whether a variance is floored).
        """
        a, b = self._start(name)
        g = _computable(per_sample)
        n, eps = self.n, self.eps
        if g.shape[0] != n or g[0].numel() != b - a:
            raise DataError(f"GSNRReduction: {name!r} takes [{n}, ...] gradients of {b - a} elements, got "
                            f"{tuple(g.shape)}")
        flat = g.reshape(n, -1)
        threshold = eps * n / (n - 1)
        below = torch.zeros((), dtype=torch.bool, device=self.corrected.device)
        for lo, hi, mean, var in moment_chunks(flat):
            m, v = mean.to(torch.float64), var.to(torch.float64)
            # GradientMoments.gsnr's operations in its order, so the ratios are the same to the last bit.
            corrected_into(m, v, n, eps, self.corrected[a + lo : a + hi])
            self._trace += v.sum()
            self._sqmean += torch.dot(m, m)
            below |= (v < threshold).any()
        if bool(below):
            mean, var, _ = _moments(flat)
            self._floored[name] = (mean.reshape(-1), var.reshape(-1))

    def zero(self, name: str) -> None:
        """Parameter ``name`` has a zero gradient for every sample (no layer call reached it)."""
        a, b = self._start(name)
        self.corrected[a:b] = 0.0  # (0 - 0 / N) / eps
        zeros = torch.zeros(b - a, dtype=torch.float64, device=self.corrected.device)
        self._floored[name] = (zeros, zeros)

    def _start(self, name: str) -> tuple[int, int]:
        if self._summaries is not None:
            raise DataError("GSNRReduction: fed after its summaries were read")
        if name not in self._place:
            raise DataError(f"GSNRReduction: {name!r} is not in the layout")
        if name in self._fed:
            raise DataError(f"GSNRReduction: {name!r} was fed twice")
        self._fed.add(name)
        return self._place[name]

    def summaries(self, eps: float | None = None) -> tuple[GSNRSummary, GSNRSummary]:
        """``(corrected, raw)``: what :meth:`GradientMoments.summaries` gives for the same gradients.

        ``eps`` must be the floor given at construction (the ratios are already taken). Cost: one median
        per tensor and one pooled, plus those of the floored tensors' raw ratios (the first call only:
        the ratios are overwritten by the raw ones, and the result is kept).
        """
        if eps is not None and float(eps) != self.eps:
            raise DataError(f"GSNRReduction: the ratios were taken with eps={self.eps}, not {eps}")
        if self._summaries is None:
            missing = [name for name in self.names if name not in self._fed]
            if missing:
                raise DataError(f"GSNRReduction: no gradients were given for {missing[:5]}")
            live = [name for name, size in zip(self.names, self.sizes, strict=True) if size]
            flags = [name in self._floored for name in live]
            self._summaries = summaries_of_ratios(self.names, self.sizes, self.corrected, flags, self._raw_of,
                                                  self.n, in_torch=self._in_torch)
        return self._summaries

    def _raw_of(self, name: str, a: int, b: int, out: Any) -> None:
        """Write the raw ratios of floored tensor ``name`` into ``out[a:b]`` (numpy on the CPU)."""
        m, v = self._floored[name]
        raw_into(m, v, self.n, self.eps, out[a:b])

    def noise_parts(self) -> NoiseScaleParts:
        """Unbiased ``tr(Sigma)`` and ``|G|^2`` (:meth:`GradientMoments.noise_parts`)."""
        trace = float(self._trace)
        return NoiseScaleParts(trace=trace, sqnorm=float(self._sqmean) - trace / self.n)
