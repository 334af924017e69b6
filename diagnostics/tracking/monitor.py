"""The Monitor: the edge between a training loop and the diagnostics.

Usage::

    with Monitor(model, run="runs/exp1", diagnostics="standard", optimizer=opt) as monitor:
        for step, batch in enumerate(loader):
            loss = loss_fn(model, batch)
            loss.backward()
            monitor.step(step, batch, loss)      # after backward(), before optimizer.step()
            opt.step()
            opt.zero_grad()

Each step it runs the due diagnostics inside an isolation context, times each one, and commits the
step's records, events and statuses to the run store in one transaction. A failing diagnostic becomes a
failed status plus an ``estimator_failed`` event; training never sees the exception unless
``strict=True``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import math
import operator
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diagnostics.errors import ConfigError, DataError, LossError, StopTraining, StoreError
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.registry import resolve_diagnostics
from diagnostics.store.records import Event, Record, Status
from diagnostics import _distributed as _dist
from diagnostics._batch import detach_batch
from diagnostics.metrics.context import StepContext
from diagnostics._state import IsolationError, eval_mode, isolated

ACTIONS = ("record", "warn", "checkpoint", "stop")
# Requirements that make a diagnostic call the loss on some data.
_USES_LOSS = frozenset({"per_sample_grads", "curvature", "activations", "layer_inputs"})

Action = str | Callable[[Event, int], Any]
# Small step-cache entries that stay valid after optimizer.step() (norms measured before it).
# "flat_parameters" is the copy of the parameters the update snapshot reuses.
_KEEP_AFTER_COMPUTE = frozenset({"grad_norms", "weight_norms", "flat_parameters"})


# --- model identity --------------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the parameter names and shapes: the same architecture, any weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def model_summary(model: nn.Module) -> dict[str, Any]:
    """``{class, num_params, num_trainable, parameters: {name: shape}}`` for the run's metadata."""
    params = dict(model.named_parameters())
    return {
        "class": type(model).__name__,
        "num_params": int(sum(p.numel() for p in params.values())),
        "num_trainable": int(sum(p.numel() for p in params.values() if p.requires_grad)),
        "parameters": {n: list(p.shape) for n, p in params.items()},
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        out["training-diagnostics"] = metadata.version("training-diagnostics")
    except metadata.PackageNotFoundError:
        pass
    return out


# --- JSON encoding of diagnostic state (tensors and arrays as base64 of their bytes) ---------------
def encode_state(value: Any) -> Any:
    """Make a diagnostic's state JSON-serialisable; tensors and arrays keep dtype, shape and exact bytes."""
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        return {
            "__tensor__": base64.b64encode(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").decode(),
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
        }
    if isinstance(value, np.ndarray):
        return {"__ndarray__": base64.b64encode(value.tobytes()).decode(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, Mapping):
        return {str(k): encode_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_state(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    return value


def decode_state(value: Any) -> Any:
    """Inverse of :func:`encode_state` (tensors come back on the CPU)."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            dtype = getattr(torch, value["dtype"])
            raw = bytearray(base64.b64decode(value["__tensor__"]))
            if not raw:
                return torch.empty(value["shape"], dtype=dtype)
            return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(value["shape"]).clone()
        if "__ndarray__" in value:
            return np.frombuffer(base64.b64decode(value["__ndarray__"]), dtype=value["dtype"]).reshape(value["shape"]).copy()
        if "__float__" in value:
            return float(value["__float__"])
        return {k: decode_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_state(v) for v in value]
    return value


def _check_action(action: Any, where: str) -> None:
    if action is None or callable(action):
        return
    if action not in ACTIONS:
        raise ConfigError(f"{where}: action must be one of {', '.join(ACTIONS)} or a callable(event, step), got {action!r}")


def _probe_list(probe_data: Any, limit: int | None) -> list[Any]:
    """Normalise probe data: a tuple/dict/tensor is one batch; a list or an iterable is a sequence of batches."""
    if probe_data is None:
        return []
    if isinstance(probe_data, (tuple, Mapping)) or torch.is_tensor(probe_data):
        return [probe_data]
    if isinstance(probe_data, list):
        return list(probe_data)
    if isinstance(probe_data, Iterable):
        out = []
        for b in probe_data:
            out.append(detach_batch(b))
            if limit is not None and len(out) >= limit:
                break
        return out
    raise ConfigError(f"probe_data must be a batch or a list of batches, got {type(probe_data).__name__}")


class _Pending:
    """A step whose records wait for the optimizer's update before they are committed."""

    def __init__(self, step: int, ctx: StepContext, source: str | None = None) -> None:
        self.step = step
        self.source = source
        self.ctx = ctx
        self.records: list[Record] = []
        self.events: list[tuple[Diagnostic | None, Event]] = []
        self.statuses: dict[str, Status] = {}
        self.update_diags: list[Diagnostic] = []
        self.handle: Any = None


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
        strict: re-raise a diagnostic's exception instead of recording it as failed.
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
        self.diagnostics: list[Diagnostic] = resolve_diagnostics(diagnostics)
        self._apply_every(every)
        self._set_actions(actions)
        self._uses_loss = loss_fn is not None or any(_USES_LOSS & d.requires for d in self.diagnostics)
        self._modules = list(model.modules())
        self._structure: list[Any] = []  # every module's parameters and children, to notice changes
        self._member_dicts: list[dict[str, Any]] = [d for m in self._modules for d in (m._parameters, m._modules)]
        self._all_named: list[tuple[str, nn.Parameter]] = []
        self._user_probe = probe_data is not None
        self.probe_data: list[Any] = _probe_list(probe_data, self.probe_batches)
        if self._user_probe:
            if not self.probe_data:
                raise DataError("probe_data is empty; pass at least one batch or leave it None")
            for i, b in enumerate(self.probe_data):
                self._check_batch(b, f"probe_data[{i}]")
        self._batch_checked = False
        self._states: dict[str, dict[str, Any]] = {d.name: {} for d in self.diagnostics}
        self._pending: _Pending | None = None
        self._closed = False
        self._monitored = 0
        self._store_failures = 0
        self.last_step: int | None = None

        self.writes = True
        self._distributed = _dist.is_distributed()
        if rank_zero_only and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.writes = torch.distributed.get_rank() == 0

        if run is None:
            # Every rank needs the same name: rank 0's clock decides.
            run = _dist.broadcast_object(Path("runs") / _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S"))
        self.run_dir = Path(run).expanduser()
        if self._distributed and not rank_zero_only:
            self.run_dir = _dist.rank_run_dir(self.run_dir)
        self.fingerprint = model_fingerprint(model)
        self.writer = None
        self._future: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.mirrors: list[Any] = []
        self._mirror_failures: set[int] = set()
        if self.writes:
            self._open_store(name, meta)
            if async_writes:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diagnostics-store")
            from diagnostics.tracking.mirrors import resolve_mirrors

            self.mirrors = resolve_mirrors(mirrors, self.run_dir)

    # --- configuration ----------------------------------------------------------------------------
    def _apply_every(self, every: int | Mapping[str, int] | None) -> None:
        if every is None:
            return
        names = {d.name: d for d in self.diagnostics}
        items = every.items() if isinstance(every, Mapping) else ((n, every) for n in names)
        for n, e in items:
            if n not in names:
                raise ConfigError(f"every={{{n!r}: ...}} names no selected diagnostic; selected: {', '.join(names)}")
            if not isinstance(e, int) or isinstance(e, bool) or e < 1:
                raise ConfigError(f"every for {n!r} must be a positive int, got {e!r}")
            names[n].every = e

    def _set_actions(self, actions: Any) -> None:
        self._default_action: Action = "record"
        self._actions: dict[str, Action] = {}
        if isinstance(actions, Mapping):
            for k, a in actions.items():
                _check_action(a, f"actions[{k!r}]")
                self._actions[str(k)] = a
        elif actions is not None:
            _check_action(actions, "actions")
            self._default_action = actions
        for d in self.diagnostics:
            _check_action(getattr(d, "action", None), f"diagnostic {d.name!r}")

    def _check_batch(self, batch: Any, what: str) -> None:
        """Run the loss once on ``batch`` (no grad, eval mode, isolated): DataError/LossError if unusable."""
        if batch is None:
            raise DataError(f"{what} is None, but the selected diagnostics run the loss on the step's batch; pass the batch")
        loss_fn = self.loss_fn
        if loss_fn is None:
            from diagnostics.loss import default_loss

            loss_fn = default_loss
        try:
            with isolated(self.model, modules=self._modules), torch.no_grad(), eval_mode(self.model):
                value = loss_fn(self.model, batch)
        except Exception as exc:  # noqa: BLE001 - any failure here means the batch/loss pair is unusable
            if isinstance(exc, (DataError, LossError, ConfigError)):
                raise
            raise DataError(
                f"loss_fn cannot consume {what}: {type(exc).__name__}: {exc}. Pass a loss_fn(model, batch) "
                "that accepts your batches, or batches of the form (inputs, targets)"
            ) from exc
        if not torch.is_tensor(value) or value.numel() != 1 or not value.is_floating_point():
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise LossError(f"loss_fn(model, {what}) must return a scalar floating tensor (mean loss), got {shape}")

    def _open_store(self, name: str | None, meta: Mapping[str, Any] | None) -> None:
        from diagnostics.store import RunWriter, open_run
        from diagnostics.store.schema import database_path

        resumed_meta: dict[str, Any] = {}
        if database_path(self.run_dir).is_file():
            run = open_run(self.run_dir)  # raises SchemaVersionError for a store from a newer package
            try:
                resumed_meta = run.meta
            finally:
                run.close()
            old = resumed_meta.get("model_fingerprint")
            if old is not None and old != self.fingerprint:
                raise StoreError(
                    f"run dir {self.run_dir} belongs to another model (fingerprint {old}, this model "
                    f"{self.fingerprint}); choose another run directory"
                )
        run_meta = {
            "versions": _versions(),
            "config": dict(meta or {}),
            "model_summary": model_summary(self.model),
            "model_fingerprint": self.fingerprint,
            "diagnostics": {d.name: {"class": type(d).__name__, **d.settings()} for d in self.diagnostics},
            "gradients_seen": "the parameters' .grad after the user's backward(), before optimizer.step()",
            "loss_reduction": "mean",
            "curvature_mode": self.curvature_mode,
            "activation_mode": "eval",
            "num_classes": self.num_classes,
        }
        self.writer = RunWriter(self.run_dir, name=name, meta=run_meta, resume=True)
        self.resumed = bool(resumed_meta)
        if resumed_meta:
            self._load_state(resumed_meta.get("diagnostic_state") or {})
            if not self._user_probe:
                self._load_probe()

    def set_meta(self, key: str, value: Any) -> None:
        """Record ``key: value`` in the run's metadata (JSON-serialisable); nothing happens on ranks that do
        not write. Integrations and ``analyze`` say here which gradients the Monitor saw."""
        if self.writer is not None:
            self.writer.set_meta(key, value)

    # --- state --------------------------------------------------------------------------------------
    def _load_state(self, saved: Mapping[str, Any]) -> None:
        for d in self.diagnostics:
            entry = saved.get(d.name)
            if not entry:
                continue
            entry = decode_state(entry)
            d.load_state_dict(entry.get("attrs", {}))
            self._states[d.name] = dict(entry.get("ctx", {}))

    def state_dict(self) -> dict[str, Any]:
        """Every diagnostic's declared state and its ``ctx.state`` dict, JSON-encoded."""
        return {
            d.name: encode_state({"attrs": d.state_dict(), "ctx": self._states.get(d.name, {})})
            for d in self.diagnostics
        }

    def _save_state(self) -> None:
        if self.writer is None:
            return
        self._wait_writes()
        state = self.state_dict()
        self.writer.set_meta("diagnostic_state", state)
        if self.last_step is not None:
            self.writer.set_meta("last_step", self.last_step)

    def _probe_path(self) -> Path:
        return self.run_dir / "probe_data.pt"

    def _save_probe(self) -> None:
        try:
            torch.save(self.probe_data, self._probe_path())
        except Exception as exc:  # noqa: BLE001 - resuming without it only changes later curvature probes
            warnings.warn(f"could not save probe data for resuming: {exc}", RuntimeWarning, stacklevel=3)

    def _load_probe(self) -> None:
        path = self._probe_path()
        if path.is_file():
            try:
                self.probe_data = torch.load(path, weights_only=True)
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"could not load saved probe data {path}: {exc}", RuntimeWarning, stacklevel=3)

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
        self._stop_observing()
        self._step(step, batch, loss, source)
        self._start_observing(step)

    def _start_observing(self, step: int) -> None:
        """Install the hooks of diagnostics that measure on the next training forward (none if not due)."""
        if not self.observe_training_forward or (not self.writes and not self._distributed):
            return
        chosen = [
            d
            for d in self.diagnostics
            if "layer_inputs" in d.requires
            and d.every == 1
            and d.is_due(step + 1)
            and callable(getattr(d, "observe_training_forward", None))
        ]
        if not chosen:
            return
        stack = contextlib.ExitStack()
        try:
            for d in chosen:
                stack.enter_context(d.observe_training_forward(self.model))
        except BaseException:
            stack.close()
            raise
        self._observing = stack

    def _stop_observing(self) -> None:
        """Remove the hooks installed by the previous step (idempotent)."""
        stack, self._observing = self._observing, None
        if stack is not None:
            stack.close()

    def _step(self, step: int, batch: Any, loss: torch.Tensor | float | None, source: str | None) -> None:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise ConfigError(f"step must be an int, got {type(step).__name__}")
        step = int(step)
        if torch.is_tensor(loss):
            if loss.numel() != 1:
                raise LossError(
                    f"loss passed to monitor.step must be a scalar, got shape {tuple(loss.shape)}; "
                    "pass the value backward() was called on (e.g. loss.mean())"
                )
        elif loss is not None and not isinstance(loss, (int, float, np.floating, np.integer)):
            raise LossError(f"loss passed to monitor.step must be a scalar tensor or a float, got {type(loss).__name__}")
        self._finish_pending()
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
                self._save_probe()
        due = [d for d in self.diagnostics if d.is_due(step)]
        self.last_step = step
        if not due:
            return
        loss_value = None
        if loss is not None:
            loss_value = float(loss.detach().item()) if torch.is_tensor(loss) else float(loss)
        ctx = StepContext(
            step=step,
            model=self.model,
            loss_fn=self.loss_fn,
            batch=batch,
            loss=loss_value,
            optimizer=self.optimizer,
            probe_data=self.probe_data,
            num_classes=self.num_classes,
            curvature_mode=self.curvature_mode,
            max_memory_bytes=self.max_memory_bytes,
            named_parameters=self._named_parameters(),
        )
        ctx.due = frozenset(d.name for d in due)
        pending = _Pending(step, ctx, source)
        for d, (records, events, status) in zip(due, self._run_phase(due, "compute", ctx)):
            pending.records += records
            pending.events += [(d, e) for e in events]
            pending.statuses[d.name] = status
            if "update" in d.requires and status.status != "failed":
                pending.update_diags.append(d)
        # Free per-sample gradients, captured activations and operators before the update; keep the small
        # per-parameter norms (the weight norms are the norms of the parameters before the update).
        for key in [k for k in ctx.cache if k not in _KEEP_AFTER_COMPUTE]:
            del ctx.cache[key]
        self._monitored += 1
        stop = self._stop_requested(pending)  # a collective under torch.distributed: every rank asks
        if pending.update_diags and not stop:
            ctx.snapshot_parameters()
            self._pending = pending
            if self.optimizer is not None:
                pending.handle = self.optimizer.register_step_post_hook(self._on_optimizer_step)
            return
        self._commit(pending)

    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable ``(name, parameter)`` pairs in ``named_parameters()`` order.

        ``model.named_parameters()`` walks the module tree in Python (about 100 us per step on a small
        transformer); the list is kept and listed again only when a module's parameters or children
        changed (compared by identity, a few microseconds). ``requires_grad`` is read at every step.
        """
        structure = [v for d in self._member_dicts for v in d.values()]
        if len(structure) != len(self._structure) or not all(map(operator.is_, structure, self._structure)):
            self._modules = list(self.model.modules())
            self._member_dicts = [d for m in self._modules for d in (m._parameters, m._modules)]
            self._structure = [v for d in self._member_dicts for v in d.values()]
            self._all_named = list(self.model.named_parameters())
        return [(n, p) for n, p in self._all_named if p.requires_grad]

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._finish_pending()

    def _finish_pending(self) -> None:
        """Compute the update diagnostics of the pending step and commit it (once; removes the hook)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.handle is not None:
            pending.handle.remove()
        ctx = pending.ctx
        ctx._after_update = True
        try:
            results = self._run_phase(pending.update_diags, "compute_after_update", ctx)
            for d, (records, events, status) in zip(pending.update_diags, results):
                before = pending.statuses[d.name]
                pending.records += records
                pending.events += [(d, e) for e in events]
                pending.statuses[d.name] = Status(
                    d.name,
                    status.status if status.status != "ok" else before.status,
                    status.reason or before.reason,
                    before.seconds + status.seconds,
                    status.num_matvecs if status.num_matvecs is not None else before.num_matvecs,
                )
        finally:
            ctx.release_snapshot()
            ctx.cache.clear()
            self._commit(pending)

    def _run_phase(
        self, diags: list[Diagnostic], method: str, ctx: StepContext
    ) -> list[tuple[list[Record], list[Event], Status]]:
        """Run ``method`` of each diagnostic inside one isolation context for the phase.

        The phase forks every global RNG stream and restores every module's mode once (saving numpy's
        state alone costs ~50 us, too much to repeat per diagnostic on every step); after each diagnostic
        that is not ``reads_only`` the torch CPU stream and the modes are reset (microseconds), and the grad
        mode after every one, so each diagnostic sees the same state whether it runs alone or after others.
        """
        out = []
        # Diagnostics that declare ``reads_only`` (they only read tensors the step already holds) skip the
        # RNG fork; the contract suite verifies the claim with check_isolation.
        full = self.check_isolation or not all(getattr(d, "reads_only", False) for d in diags)
        with isolated(self.model, modules=self._modules, label=method) if full else contextlib.nullcontext():
            rng = torch.get_rng_state() if full else None
            modes = [(m, m.training) for m in self._modules] if full else []
            grad_enabled = torch.is_grad_enabled()
            for d in diags:
                try:
                    out.append(self._run(d, getattr(d, method), ctx))
                finally:
                    # A reads_only diagnostic draws no random numbers and switches no modes (the contract
                    # suite checks it), so the reset is skipped after it.
                    if full and (self.check_isolation or not getattr(d, "reads_only", False)):
                        torch.set_rng_state(rng)
                        for m, flag in modes:
                            if m.training is not flag:  # nn.Module.__setattr__ is slow; set only what changed
                                m.training = flag
                    if torch.is_grad_enabled() is not grad_enabled:  # set_grad_enabled() builds an object
                        torch.set_grad_enabled(grad_enabled)
        return out

    def _run(self, d: Diagnostic, fn: Callable[[StepContext], Any], ctx: StepContext) -> tuple[list[Record], list[Event], Status]:
        """Run one diagnostic phase timed; failures become a failed Status and an ``estimator_failed`` event."""
        ctx.state = self._states.setdefault(d.name, {})
        t0 = time.perf_counter()
        # Under torch.distributed a diagnostic that may issue collectives ends with a meeting of all ranks
        # (skipped after RemoteFailure: that abandoned collective was the meeting).
        sync = self._distributed and not getattr(d, "reads_only", False)
        try:
            if self.check_isolation:
                with isolated(self.model, optimizer=self.optimizer, modules=self._modules, check=True, label=d.name):
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
                bad = next((r for r in records if not math.isfinite(r.value)), None)
                if bad is not None:
                    raise FloatingPointError(f"non-finite value {bad.value} in {bad.metric}[{bad.key}, {bad.index}]")
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
            reason = f"{type(exc).__name__}: {exc}"[:500]
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
        return records, events, Status(d.name, status, reason, seconds, nmv)

    # --- committing and actions ---------------------------------------------------------------------
    def _action_for(self, d: Diagnostic | None, event: Event) -> Action:
        if d is not None and getattr(d, "action", None) is not None:
            return d.action  # type: ignore[attr-defined]
        if d is not None and d.name in self._actions:
            return self._actions[d.name]
        if event.kind in self._actions:
            return self._actions[event.kind]
        return self._default_action

    def _actionable(self, pending: _Pending) -> list[tuple[Event, Action]]:
        out = []
        for d, e in pending.events:
            # The Monitor's own estimator_failed events describe the tooling, not the training: no actions.
            if e.kind == "estimator_failed" or e.severity not in ("warning", "error"):
                continue
            out.append((e, self._action_for(d, e)))
        return out

    def _stop_requested(self, pending: _Pending) -> bool:
        local = any(a == "stop" for _, a in self._actionable(pending))
        return _dist.all_ranks_any(local) if self._distributed else local

    def _commit(self, pending: _Pending) -> None:
        records = list(pending.records)
        records += [Record("monitor_seconds", s.seconds, key=n) for n, s in pending.statuses.items()]
        events = [e for _, e in pending.events]
        if self.writer is not None:
            statuses = list(pending.statuses.values())
            self._wait_writes()
            write = self.writer.write_step
            if self._executor is not None:
                # The commit overlaps the next training step; at most one commit is outstanding.
                self._future = self._executor.submit(write, pending.step, records, events, statuses, source=pending.source)
            else:
                try:
                    write(pending.step, records, events, statuses, source=pending.source)
                except StoreError as exc:
                    self._store_failed(exc)
            has_state = any(d.state_keys for d in self.diagnostics) or any(self._states.values())
            if has_state and self._monitored % self.state_every == 0:
                self._save_state()
        if self.mirrors:
            self._mirror(pending.step, records)
        self._do_actions(pending)

    def _mirror(self, step: int, records: list[Record]) -> None:
        """Send the step's scalars to every mirror; a failing mirror warns once and never stops training."""
        from diagnostics.tracking.mirrors import scalars_from_records

        scalars = scalars_from_records(records)
        for i, mirror in enumerate(self.mirrors):
            try:
                mirror.write(step, scalars)
            except Exception as exc:  # noqa: BLE001 - a logger outage must not end the training run
                if self.strict:
                    raise
                if i not in self._mirror_failures:
                    self._mirror_failures.add(i)
                    warnings.warn(f"diagnostics: mirror {type(mirror).__name__} failed: {exc}", RuntimeWarning, stacklevel=4)

    def _store_failed(self, exc: StoreError) -> None:
        if self.strict:
            raise exc
        self._store_failures += 1
        if self._store_failures == 1:
            warnings.warn(f"diagnostics: cannot write to the run store: {exc}", RuntimeWarning, stacklevel=4)

    def _wait_writes(self) -> None:
        """Block until the outstanding background commit (if any) is done; handle its error."""
        future, self._future = self._future, None
        if future is not None:
            try:
                future.result()
            except StoreError as exc:
                self._store_failed(exc)

    def _do_actions(self, pending: _Pending) -> None:
        stop: Event | None = None
        for event, action in self._actionable(pending):
            if action == "record":
                continue
            if action == "warn":
                warnings.warn(f"diagnostics: {event.message}", RuntimeWarning, stacklevel=4)
            elif action == "checkpoint":
                self.save_checkpoint(pending.step)
            elif action == "stop":
                stop = stop or event
            else:
                action(event, pending.step)  # type: ignore[operator]
        # Alarms are all-reduced so that every rank stops at the same step.
        stop_anywhere = _dist.all_ranks_any(stop is not None) if self._distributed else stop is not None
        if stop_anywhere:
            self._wait_writes()  # the step's records are committed before training is told to stop
            if stop is None:
                raise StopTraining(f"training stopped at step {pending.step}: a stop action on another rank")
            raise StopTraining(f"training stopped at step {pending.step}: {stop.message}", event=stop)

    def save_checkpoint(self, step: int) -> Path:
        """Save model (and optimizer) state to ``run_dir/checkpoints/step_<step>.pt``; returns the path."""
        folder = self.run_dir / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{step}.pt"
        payload = {"step": step, "model": self.model.state_dict()}
        if self.optimizer is not None:
            payload["optimizer"] = self.optimizer.state_dict()
        torch.save(payload, path)
        return path

    # --- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Commit a pending step, save diagnostics' state to the run's metadata, close the store (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self._stop_observing()
            finally:
                self._finish_pending()
        finally:
            if self.writer is not None:
                try:
                    self._wait_writes()
                    self._save_state()
                finally:
                    if self._executor is not None:
                        self._executor.shutdown(wait=True)
                        self._executor = None
                    self.writer.close()
                    for mirror in self.mirrors:
                        try:
                            mirror.close()
                        except Exception as exc:  # noqa: BLE001
                            warnings.warn(f"diagnostics: closing mirror {type(mirror).__name__} failed: {exc}", RuntimeWarning, stacklevel=2)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(d.name for d in self.diagnostics)
        return f"Monitor(run={str(self.run_dir)!r}, diagnostics=[{names}])"
