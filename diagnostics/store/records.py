"""Plain, torch-free records that diagnostics produce and the store persists.

Long format: one :class:`Record` per scalar, ``(metric, key, index, value)``; the step is added by the
writer. ``key`` is a parameter or module name, or ``"all"`` for whole-model values; vectors (eigenvalues,
density nodes, histograms) use ``index``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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
class VectorRecord:
    """One metric's values over many keys (a statistic per layer) at one step, in one object.

    The same rows as ``[Record(metric, v, k, index) for k, v in zip(keys, values)]`` (:meth:`expand`, which
    is what every reader of a step's records sees), stored as one vector row (``diagnostics.store.vectors``)
    without a Python object per layer: for a diagnostic that writes a few statistics of dozens of layers at
    every step. ``values`` are Python floats (NaN, inf allowed). Keys that would not form one vector row as
    records (fewer than four, one twice, or ``"all"``) are written as the records would be.
    """

    metric: str
    keys: tuple[str, ...]
    values: tuple[float, ...]
    index: int = 0

    def expand(self) -> list[Record]:
        """The equivalent :class:`Record` per key."""
        return [Record(self.metric, v, k, self.index) for k, v in zip(self.keys, self.values, strict=True)]


def expand_records(records: Iterable[Record | VectorRecord]) -> Iterator[Record]:
    """``records`` with each :class:`VectorRecord` replaced by its records (in order)."""
    for r in records:
        if type(r) is VectorRecord:
            yield from r.expand()
        else:
            yield r  # type: ignore[misc]


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
