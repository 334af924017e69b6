"""Per-sample gradients by ``torch.func.vmap`` of ``grad``, chunked to a memory budget."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from diagnostics._batch import batch_size, to_device
from diagnostics._kernels import twice_differentiable
from diagnostics._state import isolated, seed_private
from diagnostics.errors import DataError, LossError
from diagnostics.loss import check_loss, default_loss, functional_call_fn, select_params

__all__ = ["per_sample_gradients", "DEFAULT_MEMORY_BYTES"]

#: Default memory budget for one vmapped chunk.
DEFAULT_MEMORY_BYTES = 256 << 20


def _in_dims(obj: Any, n: int) -> Any:
    """vmap ``in_dims`` for a batch: 0 for tensors with a leading dimension of size ``n``, else None."""
    if isinstance(obj, Tensor):
        return 0 if obj.ndim > 0 and obj.shape[0] == n else None
    if isinstance(obj, Mapping):
        return {k: _in_dims(v, n) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_in_dims(v, n) for v in obj)
    return None


def _map(obj: Any, dims: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to the tensors of ``obj`` whose in_dim is 0."""
    if isinstance(obj, Tensor):
        return fn(obj) if dims == 0 else obj
    if isinstance(obj, Mapping):
        return {k: _map(v, dims[k], fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(v, d, fn) for v, d in zip(obj, dims))
    return obj


def per_sample_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None,
    batch: Any,
    params: None | str | Iterable[str | Tensor] = None,
    max_memory_bytes: int | None = None,
    *,
    mode: str = "eval",
    seed: int = 0,
) -> dict[str, Tensor]:
    """Return the gradient of each sample's loss, ``{name: Tensor[N, *param.shape]}``.

    Sample ``i``'s loss is ``loss_fn(model, batch_i)`` on a batch of size one built from sample ``i``.
    Because losses use *mean* reduction, that is the single-sample loss, and the batch gradient is the
    mean of the per-sample gradients (when every sample carries the same weight in the mean: not for
    token losses with padding or ``ignore_index``).

    Computed by ``torch.func.vmap(torch.func.grad(...))`` over chunks of samples sized to
    ``max_memory_bytes`` (default 256 MiB; a sample is budgeted at 4 x P x itemsize), falling back to a
    loop over samples if an op has no batching rule. Cost: about one batched backward pass (vmap) per
    chunk. The model runs in ``mode`` (``"eval"`` by default: BatchNorm with batch statistics is not
    defined on one sample); random ops use a private seed; the model and global RNG are left unchanged.

    Raises:
        LossError: the loss of a sample is not a finite scalar (names the sample).
        DataError: the batch is empty.
    """
    fn = default_loss if loss_fn is None else loss_fn
    selected = select_params(model, params)
    names = list(selected)
    device = next(iter(selected.values())).device
    batch = to_device(batch, device)
    n = batch_size(batch)
    if n <= 0:
        raise DataError("per_sample_gradients got an empty batch")
    dims = _in_dims(batch, n)
    numel = sum(p.numel() for p in selected.values())
    itemsize = max(p.element_size() for p in selected.values())
    budget = DEFAULT_MEMORY_BYTES if max_memory_bytes is None else int(max_memory_bytes)
    chunk = max(1, min(n, budget // max(1, 4 * numel * itemsize)))

    out = {k: torch.empty((n, *p.shape), dtype=p.dtype, device=device) for k, p in selected.items()}
    losses = torch.empty(n, dtype=torch.float64, device=device)
    with isolated(model, mode, grad=True), twice_differentiable():
        seed_private(seed)
        call = functional_call_fn(model, fn, names)
        detached = {k: p.detach() for k, p in selected.items()}

        def sample_loss(p: dict[str, Tensor], sample: Any) -> tuple[Tensor, Tensor]:
            value = call(p, _map(sample, dims, lambda t: t.unsqueeze(0)))
            check_loss(value, 0)
            return value, value.detach()

        grad_fn = torch.func.grad(sample_loss, has_aux=True)
        vmapped = torch.func.vmap(
            grad_fn, in_dims=(None, dims), randomness="different" if mode == "train" else "error"
        )
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            part = _map(batch, dims, lambda t, a=start, b=stop: t[a:b])
            try:
                grads, values = vmapped(detached, part)
            except LossError as exc:
                raise LossError(str(exc).replace("for batch 0", "for a single sample")) from None
            except (RuntimeError, NotImplementedError):
                # An op without a batching rule: one grad call per sample.
                pairs = [
                    grad_fn(detached, _map(part, dims, lambda t, i=i: t[i])) for i in range(stop - start)
                ]
                grads = {k: torch.stack([g[k] for g, _ in pairs]) for k in names}
                values = torch.stack([v for _, v in pairs])
            for k in names:
                out[k][start:stop] = grads[k]
            losses[start:stop] = values.to(torch.float64)
    bad = (~torch.isfinite(losses)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise LossError(
            f"loss_fn returned {float(losses[i])} for sample {i} of the batch; the loss must be finite "
            "(check the data and the model's parameters for NaN/inf)"
        )
    return out
