"""GSNR's summaries and the noise scale's parts reduced parameter by parameter: :class:`GSNRReduction`.

For a large model the per-sample gradients are formed one parameter at a time (from the training step:
:meth:`~diagnostics.gradients.training_capture.TrainingStepCapture.reduction`). This reduces each
parameter's as it comes to what GSNR and the noise scale need: the corrected ratio of every element
(laid end to end), the running sums of the variances and of the squared means, and the moments
of the tensors with a floored variance, whose raw ratio is not an affine map of the corrected one. The
model-wide vectors of means and variances that :class:`~diagnostics.gradients.stats.GradientMoments`
holds (two float64 values per element: 2 GB at GPT-2 small) are never formed, and the corrected ratio is
computed while each chunk of moments is still in the cache rather than in a pass of its own.

The ratios are computed in float64 and kept in ``dtype``. Kept in float64, the summaries are those of
:meth:`GradientMoments.summaries` to the last bit (the same operations on the same numbers); kept in
float32 (what the Monitor does for float32 gradients: half the memory, and the moments of float32
gradients carry float32 rounding already), each ratio is that float64 value rounded to float32: the
corrected medians are the float64 medians rounded (the mean of the two rounded middle values for an even
count), and every summary is within float32 rounding (a relative 6e-8, a few times over) of the largest
ratio in its tensor, the corrected one's too for a raw summary (an affine map of the corrected one where
no variance is floored). A ratio above float32's largest value, 3.4e38 (a mean gradient of 1.8e9 whose
variance is floored), reads as inf. The noise parts agree to the rounding of another summation order
either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from diagnostics.errors import DataError
from diagnostics.gradients.stats import GSNR_EPS, NoiseScaleParts, _computable, _moments, moment_chunks
from diagnostics.gradients.summaries import GSNRSummary, corrected_into, raw_into, summaries_of_ratios

__all__ = ["GSNRReduction", "ratio_dtype"]


def ratio_dtype(gradient_dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """What a large model's ratios are kept in: float64 when any gradient is float64, else float32 (the
    moments of float32 or half-precision gradients carry float32 rounding at best)."""
    return torch.float64 if any(d == torch.float64 for d in gradient_dtypes) else torch.float32


class GSNRReduction:
    """Both GSNR summaries and the noise scale's parts of N per-sample gradients, fed one parameter at a time.

    Args:
        layout: each parameter's name and shape, in the order the summaries list them.
        n: the number of per-sample gradients N (>= 2).
        device: where the ratios are kept (the parameters' device).
        eps: the variance floor of the ratios (:data:`~diagnostics.gradients.stats.GSNR_EPS`).
        dtype: what the ratios are kept in: ``torch.float64`` (summaries exactly those of the moments) or
            ``torch.float32`` (half the memory; module docstring).

    Feed every parameter once, with :meth:`add` (its ``[N, *shape]`` per-sample gradients) or :meth:`zero`
    (no sample reached it), then read :meth:`summaries` and :meth:`noise_parts`. Memory: one value of
    ``dtype`` per element, plus the float64 moments of the tensors that have a floored variance (elements
    no sample's gradient moves, such as unused position embeddings).
    """

    def __init__(self, layout: Sequence[tuple[str, torch.Size]], n: int, device: torch.device | str,
                 eps: float = GSNR_EPS, dtype: torch.dtype = torch.float64) -> None:
        if n < 2:
            raise DataError(f"GSNRReduction needs N >= 2 per-sample gradients, got {n}")
        if dtype not in (torch.float32, torch.float64):
            raise DataError(f"GSNRReduction keeps its ratios in torch.float32 or torch.float64, not {dtype}")
        self.n, self.eps = int(n), float(eps)
        self.names = [name for name, _ in layout]
        self.sizes = [math.prod(shape) for _, shape in layout]
        self._place: dict[str, tuple[int, int]] = {}
        at = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            self._place[name] = (at, at + size)
            at += size
        self.corrected = torch.empty(at, dtype=dtype, device=device)
        self._work: Tensor | None = None  # float64 ratios of one chunk, when they are kept in float32
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
            target = self.corrected[a + lo : a + hi]
            if target.dtype == torch.float64:
                corrected_into(m, v, n, eps, target)
            else:
                work = self._chunk_work(hi - lo)
                corrected_into(m, v, n, eps, work)
                target.copy_(work)
            self._trace += v.sum()
            self._sqmean += torch.dot(m, m)
            below |= (v < threshold).any()
        if bool(below):
            mean, var, _ = _moments(flat)
            self._floored[name] = (mean.reshape(-1), var.reshape(-1))

    def _chunk_work(self, size: int) -> Tensor:
        """A float64 temporary of ``size`` values, kept for the next chunks (they stay in the cache)."""
        if self._work is None or self._work.numel() < size:
            self._work = torch.empty(size, dtype=torch.float64, device=self.corrected.device)
        return self._work[:size]

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
