"""Shared machinery of the curvature operators: data, parameter blocks, flattening, caching, averaging.

An operator represents a fixed matrix ``C = sum_b (|b|/N) C_b`` over a fixed list of batches, where
``C_b`` is the curvature (Hessian or GGN) of the mean loss on batch ``b`` with respect to the selected
parameters. Each batch is *linearised* once (one forward and one first backward pass: the
forward-over-reverse graph folded by :func:`torch.func.linearize`, or the retained first-backward graph
for double backward) and that linearisation is reused by every later product while it fits in the
cache budget; products then cost only the tangent/second-backward part.

Shapes: ``P`` parameters, ``K`` vectors; ``op @ v`` for ``v`` of shape ``[P]`` or ``[P, K]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from diagnostics._batch import batch_size, to_device
from diagnostics._kernels import twice_differentiable
from diagnostics._state import autograd_on, check_mode, isolated, seed_private
from diagnostics.errors import ConfigError, DataError, NonDeterministicOperatorError
from diagnostics.loss import check_loss, default_loss, select_params

__all__ = ["CurvatureOperator", "BlockView", "Linearisation", "DEFAULT_CACHE_BYTES", "BACKENDS"]

BACKENDS = ("auto", "fwd_rev", "rev_rev")
COLUMN_MODES = ("auto", "batched", "loop")

#: Default budget for cached per-batch linearisations (bytes of saved activations).
DEFAULT_CACHE_BYTES = 1 << 30


class Linearisation:
    """One batch's curvature, ready for products. Subclasses are built by a backend.

    Attributes:
        loss: the batch's mean loss (float).
        grad: the batch's mean-loss gradient, flat ``[P]``.
        nbytes: estimated memory it holds (saved activations), for the cache budget.
    """

    loss: float
    grad: Tensor
    nbytes: int = 0
    recomputes: bool = False  # True when each product reruns the forward pass (no reuse)
    #: Whether ``apply_batched`` beats one ``apply`` per column on CPU (see ``CurvatureOperator``'s
    #: ``column_mode``): False for products through a kept autograd graph, True for vmapped torch.func.
    batched_on_cpu: bool = True

    def apply(self, v: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Return ``C_b v`` for flat ``v`` ``[P]``."""
        raise NotImplementedError

    def apply_batched(self, rows: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Return ``(C_b rows^T)^T`` for ``rows`` ``[K, P]`` in one batched call (may raise)."""
        raise NotImplementedError


def _is_single_batch(data: Any) -> bool:
    if isinstance(data, (Tensor, Mapping)):
        return True
    if isinstance(data, (tuple, list)):
        return len(data) > 0 and all(isinstance(x, Tensor) for x in data)
    return False


def materialise_batches(data: Any, device: torch.device) -> list[Any]:
    """Return ``data`` as a list of batches on ``device``.

    ``data`` is one batch (a tensor, a tuple/list of tensors, a dict) or an iterable of batches (list,
    DataLoader). Iterables are consumed once, so every product sees the same batches in the same order.

    Raises:
        DataError: no data, or an empty iterable.
    """
    if data is None:
        raise DataError("curvature operators need data: pass one batch or a list of batches as data=")
    batches = [data] if _is_single_batch(data) else list(data)
    if not batches:
        raise DataError("data is empty: pass at least one non-empty batch")
    return [to_device(b, device) for b in batches]


def _all_reduce(t: Tensor) -> Tensor:
    # Guarded: a rank that failed elsewhere is noticed instead of leaving the others waiting.
    from diagnostics._distributed import guarded_all_reduce

    return guarded_all_reduce(t)


def _resolve_distributed(distributed: bool | None) -> bool:
    dist = torch.distributed
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed is True and not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "distributed=True but torch.distributed is not initialised; call init_process_group first"
        )
    return bool(active) and distributed is not False


class CurvatureOperator:
    """Base of :class:`HessianOperator` and :class:`GGNOperator`: a symmetric ``[P, P]`` linear operator.

    Args:
        model: the model (never mutated: parameters, buffers, ``.grad``, ``requires_grad``, modes and
            the global RNG streams are as before after construction and after every product).
        loss_fn: ``loss_fn(model, batch) -> scalar`` with mean reduction; ``None`` for ``default_loss``.
        data: one batch or an iterable of batches (materialised into a list, moved to the model's device).
        params: selection of parameters (names, module prefixes, globs); the operator is the block of the
            curvature for those parameters, the others held constant.
        backend: ``"fwd_rev"`` (forward-over-reverse: ``torch.func.jvp`` of ``grad``; recomputes the
            forward and first backward at every product unless ``linearize=True``), ``"rev_rev"`` (double backward through the kept first-backward graph: milliseconds
            to set up, products about one gradient) or ``"auto"`` (see :meth:`_choose_backend`:
            double backward with the kept graph when it fits ``max_cache_bytes``, else
            forward-over-reverse recomputed per product when the ops support forward mode).
        mode: ``"eval"`` (default: dropout off, BatchNorm running statistics) or ``"train"``.
        distributed: average over ``torch.distributed`` ranks (weighted by sample counts); ``None`` means
            whenever a process group with world size > 1 is initialised.
        max_cache_bytes: memory budget for cached per-batch linearisations; batches beyond it are
            re-linearised at every product (correct, about 2x slower). 0 disables caching.
        linearize: with ``backend="fwd_rev"``, linearise each batch once by ``torch.func.linearize``
            (products then run only the tangent half). Tracing costs seconds per batch on a small
            transformer, so this pays off only for long estimates; double backward reuses its kept
            graph at a set-up cost of one gradient.
        seed: seed of the private generator used for random ops in train mode and for probe vectors.
        column_chunk: ``chunk_size`` of the vmap over columns of ``[P, K]`` inputs (memory bound).
        column_mode: how ``[P, K]`` products are taken: ``"batched"`` (one vmapped call over the
            columns: ``is_grads_batched`` for a kept graph, ``vmap`` for torch.func), ``"loop"`` (one
            product per column through the same linearisation) or ``"auto"``: batched except for a kept
            autograd graph on CPU, where the loop was faster (digits MLP, one thread: 1.0-1.2 gradients
            per column looped vs 1.2-2.7 with ``is_grads_batched``; forward-over-reverse recomputed per
            product is 6-15 gradients for one column and 2-3 per column vmapped).
    """

    kind: str = "curvature"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        data: Any = None,
        params: None | str | Iterable[str | Tensor] = None,
        backend: str = "auto",
        mode: str = "eval",
        distributed: bool | None = None,
        *,
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
        linearize: bool = False,
        seed: int = 0,
        column_chunk: int | None = None,
        column_mode: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if column_mode not in COLUMN_MODES:
            raise ConfigError(f"column_mode must be one of {COLUMN_MODES}, not {column_mode!r}")
        # Functional calls on a DDP wrapper would arm its reducer for a backward that never reaches it.
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        self.model = model
        self.loss_fn = default_loss if loss_fn is None else loss_fn
        self.mode = check_mode(mode)
        self.requested_backend = backend
        self._backend = None if backend == "auto" else backend
        self.max_cache_bytes = int(max_cache_bytes)
        self.linearize = bool(linearize)
        self.seed = int(seed)
        self.column_chunk = column_chunk
        self.column_mode = column_mode
        self._check_loss_fn()

        selected = select_params(model, params)
        self.param_names: list[str] = list(selected)
        self.param_shapes: dict[str, torch.Size] = {n: p.shape for n, p in selected.items()}
        self._param_dtypes = {n: p.dtype for n, p in selected.items()}
        self.param_slices: dict[str, slice] = {}
        offset = 0
        for n, p in selected.items():
            self.param_slices[n] = slice(offset, offset + p.numel())
            offset += p.numel()
        self.num_params = offset
        dtype = next(iter(selected.values())).dtype
        for p in selected.values():
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype: torch.dtype = dtype
        self.device: torch.device = next(iter(selected.values())).device
        self.shape: tuple[int, int] = (offset, offset)
        self._numels = [p.numel() for p in selected.values()]
        self._shapes = [tuple(p.shape) for p in selected.values()]
        self._dtypes = [p.dtype for p in selected.values()]
        self._same_dtype = all(dt == dtype for dt in self._dtypes)

        self.batches = materialise_batches(data, self.device)
        sizes = [batch_size(b) for b in self.batches]
        for i, s in enumerate(sizes):
            if s <= 0:
                raise DataError(f"batch {i} is empty: every batch needs at least one sample")
        self.batch_sizes = sizes
        self.distributed = _resolve_distributed(distributed)
        total = float(sum(sizes))
        if self.distributed:
            t = torch.tensor(total, dtype=torch.float64, device=self._comm_device())
            _all_reduce(t)
            total = float(t)
        self.num_samples = int(round(total))
        self.num_matvecs = 0
        self._cache: dict[int, Linearisation] = {}
        self._cache_bytes = 0
        self._state: dict[str, Tensor] | None = None  # the parameters and buffers frozen by freeze()
        self._batched_ok = True
        # Single batch, one process: the weight |b|/N is 1, so products skip the weighting passes.
        self._unit_weight = len(self.batches) == 1 and not self.distributed

    # ------------------------------------------------------------------ subclass hooks

    def _check_loss_fn(self) -> None:
        if not callable(self.loss_fn):
            raise ConfigError(
                f"loss_fn must be callable as loss_fn(model, batch), got {type(self.loss_fn).__name__}"
            )

    def _build(self, backend: str, index: int) -> Linearisation:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ flattening

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate ``{name: tensor}`` (selected names, in order) into a flat ``[P]`` vector (op dtype)."""
        missing = [n for n in self.param_names if n not in tensors]
        if missing:
            raise ConfigError(f"flatten: missing entries for parameters {missing[:5]}")
        return torch.cat(
            [tensors[n].reshape(-1).to(dtype=self.dtype, device=self.device) for n in self.param_names]
        )

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat ``[P]`` vector into ``{name: tensor}`` of the parameters' shapes and dtypes (views)."""
        if vector.shape[-1] != self.num_params:
            raise ConfigError(
                f"vector has {vector.shape[-1]} entries; the operator has {self.num_params} parameters"
            )
        return dict(zip(self.param_names, self._split(vector)))

    def _split(self, vector: Tensor) -> list[Tensor]:
        """The pieces of a flat ``[..., P]`` vector, in ``param_names`` order: views in one ``split`` call
        (a dtype conversion only for parameters whose dtype differs from the operator's)."""
        lead = vector.shape[:-1]
        pieces = vector.split(self._numels, dim=-1)
        if self._same_dtype:
            return [x.reshape(*lead, *shape) for x, shape in zip(pieces, self._shapes)]
        return [x.reshape(*lead, *shape).to(dt) for x, shape, dt in zip(pieces, self._shapes, self._dtypes)]

    def _params(self) -> dict[str, Tensor]:
        if self._state is not None:
            return {n: self._state[n] for n in self.param_names}
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.param_names}

    def freeze(self) -> CurvatureOperator:
        """Fix the point the curvature is taken at: later products use a copy of the parameters and
        buffers as they are now, whatever training does to the model meanwhile (for a probe spread over
        training steps). Drops linearisations built before. Returns the operator itself.

        Cost: one copy of the parameters and buffers, held until the operator is freed.
        """
        with torch.no_grad():
            state = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            state.update({n: b.detach().clone() for n, b in self.model.named_buffers()})
        self._state = state
        self.clear_cache()
        return self

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` fixed the parameters and buffers the products use."""
        return self._state is not None

    def _flat(
        self, parts: Mapping[str, Tensor | None] | Iterable[Tensor | None], batched: int | None = None
    ) -> Tensor:
        """Flatten gradient-like pieces (``None`` means zero), keeping a leading batch dim ``batched``."""
        values = list(parts.values()) if isinstance(parts, Mapping) else list(parts)
        out = []
        for n, v in zip(self.param_names, values):
            numel = self.param_slices[n].stop - self.param_slices[n].start
            if v is None:
                shape = (numel,) if batched is None else (batched, numel)
                out.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
            else:
                out.append(
                    v.reshape(-1, numel).to(self.dtype)
                    if batched is not None
                    else v.reshape(-1).to(self.dtype)
                )
        return torch.cat(out, dim=-1)

    # ------------------------------------------------------------------ linearisations

    def _comm_device(self) -> torch.device:
        return self.device

    def _linearise(self, index: int, *, fresh: bool = False, seed: int | None = None) -> Linearisation:
        """Return batch ``index``'s linearisation: cached, or built (one forward + one first backward)."""
        if not fresh and index in self._cache:
            return self._cache[index]
        # Random ops (dropout in train mode) draw from a private seed per batch, re-applied before every
        # forward of that batch, so that all passes of one linearisation see the same masks.
        self._build_seed = self.seed * 1_000_003 + index if seed is None else seed
        seed_private(self._build_seed)
        lin = self._choose_backend(index) if self._backend is None else self._build(self._backend, index)
        check_loss(torch.tensor(lin.loss), index)
        if not fresh and self._cache_bytes + lin.nbytes <= self.max_cache_bytes:
            self._cache[index] = lin
            self._cache_bytes += lin.nbytes
        return lin

    def _choose_backend(self, index: int) -> Linearisation:
        """Resolve ``backend="auto"`` on the first batch built.

        Measured (see ``tests/curvature/test_curvature_cost.py``): with the linearisation kept, a double
        backward product costs about one gradient and takes milliseconds to set up, while tracing a
        forward-over-reverse linearisation (``torch.func.linearize``) takes seconds. So "auto" keeps the
        first-backward graph whenever it fits the cache budget. When it does not fit, every product
        recomputes the batch anyway, and forward-over-reverse (``jvp`` of ``grad``, no graph kept) is used
        if every op supports forward-mode AD, else double backward.
        """
        kept = self._build("rev_rev", index)
        if self._cache_bytes + kept.nbytes <= self.max_cache_bytes:
            self._backend = "rev_rev"
            return kept
        try:
            self.linearize = False
            lin = self._build("fwd_rev", index)
            lin.apply(torch.zeros(self.num_params, dtype=self.dtype, device=self.device))
            self._backend = "fwd_rev"
            return lin
        except (RuntimeError, NotImplementedError):
            # An op without forward-mode AD: double backward always works.
            self._backend = "rev_rev"
            return kept

    @property
    def backend(self) -> str | None:
        """The backend in use (``"fwd_rev"`` or ``"rev_rev"``); ``None`` until "auto" has been resolved."""
        return self._backend

    @property
    def reuses_linearisation(self) -> bool:
        """True when every batch's linearisation is cached and products skip the forward pass."""
        return self._reuses()

    def _reuses(self) -> bool:
        if len(self._cache) != len(self.batches):
            return False
        return not any(lin.recomputes for lin in self._cache.values())

    def clear_cache(self) -> None:
        """Drop cached linearisations (frees their memory; later products re-linearise)."""
        self._cache.clear()
        self._cache_bytes = 0

    @property
    def cache_bytes(self) -> int:
        """Estimated bytes held by cached linearisations."""
        return self._cache_bytes

    # ------------------------------------------------------------------ reductions

    def _reduce(self, local_sum: Tensor) -> Tensor:
        """Turn ``sum_b |b| x_b`` on this rank into the global mean ``sum_ranks sum_b |b| x_b / N``."""
        if self.distributed:
            _all_reduce(local_sum)
        return local_sum / self.num_samples

    def _weighted(
        self, fn: Callable[[Linearisation], Tensor], fresh: bool = False, seed: int | None = None
    ) -> Tensor:
        if self._unit_weight:
            return fn(self._linearise(0, fresh=fresh, seed=seed))
        total: Tensor | None = None
        for i, size in enumerate(self.batch_sizes):
            lin = self._linearise(i, fresh=fresh, seed=None if seed is None else seed + i)
            part = fn(lin)
            # The first part may be a cached tensor (lin.grad): scale out of place once, then accumulate.
            total = part * size if total is None else total.add_(part, alpha=size)
        assert total is not None
        return self._reduce(total)

    # ------------------------------------------------------------------ products

    def _prepare(self, V: Tensor | Any) -> Tensor:
        V = torch.as_tensor(V).to(device=self.device, dtype=self.dtype)
        if V.ndim not in (1, 2) or V.shape[0] != self.num_params:
            raise ConfigError(
                f"operator of shape {self.shape} got a vector of shape {tuple(V.shape)}; pass [P] or [P, K] with P={self.num_params}"
            )
        return V

    def _use_batched(self, lin: Linearisation) -> bool:
        if not self._batched_ok or self.column_mode == "loop":
            return False
        return self.column_mode == "batched" or self.device.type != "cpu" or lin.batched_on_cpu

    def _apply_rows(self, lin: Linearisation, rows: Tensor) -> Tensor:
        if rows.shape[0] > 1 and self._use_batched(lin):
            try:
                return lin.apply_batched(rows)
            except (RuntimeError, NotImplementedError):
                # Some ops have no batching rule: fall back to one product per column.
                self._batched_ok = False
        out = torch.empty_like(rows)
        for j, r in enumerate(rows):
            out[j] = lin.apply(r)
        return out

    def matvec(self, V: Tensor, *, _fresh: bool = False, _seed: int | None = None) -> Tensor:
        """Return ``C @ V`` for ``V`` of shape ``[P]`` or ``[P, K]`` (op dtype, op device).

        Cost: K products per batch (vmapped over columns when the backend allows), plus one
        linearisation (forward + first backward) per batch not yet cached. Works inside a caller's
        ``torch.no_grad`` or ``torch.inference_mode`` (the products enable autograd for themselves).
        """
        V = self._prepare(V)
        cached = not _fresh and self._reuses()
        # Products on kept linearisations run no forward pass: no mode switch or RNG fork needed.
        ctx = autograd_on() if cached else isolated(self.model, self.mode, grad=True)
        with ctx, twice_differentiable():
            if V.ndim == 1:
                out = self._weighted(lambda lin: lin.apply(V), fresh=_fresh, seed=_seed)
            else:
                rows = V.T.contiguous()
                out = self._weighted(lambda lin: self._apply_rows(lin, rows), fresh=_fresh, seed=_seed).T
        self.num_matvecs += 1 if V.ndim == 1 else V.shape[1]
        return out.detach()

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.matvec(V)

    def gradient(self) -> Tensor:
        """Return the mean-loss gradient over the data, flat ``[P]`` (free once the batches are linearised)."""
        with isolated(self.model, self.mode, grad=True), twice_differentiable():
            # A copy: with one batch the weighted sum is the cached gradient itself.
            return self._weighted(lambda lin: lin.grad).detach().clone()

    def loss(self) -> float:
        """Return the mean loss over the data (free once the batches are linearised)."""
        with isolated(self.model, self.mode, grad=True), twice_differentiable():
            return float(
                self._weighted(lambda lin: torch.tensor(lin.loss, dtype=torch.float64, device=self.device))
            )

    def check_deterministic(self, v: Tensor | None = None, rtol: float | None = None) -> None:
        """Check that the operator is a fixed matrix: two fresh linearisations give the same product.

        Each check re-linearises every batch twice with different seeds for random ops, so dropout in
        train mode or data that is resampled at every pass are caught. Cost: 2 linearisations and
        2 products per batch. The probe comes from a private generator.

        Raises:
            NonDeterministicOperatorError: the products differ by more than ``rtol`` (dtype-relative
                default: ``100 * eps`` of the operator's dtype, at least 1e-5 for float32).
        """
        if v is None:
            gen = torch.Generator(device="cpu").manual_seed(self.seed + 12345)
            v = torch.randn(self.num_params, generator=gen, dtype=torch.float64)
        tol = rtol if rtol is not None else max(1e3 * torch.finfo(self.dtype).eps, 1e-12)
        a = self.matvec(v, _fresh=True, _seed=self.seed * 7919 + 1)
        b = self.matvec(v, _fresh=True, _seed=self.seed * 7919 + 104729)
        self.num_matvecs -= 2  # checks are not part of an estimate's cost
        scale = max(float(a.norm()), float(b.norm()), torch.finfo(self.dtype).tiny)
        diff = float((a - b).norm()) / scale
        if not math.isfinite(diff) or diff > tol:
            raise NonDeterministicOperatorError(
                f"{type(self).__name__}: the same vector gave products differing by {diff:.3g} (relative, "
                f"tolerance {tol:.1g}); the operator is not a fixed matrix. Usual causes: dropout or other "
                f"random layers in train mode (use mode='eval', current mode={self.mode!r}), data resampled or "
                "augmented at every pass (pass fixed batches), or non-deterministic kernels."
            )

    # ------------------------------------------------------------------ blocks

    def block(self, params: str | Iterable[str]) -> BlockView:
        """The diagonal block ``C[S, S]`` for a selection ``S`` (names, prefixes, globs) of this operator's
        parameters, sharing this operator's linearisations (no new forward/backward passes).

        Cost of a block product: one product of this operator (the vector is embedded with zeros).
        """
        from diagnostics.loss import matches_name

        patterns = [params] if isinstance(params, str) else list(params)
        names: list[str] = []
        for pat in patterns:
            hit = [n for n in self.param_names if matches_name(n, pat)]
            if not hit:
                raise ConfigError(
                    f"block pattern {pat!r} matches none of the operator's parameters {self.param_names[:6]}"
                )
            names += [n for n in hit if n not in names]
        return BlockView(self, [n for n in self.param_names if n in names])

    def layer_blocks(self) -> dict[str, BlockView]:
        """One diagonal block per module (parameters grouped by the name before the last dot), in one
        linearisation: ``{module_name: BlockView}``; products with all of them can be taken from one
        ``[P, K]`` product of the parent via :meth:`block_diagonal_matvec`."""
        groups: dict[str, list[str]] = {}
        for n in self.param_names:
            groups.setdefault(n.rpartition(".")[0] or n, []).append(n)
        return {g: BlockView(self, names) for g, names in groups.items()}

    def block_diagonal_matvec(self, V: Tensor, blocks: Mapping[str, BlockView] | None = None) -> Tensor:
        """Product with the block-diagonal part ``diag(C_11, ..., C_LL)`` (default: :meth:`layer_blocks`).

        One batched call: each column is split into its L block pieces (zeros elsewhere), giving
        ``[P, L*K]`` products of the parent, of which each block keeps its own rows.
        Cost: L*K products (vmapped), no extra linearisation.
        """
        blocks = self.layer_blocks() if blocks is None else blocks
        V = self._prepare(V)
        cols = V[:, None] if V.ndim == 1 else V
        masks = [torch.zeros(self.num_params, dtype=torch.bool, device=self.device) for _ in blocks]
        for m, b in zip(masks, blocks.values()):
            m[b._index] = True
        stacked = torch.cat([cols * m[:, None] for m in masks], dim=1)  # [P, L*K]
        out = self.matvec(stacked)
        k = cols.shape[1]
        result = torch.zeros_like(cols)
        for j, m in enumerate(masks):
            result[m] += out[m, j * k : (j + 1) * k]
        return result[:, 0] if V.ndim == 1 else result

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(P={self.num_params}, batches={len(self.batches)}, N={self.num_samples}, "
            f"backend={self.backend or 'auto'}, mode={self.mode!r}, dtype={self.dtype}, device={self.device})"
        )


class BlockView:
    """A diagonal block ``C[S, S]`` of a curvature operator, sharing the parent's linearisations.

    Implements the LinearOperator protocol (``shape``, ``dtype``, ``device``, ``@``) over the flattened
    parameters of the block, plus ``param_names``, ``param_slices``, ``num_params``, ``num_matvecs``.
    """

    def __init__(self, parent: CurvatureOperator, names: list[str]) -> None:
        self.parent = parent
        self.param_names = names
        self.param_shapes = {n: parent.param_shapes[n] for n in names}
        self.param_slices: dict[str, slice] = {}
        offset = 0
        idx = []
        for n in names:
            sl = parent.param_slices[n]
            self.param_slices[n] = slice(offset, offset + sl.stop - sl.start)
            offset += sl.stop - sl.start
            idx.append(torch.arange(sl.start, sl.stop, device=parent.device))
        self._index = torch.cat(idx)
        self.num_params = offset
        self.shape = (offset, offset)
        self.dtype = parent.dtype
        self.device = parent.device
        self.num_matvecs = 0

    def __matmul__(self, V: Tensor) -> Tensor:
        V = torch.as_tensor(V).to(device=self.device, dtype=self.dtype)
        if V.ndim not in (1, 2) or V.shape[0] != self.num_params:
            raise ConfigError(f"block of shape {self.shape} got a vector of shape {tuple(V.shape)}")
        full = torch.zeros((self.parent.num_params, *V.shape[1:]), dtype=self.dtype, device=self.device)
        full[self._index] = V
        self.num_matvecs += 1 if V.ndim == 1 else V.shape[1]
        return (self.parent @ full)[self._index]

    def __repr__(self) -> str:
        return f"BlockView({self.param_names}, P={self.num_params}) of {self.parent!r}"
