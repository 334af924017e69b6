"""Which diagnostics an overhead budget schedules, and the budget a Monitor uses.

Split from :mod:`diagnostics.tracking.budget` (which re-exports these names); the rule that schedules
them is documented there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diagnostics.errors import ConfigError
from diagnostics.metrics.base import Diagnostic

__all__ = ["DEFAULT_BUDGET", "budgeted", "explicit_names", "resolve_budget", "scheduled_names"]

#: The budget of the ``standard`` preset: monitor time / training time.
DEFAULT_BUDGET = 0.05


def resolve_budget(budget: Any, spec: Any) -> float | None:
    """The budget a Monitor uses: ``budget`` itself, or for ``"auto"`` :data:`DEFAULT_BUDGET` when
    ``spec`` (the Monitor's ``diagnostics``) is the ``standard`` preset and None (fixed schedules) otherwise.

    Raises:
        ConfigError: ``budget`` is neither "auto", None nor a number in (0, 1].
    """
    if isinstance(budget, str) and budget == "auto":
        return DEFAULT_BUDGET if spec is None or (isinstance(spec, str) and spec == "standard") else None
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < float(budget) <= 1:
        raise ConfigError(
            f"budget must be a fraction of training time in (0, 1], None or 'auto'; got {budget!r}"
        )
    return float(budget)


def explicit_names(diagnostics: Sequence[Diagnostic], every: int | Mapping[str, int] | None) -> set[str]:
    """Names whose schedule the Monitor's ``every`` argument fixes: all for an int, the keys of a mapping."""
    if every is None:
        return set()
    if isinstance(every, Mapping):
        return set(every)
    return {d.name for d in diagnostics}


def scheduled_names(diagnostics: Sequence[Diagnostic], explicit: set[str]) -> list[str]:
    """Names the budget schedules, in list order: every diagnostic that is :func:`budgeted` and whose schedule
    ``every=`` does not fix. The others keep their schedules."""
    return [d.name for d in diagnostics if budgeted(d) and d.name not in explicit]


def budgeted(d: Diagnostic) -> bool:
    """Whether a budget schedules ``d``: its ``budgeted`` flag, or when unset, whether it runs passes or
    decompositions of its own (it is not ``reads_only``)."""
    flag = getattr(d, "budgeted", None)
    return bool(flag) if flag is not None else not getattr(d, "reads_only", False)
