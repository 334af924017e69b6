"""Per-sample gradients from one batched backward pass, layer by layer.

For the layers whose parameter gradient is a sum over positions of a product of the layer's input and the
gradient of its output (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, and Hugging Face's ``Conv1D``,
GPT-2's linear map with its weight stored transposed), the gradient of sample i is that sum taken over
sample i's positions only. One forward records each layer's input, one backward to the layers' outputs
(``torch.autograd.grad`` with the outputs as inputs, so autograd skips the batch's weight gradients)
gives the output gradients, and a batched product per layer gives every sample's parameter gradient:
the cost of one training step on the N samples instead of N single-sample ones.

The gradient found this way is N times the gradient of sample i's share of the batch loss. It equals the
gradient of the sample's own loss (:func:`diagnostics.gradients.per_sample_gradients`'s definition) when the
batch loss is the mean of equally weighted per-sample losses, and when no sample's computation reads
another's (eval mode: BatchNorm on running statistics). A layer applied to something shared by the whole
batch (a position embedding looked up with ``arange(T)``) has its output widened to the batch so that each
sample's part of its gradient is kept apart; when that is ambiguous (as many positions as samples) or a
parameter belongs to another kind of module, :func:`layer_owners` or :func:`layerwise_per_sample_gradients`
return None and the caller uses ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SUPPORTED_LAYERS", "accumulate_call", "layer_owners", "layerwise_per_sample_gradients"]

#: Module types handled here (exact types: a subclass may change ``forward``).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.LayerNorm)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (``y = x W + b``, ``W`` of shape ``[in, out]``), told by its class, so that
    transformers is never imported here."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


def _supported(module: nn.Module) -> bool:
    if _is_hf_conv1d(module):
        return True
    if type(module) not in SUPPORTED_LAYERS:
        return False
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
    return True


Owners = list[tuple[nn.Module, dict[str, str]]]


def layer_owners(model: nn.Module, selected: dict[str, Tensor]) -> Owners | None:
    """The modules that own the selected parameters, each with ``{attribute: parameter name}``.

    Returns None when a selected parameter is owned by a module of another type (FSDP's sharded modules
    among them), or not as its ``weight`` or ``bias``, or by no module, or is a tensor subclass.
    A parameter shared by several supported modules (tied embeddings) is listed under each; their
    gradients add. Cost: one walk over the modules.
    """
    if any(type(p.detach()) is not Tensor for p in selected.values()):
        return None  # sharded (DTensor) or other tensor subclasses: their layers run distributed hooks
    by_id = {id(p): name for name, p in selected.items()}
    owned: set[str] = set()
    owners: Owners = []
    for module in model.modules():
        attrs = {attr: by_id[id(p)] for attr, p in module.named_parameters(recurse=False) if id(p) in by_id}
        if not attrs:
            continue
        if not _supported(module) or not set(attrs) <= {"weight", "bias"}:
            return None
        owners.append((module, attrs))
        owned.update(attrs.values())
    return owners if owned == set(selected) else None


class _Unsupported(Exception):
    """A layer call this method cannot split by sample (the caller falls back to vmap)."""


class _Recorder:
    """Forward hooks that keep each call's input and output (widened to the batch where it is shared)."""

    def __init__(self, owners: Owners, n: int) -> None:
        self.n = n
        self.calls: list[tuple[nn.Module, dict[str, str], Tensor, Tensor, bool]] = []
        self._attrs = {id(m): attrs for m, attrs in owners}
        self._handles = [m.register_forward_hook(self._hook) for m, _ in owners]

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise _Unsupported(f"{type(module).__name__} called without a tensor input")
        x, n = args[0], self.n
        shared = False
        if isinstance(module, nn.Embedding):
            if x.dim() >= 2 and x.shape[0] == n:
                pass
            elif x.dim() >= 2 and x.shape[0] == 1 and n > 1:
                shared, output = True, output.expand(n, *output.shape[1:])
            elif x.dim() == 1 and x.shape[0] != n:
                # Indices without a batch dimension (positions): the lookup is shared by every sample.
                shared, output = True, output.unsqueeze(0).expand(n, *output.shape)
            else:
                # One index per sample, or as many shared positions as samples: cannot be told apart.
                raise _Unsupported("an embedding lookup whose first dimension may or may not be the batch")
        elif x.dim() < 2 or x.shape[0] != n:
            raise _Unsupported(f"{type(module).__name__} input of shape {tuple(x.shape)} for a batch of {n}")
        self.calls.append((module, self._attrs[id(module)], x.detach(), output, shared))
        return output if shared else None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def accumulate_call(module: nn.Module, attrs: dict[str, str], x: Tensor, g: Tensor, shared: bool,
                    out: dict[str, Tensor], written: set[str], n: int, scale: float | None = None) -> None:
    """Add ``scale`` (default N) x this layer call's per-sample contributions into ``out``: ``x`` its input
    and ``g`` its output gradient, both led by the N samples (``x`` shared by all of them if ``shared``).

    A tensor not yet in ``written`` is overwritten instead (its buffer starts uninitialised).
    """
    alpha = n if scale is None else scale

    def add(name: str, value: Tensor) -> None:
        if name in written:
            out[name].add_(value, alpha=alpha)
        else:
            torch.mul(value, alpha, out=out[name])
            written.add(name)

    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        g2 = g.reshape(n, -1, g.shape[-1])
        if "weight" in attrs:
            name = attrs["weight"]
            x2 = x.reshape(n, -1, x.shape[-1]).to(g2.dtype)
            # nn.Linear's weight is [out, in]: sum_t g_t x_t^T; Conv1D's is [in, out]: sum_t x_t g_t^T.
            a, b = (g2.transpose(1, 2), x2) if isinstance(module, nn.Linear) else (x2.transpose(1, 2), g2)
            out[name].baddbmm_(a, b, beta=1 if name in written else 0, alpha=alpha)
            written.add(name)
        if "bias" in attrs:
            add(attrs["bias"], g2[:, 0] if g2.shape[1] == 1 else g2.sum(1))  # one position: nothing to sum
    elif isinstance(module, nn.LayerNorm):
        shape = (n, -1, *module.normalized_shape)
        if "weight" in attrs:
            x_hat = F.layer_norm(x.to(g.dtype), module.normalized_shape, None, None, module.eps)
            add(attrs["weight"], (g * x_hat).reshape(shape).sum(1))
        if "bias" in attrs:
            add(attrs["bias"], g.reshape(shape).sum(1))
    else:  # nn.Embedding
        name = attrs["weight"]
        weight = out[name]
        if name not in written:
            weight.zero_()
            written.add(name)
        num, dim = weight.shape[1], weight.shape[2]
        if shared:
            idx = x.expand(n, *x.shape[1:]) if x.dim() >= 2 else x.expand(n, *x.shape)
        else:
            idx = x
        rows = torch.arange(n, device=idx.device)[:, None] * num + idx.reshape(n, -1)
        vals = g.reshape(n, -1, dim)
        if module.padding_idx is not None:
            keep = idx.reshape(n, -1) != module.padding_idx
            rows, vals = rows[keep], vals[keep]
        # A weight that is a view into a wider buffer (one row of it per sample) gathers in a contiguous copy.
        target = weight if weight.is_contiguous() else torch.zeros_like(weight, memory_format=torch.contiguous_format)
        target.view(n * num, dim).index_add_(0, rows.reshape(-1), vals.reshape(-1, dim).to(weight.dtype), alpha=alpha)
        if target is not weight:
            weight.add_(target)


def layerwise_per_sample_gradients(
    model: nn.Module,
    call: Callable[[], Tensor],
    selected: dict[str, Tensor],
    owners: Owners,
    n: int,
) -> tuple[dict[str, Tensor], Tensor] | None:
    """``({name: Tensor[N, *shape]}, loss)``: each sample's gradient, N x the gradient of its share of the
    batch loss ``call()``, and that loss (detached).

    ``call`` runs the forward and returns the batch's (mean) loss over ``n`` samples; the caller sets the
    mode, the RNG and the grad mode. Returns None when a layer call cannot be split by sample
    (:class:`_Unsupported`) or the loss does not depend on any recorded call. Cost: one forward and one
    backward to the layers' outputs over the batch, plus one batched product per layer call (the FLOPs
    of the batch's weight gradients).
    """
    recorder = _Recorder(owners, n)
    try:
        loss = call()
    except _Unsupported:
        return None
    finally:
        recorder.remove()
    calls = recorder.calls
    outputs = [c[3] for c in calls]
    if not (isinstance(loss, Tensor) and loss.dim() == 0 and loss.requires_grad) or not calls \
            or not all(o.requires_grad for o in outputs):
        return None
    grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    out = {name: torch.empty((n, *p.shape), dtype=p.dtype, device=p.device) for name, p in selected.items()}
    written: set[str] = set()
    with torch.no_grad():
        # Scaled by N: sample i's own loss has N times the gradient of its share of the mean.
        for (module, attrs, x, _, shared), g in zip(calls, grads):
            if g is not None:
                accumulate_call(module, attrs, x, g, shared, out, written, n)
        for name in out.keys() - written:
            out[name].zero_()  # no recorded call reached the loss
    return out, loss.detach()
