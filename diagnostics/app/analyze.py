"""Run the registered diagnostics over saved checkpoints: the library function behind ``tdiag analyze``.

Each checkpoint becomes one step of a run, measured through the same :class:`~diagnostics.tracking.Monitor`
and :class:`~diagnostics.tracking.StepContext` machinery as in-loop monitoring and written to the same
store, so ``tdiag report`` reads both alike. Per checkpoint: its weights are loaded into the model, the
mean loss and its gradient are computed over the fixed data batches (eval mode: no dropout, BatchNorm on
its running statistics, so every checkpoint sees the same function of its weights), and the Monitor runs
every chosen diagnostic once (schedules are ignored: every checkpoint is due). There is no optimizer, so
diagnostics that need one (the update ratio, Adam's preconditioned sharpness) are reported as skipped
by the Monitor rather than guessed.

Everything that can be checked is checked before the store is written: the specs, every checkpoint's
keys and shapes, the diagnostics' names, that an existing run directory belongs to this model, and the
loss (:func:`~diagnostics.loss.check_loss` on every batch of the first checkpoint's gradient pass, which
runs before the Monitor opens the store). A failure raises a
:class:`~diagnostics.errors.DiagnosticsError` and leaves the store untouched.

The analysis resumes: each checkpoint is written in one transaction together with its source id, and
checkpoints whose source is already in the store are skipped unless ``force=True``, which recomputes
them (rows are replaced, never duplicated).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diagnostics._batch import concat_batches, leading_size, to_device
from diagnostics.app.specs import resolve_data, resolve_loss, resolve_model
from diagnostics.checkpoints import CheckpointInfo, UnsafePickleWarning, apply_checkpoint, inspect_checkpoints
from diagnostics.errors import CheckpointError, ConfigError, DataError, DiagnosticsError
from diagnostics.loss import check_loss, default_loss

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


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device (use cpu or cuda): {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return dev


def _completed_sources(run_dir: Path, model: Any) -> set[str]:
    """The sources an existing run has completed (empty for a new run directory).

    Raises:
        ConfigError: the run was written for another model.
    """
    from diagnostics.store import open_run
    from diagnostics.store.schema import database_path
    from diagnostics.tracking.monitor import model_fingerprint

    if not database_path(run_dir).is_file():
        return set()
    with open_run(run_dir) as run:
        stored = run.meta.get("model_fingerprint")
        fingerprint = model_fingerprint(model)
        if stored is not None and stored != fingerprint:
            raise ConfigError(
                f"run directory {str(run_dir)!r} holds a run of another model (model fingerprint {stored} "
                f"there, {fingerprint} for --model); choose another --run directory"
            )
        return set(run.sources()["source"])


def _batch_loss(model: Any, loss_fn: Callable[..., Any], batch: Any, index: int) -> torch.Tensor:
    try:
        value = loss_fn(model, batch)
    except DiagnosticsError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model or loss may raise anything
        raise DataError(
            f"the loss on batch {index} raised {type(exc).__name__}: {exc}; do --data and --loss fit --model?"
        ) from None
    # A diverged checkpoint's non-finite loss is a measurement: the Monitor records it as an event.
    # Anything else check_loss refuses (not a floating scalar tensor) is the user's loss to fix.
    diverged = (
        torch.is_tensor(value)
        and value.ndim == 0
        and value.is_floating_point()
        and not bool(torch.isfinite(value.detach()))
    )
    if not diverged:
        check_loss(value, index)
    return value


def _gradient_pass(model: Any, loss_fn: Callable[..., Any], batches: list[Any]) -> float:
    """Mean loss over ``batches`` (weights |batch|/N) and its gradient in ``.grad``. Cost: one forward
    and backward per batch."""
    sizes = [leading_size(b) or 1 for b in batches]
    total = sum(sizes)
    model.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for i, (batch, size) in enumerate(zip(batches, sizes)):
        loss = _batch_loss(model, loss_fn, batch, i)
        weight = size / total
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
        loss: a loss spec or ``loss_fn(model, batch)``; default: the zoo model's loss, for ``hf:DIR`` the
            model's own loss (``model(**batch).loss``), else the library's default loss.
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
    if loss_fn is None and model_spec is not None and model_spec.startswith("hf:"):
        # A Hugging Face model computes its own mean loss from the batch's labels, as in its Trainer.
        from diagnostics.tracking.integrations.huggingface import hf_loss

        loss_fn = hf_loss
    if loss_fn is None:
        loss_fn = default_loss
    diags = _resolve_diagnostics(diagnostics)

    infos = inspect_checkpoints(checkpoints, model=net, unsafe_pickle=unsafe_pickle)
    _check_distinct_steps(infos)
    done = _completed_sources(run_dir, net)
    todo = [info for info in infos if force or info.source not in done]
    result = AnalysisResult(run_dir=run_dir, checkpoints=infos)
    result.skipped = [info.step for info in infos if info not in todo]
    if not todo:
        result.seconds = time.perf_counter() - started
        return result

    net.to(dev)
    data_batches = [to_device(b, dev) for b in data_batches]
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
    # Diagnostics that look at "the step's batch" (per-sample gradients, activations) see every sample;
    # batches that cannot be joined (ragged shapes, other structures) leave them the first batch.
    try:
        batch = concat_batches(data_batches)
    except (DataError, RuntimeError):
        batch = data_batches[0]
    monitor = None
    try:
        for info in _progress(todo, total=len(todo), quiet=quiet, desc="analyze"):
            with _quiet_unsafe(unsafe_pickle):
                apply_checkpoint(net, info.path, unsafe_pickle=unsafe_pickle)
            net.eval()
            loss_value = _gradient_pass(net, loss_fn, data_batches)
            if monitor is None:
                # Only now, with the loss checked on every batch, is the store opened (and created).
                monitor = _make_monitor(net, loss_fn, run_dir, diags, data_batches, run_config)
            _monitor_step(monitor, info.step, batch, loss_value, info.source)
            net.zero_grad(set_to_none=True)
            result.analyzed.append(info.step)
            if on_checkpoint is not None:
                on_checkpoint(info)
    finally:
        if monitor is not None:
            monitor.close()
    result.seconds = time.perf_counter() - started
    return result


@contextlib.contextmanager
def _quiet_unsafe(unsafe: bool) -> Any:
    # The unsafe-pickle warning is shown once by the caller (the CLI), not once per checkpoint.
    with warnings.catch_warnings():
        if unsafe:
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

    # What the user named (a name, {name: options} or an instance) is refused if it cannot run on a
    # checkpoint; what came with a preset is left out quietly.
    named: set[str] = set()
    for s in spec if isinstance(spec, (list, tuple)) else [spec]:
        if isinstance(s, str) and s not in PRESETS:
            named.add(s)
        elif isinstance(s, dict):
            named.update(str(k) for k in s)
        elif isinstance(getattr(s, "name", None), str):
            named.add(s.name)
    diags = []
    for d in resolve_diagnostics(spec):
        if _NEEDS_TRAINING & d.requires and callable(getattr(d, "without_update", None)):
            d = d.without_update()  # its part that needs no optimizer step (grad_subspace: all but the update)
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
        if hasattr(d, "refine_gap"):
            # A checkpoint is no warm continuation of the previous one (spectral alignment's v_1): converge.
            d.refine_gap = 0
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


def _make_monitor(
    net: Any, loss_fn: Any, run_dir: Path, diags: list[Any], probe: list[Any], config: dict
) -> Any:
    from diagnostics.tracking import Monitor

    # Checkpoints are analysed in eval mode and have no training forward to observe.
    monitor = Monitor(
        net, loss_fn, run=str(run_dir), diagnostics=diags, optimizer=None, probe_data=probe, meta=config,
        observe_training_forward=False,
    )
    # The Monitor describes in-loop gradients; say what the gradients of an analysis are.
    monitor.set_meta("gradients_seen", GRADIENTS_SEEN)
    monitor.set_meta("analysis_mode", "eval")
    return monitor


def _monitor_step(monitor: Any, step: int, batch: Any, loss: float, source: str) -> None:
    # The checkpoint's source id is committed in the same transaction as its rows, so a checkpoint is
    # listed as completed only when all of it is stored: that is what makes resuming exact.
    monitor.step(step, batch, loss=loss, source=source)
