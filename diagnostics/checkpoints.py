"""Safe loading of training checkpoints and inference of their step.

Formats understood:

- a raw ``state_dict`` saved with ``torch.save`` (``.pt``, ``.pth``, ``.bin``);
- a dict holding the weights under ``model``, ``state_dict``, ``model_state_dict`` or ``module``, and the
  step under ``step``, ``global_step``, ``iteration`` or ``epoch`` (first found, in that order);
- PyTorch Lightning ``.ckpt`` files (``state_dict`` plus ``global_step``; the LightningModule's attribute
  prefix such as ``model.`` is stripped when that makes the keys match the model);
- safetensors files (the step from the header metadata ``step`` / ``global_step`` when present);
- a Hugging Face model directory (``config.json`` plus ``model.safetensors``, ``pytorch_model.bin`` or
  their sharded index; the step from ``trainer_state.json`` or a ``checkpoint-N`` directory name).

Pickled files are read with ``torch.load(weights_only=True)``, which refuses to run code stored in the
file. Full pickles load only with ``unsafe_pickle=True`` (``--unsafe-pickle``), with a warning. Every
problem raises :class:`~diagnostics.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diagnostics.errors import CheckpointError

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CheckpointInfo",
    "UnsafePickleWarning",
    "discover_checkpoints",
    "load_checkpoint",
    "load_state_dict",
    "inspect_checkpoints",
    "match_state_dict",
    "apply_checkpoint",
]

#: File suffixes picked up when a directory is given.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pkl", ".tar")

#: Keys under which training scripts commonly store the model's weights, in order of preference.
WEIGHT_KEYS = ("model", "state_dict", "model_state_dict", "module", "model_state", "net")

#: Keys under which the step is commonly stored, in order of preference.
STEP_KEYS = ("step", "global_step", "iteration", "epoch")

#: Prefixes that training wrappers add to parameter names (Lightning, DataParallel/DDP, torch.compile).
_WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "net.", "model.module.", "module._orig_mod.")

_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_UNSAFE_HINT = (
    "it is a full pickle that torch.load(weights_only=True) refuses because loading it could run code "
    "stored in the file; if you trust the file, pass --unsafe-pickle (unsafe_pickle=True) to load it"
)


class UnsafePickleWarning(UserWarning):
    """Emitted when a checkpoint is loaded as a full pickle (code in the file can run)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint found on disk.

    Attributes:
        path: the file or Hugging Face directory.
        step: the training step it belongs to: stored in the checkpoint, else the number in its name,
            else its position in the list.
        step_source: where ``step`` came from: ``"stored"``, ``"name"`` or ``"position"``.
        format: ``"torch"``, ``"lightning"``, ``"safetensors"`` or ``"huggingface"``.
    """

    path: Path
    step: int
    step_source: str
    format: str

    @property
    def source(self) -> str:
        """A stable id of this checkpoint for the run store's list of completed sources."""
        return f"checkpoint:{self.path.resolve()}"


# --------------------------------------------------------------------------- discovery


def _is_hf_dir(path: Path) -> bool:
    return (
        path.is_dir()
        and (path / "config.json").is_file()
        and any((path / f).is_file() for f in _HF_WEIGHT_FILES)
    )


def _number_in_name(path: Path) -> int | None:
    """The last integer in the file name without suffix ("step_00300.pt" -> 300, "epoch=3-step=90" -> 90)."""
    numbers = re.findall(r"\d+", path.stem if path.is_file() else path.name)
    return int(numbers[-1]) if numbers else None


def discover_checkpoints(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand files and directories into the list of checkpoint paths (unsorted).

    A directory is either itself a Hugging Face model directory, or is searched (not recursively) for
    files with a suffix in :data:`CHECKPOINT_SUFFIXES` and Hugging Face sub-directories
    (``checkpoint-500/``).

    Raises:
        CheckpointError: a path does not exist, a directory holds no checkpoints, or nothing was given.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            found.append(path)
        elif _is_hf_dir(path):
            found.append(path)
        elif path.is_dir():
            entries = sorted(
                p
                for p in path.iterdir()
                if (p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and not p.name.startswith("."))
                or _is_hf_dir(p)
            )
            if not entries:
                raise CheckpointError(
                    f"directory {str(path)!r} holds no checkpoints (looked for files ending in "
                    f"{', '.join(CHECKPOINT_SUFFIXES)} and Hugging Face model directories)"
                )
            found.extend(entries)
        else:
            raise CheckpointError(f"checkpoint {str(path)!r} not found")
    if not found:
        raise CheckpointError("no checkpoint given")
    # The same file named twice (a directory and a file in it) is analysed once.
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


# --------------------------------------------------------------------------- loading


def _torch_load(path: Path, unsafe_pickle: bool, mmap: bool) -> Any:
    import torch

    if unsafe_pickle:
        warnings.warn(
            f"loading {str(path)!r} as a full pickle: code stored in the file can run; only do this "
            "for files you trust",
            UnsafePickleWarning,
            stacklevel=3,
        )
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": not unsafe_pickle}
    # mmap avoids reading every tensor when only the keys and the step are needed; only the zip
    # format supports it.
    if mmap and zipfile.is_zipfile(path):
        kwargs["mmap"] = True
    try:
        with warnings.catch_warnings():
            # torch's note about pickle protocols says nothing the error below does not.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            return torch.load(path, **kwargs)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Weights only load failed" in message or "weights_only" in message:
            detail = _unsupported_global(message)
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {_UNSAFE_HINT}" + (f" (it references {detail})" if detail else "")
            ) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated: {_first_line(message)}"
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(exc).__name__}: {_first_line(str(exc))})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - full unpickling may raise anything
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be loaded ({type(exc).__name__}: {_first_line(str(exc))})"
        ) from None


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0][:200] if text else "no details"


def _unsupported_global(message: str) -> str | None:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def _safetensors_load(path: Path, metadata_only: bool) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a safetensors file: install safetensors (pip install safetensors)"
        ) from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            if metadata_only:
                tensors = {k: None for k in f.keys()}
            else:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(exc).__name__}: {_first_line(str(exc))})"
        ) from None
    return tensors, metadata


def _int_or_none(value: Any) -> int | None:
    try:
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, bool):
            return None
        if isinstance(value, float) and not value.is_integer():
            return None
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        return None


def _is_tensor_map(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _unpack(obj: Any, path: Path) -> tuple[dict[str, Any], int | None, str]:
    """Find the weights and the step inside a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        # A whole pickled nn.Module (torch.save(model)) loads only with --unsafe-pickle.
        state_dict = getattr(obj, "state_dict", None)
        if callable(state_dict):
            return dict(state_dict()), None, "torch"
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state_dict or a dict of one"
        )
    step = None
    for key in STEP_KEYS:
        if key in obj:
            step = _int_or_none(obj[key])
            if step is not None:
                break
    fmt = (
        "lightning"
        if any(k.startswith("pytorch-lightning") or k == "lightning_version" for k in obj)
        else "torch"
    )
    if _is_tensor_map(obj):
        return dict(obj), step, fmt
    for key in WEIGHT_KEYS:
        inner = obj.get(key)
        if _is_tensor_map(inner):
            return dict(inner), step, fmt
        if (
            inner is not None
            and not isinstance(inner, Mapping)
            and callable(getattr(inner, "state_dict", None))
        ):
            return dict(inner.state_dict()), step, fmt
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise CheckpointError(
        f"checkpoint {str(path)!r}: no weights found; expected a state_dict or a dict with one under "
        f"{', '.join(WEIGHT_KEYS)} (its keys: {keys})"
    )


def _hf_step(path: Path) -> int | None:
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            step = _int_or_none(json.loads(state.read_text()).get("global_step"))
            if step is not None:
                return step
        except (json.JSONDecodeError, OSError, AttributeError):
            pass
    return None


def _hf_load(path: Path, unsafe_pickle: bool, metadata_only: bool) -> dict[str, Any]:
    for index_name, loader in (
        ("model.safetensors.index.json", "safetensors"),
        ("pytorch_model.bin.index.json", "torch"),
    ):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, OSError) as exc:
                raise CheckpointError(f"checkpoint {str(index)!r} is corrupt ({exc})") from None
            tensors: dict[str, Any] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(_load_file_weights(path / shard, loader, unsafe_pickle, metadata_only)[0])
            return tensors
    if (path / "model.safetensors").is_file():
        return _safetensors_load(path / "model.safetensors", metadata_only)[0]
    return _load_file_weights(path / "pytorch_model.bin", "torch", unsafe_pickle, metadata_only)[0]


def _load_file_weights(
    path: Path, kind: str, unsafe_pickle: bool, metadata_only: bool
) -> tuple[dict[str, Any], int | None, str]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    if kind == "safetensors":
        tensors, metadata = _safetensors_load(path, metadata_only)
        step = None
        for key in STEP_KEYS:
            if key in metadata:
                step = _int_or_none(metadata[key])
                if step is not None:
                    break
        return tensors, step, "safetensors"
    obj = _torch_load(path, unsafe_pickle, mmap=metadata_only)
    return _unpack(obj, path)


def _format_of(path: Path) -> str:
    if path.is_dir():
        return "huggingface"
    if path.suffix == ".safetensors":
        return "safetensors"
    # Some safetensors files carry other suffixes: sniff the header (8-byte length, then JSON).
    try:
        with path.open("rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path):
            return "safetensors"
    except OSError:
        pass
    return "torch"


def load_checkpoint(
    path: str | Path, *, unsafe_pickle: bool = False, metadata_only: bool = False
) -> tuple[dict[str, Any], int | None, str]:
    """Load one checkpoint's weights and stored step.

    Args:
        path: a checkpoint file or a Hugging Face model directory.
        unsafe_pickle: allow full pickles (``torch.load(weights_only=False)``), with a warning.
        metadata_only: memory-map (zip torch files) or skip (safetensors: values are None) the tensors;
            enough to read keys, shapes and the step cheaply.

    Returns:
        ``(state_dict, step or None, format)`` with tensors on CPU. Cost: reading the file.

    Raises:
        CheckpointError: the file is missing, corrupt or truncated, a pickle needs ``unsafe_pickle``, or
            it holds no weights.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    fmt = _format_of(path)
    if fmt == "huggingface":
        if not _is_hf_dir(path):
            raise CheckpointError(
                f"checkpoint directory {str(path)!r} is not a Hugging Face model directory "
                "(needs config.json and model.safetensors or pytorch_model.bin)"
            )
        return _hf_load(path, unsafe_pickle, metadata_only), _hf_step(path), "huggingface"
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated (empty file)")
    return _load_file_weights(path, fmt, unsafe_pickle, metadata_only)


def load_state_dict(path: str | Path, *, unsafe_pickle: bool = False) -> dict[str, Any]:
    """The weights of one checkpoint as a ``state_dict`` (see :func:`load_checkpoint`)."""
    return load_checkpoint(path, unsafe_pickle=unsafe_pickle)[0]


# --------------------------------------------------------------------------- matching a model


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


def match_state_dict(
    state_dict: Mapping[str, Any], model: Any, *, path: str | Path = "<checkpoint>"
) -> dict[str, Any]:
    """Rename a checkpoint's keys to the model's and check that they match.

    Keys match as they are; else the prefix a wrapper added (``model.`` in Lightning, ``module.`` from
    DataParallel/DDP, ``_orig_mod.`` from torch.compile, ...) is stripped when the stripped keys then
    cover the model exactly (other entries under other prefixes, such as a Lightning module's loss
    buffers, are dropped). A key missing from the checkpoint is accepted when the model ties it to a key
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
        # Entries outside the prefix (a LightningModule's loss buffers, say) are left behind.
        stripped = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        candidates.append((stripped, prefix in _WRAPPER_PREFIXES))
    # Also the reverse: the model is the wrapper (keys saved from the bare module).
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
    raise CheckpointError(
        f"checkpoint {str(path)!r} does not match the model: {'; '.join(parts)}; "
        "is --model the architecture these weights were saved from?"
    )


def _few(names: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... {len(names) - n} more" if len(names) > n else "")


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
            f"({_few(mismatched, 3)}); is --model the architecture these weights were saved from?"
        )
    return state_dict


def apply_checkpoint(model: Any, path: str | Path, *, unsafe_pickle: bool = False) -> int | None:
    """Load a checkpoint's weights into ``model`` in place.

    Returns:
        The step stored in the checkpoint, or None. Cost: reading the file and one copy of the weights.

    Raises:
        CheckpointError: see :func:`load_checkpoint` and :func:`match_state_dict`.
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


def inspect_checkpoints(
    paths: str | Path | Sequence[str | Path],
    *,
    model: Any | None = None,
    unsafe_pickle: bool = False,
) -> list[CheckpointInfo]:
    """Find checkpoints, read their steps, check them against ``model``, and sort them by step.

    Steps: the one stored in the checkpoint; for checkpoints without one, the last number in the file
    name; else the position in the given order. The list is sorted by step (ties keep the given order).
    Reading uses memory maps where the format allows, so checking many large checkpoints is cheap.

    Args:
        paths: files, Hugging Face directories, or directories of checkpoints.
        model: when given, every checkpoint's keys and shapes are checked against it.
        unsafe_pickle: allow full pickles (see :func:`load_checkpoint`).

    Returns:
        The checkpoints in step order. Cost: one metadata read per checkpoint.

    Raises:
        CheckpointError: the first problem found (nothing is half-done).
    """
    found = discover_checkpoints(paths)
    infos: list[CheckpointInfo] = []
    for position, path in enumerate(found):
        state_dict, stored, fmt = load_checkpoint(path, unsafe_pickle=unsafe_pickle, metadata_only=True)
        if model is not None:
            match_state_dict(state_dict, model, path=path)
        if stored is not None:
            step, source = stored, "stored"
        elif fmt == "huggingface" and _number_in_name(path) is not None:
            step, source = _number_in_name(path), "name"
        elif fmt != "huggingface" and _number_in_name(path) is not None:
            step, source = _number_in_name(path), "name"
        else:
            step, source = position, "position"
        infos.append(CheckpointInfo(path=path, step=int(step), step_source=source, format=fmt))
        del state_dict
    infos.sort(key=lambda info: info.step)
    return infos
