"""Spectral alignment: per-token cosines between a layer's inputs and its weight's top right singular vector.

For each monitored linear map y = W x (W of shape [out, in]) with top singular triplet (sigma_1, u_1, v_1),
the alignment of token i is a_i = <x_i, v_1> / ||x_i||. The ``spectral_alignment`` diagnostic stores,
per map (key = module name, or ``name.q``/``name.k``/``name.v`` for a split fused projection), the
distribution's positive fraction p+, sign diversity 1 - |2 p+ - 1|, mean, mean |a| and sigma_1 on every
probe, and quantiles and a 20-bin histogram on every ``detail_every``-th probe (metric IDs ``sa_*``).
Definition and rationale: docs/metrics.md, "Spectral alignment" (after Qiu, Wu, Tan, Wang, Yao 2025,
arXiv 2510.04202).

The module is split by concept: which maps (:mod:`~diagnostics.metrics.linear_maps`), the in-loop
measurement (:mod:`~diagnostics.metrics.alignment_probe`: following v_1, projection hooks), the
statistics (:mod:`~diagnostics.metrics.alignment_stats`) and, here, the diagnostic. How it stays cheap
enough to run every step:

- v_1 is tracked by warm-started power iteration, one step per probe by default (two products with W),
  never a full SVD; the warm start carries the sign of v_1 from probe to probe.
- scoped forward pre-hooks keep a token subsample (about ``max_tokens`` rows per map, the same token
  positions for every map) of the inputs seen in one no-grad, eval-mode forward over a random subsample
  of the step's batch; after it the rows of all maps are projected on their v_1 in a few batched
  products (one per input width).
- when the Monitor runs this diagnostic every step it holds the same hooks open from the end of one
  ``monitor.step`` to the start of the next (:meth:`SpectralAlignment.observe_training_forward`), so
  the user's training forward is measured and no extra forward runs; without an observed forward the
  probe falls back to its own.
- the statistics of all maps are computed in one batched pass on the cosines' device, with one host transfer.
- on a step whose training forward was observed the diagnostic only reads (``reads_only``), so the
  Monitor skips its RNG fork, which costs more than the statistics on a small model.

The step's statistics are shared with ``ctx.publish_alignment_statistics``; the explosion detector
(:mod:`diagnostics.metrics.explosion`, diagnostic ``explosion_detector`` in the ``standard`` preset, run
by the Monitor right after this one) reads them with ``ctx.alignment_statistics()``.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from diagnostics import _distributed as _dist
from diagnostics._batch import leading_size, map_tensors, samples_for_tokens
from diagnostics._state import eval_mode
from diagnostics.errors import ConfigError
from diagnostics.metrics.alignment_probe import (
    ProjectionHooks,
    Projector,
    cosine_matrices,
    group_by_module,
    project_rows,
    projection_hooks,
    top_vectors,
)
from diagnostics.metrics.alignment_stats import batched_alignment_statistics
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.linear_maps import (
    DEFAULT_QKV_PATTERNS,
    LinearMap,
    as_patterns,
    find_linear_maps,
    resolve_modules,
)
from diagnostics.metrics.registry import register
from diagnostics.store.records import Record, VectorRecord

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

__all__ = [
    "LinearMap",
    "SpectralAlignment",
    "batched_alignment_statistics",
    "find_linear_maps",
    "project_rows",
]


def _subsample(batch: Any, max_tokens: int, gen: torch.Generator) -> Any:
    """A random subsample (in order) of the batch's samples holding about ``max_tokens`` tokens."""
    n, keep = leading_size(batch), samples_for_tokens(batch, max_tokens)
    if n is None or keep is None or keep >= n:
        return batch
    idx = torch.randperm(n, generator=gen)[:keep].sort().values
    return map_tensors(batch, lambda t: t.index_select(0, idx.to(t.device)) if t.ndim and t.shape[0] == n else t)


def _in_map_order(maps: list[LinearMap], batched: list[tuple[list[str], dict[str, list[Any]]]],
                  cache: list[Any]) -> tuple[tuple[str, ...], dict[str, list[Any]]]:
    """The batched statistics of every token-count group as one column per statistic, in the maps' order
    (maps without statistics left out). ``cache``: a one-item list the caller keeps between steps (the
    order is found again only when the maps or the groups' keys change)."""
    if len(batched) == 1:
        keys, cols = batched[0]
        cols = dict(cols)
    else:
        keys = [k for ks, _ in batched for k in ks]
        cols = {f: [v for _, c in batched for v in c[f]] for f in batched[0][1]}
    known = cache[0]
    if known is None or known[0] is not maps or known[1] != keys:
        at = {k: i for i, k in enumerate(keys)}
        order = [at[mp.key] for mp in maps if mp.key in at]
        ordered = tuple(keys[i] for i in order)
        known = cache[0] = (maps, list(keys), ordered, None if order == list(range(len(order))) else order)
    order = known[3]
    if order is not None:
        cols = {f: [c[i] for i in order] for f, c in cols.items()}
    return known[2], cols


class _PerMap(Mapping[str, dict[str, Any]]):
    """Column statistics read as ``{map key: {statistic: value}}``, each map's dict built when read."""

    def __init__(self, keys: tuple[str, ...], columns: dict[str, list[Any]]) -> None:
        self._at = {k: i for i, k in enumerate(keys)}
        self._columns = columns

    def __getitem__(self, key: str) -> dict[str, Any]:
        i = self._at[key]
        return {f: c[i] for f, c in self._columns.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)


#: (metric, statistic) written on every probe.
_PER_PROBE_FIELDS = (("sa_positive_fraction", "positive_fraction"), ("sa_sign_diversity", "sign_diversity"),
                     ("sa_mean", "mean"), ("sa_mean_abs", "mean_abs"), ("sa_sigma1", "sigma1"))


@register
class SpectralAlignment(Diagnostic):
    """Alignment of each linear map's inputs with its weight's top right singular vector (``sa_*``).

    Per map (key = map key) and step: ``sa_positive_fraction``, ``sa_sign_diversity``, ``sa_mean``,
    ``sa_mean_abs``, ``sa_quantile`` (index 0..4 = q 0.05, 0.25, 0.5, 0.75, 0.95), ``sa_histogram``
    (index 0..19, fractions), ``sa_sigma1`` (sigma_1 estimate: ||W^T W v|| / ||W v|| for the previous v,
    a lower bound at least ||W v|| that converges with the warm-started iteration). The explosion warning is
    the separate ``explosion_detector`` diagnostic, which reads these statistics.

    Args:
        every, start: schedule (default every step).
        modules: None (every nn.Linear, HF Conv1D and MultiheadAttention in-projection) or name patterns.
        exclude: name patterns to leave out.
        fused_qkv, qkv_patterns, qkv_groups: fused projections as one map or split (see
            :func:`~diagnostics.metrics.linear_maps.find_linear_maps`).
        max_tokens: token budget per map and step (subsample with a private generator).
        chunk_tokens: rows projected at once after the forward (bounds the temporaries of the batched
            projection).
        power_iters: power iterations per probe, warm-started from the previous v_1 (1 by default).
        init_iters: iterations for a map's first probe (cold start), with tolerance ``init_tol``.
        refine_gap: a probe more than this many steps after the previous one (checkpoints analysed by
            ``tdiag analyze``, a sparse schedule) runs the iteration to convergence from the previous v_1,
            as a first probe does, instead of ``power_iters`` steps: over many training steps v_1 moves
            further than a warm step follows (default 20; 0: every probe converges, as ``tdiag analyze``
            sets it for checkpoints).
        seed: seed of the private generator for the subsample (each step uses seed + step).
        detail_every: write the distribution detail (``sa_quantile``, ``sa_histogram``: 25 of the 30
            rows per map) on every ``detail_every``-th probe only, counting from the run's first probe
            (default 10; 1 = every probe). p+, sign diversity, mean, mean |a| and sigma_1 are written
            on every probe; the detector reads only those.

    State (saved with the run): v_1 per map key (``state["v1"]``, so a resumed run keeps its signs), the
    step of the last probe (``refine_gap``), the probe counter (the detail cadence) and the count of
    watched forwards.

    Cost per step: one no-grad forward over about ``max_tokens`` tokens (none when the Monitor observed
    the training forward: the projections then run in its hooks), ``2 * power_iters`` products with each
    weight (a first probe, or one more than ``refine_gap`` steps after the previous, up to
    ``2 * init_iters`` per weight, in float64, until converged), O(max_tokens * in) per map for the
    projections (kept rows: ``max_tokens * in`` values per map until the step's probe), one batched pass
    for the statistics (plus one sort on detail probes); 5 values per map (5 VectorRecords over the
    maps), 30 on detail probes.
    """

    name = "spectral_alignment"
    requires = frozenset({"layer_inputs"})
    preset = "standard"
    default_every = 1
    allow_nonfinite = True  # sigma_1 of a weight that has blown up is stored as the inf/NaN it is
    budgeted = True  # scheduled by a budget whether or not this step's call only reads (``reads_only``)
    metrics: ClassVar[tuple[str, ...]] = (
        "sa_positive_fraction",
        "sa_sign_diversity",
        "sa_mean",
        "sa_mean_abs",
        "sa_quantile",
        "sa_histogram",
        "sa_sigma1",
    )

    def __init__(
        self,
        every: int | None = None,
        start: int = 0,
        modules: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        *,
        fused_qkv: str = "whole",
        qkv_patterns: Iterable[str] = DEFAULT_QKV_PATTERNS,
        qkv_groups: int = 3,
        max_tokens: int = 256,
        chunk_tokens: int = 256,
        power_iters: int = 1,
        init_iters: int = 200,
        init_tol: float = 1e-7,
        seed: int = 0,
        detail_every: int = 10,
        refine_gap: int = 20,
    ) -> None:
        super().__init__(every, start)
        if int(max_tokens) < 1 or int(chunk_tokens) < 1:
            raise ConfigError(
                f"spectral_alignment: max_tokens and chunk_tokens must be >= 1, got {max_tokens}, {chunk_tokens}"
            )
        if int(power_iters) < 1 or int(init_iters) < 1:
            raise ConfigError(
                f"spectral_alignment: power_iters and init_iters must be >= 1, got {power_iters}, {init_iters}"
            )
        if isinstance(refine_gap, bool) or not isinstance(refine_gap, int) or refine_gap < 0:
            raise ConfigError(f"spectral_alignment: refine_gap must be an integer >= 0, got {refine_gap!r}")
        self.refine_gap = refine_gap
        if fused_qkv not in ("whole", "split"):
            raise ConfigError(f"spectral_alignment: fused_qkv must be 'whole' or 'split', got {fused_qkv!r}")
        if isinstance(detail_every, bool) or not isinstance(detail_every, int) or detail_every < 1:
            raise ConfigError(f"spectral_alignment: detail_every must be an integer >= 1, got {detail_every!r}")
        self.detail_every = int(detail_every)
        self.modules = as_patterns(modules)
        self.exclude = as_patterns(exclude)
        self.fused_qkv = fused_qkv
        self.qkv_patterns = tuple(qkv_patterns)
        self.qkv_groups = int(qkv_groups)
        self.max_tokens = int(max_tokens)
        self.chunk_tokens = int(chunk_tokens)
        self.power_iters = int(power_iters)
        self.init_iters = int(init_iters)
        self.init_tol = float(init_tol)
        self.seed = int(seed)
        self._maps: list[LinearMap] | None = None
        # A weak reference, not id(): a model freed and replaced (FSDP's per-step gathered copy) may reuse its id.
        self._model_ref: weakref.ref[nn.Module] | None = None
        self._modules: dict[str, nn.Module] | None = None
        self._groups: dict[Any, Any] = {}  # the v_1 stacked per weight shape between steps (top_vectors)
        self._watched: tuple[weakref.ref[nn.Module], dict[str, list[LinearMap]], dict[str, Projector]] | None = None
        self._watching = False
        # Hooks kept on the observed model between steps (observe_training_forward), removed by release_hooks.
        self._kept_hooks: tuple[weakref.ref[nn.Module], ProjectionHooks] | None = None
        self._observe_gen: torch.Generator | None = None
        self._by_module: tuple[Any, ...] | None = None  # (maps, v_1 dict, its size, group_by_module of them)
        self._map_order: list[Any] = [None]  # the cache of _in_map_order
        self.last_source: str | None = None

    @property
    def reads_only(self) -> bool:  # type: ignore[override]
        """True when the next ``compute`` only reads: the training forward it observed left rows to project,
        so it runs no forward, switches no mode and draws only from private generators (the Monitor then
        skips the RNG fork, which costs more than the statistics on a small model). False under
        torch.distributed, where its weights may be gathered by collectives."""
        watched = self._watched
        return (watched is not None and any(p.count > 0 for p in watched[2].values())
                and not _dist.is_distributed())

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "modules": self.modules or "all linear maps",
            "exclude": self.exclude,
            "fused_qkv": self.fused_qkv,
            "qkv_patterns": list(self.qkv_patterns),
            "qkv_groups": self.qkv_groups,
            "max_tokens": self.max_tokens,
            "chunk_tokens": self.chunk_tokens,
            "power_iters": self.power_iters,
            "init_iters": self.init_iters,
            "refine_gap": self.refine_gap,
            "seed": self.seed,
            "detail_every": self.detail_every,
            "mode": "eval",
        }

    def maps(self, model: nn.Module) -> list[LinearMap]:
        """The monitored maps of ``model`` (resolved once per model)."""
        if self._maps is None or self._model_ref is None or self._model_ref() is not model:
            self._maps = find_linear_maps(
                model,
                self.modules,
                self.exclude,
                fused_qkv=self.fused_qkv,
                qkv_patterns=self.qkv_patterns,
                qkv_groups=self.qkv_groups,
            )
            self._model_ref = weakref.ref(model)
            self._modules = None
            self._groups = {}
        return self._maps

    def modules_of(self, model: nn.Module) -> dict[str, nn.Module]:
        """The monitored maps' modules by name (looked up once per model)."""
        maps = self.maps(model)
        if self._modules is None:
            self._modules = resolve_modules(model, maps)
        return self._modules

    def watch(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Measure on the training forward instead of an extra forward (optional; saves most of the cost).

        Wrap the training forward of a step in it; the next ``compute`` (the Monitor's ``step`` for that
        step) then uses the inputs this forward saw, projected on the previous probe's v_1 with the same
        token budget, and runs no forward of its own::

            with sa.watch(model):
                loss = loss_fn(model, batch)
            loss.backward()
            monitor.step(step, batch, loss)

        The hooks live only inside the block. Before the first probe (no v_1 yet) it does nothing and
        ``compute`` falls back to its own forward. Inputs are then those of the training forward (train
        mode: dropout as in training). With several forwards per step, wrap only one. Only a training
        forward is measured (gradients enabled, the module in train mode): a validation forward under
        ``torch.no_grad``, ``torch.inference_mode`` or ``model.eval()`` passes unseen.

        Cost: the projections only, O(max_tokens * in) per map.
        """
        return self._watch(model, keep_hooks=False)

    @contextlib.contextmanager
    def _watch(self, model: nn.Module, keep_hooks: bool) -> Iterator[None]:
        """:meth:`watch`; with ``keep_hooks`` the hooks stay registered (disarmed) after the block, for the
        next one, until :meth:`release_hooks`."""
        vectors = self.state.get("v1")
        if not vectors or self._watching:  # nothing to project on yet, or already watched (by the Monitor)
            yield
            return
        maps = self.maps(model)
        modules = self.modules_of(model)
        by_module = self._observed_modules(maps, vectors)
        count = self.state.get("watched", 0)
        self.state["watched"] = count + 1
        # One generator object reseeded per observed forward (creating one costs more than seeding it).
        if self._observe_gen is None:
            self._observe_gen = torch.Generator()
        gen = self._observe_gen.manual_seed(self.seed * 1_000_003 + 7_919 * (count + 1))
        # The hooks work on detached inputs, so the training forward's autograd graph is untouched.
        if keep_hooks:
            kept = self._kept_hooks
            if kept is None or not (kept[0]() is model and kept[1].covers(by_module)):
                self.release_hooks()
                kept = self._kept_hooks = (weakref.ref(model),
                                           ProjectionHooks(by_module, modules, self.hook_clock, training_of=model))
            hooks = kept[1]
        else:
            hooks = ProjectionHooks(by_module, modules, self.hook_clock, training_of=model)
        self._watching = True
        try:
            projectors = hooks.arm(by_module, vectors, self.max_tokens, gen)
            yield
        finally:
            self._watching = False
            hooks.disarm()
            if not keep_hooks:
                hooks.remove()
        self._watched = (weakref.ref(model), by_module, projectors)

    def _observed_modules(self, maps: list[LinearMap], vectors: dict[str, torch.Tensor]) -> dict[str, list[LinearMap]]:
        """:func:`group_by_module` of the maps with a v_1, kept while the maps and the set of v_1 stay (v_1
        are only ever added to the state's dict, so its size tells)."""
        cached = self._by_module
        if cached is None or cached[0] is not maps or cached[1] is not vectors or cached[2] != len(vectors):
            cached = self._by_module = (maps, vectors, len(vectors), group_by_module(maps, vectors))
        return cached[3]

    def observe_training_forward(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """What the Monitor holds open between two steps to measure on the user's training forward.

        :meth:`watch`, except that the hooks stay registered when the block ends (they then return at once)
        and are armed again by the next block: the Monitor enters it at the end of ``monitor.step`` when
        this diagnostic is due at every step and exits it at the start of the next ``monitor.step``, and
        removes the hooks (:meth:`release_hooks`) in ``close()`` or when it stops observing. When no
        forward ran in between (or only modules without monitored maps did), the next probe falls back to
        its own forward. A validation forward in between (under ``torch.no_grad``,
        ``torch.inference_mode`` or ``model.eval()``) is not measured: only a training forward is.
        """
        return self._watch(model, keep_hooks=True)

    def release_hooks(self) -> None:
        """Remove the hooks kept between observed training forwards (idempotent)."""
        kept, self._kept_hooks = self._kept_hooks, None
        if kept is not None:
            kept[1].remove()

    def _nothing_reason(self, model: nn.Module) -> str:
        """Why no map was measured, and the fix (the status reason of a ``nothing_measured`` step)."""
        maps = self.maps(model)
        if maps:
            return (f"none of the {len(maps)} monitored linear maps ran in the forward over the step's batch; pass "
                    "the batch the model trains on to monitor.step, or choose maps that run with modules=[...]")
        chosen = f" matching modules={list(self.modules)}" if self.modules else ""
        chosen += f" outside exclude={list(self.exclude)}" if self.exclude else ""
        return (f"the model has no nn.Linear, HF Conv1D or MultiheadAttention in-projection{chosen}: spectral "
                "alignment measures linear maps only. Name linear layers with modules=[...], or drop "
                "spectral_alignment (and explosion_detector, which reads it) from diagnostics")

    def measure(self, ctx: StepContext) -> tuple[dict[str, dict[str, Any]], float]:
        """This step's statistics per map key (also shared with ``ctx.publish_alignment_statistics``).

        Returns:
            (``{key: {positive_fraction, sign_diversity, mean, mean_abs, quantiles, histogram,
            num_tokens, sigma1}}``, seconds of the forward pass). ``quantiles`` and ``histogram`` are
            present on detail probes only (every ``detail_every``-th). Maps whose module did not run
            get no entry.
        """
        keys, columns, fwd = self._measure_columns(ctx)
        return dict(_PerMap(keys, columns)), fwd

    def _measure_columns(self, ctx: StepContext) -> tuple[tuple[str, ...], dict[str, list[Any]], float]:
        """:meth:`measure` as columns: (map keys in the maps' order, ``{statistic: [value per key]}``,
        forward seconds); the statistics are also published to ``ctx``."""
        model = ctx.model
        maps = self.maps(model)
        if not maps:
            ctx.publish_alignment_statistics({})
            return (), {}, 0.0
        modules = self.modules_of(model)
        watched, self._watched = self._watched, None
        # Our own arithmetic runs in inference mode (a smaller per-operation cost than no_grad, which counts
        # on a small model at every step). Nothing of the model runs in it: not the user's loss_fn (a tensor
        # a model caches under inference mode could not be saved for a later training backward), nor the
        # reading of its weights (FSDP gathers a parameter when it is read, which inference mode forbids).
        weights = {mp.key: mp.weight(modules[mp.module_name]) for mp in maps}
        last = self.state.get("last_step")
        refine = last is not None and int(ctx.step) - int(last) > self.refine_gap
        self.state["last_step"] = int(ctx.step)
        # This step's training forward was watched: its inputs are projected on the previous probe's v_1
        # (same sign as the updated one); no extra forward.
        observed = (
            watched is not None
            and not refine  # its rows were projected on a v_1 from before the gap
            and watched[0]() is model
            and any(p.count > 0 for p in watched[2].values())  # a forward was actually observed
        )
        # The probe counter lives in the run's state, so a resumed run keeps the detail cadence.
        probe = int(self.state.get("probes", 0))
        detail = probe % self.detail_every == 0
        fwd_seconds = 0.0
        with torch.inference_mode():
            tops = top_vectors(
                maps,
                modules,
                self.state.setdefault("v1", {}),
                power_iters=self.power_iters,
                init_iters=self.init_iters,
                init_tol=self.init_tol,
                seed=self.seed,
                groups=self._groups,
                weights=weights,
                refine=refine,
            )
            if observed:
                self.last_source = "training_forward"
                batched_all = self._statistics(watched[2], watched[1], detail)
        if not observed:
            vectors = {k: v for k, (_, v) in tops.items()}
            by_module = group_by_module(maps, vectors)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(ctx.step))
            sub = _subsample(ctx.batch, self.max_tokens, gen)
            t0 = time.perf_counter()
            with projection_hooks(by_module, vectors, modules, self.max_tokens, gen) as projectors:
                with torch.no_grad(), eval_mode(model):
                    ctx.loss_fn(model, sub)
            fwd_seconds = time.perf_counter() - t0
            self.last_source = "extra_forward"
            with torch.inference_mode():
                batched_all = self._statistics(projectors, by_module, detail)
        self.state["probes"] = probe + 1
        keys, columns = _in_map_order(maps, batched_all, self._map_order)
        columns["sigma1"] = [float(tops[k][0]) for k in keys]
        ctx.publish_alignment_statistics(_PerMap(keys, columns))
        return keys, columns, fwd_seconds

    def _statistics(self, projectors: dict[str, Projector], by_module: dict[str, list[LinearMap]],
                    detail: bool) -> list[tuple[list[str], dict[str, list[Any]]]]:
        """The statistics of the rows the projectors kept: one batched pass per token count (one
        ``[maps, tokens]`` matrix each), as ``[(map keys, {statistic: [value per key]})]``."""
        return [(keys, batched_alignment_statistics(matrix, detail))
                for keys, matrix in cosine_matrices(projectors, by_module, self.chunk_tokens)]

    def compute(self, ctx: StepContext) -> Output:
        keys, columns, fwd = self._measure_columns(ctx)
        if not keys:
            return Output(status="nothing_measured", reason=self._nothing_reason(ctx.model),
                          settings={"num_maps": 0, "forward_seconds": fwd, "source": self.last_source})
        # One VectorRecord per statistic (and index) over the maps: the same rows as a Record per map, without
        # a Python object per map and step.
        records: list[Record | VectorRecord] = [
            VectorRecord(metric, keys, tuple(columns[field])) for metric, field in _PER_PROBE_FIELDS
        ]
        if "quantiles" in columns:
            for metric, field in (("sa_quantile", "quantiles"), ("sa_histogram", "histogram")):
                rows = columns[field]
                records += [VectorRecord(metric, keys, tuple(float(r[i]) for r in rows), i)
                            for i in range(len(rows[0]))]
        settings = {"num_maps": len(keys), "forward_seconds": fwd, "source": self.last_source}
        return Output(records=records, settings=settings)
