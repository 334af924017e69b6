"""The global random-number streams, saved and restored around work that must leave no trace."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["fork_global_rng", "initialised_cuda_devices"]


def initialised_cuda_devices(current_only: bool = False) -> list[int]:
    """CUDA devices whose generators must be forked: none unless CUDA is already in use (forking would
    initialise it); all of them, or only the current one when ``current_only``."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    return [torch.cuda.current_device()] if current_only else list(range(torch.cuda.device_count()))


@contextlib.contextmanager
def fork_global_rng(devices: Sequence[int] | None = None) -> Iterator[None]:
    """Save the torch (CPU and ``devices``, default the current CUDA device), numpy and Python ``random``
    streams; restore them on exit, also when the body raises.

    Cost: copying the generator states (a few kilobytes), microseconds.
    """
    devices = initialised_cuda_devices(current_only=True) if devices is None else list(devices)
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
