"""What the reproductions share: the digits data in two scalings, the two losses, a summary helper.

The scripts in this folder import it as ``_common`` (their own folder is first on ``sys.path`` when run as
``python examples/NAME.py``; ``tests/examples/conftest.py`` puts the folder on the path for the slow tests).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch
from torch import nn

from diagnostics.zoo.data import digits_arrays


def digits(inputs: str = "standardized", samples: int | None = None, classes: int = 10,
           random_labels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits training split (1438 images): ``(x [N, 64] float32, y [N] int64)``.

    Args:
        inputs: ``"standardized"`` (the zoo's per-pixel standardisation) or ``"pixels"`` (the raw 0..16
            intensities of the same images scaled to [0, 1], as MNIST in most papers).
        samples: keep the first ``samples`` images (the split is already shuffled).
        classes: 10, or 5 for the relabelling ``y -> y mod 5`` (digits 0 and 5 become class 0, ...).
        random_labels: a seed: replace the labels by uniform random ones (a control without signal).
    """
    x, y = digits_arrays("train")
    if inputs == "pixels":
        from sklearn.datasets import load_digits

        raw = torch.as_tensor(load_digits().data, dtype=torch.float64)
        # The zoo's fixed split: the same permutation of the 1797 images, first 80% for training.
        perm = torch.randperm(raw.shape[0], generator=torch.Generator().manual_seed(20240101))
        x = (raw[perm[: x.shape[0]]] / 16.0).to(torch.float32)
    elif inputs != "standardized":
        raise ValueError(f"inputs must be 'standardized' or 'pixels', got {inputs!r}")
    if classes == 5:
        y = y % 5
    elif classes != 10:
        raise ValueError(f"classes must be 10 or 5, got {classes}")
    if random_labels is not None:
        y = torch.randint(0, classes, y.shape, generator=torch.Generator().manual_seed(random_labels))
    if samples is not None:
        x, y = x[:samples], y[:samples]
    return x, y


def mlp(width: int, depth: int = 2, classes: int = 10, activation: str = "tanh", seed: int = 0) -> nn.Module:
    """The zoo's digits MLP: 64 inputs, ``depth`` hidden layers of ``width``, ``classes`` outputs."""
    from diagnostics.zoo import get_model

    return get_model("mlp-digits", hidden=(width,) * depth, num_classes=classes, activation=activation, seed=seed)


def squared_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cohen et al.'s MSE: half the squared error on one-hot targets, summed over classes, mean over samples."""
    x, y = batch
    out = model(x)
    target = torch.nn.functional.one_hot(y, out.shape[1]).to(out.dtype)
    return 0.5 * (out - target).square().sum(1).mean()


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def median(values: Sequence[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else math.nan


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
