"""Norms of groups of tensors computed with one fused kernel and one host transfer.

Shared by the norm diagnostics (:mod:`diagnostics.metrics.basics`) and by :class:`StepContext`, which
computes the step's gradient and weight norms once for every diagnostic that reads them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from diagnostics._distributed import sharded_norms

__all__ = ["WeightNorms", "host_norms", "tensor_norms", "total_norm"]


def host_norms(tensors: list[torch.Tensor]) -> list[float]:
    """L2 norm of each tensor as a Python float, in order.

    Cost: one fused norm kernel over all tensors and one device-to-host copy (no autograd graph).
    """
    if not tensors:
        return []
    sharded = sharded_norms(tensors)  # FSDP2's DTensor shards: whole-tensor norms, one all-reduce
    if sharded is not None:
        return sharded
    with torch.no_grad():
        try:
            norms = torch._foreach_norm(tensors)
        except (RuntimeError, AttributeError, TypeError):  # mixed dtypes/devices or no fused kernel
            norms = [torch.linalg.vector_norm(v) for v in tensors]
        try:
            # tolist() converts each float32/float16 value to a Python float exactly.
            return torch.stack(norms).cpu().tolist()
        except RuntimeError:  # parameters spread over devices
            return [float(n) for n in norms]


def tensor_norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """L2 norm of each tensor as a Python float, plus ``"all"`` = sqrt of the sum of squares.

    Cost: one fused norm kernel over all tensors and one device-to-host copy.
    """
    if not tensors:
        return {}
    names = list(tensors)
    out = dict(zip(names, host_norms([tensors[n] for n in names])))
    out["all"] = total_norm(out.values())
    return out


def total_norm(norms: Any) -> float:
    """sqrt of the sum of squares of per-tensor norms.

    Summed in float64 on the host: a float32 sum of squares overflows long before the norms do.
    """
    return math.sqrt(math.fsum(x * x for x in norms))


class WeightNorms(Mapping[str, float]):
    """Weight norms at a step: ``"all"`` from one reduction over the flat copy of the parameters (the copy
    the update snapshot reuses), per-parameter norms on first access (one fused norm over views of it).

    Falls back to per-tensor norms when the parameters do not share a dtype and device.
    """

    def __init__(
        self,
        flat: tuple[torch.Tensor, list[str], list[torch.Tensor]] | None,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """``flat``: the parameters copied into one tensor, with their names and shapes (see
        ``StepContext.flat_parameters``); when None, ``tensors`` gives them one by one."""
        self._flat = flat
        self._values: dict[str, float] | None = None
        if self._flat is None:
            self._values = tensor_norms(dict(tensors or {}))
            self.all = self._values.get("all", float("nan"))
        else:
            flat, names, _ = self._flat
            self.all = float(torch.linalg.vector_norm(flat)) if names else float("nan")

    def per_parameter(self) -> dict[str, float]:
        """``{name: norm}`` plus ``"all"``; computed on first call."""
        if self._values is None:
            flat, names, like = self._flat
            views = torch._utils._unflatten_dense_tensors(flat, like)
            self._values = {**dict(zip(names, host_norms(list(views)))), "all": self.all}
        return self._values

    def __getitem__(self, key: str) -> float:
        return self.all if key == "all" else self.per_parameter()[key]

    def __iter__(self) -> Any:
        return iter(self.per_parameter())

    def __len__(self) -> int:
        return len(self.per_parameter())

    def get(self, key: str, default: Any = None) -> Any:
        if key == "all":
            return self.all
        return self.per_parameter().get(key, default)
