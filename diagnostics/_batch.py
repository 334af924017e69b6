"""One walker over a batch's nested structure (tensors inside tuples, lists, namedtuples and dicts).

Every function that moves, detaches, cuts, measures or concatenates a batch goes through
:func:`map_tensors` or :func:`tensor_leaves`, so that a structure accepted in one place is accepted
everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from diagnostics.errors import DataError

__all__ = [
    "map_tensors",
    "tensor_leaves",
    "first_tensor",
    "detach_batch",
    "to_device",
    "leading_size",
    "batch_size",
    "slice_batch",
    "tokens_per_sample",
    "samples_for_tokens",
    "concat_batches",
]


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def map_tensors(batch: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``batch`` rebuilt with ``fn(t)`` in place of every tensor ``t``; other leaves kept as they are.

    Dicts keep their type when it can be rebuilt from a dict, other mappings become plain dicts;
    namedtuples, tuples and lists keep theirs. Cost: one call of ``fn`` per tensor.
    """
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        items = {k: map_tensors(v, fn) for k, v in batch.items()}
        if isinstance(batch, dict) and type(batch) is not dict:
            try:
                return type(batch)(items)
            except TypeError:  # a dict subclass whose constructor takes other arguments
                return items
        return items
    if _is_namedtuple(batch):
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def tensor_leaves(batch: Any) -> list[Tensor]:
    """Every tensor in ``batch``, depth first, in the containers' order."""
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in tensor_leaves(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in tensor_leaves(v)]
    return []


def first_tensor(x: Any) -> Tensor | None:
    """The first tensor in ``x`` (a module's positional inputs or outputs), or None."""
    leaves = tensor_leaves(x)
    return leaves[0] if leaves else None


def detach_batch(batch: Any) -> Any:
    """A detached copy of a batch: every tensor cloned, containers rebuilt, other values kept."""
    return map_tensors(batch, lambda t: t.detach().clone())


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor moved to ``device`` (containers rebuilt)."""
    return map_tensors(batch, lambda t: t.to(device))


def leading_size(batch: Any) -> int | None:
    """The leading (sample) dimension of the batch's first tensor that has one, or None."""
    for t in tensor_leaves(batch):
        if t.ndim:
            return int(t.shape[0])
    return None


def batch_size(batch: Any) -> int:
    """The number of samples in a batch: the leading dimension of its first tensor.

    Raises:
        DataError: the batch holds no tensor with a leading dimension.
    """
    n = leading_size(batch)
    if n is None:
        raise DataError(
            f"cannot tell the batch size of a {type(batch).__name__}: it holds no tensor with a batch dimension"
        )
    return n


def slice_batch(batch: Any, stop: int, start: int = 0) -> Any:
    """Samples ``start:stop`` of a batch: every tensor whose leading dimension is the batch size is cut."""
    size = leading_size(batch)
    if size is None or (start == 0 and stop >= size):
        return batch
    return map_tensors(batch, lambda t: t[start:stop] if t.ndim and t.shape[0] == size else t)


def tokens_per_sample(batch: Any) -> int:
    """Tokens per sample of the batch's first tensor: T for token ids ``[N, T]`` (integer) or features
    ``[N, T, D]``; 1 otherwise."""
    first = first_tensor(batch)
    if first is None:
        return 1
    if first.ndim == 2 and not first.is_floating_point():
        return int(first.shape[1])
    if first.ndim == 3:
        return int(first.shape[1])
    return 1


def samples_for_tokens(batch: Any, max_tokens: int) -> int | None:
    """How many samples (at least 1, at most the batch) hold about ``max_tokens`` tokens; None without a
    leading dimension.

    >>> samples_for_tokens(torch.zeros(8, 16, dtype=torch.long), 40)  # 16 tokens a sample
    3
    """
    n = leading_size(batch)
    if n is None:
        return None
    return max(1, min(n, math.ceil(max_tokens / max(1, tokens_per_sample(batch)))))


def concat_batches(batches: Sequence[Any]) -> Any:
    """One batch made of ``batches`` (same structure each) joined along the sample dimension.

    Tensors are concatenated leaf by leaf; a non-tensor leaf is taken from the first batch.

    Raises:
        DataError: the batches do not share one structure.
    """
    if not batches:
        raise DataError("no batches to concatenate")
    leaves = [tensor_leaves(b) for b in batches]
    if any(len(lv) != len(leaves[0]) for lv in leaves):
        raise DataError("batches to concatenate do not share one structure (different numbers of tensors)")
    joined = iter([torch.cat([lv[i] for lv in leaves]) for i in range(len(leaves[0]))])
    return map_tensors(batches[0], lambda _t: next(joined))
