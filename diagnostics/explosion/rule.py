"""When did the loss explode? The one definition used by the explosion suite, the demo and the reports.

Definition. Let ``losses[0..n-1]`` be recorded at step numbers ``steps[0..n-1]`` (strictly increasing;
default ``0..n-1``), and let ``m_i`` be the minimum of the finite losses among ``losses[0..i]`` (the
running minimum, including entry ``i``; infinite while none is finite). Entry ``i`` is *high* when

- ``losses[i]`` is not finite (NaN or +-inf), whatever its step; or
- ``steps[i] >= warmup``, ``m_i > 0`` and ``losses[i] > factor * m_i`` (strictly greater: exactly
  ``factor`` times the running minimum is not high). The ratio test needs a positive running minimum:
  a loss that has reached zero or gone negative (a log-likelihood, say) has no scale to exceed, and
  only non-finite values can then be high.

A *streak* is a maximal run of consecutive high entries. The explosion step is ``steps[j]``, where ``j``
is the first entry of the first streak that either reaches ``patience`` entries or contains a
non-finite loss (a non-finite loss therefore counts at once, and the explosion is dated to the start of
the streak it ends, not to the non-finite entry). If no streak qualifies, there is no explosion (None):
a series that ends inside a shorter, all-finite streak has not (yet) exploded. The decision at entry
``i`` uses only entries ``0..i``, so the rule can run online on a growing list.

Units. ``warmup`` is compared with step numbers, ``patience`` counts recorded entries: a loss recorded
every ``k`` steps needs ``patience * k`` steps of high loss. Both coincide when every step is recorded.

Why these choices. Early training moves the loss a lot, hence the warm-up. A sustained rise over the
best loss seen so far, rather than a single spike, separates an explosion from batch noise; dating it to
the start of the streak gives the first step at which the loss was visibly broken, the earliest
defensible moment to measure an early warning's lead against. Defaults: factor 2, patience 10,
warmup 20 (the explosion suite's calibration, ``benchmarks/explosions/FINDINGS.md``).

Pure Python: no torch, no numpy needed (numpy arrays are accepted), so torch-free layers (the reports)
can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from diagnostics.errors import ConfigError

__all__ = ["explosion_step", "FACTOR", "PATIENCE", "WARMUP"]

FACTOR = 2.0
PATIENCE = 10
WARMUP = 20


def explosion_step(
    losses: Sequence[float],
    steps: Sequence[int] | None = None,
    *,
    factor: float = FACTOR,
    patience: int = PATIENCE,
    warmup: int = WARMUP,
) -> int | None:
    """Return the step at which the loss exploded, or None (definition in the module docstring).

    Args:
        losses: loss per recorded step, in step order (floats or a 1-D array; NaN and inf allowed).
        steps: step number of each entry of ``losses``, strictly increasing, same length; default
            ``0..len(losses)-1``.
        factor: an entry is high when its loss exceeds ``factor`` times the running minimum (> 1).
        patience: consecutive high entries that make an explosion (>= 1).
        warmup: entries at steps below this are high only when their loss is non-finite (>= 0).

    Returns:
        ``steps[j]`` (an int) for the first entry ``j`` of the exploding streak, or None.
        Cost: one pass over ``losses``, O(n) time and O(1) extra memory; stops at the explosion.

    Raises:
        ConfigError: bad ``factor``, ``patience`` or ``warmup``, or ``steps`` of the wrong length or
            not strictly increasing.
    """
    if not factor > 1.0 or patience < 1 or warmup < 0:
        raise ConfigError(
            f"explosion_step needs factor > 1, patience >= 1 and warmup >= 0; "
            f"got factor={factor}, patience={patience}, warmup={warmup}"
        )
    if steps is not None:
        if len(steps) != len(losses):
            raise ConfigError(
                f"explosion_step: steps ({len(steps)}) and losses ({len(losses)}) differ in length"
            )
        for i in range(1, len(steps)):
            if not steps[i] > steps[i - 1]:
                raise ConfigError(
                    f"explosion_step: steps must be strictly increasing; step {steps[i]} follows {steps[i - 1]} "
                    f"at position {i}"
                )
    run_min = math.inf
    start: int | None = None  # entry where the current streak of high entries began
    for i, raw in enumerate(losses):
        value = float(raw)
        finite = math.isfinite(value)
        if finite:
            run_min = min(run_min, value)
        step = i if steps is None else steps[i]
        high = not finite or (step >= warmup and run_min > 0.0 and value > factor * run_min)
        if not high:
            start = None
            continue
        if start is None:
            start = i
        if not finite or i - start + 1 >= patience:
            return start if steps is None else int(steps[start])
    return None
