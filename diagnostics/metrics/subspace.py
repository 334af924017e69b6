"""Gradient-subspace alignment (Gur-Ari, Roberts, Dyer 2018; Song, Ahn, Yun 2025).

With ``V_k`` the top-k Hessian eigenvectors of ``hessian_top`` (never recomputed here):

* ``grad_subspace_fraction`` = ``||P_k g||^2 / ||g||^2`` for the mean-loss gradient ``g`` on the probe
  data (``gradient="batch"``: the user's mini-batch ``.grad`` instead);
* ``update_subspace_fraction``: the same for the optimizer's actual update ``dtheta``;
* ``grad_hessian_overlap`` = ``g^T H g / (||g|| ||H g||)``, a one-HVP proxy that needs no eigenvectors;
* ``subspace_overlap_prev`` = ``(1/k) Tr(P_t P_t')`` between the latest probe and the one before it, and
  ``subspace_overlap_ref`` against a reference probe (the first at or after ``reference_step``).

How the eigenvectors arrive. ``after = ("hessian_top",)`` makes the Monitor run ``hessian_top`` first;
in ``compute`` (before ``optimizer.step()``) this diagnostic reads the step's eigenspace with
``ctx.top_eigenspace(kind, block)``, computes ``g`` and ``H g`` and keeps them; ``compute_after_update``
adds the update's fraction. The latest eigenspace is kept: at a step where ``hessian_top`` is not due,
the fractions use the latest one seen at a step where both ran (give both the same schedule, the
default, to use every probe). Without a ``hessian_top`` in the run only ``grad_hessian_overlap`` is
recorded, and the status reason says why. Definitions: docs/metrics.md, "Gradient-subspace alignment".

Read: a fraction near 1 says the gradient lives in the few high-curvature directions (typical after the
first steps); it does not prove that learning happens there (Song et al. 2025 find that removing that
component barely slows training). An overlap with the reference near 1 means the top subspace has
stopped rotating.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from diagnostics.errors import ConfigError
from diagnostics.linalg.finite import FiniteChecked, NonFiniteProductError
from diagnostics.metrics.base import Output
from diagnostics.metrics.curvature_base import CurvatureDiagnostic, Eigenspace, failed, run_guarded
from diagnostics.metrics.registry import register
from diagnostics.store.records import Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

__all__ = ["GradSubspace", "cosine_gHg"]


def cosine_gHg(g: Tensor, Hg: Tensor) -> float:
    """``g^T H g / (||g|| ||H g||)`` in float64 (0 when either norm is 0). Cost: none beyond ``H g``."""
    g, Hg = g.to(torch.float64), Hg.to(torch.float64)
    den = float(g.norm()) * float(Hg.norm())
    return float(g @ Hg) / den if den > 0 else 0.0


def _fraction(v: Tensor, V: Tensor) -> float:
    # V has orthonormal columns (Lanczos Ritz vectors), so the projection is V^T v.
    v = v.to(torch.float64)
    total = float(v.square().sum())
    if total == 0.0:
        return 0.0
    return float((V.to(torch.float64).T @ v).square().sum()) / total


@register
class GradSubspace(CurvatureDiagnostic):
    """Fraction of the gradient and of the update in the top-k Hessian eigenspace, and subspace overlaps.

    Records (key = block): ``grad_subspace_fraction``, ``update_subspace_fraction``,
    ``grad_hessian_overlap``, ``subspace_overlap_prev``, ``subspace_overlap_ref``. The overlaps are
    recorded once per new ``hessian_top`` probe (at the first ``grad_subspace`` step that sees it).

    Args:
        every, start: schedule; the default (every 1000) matches ``hessian_top``'s so both are due together.
        kind: which ``hessian_top`` eigenvectors and which operator for ``H g`` ("hessian" or "ggn").
        params: blocks; must match the blocks of the ``hessian_top`` whose eigenvectors are used.
        gradient: "probe" (mean-loss gradient on the probe data, the same data as the eigenvectors; free
            once the operator has linearised its batches) or "batch" (the user's mini-batch ``.grad``).
        reference_step: the reference probe is the first one at or after this step.
        update: also the optimizer's update (recorded after ``optimizer.step()``). False, or
            :meth:`without_update`: everything else is recorded at the step itself and no optimizer is
            needed, which is how ``tdiag analyze`` runs it on checkpoints.

    Cost: one HVP per block (for ``H g``) plus the probe gradient; projections are ``O(P k)``.
    """

    name = "grad_subspace"
    requires = frozenset({"curvature", "grads", "update"})
    preset = "full"
    default_every = 1000
    metrics = ("grad_subspace_fraction", "update_subspace_fraction", "grad_hessian_overlap",
               "subspace_overlap_prev", "subspace_overlap_ref")
    #: reads hessian_top's eigenspace of the step, so the Monitor runs hessian_top first.
    after: ClassVar[tuple[str, ...]] = ("hessian_top",)

    def __init__(self, every: int | None = None, start: int = 0, *, kind: str = "hessian", params: Any = None,
                 gradient: str = "probe", reference_step: int = 0, seed: int = 0, update: bool = True) -> None:
        super().__init__(every, start, kind=kind, params=params, seed=seed)
        self.with_update = True
        if not update:
            self.without_update()
        if self.kind == "ggn":
            self.after = ("ggn_top",)
        self.metrics = type(self).metrics
        if gradient not in ("probe", "batch"):
            raise ConfigError(f"grad_subspace: gradient must be 'probe' or 'batch', got {gradient!r}")
        self.gradient = gradient
        self.reference_step = int(reference_step)
        #: latest and previous eigenspace seen per block (not saved with the run: a resumed run starts afresh).
        self.latest: dict[str, Eigenspace] = {}
        self.previous: dict[str, Eigenspace] = {}
        #: eigenspace step of the last probe whose overlaps were recorded, per block.
        self.reported: dict[str, int] = {}
        #: reference eigenspace per block.
        self.reference: dict[str, Eigenspace] = {}
        self._grads: dict[str, Tensor] = {}
        self._pending: list[Record] = []

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "gradient": self.gradient, "reference_step": self.reference_step,
                "update": self.with_update}

    def without_update(self) -> GradSubspace:
        """Leave out the update's fraction, so that nothing waits for an optimizer step (checkpoints).
        Returns self."""
        self.with_update = False
        self.requires = type(self).requires - {"update"}
        return self

    def _observe(self, ctx: StepContext, key: str) -> None:
        """Take the eigenspace ``hessian_top`` published for block ``key`` at this step, if any."""
        space = ctx.top_eigenspace(self.kind, key)
        latest = self.latest.get(key)
        if space is not None and (latest is None or space.step != latest.step):
            if latest is not None:
                self.previous[key] = latest
            self.latest[key] = space

    def compute(self, ctx: StepContext) -> Output:
        self._grads = {}
        self._pending = []
        total = 0
        for key, raw in self.operators(ctx):
            self._observe(ctx, key)
            op = FiniteChecked(raw)

            def probe(raw: Any = raw, op: FiniteChecked = op) -> tuple[Tensor, Tensor]:
                if self.gradient == "probe":
                    g = raw.gradient()
                else:
                    g = raw.flatten({n: ctx.grads().get(n, torch.zeros(raw.param_shapes[n])) for n in raw.param_names})
                if not bool(torch.isfinite(g).all()):
                    raise NonFiniteProductError("non-finite gradient on the probe data")
                return g, op @ g

            out, why = run_guarded(probe)
            total += op.num_matvecs
            if out is None:
                return failed(f"{key}: {why}", total)
            g, Hg = out
            self._grads[key] = g.detach()
            self._pending.append(Record("grad_hessian_overlap", cosine_gHg(g, Hg), key=key))
        if not self.with_update:
            out = self._project(ctx, with_update=False)
            return Output(records=out.records, reason=out.reason, num_matvecs=total)
        return Output(records=[], num_matvecs=total)

    def compute_after_update(self, ctx: StepContext) -> Output:
        return self._project(ctx, with_update=True)

    def _project(self, ctx: StepContext, with_update: bool) -> Output:
        """The step's records from the gradients kept by :meth:`compute`: fractions in the latest top
        eigenspace (the update's too when ``with_update``) and the overlaps of a new eigenspace."""
        from diagnostics.linalg import subspace_overlap

        records, self._pending = self._pending, []
        missing = []
        update = None
        for key, g in self._grads.items():
            space, prev = self.latest.get(key), self.previous.get(key)
            if space is None:
                missing.append(key)
                continue
            V = space.eigenvectors
            if V.shape[0] != g.shape[0]:
                raise ConfigError(
                    f"grad_subspace: block {key!r} has {g.shape[0]} parameters but hessian_top's eigenvectors have "
                    f"{V.shape[0]}; give both the same params="
                )
            records.append(Record("grad_subspace_fraction", _fraction(g, V), key=key))
            try:
                update = (ctx.update() if with_update else {}) if update is None else update
            except ConfigError:
                update = {}
            if update:
                records.append(Record("update_subspace_fraction", _fraction(space.flatten(update), V), key=key))
            if self.reported.get(key) != space.step:
                self.reported[key] = space.step
                if prev is not None and prev.eigenvectors.shape == V.shape:
                    records.append(Record("subspace_overlap_prev", subspace_overlap(prev.eigenvectors, V), key=key))
                ref = self.reference.get(key)
                if ref is None and space.step >= self.reference_step:
                    self.reference[key] = ref = space
                if ref is not None and ref.eigenvectors.shape == V.shape:
                    records.append(Record("subspace_overlap_ref", subspace_overlap(ref.eigenvectors, V), key=key))
        self._grads = {}
        reason = None
        if missing:
            reason = (f"no hessian_top eigenvectors (kind={self.kind!r}) for blocks {missing}: add hessian_top with "
                      "the same params= and a schedule that meets this one; only grad_hessian_overlap was recorded")
        return Output(records=records, reason=reason)
