"""StepContext: what a diagnostic sees of one training step, with shared work done once for that step.

Expensive intermediates (per-sample gradients, a curvature operator on the probe data, captured
activations, gradient and weight norms) are computed on first request and kept for the step, so three
diagnostics that need per-sample gradients cause one vmap pass. Results one diagnostic produces for
others (``hessian_top``'s eigenspace, a Hutch++ trace, ``spectral_alignment``'s statistics) are shared
through typed methods too; the reader declares ``after`` so that the producer runs first. Everything
lives one step.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diagnostics._batch import leading_size, slice_batch, tokens_per_sample
from diagnostics._hooks import ModuleSpec, capture_inputs, capture_outputs, concat, select_modules
from diagnostics._state import eval_mode
from diagnostics.errors import ConfigError
from diagnostics.linalg.lanczos_basis import BasisWorkspace
from diagnostics.metrics.flat_buffers import FlatBufferPool
from diagnostics.metrics.norms import WeightNorms, host_norms, tensor_norms, total_norm
from diagnostics.store.records import expand_records

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.gradients.stats import GradientMoments
    from diagnostics.linalg.trace import TraceEstimate
    from diagnostics.metrics.curvature_base import Eigenspace
    from diagnostics.store.records import Record, VectorRecord

#: Default cap on rows (tokens or samples) captured per module by ``activations``/``layer_inputs``.
DEFAULT_MAX_TOKENS = 2048

# Entries still valid after optimizer.step(): norms measured before it, and the parameter copy the
# update snapshot reuses.
_KEEP_AFTER_COMPUTE = frozenset({"grad_norms", "weight_norms", "flat_parameters", "records", "records_index"})


class StepContext:
    """One step's inputs plus a one-step cache; passed to ``Diagnostic.compute``.

    Attributes:
        step: the training step.
        model, loss_fn, batch, optimizer: as given to the Monitor (``loss_fn`` resolved to the default loss
            when the user gave none).
        loss: the step's loss as a float, or None.
        lr: learning rate of the optimizer's first parameter group, or None.
        probe_data: list of fixed batches for the run (curvature is measured on these).
        num_classes: from the Monitor, or None.
        due: names of the diagnostics due at this step (set by the Monitor; None when unknown), so that
            shared work needed by several of them can be done in one pass.
        microbatch_moments: the moments of the step's gradient-accumulation micro-batch gradients when the
            user reported them (``Monitor.microbatch``) and there were at least two, else None.
    """

    def __init__(
        self,
        *,
        step: int,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
        batch: Any,
        loss: float | None,
        optimizer: torch.optim.Optimizer | None = None,
        probe_data: list[Any] | None = None,
        num_classes: int | None = None,
        curvature_mode: str = "eval",
        max_memory_bytes: int | None = None,
        named_parameters: (list[tuple[str, torch.nn.Parameter]]
                           | Callable[[], list[tuple[str, torch.nn.Parameter]]] | None) = None,
        flat_buffers: FlatBufferPool | None = None,
        basis_workspace: BasisWorkspace | None = None,
    ) -> None:
        self.step = step
        self.model = model
        self._loss_fn = loss_fn
        self.batch = batch
        self.loss = loss
        self.optimizer = optimizer
        self.probe_data = list(probe_data or [])
        self.num_classes = num_classes
        self.curvature_mode = curvature_mode
        self.max_memory_bytes = max_memory_bytes
        self._cache: dict[Any, Any] = {}
        self.due: frozenset[str] | None = None
        #: Seconds one call of a resumable probe may take at this step (set by the Monitor's budget), or
        #: None for no limit beyond the diagnostic's own; read it through :meth:`call_seconds`.
        self.probe_seconds: float | None = None
        #: The diagnostics whose calls :attr:`probe_seconds` cuts (the budget's own schedule carries their
        #: unfinished runs on); None: every resumable one.
        self.sliced: frozenset[str] | None = None
        self.microbatch_moments: GradientMoments | None = None
        self._before_update: dict[str, torch.Tensor] | None = None
        self._before_flat: tuple[torch.Tensor, list[str], list[torch.Tensor]] | None = None
        self._after_update = False
        # The trainable (name, parameter) pairs, when the caller already listed them for this step.
        # A list, or what lists them on first use (a step whose diagnostics read no parameter lists none).
        self._named = named_parameters
        # Where the parameters' flat copies come from and go back to (kept between steps by the Monitor).
        self._flat_buffers = flat_buffers
        #: Lanczos basis memory kept between the curvature probes (the Monitor's), or None: the probes
        #: that keep their basis (``keep_basis``) pass it to Lanczos.
        self.basis_workspace = basis_workspace

    def call_seconds(self, name: str) -> float | None:
        """Seconds a call of the resumable diagnostic ``name`` may take at this step: :attr:`probe_seconds`
        when the budget cuts its calls (``sliced``: the diagnostics whose unfinished runs it carries on),
        else None."""
        if self.sliced is not None and name not in self.sliced:
            return None
        return self.probe_seconds

    # --- plain inputs ---------------------------------------------------------------------------
    @property
    def loss_fn(self) -> Callable[[nn.Module, Any], torch.Tensor]:
        """The loss contract ``loss_fn(model, batch) -> scalar``; the package default when none was given."""
        if self._loss_fn is None:
            from diagnostics.loss import default_loss

            self._loss_fn = default_loss
        return self._loss_fn

    @property
    def lr(self) -> float | None:
        if self.optimizer is None or not self.optimizer.param_groups:
            return None
        lr = self.optimizer.param_groups[0].get("lr")
        return None if lr is None else float(lr.item() if torch.is_tensor(lr) else lr)

    @property
    def cache(self) -> dict[Any, Any]:
        """The step's store of shared work (read-only view for tests and debugging).

        Diagnostics use the typed methods; entries are keyed by this class and may change without notice.
        """
        return dict(self._cache)

    def cached(self, key: Any, fn: Callable[[], Any]) -> Any:
        """The value of ``fn()`` under ``key``, computed on first use this step (a private memo).

        Keys of the typed methods are tuples or names of this class; a diagnostic memoising its own work
        uses a key that names it.
        """
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def end_compute_phase(self) -> None:
        """Drop what is invalid after ``optimizer.step()`` or too large to keep: per-sample gradients,
        captured activations, operators, shared results. Kept: the norms measured before the update and
        the parameter copy the update snapshot reuses. Cost: none."""
        for key in [k for k in self._cache if k not in _KEEP_AFTER_COMPUTE]:
            del self._cache[key]

    def begin_update_phase(self) -> None:
        """Mark that ``optimizer.step()`` has run: :meth:`update` and the pre-update values become available."""
        self._after_update = True

    def clear(self) -> None:
        """Drop all the step's shared work (the step is committed); the flat copies of the parameters go
        back to the Monitor's buffers for the next step. Cost: none."""
        flat = self._cache.get("flat_parameters")
        copies = [flat[0] if flat is not None else None, self._cache.get("update_flat")]
        flat = None
        self._cache.clear()
        self._before_flat = self._before_update = None
        if self._flat_buffers is None:
            return
        for i in range(len(copies)):
            t, copies[i] = copies[i], None
            # Only ``t`` and getrefcount's argument: no diagnostic kept the tensor itself (views of it are
            # checked by the pool).
            if t is not None and sys.getrefcount(t) <= 2:
                self._flat_buffers.give_back(t)

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Trainable parameters in ``named_parameters()`` order (listed once per step)."""
        if self._named is None:
            self._named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        elif callable(self._named):
            self._named = self._named()
        return self._named

    def grads(self) -> dict[str, torch.Tensor]:
        """The user's ``.grad`` per trainable parameter that has one (detached views: do not modify them)."""
        return self.cached(
            "grads", lambda: {n: p.grad.detach() for n, p in self.named_parameters() if p.grad is not None}
        )

    def params(self) -> dict[str, torch.Tensor]:
        """Current trainable parameter values (detached views: do not modify them)."""
        return self.cached("params", lambda: {n: p.detach() for n, p in self.named_parameters()})

    # --- shared expensive intermediates -----------------------------------------------------------
    def per_sample_grads(self, params: Any = None, mode: str = "eval",
                         max_samples: int | None = None) -> dict[str, torch.Tensor]:
        """Per-sample gradients ``{name: [N, *shape]}`` of the step's batch; computed once per step.

        ``mode="eval"`` (default) takes them with dropout off and BatchNorm on running statistics: a
        single sample has no batch statistics, and dropout would make each sample's gradient random.
        ``max_samples`` keeps only the batch's first ``max_samples`` samples (None: all of them).

        Cost: one batched forward and backward over the (kept) samples where every parameter is in an
        ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm`` or Hugging Face ``Conv1D`` (after a first call
        that also takes two samples' gradients one at a time to check that both agree), else one vmap(grad)
        pass, chunked to ``max_memory_bytes`` (:func:`diagnostics.gradients.per_sample_gradients`).
        """
        from diagnostics.gradients import per_sample_gradients

        if mode not in ("eval", "train"):
            raise ConfigError(f"per-sample gradient mode must be 'eval' or 'train', got {mode!r}")
        pkey = None if params is None else params if isinstance(params, str) else tuple(params)
        n = leading_size(self.batch)
        keep = n if max_samples is None or n is None else min(n, int(max_samples))

        def run() -> dict[str, torch.Tensor]:
            batch = self.batch if keep == n else slice_batch(self.batch, keep)
            with contextlib.ExitStack() as stack:
                if mode == "eval":
                    stack.enter_context(eval_mode(self.model))
                return per_sample_gradients(
                    self.model, self.loss_fn, batch, params=params, max_memory_bytes=self.max_memory_bytes,
                    mode=mode,
                )

        return self.cached(("per_sample_grads", pkey, mode, keep), run)

    def curvature(self, kind: str = "hessian", params: Any = None) -> Any:
        """A Hessian or GGN operator of the mean loss on the fixed probe data; built once per step.

        Building is free; each product costs about two backward passes over the probe data.
        """
        if kind not in ("hessian", "ggn"):
            raise ConfigError(f"curvature kind must be 'hessian' or 'ggn', got {kind!r}")
        if not self.probe_data:
            raise ConfigError("no probe data: pass probe_data= to the Monitor or call monitor.step with a batch")
        key = ("curvature", kind, None if params is None else params if isinstance(params, str) else tuple(params))

        def build() -> Any:
            from diagnostics import curvature  # heavy; only when a due diagnostic asks

            cls = curvature.HessianOperator if kind == "hessian" else curvature.GGNOperator
            return cls(self.model, self.loss_fn, self.probe_data, params=params, mode=self.curvature_mode)

        return self.cached(key, build)

    # --- norms of the step ---------------------------------------------------------------------------
    def grad_norms(self) -> dict[str, float]:
        """L2 norm of each trainable parameter's ``.grad`` and ``"all"`` (sqrt of the float64 sum of squares).

        Parameters without a gradient are left out (and no "all" when none has one). Computed once per
        step; cost: one fused norm kernel over the gradients and one host transfer.
        """

        def run() -> dict[str, float]:
            # .grad is read directly (host_norms runs under no_grad): no dict of detached views per step.
            pairs = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
            out = dict(zip([n for n, _ in pairs], host_norms([g for _, g in pairs])))
            if out:
                out["all"] = total_norm(out.values())
            return out

        return self.cached("grad_norms", run)

    def weight_norms(self) -> WeightNorms:
        """L2 norms of the trainable parameters: ``"all"`` at once, per parameter on first access.

        Computed once per step, before ``optimizer.step()``. Cost: one copy of the parameters into one flat
        tensor (reused by the update snapshot) and one reduction; per-parameter norms one fused kernel more.
        """
        return self.cached("weight_norms", lambda: WeightNorms(self.flat_parameters(), dict(self.named_parameters())))

    def weight_norms_before_update(self) -> Mapping[str, float]:
        """The weight norms before ``optimizer.step()`` (only in ``compute_after_update``).

        Those of :meth:`weight_norms` when it ran this step, else from the snapshot of the parameters.
        Cost: none, or one reduction over the snapshot.
        """
        done = self._cache.get("weight_norms")
        if done is not None:
            return done
        if self._before_flat is not None:
            return WeightNorms(self._before_flat)
        return tensor_norms(self.params_before_update())

    # --- results shared between the diagnostics of the step ---------------------------------------
    def publish_eigenspace(self, space: Eigenspace) -> None:
        """Share a top eigenspace computed at this step (``hessian_top`` / ``ggn_top`` call it). Cost: none."""
        self._cache[("eigenspace", space.kind, space.block)] = space

    def top_eigenspace(self, kind: str = "hessian", block: str = "all") -> Eigenspace | None:
        """The top-k eigenpairs of ``kind``'s operator on block ``block`` computed at this step, or None.

        Published by ``hessian_top`` (``ggn_top`` for ``kind="ggn"``) when it is due; a reader declares
        ``after = ("hessian_top",)`` so that the Monitor runs it afterwards. Nothing is computed here:
        without a due ``hessian_top`` the answer is None. Cost: none.
        """
        return self._cache.get(("eigenspace", kind, block))

    def _trace_key(self, kind: str, params: Any, num_matvecs: int, seed: int,
                   step: int | None = None) -> tuple[Any, ...]:
        sel = None if params is None else params if isinstance(params, str) else tuple(params)
        return ("trace", kind, sel, int(num_matvecs), int(seed), self.step if step is None else int(step))

    def has_trace(self, kind: str = "hessian", params: Any = None, *, num_matvecs: int, seed: int = 0) -> bool:
        """Whether :meth:`trace` with these arguments was already estimated this step (then it is free)."""
        return self._trace_key(kind, params, num_matvecs, seed) in self._cache

    def share_trace(self, kind: str, params: Any, *, num_matvecs: int, seed: int, estimate: TraceEstimate,
                    step: int | None = None) -> None:
        """Offer an estimate of the trace made in slices by a ``hessian_trace`` probe: of this step (a probe
        that began and ended in this call) to the step's later :meth:`trace` requests, or of the earlier
        ``step`` its probe began at (a probe cut into calls that ends now) to :meth:`shared_trace`. Cost: none."""
        self._cache[self._trace_key(kind, params, num_matvecs, seed, step)] = estimate

    def shared_trace(self, kind: str, params: Any, *, num_matvecs: int, seed: int, step: int) -> TraceEstimate | None:
        """The estimate of the trace at ``step`` that a ``hessian_trace`` probe shared in this call, or None:
        how a ``sharpness`` probe that began with a cut trace run gets its ``trace_ratio``. Cost: none."""
        return self._cache.get(self._trace_key(kind, params, num_matvecs, seed, step))

    def trace(
        self, kind: str = "hessian", params: Any = None, *, num_matvecs: int, seed: int = 0,
        max_memory: int | None = None,
    ) -> tuple[TraceEstimate, int]:
        """Hutch++ estimate of the trace of :meth:`curvature` ``(kind, params)``, shared for the step.

        ``hessian_trace`` and ``sharpness`` (its ``trace_ratio``) ask for the same estimate; the second
        request with the same ``num_matvecs`` and ``seed`` reuses the first (Meyer, Musco, Musco,
        Woodruff 2021).

        Returns:
            ``(estimate, products spent by this call)``: 0 when the estimate was reused.

        Raises:
            NonFiniteProductError: a product or the estimate was not finite (nothing is kept).

        Cost: ``num_matvecs`` curvature products on the first request, none after.
        """
        from diagnostics.linalg import hutchpp_trace
        from diagnostics.linalg.finite import FiniteChecked, NonFiniteProductError

        # max_memory only shapes the sketch and the blocks: an estimate made under another one is shared.
        key = self._trace_key(kind, params, num_matvecs, seed)
        if key in self._cache:
            return self._cache[key], 0
        checked = FiniteChecked(self.curvature(kind, params))
        est = hutchpp_trace(checked, num_matvecs=num_matvecs, seed=seed, max_memory=max_memory)
        if not (math.isfinite(est.mean) and (math.isfinite(est.stderr) or math.isnan(est.stderr))):
            raise NonFiniteProductError("non-finite trace estimate")
        self._cache[key] = est
        return est, checked.num_matvecs

    def publish_records(self, records: Iterable[Record | VectorRecord]) -> None:
        """Share a diagnostic's records of this step (the runner calls it after each diagnostic). Cost: O(1);
        the records are indexed only when a reader asks (:meth:`recorded`)."""
        self._cache.setdefault("records", []).append(records)

    def _recorded_table(self) -> dict[tuple[str, str], float]:
        lists = self._cache.get("records", [])
        table = self._cache.get("records_index")
        if table is None or table[0] != len(lists):
            values = {(r.metric, r.key): r.value for rs in lists for r in expand_records(rs) if r.index == 0}
            table = self._cache["records_index"] = (len(lists), values)
        return table[1]

    def recorded(self, metric: str, key: str = "all") -> float | None:
        """The value a diagnostic that ran earlier in this step recorded for ``(metric, key)`` (index 0), or
        None. A reader declares the writers in ``after``. Cost: O(records of the step) once per step."""
        return self._recorded_table().get((metric, key))

    def recorded_keys(self, metric: str) -> dict[tuple[str, str], float]:
        """Every key's value of ``metric`` recorded earlier in this step (index 0). Cost: O(records)."""
        return {mk: v for mk, v in self._recorded_table().items() if mk[0] == metric}

    def publish_alignment_statistics(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        """Share this step's spectral-alignment statistics per map key (``spectral_alignment`` calls it).

        Kept by reference and copied when first read (most steps have no reader); the publisher must not
        change ``stats`` afterwards."""
        self._cache.pop(("alignment_statistics",), None)
        self._cache[("alignment_statistics", "published")] = stats

    def alignment_statistics(self) -> dict[str, dict[str, Any]] | None:
        """This step's spectral-alignment statistics ``{map key: {positive_fraction, sign_diversity, mean,
        mean_abs, sigma1, num_tokens, ...}}`` (a copy), or None when ``spectral_alignment`` did not run.

        A reader declares ``after = ("spectral_alignment",)``. Cost: one copy of the statistics per step.
        """
        copied = self._cache.get(("alignment_statistics",))
        if copied is None:
            published = self._cache.get(("alignment_statistics", "published"))
            if published is None:
                return None
            copied = self._cache[("alignment_statistics",)] = {k: dict(v) for k, v in published.items()}
        return copied

    # --- layer inputs and outputs ------------------------------------------------------------------
    def _captured(self, modules: ModuleSpec, max_tokens: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        spec_key = modules if modules is None or isinstance(modules, (str, type)) else (
            tuple(modules) if isinstance(modules, (list, tuple)) else id(modules)
        )

        def run() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
            chosen = select_modules(self.model, modules)
            if not chosen:
                return {}, {}
            n = leading_size(self.batch) or 1
            # Enough samples to fill the token budget, no more: the forward pass costs what it captures.
            per = tokens_per_sample(self.batch)
            n_keep = max(1, min(n, math.ceil(max_tokens / max(per, 1))))
            sub = slice_batch(self.batch, n_keep)
            ins: dict[str, list[torch.Tensor]] = {}
            outs: dict[str, list[torch.Tensor]] = {}
            with torch.no_grad(), eval_mode(self.model):
                with capture_inputs(chosen, ins, max_rows=max_tokens), capture_outputs(chosen, outs, max_rows=max_tokens):
                    self.loss_fn(self.model, sub)
            return concat(ins), concat(outs)

        return self.cached(("captured", spec_key, max_tokens), run)

    def activations(self, modules: ModuleSpec = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> dict[str, torch.Tensor]:
        """Outputs of the chosen modules as ``{name: [tokens, features]}`` (at most ``max_tokens`` rows each).

        Captured by scoped forward hooks during one no-grad, eval-mode forward over a subsample of the
        step's batch; cached with ``layer_inputs`` (one forward serves both). Cost: one forward pass on
        about ``max_tokens`` tokens.
        """
        return self._captured(modules, max_tokens)[1]

    def layer_inputs(self, modules: ModuleSpec = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> dict[str, torch.Tensor]:
        """Inputs of the chosen modules as ``{name: [tokens, features]}``; same pass as :meth:`activations`."""
        return self._captured(modules, max_tokens)[0]

    # --- the optimizer's update ---------------------------------------------------------------------
    def snapshot_parameters(self) -> None:
        """Keep the trainable parameters' values before ``optimizer.step()`` (called by the Monitor).

        When every parameter has the same dtype and device they are copied into one flat tensor: one copy
        kernel instead of one per parameter, and the update is then one subtraction and its norm one
        reduction (on CPU, per-tensor launches cost more than the arithmetic for a small model). Mixed
        dtypes or devices fall back to one copy per parameter. Memory: one copy of the parameters.
        """
        flat = self.flat_parameters()  # a copy made this step already (weight norms) is reused
        if flat is not None:
            self._before_flat = flat
            self._before_update = None
        else:
            self._before_flat = None
            self._before_update = {n: p.detach().clone() for n, p in self.named_parameters()}

    def flat_parameters(self) -> tuple[torch.Tensor, list[str], list[torch.Tensor]] | None:
        """The trainable parameters copied back to back into one new 1-D tensor, with their names and the
        (detached) parameters giving the shapes; None when they do not share one dtype and device.

        Made once per step, before ``optimizer.step()`` (the values are those of the compute phase); the
        update snapshot reuses it. Cost: one copy kernel; memory: one copy of the parameters.
        """

        def build() -> tuple[torch.Tensor, list[str], list[torch.Tensor]] | None:
            named = self.named_parameters()
            tensors = [p.detach() for _, p in named]
            first = tensors[0] if tensors else None
            if first is None or not all(t.dtype == first.dtype and t.device == first.device for t in tensors):
                return None
            if not all(type(t) is torch.Tensor for t in tensors):  # DTensor shards (FSDP2): one norm per tensor
                return None
            return self._flat_copy(tensors), [n for n, _ in named], tensors

        return self.cached("flat_parameters", build)

    def _flat_copy(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """:func:`_flatten` into a buffer of the Monitor's kept from an earlier step when there is one."""
        if self._flat_buffers is None:
            return _flatten(tensors)
        first = tensors[0]
        out = self._flat_buffers.take(sum(t.numel() for t in tensors), first.dtype, first.device)
        return torch.cat([t.reshape(-1) for t in tensors], out=out)

    def release_snapshot(self) -> None:
        """Drop the parameters kept by :meth:`snapshot_parameters`."""
        self._before_flat = None
        self._before_update = None

    def update_flat(self) -> torch.Tensor | None:
        """The update ``after - before`` as one flat tensor in ``named_parameters()`` order, or None.

        None when the snapshot is not flat (mixed dtypes or devices). Only in ``compute_after_update``;
        computed once per step. Cost: one copy and one subtraction over the parameters.
        """
        if not self._after_update or (self._before_flat is None and self._before_update is None):
            raise ConfigError("ctx.update() is only available in compute_after_update (declare 'update' in requires)")
        if self._before_flat is None:
            return None

        def diff() -> torch.Tensor:
            before, _, tensors = self._before_flat
            return self._flat_copy(tensors).sub_(before)

        return self.cached("update_flat", diff)

    def update(self) -> dict[str, torch.Tensor]:
        """The parameter change made by ``optimizer.step()``, ``{name: after - before}``.

        Only available in ``compute_after_update``. Cost: one subtraction per parameter (once per step).
        """
        if not self._after_update or (self._before_flat is None and self._before_update is None):
            raise ConfigError("ctx.update() is only available in compute_after_update (declare 'update' in requires)")

        def diff() -> dict[str, torch.Tensor]:
            flat = self.update_flat()
            if flat is not None:
                _, names, tensors = self._before_flat
                return dict(zip(names, _unflatten(flat, tensors)))
            now = dict(self.named_parameters())
            names = [n for n in self._before_update if n in now]
            after = [now[n].detach() for n in names]
            before = [self._before_update[n] for n in names]
            try:
                deltas = torch._foreach_sub(after, before)  # one fused call instead of one per parameter
            except (RuntimeError, AttributeError, TypeError):
                deltas = [a - b for a, b in zip(after, before)]
            return dict(zip(names, deltas))

        return self.cached("update", diff)

    def params_before_update(self) -> dict[str, torch.Tensor]:
        """Parameter values saved just before ``optimizer.step()`` (only in ``compute_after_update``)."""
        if self._before_update is None and self._before_flat is not None:
            flat, names, tensors = self._before_flat
            self._before_update = dict(zip(names, _unflatten(flat, tensors)))  # views of the flat copy
        if self._before_update is None:
            raise ConfigError("parameters before the update are only kept for diagnostics that require 'update'")
        return self._before_update


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One new 1-D tensor holding ``tensors`` (detached) back to back: one copy kernel."""
    return torch._utils._flatten_dense_tensors(tensors)


def _unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like`` (inverse of :func:`_flatten`; no copy)."""
    return list(torch._utils._unflatten_dense_tensors(flat, like))
