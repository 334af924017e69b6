"""Actions: what the Monitor does with the warning events diagnostics raise.

An action is "record" (store the event only, the default), "warn" (also a RuntimeWarning), "checkpoint"
(save model and optimizer state into the run directory), "stop" (raise
:class:`~diagnostics.errors.StopTraining` once the step is committed) or a callable ``f(event, step)``.
A diagnostic's own ``action`` attribute wins over an action chosen by its name, which wins over one chosen
by the event's kind, which wins over the default.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diagnostics import _distributed as _dist
from diagnostics.errors import ConfigError, StopTraining
from diagnostics.metrics.base import Diagnostic
from diagnostics.store.records import Event

__all__ = ["ACTIONS", "Action", "ActionPolicy", "check_action", "run_actions", "save_checkpoint"]

ACTIONS = ("record", "warn", "checkpoint", "stop")

Action = str | Callable[[Event, int], Any]


def check_action(action: Any, where: str) -> None:
    """ConfigError naming ``where`` unless ``action`` is None, one of :data:`ACTIONS` or a callable."""
    if action is None or callable(action):
        return
    if action not in ACTIONS:
        raise ConfigError(f"{where}: action must be one of {', '.join(ACTIONS)} or a callable(event, step), got {action!r}")


class ActionPolicy:
    """Chooses the action for each event a diagnostic raised.

    Args:
        actions: one action for every event, or ``{diagnostic name or event kind: action}``; None records.
        diagnostics: the selected diagnostics (their own ``action`` attributes are validated here).
    """

    def __init__(self, actions: Action | Mapping[str, Action] | None, diagnostics: Iterable[Diagnostic]) -> None:
        self.default: Action = "record"
        self.by_name: dict[str, Action] = {}
        if isinstance(actions, Mapping):
            for k, a in actions.items():
                check_action(a, f"actions[{k!r}]")
                self.by_name[str(k)] = a
        elif actions is not None:
            check_action(actions, "actions")
            self.default = actions
        for d in diagnostics:
            check_action(getattr(d, "action", None), f"diagnostic {d.name!r}")

    def action_for(self, d: Diagnostic | None, event: Event) -> Action:
        """The action for ``event`` raised by ``d``: its own, by its name, by the event's kind, the default."""
        if d is not None and getattr(d, "action", None) is not None:
            return d.action  # type: ignore[attr-defined]
        if d is not None and d.name in self.by_name:
            return self.by_name[d.name]
        if event.kind in self.by_name:
            return self.by_name[event.kind]
        return self.default

    def actionable(self, events: Iterable[tuple[Diagnostic | None, Event]]) -> list[tuple[Event, Action]]:
        """Warning and error events paired with their actions, in order."""
        out = []
        for d, e in events:
            # The Monitor's own estimator_failed and misuse events describe the tooling, not the training:
            # no actions (misuse warns, or raises when strict, by itself).
            if e.kind in ("estimator_failed", "misuse") or e.severity not in ("warning", "error"):
                continue
            out.append((e, self.action_for(d, e)))
        return out

    def stops(self, events: Iterable[tuple[Diagnostic | None, Event]]) -> bool:
        """Whether any of ``events`` has the action "stop" (on this rank)."""
        return any(a == "stop" for _, a in self.actionable(events))


def run_actions(
    actionable: Iterable[tuple[Event, Action]],
    step: int,
    *,
    checkpoint: Callable[[int], Any],
    before_stop: Callable[[], Any],
    distributed: bool,
) -> None:
    """Carry out each action; raise StopTraining after ``before_stop()`` when a "stop" was among them.

    Under torch.distributed the stop is all-reduced, so every rank stops at the same step (a collective:
    every rank must call this at every committed step).
    """
    stop: Event | None = None
    for event, action in actionable:
        if action == "record":
            continue
        if action == "warn":
            warnings.warn(f"diagnostics: {event.message}", RuntimeWarning, stacklevel=5)
        elif action == "checkpoint":
            checkpoint(step)
        elif action == "stop":
            stop = stop or event
        else:
            action(event, step)  # type: ignore[operator]
    stop_anywhere = _dist.all_ranks_any(stop is not None) if distributed else stop is not None
    if stop_anywhere:
        before_stop()
        if stop is None:
            raise StopTraining(f"training stopped at step {step}: a stop action on another rank")
        raise StopTraining(f"training stopped at step {step}: {stop.message}", event=stop)


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Path:
    """Save model (and optimizer) state to ``run_dir/checkpoints/step_<step>.pt``; returns the path.

    Cost: one ``torch.save`` of the model's (and optimizer's) state dict.
    """
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step}.pt"
    payload = {"step": step, "model": model.state_dict()}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    torch.save(payload, path)
    return path
