"""The explosion step of a loss curve: the suite's ground truth for every detector's lead time.

The definition lives in :mod:`diagnostics.explosion` (``explosion_step``), shared with the demo and
the HTML report's findings so that all three date an explosion identically. In short: the first step of
the first streak of ``patience`` (10) consecutive *high* recorded steps, a step being high when its loss
is non-finite, or when it is at step >= ``warmup`` (20) and its loss exceeds ``factor`` (2) times the
running minimum of the finite losses; a non-finite loss completes its streak at once. This module keeps
the suite's import path (trainer, evaluation, run_with_monitor).
"""

from __future__ import annotations

from diagnostics.explosion import explosion_step

__all__ = ["explosion_step"]
