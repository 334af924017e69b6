"""The phase runner: the due diagnostics of a step run one after another, isolated, timed, failures caught.

A phase is ``compute`` (before the optimizer's update) or ``compute_after_update``. Each diagnostic's
result becomes records, events and a :class:`~diagnostics.store.records.Status`; an exception becomes a
failed status plus an ``estimator_failed`` event, so a diagnostic never breaks the user's training (unless
``strict``). Training cannot tell a phase happened: see :meth:`Runner.run_phase`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from diagnostics import _distributed as _dist
from diagnostics._state import IsolationError, initialised_cuda_devices, isolated, restore_modes
from diagnostics.errors import ConfigError
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.context import StepContext
from diagnostics.metrics.misuse import misuse_event
from diagnostics.store.records import Event, Record, Status, expand_records
from diagnostics.tracking.identity import ModelStructure
from diagnostics.tracking.misuse import MisuseReporter, missing_grads
from diagnostics.tracking.setups import explain_failure

__all__ = ["Result", "Runner", "apply_every", "observe_training_forward"]

Result = tuple[list[Record], list[Event], Status]


def apply_every(diagnostics: Sequence[Diagnostic], every: int | Mapping[str, int] | None) -> None:
    """Override the schedule of every diagnostic (an int) or of some (``{name: every}``); ConfigError on bad input."""
    if every is None:
        return
    names = {d.name: d for d in diagnostics}
    items = every.items() if isinstance(every, Mapping) else ((n, every) for n in names)
    for n, e in items:
        if n not in names:
            raise ConfigError(f"every={{{n!r}: ...}} names no selected diagnostic; selected: {', '.join(names)}")
        if not isinstance(e, int) or isinstance(e, bool) or e < 1:
            raise ConfigError(f"every for {n!r} must be a positive int, got {e!r}")
        names[n].every = e


def observe_training_forward(
    model: nn.Module,
    diagnostics: Sequence[Diagnostic],
    step: int,
    due_next: Callable[[Diagnostic, int], bool] | None = None,
    may_run_next: Callable[[Diagnostic, int], bool] | None = None,
) -> contextlib.ExitStack | None:
    """Enter the hooks of the diagnostics that measure on the user's next training forward.

    Chosen: diagnostics reading layer inputs or activations, due at every step (so at ``step + 1``), that offer
    ``observe_training_forward(model)``; ``due_next(d, step)`` says which are due at every step when
    a budget schedules them (:meth:`~diagnostics.tracking.budget.BudgetScheduler.due_next`). Also those that
    read the training step's backward (``observes_training_backward``, e.g. ``gsnr``) when they may run at
    ``step + 1`` (``may_run_next``: the budget's :meth:`~diagnostics.tracking.budget.BudgetScheduler.may_run_next`,
    else their schedule), entered as ``observe_training_forward(model, step + 1)``: they fall back to
    their own passes when they then do not find what they captured. Returns the ExitStack that ends
    their observation (hooks a diagnostic keeps between observed forwards, disarmed, stay until its
    ``release_hooks``, called here for those no longer chosen), or None when none is chosen; if entering
    one fails, those already entered are exited before the error propagates.
    """
    if due_next is None:
        due_next = lambda d, s: d.every == 1 and d.is_due(s + 1)  # noqa: E731
    if may_run_next is None:
        may_run_next = lambda d, s: d.is_due(s + 1)  # noqa: E731
    offers = [d for d in diagnostics if callable(getattr(d, "observe_training_forward", None))]
    chosen = [d for d in offers if d.requires & {"layer_inputs", "activations"} and due_next(d, step)]
    backward = [d for d in offers if getattr(d, "observes_training_backward", False) and may_run_next(d, step)]
    for d in offers:  # hooks kept from an earlier step by a diagnostic that no longer observes
        if d not in chosen and d not in backward:
            d.release_hooks()
    if not chosen and not backward:
        return None
    stack = contextlib.ExitStack()
    try:
        for d in chosen:
            stack.enter_context(d.observe_training_forward(model))
        for d in backward:
            stack.enter_context(d.observe_training_forward(model, step + 1))
    except BaseException:
        stack.close()
        raise
    return stack


@contextlib.contextmanager
def _as_found(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Leave the torch generators and the modules' modes as found, for the next diagnostic of the phase."""
    with restore_modes(modules), torch.random.fork_rng(devices=initialised_cuda_devices()):
        yield


def _reads_only(d: Diagnostic) -> bool:
    return bool(getattr(d, "reads_only", False))


class Runner:
    """Runs diagnostics' phases for one Monitor.

    Args:
        structure: the model and its current module list (the modes restored after each phase).
        optimizer: compared too when ``check_isolation`` is on.
        strict: re-raise a diagnostic's exception instead of recording it as failed, and raise
            :class:`~diagnostics.errors.MisuseError` on misuse instead of warning.
        check_isolation: verify after every diagnostic that it left all training state unchanged.
        distributed: end each diagnostic that may issue collectives with a meeting of all ranks.
        misuse: the Monitor's misuse reporter (a strict or lenient one of its own by default).
    """

    def __init__(
        self,
        structure: ModelStructure,
        optimizer: torch.optim.Optimizer | None,
        *,
        strict: bool,
        check_isolation: bool,
        distributed: bool,
        misuse: MisuseReporter | None = None,
    ) -> None:
        self.structure = structure
        self.misuse = misuse if misuse is not None else MisuseReporter(strict)
        self.optimizer = optimizer
        self.strict = strict
        self.check_isolation = check_isolation
        self.distributed = distributed

    def run_phase(self, diags: Sequence[Diagnostic], method: str, ctx: StepContext) -> list[Result]:
        """Run ``method`` of each diagnostic inside one isolation context for the phase.

        The phase forks every global RNG stream and restores every module's mode once (saving numpy's
        and Python's generators costs tens of microseconds, too much to repeat per diagnostic on every
        step); around each diagnostic that is not ``reads_only`` only the torch generators and the modes
        are kept as found (microseconds), and the grad mode around every one, so each diagnostic sees
        the same state whether it runs alone or after others.

        Diagnostics that declare ``reads_only`` (they only read tensors the step already holds, draw no
        random numbers and switch no modes) skip the fork; the contract suite verifies the claim with
        ``check_isolation``.

        In the compute phase, diagnostics that read ``.grad`` on a step without gradients are not run:
        they get the status ``skipped`` and the first a ``no_grads`` misuse event
        (:mod:`~diagnostics.tracking.misuse`).
        """
        skipped: dict[str, Result] = {}
        if method == "compute":
            for d in diags:
                self.misuse.ran(d.name)
            lacking = missing_grads(diags, ctx)
            if lacking:
                skipped = dict(zip([d.name for d in lacking], self.misuse.skipped_for_grads(lacking, ctx.step)))
        if not skipped:
            return self._run_isolated(diags, method, ctx)
        ran = iter(self._run_isolated([d for d in diags if d.name not in skipped], method, ctx))
        return [skipped[d.name] if d.name in skipped else next(ran) for d in diags]

    def _run_isolated(self, diags: Sequence[Diagnostic], method: str, ctx: StepContext) -> list[Result]:
        """:meth:`run_phase` after the gradient check: ``method`` of each of ``diags``, isolated."""
        if not diags:
            return []
        model, modules = self.structure.model, self.structure.modules
        full = self.check_isolation or not all(map(_reads_only, diags))
        out = []
        with isolated(model, modules=modules, label=method) if full else contextlib.nullcontext():
            grad_enabled = torch.is_grad_enabled()
            for d in diags:
                reset = full and (self.check_isolation or not _reads_only(d))
                with torch.set_grad_enabled(grad_enabled), _as_found(modules) if reset else contextlib.nullcontext():
                    out.append(self.run(d, getattr(d, method), ctx))
        return out

    def run(self, d: Diagnostic, fn: Callable[[StepContext], Any], ctx: StepContext) -> Result:
        """Run one diagnostic phase timed; failures become a failed Status and an ``estimator_failed`` event,
        the status ``nothing_measured`` a ``misuse`` event (reported once: see
        :class:`~diagnostics.tracking.misuse.MisuseReporter`)."""
        t0 = time.perf_counter()
        # Under torch.distributed a diagnostic that may issue collectives ends with a meeting of all ranks
        # (skipped after RemoteFailure: that abandoned collective was the meeting).
        sync = self.distributed and not _reads_only(d)
        try:
            if self.check_isolation:
                model, modules = self.structure.model, self.structure.modules
                with isolated(model, optimizer=self.optimizer, modules=modules, check=True, label=d.name):
                    out = fn(ctx)
            else:
                out = fn(ctx)
            if isinstance(out, Output):
                records, events = list(out.records), list(out.events)
                status, reason, nmv = out.status, out.reason, out.num_matvecs
            else:
                records, events, status, reason, nmv = list(out or []), [], "ok", None, None
            if status == "failed":
                records = []
            elif not getattr(d, "allow_nonfinite", False):
                bad = next((r for r in expand_records(records) if not math.isfinite(r.value)), None)
                if bad is not None:
                    raise FloatingPointError(f"non-finite value {bad.value} in {bad.metric}[{bad.key}, {bad.index}]")
            ctx.publish_records(records)  # for diagnostics that read this step's values (``after``)
        except IsolationError:
            raise
        except Exception as exc:  # noqa: BLE001 - a diagnostic must never break the user's training
            sync = sync and not isinstance(exc, _dist.RemoteFailure)
            if self.strict:
                if sync:
                    _dist.end_phase(True)
                raise
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            records, events, status, nmv = [], [], "failed", None
            reason = (explain_failure(exc) or f"{type(exc).__name__}: {exc}")[:500]
        if sync and _dist.end_phase(status == "failed") and status != "failed":
            if self.strict:
                raise _dist.RemoteFailure(f"{d.name} failed on another rank at step {ctx.step}")
            records, events, status, nmv = [], [], "failed", None
            reason = "failed on another rank"
        seconds = time.perf_counter() - t0
        if status == "failed":
            events = events + [
                Event(
                    kind="estimator_failed",
                    message=f"{d.name} failed at step {ctx.step}: {reason}",
                    severity="warning",
                    key=d.name,
                    data={"diagnostic": d.name, "reason": reason},
                )
            ]
        elif status == "nothing_measured":
            events = events + [misuse_event(
                "nothing_measured", d.name, f"{d.name} found nothing to measure at step {ctx.step}: "
                f"{reason or 'no reason given'}", reason=reason)]
        # Misuse events are stored and warned about once per cause and diagnostic (raised when strict).
        events = self.misuse.filter(events)
        return records, events, Status(d.name, status, reason, seconds, nmv)
