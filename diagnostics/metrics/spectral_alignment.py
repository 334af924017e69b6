"""Spectral alignment: per-token cosines between a layer's inputs and its weight's top right singular vector.

For each monitored linear map y = W x (W of shape [out, in]) with top singular triplet (sigma_1, u_1, v_1),
the alignment of token i is a_i = <x_i, v_1> / ||x_i||. The ``spectral_alignment`` diagnostic stores,
per map (key = module name, or ``name.q``/``name.k``/``name.v`` for a split fused projection), the
distribution's positive fraction p+, sign diversity 1 - |2 p+ - 1|, mean, mean |a| and sigma_1 on every
probe, and quantiles and a 20-bin histogram on every ``detail_every``-th probe (metric IDs ``sa_*`` of
CONTRACTS.md). Definition and rationale: METRICS.md,
"Spectral alignment" (after Qiu, Wu, Tan, Wang, Yao 2025, arXiv 2510.04202).

How it stays cheap enough to run every step:

- v_1 is tracked by warm-started power iteration (:func:`diagnostics.linalg.top_singular_vector`), one
  iteration per probe by default (two products with W), never a full SVD; the warm start also carries
  the sign of v_1 from probe to probe, so p+ and the mean form continuous series.
- inputs are seen by scoped forward pre-hooks during one no-grad, eval-mode forward over a random
  subsample of the step's batch holding about ``max_tokens`` tokens; inside the hook the rows are
  subsampled to the token budget with a private generator and projected on v_1 in chunks of
  ``chunk_tokens`` rows, so only the cosines (``max_tokens`` floats per map) are kept: activations are
  never stored, and the memory this code adds is independent of the sequence length.
- when the Monitor runs this diagnostic every step it holds the same hooks open from the end of one
  ``monitor.step`` to the start of the next (:meth:`SpectralAlignment.observe_training_forward`), so
  the user's training forward is measured and no extra forward runs; without an observed forward the
  probe falls back to its own.
- the statistics of all maps are computed in one batched pass with one host transfer (plus one sort and
  one bincount on detail probes).

Supported maps: ``nn.Linear`` (and subclasses such as attention out-projections), Hugging Face ``Conv1D``
(weight stored [in, out]: transposed here) and ``nn.MultiheadAttention``'s packed ``in_proj_weight`` (its
``out_proj`` is applied functionally, so its input is never seen and it is left out).
Fused QKV projections (names matching ``qkv_patterns``, and MultiheadAttention's in-projection) are one
map by default or, with ``fused_qkv="split"``, ``qkv_groups`` maps of equal contiguous row blocks that
share the same inputs.

The explosion detector (:mod:`diagnostics.metrics.explosion`, diagnostic ``explosion_detector`` in the
``standard`` preset, run by the Monitor right after this one) reads this step's statistics from
``ctx.cache[SA_CACHE_KEY]``. With ``detector=True`` (or a dict of options) the same detector runs built
into this diagnostic instead, right after the measurement.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from diagnostics.errors import ConfigError, DataError
from diagnostics.metrics.alignment_stats import NUM_BINS, QUANTILES
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.registry import register
from diagnostics.store.records import Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

__all__ = [
    "SA_CACHE_KEY",
    "LinearMap",
    "SpectralAlignment",
    "find_linear_maps",
    "batched_alignment_statistics",
    "project_rows",
]

#: ``ctx.cache`` key under which this step's statistics are published: ``{map key: stats dict}``.
SA_CACHE_KEY = "spectral_alignment"
#: Default name patterns of fused query/key/value projections (GPT-2 ``c_attn``, GPT-NeoX, ViT-style ``qkv``).
DEFAULT_QKV_PATTERNS: tuple[str, ...] = ("*qkv*", "*c_attn", "*query_key_value", "*in_proj")
_QKV_NAMES = ("q", "k", "v")


# --- which maps ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearMap:
    """One monitored linear map: where its weight and its input come from.

    Attributes:
        key: store key (module name; ``name.in_proj`` for MultiheadAttention; ``.q/.k/.v`` or ``.g<i>``
            suffixes for groups of a split fused projection).
        module_name: the module whose forward pre-hook sees the input.
        kind: "linear" (weight [out, in]), "conv1d" (HF Conv1D, weight [in, out]) or "mha" (packed
            in_proj_weight [3E, E], input = the query).
        rows: (start, stop) rows of the [out, in] weight for a group of a split fused map, else None.
    """

    key: str
    module_name: str
    kind: str
    rows: tuple[int, int] | None = None

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The map's weight as a detached [out, in] matrix (a view; no copy)."""
        if self.kind == "conv1d":
            w = module.weight.detach().T
        elif self.kind == "mha":
            w = module.in_proj_weight.detach()
        else:
            w = module.weight.detach()
        return w if self.rows is None else w[self.rows[0] : self.rows[1]]


def _is_hf_conv1d(m: nn.Module) -> bool:
    # Hugging Face's Conv1D (GPT-2) is a linear map with weight [in, out]; matched by name so that
    # transformers need not be installed.
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(m, "nf")


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if _is_hf_conv1d(m):
        return "conv1d"
    if isinstance(m, nn.MultiheadAttention) and getattr(m, "in_proj_weight", None) is not None:
        return "mha"
    return None


def _as_patterns(p: str | Iterable[str] | None) -> list[str] | None:
    if p is None:
        return None
    if isinstance(p, str):
        return [p]
    out = list(p)
    if not all(isinstance(s, str) for s in out):
        raise ConfigError(f"spectral_alignment: module patterns must be strings, got {out!r}")
    return out


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def find_linear_maps(
    model: nn.Module,
    modules: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    *,
    fused_qkv: str = "whole",
    qkv_patterns: Iterable[str] = DEFAULT_QKV_PATTERNS,
    qkv_groups: int = 3,
) -> list[LinearMap]:
    """The linear maps of ``model`` to monitor, in ``named_modules()`` order.

    Args:
        model: the model.
        modules: None (every supported map) or module-name patterns (exact names or fnmatch globs).
        exclude: patterns of module names to leave out.
        fused_qkv: "whole" (a fused projection is one map) or "split" (``qkv_groups`` maps of equal
            contiguous row blocks of the [out, in] weight, keys ``name.q/.k/.v`` for 3 groups, else
            ``name.g0 ...``).
        qkv_patterns: module-name patterns of fused projections (MultiheadAttention's packed
            in-projection always counts as fused).
        qkv_groups: number of row groups when splitting (out must be divisible by it).

    Returns:
        A list of :class:`LinearMap`. Cost: one walk over the modules.

    Raises:
        ConfigError: a pattern in ``modules`` matches no supported module, or a bad option.
    """
    if fused_qkv not in ("whole", "split"):
        raise ConfigError(f"spectral_alignment: fused_qkv must be 'whole' or 'split', got {fused_qkv!r}")
    if int(qkv_groups) < 1:
        raise ConfigError(f"spectral_alignment: qkv_groups must be >= 1, got {qkv_groups}")
    include = _as_patterns(modules)
    drop = _as_patterns(exclude) or []
    qkv = list(qkv_patterns)
    supported = [(n, m, k) for n, m in model.named_modules() if n and (k := _kind(m)) is not None]
    if include is not None:
        for pat in include:
            if not any(_match(n, [pat]) for n, _, _ in supported):
                names = ", ".join(n for n, _, _ in supported[:8])
                raise ConfigError(
                    f"spectral_alignment: module pattern {pat!r} matches no linear map of the model; "
                    f"linear maps look like: {names}"
                )
    out: list[LinearMap] = []
    # nn.MultiheadAttention applies its out_proj functionally (the Linear's forward never runs, so its
    # input cannot be observed): leave it out.
    functional = {f"{n}.out_proj" for n, m, k in supported if k == "mha"}
    for name, m, kind in supported:
        if name in functional:
            continue
        if include is not None and not _match(name, include):
            continue
        if _match(name, drop):
            continue
        base = f"{name}.in_proj" if kind == "mha" else name
        fused = kind == "mha" or _match(name, qkv)
        if fused and fused_qkv == "split" and qkv_groups > 1:
            rows = LinearMap(base, name, kind).weight(m).shape[0]
            if rows % qkv_groups:
                raise ConfigError(
                    f"spectral_alignment: fused map {name!r} has {rows} output rows, not divisible by "
                    f"qkv_groups={qkv_groups}; set qkv_groups or fused_qkv='whole'"
                )
            size = rows // qkv_groups
            labels = _QKV_NAMES if qkv_groups == 3 else tuple(f"g{i}" for i in range(qkv_groups))
            out += [
                LinearMap(f"{base}.{lab}", name, kind, (i * size, (i + 1) * size))
                for i, lab in enumerate(labels)
            ]
        else:
            out.append(LinearMap(base, name, kind))
    return out


# --- projecting inputs on the fly -------------------------------------------------------------------
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
    ``generator``) and only those rows are gathered, ``chunk_rows`` at a time, so the memory used here is
    O(chunk_rows * in + max_rows * K) whatever the number of rows of ``x`` (no reshape copy of ``x``).
    Zero or non-finite rows get cosine 0 (counted as neither sign).

    Args:
        x: [..., in] inputs (any leading shape, any strides).
        V: [in, K] unit columns (v_1 of K maps sharing this input).
        max_rows: token budget.
        generator: private generator for the subsample (the global RNG is untouched).
        chunk_rows: rows projected at once.
        finish: map non-finite cosines to 0 and clamp to [-1, 1] here; False leaves that to the caller
            (:func:`batched_alignment_statistics` does it for all maps at once).

    Returns:
        [R, K] float32 (or float64 for float64 inputs) cosines in [-1, 1], R = min(rows, max_rows).
        Cost O(R * in * K).
    """
    lead = x.shape[:-1]
    n = math.prod(lead)
    dtype = torch.promote_types(x.dtype, torch.float32)
    V = V.to(device=x.device, dtype=dtype)
    if n == 0:
        return torch.zeros(0, V.shape[1], dtype=dtype, device=x.device)
    # A contiguous x is viewed as [n, in] for free; otherwise rows are gathered by multi-index so that a
    # strided x is never copied whole.
    flat_x = x.view(-1, x.shape[-1]) if x.is_contiguous() else None
    pick = torch.randint(n, (max_rows,), generator=generator).to(x.device) if n > max_rows else None
    count = n if pick is None else max_rows
    blocks = []
    for start in range(0, count, chunk_rows):
        stop = min(count, start + chunk_rows)
        if pick is None:
            idx = None if flat_x is not None else torch.arange(start, stop, device=x.device)
        else:
            idx = pick[start:stop]
        if flat_x is not None:
            rows = flat_x[start:stop] if idx is None else flat_x.index_select(0, idx)
        else:
            rows = x[torch.unravel_index(idx, lead)] if len(lead) > 1 else x[idx]
        rows = rows.to(dtype)
        # Zero rows give 0 / eps = 0; non-finite rows give NaN, mapped to 0 (counted as neither sign).
        cos = (rows @ V).div_(torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min_(eps))
        blocks.append(cos)
    out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, 0)
    return _finish(out) if finish else out


def _finish(cos: torch.Tensor) -> torch.Tensor:
    # Non-finite cosines (rows with inf/NaN entries) count as neither sign.
    return torch.nan_to_num_(cos, nan=0.0, posinf=0.0, neginf=0.0).clamp_(-1.0, 1.0)


class _Projector:
    """Forward pre-hook target of one module: projects its inputs on the v_1 of its maps, within budget."""

    def __init__(
        self, kind: str, V: torch.Tensor, budget: int, generator: torch.Generator, chunk: int
    ) -> None:
        self.kind = kind
        self.V = V
        self.budget = budget
        self.generator = generator
        self.chunk = chunk
        self.blocks: list[torch.Tensor] = []
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        room = self.budget - self.count
        if room <= 0:
            return
        x = _input_tensor(self.kind, args, kwargs)
        if x is None or x.shape[-1] != self.V.shape[0]:
            return
        with torch.no_grad():  # on the training forward: never part of the user's graph
            cos = project_rows(x, self.V, room, self.generator, self.chunk, finish=False)
        self.blocks.append(cos if cos.device.type == "cpu" else cos.cpu())
        self.count += cos.shape[0]

    def cosines(self) -> torch.Tensor | None:
        return torch.cat(self.blocks, 0) if self.blocks else None


# --- statistics over many maps at once -------------------------------------------------------------
def batched_alignment_statistics(cos: torch.Tensor, detail: bool = True) -> dict[str, list[Any]]:
    """Alignment statistics of M cosine distributions with the same token count, in one pass.

    The same definitions as :func:`diagnostics.metrics.alignment_stats.alignment_statistics`, per row:
    p+ (fraction > 0), sign diversity 1 - |p+ - p-| / (p+ + p-) (1 when every cosine is 0; equal to
    1 - |2 p+ - 1| without zeros, and invariant to the sign of v_1), mean, mean |a|, quantiles at
    QUANTILES (linear interpolation), NUM_BINS-bin histogram on [-1, 1] as fractions.

    Args:
        cos: [M, T] cosines (T >= 1).
        detail: also compute the quantiles and the histogram (the only parts that need the sort and
            the bincount).

    Returns:
        dict of per-row lists: ``positive_fraction``, ``sign_diversity``, ``mean``, ``mean_abs`` (floats),
        ``quantiles``, ``histogram`` (lists of floats; only with ``detail``), ``num_tokens`` (ints).
        Cost O(M T log T) with ``detail``, O(M T) without; one host transfer either way.
    """
    a = _finish(cos.detach().to(device="cpu", dtype=torch.float64, copy=True))
    m, t = a.shape
    if t == 0:
        raise ConfigError("no tokens to compute alignment statistics over: the input batch is empty")
    pos = (a > 0).sum(1).double() / t
    neg = (a < 0).sum(1).double() / t
    signed = pos + neg
    div = torch.where(signed > 0, 1.0 - (pos - neg).abs() / signed.clamp_min(1e-300), torch.ones_like(pos))
    # Every per-row scalar in one [M, 4 (+ 5 + NUM_BINS)] matrix: one .tolist() instead of one per field.
    cols = [pos, div, a.mean(1), a.abs().mean(1)]
    if detail:
        q = torch.quantile(a, torch.tensor(QUANTILES, dtype=torch.float64), dim=1).T  # [M, 5]
        idx = ((a + 1.0) * (NUM_BINS / 2.0)).floor().long().clamp_(0, NUM_BINS - 1)
        idx = idx + torch.arange(m).unsqueeze(1) * NUM_BINS  # one bincount for every row
        hist = torch.bincount(idx.reshape(-1), minlength=m * NUM_BINS).reshape(m, NUM_BINS).double() / t
        table = torch.cat([torch.stack(cols, 1), q, hist], 1).tolist()
    else:
        table = torch.stack(cols, 1).tolist()
    nq = len(QUANTILES)
    out: dict[str, list[Any]] = {
        "positive_fraction": [r[0] for r in table],
        "sign_diversity": [r[1] for r in table],
        "mean": [r[2] for r in table],
        "mean_abs": [r[3] for r in table],
    }
    if detail:
        out["quantiles"] = [r[4 : 4 + nq] for r in table]
        out["histogram"] = [r[4 + nq :] for r in table]
    out["num_tokens"] = [t] * m
    return out


# --- sampling the batch ----------------------------------------------------------------------------
def _take(batch: Any, idx: torch.Tensor, size: int) -> Any:
    """Samples ``idx`` of every tensor in ``batch`` whose leading dimension is ``size``."""
    if torch.is_tensor(batch):
        return batch.index_select(0, idx.to(batch.device)) if batch.ndim and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {k: _take(v, idx, size) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_take(v, idx, size) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(v, idx, size) for v in batch)
    return batch


def _resolve(model: nn.Module, maps: list[LinearMap]) -> dict[str, nn.Module]:
    """The maps' modules by name, looked up by attribute path (cheaper than walking every module)."""
    out: dict[str, nn.Module] = {}
    for mp in maps:
        if mp.module_name not in out:
            try:
                out[mp.module_name] = model.get_submodule(mp.module_name)
            except AttributeError as e:
                raise ConfigError(
                    f"spectral_alignment: module {mp.module_name!r} is no longer in the model; "
                    "use a new SpectralAlignment for a changed model"
                ) from e
    return out


class _eval_flags:
    """Eval mode for the block: clears ``training`` on the modules that have it set, restores them after.

    Equivalent to ``model.eval()`` plus a restore, without ``nn.Module.__setattr__`` on every module
    (tens of microseconds each on a model with many small modules, paid every step).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.changed: list[nn.Module] = []

    def __enter__(self) -> None:
        for m in self.model.modules():
            if m.training:
                m.__dict__["training"] = False
                self.changed.append(m)

    def __exit__(self, *exc: object) -> None:
        for m in self.changed:
            m.__dict__["training"] = True
        self.changed.clear()


# --- the diagnostic --------------------------------------------------------------------------------
@register
class SpectralAlignment(Diagnostic):
    """Alignment of each linear map's inputs with its weight's top right singular vector (``sa_*``).

    Per map (key = map key) and step: ``sa_positive_fraction``, ``sa_sign_diversity``, ``sa_mean``,
    ``sa_mean_abs``, ``sa_quantile`` (index 0..4 = q 0.05, 0.25, 0.5, 0.75, 0.95), ``sa_histogram``
    (index 0..19, fractions), ``sa_sigma1`` (sigma_1 estimate: ||W v|| for the current v, a lower bound
    that converges with the warm-started iteration). With ``detector`` on, also ``explosion_score`` (key
    all) and ``explosion_warning`` events (see :mod:`diagnostics.metrics.explosion`).

    Args:
        every, start: schedule (default every step).
        modules: None (every nn.Linear, HF Conv1D and MultiheadAttention in-projection) or name patterns.
        exclude: name patterns to leave out.
        fused_qkv, qkv_patterns, qkv_groups: fused projections as one map or split (see
            :func:`find_linear_maps`).
        max_tokens: token budget per map and step (subsample with a private generator).
        chunk_tokens: rows projected at once inside a hook (bounds the memory added per map).
        power_iters: power iterations per probe, warm-started from the previous v_1 (1 by default).
        init_iters: iterations for a map's first probe (cold start), with tolerance ``init_tol``.
        seed: seed of the private generator for the subsample (each step uses seed + step).
        detail_every: write the distribution detail (``sa_quantile``, ``sa_histogram``: 25 of the 30
            rows per map) on every ``detail_every``-th probe only, counting from the run's first probe
            (default 10; 1 = every probe). p+, sign diversity, mean, mean |a| and sigma_1 are written
            on every probe; the detector reads only those.
        detector: built-in explosion detector: False/None (default: off; the ``explosion_detector``
            diagnostic does the detection), True (default settings), a dict of
            :class:`~diagnostics.metrics.explosion.ExplosionDetectorCore` options, or a core instance.

    Cost per step: one no-grad forward over about ``max_tokens`` tokens (none when the Monitor observed
    the training forward: the projections then run in its hooks), ``2 * power_iters`` products
    with each weight, O(max_tokens * in) per map for the projections, one batched pass for the
    statistics (plus one sort on detail probes); 5 records per map, 30 on detail probes.
    """

    name = "spectral_alignment"
    requires = frozenset({"layer_inputs"})
    preset = "standard"
    default_every = 1
    allow_nonfinite = True  # sigma_1 of a weight that has blown up is stored as the inf/NaN it is
    metrics: ClassVar[tuple[str, ...]] = (
        "sa_positive_fraction",
        "sa_sign_diversity",
        "sa_mean",
        "sa_mean_abs",
        "sa_quantile",
        "sa_histogram",
        "sa_sigma1",
        "explosion_score",
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
        detector: Any = False,
        detail_every: int = 10,
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
        if fused_qkv not in ("whole", "split"):
            raise ConfigError(f"spectral_alignment: fused_qkv must be 'whole' or 'split', got {fused_qkv!r}")
        if isinstance(detail_every, bool) or not isinstance(detail_every, int) or detail_every < 1:
            raise ConfigError(f"spectral_alignment: detail_every must be an integer >= 1, got {detail_every!r}")
        self.detail_every = int(detail_every)
        self.modules = _as_patterns(modules)
        self.exclude = _as_patterns(exclude)
        self.fused_qkv = fused_qkv
        self.qkv_patterns = tuple(qkv_patterns)
        self.qkv_groups = int(qkv_groups)
        self.max_tokens = int(max_tokens)
        self.chunk_tokens = int(chunk_tokens)
        self.power_iters = int(power_iters)
        self.init_iters = int(init_iters)
        self.init_tol = float(init_tol)
        self.seed = int(seed)
        self.detector = self._make_detector(detector)
        self._maps: list[LinearMap] | None = None
        self._model_id: int | None = None
        # Set by compute (the Monitor's state dict of this diagnostic) so that watch() finds v_1.
        self._state_ref: dict[str, Any] | None = None
        self._watched: tuple[int, dict[str, list[LinearMap]], dict[str, _Projector]] | None = None
        self._watching = False
        self.last_source: str | None = None

    @staticmethod
    def _make_detector(spec: Any) -> Any:
        if spec is None or spec is False:
            return None
        from diagnostics.metrics.explosion import ExplosionDetectorCore

        if spec is True:
            return ExplosionDetectorCore()
        if isinstance(spec, ExplosionDetectorCore):
            return spec
        if isinstance(spec, Mapping):
            return ExplosionDetectorCore(**dict(spec))
        raise ConfigError(
            f"spectral_alignment: detector must be True, False, a dict of options or an ExplosionDetectorCore, got {spec!r}"
        )

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
            "seed": self.seed,
            "detail_every": self.detail_every,
            "mode": "eval",
            "detector": None if self.detector is None else self.detector.settings(),
        }

    def maps(self, model: nn.Module) -> list[LinearMap]:
        """The monitored maps of ``model`` (resolved once per model)."""
        if self._maps is None or self._model_id != id(model):
            self._maps = find_linear_maps(
                model,
                self.modules,
                self.exclude,
                fused_qkv=self.fused_qkv,
                qkv_patterns=self.qkv_patterns,
                qkv_groups=self.qkv_groups,
            )
            self._model_id = id(model)
        return self._maps

    # v_1 per map key lives in ctx.state["v1"] (saved with the run, so a resumed run keeps its signs).
    def _top_vectors(
        self, ctx: StepContext, maps: list[LinearMap], modules: dict[str, nn.Module]
    ) -> dict[str, tuple[float, torch.Tensor | None]]:
        """sigma_1 and v_1 per map: cold start by top_singular_vector, then warm steps batched by shape.

        A warm step v <- W^T W v / ||W^T W v|| is one iteration of the same power iteration as
        :func:`diagnostics.linalg.top_singular_vector` (which it would run with ``v0`` = the previous
        v_1); maps of equal shape are stacked so that a step costs a few batched products instead of a
        dozen small calls per map. Since v0^T (W^T W) v0 >= 0 the iteration never flips the sign of v_1:
        the sign is carried from probe to probe.
        """
        from diagnostics.linalg.power import top_singular_vector

        saved: dict[str, torch.Tensor] = ctx.state.setdefault("v1", {})
        out: dict[str, tuple[float, torch.Tensor | None]] = {}
        warm: dict[tuple[Any, ...], list[tuple[LinearMap, torch.Tensor, torch.Tensor]]] = {}
        for mp in maps:
            W = mp.weight(modules[mp.module_name])
            prev = saved.get(mp.key)
            if prev is not None and prev.shape[0] == W.shape[1]:
                warm.setdefault((tuple(W.shape), W.dtype, W.device), []).append((mp, W, prev))
                continue
            try:
                sigma, _, v, _ = top_singular_vector(
                    W, iters=self.init_iters, tol=self.init_tol, seed=self.seed
                )
            except DataError:  # a zero weight has no top singular vector (e.g. a zero-initialised layer)
                out[mp.key] = (0.0, None)
                continue
            if not math.isfinite(sigma):
                out[mp.key] = (float("nan"), None)
                continue
            saved[mp.key] = v.detach().to("cpu", torch.promote_types(v.dtype, torch.float32))
            out[mp.key] = (sigma, v.detach())
        # Per shape group: 2 * power_iters + 1 batched products; the sigmas of every group then come to
        # the host in one transfer (one sync per step, not one per group).
        done: list[tuple[list[tuple[LinearMap, torch.Tensor, torch.Tensor]], torch.Tensor]] = []
        sigmas: list[torch.Tensor] = []
        for (_, dtype, device), group in warm.items():
            ct = torch.promote_types(dtype, torch.float32)
            Ws = torch.stack([W for _, W, _ in group]).to(ct)  # [G, out, in]
            v = torch.stack([p for _, _, p in group]).to(device=device, dtype=ct).unsqueeze(2)  # [G, in, 1]
            for _ in range(self.power_iters):
                v = torch.bmm(Ws.transpose(1, 2), torch.bmm(Ws, v))
                v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
            sigmas.append(torch.linalg.vector_norm(torch.bmm(Ws, v), dim=1).reshape(-1).to("cpu", torch.float64))
            done.append((group, v))
        flat = torch.cat(sigmas).tolist() if sigmas else []
        at = 0
        for group, v in done:
            sig, at = flat[at : at + len(group)], at + len(group)
            for i, (mp, _, prev) in enumerate(group):
                vi = v[i, :, 0]
                if not math.isfinite(sig[i]) or sig[i] == 0.0:
                    # A weight that became non-finite (or zero): sigma_1 is recorded as it is and the last
                    # good v_1 is kept; checking sigma costs nothing, unlike scanning W for bad entries.
                    out[mp.key] = (sig[i] if sig[i] == 0.0 else float("nan"), prev)
                    continue
                saved[mp.key] = vi.to("cpu", torch.promote_types(vi.dtype, torch.float32))
                out[mp.key] = (float(sig[i]), vi)
        return out

    def _subsample(self, ctx: StepContext, gen: torch.Generator) -> Any:
        from diagnostics._batch import leading_size, tokens_per_sample

        batch = ctx.batch
        n = leading_size(batch)
        if n is None:
            return batch
        per = max(1, _tokens_per_sample(batch))
        keep = max(1, min(n, math.ceil(self.max_tokens / per)))
        if keep >= n:
            return batch
        idx = torch.randperm(n, generator=gen)[:keep].sort().values
        return _take(batch, idx, n)

    @staticmethod
    def _group(
        maps: list[LinearMap], vectors: Mapping[str, torch.Tensor | None]
    ) -> dict[str, list[LinearMap]]:
        # One projector per module: maps that share a module (split fused projections) share its input.
        by_module: dict[str, list[LinearMap]] = {}
        for mp in maps:
            if vectors.get(mp.key) is not None:
                by_module.setdefault(mp.module_name, []).append(mp)
        return by_module

    @contextlib.contextmanager
    def _hooks(
        self,
        by_module: dict[str, list[LinearMap]],
        vectors: Mapping[str, torch.Tensor],
        modules: dict[str, nn.Module],
        gen: torch.Generator,
    ) -> Iterator[dict[str, _Projector]]:
        """Scoped forward pre-hooks projecting each module's inputs on its maps' v_1; removed in finally."""
        projectors: dict[str, _Projector] = {}
        handles = []
        try:
            for mname, group in by_module.items():
                V = torch.stack(
                    [
                        vectors[mp.key].to(torch.promote_types(vectors[mp.key].dtype, torch.float32))
                        for mp in group
                    ],
                    1,
                )
                proj = _Projector(group[0].kind, V, self.max_tokens, gen, self.chunk_tokens)
                projectors[mname] = proj
                handles.append(modules[mname].register_forward_pre_hook(proj, with_kwargs=True))
            yield projectors
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def watch(self, model: nn.Module) -> Iterator[None]:
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
        mode: dropout as in training). With several forwards per step, wrap only one.

        Cost: the projections only, O(max_tokens * in) per map.
        """
        state = self._state_ref
        vectors = state.get("v1") if state is not None else None
        if not vectors or self._watching:  # nothing to project on yet, or already watched (by the Monitor)
            yield
            return
        maps = self.maps(model)
        modules = _resolve(model, maps)
        by_module = self._group(maps, vectors)
        count = state.get("watched", 0)
        state["watched"] = count + 1
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * (count + 1))
        # The hooks work on detached inputs, so the training forward's autograd graph is untouched.
        self._watching = True
        try:
            with self._hooks(by_module, vectors, modules, gen) as projectors:
                yield
        finally:
            self._watching = False
        self._watched = (id(model), by_module, projectors)

    def observe_training_forward(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """What the Monitor holds open between two steps to measure on the user's training forward.

        The same as :meth:`watch`; the Monitor enters it at the end of ``monitor.step`` when this
        diagnostic is due at every step and exits it (hooks removed) at the start of the next
        ``monitor.step`` or in ``close()``. When no forward ran in between (or only modules without
        monitored maps did), the next probe falls back to its own forward.
        """
        return self.watch(model)

    def measure(self, ctx: StepContext) -> tuple[dict[str, dict[str, Any]], float]:
        """This step's statistics per map key (also published in ``ctx.cache[SA_CACHE_KEY]``).

        Returns:
            (``{key: {positive_fraction, sign_diversity, mean, mean_abs, quantiles, histogram,
            num_tokens, sigma1}}``, seconds of the forward pass). ``quantiles`` and ``histogram`` are
            present on detail probes only (every ``detail_every``-th). Maps whose module did not run
            get no entry.
        """
        import time

        model = ctx.model
        maps = self.maps(model)
        if not maps:
            return {}, 0.0
        modules = _resolve(model, maps)
        self._state_ref = ctx.state
        watched, self._watched = self._watched, None
        tops = self._top_vectors(ctx, maps, modules)
        fwd_seconds = 0.0
        if (
            watched is not None
            and watched[0] == id(model)
            and any(p.count > 0 for p in watched[2].values())  # a forward was actually observed
        ):
            # This step's training forward was watched: its inputs were projected on the previous probe's
            # v_1 (same sign as the updated one); no extra forward.
            by_module, projectors = watched[1], watched[2]
            self.last_source = "training_forward"
        else:
            by_module = self._group(maps, {k: v for k, (_, v) in tops.items()})
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(ctx.step))
            sub = self._subsample(ctx, gen)
            t0 = time.perf_counter()
            with self._hooks(by_module, {k: v for k, (_, v) in tops.items()}, modules, gen) as projectors:
                with torch.no_grad(), _eval_flags(model):
                    ctx.loss_fn(model, sub)
            fwd_seconds = time.perf_counter() - t0
            self.last_source = "extra_forward"
        # The probe counter lives in the run's state, so a resumed run keeps the detail cadence.
        probe = int(ctx.state.get("probes", 0))
        ctx.state["probes"] = probe + 1
        detail = probe % self.detail_every == 0
        # Group the cosine columns by token count so each group is one batched statistics pass.
        columns: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for mname, proj in projectors.items():
            cos = proj.cosines()
            if cos is None or cos.shape[0] == 0:
                continue
            for j, mp in enumerate(by_module[mname]):
                columns.setdefault(cos.shape[0], []).append((mp.key, cos[:, j]))
        stats: dict[str, dict[str, Any]] = {}
        for cols in columns.values():
            batched = batched_alignment_statistics(torch.stack([c for _, c in cols], 0), detail)
            for i, (key, _) in enumerate(cols):
                stats[key] = {k: v[i] for k, v in batched.items()}
                stats[key]["sigma1"] = float(tops[key][0])
        ordered = {mp.key: stats[mp.key] for mp in maps if mp.key in stats}
        ctx.cache[SA_CACHE_KEY] = ordered
        return ordered, fwd_seconds

    def compute(self, ctx: StepContext) -> Output:
        stats, fwd = self.measure(ctx)
        records: list[Record] = []
        for key, st in stats.items():
            records += [
                Record("sa_positive_fraction", st["positive_fraction"], key),
                Record("sa_sign_diversity", st["sign_diversity"], key),
                Record("sa_mean", st["mean"], key),
                Record("sa_mean_abs", st["mean_abs"], key),
                Record("sa_sigma1", st["sigma1"], key),
            ]
            if "quantiles" in st:
                records += [Record("sa_quantile", float(q), key, i) for i, q in enumerate(st["quantiles"])]
                records += [Record("sa_histogram", float(h), key, i) for i, h in enumerate(st["histogram"])]
        events = []
        if self.detector is not None:
            from diagnostics.metrics.explosion import run_detector_step

            more, events = run_detector_step(
                self.detector, ctx, ctx.state.setdefault("detector", {}), builtin=True
            )
            records += more
        settings = {"num_maps": len(stats), "forward_seconds": fwd, "source": self.last_source}
        return Output(records=records, events=events, settings=settings)
