"""Sharpness against the optimizer's stability threshold (Cohen et al. 2021, 2022; Wu & Su 2023).

For gradient descent with step ``lr`` on a quadratic, the iteration is stable iff the top Hessian
eigenvalue ``S = lambda_max`` stays below ``2 / lr``; full-batch GD sharpens until ``S`` reaches ``2 / lr``
and then hovers there (the edge of stability). The diagnostic records ``S``, the threshold and their
ratio ``S * lr / 2`` (1 = edge of stability), reading the step size from the optimizer at that step:

* SGD-like optimizers (no second-moment state): ``sharpness``, ``stability_threshold`` and
  ``sharpness_ratio``. With heavy-ball momentum ``beta`` and dampening ``d`` the threshold is
  ``2 (1 + beta) / (lr (1 - d))``, with Nesterov momentum ``2 (1 + beta) / (lr (1 + 2 beta))`` (both are
  ``2 / lr`` without momentum; Cohen et al. 2021, appendix on momentum).
* Adam / AdamW (``exp_avg_sq`` in the state): the preconditioned sharpness
  ``lambda_max(P^{-1/2} H P^{-1/2})`` with ``P = diag(sqrt(v_hat) + eps)``, ``v_hat = v / (1 - beta2^t)``
  (bias-corrected with the state's step ``t``), against ``(2 + 2 beta1) / ((1 - beta1) lr)``, 38/lr for
  beta1 = 0.9 (Cohen et al. 2022): ``adam_sharpness``, ``adam_threshold``, ``adam_sharpness_ratio``;
  ``sharpness`` (the raw lambda_max) is recorded too.
* ``trace_ratio = Tr(H) * lr / 2`` for SGD-like optimizers: linearly stable minima of SGD have
  ``Tr(H) <= 2 / lr`` (Wu & Su 2023).

An ``edge_of_stability`` event is emitted when ``sharpness_ratio`` or ``adam_sharpness_ratio`` crosses 1
upwards (severity "warning") and when it comes back below ``1 - hysteresis`` (severity "info"); the side
is remembered in ``self.state`` (saved with the run) so a ratio hovering at 1 does not fire at every
probe. Definitions: docs/metrics.md, "Sharpness and edge of stability".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from diagnostics.errors import ConfigError
from diagnostics.metrics.base import Output
from diagnostics.linalg.finite import FiniteChecked
from diagnostics.metrics.curvature_base import CurvatureDiagnostic, check_budget, failed, run_guarded, worst_status
from diagnostics.metrics.registry import register
from diagnostics.store.records import Event, Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

__all__ = ["Sharpness", "adam_preconditioner", "optimizer_family", "sgd_threshold"]


# --- optimizer reading -----------------------------------------------------------------------------------
def optimizer_family(optimizer: torch.optim.Optimizer | None) -> str:
    """``"adam"`` when the optimizer keeps a second moment ``exp_avg_sq`` (Adam, AdamW), else ``"sgd"``."""
    if optimizer is None:
        return "sgd"
    for group in optimizer.param_groups:
        if "betas" in group:
            return "adam"
    for st in optimizer.state.values():
        if isinstance(st, dict) and "exp_avg_sq" in st:
            return "adam"
    return "sgd"


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _as_float(x: Any) -> float:
    return float(x.item() if torch.is_tensor(x) else x)


def sgd_threshold(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    """The largest curvature at which (momentum) gradient descent with step ``lr`` is stable on a quadratic.

    ``2 / lr`` without momentum; ``2 (1 + beta) / (lr (1 - d))`` for heavy ball with dampening ``d``;
    ``2 (1 + beta) / (lr (1 + 2 beta))`` for Nesterov (PyTorch's form, dampening 0).

    Example:
        >>> sgd_threshold(0.1), round(sgd_threshold(0.1, momentum=0.9), 6)
        (20.0, 38.0)
    """
    if nesterov:
        return 2.0 * (1.0 + momentum) / (lr * (1.0 + 2.0 * momentum))
    return 2.0 * (1.0 + momentum) / (lr * (1.0 - dampening))


def adam_preconditioner(optimizer: torch.optim.Optimizer, model_params: dict[str, Tensor], names: list[str],
                        lr_ref: float) -> tuple[Tensor, float, str | None]:
    """The scaling ``s = P^{-1/2}`` (flat, in ``names`` order) of Adam's preconditioned sharpness.

    ``P_j = (sqrt(v_hat_j) + eps) * lr_ref / lr_g`` for parameter ``j`` in group ``g``: with one learning
    rate this is Adam's ``sqrt(v_hat) + eps``; with per-group rates it folds their ratio in, so that one
    threshold ``(2 + 2 beta1) / ((1 - beta1) lr_ref)`` applies to every direction. Parameters without
    optimizer state (frozen, or never given a gradient) get ``s = 0``: the optimizer does not move them.
    ``amsgrad`` uses ``max_exp_avg_sq``.

    Returns:
        ``(s [P] float64, beta1, reason)``; ``reason`` is not None when the state is missing (before the
        first ``optimizer.step()``), in which case ``s`` is meaningless.
    """
    groups = _group_of(optimizer)
    parts: list[Tensor] = []
    beta1 = None
    seen = 0
    for n in names:
        p = model_params[n]
        g = groups.get(id(p))
        st = optimizer.state.get(p, {}) if g is not None else {}
        key = "max_exp_avg_sq" if g is not None and g.get("amsgrad") and "max_exp_avg_sq" in st else "exp_avg_sq"
        if g is None or key not in st or "step" not in st:
            parts.append(torch.zeros(p.numel(), dtype=torch.float64))
            continue
        seen += 1
        b1, b2 = (float(b) for b in g["betas"])
        beta1 = b1 if beta1 is None else beta1
        t = _as_float(st["step"])
        if t < 1:
            parts.append(torch.zeros(p.numel(), dtype=torch.float64))
            continue
        v_hat = st[key].detach().reshape(-1).to(torch.float64).cpu() / (1.0 - b2**t)
        denom = (v_hat.sqrt() + float(g["eps"])) * (lr_ref / _as_float(g["lr"]))
        parts.append(denom.rsqrt())
    if seen == 0 or beta1 is None:
        return torch.zeros(0, dtype=torch.float64), 0.0, "the optimizer has no Adam state yet (before its first step)"
    return torch.cat(parts), beta1, None


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
                 seed: int = 0) -> None:
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
                "warm_start": self.warm_start, "hysteresis": self.hysteresis}

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
            if family == "sgd":
                group = opt.param_groups[0] if opt is not None else {}
                thr = sgd_threshold(lr, float(group.get("momentum", 0.0) or 0.0),
                                    float(group.get("dampening", 0.0) or 0.0), bool(group.get("nesterov", False)))
                ratio = lam / thr
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
                s, beta1, missing = adam_preconditioner(opt, params, list(op.param_names), lr)
                if missing is not None:
                    reasons.append(missing)
                    continue
                from diagnostics.linalg import ScaledOperator

                scaled = ScaledOperator(op, s.to(device=op.device))
                alam, aconv, spent, why = self._top(scaled, (key, "adam"))
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
        return Output(records=records, events=events, status=worst_status(statuses), num_matvecs=total,
                      reason="; ".join(dict.fromkeys(reasons)) or None, settings={"optimizer_family": family})
