"""Matching a checkpoint's ``state_dict`` to a model: wrapper prefixes, tied weights, shapes.

Training wrappers rename parameters (Lightning's ``model.``, DataParallel/DDP's ``module.``,
torch.compile's ``_orig_mod.``); :func:`match_state_dict` finds the renaming that makes the keys cover the
model exactly, or explains in one message why none does. :func:`apply_checkpoint` loads a checkpoint
into a model through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diagnostics.checkpoints.formats import _first_line, load_checkpoint
from diagnostics.errors import CheckpointError

__all__ = ["match_state_dict", "apply_checkpoint"]

#: Prefixes that training wrappers add to parameter names (Lightning, DataParallel/DDP, torch.compile).
WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "net.", "model.module.", "module._orig_mod.")

_HINT = "is --model the architecture these weights were saved from?"


def _tied_aliases(model: Any) -> dict[str, set[str]]:
    """Names in the model's state_dict that share storage with another name (tied weights)."""
    groups: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        groups.setdefault(key, []).append(name)
    aliases: dict[str, set[str]] = {}
    for names in groups.values():
        if len(names) > 1:
            for n in names:
                aliases[n] = set(names) - {n}
    return aliases


def _candidate_prefixes(keys: Iterable[str]) -> list[str]:
    """Prefixes worth stripping: the first one or two dotted components of the keys, most common first."""
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                prefix = ".".join(parts[:depth]) + "."
                counts[prefix] = counts.get(prefix, 0) + 1
    return sorted(counts, key=lambda p: (-counts[p], p.count("."), p))


def _few(names: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... {len(names) - n} more" if len(names) > n else "")


def match_state_dict(
    state_dict: Mapping[str, Any], model: Any, *, path: str | Path = "<checkpoint>"
) -> dict[str, Any]:
    """Rename a checkpoint's keys to the model's and check that they match.

    Keys match as they are; else the prefix a wrapper added (:data:`WRAPPER_PREFIXES`) is stripped when
    the stripped keys then cover the model exactly (other entries under other prefixes, such as a
    Lightning module's loss buffers, are dropped); else a prefix of the model's own keys is added (the
    model is the wrapper). A key missing from the checkpoint is accepted when the model ties it to a key
    that is present (shared embeddings).

    Args:
        state_dict: the checkpoint's weights (values may be None when only metadata was read).
        model: the ``nn.Module`` the weights are for.
        path: the file, named in errors.

    Returns:
        The renamed ``state_dict``. Cost: comparing key sets.

    Raises:
        CheckpointError: listing the first few missing keys, unexpected keys and shape mismatches, and
            the file.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    aliases = _tied_aliases(model)

    def missing_of(keys: set[str]) -> list[str]:
        return [k for k in expected if k not in keys and not (aliases.get(k, set()) & keys)]

    # (renamed state_dict, whether it may name the closest match in an error message)
    candidates: list[tuple[dict[str, Any], bool]] = [(dict(state_dict), True)]
    for prefix in _candidate_prefixes(state_dict):
        stripped = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        candidates.append((stripped, prefix in WRAPPER_PREFIXES))
    for prefix in _candidate_prefixes(expected):
        candidates.append(({prefix + k: v for k, v in state_dict.items()}, False))

    best: tuple[int, dict[str, Any]] | None = None
    for candidate, reportable in candidates:
        missing = missing_of(set(candidate))
        unexpected = [k for k in candidate if k not in expected]
        if not missing and not unexpected:
            return _check_shapes(candidate, expected, path)
        score = len(missing) + len(unexpected)
        # Arbitrary stripped prefixes can look closer ("0.weight" -> "weight") while explaining nothing.
        if reportable and (best is None or score < best[0]):
            best = (score, candidate)
    assert best is not None
    closest = best[1]
    missing = missing_of(set(closest))
    unexpected = [k for k in closest if k not in expected]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
    raise CheckpointError(f"checkpoint {str(path)!r} does not match the model: {'; '.join(parts)}; {_HINT}")


def _check_shapes(
    state_dict: dict[str, Any], expected: dict[str, tuple[int, ...]], path: str | Path
) -> dict[str, Any]:
    mismatched = []
    for k, v in state_dict.items():
        shape = getattr(v, "shape", None)
        if shape is not None and tuple(shape) != expected[k]:
            mismatched.append(f"{k}: checkpoint {tuple(shape)} vs model {expected[k]}")
    if mismatched:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model: {len(mismatched)} shape mismatch(es) "
            f"({_few(mismatched, 3)}); {_HINT}"
        )
    return state_dict


def apply_checkpoint(model: Any, path: str | Path, *, unsafe_pickle: bool = False) -> int | None:
    """Load a checkpoint's weights into ``model`` in place.

    Returns:
        The step stored in the checkpoint, or None. Cost: reading the file and one copy of the weights.

    Raises:
        CheckpointError: see :func:`~diagnostics.checkpoints.formats.load_checkpoint` and
            :func:`match_state_dict`.
    """
    state_dict, step, _ = load_checkpoint(path, unsafe_pickle=unsafe_pickle)
    matched = match_state_dict(state_dict, model, path=path)
    try:
        # strict=False: tied aliases may be absent; match_state_dict has already checked coverage.
        model.load_state_dict(matched, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model: {_first_line(str(exc))}"
        ) from None
    return step
