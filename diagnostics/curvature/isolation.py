"""Leave the model and the global state exactly as found.

Curvature products run inside :func:`isolated`: the forward mode is switched (eval by default) and every
module's ``training`` flag restored in ``finally``; the global torch (CPU and CUDA), numpy and python RNG
streams are forked, so dropout in train mode or any random op inside the model cannot advance them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from diagnostics.errors import ConfigError
from diagnostics.rng import fork_global_rng, initialised_cuda_devices

__all__ = ["isolated", "forward_mode", "seed_private"]

MODES = ("eval", "train")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"mode must be 'eval' or 'train', not {mode!r}")
    return mode


@contextlib.contextmanager
def forward_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Set ``model`` to ``mode`` ("eval" or "train"); restore every module's flag on exit."""
    _check_mode(mode)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(mode == "train")
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _cuda_devices() -> list[int]:
    # The model may live on any device: fork every initialised one.
    return initialised_cuda_devices()


@contextlib.contextmanager
def isolated(model: nn.Module, mode: str) -> Iterator[None]:
    """Fork the global RNG streams (torch CPU/CUDA, numpy, python), set the forward mode, enable grad.

    Everything is restored in ``finally``, also when the body raises.
    """
    with fork_global_rng(_cuda_devices()), forward_mode(model, mode), torch.enable_grad():
        yield


def seed_private(seed: int) -> None:
    """Seed the (forked) torch generators so that random ops in the model are reproducible.

    Call only inside :func:`isolated`, whose fork restores the caller's streams afterwards.
    """
    torch.random.default_generator.manual_seed(seed)
    for i in _cuda_devices():
        torch.cuda.default_generators[i].manual_seed(seed)
