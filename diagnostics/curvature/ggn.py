"""Generalised Gauss-Newton products ``G v = (1/N) sum_b |b| J_bᵀ (∇²_z ℓ_b) J_b v`` (Schraudolph 2002)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diagnostics.curvature.backends import SavedBytes, closure_graph_bytes, folded_linearize, grads_or_none
from diagnostics.curvature.base import CurvatureOperator, Linearisation
from diagnostics._state import seed_private
from diagnostics.errors import ConfigError
from diagnostics.loss import check_loss, functional_call_fn

__all__ = ["GGNOperator"]


class _FoldedGGN(Linearisation):
    """Forward mode for ``J v`` (folded by ``linearize``), reverse mode for ``Jᵀ u`` (kept forward graph)."""

    def __init__(
        self,
        op: CurvatureOperator,
        fwd: Callable[..., Tensor],
        crit: Callable[[Tensor], Tensor],
        params: dict[str, Tensor],
        fold: bool,
    ) -> None:
        self.op, self.fwd, self.params, self.crit, self.seed = op, fwd, params, crit, op._build_seed
        self.jvp_fn: Callable[..., Any] | None = None
        self.nbytes = 0
        self.recomputes = not fold
        if fold:
            seed_private(self.seed)
            _, self.jvp_fn = folded_linearize(fwd, params)
            self.nbytes += closure_graph_bytes(self.jvp_fn)
        self.leaves = [p.detach().requires_grad_() for p in params.values()]
        saved = SavedBytes()
        seed_private(self.seed)  # the same random masks as the forward-mode pass
        with saved.track():
            self.z = fwd(dict(zip(params, self.leaves)))
        self.nbytes += saved.nbytes
        # Output-space Hessian products by double backward through the criterion's kept graph: the
        # criterion is cheap, and some criteria (mse_loss) lack a forward-over-reverse rule.
        self.zd = self.z.detach().requires_grad_()
        loss = crit(self.zd)
        check_loss(loss, op._index)
        self.gz = torch.autograd.grad(loss, self.zd, create_graph=True)[0]
        self.loss = float(loss.detach())
        self.grad = op._flat(grads_or_none([self.z], self.leaves, [self.gz.detach()])).detach()

    def _jv(self, v: Tensor) -> Tensor:
        t = self.op.unflatten(v)
        if self.jvp_fn is not None:
            return self.jvp_fn(t)
        seed_private(self.seed)
        return torch.func.jvp(self.fwd, (self.params,), (t,))[1]

    def _jt_hz(self, jv: Tensor, batched: bool) -> Tensor:
        (hjv,) = grads_or_none([self.gz], [self.zd], [jv.to(self.zd.dtype)], batched=batched)
        if hjv is None:
            hjv = torch.zeros_like(jv)
        res = grads_or_none([self.z], self.leaves, [hjv], batched=batched)
        return self.op._flat(res, batched=jv.shape[0] if batched else None)

    def apply(self, v: Tensor) -> Tensor:
        return self._jt_hz(self._jv(v), False)

    def apply_batched(self, rows: Tensor) -> Tensor:
        jv = torch.func.vmap(self._jv, chunk_size=self.op.column_chunk)(rows)
        return self._jt_hz(jv, True)


class _RetainedGGN(Linearisation):
    """Reverse mode only: ``J v`` by the double-vjp trick, ``Jᵀ u`` and the output Hessian by kept graphs."""

    # Measured on CPU: is_grads_batched (vmap over the kept graph) costs more per column than a loop.
    batched_on_cpu = False

    def __init__(
        self,
        op: CurvatureOperator,
        fwd: Callable[..., Tensor],
        crit: Callable[[Tensor], Tensor],
        params: dict[str, Tensor],
    ) -> None:
        self.op = op
        self.leaves = [p.detach().requires_grad_() for p in params.values()]
        saved = SavedBytes()
        with saved.track():
            self.z = fwd(dict(zip(params, self.leaves)))
            # u is a dummy cotangent: Jᵀu is linear in u, so d<Jᵀu, v>/du = J v (Pearlmutter's trick).
            self.u = torch.zeros_like(self.z, requires_grad=True)
            jtu = torch.autograd.grad(self.z, self.leaves, self.u, create_graph=True, allow_unused=True)
            self.jt_index = [i for i, g in enumerate(jtu) if g is not None and g.requires_grad]
            self.jtu = [jtu[i] for i in self.jt_index]
            self.zd = self.z.detach().requires_grad_()
            loss = crit(self.zd)
            check_loss(loss, op._index)
            self.gz = torch.autograd.grad(loss, self.zd, create_graph=True)[0]
        self.loss = float(loss.detach())
        self.grad = op._flat(grads_or_none([self.z], self.leaves, [self.gz.detach()])).detach()
        self.nbytes = saved.nbytes

    def _apply(self, v: Tensor, batched: bool) -> Tensor:
        parts = list(self.op.unflatten(v).values())
        (jv,) = grads_or_none(self.jtu, [self.u], [parts[i] for i in self.jt_index], batched=batched)
        if jv is None:
            jv = torch.zeros(
                (v.shape[0], *self.z.shape) if batched else self.z.shape,
                dtype=self.z.dtype,
                device=self.z.device,
            )
        (hjv,) = grads_or_none([self.gz], [self.zd], [jv], batched=batched)
        if hjv is None:
            hjv = torch.zeros_like(jv)
        res = grads_or_none([self.z], self.leaves, [hjv], batched=batched)
        return self.op._flat(res, batched=v.shape[0] if batched else None)

    def apply(self, v: Tensor) -> Tensor:
        return self._apply(v, False)

    def apply_batched(self, rows: Tensor) -> Tensor:
        return self._apply(rows, True)


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix of the mean loss, ``G = (1/N) sum_b |b| J_bᵀ H_z,b J_b``.

    ``J_b`` is the Jacobian of the model outputs on batch ``b`` with respect to the selected parameters
    and ``H_z,b`` the Hessian of the criterion with respect to those outputs; ``G`` is positive
    semi-definite for criteria convex in the outputs (cross-entropy, MSE). The loss must expose
    ``forward(model, batch)`` and ``criterion(outputs, batch)`` (the built-in losses do).

    Cost: one linearisation per batch (forward, plus a traced forward for ``fwd_rev``); each product is
    one JVP, one output-space Hessian product and one VJP, about one gradient.
    """

    kind = "ggn"

    def _check_loss_fn(self) -> None:
        if not (
            callable(getattr(self.loss_fn, "forward", None))
            and callable(getattr(self.loss_fn, "criterion", None))
        ):
            raise ConfigError(
                "GGNOperator needs a loss_fn with .forward(model, batch) -> outputs and .criterion(outputs, batch) "
                "-> scalar (e.g. ClassificationLoss, RegressionLoss, LanguageModelLoss); a plain function only "
                "supports HessianOperator"
            )

    def _build(self, backend: str, index: int) -> Linearisation:
        call = functional_call_fn(self.model, self.loss_fn.forward, self.param_names, self._state)
        batch = self.batches[index]
        fwd = lambda p: call(p, batch)  # noqa: E731
        crit = lambda z: self.loss_fn.criterion(z, batch)  # noqa: E731
        params = self._params()
        self._index = index
        if backend == "rev_rev":
            return _RetainedGGN(self, fwd, crit, params)
        if not self.linearize:
            return _FoldedGGN(self, fwd, crit, params, fold=False)
        try:
            return _FoldedGGN(self, fwd, crit, params, fold=True)
        except (RuntimeError, NotImplementedError):
            # linearize could not trace the model: compute J v by a fresh jvp at each product instead.
            return _FoldedGGN(self, fwd, crit, params, fold=False)
