"""The explosion step of a loss curve, defined once for the whole suite.

Definition. Let r_t = min of the finite losses at steps 0..t (the running minimum). Step t is *high* if
loss_t is not finite, or if t >= ``min_step`` and loss_t > ``factor`` * r_t. The explosion step is the
first step of the first run of consecutive high steps that is at least ``patience`` steps long or that
contains a non-finite loss. Defaults: factor 2, min_step 20, patience 10. A run that ends inside a
streak shorter than ``patience`` with only finite losses has not (yet) exploded.

Why the start of the streak: it is the first step at which the loss was visibly broken, so lead times of
detectors are measured against the earliest defensible moment, not the moment the loss became NaN.
Steps are the indices of ``losses`` (0-based); pass ``steps`` when the recorded steps differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["explosion_step"]


def explosion_step(
    losses: Sequence[float],
    *,
    factor: float = 2.0,
    min_step: int = 20,
    patience: int = 10,
    steps: Sequence[int] | None = None,
) -> int | None:
    """First step of the loss explosion, or None if the run did not explode (see the module docstring).

    Args:
        losses: loss per step (floats; NaN and inf allowed).
        factor: a step is high when its loss exceeds ``factor`` times the running minimum.
        min_step: steps before this index cannot be high unless their loss is non-finite (early training
            moves the loss a lot).
        patience: number of consecutive high steps that make an explosion.
        steps: step numbers of ``losses`` (same length); default 0..len-1.

    Returns:
        The step number where the explosion starts, or None. Cost O(len(losses)).
    """
    if factor <= 1.0 or patience < 1 or min_step < 0:
        raise ValueError(f"need factor > 1, patience >= 1, min_step >= 0; got {factor}, {patience}, {min_step}")
    if steps is not None and len(steps) != len(losses):
        raise ValueError(f"steps ({len(steps)}) and losses ({len(losses)}) differ in length")
    run_min = math.inf
    start: int | None = None  # index where the current streak of high steps began
    for i, raw in enumerate(losses):
        value = float(raw)
        finite = math.isfinite(value)
        if finite:
            run_min = min(run_min, value)
        high = (not finite) or (i >= min_step and value > factor * run_min)
        if not high:
            start = None
            continue
        if start is None:
            start = i
        if not finite or i - start + 1 >= patience:
            return start if steps is None else int(steps[start])
    return None
