"""The Monitor: the edge between a training loop and the diagnostics.

Usage::

    with Monitor(model, run="runs/exp1", diagnostics="standard", optimizer=opt) as monitor:
        for step, batch in enumerate(loader):
            loss = loss_fn(model, batch)
            loss.backward()
            monitor.step(step, batch, loss)      # after backward(), before optimizer.step()
            opt.step()
            opt.zero_grad()

Each step it runs the due diagnostics isolated and timed (:mod:`~diagnostics.tracking.runner`), commits
the step's records, events and statuses to the run store in one transaction (:mod:`~.commit`) and carries
out the actions of warning events (:mod:`~.actions`). A failing diagnostic becomes a failed status plus an
``estimator_failed`` event; training never sees the exception unless ``strict=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diagnostics import _distributed as _dist
from diagnostics._batch import detach_batch
from diagnostics._state import autograd_on
from diagnostics.errors import ConfigError, DataError
from diagnostics.gradients.accumulation import AccumulatedMoments
from diagnostics.linalg.lanczos_basis import BasisWorkspace
from diagnostics.metrics.base import Diagnostic
from diagnostics.metrics.context import StepContext
from diagnostics.metrics.flat_buffers import FlatBufferPool
from diagnostics.metrics.registry import resolve_diagnostics
from diagnostics.store.records import Event
from diagnostics.tracking import budget as _budget
from diagnostics.tracking import probes
from diagnostics.tracking.actions import ACTIONS, Action, ActionPolicy, run_actions
from diagnostics.tracking.actions import save_checkpoint as _save_checkpoint
from diagnostics.tracking.commit import CommitPipeline, PendingStep, open_store
from diagnostics.tracking.fsdp import check_fsdp_diagnostics, gathered_replica, is_fsdp, needs_replica
from diagnostics.tracking.identity import ModelStructure, model_fingerprint, model_summary, run_meta
from diagnostics.tracking.misuse import MisuseReporter, any_grads, eval_mode_event
from diagnostics.tracking.runner import Runner, apply_every, observe_training_forward
from diagnostics.tracking.setups import compile_mode, full_precision
from diagnostics.tracking.state_codec import (
    decode_state,
    diagnostics_state,
    encode_state,
    load_diagnostics_state,
)

__all__ = ["ACTIONS", "Monitor", "decode_state", "encode_state", "model_fingerprint", "model_summary"]

# Requirements that make a diagnostic call the loss on some data.
_USES_LOSS = frozenset({"per_sample_grads", "curvature", "activations", "layer_inputs"})


class Monitor:
    """Runs registered diagnostics inside a training loop and writes them to a run store.

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (mean reduction); default
            :func:`diagnostics.loss.default_loss`. Used by diagnostics that need extra passes.
        run: run directory (created); an existing run of the same model is resumed, one of another
            model is refused. Default ``runs/<date-time>``.
        diagnostics: a preset ("cheap" | "standard" | "full"), names, Diagnostic instances, or
            ``{name: options}``.
        optimizer: needed for the learning rate and for diagnostics that need the update (they are then
            computed from an optimizer step post-hook registered only on steps where they are due);
            without it the update is taken at the next ``step()`` or ``close()``.
        probe_data: fixed batches for curvature estimates; default: detached copies of the first
            ``probe_batches`` batches passed to :meth:`step`.
        strict: re-raise a diagnostic's exception instead of recording it as failed, and raise
            :class:`~diagnostics.errors.MisuseError` where a :class:`~diagnostics.errors.MisuseWarning`
            would be warned (docs/monitor.md, "Misuse warnings").
        num_classes: recorded and passed to diagnostics (default k of top-subspace estimates).
        every: override every diagnostic's schedule (int) or some (``{name: every}``).
        meta: extra JSON metadata stored under the run's ``config``.
        actions: what to do with warning events from diagnostics: "record" (default), "warn", "checkpoint",
            "stop" (raise :class:`~diagnostics.errors.StopTraining` after the step is committed), a callable
            ``f(event, step)``, or a dict by diagnostic name or event kind. A diagnostic's own ``action``
            attribute (``get_diagnostic(name, action=...)``) takes precedence.
        probe_batches: how many batches to copy as probe data when ``probe_data`` is None.
        name: run name (meta ``run_name``).
        curvature_mode: "eval" (default) or "train" for the forward passes inside curvature estimates.
        max_memory_bytes: budget for chunking per-sample gradients.
        rank_zero_only: under torch.distributed every rank computes (the curvature operators all-reduce
            over the ranks' shards, so every rank must join) and only rank 0 writes; False gives each rank
            its own store in ``RUN-rank{r}`` (merge them with ``tdiag combine``). Alarms are all-reduced:
            a "stop" on any rank stops every rank at the same step.
        state_every: save diagnostics' state to the run's metadata every this many monitored steps.
        check_isolation: debug option; verify after every diagnostic that parameters, buffers, grads,
            modes, hooks, RNG and optimizer state are unchanged (costs copies of them; for tests).
        async_writes: commit each step on a background thread while the next training step runs (at most
            one commit outstanding: a killed process loses at most the step being committed and the one in
            flight). Off by default: with CPU-bound steps the GIL hand-offs (5 ms switch interval) cost more
            than the commit (measured in benchmarks/overhead.py); it can help when the training thread
            mostly waits on an accelerator.
        observe_training_forward: let diagnostics that read layer inputs and are due at every step (they
            offer ``observe_training_forward(model)``, e.g. ``spectral_alignment``) measure on the
            user's own training forward instead of running a forward of their own: their scoped hooks
            are installed at the end of :meth:`step` and removed at the start of the next one (or in
            :meth:`close`). They read detached inputs under no_grad with private generators, so
            training is unchanged. Any forward between two steps is seen (the hooks keep the first
            ``max_tokens`` tokens); without one, the diagnostic runs its own forward as before.
        mirrors: also send each committed step's scalars to loggers: "tensorboard", "wandb", "mlflow",
            a ``SummaryWriter``, a :class:`~diagnostics.tracking.mirrors.Mirror` or a callable
            ``f(step, scalars)`` (see :mod:`diagnostics.tracking.mirrors`); only on writing ranks.
        budget: overhead budget, monitor time / training time (docs/monitor.md, "Overhead budget"): the
            diagnostics that run passes of their own and whose schedule ``every`` does not fix are run as
            often as it allows. ``"auto"``: 0.05 for the ``standard`` preset, fixed schedules otherwise;
            None: fixed schedules.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        run: str | os.PathLike[str] | None = None,
        diagnostics: Any = "standard",
        optimizer: torch.optim.Optimizer | None = None,
        probe_data: Any = None,
        strict: bool = False,
        num_classes: int | None = None,
        every: int | Mapping[str, int] | None = None,
        meta: Mapping[str, Any] | None = None,
        *,
        actions: Action | Mapping[str, Action] | None = None,
        probe_batches: int = 1,
        name: str | None = None,
        curvature_mode: str = "eval",
        max_memory_bytes: int | None = None,
        rank_zero_only: bool = True,
        state_every: int = 100,
        check_isolation: bool = False,
        async_writes: bool = False,
        mirrors: Any = None,
        observe_training_forward: bool = True,
        budget: float | str | None = "auto",
    ) -> None:
        # Everything that can be checked is checked before the run directory is touched.
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError("loss_fn must be callable as loss_fn(model, batch) -> scalar tensor")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if curvature_mode not in ("eval", "train"):
            raise ConfigError(f"curvature_mode must be 'eval' or 'train', got {curvature_mode!r}")
        if int(probe_batches) < 1:
            raise ConfigError(f"probe_batches must be at least 1, got {probe_batches}")
        if meta is not None and not isinstance(meta, Mapping):
            raise ConfigError(f"meta must be a dict, got {type(meta).__name__}")
        # A compiled graph does not see hooks added later (see diagnostics.tracking.setups).
        observe_training_forward = observe_training_forward and compile_mode(model) != "wrapper"
        # DDP's forward would arm its reducer and broadcast buffers; diagnostics use the wrapped module.
        model = _dist.unwrap_model(model)
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.strict = bool(strict)
        self.num_classes = num_classes
        self.curvature_mode = curvature_mode
        self.max_memory_bytes = max_memory_bytes
        self.probe_batches = int(probe_batches)
        self.state_every = max(1, int(state_every))
        self.check_isolation = bool(check_isolation)
        self.observe_training_forward = bool(observe_training_forward)
        # Hooks held open between two steps (see observe_training_forward); closed in finally.
        self._observing: contextlib.ExitStack | None = None
        self._hook_seconds: dict[str, float] = {}  # the diagnostics' hook time taken at this call
        self.diagnostics: list[Diagnostic] = resolve_diagnostics(diagnostics)
        apply_every(self.diagnostics, every)
        # Read at every call, listed once: whose hooks keep a clock, who may watch the training forward,
        # and whose run may continue at a later call.
        self._hook_clocks = [(d.name, c) for d in self.diagnostics if (c := getattr(d, "hook_clock", None)) is not None]
        self._observers = [d for d in self.diagnostics if callable(getattr(d, "observe_training_forward", None))]
        self._eval_mode_reported = False  # the eval_mode misuse check (once per Monitor)
        self._may_carry = [d for d in self.diagnostics if type(d).unfinished_run is not Diagnostic.unfinished_run]
        self.budget = _budget.resolve_budget(budget, diagnostics)
        self._budget: _budget.BudgetScheduler | None = None
        if self.budget is not None:
            self._budget = _budget.BudgetScheduler(
                self.budget, self.diagnostics, _budget.explicit_names(self.diagnostics, every),
                sync=_dist.broadcast_object if _dist.is_distributed() else None,  # rank 0 decides for all
            )
        self._fsdp = is_fsdp(model)  # FSDP2: see diagnostics.tracking.fsdp
        if self._fsdp:
            check_fsdp_diagnostics(self.diagnostics)
            self.observe_training_forward = False
        self._policy = ActionPolicy(actions, self.diagnostics)
        self._uses_loss = loss_fn is not None or any(_USES_LOSS & d.requires for d in self.diagnostics)
        self._structure = ModelStructure(model)
        self._user_probe = probe_data is not None
        self.probe_data: list[Any] = probes.probe_list(probe_data, self.probe_batches)
        if self._user_probe:
            if not self.probe_data:
                raise DataError("probe_data is empty; pass at least one batch or leave it None")
            for i, b in enumerate(self.probe_data):
                self._check_batch(b, f"probe_data[{i}]")
        self._batch_checked = False
        # Moments of the step's micro-batch gradients (Monitor.microbatch), when a diagnostic reads them.
        self._accumulated = AccumulatedMoments() if any(d.uses_accumulation for d in self.diagnostics) else None
        # The parameters' flat copies (weight norms, the update snapshot, the update), kept between steps
        # while every step uses them: fresh ones cost page faults at every step.
        self._flat_buffers = FlatBufferPool()
        # The curvature probes' Lanczos basis, kept from one probe to the next (fresh memory is mapped and
        # zeroed row by row as Lanczos writes it).
        self._basis_workspace = BasisWorkspace()
        self._pending: PendingStep | None = None
        self._closed = False
        self._monitored = 0
        self.last_step: int | None = None

        self.writes = True
        self._distributed = _dist.is_distributed()
        if rank_zero_only and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.writes = torch.distributed.get_rank() == 0
        self._misuse = MisuseReporter(self.strict)
        self._runner = Runner(self._structure, optimizer, strict=self.strict, check_isolation=self.check_isolation,
                              misuse=self._misuse,
                              distributed=self._distributed)

        if run is None:
            # Every rank needs the same name: rank 0's clock decides.
            run = _dist.broadcast_object(Path("runs") / _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S"))
        self.run_dir = Path(run).expanduser()
        if self._distributed and not rank_zero_only:
            self.run_dir = _dist.rank_run_dir(self.run_dir)
        self.fingerprint = model_fingerprint(model)
        self.writer: Any = None
        self.mirrors: list[Any] = []
        self.resumed = False
        self._commits: CommitPipeline | None = None
        if self.writes:
            self._open_store(name, meta, mirrors, async_writes)

    def _open_store(self, name: str | None, meta: Mapping[str, Any] | None, mirrors: Any, async_writes: bool) -> None:
        """Open or resume the run store (restoring diagnostics' state and probe data), then the mirrors."""
        info = run_meta(self.model, self.diagnostics, meta, curvature_mode=self.curvature_mode, num_classes=self.num_classes)
        info["budget"] = self.budget
        self.writer, resumed_meta = open_store(self.run_dir, self.fingerprint, name, info)
        try:
            self.resumed = bool(resumed_meta)
            if resumed_meta:
                load_diagnostics_state(self.diagnostics, resumed_meta.get("diagnostic_state") or {})
                if self._budget is not None:
                    self._budget.load_state_dict((resumed_meta.get("diagnostic_state") or {}).get(_budget.STATE_KEY))
                saved = None if self._user_probe else probes.load_probe(self.run_dir)
                if saved is not None:
                    self.probe_data = saved
            from diagnostics.tracking.mirrors import resolve_mirrors

            self.mirrors = resolve_mirrors(mirrors, self.run_dir)
        except BaseException:
            self.writer.close()
            raise
        self._commits = CommitPipeline(self.writer, self.mirrors, async_writes=async_writes, strict=self.strict)
        self.mirrors = self._commits.mirrors

    def _check_batch(self, batch: Any, what: str) -> None:
        probes.check_batch(self.model, self.loss_fn, batch, what, self._structure.modules)

    def set_meta(self, key: str, value: Any) -> None:
        """Record ``key: value`` in the run's metadata (JSON-serialisable); nothing happens on ranks that do
        not write. Integrations and ``analyze`` say here which gradients the Monitor saw."""
        if self._commits is not None:
            self._commits.set_meta(key, value)

    # --- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every diagnostic's ``state_dict()`` by name, JSON-encoded (what a resumed run restores), and the
        budget's schedule under ``"monitor.budget"``."""
        state = diagnostics_state(self.diagnostics)
        if self._budget is not None:
            state[_budget.STATE_KEY] = self._budget.state_dict()
        return state

    def _save_state(self) -> None:
        if self._commits is None:
            return
        self._commits.set_meta("diagnostic_state", self.state_dict())
        if self.last_step is not None:
            self._commits.set_meta("last_step", self.last_step)

    # --- the training-loop API ------------------------------------------------------------------------
    def step(
        self, step: int, batch: Any = None, loss: torch.Tensor | float | None = None, *, source: str | None = None
    ) -> None:
        """Run the diagnostics due at ``step``; call after ``loss.backward()``, before ``optimizer.step()``.

        Args:
            step: the global step (int, non-decreasing).
            batch: the step's batch as the loss consumes it (needed by diagnostics that run extra passes).
            loss: the scalar loss backward() was called on (tensor or float).
            source: names the input the step came from (a checkpoint path in ``tdiag analyze``); stored
                with the step's rows and marked completed when the step is committed.

        Raises:
            LossError: ``loss`` is not a scalar; DataError: the loss cannot consume ``batch`` (checked on
            the first step that needs it, before anything is written); StopTraining: a warning event's
            action is "stop" (raised after the step is committed).
        """
        if self._closed:
            raise ConfigError("monitor.step() called after close(); create a new Monitor to resume the run")
        # All of the call is monitor time, the removal of the previous step's hooks included (outside the
        # timed call, the budget would count it as training time).
        with _budget.timed_call(self._budget):
            self._stop_observing()
            # What the diagnostics' hooks spent inside the training step since the last call is theirs.
            self._hook_seconds = {name: s for name, clock in self._hook_clocks if (s := clock.take())}
            if self._budget is not None and self._hook_seconds:
                self._budget.charge(sum(self._hook_seconds.values()))
            try:
                # Diagnostics in the parameters' dtype, even inside torch.autocast, and with autograd even when
                # the caller's code runs under torch.inference_mode (curvature products differentiate).
                with full_precision(), torch.inference_mode(False):
                    self._step(step, batch, loss, source)
            finally:
                if self._accumulated is not None:  # the next step accumulates afresh
                    self._accumulated.reset()
            if self.observe_training_forward and (self.writes or self._distributed):
                budget = self._budget
                self._observing = observe_training_forward(
                    self.model, self._observers, step, budget.due_next if budget is not None else None,
                    budget.may_run_next if budget is not None else None)

    def microbatch(self) -> None:
        """Report one micro-batch of gradient accumulation: call after each micro-batch's ``backward()``,
        before ``monitor.step`` and ``optimizer.step()``.

        Diagnostics that read micro-batch gradients (``gsnr_microbatch``) then use the step's micro-batches
        (the change of ``.grad`` over each) instead of running passes of their own. The micro-batches must
        accumulate into ``.grad``: a ``zero_grad()`` between them makes each change the difference of two
        micro-batch gradients, which nothing after the fact can tell apart. A no-op when none is
        monitored. Reads ``.grad`` only. Cost: five elementwise passes over the gradients per micro-batch;
        memory: three copies of the gradients while the step accumulates.
        """
        if self._closed:
            raise ConfigError("monitor.microbatch() called after close(); create a new Monitor to resume the run")
        if self._accumulated is not None:
            with _budget.timed_work(self._budget):  # monitor time, not training time
                self._accumulated.observe(self._named_parameters())

    def _stop_observing(self) -> None:
        """Remove the hooks installed by the previous step (idempotent)."""
        stack, self._observing = self._observing, None
        if stack is not None:
            stack.close()

    def _step(self, step: int, batch: Any, loss: torch.Tensor | float | None, source: str | None) -> None:
        step = probes.check_step(step, loss)
        self._misuse.saw_step(step)
        self._finish_pending()
        self._flat_buffers.new_step()
        # Under torch.distributed every rank computes (collectives need all of them); others stop here.
        if not self.writes and not self._distributed:
            return
        if self._uses_loss and not self._batch_checked:
            if not self._user_probe or batch is not None:
                self._check_batch(batch, f"the batch of step {step}")
            self._batch_checked = True
        if not self._user_probe and len(self.probe_data) < self.probe_batches and batch is not None:
            self.probe_data.append(detach_batch(batch))
            if len(self.probe_data) == self.probe_batches and self._uses_loss and self.writer is not None:
                probes.save_probe(self.run_dir, self.probe_data)
        carried: set[str] = set()
        if self._budget is not None:
            due = self._budget.due(step, self.diagnostics)
            unfinished = [d.name for d in self._may_carry if d.unfinished_run and d not in due]
            if unfinished:  # a run stopped by the per-call limit continues at every step until it ends
                carried = set(self._budget.carry_on(unfinished))
                due = [d for d in self.diagnostics if d in due or d.name in carried]
        else:
            due = [d for d in self.diagnostics if d.is_due(step)]
        self.last_step = step
        if not due:
            return
        loss_value = None
        if loss is not None:
            loss_value = float(loss.detach().item()) if torch.is_tensor(loss) else float(loss)
        ctx = StepContext(
            step=step,
            model=gathered_replica(self.model) if self._fsdp and needs_replica(due) else self.model,
            loss_fn=self.loss_fn,
            batch=batch,
            loss=loss_value,
            optimizer=self.optimizer,
            probe_data=self.probe_data,
            num_classes=self.num_classes,
            curvature_mode=self.curvature_mode,
            max_memory_bytes=self.max_memory_bytes,
            named_parameters=self._named_parameters,  # listed when a diagnostic reads them
            flat_buffers=self._flat_buffers,
            basis_workspace=self._basis_workspace,
        )
        ctx.due = frozenset(d.name for d in due)
        if self._budget is not None:
            ctx.probe_seconds = self._budget.probe_seconds()
            ctx.sliced = self._budget.sliced
        if self._accumulated is not None and any(d.uses_accumulation for d in due):
            ctx.microbatch_moments = self._accumulated.moments()  # float64 copies: only when read
        pending = PendingStep(step, ctx, source)
        if not self.model.training and not self._eval_mode_reported and self.observe_training_forward:
            pending.events += [(None, e) for e in self._eval_mode_events(step)]
        for d, (records, events, status) in zip(due, self._runner.run_phase(due, "compute", ctx)):
            if d.name in self._hook_seconds:
                status = dataclasses.replace(status, seconds=status.seconds + self._hook_seconds[d.name])
            pending.add(d, records, events, status)
        ended = [d.name for d in due if d.name in carried and not d.unfinished_run]
        if ended:  # a carried run ended: its readers run now, while what it shares is in this step's context
            names = set(self._budget.follow(ended))
            readers = [d for d in self.diagnostics if d.name in names and d not in due]
            ctx.due = ctx.due | names
            for d, (records, events, status) in zip(readers, self._runner.run_phase(readers, "compute", ctx)):
                pending.add(d, records, events, status)
        # Free per-sample gradients, captured activations and operators before the update.
        ctx.end_compute_phase()
        self._monitored += 1
        stop = self._stop_requested(pending)  # a collective under torch.distributed: every rank asks
        if pending.update_diags and not stop:
            ctx.snapshot_parameters()
            self._pending = pending
            if self.optimizer is not None:
                pending.handle = self.optimizer.register_step_post_hook(lambda *_: self._finish_from_hook())
            return
        ctx.clear()
        self._commit(pending)

    def _eval_mode_events(self, step: int) -> list[Event]:
        """The ``eval_mode`` misuse event (once per Monitor) when a backward ran with the model in eval mode
        (see :func:`~diagnostics.tracking.misuse.eval_mode_event`); warns, or raises when strict."""
        if not any_grads(self._named_parameters()):
            return []  # no backward: monitor.step on a model in eval mode on purpose (or the no_grads case)
        self._eval_mode_reported = True
        event = eval_mode_event(self.model, step, self._observers)
        return self._misuse.filter([event]) if event is not None else []

    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable ``(name, parameter)`` pairs (see :class:`~diagnostics.tracking.identity.ModelStructure`)."""
        return self._structure.trainable()

    def _finish_from_hook(self) -> None:
        with _budget.timed_work(self._budget):  # monitor time between two calls, not training time
            self._finish_pending()

    def _finish_pending(self) -> None:
        """Compute the update diagnostics of the pending step and commit it (once; removes the hook)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.handle is not None:
            pending.handle.remove()
        ctx = pending.ctx
        ctx.begin_update_phase()
        try:
            results = self._runner.run_phase(pending.update_diags, "compute_after_update", ctx)
            for d, result in zip(pending.update_diags, results):
                pending.add_update(d, *result)
        finally:
            ctx.release_snapshot()
            ctx.clear()
            self._commit(pending)

    # --- committing and actions ---------------------------------------------------------------------
    def _commit(self, pending: PendingStep) -> None:
        if self._commits is not None:
            records = pending.all_records()
            if self._budget is not None:
                unfinished = [d.name for d in self._may_carry if d.unfinished_run]
                records += self._budget.account(pending.statuses, unfinished)
            events = [e for _, e in pending.events]
            self._commits.write(pending.step, records, events, list(pending.statuses.values()), pending.source)
            if self._monitored % self.state_every == 0 and (
                self._budget is not None or any(d.state_dict() for d in self.diagnostics)
            ):
                self._save_state()
            self._commits.mirror(pending.step, records)
        self._do_actions(pending)

    def _wait_writes(self) -> None:
        """Block until the outstanding background commit (if any) is done; handle its error."""
        if self._commits is not None:
            self._commits.wait()

    def _stop_requested(self, pending: PendingStep) -> bool:
        local = self._policy.stops(pending.events)
        return _dist.all_ranks_any(local) if self._distributed else local

    def _do_actions(self, pending: PendingStep) -> None:
        # The step's records are committed before training is told to stop.
        run_actions(
            self._policy.actionable(pending.events), pending.step,
            checkpoint=self.save_checkpoint, before_stop=self._wait_writes, distributed=self._distributed,
        )

    def save_checkpoint(self, step: int) -> Path:
        """Save model (and optimizer) state to ``run_dir/checkpoints/step_<step>.pt``; returns the path."""
        return _save_checkpoint(self.run_dir, step, self.model, self.optimizer)

    # --- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Commit a pending step, save diagnostics' state to the run's metadata, close the store (idempotent).

        Works from inference mode or no_grad (frameworks close there): a pending update may still be computed.
        """
        if self._closed:
            return
        self._closed = True
        with autograd_on():
            try:
                try:
                    self._stop_observing()
                    for d in self.diagnostics:
                        d.release_hooks()
                finally:
                    self._finish_pending()
                for d in self.diagnostics:  # a probe cut into calls that had not ended: free its memory
                    d.drop_unfinished()
                self._flat_buffers.clear()
                self._basis_workspace.clear()
                # Schedules longer than the run (a misuse event at the last step; see tracking.misuse).
                # Diagnostics a budget schedules (or spaces out) have no fixed schedule that could be longer
                # than the run.
                scheduled = self._budget.scheduled | self._budget.thinned if self._budget is not None else frozenset()
                fixed = [d for d in self.diagnostics if d.name not in scheduled]
                events = self._misuse.schedule_events(fixed)
                if events and self._commits is not None and self.last_step is not None:
                    self._commits.write(self.last_step, [], events, [], None)
            finally:
                if self._commits is not None:
                    try:
                        self._save_state()
                    finally:
                        self._commits.close()
        self._misuse.raise_if_strict()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self._misuse.steps_seen = 0  # an interrupted run is not a schedule longer than the run
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(d.name for d in self.diagnostics)
        return f"Monitor(run={str(self.run_dir)!r}, diagnostics=[{names}])"
