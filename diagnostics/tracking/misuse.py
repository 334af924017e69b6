"""The Monitor's misuse checks: once-only reports of runs that would look healthy while measuring nothing.

Five causes (docs/monitor.md, "Misuse warnings"):

- ``no_grads``: ``monitor.step`` was called while no trainable parameter has a ``.grad`` (before
  ``backward()``, or after ``zero_grad()``) and a due diagnostic reads gradients; those diagnostics are
  given the status ``skipped`` instead of running (:func:`missing_grads`).
- ``nothing_measured``: a diagnostic returned that status (no linear layer, no attention module, ...).
- ``schedule``: at ``close()``, a diagnostic ran once or never in the steps seen
  (:meth:`MisuseReporter.schedule_events`).
- ``probe_mode``: reported by a diagnostic itself (``sharpness``, see its module).
- ``eval_mode``: ``monitor.step`` found the model in eval mode after a backward while it has dropout or
  batch-norm layers, or while a diagnostic reads the training forward (:func:`eval_mode_event`).

:class:`MisuseReporter` keeps the first event of each ``(cause, diagnostic)``, warns once with a
:class:`~diagnostics.errors.MisuseWarning` and, when strict, raises
:class:`~diagnostics.errors.MisuseError` instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

from torch import nn

from diagnostics.errors import MisuseError, MisuseWarning
from diagnostics.metrics.base import Diagnostic
from diagnostics.metrics.context import StepContext
from diagnostics.metrics.misuse import MISUSE, misuse_event, mode_dependent_modules
from diagnostics.store.records import Event, Record, Status

__all__ = ["MisuseReporter", "any_grads", "eval_mode_event", "missing_grads"]


def any_grads(named_parameters: Iterable[tuple[str, nn.Parameter]]) -> bool:
    """Whether any of the parameters has a ``.grad`` (a backward ran since the last ``zero_grad``).

    Cost: a scan that stops at the first parameter with a gradient (the first one, in a normal step).
    """
    return any(p.grad is not None for _, p in named_parameters)


def missing_grads(diags: Sequence[Diagnostic], ctx: StepContext) -> list[Diagnostic]:
    """The diagnostics of ``diags`` that read ``.grad`` when no trainable parameter has one, else [].

    Cost: :func:`any_grads`.
    """
    needing = [d for d in diags if "grads" in d.requires]
    if not needing or any_grads(ctx.named_parameters()):
        return []
    return needing


def eval_mode_event(model: nn.Module, step: int, observers: Sequence[Diagnostic]) -> Event | None:
    """The ``eval_mode`` misuse event when the model trains in eval mode, else None.

    Called when ``monitor.step`` finds the model in eval mode with gradients present (a backward ran): the
    training forward then ran in eval mode. That matters when the model has layers that act differently in
    train mode (dropout is off, batch norms use their running statistics: often a forgotten
    ``model.train()``, since Hugging Face's ``from_pretrained`` returns a model in eval mode), or when
    ``observers`` (diagnostics that read the training forward) cannot read it, since eval-mode forwards are
    taken for validation. Cost: one walk over the modules.
    """
    every = mode_dependent_modules(model, limit=None, training=False)
    layers = every[:5]
    if not layers and not observers:
        return None
    what = []
    if layers:
        more = f" and {len(every) - len(layers)} more" if len(every) > len(layers) else ""
        what.append(f"its dropout and batch-norm layers ({', '.join(layers)}{more}) run as in evaluation")
    if observers:
        names = [d.name for d in observers]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        what.append(f"{listed} cannot read the training forward (an eval-mode forward is taken for validation) "
                    "and run forwards of their own")
    return misuse_event(
        "eval_mode", None,
        f"monitor.step({step}) found the model in eval mode after a backward, so the training forward ran in "
        f"eval mode: {'; '.join(what)}. Call model.train() before training (Hugging Face's from_pretrained "
        "returns the model in eval mode), or, if eval-mode training is intended, pass "
        "observe_training_forward=False to the Monitor.",
        layers=layers, num_layers=len(every), diagnostics=[d.name for d in observers],
    )


class MisuseReporter:
    """Deduplicates, warns about and (when ``strict``) raises on misuse events for one Monitor.

    Also counts the steps seen and the calls of each diagnostic, for the schedule check at ``close()``.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.reported: set[tuple[str, str | None]] = set()
        self.steps_seen = 0
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.calls: dict[str, int] = {}
        self._pending: list[Event] = []

    def saw_step(self, step: int) -> None:
        """Count one ``monitor.step`` call. Cost: none."""
        self.steps_seen += 1
        self.first_step = step if self.first_step is None else self.first_step
        self.last_step = step

    def ran(self, name: str) -> None:
        """Count one call of a diagnostic (its compute phase). Cost: none."""
        self.calls[name] = self.calls.get(name, 0) + 1

    def _new(self, events: list[Event]) -> list[Event]:
        """``events`` without the misuse events whose ``(cause, diagnostic)`` was reported before."""
        out = []
        for e in events:
            if e.kind == MISUSE:
                cause = (str(e.data.get("cause")), e.key)
                if cause in self.reported:
                    continue
                self.reported.add(cause)
            out.append(e)
        return out

    def filter(self, events: list[Event]) -> list[Event]:
        """``events`` without misuse events already reported; each new one warns (or raises when strict).

        Raises:
            MisuseError: a new misuse event, when strict (its message names the fix).
        """
        out = self._new(events)
        for e in out:
            if e.kind == MISUSE:
                if self.strict:
                    raise MisuseError(e.message)
                warnings.warn(e.message, MisuseWarning, stacklevel=2)
        return out

    def skipped_for_grads(
        self, diags: Sequence[Diagnostic], step: int
    ) -> list[tuple[list[Record], list[Event], Status]]:
        """Results of ``diags`` skipped for want of gradients: status ``skipped``, no records.

        The first result carries the ``no_grads`` misuse event (reported once per Monitor). Cost: none.
        """
        names = [d.name for d in diags]
        reason = "no gradient: monitor.step was called before backward() or after zero_grad()"
        event = misuse_event(
            "no_grads", None,
            f"monitor.step({step}) found no .grad on any trainable parameter, so {', '.join(names)} measured "
            "nothing (status 'skipped'). Call monitor.step after loss.backward() and before "
            "optimizer.zero_grad() (which sets .grad to None), e.g. backward(); monitor.step(...); "
            "optimizer.step(); optimizer.zero_grad().",
            diagnostics=names,
        )
        events = self.filter([event])
        return [([], events if i == 0 else [], Status(n, "skipped", reason, 0.0)) for i, n in enumerate(names)]

    def schedule_events(self, diags: Sequence[Diagnostic]) -> list[Event]:
        """At ``close()``: a misuse event per diagnostic that ran once or never in two or more steps seen.

        A resumed run counts only the steps this Monitor saw. Returns the new events, warned about; when
        strict they are kept for :meth:`raise_if_strict`, called once the store is closed. Cost: none.
        """
        if self.steps_seen < 2:
            return []
        out = []
        span = f"{self.steps_seen} monitored steps (steps {self.first_step} to {self.last_step})"
        for d in diags:
            n = self.calls.get(d.name, 0)
            if n > 1:
                continue
            times = "never ran" if n == 0 else "ran once"
            out.append(misuse_event(
                "schedule", d.name,
                f"{d.name} {times} in {span}: its schedule is every={d.every} (start={d.start}), longer than "
                f"the run, so its series has {n} point(s). Pass every={{{d.name!r}: n}} to the Monitor with "
                "n well below the run's length, train for longer, or drop it from diagnostics.",
                runs=n, every=d.every, start=d.start, steps_seen=self.steps_seen,
            ))
        out = self._new(out)
        if self.strict:
            self._pending = out
        else:
            for e in out:
                warnings.warn(e.message, MisuseWarning, stacklevel=2)
        return out

    def raise_if_strict(self) -> None:
        """Raise :class:`MisuseError` for the schedule events of :meth:`schedule_events`, when strict."""
        pending, self._pending = self._pending, []
        if pending:
            raise MisuseError("; ".join(e.message for e in pending))
