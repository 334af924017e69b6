"""The stability thresholds of the common optimizers and Adam's preconditioner, read from the optimizer.

``sharpness`` compares the curvature with these (docs/metrics.md, "Sharpness and edge of stability"):
SGD's ``2 / lr`` and its momentum and Nesterov forms (:func:`sgd_threshold`, :func:`sgd_rule`), and for
Adam the preconditioned curvature ``P^{-1/2} (H + wd) P^{-1/2}`` (:func:`adam_preconditioner`,
:func:`adam_weight_decay`, :class:`Preconditioned`) against ``(2 + 2 beta1) / ((1 - beta1) lr)``.
Optimizers are recognised by exact type (:func:`optimizer_family`); the others get a reason
(:func:`unsupported_reason`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diagnostics.metrics.adam_state import coming_gradient, coming_second_moment, decoupled_decay
from diagnostics.store.catalog import ADAM_SETTLING_REASON

__all__ = ["ADAM_SETTLED_WEIGHT", "ADAM_SETTLING_REASON", "Preconditioned",
           "adam_preconditioner", "adam_settling", "adam_weight_decay",
           "optimizer_family", "sgd_rule", "sgd_threshold", "unsupported_reason"]

#: Optimizers with a stability threshold on a quadratic, by exact type (a subclass may change the step).
_ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)

#: Why the common optimizers outside the whitelist get no threshold.
_UNSUPPORTED = {
    "Lion": "its update is the sign of a momentum, not a linear map of the gradient, so no quadratic threshold",
    "NAdam": "Nesterov momentum with a decaying momentum schedule: no fixed threshold has been derived here",
    "RAdam": "the variance rectification changes the effective step over training: no fixed threshold",
    "RMSprop": "not whitelisted (its threshold would depend on its momentum and centering options)",
    "Adamax": "an infinity-norm preconditioner that is not the sqrt(v_hat) of Cohen et al. 2022",
    "Adagrad": "a preconditioner that only grows, so the threshold moves every step",
    "Adadelta": "a step size set by running averages of updates: no threshold of the form c / lr",
    "LBFGS": "a quasi-Newton step, not a fixed linear map of the gradient",
    "SparseAdam": "updates only the rows of a sparse gradient",
    "ASGD": "averaging and a decaying step size: not whitelisted",
    "Rprop": "sign-based steps with per-element step sizes: no quadratic threshold",
}



def optimizer_family(optimizer: torch.optim.Optimizer | None) -> str:
    """``"sgd"`` for ``torch.optim.SGD`` (or no optimizer: plain GD with ``lr=``), ``"adam"`` for
    ``torch.optim.Adam`` / ``AdamW``, ``"unsupported"`` for anything else (exact types: a subclass may
    change the step, so it is not assumed to keep the parent's threshold)."""
    if optimizer is None or type(optimizer) is torch.optim.SGD:
        return "sgd"
    if type(optimizer) in _ADAM_TYPES:
        return "adam"
    return "unsupported"


def unsupported_reason(optimizer: torch.optim.Optimizer) -> str:
    """Why ``optimizer`` gets sharpness but no threshold or ratio (recorded as the step's status reason)."""
    name = type(optimizer).__name__
    why = _UNSUPPORTED.get(name, "it is not in the whitelist SGD (plain, heavy-ball, Nesterov), Adam, AdamW")
    return f"no stability threshold for {name}: {why}; only sharpness is recorded"


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _as_float(x: Any) -> float:
    return float(x.item() if torch.is_tensor(x) else x)


def sgd_threshold(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    """The largest curvature at which (momentum) gradient descent with step ``lr`` is stable on a quadratic.

    On ``0.5 * lam * x^2`` PyTorch's SGD is a linear recursion in ``(x_t, x_{t-1})``; with ``a = lr * lam``:

    * plain GD: ``x_{t+1} = (1 - a) x_t``, stable iff ``a < 2``: ``lam < 2 / lr``.
    * heavy ball, ``b_t = beta b_{t-1} + (1 - d) g_t``, ``x_{t+1} = x_t - lr b_t``:
      ``x_{t+1} = (1 + beta - (1 - d) a) x_t - beta x_{t-1}``, characteristic polynomial
      ``z^2 - (1 + beta - (1 - d) a) z + beta``; for ``0 <= beta < 1`` its roots lie inside the unit circle
      iff ``|1 + beta - (1 - d) a| < 1 + beta``: ``lam < 2 (1 + beta) / (lr (1 - d))``.
    * Nesterov (dampening 0), ``x_{t+1} = x_t - lr (g_t + beta b_t)``:
      ``x_{t+1} = (1 + beta)(1 - a) x_t - beta (1 - a) x_{t-1}``, polynomial
      ``z^2 - (1 + beta)(1 - a) z + beta (1 - a)``; the Jury conditions ``p(1) = a > 0`` and
      ``p(-1) = 1 + (1 + 2 beta)(1 - a) > 0`` give ``lam < 2 (1 + beta) / ((1 + 2 beta) lr)`` (then
      ``|beta (1 - a)| < 1`` holds too). Nesterov is less tolerant of curvature than heavy ball with the same
      beta: 3.8/lr against 1.36/lr for beta = 0.9.

    ``tests/metrics/test_sharpness.py`` checks each against ``torch.optim.SGD`` on a quadratic.

    Example:
        >>> sgd_threshold(0.1), round(sgd_threshold(0.1, momentum=0.9), 6)
        (20.0, 38.0)
        >>> round(sgd_threshold(0.1, momentum=0.9, nesterov=True), 6)  # 2 * 1.9 / (2.8 * 0.1)
        13.571429
    """
    if nesterov:
        return 2.0 * (1.0 + momentum) / (lr * (1.0 + 2.0 * momentum))
    return 2.0 * (1.0 + momentum) / (lr * (1.0 - dampening))


def sgd_rule(optimizer: torch.optim.SGD | None, lr: float) -> tuple[float | None, float, str | None]:
    """``(threshold, weight_decay, reason)`` of plain or momentum SGD with step ``lr``.

    Coupled weight decay ``wd`` adds ``wd * theta`` to the gradient, so the optimizer's curvature is
    ``H + wd I``: the ratio is taken on ``lambda_max + wd``. ``threshold`` is None (and ``reason`` says
    why) when the parameter groups disagree on momentum, dampening, Nesterov, weight decay or step size
    (no single threshold), or with ``maximize=True``.
    """
    if optimizer is None:
        return sgd_threshold(lr), 0.0, None
    keys = ("momentum", "dampening", "nesterov", "weight_decay", "lr", "maximize")
    seen = {k: {_as_float(g.get(k, 0.0) or 0.0) for g in optimizer.param_groups} for k in keys}
    differ = [k for k, v in seen.items() if len(v) > 1]
    if differ:
        return None, 0.0, f"SGD parameter groups differ in {', '.join(differ)}: no single stability threshold"
    g = optimizer.param_groups[0]
    if g.get("maximize"):
        return None, 0.0, "SGD with maximize=True ascends the loss: no stability threshold"
    thr = sgd_threshold(lr, float(g.get("momentum", 0.0) or 0.0), float(g.get("dampening", 0.0) or 0.0),
                        bool(g.get("nesterov", False)))
    return thr, float(g.get("weight_decay", 0.0) or 0.0), None


def adam_preconditioner(optimizer: torch.optim.Optimizer, model_params: dict[str, Tensor], names: list[str],
                        lr_ref: float, grads: Mapping[str, Tensor] | None = None,
                        ) -> tuple[Tensor, float, str | None]:
    """The scaling ``s = P^{-1/2}`` (flat, in ``names`` order) of Adam's preconditioned sharpness.

    Which ``v_hat``. With ``grads`` (the gradients the coming ``optimizer.step()`` will use, i.e. the
    Monitor's ``.grad`` between ``backward()`` and ``step()``), ``P`` is exactly the denominator of that
    step: ``g_t`` (plus ``weight_decay * theta`` for Adam's coupled weight decay), ``t`` = the state's step
    + 1, ``v_t = beta2 v_{t-1} + (1 - beta2) g_t^2`` (``v_0 = 0`` before the first step), ``v_hat_t =
    v_t / (1 - beta2^t)`` (``amsgrad``: ``max(max_exp_avg_sq, v_t) / (1 - beta2^t)``), and
    ``P_j = sqrt(v_hat_t) + eps`` as in ``torch.optim.Adam``. Parameters without a gradient are not moved by
    the step and get ``s = 0``. Without ``grads`` it is the bias-corrected ``v`` of the last *completed*
    step (``exp_avg_sq / (1 - beta2^step)``), one step stale; before the first step there is none.

    With per-group learning rates ``P_j`` is multiplied by ``lr_ref / lr_g``, so that one threshold
    ``(2 + 2 beta1) / ((1 - beta1) lr_ref)`` applies to every direction.

    Returns:
        ``(s [P] float64, beta1, reason)``; ``reason`` is not None when nothing could be read (no state
        and no gradients, or groups with different beta1), in which case ``s`` is meaningless.
    """
    groups = _group_of(optimizer)
    parts: list[Tensor] = []
    betas1: set[float] = set()
    seen = 0
    for n in names:
        p = model_params[n]
        g = groups.get(id(p))
        st = optimizer.state.get(p, {}) if g is not None else {}
        zero = torch.zeros(p.numel(), dtype=torch.float64)
        if g is None:
            parts.append(zero)
            continue
        b1, b2 = (float(b) for b in g["betas"])
        amsgrad = bool(g.get("amsgrad"))
        step = _as_float(st["step"]) if "step" in st else 0.0
        if grads is not None:
            grad = grads.get(n)
            if grad is None:
                parts.append(zero)
                continue
            gt = coming_gradient(optimizer, g, p, grad.reshape(p.shape).cpu(), torch.float64).reshape(-1)
            v, t = coming_second_moment(g, st, gt)
        else:
            key = "max_exp_avg_sq" if amsgrad and "max_exp_avg_sq" in st else "exp_avg_sq"
            if key not in st or step < 1:
                parts.append(zero)
                continue
            t = step
            v = st[key].detach().reshape(-1).to(torch.float64).cpu()
        seen += 1
        betas1.add(b1)
        v_hat = v / (1.0 - b2**t)
        denom = (v_hat.sqrt() + float(g["eps"])) * (lr_ref / _as_float(g["lr"]))
        parts.append(denom.rsqrt())
    if seen == 0:
        what = "no gradients for the coming step" if grads is not None else "no Adam state yet (before its first step)"
        return torch.zeros(0, dtype=torch.float64), 0.0, f"the optimizer has {what}"
    if len(betas1) > 1:
        return torch.zeros(0, dtype=torch.float64), 0.0, f"Adam parameter groups differ in beta1 {sorted(betas1)}: " \
            "no single stability threshold"
    return torch.cat(parts), betas1.pop(), None


#: Adam's threshold assumes a preconditioner that changes slowly. ``v_hat_t`` gives the newest squared
#: gradient the weight ``(1 - beta2) / (1 - beta2^t)`` (1 at the first step); the preconditioner counts as
#: settled once that weight is at most this, or at most twice its long-run value ``1 - beta2`` when that is
#: larger (beta2 < 0.95).
ADAM_SETTLED_WEIGHT = 0.1


def adam_settling(optimizer: torch.optim.Optimizer, model_params: dict[str, Tensor], names: list[str],
                  coming: bool) -> str | None:
    """Why Adam's stability threshold does not apply yet, or None once every group's ``v_hat`` has settled.

    ``coming``: the preconditioner is that of the coming step (``t`` = the state's step + 1), else that of
    the last completed step. In the first steps ``v_hat`` is the average of a few squared gradients, so
    ``P`` changes by a large fraction at every step and the quadratic analysis behind
    ``(2 + 2 beta1) / ((1 - beta1) lr)``, which freezes ``P``, does not describe the step: the
    preconditioned sharpness is then often far above that threshold (thousands of times on the demo's
    tiny GPT at step 0) while training is stable. See :data:`ADAM_SETTLED_WEIGHT`. Cost: a pass over the
    parameters' state entries (no tensor arithmetic).
    """
    groups = _group_of(optimizer)
    worst: tuple[float, float, float] | None = None  # (weight, t, limit) of the least settled group
    for n in names:
        g = groups.get(id(model_params[n]))
        if g is None:
            continue
        st = optimizer.state.get(model_params[n], {})
        t = (_as_float(st["step"]) if "step" in st else 0.0) + (1.0 if coming else 0.0)
        if t < 1:
            continue
        b2 = float(g["betas"][1])
        weight = (1.0 - b2) / (1.0 - b2**t) if b2 < 1.0 else 1.0 / t
        limit = max(ADAM_SETTLED_WEIGHT, 2.0 * (1.0 - b2))
        if weight > limit and (worst is None or weight > worst[0]):
            worst = (weight, t, limit)
    if worst is None:
        return None
    weight, t, limit = worst
    return (f"{ADAM_SETTLING_REASON} at its step {t:.0f} (the newest squared gradient weighs "
            f"{weight:.2f} in v_hat, above {limit:.2f}): the threshold assumes a slowly changing preconditioner, "
            "so the ratio is recorded but not compared with 1 (no edge_of_stability event)")


def adam_weight_decay(optimizer: torch.optim.Optimizer, model_params: dict[str, Tensor], names: list[str]) -> Tensor | None:
    """Per-element coupled (L2) weight decay of Adam, flat in ``names`` order, or None when there is none.

    Adam's coupled ``weight_decay`` adds ``wd * theta`` to the gradient, so the preconditioned operator the
    step sees is ``P^{-1/2} (H + diag(wd)) P^{-1/2}``. AdamW's decoupled decay multiplies the weights by
    ``1 - lr * wd``, a contraction that is left out (it moves the threshold by a relative ``O(lr * wd)``).
    """
    groups = _group_of(optimizer)
    parts = []
    for n in names:
        p = model_params[n]
        g = groups.get(id(p)) or {}
        wd = float(g.get("weight_decay", 0.0) or 0.0)
        coupled = wd and not decoupled_decay(optimizer, g)
        parts.append(torch.full((p.numel(),), wd if coupled else 0.0, dtype=torch.float64))
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return flat if bool((flat != 0).any()) else None


class Preconditioned:
    """``diag(s) (H + diag(w)) diag(s)``: Adam's preconditioned curvature including coupled weight decay."""

    def __init__(self, op: Any, s: Tensor, w: Tensor) -> None:
        from diagnostics.linalg import ScaledOperator

        self.scaled = ScaledOperator(op, s)
        self.shape, self.dtype, self.device = self.scaled.shape, self.scaled.dtype, self.scaled.device
        self.shift = (w * s.square()).to(dtype=self.dtype, device=self.device)

    def __matmul__(self, V: Tensor) -> Tensor:
        V = V.to(dtype=self.dtype, device=self.device)
        return self.scaled @ V + (self.shift if V.dim() == 1 else self.shift[:, None]) * V

    @property
    def num_matvecs(self) -> int:
        return self.scaled.num_matvecs
