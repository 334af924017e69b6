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
probe. Adam's ratio raises no event while its preconditioner is still settling
(:func:`~diagnostics.metrics.stability.adam_settling`; the status reason says so).
A ``misuse`` event (:func:`probe_mode_misuse`) says when the ratio compares eval-mode curvature
with a model trained through dropout or BatchNorm. Definitions: docs/metrics.md, "Sharpness and edge of
stability".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from diagnostics.errors import ConfigError
from diagnostics.linalg.finite import FiniteChecked
from diagnostics.linalg.lanczos_basis import BasisWorkspace
from diagnostics.metrics.base import Output
from diagnostics.metrics.curvature_base import (
    CallTime,
    CurvatureDiagnostic,
    ProbeInCalls,
    check_budget,
    failed,
    run_guarded,
    worst_status,
)
from diagnostics.metrics.misuse import misuse_event, train_mode_modules
from diagnostics.metrics.registry import register
from diagnostics.metrics.stability import (
    Preconditioned,
    adam_preconditioner,
    adam_settling,
    adam_weight_decay,
    optimizer_family,
    sgd_rule,
    sgd_threshold,
    unsupported_reason,
)
from diagnostics.store.records import Event, Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

__all__ = ["Sharpness", "adam_preconditioner", "adam_weight_decay", "optimizer_family", "probe_mode_misuse",
           "sgd_rule", "sgd_threshold", "unsupported_reason"]


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



# --- one probe, possibly spread over calls -----------------------------------------------------------------
class _Search:
    """The top-1 Lanczos run of one operator of a probe (a block's raw or preconditioned curvature)."""

    def __init__(self, label: str, op: FiniteChecked, vector_key: tuple[str, str]) -> None:
        self.label, self.op, self.vector_key = label, op, vector_key
        self.run: Any = None  # the LanczosRun while it goes on (resume)
        self.value: float | None = None
        self.converged = False

    @property
    def done(self) -> bool:
        return self.value is not None

    def close(self) -> None:
        if self.run is not None:
            self.run.close()
            self.run = None


class _Block:
    """What one block of a probe compares: its operators' searches and the thresholds of the probe's step."""

    def __init__(self, key: str, raw: Any) -> None:
        self.key, self.raw = key, raw
        self.searches: list[_Search] = []
        self.sgd: tuple[float, float] | None = None  # (threshold, coupled weight decay)
        self.adam_threshold: float | None = None
        self.trace_ratio: float | None = None
        # (parameters, learning rate) while the trace is awaited from a hessian_trace run cut into calls
        self.trace_wanted: tuple[Any, float] | None = None


class _Probe:
    """A sharpness probe: the step it describes, what the optimizer was at that step, and its searches.

    A probe cut into calls keeps all of it, so that the thresholds, the learning rate and Adam's
    preconditioner are those of the step whose curvature the searches measure."""

    def __init__(self, step: int, family: str) -> None:
        self.step, self.family = step, family
        self.blocks: list[_Block] = []
        self.reasons: list[str] = []
        self.preconditioner: str | None = None
        self.settling: str | None = None  # why Adam's threshold does not apply yet (its first steps)
        self.products = 0  # in all calls so far

    def searches(self) -> list[_Search]:
        return [s for b in self.blocks for s in b.searches]

    def freeze(self) -> None:
        """Keep the probe's step's parameters for the products of later calls (a copy per block)."""
        for b in self.blocks:
            if not b.raw.frozen:
                b.raw.freeze()

    def close(self) -> None:
        for s in self.searches():
            s.close()


# --- the diagnostic ---------------------------------------------------------------------------------------
@register
class Sharpness(ProbeInCalls, CurvatureDiagnostic):
    """Sharpness ``lambda_max(H)`` against the optimizer's stability threshold, and ``Tr(H) lr / 2``.

    Records (key = block, "all" by default): ``sharpness``; for SGD-like optimizers
    ``stability_threshold`` and ``sharpness_ratio`` (and ``trace_ratio``); for Adam ``adam_sharpness``,
    ``adam_threshold`` and ``adam_sharpness_ratio``; ``sharpness_probe_step`` when the probe spanned
    several calls. Events: ``edge_of_stability`` on crossings of 1.

    Read: ``sharpness_ratio`` near 1 means training sits at the edge of stability, where the loss is
    non-monotone but still decreases on average; well above 1 for long means the step is too large for the
    curvature (expect spikes or divergence); far below 1 leaves room for a larger step.

    Args:
        every, start: schedule (default every 500 steps).
        params: blocks (module docstring of ``diagnostics.metrics.curvature_base``); whole model by default.
        lr: step size to use when there is no optimizer (checkpoint analysis); else read at each step.
        trace: ``"auto"`` (default) records ``trace_ratio`` when ``hessian_trace`` ran earlier in the same
            step with the same ``num_matvecs`` and seed (free: ``ctx.trace`` shares its estimate), or began a
            run there that the budget cut into calls (taken at the call that run ends, if this probe is
            still going then: the budget carries the run cut first on first);
            ``True`` always estimates ``Tr(H)`` by Hutch++ with ``trace_matvecs`` products (reused when
            available, taken whole in the probe's first call); ``False`` never records it.
        tol: Lanczos tolerance.
        max_matvecs, max_seconds: budget per call of each Lanczos run (one per block; a second for Adam's
            preconditioned operator). With ``resume`` a run that reaches it continues at the next call;
            without, it is stored as ``not_converged``.
        resume: a probe stopped by its budget, or by ``ctx.probe_seconds`` (the Monitor's overhead budget
            cuts a long probe into calls of a share of the step time), continues at the next call on the
            parameters of the step it began, with that step's learning rate, thresholds and Adam
            preconditioner; the calls in between store only the status ``continues``. False: each probe
            runs whole from the previous probe's vector.
        warm_start: start each run from the previous probe's top vector.
        hysteresis: a ratio above 1 counts as back below only under ``1 - hysteresis``.
        preconditioner: Adam's ``v_hat``: ``"next_step"`` (default) the one ``optimizer.step()`` is about
            to use (state plus the current gradient), ``"state"`` the bias-corrected ``v`` of the last
            completed step.
        keep_basis: run Lanczos in the basis memory the Monitor keeps between probes
            (``ctx.basis_workspace``): a CPU probe then does not map and zero a fresh basis each time.

    Cost: top-1 Lanczos (a handful of HVPs warm-started from the previous probe's vector) per ratio
    family (a second one for Adam's preconditioned operator), plus ``trace_matvecs`` HVPs when ``trace=True``
    and no ``hessian_trace`` estimate of the step is available. A probe spread over calls holds, per
    block, a copy of the parameters and buffers and its Lanczos bases until it ends.
    """

    name = "sharpness"
    requires = frozenset({"curvature", "optimizer"})
    preset = "standard"
    resumable = True
    # Top-1 Lanczos costs 10-20 HVPs, each 2-3 training steps: every 500 steps is about 10% of training on
    # the zoo's tiny GPT. Edge-of-stability studies probe far more often (every=10 in the example).
    default_every = 500
    metrics = ("sharpness", "stability_threshold", "sharpness_ratio", "adam_sharpness", "adam_threshold",
               "adam_sharpness_ratio", "trace_ratio", "sharpness_probe_step")
    #: with ``trace="auto"`` it reuses hessian_trace's estimate of the step, so it runs after it.
    after: ClassVar[tuple[str, ...]] = ("hessian_trace",)

    def __init__(self, every: int | None = None, start: int = 0, *, params: Any = None, lr: float | None = None,
                 trace: bool | str = "auto", trace_matvecs: int = 60, tol: float = 1e-3, max_matvecs: int | None = 100,
                 max_seconds: float | None = None, resume: bool = True, warm_start: bool = True,
                 hysteresis: float = 0.1, preconditioner: str = "next_step", seed: int = 0,
                 keep_basis: bool = True) -> None:
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
        self.resume = bool(resume)
        self.warm_start = bool(warm_start)
        self.hysteresis = float(hysteresis)
        self.keep_basis = bool(keep_basis)
        self.basis: BasisWorkspace | None = None  # this probe's: ctx.basis_workspace when keep_basis
        #: previous probe's top vector per (block, "raw" | "adam"): the next probe's warm start.
        self.vectors: dict[Any, Tensor] = {}
        #: a probe stopped by its per-call limit, continued by the next call (``resume``).
        self.unfinished: _Probe | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "lr": self.lr, "trace": self.trace, "trace_matvecs": self.trace_matvecs,
                "tol": self.tol, "max_matvecs": self.max_matvecs, "max_seconds": self.max_seconds,
                "resume": self.resume, "warm_start": self.warm_start, "hysteresis": self.hysteresis,
                "adam_preconditioner": self.preconditioner, "keep_basis": self.keep_basis}

    # --- the searches ----------------------------------------------------------------------------------
    def _search(self, label: str, op: Any, vector_key: tuple[str, str]) -> _Search:
        """A top-1 search of ``op``, warm-started, not run yet (no product)."""
        from diagnostics.linalg import LanczosRun

        dim = int(op.shape[0])
        if dim < 2:
            raise ConfigError(f"sharpness: block has {dim} parameter; Lanczos needs at least 2")
        search = _Search(label, FiniteChecked(op), vector_key)
        if self.resume:
            v0 = self._warm(vector_key, dim)
            search.run = LanczosRun(search.op, k=1, which="LA", tol=self.tol, v0=v0, seed=self.seed,
                                    workspace=self.basis)
        return search

    def _warm(self, vector_key: tuple[str, str], dim: int) -> Tensor | None:
        v0 = self.vectors.get(vector_key) if self.warm_start else None
        return v0 if v0 is not None and v0.shape[0] == dim else None

    def _advance(self, search: _Search, seconds: float | None) -> str | None:
        """Run ``search`` until it ends or ``seconds`` / ``max_matvecs`` stop this call: None when it ended
        or paused (``search.done`` says which), else why it failed. Cost: the products it runs."""
        from diagnostics.linalg import lanczos

        if search.run is None:  # resume=False: the whole run now, stopped for good by its budget
            dim = int(search.op.shape[0])
            res, why = run_guarded(lambda: lanczos(
                search.op, k=1, which="LA", tol=self.tol, v0=self._warm(search.vector_key, dim), seed=self.seed,
                max_matvecs=self.max_matvecs, max_seconds=self.max_seconds, workspace=self.basis))
        else:
            res, why = run_guarded(lambda: search.run.advance(self.max_matvecs, seconds))
            if why is None and res is None:
                return None
            search.close()
        if res is None or not math.isfinite(float(res.eigenvalues[0])):
            self.vectors.pop(search.vector_key, None)
            return why or "Lanczos returned a non-finite eigenvalue"
        self.vectors[search.vector_key] = res.eigenvectors[:, 0].detach()
        search.value, search.converged = float(res.eigenvalues[0]), res.all_converged
        return None

    # --- a probe's first call: what the step's optimizer says ---------------------------------------
    def _begin(self, ctx: StepContext) -> tuple[_Probe, str | None, int]:
        """The probe of this step, its searches not run yet: ``(probe, failure reason, products spent)``;
        the products are those of ``trace_ratio`` (Hutch++ when ``trace=True`` finds no shared estimate)."""
        lr = self.lr if self.lr is not None else ctx.lr
        opt = ctx.optimizer
        probe = _Probe(ctx.step, optimizer_family(opt))
        spent = 0
        for key, op in self.operators(ctx):
            block = _Block(key, op)
            probe.blocks.append(block)
            block.searches.append(self._search(key, op, (key, "raw")))
            if lr is None:
                probe.reasons.append("no learning rate (no optimizer and no lr= option): thresholds not recorded")
                continue
            if probe.family == "unsupported":
                probe.reasons.append(unsupported_reason(opt))
                continue
            if probe.family == "sgd":
                thr, wd, why = sgd_rule(opt, lr)
                if thr is None:
                    probe.reasons.append(str(why))
                    continue
                block.sgd = (thr, wd)
                sel = self.block_params(key)
                shared = ctx.has_trace("hessian", sel, num_matvecs=self.trace_matvecs, seed=self.seed)
                if self.trace is True or (self.trace == "auto" and shared):
                    out, why = run_guarded(lambda sel=sel: ctx.trace(
                        "hessian", sel, num_matvecs=self.trace_matvecs, seed=self.seed))
                    if out is None:
                        return probe, f"{key} trace: {why}", spent
                    est, used = out
                    spent += used
                    # Recorded, but no event: the trace criterion is about minima, and early in training
                    # Tr(H) lr / 2 is routinely above 1 without anything going wrong.
                    block.trace_ratio = float(est.mean) * lr / 2.0
                elif self.trace == "auto" and ctx.due is not None and "hessian_trace" in ctx.due:
                    # Its run was cut into calls: it shares this step's estimate at the call it ends, where
                    # the budget runs this diagnostic too (_late_traces).
                    block.trace_wanted = (sel, lr)
                continue
            params = dict(ctx.model.named_parameters())
            names = list(op.param_names)
            grads = None
            if self.preconditioner == "next_step":
                grads = {n: g for n, g in ctx.grads().items() if n in params}
                if not grads:
                    grads = None
                    probe.reasons.append("no gradients at this step: P from the previous step's v_hat")
            s, beta1, missing = adam_preconditioner(opt, params, names, lr, grads=grads)
            if missing is not None:
                probe.reasons.append(missing)
                continue
            probe.preconditioner = "next_step" if grads is not None else "state"
            probe.settling = adam_settling(opt, params, names, coming=grads is not None)
            wd = adam_weight_decay(opt, params, names)
            target = Preconditioned(op, s.to(device=op.device), wd if wd is not None else torch.zeros_like(s))
            block.adam_threshold = (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
            block.searches.append(self._search(f"{key} preconditioned", target, (key, "adam")))
        return probe, None, spent

    # --- every call ----------------------------------------------------------------------------------
    def compute(self, ctx: StepContext) -> Output:
        self.basis = ctx.basis_workspace if self.keep_basis else None
        probe, self.unfinished = self.unfinished, None
        spent = 0
        if probe is None:
            probe, why, spent = self._begin(ctx)
            if why is not None:
                probe.close()
                return failed(why, spent)
        self._late_traces(ctx, probe)
        cut = ctx.call_seconds(self.name) if self.resume else None
        clock = CallTime(cut)
        for search in probe.searches():
            if search.done:
                continue
            if clock.spent():
                return self._pause(ctx, probe, search, spent, f"the budget's {cut:.3g} s per call")
            limits = [x for x in (self.max_seconds, clock.left()) if x is not None]
            before = search.op.num_matvecs
            why = self._advance(search, min(limits) if limits else None)
            used = search.op.num_matvecs - before
            spent += used
            probe.products += used
            clock.advanced = True
            if why is not None:
                probe.close()
                return failed(f"{search.label}: {why}", spent)
            if not search.done:
                limit = ("max_matvecs" if self.max_matvecs is not None and used >= self.max_matvecs
                         else "max_seconds" if self.max_seconds is not None and (cut is None or self.max_seconds <= cut)
                         else f"the budget's {cut:.3g} s per call")
                return self._pause(ctx, probe, search, spent, limit)
        return self._finish(ctx, probe, spent)

    def _late_traces(self, ctx: StepContext, probe: _Probe) -> None:
        """Take the trace of the probe's step from a ``hessian_trace`` run cut into calls that ended in this
        call (``ctx.shared_trace``), for the blocks still waiting for it. Cost: none."""
        for block in probe.blocks:
            if block.trace_wanted is None:
                continue
            sel, lr = block.trace_wanted
            est = ctx.shared_trace("hessian", sel, num_matvecs=self.trace_matvecs, seed=self.seed, step=probe.step)
            if est is not None and math.isfinite(float(est.mean)):
                block.trace_ratio, block.trace_wanted = float(est.mean) * lr / 2.0, None

    def _pause(self, ctx: StepContext, probe: _Probe, search: _Search, spent: int, limit: str) -> Output:
        """Keep ``probe`` for the next call: a ``continues`` status and no numbers (an interim value plotted
        beside the result would read as a change of curvature). Cost: the first pause copies the parameters."""
        probe.freeze()
        self.unfinished = probe
        done = sum(s.done for s in probe.searches())
        return Output(records=[], status="continues", num_matvecs=spent,
                      reason=f"{search.label}: stopped by {limit}; the probe of step {probe.step} continues at the "
                             f"next call ({probe.products} products so far, {done} of {len(probe.searches())} "
                             "eigenvalues found)",
                      settings={"optimizer_family": probe.family, "probe_step": probe.step})

    def _finish(self, ctx: StepContext, probe: _Probe, spent: int) -> Output:
        """The records of a probe whose searches all ended, at the step it measured."""
        records: list[Record] = []
        events: list[Event] = []
        statuses: list[str] = []
        reasons = list(probe.reasons)
        for block in probe.blocks:
            key = block.key
            raw = block.searches[0]
            records.append(Record("sharpness", raw.value, key=key))
            statuses.append("ok" if raw.converged else "not_converged")
            if not raw.converged:
                reasons.append(f"{key}: lambda_max not converged within the budget")
            if block.sgd is not None:
                thr, wd = block.sgd
                ratio = (raw.value + wd) / thr
                records += [Record("stability_threshold", thr, key=key), Record("sharpness_ratio", ratio, key=key)]
                events += self._crossing(ctx, probe.step, "sharpness_ratio", key, ratio)
                if block.trace_ratio is not None:
                    records.append(Record("trace_ratio", block.trace_ratio, key=key))
            if block.adam_threshold is not None:
                adam = block.searches[1]
                ratio = adam.value / block.adam_threshold
                records += [Record("adam_sharpness", adam.value, key=key),
                            Record("adam_threshold", block.adam_threshold, key=key),
                            Record("adam_sharpness_ratio", ratio, key=key)]
                if probe.settling is None:
                    events += self._crossing(ctx, probe.step, "adam_sharpness_ratio", key, ratio)
                else:
                    reasons.append(probe.settling)
                if not adam.converged:
                    statuses.append("not_converged")
                    reasons.append(f"{key}: preconditioned lambda_max not converged within the budget")
            if probe.step != ctx.step:
                records.append(Record("sharpness_probe_step", float(probe.step), key=key))
        misuse = probe_mode_misuse(ctx) if any(r.metric in _RATIOS for r in records) else []
        if misuse:
            events += misuse
            reasons.append("ratio of the eval-mode curvature, not the train-mode loss's (misuse: probe_mode)")
        return Output(records=records, events=events, status=worst_status(statuses), num_matvecs=spent,
                      reason="; ".join(dict.fromkeys(reasons)) or None,
                      settings={"optimizer_family": probe.family, "adam_preconditioner": probe.preconditioner,
                                "probe_step": probe.step, "num_matvecs_probe": probe.products})

    def _crossing(self, ctx: StepContext, measured: int, metric: str, key: str, ratio: float) -> list[Event]:
        """An ``edge_of_stability`` event when ``ratio`` crosses 1 upwards or falls back below
        ``1 - hysteresis`` (the side is kept in ``self.state``), else []."""
        sides = self.state.setdefault("side", {})
        sid = f"{metric}/{key}"
        above = sides.get(sid, "below") == "above"
        at = f"step {ctx.step}" if measured == ctx.step else f"step {measured} (a probe that ended at step {ctx.step})"
        if not above and ratio >= 1.0:
            sides[sid] = "above"
            return [Event("edge_of_stability", f"{metric} crossed 1 ({ratio:.3f}) at {at}: curvature "
                          "reached the optimizer's stability threshold", severity="warning", metric=metric, key=key,
                          data={"ratio": ratio, "direction": "up", "probe_step": measured})]
        if above and ratio < 1.0 - self.hysteresis:
            sides[sid] = "below"
            return [Event("edge_of_stability", f"{metric} fell back below 1 ({ratio:.3f}) at {at}",
                          severity="info", metric=metric, key=key,
                          data={"ratio": ratio, "direction": "down", "probe_step": measured})]
        return []
