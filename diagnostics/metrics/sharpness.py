"""Sharpness against the optimizer's stability threshold (Cohen et al. 2021, 2022; Wu & Su 2023).

For gradient descent with step ``lr`` on a quadratic, the iteration is stable iff the top Hessian
eigenvalue ``S = lambda_max`` stays below ``2 / lr``; full-batch GD sharpens until ``S`` reaches ``2 / lr``
and then hovers there (the edge of stability). The diagnostic records ``S``, the threshold and their
ratio ``S * lr / 2`` (1 = edge of stability), reading the step size from the optimizer at that step.

Thresholds exist only for a whitelist of optimizers (exact types); anything else (Lion, NAdam, RAdam,
RMSprop, Adagrad, ..., or a subclass) gets ``sharpness`` alone and the reason in the step's status:

* ``torch.optim.SGD`` (and no optimizer, with ``lr=``): ``sharpness``, ``stability_threshold`` and
  ``sharpness_ratio``. Plain GD ``2 / lr``; heavy-ball momentum ``beta`` with dampening ``d``
  ``2 (1 + beta) / (lr (1 - d))``; Nesterov ``2 (1 + beta) / (lr (1 + 2 beta))`` (derived in
  :func:`sgd_threshold`). Coupled weight decay ``wd`` makes the optimizer's curvature ``H + wd I``, so the
  ratio is ``(S + wd) / threshold``.
* ``torch.optim.Adam`` / ``AdamW``: the preconditioned sharpness ``lambda_max(P^{-1/2} H P^{-1/2})`` with
  ``P = diag(sqrt(v_hat) + eps)`` the denominator of the step about to be taken (Cohen et al. 2022): the
  Monitor calls diagnostics between ``backward()`` and ``optimizer.step()``, so ``v_hat`` is formed from
  the state's ``v_{t-1}`` and the current gradient, ``v_t = beta2 v_{t-1} + (1 - beta2) g_t^2``, bias-
  corrected with ``t`` = state step + 1 (:func:`adam_preconditioner`; ``preconditioner="state"`` uses the
  previous step's ``v_hat`` instead, as does a step without gradients, with a note in the status reason).
  Threshold ``(2 + 2 beta1) / ((1 - beta1) lr)``, 38/lr for beta1 = 0.9: ``adam_sharpness``,
  ``adam_threshold``, ``adam_sharpness_ratio``; ``sharpness`` (the raw lambda_max) is recorded too.
  Adam's coupled weight decay is folded into the operator (``H + wd I``); AdamW's decoupled decay is not.
* ``trace_ratio = Tr(H) * lr / 2`` for SGD: linearly stable minima of SGD have ``Tr(H) <= 2 / lr``
  (Wu & Su 2023).

An ``edge_of_stability`` event is emitted when ``sharpness_ratio`` or ``adam_sharpness_ratio`` crosses 1
upwards (severity "warning") and when it comes back below ``1 - hysteresis`` (severity "info"); the side
is remembered in ``self.state`` (saved with the run) so a ratio hovering at 1 does not fire at every
probe. A ``misuse`` event (:func:`probe_mode_misuse`) says when the ratio compares eval-mode curvature
with a model trained through dropout or BatchNorm. Definitions: docs/metrics.md, "Sharpness and edge of
stability".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from diagnostics.errors import ConfigError
from diagnostics.linalg.finite import FiniteChecked
from diagnostics.metrics.adam_state import coming_gradient, coming_second_moment, decoupled_decay
from diagnostics.metrics.base import Output
from diagnostics.metrics.curvature_base import (
    CurvatureDiagnostic,
    check_budget,
    failed,
    run_guarded,
    worst_status,
)
from diagnostics.metrics.misuse import misuse_event, train_mode_modules
from diagnostics.metrics.registry import register
from diagnostics.store.records import Event, Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

__all__ = ["Sharpness", "adam_preconditioner", "adam_weight_decay", "optimizer_family", "probe_mode_misuse",
           "sgd_rule", "sgd_threshold", "unsupported_reason"]


# --- optimizer reading -----------------------------------------------------------------------------------
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


#: The records that compare curvature with the optimizer's threshold.
_RATIOS = ("sharpness_ratio", "adam_sharpness_ratio")


def probe_mode_misuse(ctx: StepContext) -> list[Event]:
    """A ``probe_mode`` misuse event when the threshold comparison mixes eval-mode curvature with a
    train-mode loss, else [].

    The stability threshold holds for the loss the optimizer differentiates. The curvature is that of
    the probe batches in ``ctx.curvature_mode``; when that is ``"eval"`` while the model is in training
    mode with dropout or BatchNorm layers (:func:`~diagnostics.metrics.misuse.train_mode_modules`), the
    two losses differ. A model in eval mode (``tdiag analyze``), or without such layers, gives [].
    Cost: one walk over the modules.
    """
    if ctx.curvature_mode != "eval":
        return []
    found = train_mode_modules(ctx.model)
    if not found:
        return []
    return [misuse_event(
        "probe_mode", "sharpness",
        f"sharpness compares curvature with the optimizer's stability threshold (2/lr for SGD) at step "
        f"{ctx.step}, which holds for the loss the optimizer differentiates; but the curvature is that of the "
        f"eval-mode loss on the probe batches while the model trains in train mode through "
        f"{', '.join(found)}, so sharpness_ratio is not the training loss's. Pass "
        "Monitor(curvature_mode='train') to measure the train-mode loss (dropout masks fixed per probe batch, "
        "BatchNorm on batch statistics), and keep probe_data to training batches (the default, a copy of "
        "the first batch, is one).",
        modules=found, curvature_mode=ctx.curvature_mode,
    )]


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


class _Preconditioned:
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


# --- the diagnostic ---------------------------------------------------------------------------------------
@register
class Sharpness(CurvatureDiagnostic):
    """Sharpness ``lambda_max(H)`` against the optimizer's stability threshold, and ``Tr(H) lr / 2``.

    Records (key = block, "all" by default): ``sharpness``; for SGD-like optimizers
    ``stability_threshold`` and ``sharpness_ratio`` (and ``trace_ratio``); for Adam ``adam_sharpness``,
    ``adam_threshold`` and ``adam_sharpness_ratio``. Events: ``edge_of_stability`` on crossings of 1.

    Read: ``sharpness_ratio`` near 1 means training sits at the edge of stability, where the loss is
    non-monotone but still decreases on average; well above 1 for long means the step is too large for the
    curvature (expect spikes or divergence); far below 1 leaves room for a larger step.

    Args:
        every, start: schedule (default every 500 steps).
        params: blocks (module docstring of ``diagnostics.metrics.curvature_base``); whole model by default.
        lr: step size to use when there is no optimizer (checkpoint analysis); else read at each step.
        trace: ``"auto"`` (default) records ``trace_ratio`` when ``hessian_trace`` ran earlier in the same
            step with the same ``num_matvecs`` and seed (free: ``ctx.trace`` shares its estimate);
            ``True`` always estimates ``Tr(H)`` by Hutch++ with ``trace_matvecs`` products (reused when
            available); ``False`` never records it.
        tol, max_matvecs, max_seconds: Lanczos tolerance and budget per Lanczos run (one per block; a
            second for Adam's preconditioned operator); a budget stop is stored as ``not_converged``.
        hysteresis: a ratio above 1 counts as back below only under ``1 - hysteresis``.
        preconditioner: Adam's ``v_hat``: ``"next_step"`` (default) the one ``optimizer.step()`` is about
            to use (state plus the current gradient), ``"state"`` the bias-corrected ``v`` of the last
            completed step.

    Cost: top-1 Lanczos (a handful of HVPs warm-started from the previous probe's vector) per ratio
    family (a second one for Adam's preconditioned operator), plus ``trace_matvecs`` HVPs when ``trace=True``
    and no ``hessian_trace`` estimate of the step is available.
    """

    name = "sharpness"
    requires = frozenset({"curvature", "optimizer"})
    preset = "standard"
    # Top-1 Lanczos costs 10-20 HVPs, each 2-3 training steps: every 500 steps is about 10% of training on
    # the zoo's tiny GPT. Edge-of-stability studies probe far more often (every=10 in the example).
    default_every = 500
    metrics = ("sharpness", "stability_threshold", "sharpness_ratio", "adam_sharpness", "adam_threshold",
               "adam_sharpness_ratio", "trace_ratio")
    #: with ``trace="auto"`` it reuses hessian_trace's estimate of the step, so it runs after it.
    after: ClassVar[tuple[str, ...]] = ("hessian_trace",)

    def __init__(self, every: int | None = None, start: int = 0, *, params: Any = None, lr: float | None = None,
                 trace: bool | str = "auto", trace_matvecs: int = 60, tol: float = 1e-3, max_matvecs: int | None = 100,
                 max_seconds: float | None = None, warm_start: bool = True, hysteresis: float = 0.1,
                 preconditioner: str = "next_step", seed: int = 0) -> None:
        super().__init__(every, start, kind="hessian", params=params, seed=seed)
        self.metrics = type(self).metrics
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"sharpness: lr must be a positive number or None (read from the optimizer), got {lr!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ConfigError(f"sharpness: tol must be positive, got {tol!r}")
        if not (isinstance(hysteresis, (int, float)) and 0 <= hysteresis < 1):
            raise ConfigError(f"sharpness: hysteresis must be in [0, 1), got {hysteresis!r}")
        if not isinstance(trace_matvecs, int) or trace_matvecs < 6:
            raise ConfigError(f"sharpness: trace_matvecs must be an int >= 6, got {trace_matvecs!r}")
        check_budget(max_matvecs, max_seconds, self.name)
        if preconditioner not in ("next_step", "state"):
            raise ConfigError(f"sharpness: preconditioner must be 'next_step' or 'state', got {preconditioner!r}")
        self.preconditioner = preconditioner
        self.lr = lr
        if trace not in (True, False, "auto"):
            raise ConfigError(f"sharpness: trace must be True, False or 'auto', got {trace!r}")
        self.trace = trace
        self.trace_matvecs = trace_matvecs
        self.tol = float(tol)
        self.max_matvecs = max_matvecs
        self.max_seconds = max_seconds
        self.warm_start = bool(warm_start)
        self.hysteresis = float(hysteresis)
        #: previous probe's top vector per (block, "raw" | "adam"): the next probe's warm start.
        self.vectors: dict[Any, Tensor] = {}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "lr": self.lr, "trace": self.trace, "trace_matvecs": self.trace_matvecs,
                "tol": self.tol, "max_matvecs": self.max_matvecs, "max_seconds": self.max_seconds,
                "warm_start": self.warm_start, "hysteresis": self.hysteresis,
                "adam_preconditioner": self.preconditioner}

    # top eigenvalue, warm-started; returns (value, converged, matvecs, reason)
    def _top(self, op: Any, key: Any) -> tuple[float | None, bool, int, str | None]:
        from diagnostics.linalg import lanczos

        dim = int(op.shape[0])
        if dim < 2:
            raise ConfigError(f"sharpness: block has {dim} parameter; Lanczos needs at least 2")
        v0 = self.vectors.get(key) if self.warm_start else None
        if v0 is not None and v0.shape[0] != dim:
            v0 = None
        checked = FiniteChecked(op)
        res, why = run_guarded(lambda: lanczos(checked, k=1, which="LA", tol=self.tol, v0=v0, seed=self.seed,
                                               max_matvecs=self.max_matvecs, max_seconds=self.max_seconds))
        if res is None or not math.isfinite(float(res.eigenvalues[0])):
            self.vectors.pop(key, None)
            return None, False, checked.num_matvecs, why or "Lanczos returned a non-finite eigenvalue"
        self.vectors[key] = res.eigenvectors[:, 0].detach()
        return float(res.eigenvalues[0]), res.all_converged, checked.num_matvecs, None

    def _crossing(self, ctx: StepContext, metric: str, key: str, ratio: float) -> Event | None:
        sides = self.state.setdefault("side", {})
        sid = f"{metric}/{key}"
        above = sides.get(sid, "below") == "above"
        if not above and ratio >= 1.0:
            sides[sid] = "above"
            return Event("edge_of_stability", f"{metric} crossed 1 ({ratio:.3f}) at step {ctx.step}: curvature "
                         "reached the optimizer's stability threshold", severity="warning", metric=metric, key=key,
                         data={"ratio": ratio, "direction": "up"})
        if above and ratio < 1.0 - self.hysteresis:
            sides[sid] = "below"
            return Event("edge_of_stability", f"{metric} fell back below 1 ({ratio:.3f}) at step {ctx.step}",
                         severity="info", metric=metric, key=key, data={"ratio": ratio, "direction": "down"})
        return None

    def compute(self, ctx: StepContext) -> Output:
        lr = self.lr if self.lr is not None else ctx.lr
        opt = ctx.optimizer
        family = optimizer_family(opt)
        records: list[Record] = []
        events: list[Event] = []
        statuses: list[str] = []
        reasons: list[str] = []
        total = 0
        preconditioner = None
        for key, op in self.operators(ctx):
            lam, conv, spent, why = self._top(op, (key, "raw"))
            total += spent
            if lam is None:
                return failed(f"{key}: {why}", total)
            records.append(Record("sharpness", lam, key=key))
            statuses.append("ok" if conv else "not_converged")
            if not conv:
                reasons.append(f"{key}: lambda_max not converged within the budget")
            if lr is None:
                reasons.append("no learning rate (no optimizer and no lr= option): thresholds not recorded")
                continue
            if family == "unsupported":
                reasons.append(unsupported_reason(opt))
                continue
            if family == "sgd":
                thr, wd, why = sgd_rule(opt, lr)
                if thr is None:
                    reasons.append(str(why))
                    continue
                ratio = (lam + wd) / thr
                records += [Record("stability_threshold", thr, key=key), Record("sharpness_ratio", ratio, key=key)]
                ev = self._crossing(ctx, "sharpness_ratio", key, ratio)
                events += [ev] if ev else []
                sel = self.block_params(key)
                shared = ctx.has_trace("hessian", sel, num_matvecs=self.trace_matvecs, seed=self.seed)
                if self.trace is True or (self.trace == "auto" and shared):
                    out, why = run_guarded(lambda sel=sel: ctx.trace(
                        "hessian", sel, num_matvecs=self.trace_matvecs, seed=self.seed))
                    if out is None:
                        return failed(f"{key} trace: {why}", total)
                    est, spent = out
                    total += spent
                    tr = float(est.mean) * lr / 2.0
                    # Recorded, but no event: the trace criterion is about minima, and early in training
                    # Tr(H) lr / 2 is routinely above 1 without anything going wrong.
                    records.append(Record("trace_ratio", tr, key=key))
            else:
                params = dict(ctx.model.named_parameters())
                names = list(op.param_names)
                grads = None
                if self.preconditioner == "next_step":
                    grads = {n: g for n, g in ctx.grads().items() if n in params}
                    if not grads:
                        grads = None
                        reasons.append("no gradients at this step: P from the previous step's v_hat")
                s, beta1, missing = adam_preconditioner(opt, params, names, lr, grads=grads)
                if missing is not None:
                    reasons.append(missing)
                    continue
                preconditioner = "next_step" if grads is not None else "state"
                wd = adam_weight_decay(opt, params, names)
                target = _Preconditioned(op, s.to(device=op.device),
                                         wd if wd is not None else torch.zeros_like(s))
                alam, aconv, spent, why = self._top(target, (key, "adam"))
                total += spent
                if alam is None:
                    return failed(f"{key} preconditioned: {why}", total)
                thr = (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
                ratio = alam / thr
                records += [Record("adam_sharpness", alam, key=key), Record("adam_threshold", thr, key=key),
                            Record("adam_sharpness_ratio", ratio, key=key)]
                ev = self._crossing(ctx, "adam_sharpness_ratio", key, ratio)
                events += [ev] if ev else []
                if not aconv:
                    statuses.append("not_converged")
                    reasons.append(f"{key}: preconditioned lambda_max not converged within the budget")
        misuse = probe_mode_misuse(ctx) if any(r.metric in _RATIOS for r in records) else []
        if misuse:
            events += misuse
            reasons.append("ratio of the eval-mode curvature, not the train-mode loss's (misuse: probe_mode)")
        return Output(records=records, events=events, status=worst_status(statuses), num_matvecs=total,
                      reason="; ".join(dict.fromkeys(reasons)) or None,
                      settings={"optimizer_family": family, "adam_preconditioner": preconditioner})
