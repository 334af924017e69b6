"""Per-batch linearisations for the two autodiff backends, and memory accounting for the cache.

* forward-over-reverse: ``torch.func.linearize`` of ``grad`` traces the Jacobian-vector product of the
  gradient once and constant-folds everything that depends only on the primal point; a product then runs
  only the tangent half of the graph. If tracing fails, products fall back to ``torch.func.jvp(grad(f))``,
  which recomputes the forward and first backward at every product.
* double backward: the first backward is taken with ``create_graph=True`` and its graph is kept
  (``retain_graph=True`` at every product); ``Hv = d<g, v>/dθ`` is one backward through that graph.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["folded_linearize", "SavedBytes", "module_tensor_bytes", "closure_graph_bytes", "grads_or_none"]


class SavedBytes:
    """Count the distinct storages autograd saves for backward while active (the retained graph's size)."""

    def __init__(self) -> None:
        self.nbytes = 0
        self._seen: set[tuple[str, int]] = set()

    def _pack(self, t: Tensor) -> Tensor:
        try:
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr())
            if key not in self._seen:
                self._seen.add(key)
                self.nbytes += st.nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
            self.nbytes += t.numel() * t.element_size()
        return t

    @contextlib.contextmanager
    def track(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def module_tensor_bytes(module: nn.Module) -> int:
    """Bytes of the distinct tensors a (graph) module holds: parameters, buffers and tensor attributes."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for mod in module.modules():
        values = list(mod._parameters.values()) + list(mod._buffers.values())
        values += [v for v in vars(mod).values() if isinstance(v, Tensor)]
        for t in values:
            if t is None:
                continue
            try:
                key = (str(t.device), t.untyped_storage().data_ptr())
                size = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # pragma: no cover
                key, size = (str(t.device), id(t)), t.numel() * t.element_size()
            if key not in seen:
                seen.add(key)
                total += size
    return total


def closure_graph_bytes(fn: Callable[..., object]) -> int:
    """Bytes held by graph modules captured in ``fn``'s closure (the folded graph of ``linearize``)."""
    total = 0
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # pragma: no cover - empty cell
            continue
        if isinstance(value, nn.Module):
            total += module_tensor_bytes(value)
    return total


def grads_or_none(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    *,
    batched: bool = False,
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` keeping the graph; ``None`` for inputs the outputs do not depend on."""
    if not outputs:
        return (None,) * len(inputs)
    return torch.autograd.grad(
        list(outputs),
        list(inputs),
        grad_outputs=list(grad_outputs),
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=batched,
    )


def folded_linearize(fn: Callable[..., Any], params: Mapping[str, Tensor]) -> tuple[Any, Callable[..., Any]]:
    """``torch.func.linearize(fn, params)``, silencing the constant-folding pass's internal warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.func.linearize(fn, params)



