"""Name -> factory registry of the zoo's models and datasets, with each model's default data and loss.

Names are the ones the CLI and specs accept: models ``mlp-digits``, ``cnn-digits``, ``tiny-gpt``; data
``digits``, ``pydoc-text``, ``gaussian-mixture``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from diagnostics.errors import ConfigError
from diagnostics.loss import ClassificationLoss, LanguageModelLoss
from diagnostics.zoo import data as _data
from diagnostics.zoo import models as _models

__all__ = ["ModelEntry", "DatasetEntry", "MODELS", "DATASETS", "get_model", "get_data", "get_loss"]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: factory, the data it is meant for, its loss kind and a one-line description."""

    name: str
    factory: Callable[..., nn.Module]
    data: str
    loss: str  # "classification" | "language_model"
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: factory returning a list of (inputs, targets) batches."""

    name: str
    factory: Callable[..., list]
    task: str  # "classification" | "language_model"
    description: str


MODELS: dict[str, ModelEntry] = {
    "mlp-digits": ModelEntry(
        "mlp-digits", _models.MLPDigits, "digits", "classification",
        "MLP 64 -> 32 -> 32 -> 10 (tanh; activation='relu' option) for 8x8 digits",
    ),
    "cnn-digits": ModelEntry(
        "cnn-digits", _models.CNNDigits, "digits", "classification",
        "two 3x3 conv + BatchNorm layers, max-pool, linear head, for 1x8x8 digits",
    ),
    "tiny-gpt": ModelEntry(
        "tiny-gpt", _models.TinyGPT, "pydoc-text", "language_model",
        "pre-LN character-level GPT (default 2 layers, d_model 64, 4 heads, T 64, about 110k parameters)",
    ),
}

DATASETS: dict[str, DatasetEntry] = {
    "digits": DatasetEntry(
        "digits", _data.digits_batches, "classification",
        "sklearn 8x8 handwritten digits, standardised, fixed 80/20 split, x [B, 64] float32, y [B] int64",
    ),
    "pydoc-text": DatasetEntry(
        "pydoc-text", _data.pydoc_text_batches, "language_model",
        "character-level windows of the stdlib pydoc_data.topics text, x and y [B, T] int64 (vocab 96)",
    ),
    "gaussian-mixture": DatasetEntry(
        "gaussian-mixture", _data.gaussian_mixture_batches, "classification",
        "synthetic isotropic Gaussian mixture, x [B, 64] float32, y [B] int64 (10 classes)",
    ),
}


def _unknown(kind: str, name: str, valid) -> ConfigError:
    return ConfigError(f"unknown zoo {kind} {name!r}; choose one of {sorted(valid)}")


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name; keyword arguments go to its constructor (e.g. ``seed``, ``d_model``).

    Raises:
        ConfigError: unknown name or option.
    """
    if name not in MODELS:
        raise _unknown("model", name, MODELS)
    try:
        return MODELS[name].factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad option for zoo model {name!r}: {exc}") from exc


def get_data(
    name: str,
    batch_size: int | None = None,
    num_batches: int | None = None,
    seed: int = 0,
    split: str = "train",
    **kwargs: Any,
) -> list:
    """Deterministic list of ``(inputs, targets)`` batches of a zoo dataset.

    Args:
        name: ``digits``, ``pydoc-text`` or ``gaussian-mixture``.
        batch_size: samples per batch (dataset default when None: 64, 16, 64).
        num_batches: number of batches; None = one epoch (``pydoc-text``: 10 batches).
        seed: seed of the private generator that orders / samples the batches.
        split: ``train`` or ``test`` (alias ``val``).
        **kwargs: dataset options (``block_size`` for pydoc-text; mixture options).

    Raises:
        ConfigError: unknown name, split or option.
    """
    if name not in DATASETS:
        raise _unknown("dataset", name, DATASETS)
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    try:
        return DATASETS[name].factory(num_batches=num_batches, seed=seed, split=split, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad option for zoo dataset {name!r}: {exc}") from exc


def get_loss(name: str) -> Callable:
    """Default loss object ``loss_fn(model, batch) -> scalar`` for a zoo model (or dataset) name.

    Classification models get ``ClassificationLoss``, ``tiny-gpt`` gets ``LanguageModelLoss`` (logits
    [B, T, V] flattened against targets [B, T]); both from :mod:`diagnostics.loss`, mean reduction.
    """
    if name in MODELS:
        task = MODELS[name].loss
    elif name in DATASETS:
        task = DATASETS[name].task
    else:
        raise _unknown("model or dataset", name, {**MODELS, **DATASETS})
    cls = LanguageModelLoss if task == "language_model" else ClassificationLoss
    return cls()
