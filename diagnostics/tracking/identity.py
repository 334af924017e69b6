"""Model identity and structure: what a run records about the model, and its current trainable parameters.

A run directory belongs to one architecture: :func:`model_fingerprint` hashes parameter names and shapes
(not values), so a resumed run accepts the same model at any point of training and refuses another one.
:class:`ModelStructure` keeps ``named_parameters()`` current without walking the module tree at every step.
"""

from __future__ import annotations

import hashlib
import operator
import platform
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from diagnostics.metrics.base import Diagnostic

__all__ = ["ModelStructure", "model_fingerprint", "model_summary", "run_meta", "versions"]


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the parameter names and shapes: the same architecture, any weights.

    Cost: one pass over ``named_parameters()``; no tensor data is read.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def model_summary(model: nn.Module) -> dict[str, Any]:
    """``{class, num_params, num_trainable, parameters: {name: shape}}`` for the run's metadata.

    Cost: one pass over ``named_parameters()``.
    """
    params = dict(model.named_parameters())
    return {
        "class": type(model).__name__,
        "num_params": int(sum(p.numel() for p in params.values())),
        "num_trainable": int(sum(p.numel() for p in params.values() if p.requires_grad)),
        "parameters": {n: list(p.shape) for n, p in params.items()},
    }


def versions() -> dict[str, str]:
    """Versions of Python, torch, numpy and this package (when installed), for the run's metadata."""
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        out["training-diagnostics"] = metadata.version("training-diagnostics")
    except metadata.PackageNotFoundError:
        pass
    return out


def run_meta(
    model: nn.Module,
    diagnostics: Iterable[Diagnostic],
    config: Mapping[str, Any] | None,
    *,
    curvature_mode: str,
    num_classes: int | None,
) -> dict[str, Any]:
    """The metadata a monitored run starts with: versions, the user's config, the model, the diagnostics'
    settings, and which gradients and modes the estimates saw. Cost: one pass over the parameters."""
    return {
        "versions": versions(),
        "config": dict(config or {}),
        "model_summary": model_summary(model),
        "model_fingerprint": model_fingerprint(model),
        "diagnostics": {d.name: {"class": type(d).__name__, **d.settings()} for d in diagnostics},
        "gradients_seen": "the parameters' .grad after the user's backward(), before optimizer.step()",
        "loss_reduction": "mean",
        "curvature_mode": curvature_mode,
        "activation_mode": "eval",
        "num_classes": num_classes,
    }


class ModelStructure:
    """The model's modules and trainable ``(name, parameter)`` pairs, listed again only when they change.

    ``model.named_parameters()`` walks the module tree in Python (about 100 us per step on a small
    transformer); the list is kept and listed again only when a module's parameters or children changed
    (compared by identity, a few microseconds). ``requires_grad`` is read at every call.

    Attributes:
        modules: ``list(model.modules())`` as of the last :meth:`trainable` call (what the isolation
            context restores the modes of).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules: list[nn.Module] = list(model.modules())
        self._member_dicts: list[dict[str, Any]] = [d for m in self.modules for d in (m._parameters, m._modules)]
        self._structure: list[Any] = []  # every module's parameters and children, to notice changes
        self._all_named: list[tuple[str, nn.Parameter]] = []

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable ``(name, parameter)`` pairs in ``named_parameters()`` order.

        Cost: one identity comparison per parameter and child module; a full walk only after a change.
        """
        structure = [v for d in self._member_dicts for v in d.values()]
        if len(structure) != len(self._structure) or not all(map(operator.is_, structure, self._structure)):
            self.modules = list(self.model.modules())
            self._member_dicts = [d for m in self.modules for d in (m._parameters, m._modules)]
            self._structure = [v for d in self._member_dicts for v in d.values()]
            self._all_named = list(self.model.named_parameters())
        return [(n, p) for n, p in self._all_named if p.requires_grad]
