"""Plain, torch-free records that diagnostics produce and the store persists.

Long format: one :class:`Record` per scalar, ``(metric, key, index, value)``; the step is added by the
writer. ``key`` is a parameter or module name, or ``"all"`` for whole-model values; vectors (eigenvalues,
density nodes, histograms) use ``index``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Record:
    """One scalar of one metric at one step. ``value`` is a Python float (NaN and inf allowed)."""

    metric: str
    value: float
    key: str = "all"
    index: int = 0


@dataclass(frozen=True)
class Event:
    """Something worth a user's attention at a step: an alarm, a threshold crossing, a non-finite value.

    ``severity`` is ``"info"``, ``"warning"`` or ``"error"``; ``data`` is JSON-serialisable evidence.
    """

    kind: str
    message: str
    severity: str = "info"
    metric: str | None = None
    key: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Status:
    """How one diagnostic fared at one step.

    ``status`` is ``"ok"``, ``"not_converged"`` (an estimate stopped by its budget or tolerance; its
    numbers are stored but flagged), ``"failed"`` (no numbers stored; ``reason`` says why),
    ``"skipped"`` (not run: the step lacked what it needs, such as gradients; ``reason`` says what),
    ``"nothing_measured"`` (it ran but the model has nothing it measures, such as no attention module) or
    ``"continues"`` (a run cut at its per-call limit goes on at a later call; no numbers yet).
    """

    diagnostic: str
    status: str = "ok"
    reason: str | None = None
    seconds: float = 0.0
    num_matvecs: int | None = None
