"""Moments of the micro-batch gradients of gradient accumulation, read off the accumulating ``.grad``.

With gradient accumulation the user's loop runs M backward passes into the same ``.grad`` before one
optimizer step; the gradient of micro-batch i is the change of ``.grad`` since the previous micro-batch.
:class:`AccumulatedMoments` takes ``.grad`` after each micro-batch and keeps, per element, the mean and the
sum of squared deviations of those changes (Welford's update, in the gradients' own precision, float32
for half precision), so the micro-batch GSNR needs no extra forward or backward pass.

A parameter first seen at micro-batch j had a zero gradient in the micro-batches before (its ``.grad``
did not exist): the running mean and sum start from zero, which is exactly those j - 1 zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diagnostics.gradients.stats import GradientMoments

__all__ = ["AccumulatedMoments"]


class AccumulatedMoments:
    """Mean and variance over the micro-batches of one optimizer step (see the module docstring).

    Memory: three copies of the gradients (the last ``.grad``, the mean, the squared deviations).
    """

    def __init__(self) -> None:
        self.count = 0
        self._last: dict[str, Tensor] = {}
        self._mean: dict[str, Tensor] = {}
        self._m2: dict[str, Tensor] = {}

    def observe(self, named_parameters: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
        """Take ``.grad`` after one more micro-batch's backward; writes nothing to the parameters.

        Cost: five elementwise passes over the gradients (a copy, the change, and the update of two sums).
        """
        with torch.no_grad():
            self.count += 1
            k = self.count
            for name, p in named_parameters:
                grad = p.grad
                last = self._last.get(name)
                if grad is None and last is None:
                    continue
                if grad is None:  # no backward reached it since: its gradient this micro-batch is zero
                    now = last
                else:
                    now = grad.detach().to(torch.float64 if grad.dtype == torch.float64 else torch.float32, copy=True)
                g = now if last is None else now - last
                self._last[name] = now
                mean = self._mean.get(name)
                if mean is None:
                    mean = self._mean[name] = torch.zeros_like(g)
                    self._m2[name] = torch.zeros_like(g)
                # Welford: with d = g - mean_old, mean += d / k and m2 += d (g - mean_new) = d^2 (k - 1) / k.
                delta = g.sub_(mean) if g is not now else g - mean
                mean.add_(delta, alpha=1.0 / k)
                self._m2[name].addcmul_(delta, delta, value=(k - 1) / k)

    def moments(self) -> GradientMoments | None:
        """:class:`GradientMoments` over the micro-batches seen (float64), or None before two of them."""
        if self.count < 2:
            return None
        n = self.count
        mean = {k: v.to(torch.float64) for k, v in self._mean.items()}
        var = {k: self._m2[k].to(torch.float64) / (n - 1) for k in self._mean}
        return GradientMoments(mean=mean, var=var, n=n)

    def reset(self) -> None:
        """Forget the micro-batches (at the end of an optimizer step)."""
        self.count = 0
        self._last.clear()
        self._mean.clear()
        self._m2.clear()
