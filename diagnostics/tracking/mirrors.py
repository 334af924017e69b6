"""Logger mirrors: the Monitor's scalars also sent to TensorBoard, Weights & Biases, MLflow or a callable.

The run store stays the record; a mirror is a convenience view in the dashboard a team already watches.
After each committed step the Monitor calls ``mirror.write(step, scalars)`` with the step's scalar records
as ``{name: value}``; vectors (eigenvalues, histograms, densities) are not mirrored. Names are
``PREFIX + metric`` for key ``"all"`` and ``PREFIX + metric/key`` per parameter or module, for example
``diagnostics/grad_norm`` and ``diagnostics/grad_norm/fc1.weight``. The x-axis is the training step.

Usage::

    Monitor(model, run="runs/a", mirrors=["tensorboard"])              # RUN/tensorboard event files
    Monitor(model, run="runs/a", mirrors=[SummaryWriter("tb/a")])      # your writer
    Monitor(model, run="runs/a", mirrors=[WandbMirror(), MLflowMirror()])
    Monitor(model, run="runs/a", mirrors=[lambda step, scalars: print(step, scalars)])

Every backend is an optional dependency imported when its mirror is created.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from diagnostics.errors import ConfigError
from diagnostics.store.records import Record, VectorRecord, expand_records

__all__ = [
    "CallbackMirror",
    "MLflowMirror",
    "Mirror",
    "TensorBoardMirror",
    "WandbMirror",
    "resolve_mirrors",
    "scalars_from_records",
]

DEFAULT_PREFIX = "diagnostics/"


@runtime_checkable
class Mirror(Protocol):
    """Receives the scalars of each committed step. ``close()`` flushes (and closes what the mirror opened)."""

    def write(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def require(module: str, install: str, what: str) -> Any:
    """Import an optional dependency or raise ConfigError naming the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{what} needs the optional package {module!r}: pip install {install}") from exc


def scalars_from_records(
    records: Iterable[Record | VectorRecord],
    *,
    prefix: str = DEFAULT_PREFIX,
    per_key: bool = True,
    metrics: Sequence[str] | None = None,
) -> dict[str, float]:
    """The scalar records of a step as ``{name: value}``.

    A ``(metric, key)`` pair with a single record at index 0 is a scalar; pairs with several indices are
    vectors and are left out. ``per_key=False`` keeps only key ``"all"``; ``metrics`` (names or globs)
    keeps only those metrics. Cost: one pass over the records.
    """
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in expand_records(records):
        groups.setdefault((r.metric, r.key), []).append(r)
    out: dict[str, float] = {}
    for (metric, key), rows in groups.items():
        if len(rows) != 1 or rows[0].index != 0:
            continue
        if not per_key and key != "all":
            continue
        if metrics is not None and not any(fnmatch.fnmatchcase(metric, m) for m in metrics):
            continue
        name = metric if key == "all" else f"{metric}/{key}"
        out[prefix + name] = float(rows[0].value)
    return out


class CallbackMirror:
    """Calls ``fn(step, scalars)`` after each committed step."""

    def __init__(self, fn: Callable[[int, dict[str, float]], Any]) -> None:
        if not callable(fn):
            raise ConfigError(f"CallbackMirror needs a callable(step, scalars), got {type(fn).__name__}")
        self.fn = fn

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        self.fn(step, dict(scalars))

    def close(self) -> None:
        pass


class TensorBoardMirror:
    """Scalars to TensorBoard event files through ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        log_dir: directory for a writer this mirror creates (and closes); ignored with ``writer``.
        writer: an existing ``SummaryWriter`` (flushed on close, left open).
    """

    def __init__(self, log_dir: str | Path | None = None, *, writer: Any = None) -> None:
        if writer is None:
            require("tensorboard", "tensorboard", "TensorBoardMirror")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
            self._owned = True
        else:
            self._owned = False
        self.writer = writer

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        if self._owned:
            self.writer.close()


class WandbMirror:
    """Scalars to Weights & Biases, plotted against a custom step metric (default ``trainer/step``).

    W&B's own step only increases, so a run that logs steps out of order (``tdiag analyze`` logging
    checkpoints retroactively, or a resumed run) would be misplaced on it; the mirrored series use
    ``wandb.define_metric(prefix + "*", step_metric=step_metric)`` instead and every ``log`` carries the
    training step. Test and air-gapped use: ``WandbMirror(mode="offline", dir=...)``.

    Args:
        run: a ``wandb`` run; default the active run, else one started by ``wandb.init(**init_kwargs)``
            (finished on close).
        step_metric: name of the x-axis metric.
        prefix: the prefix of the mirrored names (must match the Monitor's, default ``diagnostics/``).
    """

    def __init__(
        self, run: Any = None, *, step_metric: str = "trainer/step", prefix: str = DEFAULT_PREFIX, **init_kwargs: Any
    ) -> None:
        wandb = require("wandb", "wandb", "WandbMirror")
        self._owned = run is None and wandb.run is None
        self.run = run if run is not None else (wandb.run if wandb.run is not None else wandb.init(**init_kwargs))
        self.step_metric = step_metric
        self.run.define_metric(step_metric)
        self.run.define_metric(f"{prefix}*", step_metric=step_metric)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log({**scalars, self.step_metric: step})

    def close(self) -> None:
        if self._owned:
            self.run.finish()


# MLflow accepts alphanumerics, "_", "-", ".", " ", ":" and "/" in metric names.
_MLFLOW_BAD = re.compile(r"[^\w\-. :/]")


class MLflowMirror:
    """Scalars to MLflow with the training step as the metric step (batched, 1000 per request).

    Whole-model values are named ``metric/all`` here (``diagnostics/grad_norm/all``): MLflow's file store
    keeps metric names as paths, where ``grad_norm`` could not be both a file and the directory of
    ``grad_norm/fc1.weight``.

    Args:
        run_id: log into this run; default the active run, else a run started in ``experiment`` (ended on
            close).
        tracking_uri: e.g. ``"file:///path/mlruns"`` for a local file store; default MLflow's own.
        experiment: experiment name for a run the mirror starts.
        run_name: name for a run the mirror starts.
        prefix: the prefix of the mirrored names (the Monitor's is ``diagnostics/``).
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        mlflow = require("mlflow", "mlflow", "MLflowMirror")
        self._Metric = importlib.import_module("mlflow.entities").Metric
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self._owned = False
        if run_id is None:
            active = mlflow.active_run()
            if active is not None and tracking_uri is None:
                run_id = active.info.run_id
            else:
                exp_id = "0"
                if experiment is not None:
                    found = self.client.get_experiment_by_name(experiment)
                    exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
                run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
                self._owned = True
        self.run_id = run_id
        self.prefix = prefix

    def _name(self, name: str) -> str:
        rest = name[len(self.prefix) :] if name.startswith(self.prefix) else name
        return _MLFLOW_BAD.sub("_", name if "/" in rest else name + "/all")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        ts = int(time.time() * 1000)
        metrics = [self._Metric(self._name(k), float(v), ts, int(step)) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000], synchronous=True)

    def close(self) -> None:
        if self._owned:
            self.client.set_terminated(self.run_id)


def _from_name(name: str, run_dir: Path | None) -> Mirror:
    if name == "tensorboard":
        return TensorBoardMirror(None if run_dir is None else run_dir / "tensorboard")
    if name == "wandb":
        return WandbMirror()
    if name == "mlflow":
        return MLflowMirror()
    raise ConfigError(f"unknown mirror {name!r}; use 'tensorboard', 'wandb', 'mlflow', a Mirror or a callable(step, scalars)")


def resolve_mirrors(spec: Any, run_dir: Path | None = None) -> list[Mirror]:
    """Normalise the Monitor's ``mirrors=`` argument into Mirror objects.

    Accepts one item or a list of: ``"tensorboard"`` (event files in ``run_dir/tensorboard``), ``"wandb"``
    (active run or a new one), ``"mlflow"`` (active run or a new one), a ``SummaryWriter``, a Mirror
    (anything with ``write(step, scalars)`` and ``close()``), or a callable ``f(step, scalars)``.
    """
    if spec is None:
        return []
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    out: list[Mirror] = []
    for item in items:
        if isinstance(item, str):
            out.append(_from_name(item, run_dir))
        elif isinstance(item, Mirror):
            out.append(item)
        elif hasattr(item, "add_scalar") and hasattr(item, "flush"):
            out.append(TensorBoardMirror(writer=item))
        elif callable(item):
            out.append(CallbackMirror(item))
        else:
            raise ConfigError(
                f"mirrors: cannot use {type(item).__name__}; pass 'tensorboard', 'wandb', 'mlflow', a SummaryWriter, "
                "an object with write(step, scalars) and close(), or a callable(step, scalars)"
            )
    return out

