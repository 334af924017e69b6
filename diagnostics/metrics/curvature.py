"""Curvature in the loop: the top of the Hessian (or GGN) spectrum, its density and its trace.

Three diagnostics, each on its own schedule and all on the run's fixed probe data (``ctx.probe_data``),
optionally per parameter block (:mod:`diagnostics.metrics.curvature_base`):

* ``hessian_top``: top-k eigenpairs by Lanczos (largest *algebraic*), with residuals and convergence
  flags, warm-started from the previous probe's eigenvectors; bottom-1 on request.
* ``hessian_density``: stochastic Lanczos quadrature nodes and weights (the report re-smooths them).
* ``hessian_trace``: Hutch++ with its standard error.

Each has a twin on the generalised Gauss-Newton matrix, registered as the variants ``ggn_top`` /
``ggn_density`` / ``ggn_trace`` (selected by name, in no preset: the GGN needs a loss with ``forward`` and
``criterion``), writing ``ggn_*`` metric IDs; ``HessianTop(kind="ggn")`` builds the twin.

Sharing with other diagnostics. ``hessian_top`` publishes each block's eigenspace of the step with
``ctx.publish_eigenspace``; ``grad_subspace`` reads it with ``ctx.top_eigenspace`` (it runs after
``hessian_top``) and never recomputes it. ``hessian_trace``'s estimate is ``ctx.trace``, which
``sharpness`` reuses.

Failures. A product that is not finite stops the estimate: the output is ``failed`` with the reason and
no numbers. A compute budget (``max_matvecs`` / ``max_seconds``) that stops Lanczos early gives
``not_converged`` with the (flagged) numbers found so far; ``hessian_top`` then continues the stopped run
at its next probe, on the operator frozen at the step the run began (``resume``). Definitions:
docs/metrics.md, "Hessian spectra".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from diagnostics.errors import ConfigError
from diagnostics.linalg.finite import FiniteChecked, NonFiniteProductError
from diagnostics.linalg.lanczos_basis import BasisWorkspace
from diagnostics.metrics.base import Output
from diagnostics.metrics.curvature_base import (
    BlockRuns,
    CurvatureDiagnostic,
    Eigenspace,
    ProbeInCalls,
    advance_blocks,
    check_budget,
    check_max_memory,
    failed,
    parse_blocks,
    run_guarded,
    worst_status,
)
from diagnostics.metrics.registry import register
from diagnostics.store.records import Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.linalg import EigenResult
    from diagnostics.metrics.context import StepContext

__all__ = [
    "Eigenspace",
    "GGNDensity",
    "GGNTop",
    "GGNTrace",
    "HessianDensity",
    "HessianTop",
    "HessianTrace",
    "NonFiniteProductError",
    "parse_blocks",
]


class _HessianOrGGN(CurvatureDiagnostic):
    """A ``hessian_*`` diagnostic whose GGN twin is registered under its own ``ggn_*`` name; ``kind="ggn"``
    given to the Hessian class builds the twin, so that the name in the status table is a registry key."""

    curvature_kind: ClassVar[str | None] = "hessian"
    _ggn_twin: ClassVar[type[_HessianOrGGN] | None] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> _HessianOrGGN:
        if kwargs.get("kind") == "ggn" and cls.curvature_kind == "hessian" and cls._ggn_twin is not None:
            cls = cls._ggn_twin
        return super().__new__(cls)


# --- hessian_top -----------------------------------------------------------------------------------------
class _UnfinishedRun:
    """A top run stopped by a probe's budget: the Lanczos state, its (frozen) operator and its step."""

    def __init__(self, lanczos: Any, op: FiniteChecked, raw: Any, step: int, k: int) -> None:
        self.lanczos, self.op, self.raw, self.step, self.k = lanczos, op, raw, step, k

    def close(self) -> None:
        self.lanczos.close()


@register
class HessianTop(_HessianOrGGN):
    """Top-k eigenvalues of the loss Hessian (or GGN) on the probe data, by warm-started Lanczos.

    Records (prefix ``hessian_`` or ``ggn_``; key = block, index i = i-th largest):
    ``eigenvalue``, ``residual`` (``||H y - theta y||``), ``converged`` (1/0, residual <= tol |theta|), and
    with ``bottom=True`` ``bottom_eigenvalue`` (the smallest algebraic eigenvalue: negative curvature).

    The eigenvectors stay in this diagnostic (``self.vectors``, never in the store; a resumed run starts
    cold) and are the block start of the next probe. That saves products when the top-k space moves little
    between probes (tests: a 0.01% parameter change halves them); on the zoo models trained by AdamW the
    top-10 space rotates within a few steps and the saving is small (benchmarks/RESULTS.md, "Curvature in the loop").
    Each probe's eigenspace is shared with ``ctx.publish_eigenspace`` (``grad_subspace`` reads it).

    Args:
        every, start: schedule (default every 1000 steps).
        k: number of eigenpairs; default the Monitor's ``num_classes`` (about C outliers for C classes,
            Papyan 2019) else 10. A k that is not below a block's dimension is a ConfigError when given,
            and capped when defaulted.
        kind: "ggn" builds the Gauss-Newton twin :class:`GGNTop`.
        params: blocks (see :mod:`diagnostics.metrics.curvature_base`).
        bottom: also estimate the smallest eigenvalue (a second, separately warm-started Lanczos run).
        tol: relative residual tolerance of Lanczos.
        max_matvecs, max_seconds: budget per probe and block (the top run and, with ``bottom``, the
            bottom run together). A probe that reaches it has the status ``continues`` and stores no
            numbers until the run ends (with ``resume``), or is ``not_converged`` with the pairs found so
            far, flagged (without).
        resume: a top run stopped by the budget continues at the next probe where it stopped: same
            Krylov basis, same operator, frozen at the parameters of the step the run began
            (:meth:`~diagnostics.curvature.base.CurvatureOperator.freeze`), so a sequence of capped probes
            ends with the eigenpairs an uncapped probe at that step would give. The ended run's records
            carry ``hessian_probe_step`` (the step it describes) when it spanned probes. Between probes the
            run holds its basis (at most 2 GiB, see :func:`~diagnostics.linalg.lanczos`), a copy of the
            parameters and the operator's linearisation. Under the Monitor's budget each probe is also cut
            at ``ctx.probe_seconds`` (the budget's per-call time), and an unfinished run continues at
            every step until it ends. False: each probe starts afresh from the previous probe's eigenvectors, and
            capped probes need not converge (``benchmarks/capped_probes.py``).
        warm_start: start from the previous probe's eigenvectors.
        seed: seed of the cold start.
        keep_basis: run Lanczos in the basis memory the Monitor keeps between probes
            (``ctx.basis_workspace``): a CPU probe then does not map and zero a fresh basis each time.

    Cost: per block, k plus a few HVPs per eigenvalue: 30-80 for k = 10 on the zoo models, fewer once
    outliers separate from the bulk (each HVP about 2-3 training steps on the probe data), plus
    ``O(P * steps)`` work in the operator's dtype for reorthogonalisation.
    """

    name = "hessian_top"
    preset = "standard"
    resumable = True
    # A top-10 probe costs 30-80 HVPs, each 2-3 training steps on one probe batch: every 1000 steps keeps
    # the amortised cost near 10% of training on the zoo's tiny GPT (benchmarks/RESULTS.md, "Curvature in the loop").
    default_every = 1000
    _suffixes = ("eigenvalue", "residual", "converged", "bottom_eigenvalue", "probe_step")
    metrics: ClassVar[tuple[str, ...]] = tuple("hessian_" + s for s in _suffixes)

    def __init__(self, every: int | None = None, start: int = 0, *, k: int | None = None, kind: str | None = None,
                 params: Any = None, bottom: bool = False, tol: float = 1e-3, max_matvecs: int | None = 300,
                 max_seconds: float | None = None, resume: bool = True, warm_start: bool = True,
                 seed: int = 0, keep_basis: bool = True) -> None:
        super().__init__(every, start, kind=kind, params=params, seed=seed)
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ConfigError(f"{self.name}: k must be a positive int or None (number of classes, else 10), got {k!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ConfigError(f"{self.name}: tol must be positive, got {tol!r}")
        check_budget(max_matvecs, max_seconds, self.name)
        self.k = k
        self.bottom = bool(bottom)
        self.tol = float(tol)
        self.max_matvecs = max_matvecs
        self.max_seconds = max_seconds
        self.warm_start = bool(warm_start)
        self.resume = bool(resume)
        self.keep_basis = bool(keep_basis)
        self.basis: BasisWorkspace | None = None  # this probe's: ctx.basis_workspace when keep_basis
        if not self.bottom:
            self.metrics = self.metrics[:3] + self.metrics[4:]
        #: previous probe's eigenvectors per block (warm start); bottom vectors under (block, "bottom").
        self.vectors: dict[Any, Tensor] = {}
        #: ``num_matvecs`` of the last probe per block (for benchmarks and tests).
        self.last_matvecs: dict[str, int] = {}
        #: top runs stopped by the budget, per block, continued by the next probe (``resume``).
        self.unfinished: dict[str, _UnfinishedRun] = {}

    @property
    def unfinished_run(self) -> bool:
        return bool(self.unfinished)

    def drop_unfinished(self) -> None:
        for run in self.unfinished.values():
            run.close()
        self.unfinished.clear()

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "k": self.k, "bottom": self.bottom, "tol": self.tol,
                "max_matvecs": self.max_matvecs, "max_seconds": self.max_seconds, "resume": self.resume,
                "warm_start": self.warm_start, "keep_basis": self.keep_basis}

    def _k_for(self, ctx: StepContext, dim: int) -> int:
        if self.k is not None:
            if self.k >= dim:
                raise ConfigError(f"{self.name}: k={self.k} must be smaller than the block's dimension {dim}; lower k")
            return self.k
        k = ctx.num_classes if ctx.num_classes else 10
        return max(1, min(int(k), dim - 1))

    def _warm(self, key: Any, dim: int) -> Tensor | None:
        v = self.vectors.get(key) if self.warm_start else None
        return v if v is not None and v.shape[0] == dim else None

    def _top_run(self, ctx: StepContext, key: str, raw: Any, dim: int, k: int
                 ) -> tuple[EigenResult | None, str | None, int, int, bool]:
        """This probe's top run of block ``key``: ``(result, or with ``paused`` the pairs found so far;
        the failure reason; products spent by this probe; the step whose operator it is; paused)``.

        Cost: up to the per-probe budget of products; with ``resume``, the first pause of a run copies the
        parameters and buffers (:meth:`~diagnostics.curvature.base.CurvatureOperator.freeze`).
        """
        from diagnostics.linalg import LanczosRun, lanczos

        if not self.resume:
            op = FiniteChecked(raw)
            res, why = run_guarded(lambda: lanczos(
                op, k=k, which="LA", tol=self.tol, v0=self._warm(key, dim), seed=self.seed,
                max_matvecs=self.max_matvecs, max_seconds=self.max_seconds, workspace=self.basis))
            return res, why, op.num_matvecs, ctx.step, False
        run = self.unfinished.pop(key, None)
        if run is not None and run.k != k:  # the number of classes changed: the old run answers another question
            run.close()
            run = None
        if run is None:
            op = FiniteChecked(raw)
            lz, why = run_guarded(lambda: LanczosRun(op, k=k, which="LA", tol=self.tol, v0=self._warm(key, dim),
                                                     seed=self.seed, workspace=self.basis))
            if lz is None:
                return None, why, op.num_matvecs, ctx.step, False
            run = _UnfinishedRun(lz, op, raw, ctx.step, k)
        before = run.op.num_matvecs
        limits = [x for x in (self.max_seconds, ctx.call_seconds(self.name)) if x is not None]
        seconds = min(limits) if limits else None
        res, why = run_guarded(lambda: run.lanczos.advance(self.max_matvecs, seconds))
        used = run.op.num_matvecs - before
        if why is not None:
            run.close()
            return None, why, used, run.step, False
        if res is not None:
            return res, None, used, run.step, False
        # Stopped by the budget: the operator keeps this step's parameters for the products still to come.
        if not run.raw.frozen:
            run.raw.freeze()
        self.unfinished[key] = run
        return run.lanczos.interim(), None, used, run.step, True

    def compute(self, ctx: StepContext) -> Output:
        from diagnostics.linalg import lanczos

        self.basis = ctx.basis_workspace if self.keep_basis else None
        records: list[Record] = []
        statuses: list[str] = []
        reasons: list[str] = []
        total = 0
        details: dict[str, Any] = {}
        p = self.prefix
        for key, raw in self.operators(ctx):
            dim = int(raw.shape[0])
            k = self._k_for(ctx, dim)
            res, why, used, began, paused = self._top_run(ctx, key, raw, dim, k)
            total += used
            found = torch.isfinite(res.eigenvalues) if res is not None else None
            budget_stop = res is not None and (paused or res.settings.get("stop") in ("max_matvecs", "max_seconds"))
            if res is None or not (bool(found.all()) or budget_stop):
                # A failed block stores nothing and forgets its warm start (the vectors may be garbage).
                self.vectors.pop(key, None)
                statuses.append("failed")
                reasons.append(f"{key}: {why or 'Lanczos returned non-finite eigenvalues'}")
                continue
            self.last_matvecs[key] = res.num_matvecs
            if paused:
                # Nothing stored yet: the pairs found so far would be superseded by the run's result, and
                # plotted beside it they would read as a curvature that changed.
                statuses.append("continues")
                cut = ctx.call_seconds(self.name)
                limit = ("max_matvecs" if self.max_matvecs is not None and used >= self.max_matvecs
                         else "max_seconds" if self.max_seconds is not None
                         and (cut is None or self.max_seconds <= cut)
                         else f"the budget's {cut:.3g} s per call")
                reasons.append(f"{key}: stopped by {limit} after {used} products; the run of step {began} "
                               f"continues at the next probe ({res.num_matvecs} products in all, "
                               f"{int(found.sum())} of {k} eigenvalues found so far)")
                continue
            if not bool(found.all()):
                # The budget ran out first: store the pairs found so far, flagged.
                statuses.append("not_converged")
                reasons.append(f"{key}: stopped by {res.settings.get('stop')} after {res.num_matvecs} products, "
                               f"{int(found.sum())} of {k} eigenvalues found")
                for i in range(k):
                    if bool(found[i]):
                        records.append(Record(p + "eigenvalue", float(res.eigenvalues[i]), key=key, index=i))
                        records.append(Record(p + "residual", float(res.residuals[i]), key=key, index=i))
                        records.append(Record(p + "converged", 0.0, key=key, index=i))
                continue
            self.vectors[key] = res.eigenvectors.detach()
            names = tuple(raw.param_names)
            numels = tuple(raw.param_slices[n].stop - raw.param_slices[n].start for n in names)
            ctx.publish_eigenspace(Eigenspace(self.kind, key, began, res.eigenvalues.clone(),
                                              res.eigenvectors.detach(), res.converged.clone(), names, numels))
            for i in range(k):
                records.append(Record(p + "eigenvalue", float(res.eigenvalues[i]), key=key, index=i))
                records.append(Record(p + "residual", float(res.residuals[i]), key=key, index=i))
                records.append(Record(p + "converged", float(bool(res.converged[i])), key=key, index=i))
            if began != ctx.step:
                records.append(Record(p + "probe_step", float(began), key=key))
            ok = res.all_converged
            details[key] = {"num_matvecs": res.num_matvecs, "stop": res.settings.get("stop"),
                            "warm_start": res.settings.get("warm_start"), "probe_step": began}
            if self.bottom:
                # The bottom run spends what the top run left of the block's budget.
                left_mv = None if self.max_matvecs is None else self.max_matvecs - res.num_matvecs
                left_s = None if self.max_seconds is None else self.max_seconds - res.seconds
                if (left_mv is not None and left_mv < 1) or (left_s is not None and left_s <= 0):
                    statuses.append("not_converged")
                    reasons.append(f"{key}: no budget left for the bottom eigenvalue")
                    continue
                bop = FiniteChecked(raw)
                bres, bwhy = run_guarded(lambda bop=bop, key=key, dim=dim, left_mv=left_mv, left_s=left_s: lanczos(
                    bop, k=1, which="SA", tol=self.tol, v0=self._warm((key, "bottom"), dim), seed=self.seed + 1,
                    max_matvecs=left_mv, max_seconds=left_s, workspace=self.basis))
                total += bop.num_matvecs
                if bres is None or not math.isfinite(float(bres.eigenvalues[0])):
                    self.vectors.pop((key, "bottom"), None)
                    statuses.append("failed")
                    reasons.append(f"{key} bottom: {bwhy or 'non-finite eigenvalue'}")
                    records = [r for r in records if r.key != key]
                    continue
                self.vectors[(key, "bottom")] = bres.eigenvectors.detach()
                records.append(Record(p + "bottom_eigenvalue", float(bres.eigenvalues[0]), key=key))
                ok = ok and bres.all_converged
            statuses.append("ok" if ok else "not_converged")
            if not ok:
                reasons.append(f"{key}: stopped by {res.settings.get('stop')} before all pairs met tol={self.tol}")
        status = worst_status(statuses)
        if status == "failed":
            # A failed estimate is stored as failed, never as a number: drop the other blocks' values too.
            return failed("; ".join(reasons), total, details)
        return Output(records=records, status=status, reason="; ".join(reasons) or None, num_matvecs=total,
                      settings=details)


# --- hessian_density ----------------------------------------------------------------------------------------
_QUADRATURE_SETTINGS = ("probe_group", "basis_vectors", "reorthogonalization", "basis_dtype", "basis_bytes",
                        "within_memory_budget")


class _DensityProbe(BlockRuns):
    """A density probe that may span calls, with the Lanczos steps per probe it runs."""

    def __init__(self, step: int, steps: int, truncated: bool) -> None:
        super().__init__(step)
        self.steps, self.truncated = steps, truncated


@register
class HessianDensity(ProbeInCalls, _HessianOrGGN):
    """Spectral density of the Hessian (or GGN) by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017).

    Records per block: ``density_node`` and ``density_weight`` with ``index = probe * m + j`` (m Lanczos
    steps per probe; each probe's weights sum to 1), and ``density_probe_step`` when the probe spanned
    several calls. The report smooths them with a Gaussian kernel, so the raw quadrature is kept. Read: a
    bulk near zero plus isolated outliers (about one per class) is the usual picture; mass at negative
    values means the model sits at a saddle or in a non-convex region.

    Args:
        num_probes: Rademacher probes (independent Lanczos runs, advanced together).
        steps: Lanczos steps per probe (m).
        max_matvecs: budget; when ``num_probes * steps`` exceeds it, ``steps`` is reduced to fit and the
            probe is stored as ``not_converged`` (a coarser quadrature).
        resume: under the Monitor's overhead budget a call stops after the batched product that passes
            ``ctx.probe_seconds`` and the next call continues the same runs on the operator frozen at
            the parameters of the step the probe began (:class:`~diagnostics.linalg.DensityRun`); the
            calls in between store only the status ``continues``. False: each probe runs whole.
        max_memory: bytes for the Lanczos bases and their workspace per block (default: 2 GiB, or half
            of a CUDA device's free memory when less). Probes whose bases do not fit together run in
            groups; when one probe's ``steps`` vectors do not fit it keeps the latest ones that do
            (:func:`~diagnostics.linalg.spectral_density`); the output's settings say which.
        keep_basis: as ``hessian_top``'s (the Monitor's kept basis memory, when the bases fit in it).

    Cost: ``num_probes * steps`` HVPs in ``steps`` batched products per probe group; memory at most
    ``max_memory`` for the bases (in the model's dtype), held between the calls of a probe spread over
    calls (with a copy of the parameters).
    """

    name = "hessian_density"
    preset = "full"
    resumable = True
    default_every = 2000
    _suffixes = ("density_node", "density_weight", "density_probe_step")
    metrics: ClassVar[tuple[str, ...]] = tuple("hessian_" + s for s in _suffixes)
    contract_options: ClassVar[dict[str, Any]] = {"num_probes": 2, "steps": 8}

    def __init__(self, every: int | None = None, start: int = 0, *, kind: str | None = None, params: Any = None,
                 num_probes: int = 4, steps: int = 32, max_matvecs: int | None = None, resume: bool = True,
                 max_memory: int | None = None, seed: int = 0, keep_basis: bool = True) -> None:
        super().__init__(every, start, kind=kind, params=params, seed=seed)
        check_max_memory(max_memory, self.name)
        if int(num_probes) < 1 or int(steps) < 2:
            raise ConfigError(f"{self.name}: need num_probes >= 1 and steps >= 2, got {num_probes} and {steps}")
        check_budget(max_matvecs, None, self.name)
        self.num_probes = int(num_probes)
        self.steps = int(steps)
        self.max_matvecs = max_matvecs
        self.resume = bool(resume)
        self.max_memory, self.keep_basis = max_memory, bool(keep_basis)
        #: a probe stopped by the per-call time, continued by the next call (``resume``).
        self.unfinished: _DensityProbe | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "num_probes": self.num_probes, "steps": self.steps, "max_matvecs":
                self.max_matvecs, "resume": self.resume, "max_memory": self.max_memory, "keep_basis": self.keep_basis}

    def _begin(self, ctx: StepContext) -> _DensityProbe:
        steps, truncated = self.steps, False
        if self.max_matvecs is not None and self.num_probes * steps > self.max_matvecs:
            steps, truncated = max(1, self.max_matvecs // self.num_probes), True
        probe = _DensityProbe(ctx.step, steps, truncated)
        for key, raw in self.operators(ctx):
            probe.blocks[key] = [raw, FiniteChecked(raw), None]
        return probe

    def compute(self, ctx: StepContext) -> Output:
        from diagnostics.linalg import DensityRun

        probe, self.unfinished = self.unfinished, None
        if probe is None:
            probe = self._begin(ctx)

        def make_run(op: Any) -> DensityRun:
            return DensityRun(op, num_probes=self.num_probes, steps=probe.steps, seed=self.seed,
                              max_memory=self.max_memory, workspace=ctx.basis_workspace if self.keep_basis else None)

        def finite(sd: Any) -> bool:
            return bool(torch.isfinite(sd.nodes).all()) and bool(torch.isfinite(sd.weights).all())

        cut = ctx.call_seconds(self.name) if self.resume else None
        out, spent = advance_blocks(self, probe, cut, make_run, finite, "non-finite quadrature")
        return out if out is not None else self._finish(ctx, probe, spent)

    def _finish(self, ctx: StepContext, probe: _DensityProbe, spent: int) -> Output:
        records: list[Record] = []
        p = self.prefix
        for key, sd in probe.results.items():
            m = sd.nodes.shape[1]
            for i in range(sd.nodes.shape[0]):
                for j in range(m):
                    records.append(Record(p + "density_node", float(sd.nodes[i, j]), key=key, index=i * m + j))
                    records.append(Record(p + "density_weight", float(sd.weights[i, j]), key=key, index=i * m + j))
            if probe.step != ctx.step:
                records.append(Record(p + "density_probe_step", float(probe.step), key=key))
        settings: dict[str, Any] = {"probe_step": probe.step}
        # How memory shaped each block's quadrature (probe groups, kept vectors): one entry when all agree.
        shaped = {key: {k: sd.settings[k] for k in _QUADRATURE_SETTINGS} for key, sd in probe.results.items()}
        distinct = {tuple(v.items()) for v in shaped.values()}
        settings["quadrature"] = next(iter(shaped.values())) if len(distinct) == 1 else shaped
        if probe.truncated:
            return Output(records=records, status="not_converged", num_matvecs=spent, settings=settings,
                          reason=f"budget max_matvecs={self.max_matvecs} cut Lanczos to {probe.steps} steps per probe")
        return Output(records=records, num_matvecs=spent, settings=settings)


# --- hessian_trace -------------------------------------------------------------------------------------------
#: Probes per batched product of a trace probe cut into calls: small, so that one product fits a call.
SLICED_TRACE_BLOCK = 4


@register
class HessianTrace(ProbeInCalls, _HessianOrGGN):
    """Trace of the Hessian (or GGN) by Hutch++ (Meyer, Musco, Musco, Woodruff 2021), with standard error.

    Records per block: ``trace``, ``trace_stderr`` (of the Hutchinson part on the deflated residual) and,
    for a probe that spanned calls, ``trace_probe_step``. The same seed is used at every probe, so changes
    over steps are not probe noise; ``sharpness`` compares Tr(H) lr / 2 with 1 for SGD.

    Args:
        num_matvecs: products per block (a third sketch, a third on the sketch, a third residual probes).
        resume: under the Monitor's overhead budget a call stops after the batched product (of
            :data:`SLICED_TRACE_BLOCK` probes) that passes ``ctx.probe_seconds``, and the next call
            continues on the operator frozen at the parameters of the step the probe began
            (:class:`~diagnostics.linalg.TraceRun`); the calls in between store only the status
            ``continues``. False, or outside the budget's cut: the whole estimate in one call, shared
            with ``sharpness``'s trace ratio at that step.
        max_memory: bytes for the sketch, its basis and a block of probes per block (default 2 GiB, or
            half of a CUDA device's free memory when less; :func:`~diagnostics.linalg.hutchpp_trace`).

    Cost: exactly ``num_matvecs`` HVPs per block.
    """

    name = "hessian_trace"
    preset = "full"
    resumable = True
    default_every = 1000
    _suffixes = ("trace", "trace_stderr", "trace_probe_step")
    metrics: ClassVar[tuple[str, ...]] = tuple("hessian_" + s for s in _suffixes)
    contract_options: ClassVar[dict[str, Any]] = {"num_matvecs": 12}

    def __init__(self, every: int | None = None, start: int = 0, *, kind: str | None = None, params: Any = None,
                 num_matvecs: int = 60, resume: bool = True, max_memory: int | None = None, seed: int = 0) -> None:
        super().__init__(every, start, kind=kind, params=params, seed=seed)
        if not isinstance(num_matvecs, int) or num_matvecs < 6:
            raise ConfigError(f"{self.name}: num_matvecs must be an int >= 6, got {num_matvecs!r}")
        check_max_memory(max_memory, self.name)
        self.num_matvecs = num_matvecs
        self.resume = bool(resume)
        self.max_memory = max_memory
        #: a probe stopped by the per-call time, continued by the next call (``resume``).
        self.unfinished: BlockRuns | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "num_matvecs": self.num_matvecs, "method": "hutch++",
                "resume": self.resume, "max_memory": self.max_memory}

    def compute(self, ctx: StepContext) -> Output:
        from diagnostics.linalg import TraceRun

        cut = ctx.call_seconds(self.name) if self.resume else None
        probe, self.unfinished = self.unfinished, None
        if probe is None and cut is None:
            return self._whole(ctx)
        if probe is None:
            probe = BlockRuns(ctx.step)
            for key, raw in self.operators(ctx):
                probe.blocks[key] = [raw, FiniteChecked(raw), None]

        def make_run(op: Any) -> TraceRun:
            return TraceRun(op, num_matvecs=self.num_matvecs, seed=self.seed, block_size=SLICED_TRACE_BLOCK,
                            max_memory=self.max_memory)

        def finite(est: Any) -> bool:
            return math.isfinite(est.mean) and (math.isfinite(est.stderr) or math.isnan(est.stderr))

        out, spent = advance_blocks(self, probe, cut, make_run, finite, "non-finite trace estimate")
        if out is not None:
            return out
        records = self._records(probe.results)
        for key, est in probe.results.items():
            if probe.step != ctx.step:
                records.append(Record(self.prefix + "trace_probe_step", float(probe.step), key=key))
            # sharpness's trace ratio may use it: this step's, or that of the sharpness probe begun with it
            ctx.share_trace(self.kind, self.block_params(key), num_matvecs=self.num_matvecs, seed=self.seed,
                            estimate=est, step=probe.step)
        return Output(records=records, num_matvecs=spent, settings={"probe_step": probe.step})

    def _whole(self, ctx: StepContext) -> Output:
        """Every block's estimate in this call, through ``ctx.trace`` (shared with ``sharpness``)."""
        results: dict[str, Any] = {}
        total = 0
        for key in self.blocks:
            out, why = run_guarded(lambda key=key: ctx.trace(
                self.kind, self.block_params(key), num_matvecs=self.num_matvecs, seed=self.seed,
                max_memory=self.max_memory))
            if out is None:
                return failed(f"{key}: {why}", total)
            results[key], spent = out
            total += spent
        return Output(records=self._records(results), num_matvecs=total)

    def _records(self, results: dict[str, Any]) -> list[Record]:
        p = self.prefix
        return [r for key, est in results.items() for r in (Record(p + "trace", float(est.mean), key=key),)
                + ((Record(p + "trace_stderr", float(est.stderr), key=key),) if math.isfinite(est.stderr) else ())]


# --- the Gauss-Newton twins ----------------------------------------------------------------------------------
@register(variant_of="hessian_top")
class GGNTop(HessianTop):
    """``hessian_top`` on the generalised Gauss-Newton matrix (Schraudolph 2002): ``ggn_*`` metric IDs.

    The GGN is positive semi-definite for convex losses, so its spectrum has no negative outliers; the
    options and the cost are those of :class:`HessianTop` (a GGN product costs about as much as an HVP).
    """

    name = "ggn_top"
    curvature_kind = "ggn"
    metrics: ClassVar[tuple[str, ...]] = tuple("ggn_" + s for s in HessianTop._suffixes)


@register(variant_of="hessian_density")
class GGNDensity(HessianDensity):
    """``hessian_density`` on the generalised Gauss-Newton matrix: ``ggn_density_node/weight``."""

    name = "ggn_density"
    curvature_kind = "ggn"
    metrics: ClassVar[tuple[str, ...]] = tuple("ggn_" + s for s in HessianDensity._suffixes)


@register(variant_of="hessian_trace")
class GGNTrace(HessianTrace):
    """``hessian_trace`` on the generalised Gauss-Newton matrix: ``ggn_trace`` and ``ggn_trace_stderr``."""

    name = "ggn_trace"
    curvature_kind = "ggn"
    metrics: ClassVar[tuple[str, ...]] = tuple("ggn_" + s for s in HessianTrace._suffixes)


HessianTop._ggn_twin = GGNTop
HessianDensity._ggn_twin = GGNDensity
HessianTrace._ggn_twin = GGNTrace
