"""Which linear maps spectral alignment monitors: ``nn.Linear``, Hugging Face ``Conv1D`` and attention
in-projections, with fused query/key/value projections kept whole or split into their row groups.

``nn.MultiheadAttention``'s packed ``in_proj_weight`` counts (its ``out_proj`` is applied functionally,
so its input is never seen and it is left out). Fused QKV projections (names matching
``qkv_patterns``, and MultiheadAttention's in-projection) are one map by default or, with
``fused_qkv="split"``, ``qkv_groups`` maps of equal contiguous row blocks that share the same inputs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from diagnostics.errors import ConfigError

__all__ = ["DEFAULT_QKV_PATTERNS", "LinearMap", "as_patterns", "find_linear_maps", "resolve_modules"]

#: Default name patterns of fused query/key/value projections (GPT-2 ``c_attn``, GPT-NeoX, ViT-style ``qkv``).
DEFAULT_QKV_PATTERNS: tuple[str, ...] = ("*qkv*", "*c_attn", "*query_key_value", "*in_proj")
_QKV_NAMES = ("q", "k", "v")


@dataclass(frozen=True, slots=True)
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
        """The map's weight as a detached [out, in] matrix (a view; no copy, except for an FSDP2 shard,
        whose full weight is all-gathered: one layer at a time, a collective)."""
        w = (module.in_proj_weight if self.kind == "mha" else module.weight).detach()
        if type(w).__name__ == "DTensor":
            w = w.full_tensor()
        if self.kind == "conv1d":
            w = w.T
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


def as_patterns(p: str | Iterable[str] | None) -> list[str] | None:
    """A module-name pattern option as a list (None stays None); ConfigError for non-strings."""
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
    include = as_patterns(modules)
    drop = as_patterns(exclude) or []
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


def resolve_modules(model: nn.Module, maps: list[LinearMap]) -> dict[str, nn.Module]:
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
