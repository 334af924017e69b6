"""Hessian-vector products of the mean loss (Pearlmutter 1994), forward-over-reverse or double backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diagnostics.curvature.backends import SavedBytes, closure_graph_bytes, folded_linearize, grads_or_none
from diagnostics.curvature.base import CurvatureOperator, Linearisation
from diagnostics._state import seed_private
from diagnostics.loss import check_loss, functional_call_fn

__all__ = ["HessianOperator"]


class _Folded(Linearisation):
    """Forward-over-reverse with the primal half folded away by ``torch.func.linearize``."""

    def __init__(self, op: CurvatureOperator, jvp_fn: Callable[..., Any], grad: Tensor, loss: float) -> None:
        self.op, self.jvp_fn, self.grad, self.loss = op, jvp_fn, grad, loss
        self.nbytes = closure_graph_bytes(jvp_fn)

    def apply(self, v: Tensor) -> Tensor:
        hv, _ = self.jvp_fn(self.op.unflatten(v))
        return self.op._flat(hv)

    def apply_batched(self, rows: Tensor) -> Tensor:
        return torch.func.vmap(self.apply, chunk_size=self.op.column_chunk)(rows)


class _Jvp(Linearisation):
    """Forward-over-reverse without reuse: each product recomputes forward and first backward."""

    def __init__(self, op: CurvatureOperator, f: Callable[..., Tensor], params: dict[str, Tensor]) -> None:
        self.op, self.f, self.params, self.seed = op, f, params, op._build_seed
        g, loss = torch.func.grad_and_value(f)(params)
        self.grad, self.loss = op._flat(g).detach(), float(loss)
        self.nbytes = 0
        self.recomputes = True

    def apply(self, v: Tensor) -> Tensor:
        seed_private(self.seed)
        _, hv = torch.func.jvp(torch.func.grad(self.f), (self.params,), (self.op.unflatten(v),))
        return self.op._flat(hv)

    def apply_batched(self, rows: Tensor) -> Tensor:
        return torch.func.vmap(self.apply, chunk_size=self.op.column_chunk)(rows)


class _Retained(Linearisation):
    """Double backward through the kept first-backward graph (``create_graph=True``)."""

    # Measured on CPU: is_grads_batched (vmap over the kept graph) costs more per column than a loop.
    batched_on_cpu = False

    def __init__(self, op: CurvatureOperator, f: Callable[..., Tensor], params: dict[str, Tensor]) -> None:
        self.op = op
        self.leaves = [p.detach().requires_grad_() for p in params.values()]
        saved = SavedBytes()
        with saved.track():
            loss = f(dict(zip(params, self.leaves)))
            grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        self.loss = float(loss.detach())
        self.grad = op._flat([None if g is None else g.detach() for g in grads])
        # Gradients that do not depend on the parameters (a loss linear in them) contribute zero curvature.
        self.index = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.outputs = [grads[i] for i in self.index]
        self.nbytes = saved.nbytes

    def _grad_outputs(self, v: Tensor) -> list[Tensor]:
        parts = self.op._split(v)
        return [parts[i] for i in self.index]

    def apply(self, v: Tensor) -> Tensor:
        return self.op._flat(grads_or_none(self.outputs, self.leaves, self._grad_outputs(v)))

    def apply_batched(self, rows: Tensor) -> Tensor:
        res = grads_or_none(self.outputs, self.leaves, self._grad_outputs(rows), batched=True)
        return self.op._flat(res, batched=rows.shape[0])


class HessianOperator(CurvatureOperator):
    """The Hessian ``H = (1/N) sum_b |b| ∇²L_b(θ)`` of the mean loss over the data, as a linear operator.

    ``H @ v`` for ``v`` of shape ``[P]`` or ``[P, K]``; the block of the selected parameters when
    ``params`` is given (other parameters held fixed). See :class:`CurvatureOperator` for the arguments.

    Cost: one linearisation per batch (forward + first backward, plus tracing for forward-over-reverse),
    kept within ``max_cache_bytes``; then each product is the tangent (or second backward) half only,
    measured at about 1-2 gradients. ``[P, K]`` products are vmapped over columns.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> x, y = torch.eye(2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)
        >>> H = HessianOperator(model, None, (x, y))
        >>> H @ torch.tensor([1.0, 0.0], dtype=torch.float64)  # MSE: H = 2 X^T X / (N d) = I
        tensor([1., 0.], dtype=torch.float64)
    """

    kind = "hessian"

    def _loss_of_params(self, index: int) -> Callable[[dict[str, Tensor]], Tensor]:
        call = functional_call_fn(self.model, self.loss_fn, self.param_names, self._state)
        batch = self.batches[index]

        def f(params: dict[str, Tensor]) -> Tensor:
            value = call(params, batch)
            check_loss(value, index)
            return value

        return f

    def _build(self, backend: str, index: int) -> Linearisation:
        f = self._loss_of_params(index)
        params = self._params()
        if backend == "rev_rev":
            return _Retained(self, f, params)
        if not self.linearize:
            return _Jvp(self, f, params)
        try:
            (g, loss), jvp_fn = folded_linearize(torch.func.grad_and_value(f), params)
            return _Folded(self, jvp_fn, self._flat(g).detach(), float(loss))
        except (RuntimeError, NotImplementedError):
            # linearize could not trace the model (e.g. data-dependent control flow): recompute instead.
            return _Jvp(self, f, params)
