"""Run the registered diagnostics over saved checkpoints: the library function behind ``tdiag analyze``.

Each checkpoint becomes one step of a run, measured through the same :class:`~diagnostics.tracking.Monitor`
and :class:`~diagnostics.tracking.StepContext` machinery as in-loop monitoring and written to the same
store, so ``tdiag report`` reads both alike. Per checkpoint: its weights are loaded into the model, the
mean loss and its gradient are computed over the fixed data batches (eval mode: no dropout, BatchNorm on
its running statistics, so every checkpoint sees the same function of its weights), and the Monitor runs
every chosen diagnostic once (schedules are ignored: every checkpoint is due). There is no optimizer, so
diagnostics that need one (the update ratio, Adam's preconditioned sharpness) are reported as skipped
by the Monitor rather than guessed.

Everything that can be checked is checked before the store is opened: the specs, every checkpoint's
keys and shapes, the diagnostics' names, the loss on the first batch, and that an existing run
directory belongs to this model. A failure raises a :class:`~diagnostics.errors.DiagnosticsError`
and leaves the store untouched.

The analysis resumes: each checkpoint is written in one transaction together with its source id, and
checkpoints whose source is already in the store are skipped unless ``force=True``, which recomputes
them (rows are replaced, never duplicated).
"""

from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diagnostics.checkpoints import CheckpointInfo, apply_checkpoint, inspect_checkpoints
from diagnostics.errors import CheckpointError, ConfigError, DataError, LossError
from diagnostics.app.specs import resolve_data, resolve_loss, resolve_model

__all__ = ["AnalysisResult", "analyze_checkpoints", "DEFAULT_BATCHES", "DEFAULT_DIAGNOSTICS"]

#: Batches of data each checkpoint is measured on, when neither the caller nor a config says.
DEFAULT_BATCHES = 4

#: Diagnostics run when none are named.
DEFAULT_DIAGNOSTICS = "standard"

#: What the run's ``gradients_seen`` metadata says for a checkpoint analysis.
GRADIENTS_SEEN = "checkpoint analysis: gradient of the mean loss over the analysis batches, eval mode"

#: Requirements a checkpoint cannot meet: there is no optimizer and no update between snapshots.
_NEEDS_TRAINING = frozenset({"update", "optimizer"})


@dataclass
class AnalysisResult:
    """What :func:`analyze_checkpoints` did.

    Attributes:
        run_dir: the run directory written.
        checkpoints: every checkpoint found, in step order.
        analyzed: steps computed in this call.
        skipped: steps already in the store (resumed), not recomputed.
        seconds: wall time of the call.
    """

    run_dir: Path
    checkpoints: list[CheckpointInfo]
    analyzed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _to_device(batch: Any, device: Any) -> Any:
    import torch

    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _concat(batches: list[Any]) -> Any:
    """One batch holding every sample of ``batches`` (same structure), or the first batch when the
    structure cannot be concatenated (non-tensor fields, ragged shapes)."""
    import torch

    first = batches[0]
    if len(batches) == 1:
        return first
    try:
        if torch.is_tensor(first):
            return torch.cat(batches, dim=0)
        if isinstance(first, dict):
            return {k: _concat([b[k] for b in batches]) for k in first}
        if isinstance(first, tuple) and hasattr(first, "_fields"):
            return type(first)(*(_concat([b[i] for b in batches]) for i in range(len(first))))
        if isinstance(first, (tuple, list)):
            return type(first)(_concat([b[i] for b in batches]) for i in range(len(first)))
    except (RuntimeError, KeyError, IndexError, TypeError):
        return first
    if all(b == first for b in batches[1:]):  # constant fields (e.g. a flag) survive
        return first
    raise TypeError("not concatenable")


def _batch_size(batch: Any) -> int:
    from diagnostics._batch import leading_size

    n = leading_size(batch)
    return int(n) if n else 1


def _check_device(device: str) -> Any:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device (use cpu or cuda): {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return dev


def _fingerprint(model: Any) -> str:
    from diagnostics.tracking.monitor import model_fingerprint

    return model_fingerprint(model)


def _existing_run(run_dir: Path) -> Any | None:
    from diagnostics.store import open_run
    from diagnostics.store.schema import database_path

    if not database_path(run_dir).is_file():
        return None
    return open_run(run_dir)


def _check_run_belongs_to_model(run_dir: Path, fingerprint: str) -> set[str]:
    """The run's completed sources; raises ConfigError when the run was written for another model."""
    run = _existing_run(run_dir)
    if run is None:
        return set()
    try:
        stored = run.meta.get("model_fingerprint")
        if stored is not None and stored != fingerprint:
            raise ConfigError(
                f"run directory {str(run_dir)!r} holds a run of another model (model fingerprint {stored} "
                f"there, {fingerprint} for --model); choose another --run directory"
            )
        return set(run.sources()["source"])
    finally:
        run.close()


def _loss_on(model: Any, loss_fn: Callable[..., Any], batch: Any, where: str) -> Any:
    import torch

    try:
        value = loss_fn(model, batch)
    except (DataError, LossError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model or loss may raise anything
        raise DataError(
            f"the loss on {where} raised {type(exc).__name__}: {exc}; do --data and --loss fit --model?"
        ) from None
    if not torch.is_tensor(value) or value.numel() != 1:
        raise LossError(
            f"the loss on {where} returned {type(value).__name__}"
            + (f" of shape {tuple(value.shape)}" if torch.is_tensor(value) else "")
            + ", not a scalar tensor; --loss must return the mean loss of a batch"
        )
    return value.reshape(())


def _gradient_pass(model: Any, loss_fn: Callable[..., Any], batches: list[Any]) -> float:
    """Mean loss over ``batches`` (weights |batch|/N) and its gradient in ``.grad``. Cost: one forward
    and backward per batch."""
    total = sum(_batch_size(b) for b in batches)
    model.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for i, batch in enumerate(batches):
        weight = _batch_size(batch) / total
        loss = _loss_on(model, loss_fn, batch, f"batch {i}")
        if loss.requires_grad:
            (loss * weight).backward()
        loss_sum += float(loss.detach()) * weight
    return loss_sum


def _progress(iterable: Any, *, total: int, quiet: bool, desc: str) -> Any:
    if quiet:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="ckpt", leave=False, dynamic_ncols=True)


def analyze_checkpoints(
    checkpoints: str | Path | Sequence[str | Path],
    *,
    model: Any,
    data: Any = None,
    loss: Any = None,
    diagnostics: Any = None,
    batches: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    run: str | Path,
    force: bool = False,
    unsafe_pickle: bool = False,
    quiet: bool = True,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    on_checkpoint: Callable[[CheckpointInfo], None] | None = None,
) -> AnalysisResult:
    """Measure saved checkpoints with the registered diagnostics and write them to a run store.

    Args:
        checkpoints: checkpoint files, Hugging Face directories, or directories of checkpoints.
        model: a model spec (zoo name, ``module:attr``, ``file.py:attr``, ``hf:DIR``) or an ``nn.Module``
            (whose weights are overwritten by the checkpoints', and which is left in eval mode).
        data: a data spec or a list of batches; default: the zoo model's own dataset.
        loss: a loss spec or ``loss_fn(model, batch)``; default: the zoo model's loss, else the library's
            default loss.
        diagnostics: a preset, a comma-separated string or list of names (default ``"standard"``).
        batches: number of data batches each checkpoint is measured on (default 4).
        batch_size: batch size for zoo data and data factories that accept it.
        device: ``cpu`` or ``cuda``.
        run: the run directory (created, or resumed).
        force: recompute checkpoints already in the store.
        unsafe_pickle: allow checkpoints that are full pickles (they can run code when loaded).
        quiet: no progress bar.
        seed: seed for zoo data and data factories that accept one.
        config: options to record in the run's ``config`` metadata.
        on_checkpoint: called after each checkpoint is committed (for progress reporting and tests).

    Returns:
        An :class:`AnalysisResult`. Cost per checkpoint: loading it, one forward and backward per batch,
        plus the diagnostics' own cost (curvature diagnostics: their matvecs on the batches).

    Raises:
        SpecError, CheckpointError, ConfigError, DataError, LossError, StoreError: before anything is
            written, for every problem that can be found up front.
    """
    import torch

    started = time.perf_counter()
    dev = _check_device(device)
    run_dir = Path(run).expanduser()
    model_spec = model if isinstance(model, str) else None
    net = resolve_model(model)
    zoo_entry = _zoo_entry(model_spec)
    if data is None:
        if zoo_entry is None:
            raise ConfigError("no data given: pass --data (a zoo dataset name or a 'module:attr' spec)")
        data = zoo_entry.data
    num_batches = DEFAULT_BATCHES if batches is None else batches
    data_batches = resolve_data(data, batch_size=batch_size, num_batches=num_batches, seed=seed)
    loss_fn = resolve_loss(loss)
    if loss_fn is None and zoo_entry is not None:
        from diagnostics.zoo import get_loss

        loss_fn = get_loss(model_spec)
    if loss_fn is None:
        from diagnostics.loss import default_loss

        loss_fn = default_loss
    diags = _resolve_diagnostics(diagnostics)

    infos = inspect_checkpoints(checkpoints, model=net, unsafe_pickle=unsafe_pickle)
    _check_distinct_steps(infos)
    fingerprint = _fingerprint(net)
    done = _check_run_belongs_to_model(run_dir, fingerprint)

    net.to(dev)
    data_batches = [_to_device(b, dev) for b in data_batches]
    todo = [info for info in infos if force or info.source not in done]
    result = AnalysisResult(run_dir=run_dir, checkpoints=infos)
    result.skipped = [info.step for info in infos if info not in todo]
    if not todo:
        result.seconds = time.perf_counter() - started
        return result

    # The loss must work on this data before anything is written.
    with _quiet_unsafe(unsafe_pickle):
        apply_checkpoint(net, todo[0].path, unsafe_pickle=unsafe_pickle)
    net.eval()
    with torch.no_grad():
        # A non-finite value here is data worth recording (the Monitor turns it into an event).
        _loss_on(net, loss_fn, data_batches[0], "the first batch")

    run_config = {
        "analyze": {
            "checkpoints": [str(i.path) for i in infos],
            "model": model_spec or type(net).__name__,
            "data": data if isinstance(data, str) else type(data).__name__,
            "loss": loss if isinstance(loss, str) else getattr(loss_fn, "__name__", type(loss_fn).__name__),
            "diagnostics": [d.name for d in diags],
            "batches": len(data_batches),
            "batch_size": batch_size,
            "device": str(dev),
            "seed": seed,
            **(config or {}),
        }
    }
    monitor = _make_monitor(net, loss_fn, run_dir, diags, data_batches, run_config)
    # Diagnostics that look at "the step's batch" (per-sample gradients, activations) see every sample.
    try:
        batch = _concat(data_batches)
    except TypeError:
        batch = data_batches[0]
    try:
        for info in _progress(todo, total=len(todo), quiet=quiet, desc="analyze"):
            with _quiet_unsafe(unsafe_pickle):
                apply_checkpoint(net, info.path, unsafe_pickle=unsafe_pickle)
            net.eval()
            loss_value = _gradient_pass(net, loss_fn, data_batches)
            _monitor_step(monitor, info.step, batch, loss_value, info.source)
            net.zero_grad(set_to_none=True)
            result.analyzed.append(info.step)
            if on_checkpoint is not None:
                on_checkpoint(info)
    finally:
        monitor.close()
    result.seconds = time.perf_counter() - started
    return result


@contextlib.contextmanager
def _quiet_unsafe(unsafe: bool) -> Any:
    # The unsafe-pickle warning is shown once by the caller (the CLI), not once per checkpoint.
    with warnings.catch_warnings():
        if unsafe:
            from diagnostics.checkpoints import UnsafePickleWarning

            warnings.simplefilter("ignore", UnsafePickleWarning)
        yield


def _zoo_entry(spec: str | None) -> Any | None:
    if spec is None:
        return None
    from diagnostics.zoo import MODELS

    return MODELS.get(spec)


def _resolve_diagnostics(spec: Any) -> list[Any]:
    from diagnostics.metrics import resolve_diagnostics

    if spec is None:
        spec = DEFAULT_DIAGNOSTICS
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
        if not spec:
            raise ConfigError("--diagnostics is empty; give a preset (cheap, standard, full) or names")
    from diagnostics.metrics.base import PRESETS

    named = {
        s
        for s in (spec if isinstance(spec, (list, tuple)) else [spec])
        if isinstance(s, str) and s not in PRESETS
    }
    diags = []
    for d in resolve_diagnostics(spec):
        if _NEEDS_TRAINING & d.requires:
            if d.name in named:
                raise ConfigError(
                    f"diagnostic {d.name!r} needs the optimizer's step ({', '.join(sorted(_NEEDS_TRAINING & d.requires))}), "
                    "which a checkpoint does not hold; record it during training with the Monitor instead"
                )
            continue  # from a preset: silently not applicable to checkpoints
        diags.append(d)
    if not diags:
        raise ConfigError("none of the chosen diagnostics can run on checkpoints; choose others")
    for d in diags:
        # Every checkpoint is due: schedules are meant for training steps, not for saved snapshots.
        d.every, d.start = 1, 0
    return diags


def _check_distinct_steps(infos: list[CheckpointInfo]) -> None:
    seen: dict[int, CheckpointInfo] = {}
    for info in infos:
        if info.step in seen:
            raise CheckpointError(
                f"checkpoints {str(seen[info.step].path)!r} and {str(info.path)!r} both have step {info.step}; "
                "analyze them into different --run directories"
            )
        seen[info.step] = info


class _SourcedWriter:
    """Forwards to the Monitor's RunWriter, tagging each step with the checkpoint it came from.

    The tag goes into the same transaction as the step's rows, so a checkpoint is listed as completed
    only if all its rows were committed: that is what makes resuming exact.
    """

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        self.source: str | None = None

    def write_step(
        self, step: int, records: Any = (), events: Any = (), statuses: Any = (), source: str | None = None
    ) -> None:
        self._writer.write_step(step, records, events, statuses, source=source or self.source)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


def _make_monitor(
    net: Any, loss_fn: Any, run_dir: Path, diags: list[Any], probe: list[Any], config: dict
) -> Any:
    from diagnostics.tracking import Monitor

    monitor = Monitor(
        net, loss_fn, run=str(run_dir), diagnostics=diags, optimizer=None, probe_data=probe, meta=config
    )
    if monitor.writer is not None and "source" not in inspect.signature(monitor.step).parameters:
        monitor.writer = _SourcedWriter(monitor.writer)
    if monitor.writer is not None:
        # The Monitor describes in-loop gradients; say what the gradients of an analysis are.
        monitor.writer.set_meta("gradients_seen", GRADIENTS_SEEN)
        monitor.writer.set_meta("analysis_mode", "eval")
    return monitor


def _monitor_step(monitor: Any, step: int, batch: Any, loss: float, source: str) -> None:
    if "source" in inspect.signature(monitor.step).parameters:
        monitor.step(step, batch, loss=loss, source=source)
        return
    writer = monitor.writer
    if isinstance(writer, _SourcedWriter):
        writer.source = source
    try:
        monitor.step(step, batch, loss=loss)
    finally:
        if isinstance(writer, _SourcedWriter):
            writer.source = None
