"""FSDP2 (``torch.distributed.fsdp.fully_shard``): which diagnostics run on a sharded model, and how.

Under FSDP2 each parameter is a ``DTensor`` holding one shard per rank, and the model's forward
all-gathers the parameters of one module at a time through hooks. The Monitor handles it thus:

* **Norms** (the ``cheap`` preset: ``grad_norm``, ``weight_norm``, ``update_ratio``, ``nonfinite``)
  read the sharded parameters and gradients; DTensor reductions sum the shards' squares over the ranks,
  so every rank gets the norm of the full tensor without gathering it. FSDP's gradients are already
  averaged over the ranks: the norms are those of the global batch's gradient.
* **Spectral alignment** runs its no-grad probe forward through the sharded model itself (FSDP gathers
  each module's parameters for its forward, as in training) and all-gathers the full weight of one
  layer at a time for the power iteration (:meth:`~diagnostics.metrics.linear_maps.LinearMap.weight`).
* **Functional passes** (per-sample gradients for ``gsnr``, curvature products for ``hessian_top``)
  cannot run through FSDP's hooks: they re-register the gathered parameters on the modules during the
  forward, which would replace the tensors a functional call substitutes. For a step where such a
  diagnostic is due, :func:`gathered_replica` all-gathers the parameters once into a hook-free copy of
  the module tree (memory: one full copy of the parameters on every rank, freed after the step), on
  which they run unchanged. Curvature products are then all-reduced over the ranks' batches as under
  DDP, so eigenvalues are those of the global batch; per-sample statistics (GSNR, spectral alignment)
  are rank 0's batch, as under DDP.
* **Everything else is refused** at construction (:func:`check_fsdp_diagnostics`) with a one-line reason,
  rather than run unverified.

The training forward is not observed (hooks on the sharded modules would see FSDP's transient gathered
weights); spectral alignment runs its own forward.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from diagnostics._distributed import is_dtensor
from diagnostics.errors import ConfigError

__all__ = ["FSDP_DIAGNOSTICS", "check_fsdp_diagnostics", "gathered_replica", "is_fsdp", "needs_replica"]

#: Diagnostics verified to give a single process's numbers on an FSDP2 model (tests/test_distributed_fsdp.py).
FSDP_DIAGNOSTICS = frozenset(
    {"loss", "learning_rate", "grad_norm", "weight_norm", "update_ratio", "nonfinite", "gsnr", "hessian_top",
     "spectral_alignment"}
)

#: Requirements that make a diagnostic run passes of its own through the model.
_OWN_PASSES = frozenset({"per_sample_grads", "curvature"})

_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks",
)


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def is_fsdp(model: nn.Module) -> bool:
    """True when ``model`` (or a submodule) was sharded with ``fully_shard``.

    Examples:
        >>> is_fsdp(nn.Linear(2, 2))
        False
    """
    fsdp = _fsdp_module_type()
    if fsdp is not None and any(isinstance(m, fsdp) for m in model.modules()):
        return True
    return any(is_dtensor(p) for p in model.parameters())


def check_fsdp_diagnostics(diagnostics: Iterable[Any]) -> None:
    """Refuse, in one line, the diagnostics that are not supported on an FSDP2 model.

    Raises:
        ConfigError: naming the unsupported diagnostics and the supported ones.
    """
    refused = sorted(d.name for d in diagnostics if d.name not in FSDP_DIAGNOSTICS)
    if refused:
        raise ConfigError(
            f"{', '.join(refused)} cannot run on an FSDP2 (fully_shard) model: they read optimizer state, "
            f"sharded weights or layer outputs the Monitor does not gather; supported under FSDP2: "
            f"{', '.join(sorted(FSDP_DIAGNOSTICS))}"
        )


def needs_replica(diagnostics: Iterable[Any]) -> bool:
    """True when one of ``diagnostics`` runs passes of its own through the model (see the module doc)."""
    return any(_OWN_PASSES & d.requires for d in diagnostics)


def _original_class(cls: type) -> type:
    fsdp = _fsdp_module_type()
    if fsdp is None or not issubclass(cls, fsdp):
        return cls
    # fully_shard swaps the class for FSDP<cls>(FSDPModule, cls): the replica takes cls back.
    return next(b for b in cls.__bases__ if not issubclass(b, fsdp))


def gathered_replica(model: nn.Module) -> nn.Module:
    """A hook-free copy of ``model``'s module tree holding the full (all-gathered) parameters.

    Modules are shallow copies of their original class (FSDP's class and every forward/backward hook
    dropped), parameters new leaf tensors with the full values and the same ``requires_grad`` (tied
    parameters stay tied), buffers shared. Collective: every rank must call it, in the same order.
    Cost: one all-gather per sharded parameter; memory: one full copy of the parameters.

    Examples:
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.Tanh())
        >>> r = gathered_replica(m)
        >>> r is not m and torch.equal(r[0].weight, m[0].weight) and r[0].weight is not m[0].weight
        True
    """
    modules: dict[int, nn.Module] = {}
    params: dict[int, nn.Parameter] = {}

    def full(p: nn.Parameter) -> nn.Parameter:
        if id(p) not in params:
            value = p.full_tensor() if is_dtensor(p) else p
            params[id(p)] = nn.Parameter(value.detach().clone(), requires_grad=p.requires_grad)
        return params[id(p)]

    def copy(m: nn.Module) -> nn.Module:
        if id(m) in modules:
            return modules[id(m)]
        cls = _original_class(type(m))
        new = cls.__new__(cls)
        new.__dict__.update(m.__dict__)
        for name in _HOOK_DICTS:
            if name in m.__dict__:
                new.__dict__[name] = OrderedDict()
        modules[id(m)] = new
        new.__dict__["_parameters"] = {n: None if p is None else full(p) for n, p in m._parameters.items()}
        new.__dict__["_buffers"] = dict(m._buffers)
        new.__dict__["_modules"] = {n: None if c is None else copy(c) for n, c in m._modules.items()}
        return new

    with torch.no_grad():
        return copy(model)
