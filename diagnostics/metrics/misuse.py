"""Misuse: a diagnostic run in a way that measures nothing or measures something other than it claims.

A diagnostic reports misuse by returning an :class:`~diagnostics.store.records.Event` of kind
:data:`MISUSE` built by :func:`misuse_event` (or, for a model with nothing to measure, the status
``"nothing_measured"``, which the Monitor turns into such an event). The Monitor stores the first event
of each cause per diagnostic, warns once with a :class:`~diagnostics.errors.MisuseWarning`, and raises
:class:`~diagnostics.errors.MisuseError` instead when it is strict (docs/monitor.md, "Misuse warnings").

    >>> e = misuse_event("no_grads", "grad_norm", "no gradient at step 3: call monitor.step after backward()")
    >>> e.kind, e.severity, e.key, e.data["cause"]
    ('misuse', 'warning', 'grad_norm', 'no_grads')
"""

from __future__ import annotations

from typing import Any

from torch import nn

from diagnostics.store.records import Event

__all__ = ["MISUSE", "misuse_event", "mode_dependent_modules", "train_mode_modules"]

#: The event kind of every misuse report.
MISUSE = "misuse"


def misuse_event(cause: str, diagnostic: str | None, message: str, **data: Any) -> Event:
    """A warning event of kind ``misuse``: ``cause`` names the check, ``message`` the problem and its fix.

    Returns an Event keyed by the diagnostic concerned (None for the Monitor itself); ``data`` holds
    ``cause``, ``diagnostic`` and the JSON-serialisable evidence given. Cost: none.
    """
    return Event(kind=MISUSE, message=message, severity="warning", key=diagnostic,
                 data={"cause": cause, "diagnostic": diagnostic, **data})


def train_mode_modules(model: nn.Module, limit: int = 5) -> list[str]:
    """Names of modules in training mode whose forward changes in eval mode (at most ``limit``).

    Those are dropout layers with ``p > 0`` (``nn.Dropout*``, and the attention dropout of
    ``nn.MultiheadAttention``) and batch norms that keep running statistics. A loss computed in training
    mode through one of them differs from the eval-mode loss curvature estimates use by default.
    Returns ``"name (Class)"`` per module (``"(model)"`` names the root). Cost: one walk over the modules.
    """
    return mode_dependent_modules(model, limit, training=True)


def mode_dependent_modules(model: nn.Module, limit: int | None = 5, training: bool = True) -> list[str]:
    """Names of modules whose forward differs between train and eval mode (at most ``limit``, None: all):
    dropout with ``p > 0`` and batch norms that keep running statistics (see :func:`train_mode_modules`),
    those now in train mode (``training=True``) or in eval mode (``False``). Returns ``"name (Class)"`` per
    module. Cost: one walk over the modules."""
    found = []
    for name, m in model.named_modules():
        if m.training != training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd):
            differs = m.p > 0
        elif isinstance(m, nn.MultiheadAttention):
            differs = m.dropout > 0
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            differs = m.track_running_stats and m.running_mean is not None
        else:
            differs = False
        if differs:
            found.append(f"{name or '(model)'} ({type(m).__name__})")
            if limit is not None and len(found) >= limit:
                break
    return found
