"""Per-sample gradients: from one batched backward layer by layer where the layers allow it, else by
``torch.func.vmap`` of ``grad`` chunked to a memory budget."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from diagnostics._batch import batch_size, slice_batch, to_device
from diagnostics._kernels import twice_differentiable
from diagnostics._state import isolated, seed_private
from diagnostics.errors import ConfigError, DataError, LossError
from diagnostics.gradients.per_sample_layers import Owners, layer_owners, layerwise_per_sample_gradients
from diagnostics.loss import check_loss, default_loss, functional_call_fn, select_params

__all__ = ["per_sample_gradients", "DEFAULT_MEMORY_BYTES"]

#: Default memory budget for one vmapped chunk.
DEFAULT_MEMORY_BYTES = 256 << 20
_METHODS = ("auto", "layers", "vmap")
#: Largest difference between the two methods, relative to a tensor's largest per-sample entry, that
#: still counts as agreement (rounding of float32 sums is about 1e-6 of it; a wrong split is O(1)).
_AGREEMENT_RTOL = 1e-3
#: Samples on which the first layer-wise call is compared with vmap.
_CHECK_SAMPLES = 2
#: ``{model: {(parameter names, batch layout): whether the layer-wise gradients matched vmap's}}``.
_LAYERWISE_CHECKED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, bool]] = weakref.WeakKeyDictionary()


def _layout(obj: Any) -> Any:
    """The batch's structure with each tensor's number of dimensions and dtype (not its sizes)."""
    if isinstance(obj, Tensor):
        return ("T", obj.dim(), str(obj.dtype))
    if isinstance(obj, Mapping):
        return tuple((k, _layout(v)) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0])))
    if isinstance(obj, (tuple, list)):
        return tuple(_layout(v) for v in obj)
    return type(obj).__name__


def gradients_agree(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Every tensor of ``a`` within ``_AGREEMENT_RTOL`` of its largest entry in ``b``, or of 1e-3 of the
    largest entry of all (a gradient that is zero up to rounding, such as a key bias's, has no scale of its
    own)."""
    scales = {k: _largest_magnitude(ref) for k, ref in b.items()}
    floor = 1e-3 * max(scales.values(), default=0.0)
    for k, ref in b.items():
        if ref.numel() and _largest_difference(a[k], ref) > _AGREEMENT_RTOL * max(scales[k], floor) + 1e-30:
            return False
    return True


#: Elements per chunk of the comparisons: their temporaries stay small (a whole-tensor difference of GPT-2
#: small's tied embedding over two samples is 300 MB of fresh memory).
_AGREEMENT_CHUNK = 1 << 18


def _largest_magnitude(x: Tensor) -> float:
    """``max |x|`` (0 for an empty tensor), without a temporary of ``x``'s size."""
    if not x.numel():
        return 0.0
    low, high = torch.aminmax(x)
    return max(-float(low), float(high))


def _largest_difference(x: Tensor, y: Tensor) -> float:
    """``max |x - y|`` over same-shaped tensors, a chunk at a time; inf where either holds a NaN (NaN
    gradients agree with nothing)."""
    x, y = x.reshape(-1), y.reshape(-1)
    largest = 0.0
    work = torch.empty(min(x.numel(), _AGREEMENT_CHUNK), dtype=torch.promote_types(x.dtype, y.dtype),
                       device=x.device)  # one temporary for every chunk: no memory mapped afresh per chunk
    for lo in range(0, x.numel(), _AGREEMENT_CHUNK):
        part = work[: min(_AGREEMENT_CHUNK, x.numel() - lo)]
        d = float(torch.sub(x[lo : lo + _AGREEMENT_CHUNK], y[lo : lo + _AGREEMENT_CHUNK], out=part).abs_().max())
        if math.isnan(d):
            return math.inf
        largest = max(largest, d)
    return largest


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
    method: str = "auto",
) -> dict[str, Tensor]:
    """Return the gradient of each sample's loss, ``{name: Tensor[N, *param.shape]}``.

    Sample ``i``'s loss is ``loss_fn(model, batch_i)`` on a batch of size one built from sample ``i``.
    Because losses use *mean* reduction, that is the single-sample loss, and the batch gradient is the
    mean of the per-sample gradients (when every sample carries the same weight in the mean: not for
    token losses with padding or ``ignore_index``).

    Two methods (``method``):

    * ``"layers"``: one forward and one backward over the whole batch, each layer's per-sample gradient
      formed from its input and output gradient (:mod:`diagnostics.gradients.per_sample_layers`). Needs
      every selected parameter to belong to an ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm`` or
      Hugging Face ``Conv1D``, and eval mode. It gives N times the gradient of sample i's share of the
      batch loss, which is sample i's own loss gradient when the loss is a mean of equally weighted
      per-sample losses. Cost: about one training step on the N samples.
    * ``"vmap"``: ``torch.func.vmap(torch.func.grad(...))`` over chunks of samples sized to
      ``max_memory_bytes`` (default 256 MiB; a sample is budgeted at 4 x P x itemsize), falling back to a
      loop over samples if an op has no batching rule. Cost: about one batched backward pass (vmap) per
      chunk; 1.3 to 2.3 times ``"layers"`` on the tiny GPT, the 3.2M GPT and the digits MLP
      (``benchmarks/gsnr_statistics.py``).
    * ``"auto"`` (default): ``"layers"`` where it applies, once its result has matched the first two
      samples' own gradients (one forward and ``autograd.grad`` each) at the first call for this model,
      parameter selection and batch layout; where it did not match (e.g. a loss that weights samples
      unequally), ``"vmap"`` from then on. Otherwise ``"vmap"``.

    The model runs in ``mode`` (``"eval"`` by default: BatchNorm with batch statistics is not defined on
    one sample); random ops use a private seed; the model, ``.grad`` and the global RNG are left unchanged.

    Raises:
        LossError: the loss of a sample is not a finite scalar (names the sample).
        DataError: the batch is empty.
        ConfigError: unknown ``method``, or ``"layers"`` where it does not apply.
    """
    if method not in _METHODS:
        raise ConfigError(f"per_sample_gradients: method must be one of {_METHODS}, got {method!r}")
    fn = default_loss if loss_fn is None else loss_fn
    selected = select_params(model, params)
    batch = to_device(batch, next(iter(selected.values())).device)
    n = batch_size(batch)
    if n <= 0:
        raise DataError("per_sample_gradients got an empty batch")
    owners = layer_owners(model, selected) if method != "vmap" and mode == "eval" else None
    if method == "layers" and owners is None:
        raise ConfigError("per_sample_gradients(method='layers') needs eval mode and every selected "
                          "parameter in an nn.Linear, nn.Embedding, nn.LayerNorm or Hugging Face Conv1D; "
                          "use method='vmap' or 'auto'")
    if owners is not None:
        found = _layerwise_checked(model, fn, batch, selected, owners, method == "layers", max_memory_bytes,
                                   seed, n)
        if found is not None:
            return found
    return _vmapped(model, fn, batch, selected, max_memory_bytes, mode, seed, n)


def _layerwise_checked(model: nn.Module, fn: Callable[[nn.Module, Any], Tensor], batch: Any,
                       selected: dict[str, Tensor], owners: Owners, strict: bool,
                       max_memory_bytes: int | None, seed: int, n: int) -> dict[str, Tensor] | None:
    """The ``"layers"`` method's gradients (eval mode), or None where ``"auto"`` is to use vmap instead.

    ``strict`` (``method="layers"``) raises where the layers cannot be split by sample and skips the check;
    otherwise the first call for this model, parameter selection and batch layout compares the result
    with the first :data:`_CHECK_SAMPLES` samples' own gradients (:func:`_looped`, else vmap; a sample's
    gradient does not depend on the others in eval mode, so the check holds little more than one set of
    gradients) and remembers the verdict. A non-finite loss gives None: vmap then names the sample.
    """
    checks = _LAYERWISE_CHECKED.setdefault(model, {})
    key = (tuple(selected), _layout(batch))
    if not strict and checks.get(key) is False:
        return None
    try:
        with isolated(model, "eval", grad=True):
            seed_private(seed)
            got = layerwise_per_sample_gradients(model, lambda: fn(model, batch), selected, owners, n)
    except RuntimeError:
        # E.g. an in-place update of a shared lookup widened to the batch; vmap reports real errors.
        if strict:
            raise
        got = None
    if got is None:
        if strict:
            raise ConfigError("per_sample_gradients(method='layers'): a layer is applied to something that "
                              "cannot be split by sample; use method='vmap' or 'auto'")
        checks[key] = False
        return None
    grads, loss = got
    if not torch.isfinite(loss):
        return None
    if strict or checks.get(key):
        return grads
    m = min(n, _CHECK_SAMPLES)
    head = slice_batch(batch, m)
    reference = _looped(model, fn, head, selected, seed, m)
    if reference is None:
        reference = _vmapped(model, fn, head, selected, max_memory_bytes, "eval", seed, m)
    checks[key] = gradients_agree({k: v[:m] for k, v in grads.items()}, reference)
    return grads if checks[key] else None


def _looped(model: nn.Module, fn: Callable[[nn.Module, Any], Tensor], batch: Any, selected: dict[str, Tensor],
            seed: int, n: int) -> dict[str, Tensor] | None:
    """Each sample's gradient by its own forward and ``torch.autograd.grad`` (eval mode): the reference the
    first layer-wise call is checked against. None when a sample's loss is not a finite scalar (then vmap,
    which names the sample). ``.grad`` is untouched.

    Cost: ``n`` forward and backward passes on one sample each. On GPT-2 small on a CPU two of them took 2.9-3.4 s
    against 3.2-5.5 s for vmap over the same two (benchmarks/per_sample_check.py).
    """
    params = list(selected.values())  # trainable: select_params keeps those only
    dims = _in_dims(batch, n)
    out = {k: torch.empty((n, *p.shape), dtype=p.dtype, device=p.device) for k, p in selected.items()}
    with isolated(model, "eval", grad=True):
        seed_private(seed)
        for i in range(n):
            value = fn(model, _map(batch, dims, lambda t, i=i: t[i : i + 1]))
            if not (isinstance(value, Tensor) and value.ndim == 0 and value.requires_grad) \
                    or not torch.isfinite(value):
                return None
            grads = torch.autograd.grad(value, params, allow_unused=True)
            for k, g in zip(selected, grads, strict=True):
                if g is None:
                    out[k][i].zero_()  # the sample's loss does not reach this parameter
                else:
                    out[k][i] = g
    return out


def _vmapped(model: nn.Module, fn: Callable[[nn.Module, Any], Tensor], batch: Any,
             selected: dict[str, Tensor], max_memory_bytes: int | None, mode: str, seed: int,
             n: int) -> dict[str, Tensor]:
    """Per-sample gradients by vmap over chunks of samples (the ``"vmap"`` method)."""
    names = list(selected)
    device = next(iter(selected.values())).device
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
