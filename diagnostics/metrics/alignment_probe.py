"""The in-loop measurement of spectral alignment: following v_1 and projecting layer inputs on it.

- v_1 of each map is tracked by warm-started power iteration (:func:`diagnostics.linalg.power.power_steps`
  after a cold start by :func:`diagnostics.linalg.power.top_singular_vector`), never a full SVD; the
  warm start also carries the sign of v_1 from probe to probe, so p+ and the mean form continuous series.
- inputs are seen by scoped forward pre-hooks (:func:`projection_hooks`); only a token subsample of the
  rows is kept (one draw from a private generator per row count, shared by the modules), gathered inside
  the hook for a large input and after the forward for a small one (the hook then keeps a reference, at
  most :data:`DEFER_FACTOR` times the rows it keeps), so the memory added is a small multiple of the
  token budget times the input width per module, independent of the sequence length; after the forward
  :func:`project_all` (or :func:`cosine_matrices`) projects every module's rows on its v_1 in a few
  batched products (one per input width), on the device, leaving one host transfer for the statistics.
- products of a stack of matrices with one vector each are taken as row vectors times matrices
  (``v^T W^T``, ``u^T W``): on CPU a batched product with a single column is several times slower.

Definitions: docs/metrics.md, "Spectral alignment".
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from diagnostics._hooks import HookClock, TrainingForwardGate
from diagnostics.errors import DataError
from diagnostics.linalg.power import power_steps, top_singular_vector
from diagnostics.metrics.alignment_stats import finish_cosines
from diagnostics.metrics.linear_maps import LinearMap

__all__ = ["ProjectionHooks", "Projector", "RowSampler", "cosine_matrices", "gather_rows", "group_by_module",
           "project_all", "project_rows", "projection_hooks", "top_vectors"]


def _input_tensor(kind: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    x = args[0] if args else kwargs.get("query" if kind == "mha" else "input", kwargs.get("x"))
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 1:
        return None
    return x.detach()


def project_rows(
    x: torch.Tensor,
    V: torch.Tensor,
    max_rows: int,
    generator: torch.Generator | None = None,
    chunk_rows: int = 256,
    eps: float = 1e-12,
    finish: bool = True,
) -> torch.Tensor:
    """Cosines of (a random subsample of) the rows of ``x`` with each column of ``V``.

    Rows are the vectors along the last dimension of ``x`` (tokens). When there are more than
    ``max_rows`` of them, ``max_rows`` row indices are drawn uniformly (with replacement, from
    ``generator``) and only those rows are gathered (:func:`gather_rows`), so the memory used here is
    O(max_rows * in) whatever the number of rows of ``x`` (no reshape copy of ``x``).
    Zero or non-finite rows get cosine 0 (counted as neither sign).

    Args:
        x: [..., in] inputs (any leading shape, any strides).
        V: [in, K] unit columns (v_1 of K maps sharing this input).
        max_rows: token budget.
        generator: private generator for the subsample (the global RNG is untouched).
        chunk_rows: rows projected at once.
        finish: map non-finite cosines to 0 and clamp to [-1, 1] here; False leaves that to the caller
            (:func:`~diagnostics.metrics.alignment_stats.batched_alignment_statistics` does it for all
            maps at once).

    Returns:
        [R, K] float32 (or float64 for float64 inputs) cosines in [-1, 1], R = min(rows, max_rows).
        Cost O(R * in * K).
    """
    n = math.prod(x.shape[:-1])
    if n == 0:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return torch.zeros(0, V.shape[1], dtype=dtype, device=x.device)
    pick = torch.randint(n, (max_rows,), generator=generator).to(x.device) if n > max_rows else None
    out = _cosines(gather_rows(x, pick)[None], V.T[None], chunk_rows, eps)[0].T
    return finish_cosines(out) if finish else out


def _as(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` in ``dtype`` on ``device``; ``t`` itself when it already is (a per-call saving on small maps)."""
    return t if t.dtype == dtype and t.device == device else t.to(device=device, dtype=dtype)


def _cosines(X: torch.Tensor, Vt: torch.Tensor, chunk_rows: int, eps: float) -> torch.Tensor:
    """``[G, K, R]`` cosines of the rows of ``X`` ``[G, R, in]`` with the rows of ``Vt`` ``[G, K, in]``
    (contiguous, one row of R cosines per map), one batched product per ``chunk_rows`` rows, in float32 or
    wider. Zero rows give 0 / eps = 0, non-finite rows NaN
    (:func:`~diagnostics.metrics.alignment_stats.finish_cosines` maps them to 0)."""
    dtype = X.dtype if X.dtype in _WIDE else torch.promote_types(X.dtype, torch.float32)
    Vt = _as(Vt, dtype, X.device)
    blocks = []
    for lo in range(0, X.shape[1], chunk_rows):
        part = X if X.shape[1] <= chunk_rows else X[:, lo : lo + chunk_rows]
        part = part if part.dtype == dtype else part.to(dtype)
        norms = torch.linalg.vector_norm(part, dim=2).clamp_min_(eps).unsqueeze(1)
        # [G, K, R] = V^T X^T: few rows times a matrix, several times faster on CPU than X V with few columns.
        blocks.append(torch.bmm(Vt, part.transpose(1, 2)).div_(norms))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 2)


#: dtypes the cosines are computed in as they are (narrower ones are promoted to float32)
_WIDE = frozenset({torch.float32, torch.float64})


class RowSampler:
    """The token rows the hooks of one forward keep: one uniform draw (with replacement, from a private
    generator) per distinct row count and budget, shared by every module that sees that many rows.

    Sharing the draw keeps one ``randint`` per forward instead of one per module, and makes every map's
    cosines come from the same token positions. Each map's sample is still uniform over its own rows.
    """

    __slots__ = ("_gathered", "_picks", "generator")

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._picks: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._gathered: dict[tuple[Any, ...], torch.Tensor] = {}

    def pick(self, n: int, k: int, device: torch.device) -> torch.Tensor | None:
        """``k`` row indices in ``[0, n)`` on ``device``, or None when all ``n <= k`` rows are kept."""
        if n <= k:
            return None
        key = (n, k, device)
        idx = self._picks.get(key)
        if idx is None:
            idx = torch.randint(n, (k,), generator=self.generator).to(device)
            self._picks[key] = idx
        return idx


    def gather_kept(self, x: torch.Tensor, keep: int) -> torch.Tensor:
        """``keep`` rows of ``x`` gathered after the forward (:meth:`Projector.rows`), once per input.

        Modules that read the same tensor (the query, key and value projections of one input) share one
        gather. Only for inputs the projectors still hold, so equal addresses mean the same memory."""
        key = (x.data_ptr(), x.dtype, x.device, x.shape, x.stride(), x._version, keep)
        rows = self._gathered.get(key)
        if rows is None:  # (``x`` is detached: the gather records no graph, no need for no_grad)
            rows = self._gathered[key] = gather_rows(x, self.pick(math.prod(x.shape[:-1]), keep, x.device))
        return rows


def gather_rows(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """A ``[R, in]`` copy of the rows ``idx`` of ``x`` ``[..., in]`` (all rows when None).

    A contiguous ``x`` is viewed as ``[n, in]``; a strided one is indexed by multi-index, so it is never
    copied whole. Cost: one gather of R rows.
    """
    lead = x.shape[:-1]
    if x.is_contiguous():
        flat = x.view(-1, x.shape[-1])
        return flat.clone() if idx is None else flat.index_select(0, idx)
    if idx is None:
        return x.reshape(-1, x.shape[-1]).clone()
    return x[torch.unravel_index(idx, lead)] if len(lead) > 1 else x[idx]


#: An input whose storage holds at most this many times the rows a hook keeps is gathered after the
#: forward instead of inside it (the hook keeps a reference): inside the forward a gather costs several
#: times its own time on small layers (benchmarks/RESULTS.md, "Spectral alignment every step"), while the
#: memory kept stays within a small multiple of the token budget.
DEFER_FACTOR = 4


class Projector:
    """Forward pre-hook target of one module: keeps a token subsample of its inputs within budget.

    The hook only gathers rows (at most ``budget`` over all the forwards it sees, on the input's device);
    :func:`project_all` projects the rows of every module at once after the forward. An input whose
    storage is at most :data:`DEFER_FACTOR` times the rows kept is gathered when the rows are read
    (:meth:`rows`) rather than in the forward; if it was modified in place in between, its rows are
    left out. Memory: ``DEFER_FACTOR * budget * in`` values per
    module at most, whatever the sequence length. Cost per forward: one gather.
    """

    # Slots: read at every step right after the training step, on caches it has cleared, where each
    # object's attribute dict costs misses of its own.
    __slots__ = ("_V", "blocks", "budget", "columns", "count", "gate", "kind", "sampler", "width")

    def __init__(self, kind: str, V: torch.Tensor, budget: int, sampler: RowSampler | None,
                 gate: TrainingForwardGate | None = None) -> None:
        self.kind = kind
        #: with a gate, rows are kept only in a training forward (``gate.allows(module)``)
        self.gate = gate
        self.reset(V, budget, sampler)

    def reset(self, V: torch.Tensor | tuple[torch.Tensor, ...], budget: int, sampler: RowSampler | None) -> None:
        """Start afresh: project on ``V`` (``[in, K]``, or its K columns as a tuple of ``[in]`` vectors,
        float32 or wider), keep up to ``budget`` rows drawn by ``sampler``."""
        if isinstance(V, tuple):
            self.columns: tuple[torch.Tensor, ...] | None = V
            self._V: torch.Tensor | None = None
            self.width = V[0].shape[0]
        else:
            self.columns, self._V, self.width = None, V, V.shape[0]
        self.budget = budget
        self.sampler = sampler
        #: gathered rows, or (input, its version, rows to keep) for an input gathered when read
        self.blocks: list[Any] = []
        self.count = 0

    @property
    def V(self) -> torch.Tensor:
        """The ``[in, K]`` vectors the rows are projected on."""
        if self._V is None:
            cols = self.columns
            self._V = cols[0].unsqueeze(1) if len(cols) == 1 else torch.stack(cols, 1)
        return self._V

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        room = self.budget - self.count
        if room <= 0 or (self.gate is not None and not self.gate.allows(module)):
            return
        x = _input_tensor(self.kind, args, kwargs)
        if x is None or x.shape[-1] != self.width:
            return
        n = math.prod(x.shape[:-1])
        if n == 0:
            return
        keep = min(n, room)
        if self._deferrable(x, keep):
            self.blocks.append((x, x._version, keep))
        else:  # ``x`` is detached: the gather is never part of the user's graph
            self.blocks.append(gather_rows(x, self.sampler.pick(n, room, x.device)))
        self.count += keep

    @staticmethod
    def _deferrable(x: torch.Tensor, keep: int) -> bool:
        """Whether ``x`` may be kept by reference: small storage, and a version counter to check it against
        (inference-mode tensors have none; tensors without a plain storage are gathered at once)."""
        if x.is_inference():
            return False
        try:
            nbytes = x.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return False
        return nbytes <= DEFER_FACTOR * keep * x.shape[-1] * x.element_size()

    def rows(self) -> torch.Tensor | None:
        """The ``[R, in]`` rows kept so far, or None. Cost: the gathers left from the forward."""
        blocks = []
        for b in self.blocks:
            if isinstance(b, tuple):
                x, version, keep = b
                if x._version != version:  # modified in place since the forward: its rows are gone
                    continue
                b = self.sampler.gather_kept(x, keep)
            blocks.append(b)
        if not blocks:
            self.blocks = []
            return None
        self.blocks = [blocks[0] if len(blocks) == 1 else torch.cat(blocks, 0)]
        return self.blocks[0]

    def cosines(self, chunk_rows: int = 256) -> torch.Tensor | None:
        """The ``[R, K]`` cosines of the rows kept (not finished: see :func:`project_rows`), or None."""
        return project_all({"": self}, chunk_rows).get("")


def _grouped_cosines(projectors: Mapping[str, Projector], chunk_rows: int,
                     eps: float) -> list[tuple[list[str], torch.Tensor]]:
    """``[(module names, [G, K, R] cosines)]``, one batched projection per group of modules whose rows and
    V have the same shapes, dtype and device."""
    groups: dict[tuple[Any, ...], list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for name, proj in projectors.items():
        rows = proj.rows()
        if rows is None or rows.shape[0] == 0:
            continue
        cols = proj.columns
        # v_1 given as columns: stacked for the whole group at once below, with no [in, K] matrix per module
        v = cols[0] if cols is not None else proj.V
        key = (rows.shape, rows.dtype, rows.device, cols is None, len(cols) if cols else v.shape, v.dtype,
               v.device)
        groups.setdefault(key, []).append((name, rows, proj))
    out = []
    for key, items in groups.items():
        X = torch.stack([r for _, r, _ in items]) if len(items) > 1 else items[0][1][None]
        if key[3]:  # [G, in, K] matrices
            Vt = torch.stack([p.V for _, _, p in items]).transpose(1, 2)
        else:  # the G * K columns as [G, K, in], contiguous
            Vt = torch.stack([c for _, _, p in items for c in p.columns]).view(len(items), key[4], -1)
        out.append(([name for name, _, _ in items], _cosines(X, Vt, chunk_rows, eps)))
    return out


def project_all(projectors: Mapping[str, Projector], chunk_rows: int = 256,
                eps: float = 1e-12) -> dict[str, torch.Tensor]:
    """Cosines of every projector's rows with its V: ``{name: [R, K]}`` (not finished).

    Modules whose rows and V have the same shapes, dtype and device are projected together, one batched
    product per ``chunk_rows`` rows: a transformer's maps fall into a few such groups (one per input
    width), so the kernel count does not grow with the number of layers. Zero rows give cosine 0,
    non-finite rows NaN (:func:`~diagnostics.metrics.alignment_stats.finish_cosines` maps them to 0).
    Cost: O(R * in * K) per module.
    """
    return {name: cos[i].T for names, cos in _grouped_cosines(projectors, chunk_rows, eps)
            for i, name in enumerate(names)}


def cosine_matrices(projectors: Mapping[str, Projector], by_module: Mapping[str, list[LinearMap]],
                    chunk_rows: int = 256, eps: float = 1e-12) -> list[tuple[list[str], torch.Tensor]]:
    """The cosines of :func:`project_all` as one ``[M, R]`` matrix per token count R, with its M map keys.

    Each row is one map's cosines (the column of its module's V that belongs to it, ``by_module``'s
    order), ready for :func:`~diagnostics.metrics.alignment_stats.batched_alignment_statistics`; no
    per-map slicing. Cost: that of :func:`project_all` plus one copy of the cosines.
    """
    parts: dict[int, tuple[list[str], list[torch.Tensor]]] = {}
    for names, cos in _grouped_cosines(projectors, chunk_rows, eps):
        g, k, r = cos.shape
        keys = [mp.key for name in names for mp in by_module[name][:k]]
        entry = parts.setdefault(r, ([], []))
        entry[0].extend(keys)
        entry[1].append(cos.reshape(g * k, r))  # a view: the rows are already one map each
    return [(keys, mats[0] if len(mats) == 1 else torch.cat(mats, 0)) for keys, mats in parts.values()]


def group_by_module(
    maps: list[LinearMap], vectors: Mapping[str, torch.Tensor | None]
) -> dict[str, list[LinearMap]]:
    """The maps that have a v_1, grouped by the module whose input they share (split fused projections)."""
    by_module: dict[str, list[LinearMap]] = {}
    for mp in maps:
        if vectors.get(mp.key) is not None:
            by_module.setdefault(mp.module_name, []).append(mp)
    return by_module


@contextlib.contextmanager
def projection_hooks(
    by_module: dict[str, list[LinearMap]],
    vectors: Mapping[str, torch.Tensor],
    modules: dict[str, nn.Module],
    budget: int,
    generator: torch.Generator,
    clock: HookClock | None = None,
) -> Iterator[dict[str, Projector]]:
    """Scoped forward pre-hooks keeping a token subsample of each module's inputs; removed in finally.

    Yields ``{module name: Projector}``; after the forward, :func:`project_all` gives the cosines. Cost:
    one gather per module and forward (see :class:`Projector`); ``clock`` (optional) adds up the hooks'
    time.
    """
    hooks = ProjectionHooks(by_module, modules, clock)
    try:
        yield hooks.arm(by_module, vectors, budget, generator)
    finally:
        hooks.remove()


class ProjectionHooks:
    """One forward pre-hook (a :class:`Projector`) per module of ``by_module``, kept until :meth:`remove`.

    :meth:`arm` readies the projectors for one forward (new v_1, token budget and draw); :meth:`disarm`
    makes them return at once while the rows they kept stay readable. Kept from one observed training
    forward to the next, the hooks are registered once instead of at every step, which on a small model
    costs more than their work. Cost per forward while disarmed: one Python call per module.
    ``training_of``: keep rows only within a training forward of this model (gradients enabled, the
    model in train mode when its forward starts: :class:`~diagnostics._hooks.TrainingForwardGate`), so
    that a validation forward between two training steps is not measured in place of the training
    forward.
    """

    def __init__(self, by_module: Mapping[str, list[LinearMap]], modules: Mapping[str, nn.Module],
                 clock: HookClock | None = None, training_of: nn.Module | None = None) -> None:
        empty = torch.zeros(0, 1)
        self._gate = TrainingForwardGate(training_of) if training_of is not None else None
        self.projectors = {name: Projector(group[0].kind, empty, 0, None, self._gate)
                           for name, group in by_module.items()}
        self._handles: list[Any] = []
        try:
            for name, proj in self.projectors.items():
                hook = proj if clock is None else clock.wrap(proj)
                self._handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def covers(self, by_module: Mapping[str, list[LinearMap]]) -> bool:
        """Whether these hooks sit on exactly the modules of ``by_module`` (and are still registered)."""
        return bool(self._handles) and self.projectors.keys() == by_module.keys()

    def arm(self, by_module: Mapping[str, list[LinearMap]], vectors: Mapping[str, torch.Tensor], budget: int,
            generator: torch.Generator) -> dict[str, Projector]:
        """Ready every projector for a forward: ``budget`` rows each, drawn from ``generator``, projected
        later on the v_1 of ``vectors``; rows kept before are dropped. Returns ``{module name: Projector}``."""
        sampler = RowSampler(generator)
        for name, group in by_module.items():
            self.projectors[name].reset(tuple([vectors[mp.key] for mp in group]), budget, sampler)
        return self.projectors

    def disarm(self) -> None:
        """Stop keeping rows (the rows kept so far stay readable)."""
        for proj in self.projectors.values():
            proj.budget = 0

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        if self._gate is not None:
            self._gate.remove()


#: Maps of one shape whose weights take at most this many bytes together take their power steps as one
#: batched product on a stacked copy of the weights (fewer calls, which is what counts on small models);
#: larger ones one product per map on the weights themselves, with no copy.
STACKED_WEIGHT_BYTES = 8 << 20


class _Group:
    """The maps of one weight shape, dtype and device, with their v_1 stacked as one tensor."""

    __slots__ = ("maps", "names", "rows", "v")

    def __init__(self, maps: list[LinearMap]) -> None:
        self.maps = maps
        self.names = [mp.key for mp in maps]
        self.v: torch.Tensor | None = None  # [G, in], the last step's v_1 of every map
        self.rows: tuple[torch.Tensor, ...] = ()  # views of v, the objects stored in ``saved``

    def previous(self, saved: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The stacked previous v_1: this group's own tensor when ``saved`` still holds its rows (no copy)."""
        if self.v is not None and all(saved.get(mp.key) is r for mp, r in zip(self.maps, self.rows, strict=False)):
            return self.v
        return torch.stack([saved[mp.key] for mp in self.maps])


def top_vectors(
    maps: list[LinearMap],
    modules: dict[str, nn.Module],
    saved: dict[str, torch.Tensor],
    *,
    power_iters: int,
    init_iters: int,
    init_tol: float,
    seed: int,
    groups: dict[tuple[Any, ...], Any] | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
    refine: bool = False,
) -> dict[str, tuple[float, torch.Tensor | None]]:
    """sigma_1 and v_1 per map key: a cold start by :func:`top_singular_vector`, then warm steps.

    ``saved`` holds the previous v_1 per map key (float32 or wider, on the weight's device) and is updated
    in place; a map with a saved v_1 of the right size takes ``power_iters`` steps of :func:`power_steps`
    from it, batched over the maps of equal shape, dtype and device. A weight that became non-finite or
    zero keeps its last good v_1 and reports sigma_1 as NaN or 0; a zero weight without a saved v_1 has
    none. ``groups``: a dict the caller keeps from step to step (empty at first); the v_1 of a group then
    stay stacked between steps instead of being stacked again. ``weights``: each map's weight by key, read
    by the caller (e.g. outside inference mode, where a wrapper such as FSDP gathers its parameters);
    read from ``modules`` when None. ``refine``: every map runs the iteration to convergence (``init_tol``,
    at most ``init_iters``), warm-started from its saved v_1 where it has one (keeping its sign): for a
    probe far from the previous one, whose v_1 a few steps would not bring up to date.

    Returns:
        ``{key: (sigma_1, v_1 on the weight's device or None)}``. Cost: per shape group ``2 * power_iters``
        batched products and one host transfer for all groups; a cold start runs up to
        ``init_iters`` iterations with two products each.
    """
    groups = {} if groups is None else groups
    out: dict[str, tuple[float, torch.Tensor | None]] = {}
    warm: dict[tuple[Any, ...], list[tuple[LinearMap, torch.Tensor]]] = {}
    for mp in maps:
        W = mp.weight(modules[mp.module_name]) if weights is None else weights[mp.key]
        prev = saved.get(mp.key)
        if prev is not None and prev.shape[0] != W.shape[1]:
            prev = None
        if prev is not None and not refine:
            warm.setdefault((W.shape, W.dtype, W.device), []).append((mp, W))
            continue
        try:
            sigma, _, v, _ = top_singular_vector(W, v0=prev, iters=init_iters, tol=init_tol, seed=seed)
        except DataError:  # a zero weight has no top singular vector (e.g. a zero-initialised layer)
            out[mp.key] = (0.0, prev)
            continue
        if not math.isfinite(sigma):  # a weight that blew up keeps its last good v_1
            out[mp.key] = (float("nan"), prev)
            continue
        v = v.detach()
        saved[mp.key] = v.to(torch.promote_types(v.dtype, torch.float32))
        out[mp.key] = (sigma, v)
    done: list[tuple[_Group, torch.Tensor, torch.Tensor]] = []
    sigmas: list[torch.Tensor] = []
    for gkey, members in warm.items():
        names = [mp.key for mp, _ in members]
        group = groups.get(gkey)
        if group is None or group.names != names:
            group = groups[gkey] = _Group([mp for mp, _ in members])
        prev = group.previous(saved)
        if len(members) == 1:
            sigma, v = power_steps(members[0][1][None], prev, power_iters)
        elif len(members) * math.prod(gkey[0]) * gkey[1].itemsize <= STACKED_WEIGHT_BYTES:
            sigma, v = power_steps(torch.stack([W for _, W in members]), prev, power_iters)
        else:
            # Large weights: one product per map on the weight itself; a stacked copy of them all would cost
            # more than the products (at GPT-2 small's size, 340 MB copied at every step).
            steps = [power_steps(W[None], prev[i : i + 1], power_iters) for i, (_, W) in enumerate(members)]
            sigma, v = torch.cat([s_ for s_, _ in steps]), torch.cat([v_ for _, v_ in steps])
        sigmas.append(sigma)
        done.append((group, v, prev))
    # The sigmas of every group come to the host in one transfer (one sync per step, not one per group);
    # cat promotes mixed float32/float64 groups, and tolist turns float32 into Python floats exactly.
    flat = (sigmas[0] if len(sigmas) == 1 else torch.cat(sigmas)).tolist() if sigmas else []
    at = 0
    for group, v, prev in done:
        sig, at = flat[at : at + len(group.maps)], at + len(group.maps)
        if all(math.isfinite(x) and x != 0.0 for x in sig):
            group.v, group.rows = v, v.unbind(0)
        else:
            # A weight that blew up or became zero keeps its last good v_1: checking sigma costs nothing,
            # unlike scanning W for bad entries.
            bad = torch.tensor([not (math.isfinite(x) and x != 0.0) for x in sig], device=v.device)
            v = torch.where(bad[:, None], prev.to(v.dtype), v)
            group.v, group.rows = v, v.unbind(0)
            sig = [x if x == 0.0 or math.isfinite(x) else float("nan") for x in sig]
        for mp, vi, s_ in zip(group.maps, group.rows, sig, strict=True):
            saved[mp.key] = vi
            out[mp.key] = (float(s_), vi)
    return out
