"""What the loop hands the Monitor: the step, its loss and batches, and the probe data kept with the run.

Probe data are the fixed batches curvature estimates run on: estimates on the same batches at every step
are comparable across steps, and the batches are saved in the run directory so a resumed run keeps
measuring on them. :func:`check_batch` runs the loss once on a batch so a batch the loss cannot consume is
a DataError before anything is written, not a failure at every step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diagnostics._batch import detach_batch
from diagnostics._state import isolated
from diagnostics.errors import ConfigError, DataError, LossError

__all__ = ["check_batch", "check_step", "load_probe", "probe_list", "probe_path", "save_probe"]


def check_step(step: Any, loss: Any) -> int:
    """The step given to ``Monitor.step`` as an int, after checking it and the loss's type and shape.

    Raises:
        ConfigError: ``step`` is not an int. LossError: ``loss`` is neither None, a scalar tensor nor a number.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ConfigError(f"step must be an int, got {type(step).__name__}")
    if torch.is_tensor(loss):
        if loss.numel() != 1:
            raise LossError(
                f"loss passed to monitor.step must be a scalar, got shape {tuple(loss.shape)}; "
                "pass the value backward() was called on (e.g. loss.mean())"
            )
    elif loss is not None and not isinstance(loss, (int, float, np.floating, np.integer)):
        raise LossError(f"loss passed to monitor.step must be a scalar tensor or a float, got {type(loss).__name__}")
    return int(step)


def probe_list(probe_data: Any, limit: int | None) -> list[Any]:
    """Normalise probe data: a tuple/dict/tensor is one batch; a list or an iterable is a sequence of batches.

    An iterable (a DataLoader) is read for at most ``limit`` batches, each detached.
    """
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


def check_batch(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    batch: Any,
    what: str,
    modules: Sequence[nn.Module] | None = None,
) -> None:
    """Run the loss once on ``batch`` (no grad, eval mode, isolated): DataError/LossError if unusable.

    Args:
        loss_fn: the user's loss; None means :func:`diagnostics.loss.default_loss`.
        what: names the batch in the error message.
        modules: ``list(model.modules())`` precomputed by the caller.

    Cost: one forward pass without autograd.
    """
    if batch is None:
        raise DataError(f"{what} is None, but the selected diagnostics run the loss on the step's batch; pass the batch")
    if loss_fn is None:
        from diagnostics.loss import default_loss

        loss_fn = default_loss
    try:
        with isolated(model, "eval", grad=False, modules=modules):
            value = loss_fn(model, batch)
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


def probe_path(run_dir: Path) -> Path:
    """Where a run keeps its probe batches."""
    return run_dir / "probe_data.pt"


def save_probe(run_dir: Path, probe_data: list[Any]) -> None:
    """Save the probe batches for resuming; a failure only warns (later curvature probes would differ)."""
    try:
        torch.save(probe_data, probe_path(run_dir))
    except Exception as exc:  # noqa: BLE001 - resuming without it only changes later curvature probes
        warnings.warn(f"could not save probe data for resuming: {exc}", RuntimeWarning, stacklevel=3)


def load_probe(run_dir: Path) -> list[Any] | None:
    """The probe batches a run saved (``weights_only`` load), or None when there are none or they are unreadable."""
    path = probe_path(run_dir)
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"could not load saved probe data {path}: {exc}", RuntimeWarning, stacklevel=3)
        return None
