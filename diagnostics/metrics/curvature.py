"""Curvature in the loop: the top of the Hessian (or GGN) spectrum, its density and its trace.

Three diagnostics, each on its own schedule and all on the run's fixed probe data (``ctx.probe_data``),
optionally per parameter block:

* ``hessian_top``: top-k eigenpairs by Lanczos (largest *algebraic*), with residuals and convergence
  flags, warm-started from the previous probe's eigenvectors; bottom-1 on request.
* ``hessian_density``: stochastic Lanczos quadrature nodes and weights (the report re-smooths them).
* ``hessian_trace``: Hutch++ with its standard error.

``kind="ggn"`` measures the generalised Gauss-Newton matrix instead; the diagnostic is then named
``ggn_top`` / ``ggn_density`` / ``ggn_trace`` and writes ``ggn_*`` metric IDs.

Blocks (``params=``): ``None`` is the whole model (key ``"all"``); a mapping ``{block name: names or
globs}`` or a list of names/globs (each entry its own block, keyed by itself) gives one estimate per
block. Each block is the curvature of the mean loss with respect to those parameters, the others held
constant.

Sharing with other diagnostics. ``hessian_top`` publishes its latest eigenspaces on an
:class:`EigenspaceBoard` that it owns. The board is handed over through the step cache: any diagnostic
that wants the eigenvectors calls ``eigenspace_slot(ctx)`` (cache key :data:`EIGENSPACE_CACHE_KEY`); every
``hessian_top`` due at that step attaches its board to the slot, whether it runs before or after the
caller. A caller that keeps the slot reads it after the step's ``compute`` phase (for example in
``compute_after_update``) and can keep the board to read the *latest* eigenvectors at later steps where
``hessian_top`` is not due. Nothing is ever recomputed for the caller.

Failures. A product that is not finite stops the estimate: the output is ``failed`` with the reason and
no numbers. A compute budget (``max_matvecs`` / ``max_seconds``) that stops Lanczos early gives
``not_converged`` with the (flagged) numbers found so far.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from diagnostics.errors import ConfigError, LossError
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.registry import register
from diagnostics.store.records import Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

__all__ = [
    "EIGENSPACE_CACHE_KEY",
    "Eigenspace",
    "EigenspaceBoard",
    "EigenspaceSlot",
    "HessianTop",
    "HessianDensity",
    "HessianTrace",
    "NonFiniteProductError",
    "eigenspace_slot",
    "parse_blocks",
    "trace_cache_key",
]

#: ``ctx.cache`` key of the :class:`EigenspaceSlot` through which ``hessian_top`` shares its eigenvectors.
EIGENSPACE_CACHE_KEY = "hessian_top/eigenspace_slot"

KINDS = ("hessian", "ggn")

# Block spec as passed to ctx.curvature: None (all trainable parameters) or a tuple of names/globs.
BlockParams = tuple[str, ...] | None


# --- blocks ------------------------------------------------------------------------------------------
def parse_blocks(params: Any, owner: str) -> dict[str, BlockParams]:
    """Normalise a ``params=`` option into ``{block key: parameter selection}``.

    ``None`` -> ``{"all": None}``; a string -> one block keyed by the string; a list of strings -> one
    block per entry keyed by the entry; a mapping ``{name: str | list[str]}`` -> named blocks.

    Raises:
        ConfigError: empty selection, a block name that is not a string, or a value of the wrong type.
    """
    if params is None:
        return {"all": None}
    if isinstance(params, str):
        return {params: (params,)}
    if isinstance(params, Mapping):
        out: dict[str, BlockParams] = {}
        for name, sel in params.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{owner}: block names in params= must be non-empty strings, got {name!r}")
            if isinstance(sel, str):
                out[name] = (sel,)
            elif isinstance(sel, Sequence) and sel and all(isinstance(s, str) for s in sel):
                out[name] = tuple(sel)
            else:
                raise ConfigError(
                    f"{owner}: params[{name!r}] must be a parameter name/glob or a non-empty list of them, got {sel!r}"
                )
        if not out:
            raise ConfigError(f"{owner}: params= is an empty mapping; give at least one block or None for the whole model")
        return out
    if isinstance(params, Sequence) and all(isinstance(s, str) for s in params):
        if not params:
            raise ConfigError(f"{owner}: params= is an empty list; give names/globs or None for the whole model")
        return {s: (s,) for s in params}
    raise ConfigError(
        f"{owner}: params= must be None, a name/glob, a list of names/globs or a dict {{block: names}}, got {params!r}"
    )


def _check_kind(kind: str, owner: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"{owner}: kind must be 'hessian' or 'ggn', got {kind!r}")
    return kind


def _check_budget(max_matvecs: int | None, max_seconds: float | None, owner: str) -> None:
    if max_matvecs is not None and (not isinstance(max_matvecs, int) or isinstance(max_matvecs, bool) or max_matvecs < 1):
        raise ConfigError(f"{owner}: max_matvecs must be a positive int or None, got {max_matvecs!r}")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ConfigError(f"{owner}: max_seconds must be a positive number or None, got {max_seconds!r}")


# --- non-finite products -------------------------------------------------------------------------------
class NonFiniteProductError(FloatingPointError):
    """A curvature product (or the probe gradient) contained NaN or inf: the estimate is failed."""


class FiniteChecked:
    """A LinearOperator wrapper that raises :class:`NonFiniteProductError` on a non-finite product.

    Lanczos on a NaN product would either crash in ``eigh`` or return NaN "eigenvalues"; checking each
    product (one ``isfinite`` reduction, negligible next to an HVP) turns both into an honest failure.
    """

    def __init__(self, op: Any) -> None:
        self.op = op
        self.shape = op.shape
        self.dtype = op.dtype
        self.device = op.device
        self.num_matvecs = 0

    def __matmul__(self, V: Tensor) -> Tensor:
        out = self.op @ V
        self.num_matvecs += 1 if V.dim() == 1 else int(V.shape[1])
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteProductError(
                "non-finite curvature-vector product (NaN/inf in the loss, the parameters or their gradients "
                "on the probe data)"
            )
        return out


def failed(reason: str, num_matvecs: int | None = None, settings: dict[str, Any] | None = None) -> Output:
    """A failed Output: a reason, the cost spent, no numbers."""
    return Output(records=[], status="failed", reason=reason, num_matvecs=num_matvecs, settings=dict(settings or {}))


def run_guarded(fn: Any) -> tuple[Any, str | None]:
    """Call ``fn()``; a non-finite product or a non-finite probe loss becomes ``(None, reason)``."""
    try:
        return fn(), None
    except NonFiniteProductError as exc:
        return None, str(exc)
    except LossError as exc:  # the curvature operator checks the probe loss when it linearises a batch
        return None, f"probe loss is not usable: {exc}"


# --- eigenspace sharing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Eigenspace:
    """One probe's top eigenpairs of one block.

    Attributes:
        kind: "hessian" or "ggn".
        block: the block key ("all" or a block name).
        step: the training step of the probe.
        eigenvalues: float64 ``[k]``, descending.
        eigenvectors: ``[P, k]`` orthonormal columns (operator dtype, operator device).
        converged: bool ``[k]``.
        param_names: the parameters of the block, in flattening order.
        param_numels: their sizes, to flatten other ``{name: tensor}`` dicts in the same order.
    """

    kind: str
    block: str
    step: int
    eigenvalues: Tensor
    eigenvectors: Tensor
    converged: Tensor
    param_names: tuple[str, ...]
    param_numels: tuple[int, ...]

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``{name: tensor}`` -> flat ``[P]`` in this eigenspace's order (missing names are zeros)."""
        parts = []
        for n, numel in zip(self.param_names, self.param_numels):
            t = tensors.get(n)
            if t is None:
                parts.append(torch.zeros(numel, dtype=self.eigenvectors.dtype, device=self.eigenvectors.device))
            else:
                parts.append(t.detach().reshape(-1).to(dtype=self.eigenvectors.dtype, device=self.eigenvectors.device))
        return torch.cat(parts)


@dataclass
class EigenspaceBoard:
    """The latest (and previous) eigenspace per ``(kind, block)`` of one ``hessian_top`` instance."""

    latest: dict[tuple[str, str], Eigenspace] = field(default_factory=dict)
    previous: dict[tuple[str, str], Eigenspace] = field(default_factory=dict)

    def publish(self, space: Eigenspace) -> None:
        key = (space.kind, space.block)
        if key in self.latest and self.latest[key].step != space.step:
            self.previous[key] = self.latest[key]
        self.latest[key] = space


@dataclass
class EigenspaceSlot:
    """What :data:`EIGENSPACE_CACHE_KEY` holds at a step: the boards of the ``hessian_top`` instances due."""

    boards: list[EigenspaceBoard] = field(default_factory=list)

    def attach(self, board: EigenspaceBoard) -> None:
        if not any(b is board for b in self.boards):
            self.boards.append(board)


def eigenspace_slot(ctx: StepContext) -> EigenspaceSlot:
    """The step's :class:`EigenspaceSlot` (created on first use). Cost: none."""
    return ctx.cached(EIGENSPACE_CACHE_KEY, EigenspaceSlot)


def trace_cache_key(kind: str, block: str, num_matvecs: int, seed: int) -> tuple:
    """``ctx.cache`` key of a Hutch++ trace estimate, so that ``sharpness`` reuses ``hessian_trace``'s."""
    return ("trace", kind, block, int(num_matvecs), int(seed))


# --- shared base ---------------------------------------------------------------------------------------
class _CurvatureDiagnostic(Diagnostic):
    """Options common to the curvature diagnostics: kind, blocks, seed."""

    requires = frozenset({"curvature"})
    #: metric suffixes; the prefix is "hessian_" or "ggn_".
    _suffixes: ClassVar[tuple[str, ...]] = ()
    _base: ClassVar[str] = ""

    def __init__(self, every: int | None = None, start: int = 0, *, kind: str = "hessian", params: Any = None,
                 seed: int = 0) -> None:
        super().__init__(every=every, start=start)
        self.kind = _check_kind(kind, type(self).name)
        self.blocks = parse_blocks(params, type(self).name)
        self.seed = int(seed)
        self.prefix = "hessian_" if kind == "hessian" else "ggn_"
        if kind != "hessian":
            self.name = f"ggn_{self._base}"  # a separate diagnostic in the status table
        self.metrics = tuple(self.prefix + s for s in self._suffixes)

    def operators(self, ctx: StepContext) -> Iterator[tuple[str, Any]]:
        """``(block key, operator)`` per block; operators come from the step cache (built once per step)."""
        for key, sel in self.blocks.items():
            yield key, ctx.curvature(self.kind, None if sel is None else list(sel))

    def settings(self) -> dict[str, Any]:
        blocks = {k: (None if v is None else list(v)) for k, v in self.blocks.items()}
        return {**super().settings(), "kind": self.kind, "blocks": blocks, "seed": self.seed}


def _worst(statuses: list[str]) -> str:
    return "failed" if "failed" in statuses else "not_converged" if "not_converged" in statuses else "ok"


# --- hessian_top -----------------------------------------------------------------------------------------
@register
class HessianTop(_CurvatureDiagnostic):
    """Top-k eigenvalues of the loss Hessian (or GGN) on the probe data, by warm-started Lanczos.

    Records (prefix ``hessian_`` or ``ggn_``; key = block, index i = i-th largest):
    ``eigenvalue``, ``residual`` (``||H y - theta y||``), ``converged`` (1/0, residual <= tol |theta|), and
    with ``bottom=True`` ``bottom_eigenvalue`` (the smallest algebraic eigenvalue: negative curvature).

    The eigenvectors stay in this diagnostic (``self.vectors``, never in the store; a resumed run starts
    cold) and are the block start of the next probe. That saves products when the top-k space moves little
    between probes (tests: a 0.01% parameter change halves them); on the zoo models trained by AdamW the
    top-10 space rotates within a few steps and the saving is small (benchmarks/RESULTS.md, "Curvature in the loop").
    ``grad_subspace`` reads them through :data:`EIGENSPACE_CACHE_KEY`.

    Args:
        every, start: schedule (default every 1000 steps).
        k: number of eigenpairs; default the Monitor's ``num_classes`` (about C outliers for C classes,
            Papyan 2019) else 10. A k that is not below a block's dimension is a ConfigError when given,
            and capped when defaulted.
        kind: "hessian" or "ggn".
        params: blocks (see module docstring).
        bottom: also estimate the smallest eigenvalue (a second, separately warm-started Lanczos run).
        tol: relative residual tolerance of Lanczos.
        max_matvecs, max_seconds: budget per probe and block (the top run and, with ``bottom``, the
            bottom run together); Lanczos stops early and the probe is stored as ``not_converged`` with its
            flags.
        warm_start: start from the previous probe's eigenvectors.
        seed: seed of the cold start.

    Cost: per block, k plus a few HVPs per eigenvalue: 30-80 for k = 10 on the zoo models, fewer once
    outliers separate from the bulk (each HVP about 2-3 training steps on the probe data), plus
    ``O(P * steps)`` float64 work for reorthogonalisation.
    """

    name = "hessian_top"
    preset = "standard"
    # A top-10 probe costs 30-80 HVPs, each 2-3 training steps on one probe batch: every 1000 steps keeps
    # the amortised cost near 10% of training on the zoo's tiny GPT (benchmarks/RESULTS.md, "Curvature in the loop").
    default_every = 1000
    _base = "top"
    _suffixes = ("eigenvalue", "residual", "converged", "bottom_eigenvalue")
    metrics: ClassVar[tuple[str, ...]] = tuple("hessian_" + s for s in _suffixes)  # ggn_* when kind="ggn"

    def __init__(self, every: int | None = None, start: int = 0, *, k: int | None = None, kind: str = "hessian",
                 params: Any = None, bottom: bool = False, tol: float = 1e-3, max_matvecs: int | None = 300,
                 max_seconds: float | None = None, warm_start: bool = True, seed: int = 0) -> None:
        super().__init__(every, start, kind=kind, params=params, seed=seed)
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ConfigError(f"{self.name}: k must be a positive int or None (number of classes, else 10), got {k!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ConfigError(f"{self.name}: tol must be positive, got {tol!r}")
        _check_budget(max_matvecs, max_seconds, self.name)
        self.k = k
        self.bottom = bool(bottom)
        self.tol = float(tol)
        self.max_matvecs = max_matvecs
        self.max_seconds = max_seconds
        self.warm_start = bool(warm_start)
        if not self.bottom:
            self.metrics = self.metrics[:3]
        #: previous probe's eigenvectors per block (warm start); bottom vectors under (block, "bottom").
        self.vectors: dict[Any, Tensor] = {}
        self.board = EigenspaceBoard()
        #: ``num_matvecs`` of the last probe per block (for benchmarks and tests).
        self.last_matvecs: dict[str, int] = {}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "k": self.k, "bottom": self.bottom, "tol": self.tol,
                "max_matvecs": self.max_matvecs, "max_seconds": self.max_seconds, "warm_start": self.warm_start}

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

    def compute(self, ctx: StepContext) -> Output:
        from diagnostics.linalg import lanczos

        slot = eigenspace_slot(ctx)
        slot.attach(self.board)
        records: list[Record] = []
        statuses: list[str] = []
        reasons: list[str] = []
        total = 0
        details: dict[str, Any] = {}
        p = self.prefix
        for key, raw in self.operators(ctx):
            dim = int(raw.shape[0])
            k = self._k_for(ctx, dim)
            op = FiniteChecked(raw)
            res, why = run_guarded(lambda op=op, k=k, key=key, dim=dim: lanczos(
                op, k=k, which="LA", tol=self.tol, v0=self._warm(key, dim), seed=self.seed,
                max_matvecs=self.max_matvecs, max_seconds=self.max_seconds))
            total += op.num_matvecs
            found = torch.isfinite(res.eigenvalues) if res is not None else None
            budget_stop = res is not None and res.settings.get("stop") in ("max_matvecs", "max_seconds")
            if res is None or not (bool(found.all()) or budget_stop):
                # A failed block stores nothing and forgets its warm start (the vectors may be garbage).
                self.vectors.pop(key, None)
                statuses.append("failed")
                reasons.append(f"{key}: {why or 'Lanczos returned non-finite eigenvalues'}")
                continue
            self.last_matvecs[key] = res.num_matvecs
            if not bool(found.all()):
                # The budget ran out before k Ritz values existed: store the ones found, flagged.
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
            self.board.publish(Eigenspace(self.kind, key, ctx.step, res.eigenvalues.clone(), res.eigenvectors.detach(),
                                          res.converged.clone(), names, numels))
            for i in range(k):
                records.append(Record(p + "eigenvalue", float(res.eigenvalues[i]), key=key, index=i))
                records.append(Record(p + "residual", float(res.residuals[i]), key=key, index=i))
                records.append(Record(p + "converged", float(bool(res.converged[i])), key=key, index=i))
            ok = res.all_converged
            details[key] = {"num_matvecs": res.num_matvecs, "stop": res.settings.get("stop"),
                            "warm_start": res.settings.get("warm_start")}
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
                    max_matvecs=left_mv, max_seconds=left_s))
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
        status = _worst(statuses)
        if status == "failed":
            # A failed estimate is stored as failed, never as a number: drop the other blocks' values too.
            return failed("; ".join(reasons), total, details)
        return Output(records=records, status=status, reason="; ".join(reasons) or None, num_matvecs=total,
                      settings=details)


# --- hessian_density ----------------------------------------------------------------------------------------
@register
class HessianDensity(_CurvatureDiagnostic):
    """Spectral density of the Hessian (or GGN) by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017).

    Records per block: ``density_node`` and ``density_weight`` with ``index = probe * m + j`` (m Lanczos
    steps per probe; each probe's weights sum to 1). The report smooths them with a Gaussian kernel, so
    the raw quadrature is kept. Read: a bulk near zero plus isolated outliers (about one per class) is the
    usual picture; mass at negative values means the model sits at a saddle or in a non-convex region.

    Args:
        num_probes: Rademacher probes (independent Lanczos runs, advanced together).
        steps: Lanczos steps per probe (m).
        max_matvecs: budget; when ``num_probes * steps`` exceeds it, ``steps`` is reduced to fit and the
            probe is stored as ``not_converged`` (a coarser quadrature).

    Cost: ``num_probes * steps`` HVPs in ``steps`` batched products; memory ``num_probes * P * steps``
    float64 numbers.
    """

    name = "hessian_density"
    preset = "full"
    default_every = 2000
    _base = "density"
    _suffixes = ("density_node", "density_weight")
    metrics: ClassVar[tuple[str, ...]] = ("hessian_density_node", "hessian_density_weight")
    contract_options: ClassVar[dict[str, Any]] = {"num_probes": 2, "steps": 8}

    def __init__(self, every: int | None = None, start: int = 0, *, kind: str = "hessian", params: Any = None,
                 num_probes: int = 4, steps: int = 32, max_matvecs: int | None = None, seed: int = 0) -> None:
        super().__init__(every, start, kind=kind, params=params, seed=seed)
        if int(num_probes) < 1 or int(steps) < 2:
            raise ConfigError(f"{self.name}: need num_probes >= 1 and steps >= 2, got {num_probes} and {steps}")
        _check_budget(max_matvecs, None, self.name)
        self.num_probes = int(num_probes)
        self.steps = int(steps)
        self.max_matvecs = max_matvecs

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "num_probes": self.num_probes, "steps": self.steps,
                "max_matvecs": self.max_matvecs}

    def compute(self, ctx: StepContext) -> Output:
        from diagnostics.linalg import spectral_density

        steps, truncated = self.steps, False
        if self.max_matvecs is not None and self.num_probes * steps > self.max_matvecs:
            steps, truncated = max(1, self.max_matvecs // self.num_probes), True
        records: list[Record] = []
        total = 0
        p = self.prefix
        for key, raw in self.operators(ctx):
            op = FiniteChecked(raw)
            sd, why = run_guarded(lambda op=op, steps=steps: spectral_density(
                op, num_probes=self.num_probes, steps=steps, seed=self.seed))
            total += op.num_matvecs
            if sd is None or not (bool(torch.isfinite(sd.nodes).all()) and bool(torch.isfinite(sd.weights).all())):
                return failed(f"{key}: {why or 'non-finite quadrature'}", total)
            m = sd.nodes.shape[1]
            for i in range(sd.nodes.shape[0]):
                for j in range(m):
                    records.append(Record(p + "density_node", float(sd.nodes[i, j]), key=key, index=i * m + j))
                    records.append(Record(p + "density_weight", float(sd.weights[i, j]), key=key, index=i * m + j))
        if truncated:
            return Output(records=records, status="not_converged", num_matvecs=total,
                          reason=f"budget max_matvecs={self.max_matvecs} cut Lanczos to {steps} steps per probe")
        return Output(records=records, num_matvecs=total)


# --- hessian_trace -------------------------------------------------------------------------------------------
def estimate_trace(ctx: StepContext, op: Any, kind: str, block: str, num_matvecs: int, seed: int) -> tuple[Any, int]:
    """Hutch++ trace of ``op``, shared through the step cache; returns ``(TraceEstimate, matvecs spent now)``.

    Raises:
        NonFiniteProductError: a product was not finite.
    """
    from diagnostics.linalg import hutchpp_trace

    key = trace_cache_key(kind, block, num_matvecs, seed)
    if key in ctx.cache:
        return ctx.cache[key], 0
    checked = FiniteChecked(op)
    est = hutchpp_trace(checked, num_matvecs=num_matvecs, seed=seed)
    if not (math.isfinite(est.mean) and (math.isfinite(est.stderr) or math.isnan(est.stderr))):
        raise NonFiniteProductError("non-finite trace estimate")
    ctx.cache[key] = est
    return est, checked.num_matvecs


@register
class HessianTrace(_CurvatureDiagnostic):
    """Trace of the Hessian (or GGN) by Hutch++ (Meyer, Musco, Musco, Woodruff 2021), with standard error.

    Records per block: ``trace`` and ``trace_stderr`` (of the Hutchinson part on the deflated residual; the
    sketched part is exact for its sketch). Read: Tr(H) is the summed curvature over all directions; for
    SGD, ``Tr(H) * lr / 2 > 1`` marks a minimum that is not linearly stable (``sharpness`` records that
    ratio). The same seed is used at every probe, so changes over steps are not probe noise.

    Cost: exactly ``num_matvecs`` HVPs (a third sketch, a third on the sketch, a third residual probes).
    """

    name = "hessian_trace"
    preset = "full"
    default_every = 1000
    _base = "trace"
    _suffixes = ("trace", "trace_stderr")
    metrics: ClassVar[tuple[str, ...]] = ("hessian_trace", "hessian_trace_stderr")
    contract_options: ClassVar[dict[str, Any]] = {"num_matvecs": 12}

    def __init__(self, every: int | None = None, start: int = 0, *, kind: str = "hessian", params: Any = None,
                 num_matvecs: int = 60, seed: int = 0) -> None:
        super().__init__(every, start, kind=kind, params=params, seed=seed)
        if not isinstance(num_matvecs, int) or num_matvecs < 6:
            raise ConfigError(f"{self.name}: num_matvecs must be an int >= 6, got {num_matvecs!r}")
        self.num_matvecs = num_matvecs

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "num_matvecs": self.num_matvecs, "method": "hutch++"}

    def compute(self, ctx: StepContext) -> Output:
        records: list[Record] = []
        total = 0
        p = self.prefix
        for key, raw in self.operators(ctx):
            out, why = run_guarded(lambda raw=raw, key=key: estimate_trace(
                ctx, raw, self.kind, key, self.num_matvecs, self.seed))
            if out is None:
                return failed(f"{key}: {why}", total)
            est, spent = out
            total += spent
            records.append(Record(p + "trace", float(est.mean), key=key))
            if math.isfinite(est.stderr):
                records.append(Record(p + "trace_stderr", float(est.stderr), key=key))
        return Output(records=records, num_matvecs=total)
