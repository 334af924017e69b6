"""Helpers shared by the checkpoint tests."""

from __future__ import annotations

import torch


def make_model(width: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


class Marker:
    """Unpickling this object creates a file: proof that code stored in a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
