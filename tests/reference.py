"""Brute-force truths for tests, deliberately independent of the library's functional machinery.

Parameters are substituted by plain attribute assignment on a deep copy of the model (no
``torch.func``), every derivative is a loop of ``torch.autograd.grad`` calls, all in float64.

* :func:`dense_hessian`: ``[P, P]`` Hessian of the sample-weighted mean loss, row by row (double autograd).
* :func:`dense_ggn`: ``sum_b (|b|/N) J_bᵀ H_z,b J_b`` from explicit Jacobians and output Hessians.
* :func:`per_sample_gradients_loop`: one ``autograd.grad`` per sample on a batch of size one.
* :func:`gsnr_bruteforce`: ``mean_i(g_ij)^2 / var_i(g_ij)`` with population variance, in numpy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def _set_path(model: nn.Module, name: str, value: Tensor) -> None:
    *path, leaf = name.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    setattr(mod, leaf, value)


class Substituted:
    """A deep copy of ``model`` whose selected parameters are views of one flat float64 vector."""

    def __init__(self, model: nn.Module, names: Sequence[str], mode: str = "eval") -> None:
        self.model = copy.deepcopy(model)
        self.model.train(mode == "train")
        named = dict(self.model.named_parameters())
        self.names = list(names)
        self.shapes = [named[n].shape for n in self.names]
        self.theta0 = torch.cat([named[n].detach().reshape(-1) for n in self.names]).to(torch.float64)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def load(self, theta: Tensor) -> nn.Module:
        offset = 0
        for n, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape)) if len(shape) else 1
            _set_path(self.model, n, theta[offset : offset + size].view(shape))
            offset += size
        return self.model


def slice_batch(batch: Any, i: int) -> Any:
    """Sample ``i`` of a batch as a batch of size one."""
    if isinstance(batch, Tensor):
        return batch[i : i + 1]
    if isinstance(batch, dict):
        return {k: slice_batch(v, i) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(v, i) for v in batch)
    return batch


def _size(batch: Any) -> int:
    return int(batch[0].shape[0]) if isinstance(batch, (tuple, list)) else int(batch.shape[0])


def _rows(vec: Tensor, wrt: Tensor) -> Tensor:
    """Jacobian of a 1-D tensor ``vec`` with respect to ``wrt``, one backward per row."""
    rows = []
    for i in range(vec.numel()):
        (r,) = torch.autograd.grad(vec[i], wrt, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(wrt) if r is None else r)
    return torch.stack(rows)


def mean_loss(
    model: nn.Module, loss_fn: Callable, batches: Sequence[Any], names: Sequence[str], mode: str = "eval"
) -> tuple[Substituted, Callable[[Tensor], Tensor]]:
    """``theta -> sum_b (|b|/N) loss_fn(model_theta, b)``."""
    sub = Substituted(model, names, mode)
    sizes = [_size(b) for b in batches]
    total = sum(sizes)

    def f(theta: Tensor) -> Tensor:
        m = sub.load(theta)
        return sum(loss_fn(m, b) * (s / total) for b, s in zip(batches, sizes))

    return sub, f


def dense_hessian(
    model: nn.Module, loss_fn: Callable, batches: Sequence[Any], names: Sequence[str], mode: str = "eval"
) -> Tensor:
    """Dense ``[P, P]`` Hessian of the mean loss by double autograd over the flattened parameters."""
    sub, f = mean_loss(model, loss_fn, batches, names, mode)
    with torch.enable_grad():
        theta = sub.theta0.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(theta), theta, create_graph=True)
        return _rows(g, theta).detach()


def dense_gradient(
    model: nn.Module, loss_fn: Callable, batches: Sequence[Any], names: Sequence[str], mode: str = "eval"
) -> tuple[Tensor, float]:
    """Mean-loss gradient ``[P]`` and value."""
    sub, f = mean_loss(model, loss_fn, batches, names, mode)
    with torch.enable_grad():
        theta = sub.theta0.clone().requires_grad_()
        value = f(theta)
        (g,) = torch.autograd.grad(value, theta)
    return g.detach(), float(value)


def dense_ggn(
    model: nn.Module, loss_fn: Any, batches: Sequence[Any], names: Sequence[str], mode: str = "eval"
) -> Tensor:
    """Dense GGN ``sum_b (|b|/N) J_bᵀ H_z,b J_b`` with ``J_b`` and ``H_z,b`` built row by row."""
    sub = Substituted(model, names, mode)
    sizes = [_size(b) for b in batches]
    total = sum(sizes)
    P = sub.theta0.numel()
    G = torch.zeros(P, P, dtype=torch.float64)
    with torch.enable_grad():
        for b, s in zip(batches, sizes):
            theta = sub.theta0.clone().requires_grad_()
            z = loss_fn.forward(sub.load(theta), b)
            J = _rows(z.reshape(-1), theta)  # [M, P]
            zz = z.detach().clone().requires_grad_()
            (gz,) = torch.autograd.grad(loss_fn.criterion(zz, b), zz, create_graph=True)
            Hz = _rows(gz.reshape(-1), zz).reshape(gz.numel(), -1)  # [M, M]
            G += (s / total) * (J.T @ Hz @ J).detach()
    return G


def per_sample_gradients_loop(
    model: nn.Module, loss_fn: Callable, batch: Any, names: Sequence[str], mode: str = "eval"
) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: [N, ...]}`` by a Python loop of ``autograd.grad`` on size-1 batches."""
    m = copy.deepcopy(model)
    m.train(mode == "train")
    named = dict(m.named_parameters())
    params = [named[n] for n in names]
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    with torch.enable_grad():
        for i in range(_size(batch)):
            grads = torch.autograd.grad(loss_fn(m, slice_batch(batch, i)), params, allow_unused=True)
            for n, p, g in zip(names, params, grads):
                out[n].append(torch.zeros_like(p) if g is None else g.detach())
    return {n: torch.stack(v) for n, v in out.items()}


def gsnr_bruteforce(per_sample: dict[str, Tensor], eps: float = 0.0) -> dict[str, np.ndarray]:
    """``r_j = mean_i(g_ij)^2 / var_i(g_ij)``, population variance, element by element in numpy."""
    out = {}
    for n, g in per_sample.items():
        a = g.detach().cpu().double().numpy().reshape(g.shape[0], -1)
        N = a.shape[0]
        mean = a.sum(0) / N
        var = ((a - mean) ** 2).sum(0) / N
        out[n] = (mean**2 / np.maximum(var, eps)).reshape(g.shape[1:])
    return out


# --------------------------------------------------------------------------------------------------
# State snapshots for isolation tests
# --------------------------------------------------------------------------------------------------


def snapshot_state(model: nn.Module) -> dict[str, Any]:
    """Everything an estimator must leave unchanged: tensors, grads, flags, modes, global RNG streams."""
    import random

    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else [],
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Assert two :func:`snapshot_state` results are identical (bitwise for tensors)."""
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys(), key
        for n in before[key]:
            assert torch.equal(before[key][n], after[key][n]), f"{key} {n} changed"
    for n, g in before["grads"].items():
        h = after["grads"][n]
        assert (g is None) == (h is None) and (g is None or torch.equal(g, h)), f".grad of {n} changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad changed"
    assert before["training"] == after["training"], "training flags changed"
    assert torch.equal(before["torch_rng"], after["torch_rng"]), "global torch RNG advanced"
    assert all(torch.equal(a, b) for a, b in zip(before["cuda_rng"], after["cuda_rng"])), "CUDA RNG advanced"
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"]), "numpy RNG advanced"
    assert before["python_rng"] == after["python_rng"], "python RNG advanced"
