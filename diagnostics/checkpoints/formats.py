"""Checkpoint formats: the table :data:`FORMATS`, one entry per format, and :func:`load_checkpoint`.

Each :class:`CheckpointFormat` says once what a format is: its name (``CheckpointInfo.format``), the file
suffixes discovery picks up, how to recognise a path as this format, and how to read it safely into a
``state_dict`` and the stored step. Discovery, loading and the error messages all read this table, so a new
format is one reader function and one entry.

Formats understood:

- Hugging Face model directories (``config.json`` plus ``model.safetensors``, ``pytorch_model.bin`` or
  their sharded index; the step from ``trainer_state.json``);
- safetensors files (the step from the header metadata ``step`` / ``global_step`` when present);
- torch pickles: a raw ``state_dict``, a dict holding one under a key of :data:`WEIGHT_KEYS` with the
  step under a key of :data:`STEP_KEYS`, or a PyTorch Lightning ``.ckpt`` (reported as ``"lightning"``).

Pickles are read with ``torch.load(weights_only=True)``, which refuses to run code stored in the file.
Full pickles load only with ``unsafe_pickle=True`` (``--unsafe-pickle``), with an
:class:`UnsafePickleWarning`. Every problem raises :class:`~diagnostics.errors.CheckpointError` naming
the file.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diagnostics.errors import CheckpointError

__all__ = [
    "CheckpointFormat",
    "FORMATS",
    "CHECKPOINT_SUFFIXES",
    "WEIGHT_KEYS",
    "STEP_KEYS",
    "Read",
    "UnsafePickleWarning",
    "format_of",
    "load_checkpoint",
    "load_state_dict",
]

#: Keys under which training scripts commonly store the model's weights, in order of preference.
WEIGHT_KEYS = ("model", "state_dict", "model_state_dict", "module", "model_state", "net")

#: Keys under which the step is commonly stored, in order of preference.
STEP_KEYS = ("step", "global_step", "iteration", "epoch")

_UNSAFE_HINT = (
    "it is a full pickle that torch.load(weights_only=True) refuses because loading it could run code "
    "stored in the file; if you trust the file, pass --unsafe-pickle (unsafe_pickle=True) to load it"
)


class UnsafePickleWarning(UserWarning):
    """Emitted when a checkpoint is loaded as a full pickle (code in the file can run)."""


@dataclass(frozen=True)
class Read:
    """What a format's reader found.

    Attributes:
        state_dict: parameter and buffer names to CPU tensors (to None when only metadata was read).
        step: the step stored in the checkpoint, or None.
        format: set only when the content names a finer format than the entry that read it (a Lightning
            checkpoint is a torch pickle); None means the entry's name.
    """

    state_dict: dict[str, Any]
    step: int | None
    format: str | None = None


#: ``reader(path, unsafe_pickle=..., metadata_only=...) -> Read``.
Reader = Callable[..., Read]


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint format: how to recognise it and how to read it safely.

    Attributes:
        name: the format's name in :class:`~diagnostics.checkpoints.CheckpointInfo` and the run's config.
        description: what the user has to have, for error messages ("a safetensors file").
        recognise: ``recognise(path) -> bool`` for an existing path; cheap (the name, a few header bytes,
            the files of a directory), never a full read.
        read: ``read(path, unsafe_pickle=..., metadata_only=...) -> Read``. It must not run code from the
            file unless ``unsafe_pickle``; with ``metadata_only`` it may leave tensors unread (values None,
            or memory-mapped) since only keys, shapes and the step are needed; every failure is a
            :class:`~diagnostics.errors.CheckpointError` naming the file.
        suffixes: file suffixes that discovery picks up in a directory of checkpoints.
        directory: the format is a directory, not a file.
    """

    name: str
    description: str
    recognise: Callable[[Path], bool]
    read: Reader
    suffixes: tuple[str, ...] = ()
    directory: bool = False


# --------------------------------------------------------------------------- helpers


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0][:200] if text else "no details"


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {str(path)!r} is corrupt or truncated ({type(exc).__name__}: {_first_line(str(exc))})"
    )


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


def _stored_step(entries: Mapping[str, Any]) -> int | None:
    """The first of :data:`STEP_KEYS` in ``entries`` that holds an integer."""
    for key in STEP_KEYS:
        if key in entries:
            step = _int_or_none(entries[key])
            if step is not None:
                return step
    return None


# --------------------------------------------------------------------------- torch pickles


def _torch_load(path: Path, unsafe_pickle: bool, mmap: bool) -> Any:
    import torch

    if unsafe_pickle:
        warnings.warn(
            f"loading {str(path)!r} as a full pickle: code stored in the file can run; only do this "
            "for files you trust",
            UnsafePickleWarning,
            stacklevel=4,
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
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {_UNSAFE_HINT}"
                + (f" (it references {found.group(1)})" if found else "")
            ) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated: {_first_line(message)}"
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise _corrupt(path, exc) from None
    except Exception as exc:  # noqa: BLE001 - full unpickling may raise anything
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be loaded ({type(exc).__name__}: {_first_line(str(exc))})"
        ) from None


def _is_tensor_map(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _has_state_dict(obj: Any) -> bool:
    return obj is not None and not isinstance(obj, Mapping) and callable(getattr(obj, "state_dict", None))


def _read_torch(path: Path, *, unsafe_pickle: bool = False, metadata_only: bool = False) -> Read:
    """A raw state_dict, a dict with one under :data:`WEIGHT_KEYS`, a Lightning checkpoint, or (unsafe
    only) a whole pickled module."""
    obj = _torch_load(path, unsafe_pickle, mmap=metadata_only)
    if not isinstance(obj, Mapping):
        # A whole pickled nn.Module (torch.save(model)) loads only with --unsafe-pickle.
        if _has_state_dict(obj):
            return Read(dict(obj.state_dict()), None)
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state_dict or a dict of one"
        )
    step = _stored_step(obj)
    lightning = any(k.startswith("pytorch-lightning") or k == "lightning_version" for k in obj)
    fmt = "lightning" if lightning else None
    if _is_tensor_map(obj):
        return Read(dict(obj), step, fmt)
    for key in WEIGHT_KEYS:
        inner = obj.get(key)
        if _is_tensor_map(inner):
            return Read(dict(inner), step, fmt)
        if _has_state_dict(inner):
            return Read(dict(inner.state_dict()), step, fmt)
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise CheckpointError(
        f"checkpoint {str(path)!r}: no weights found; expected a state_dict or a dict with one under "
        f"{', '.join(WEIGHT_KEYS)} (its keys: {keys})"
    )


# --------------------------------------------------------------------------- safetensors


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    # Some safetensors files carry other suffixes: sniff the header (8-byte length, then JSON).
    try:
        with path.open("rb") as f:
            head = f.read(9)
        return len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path)
    except OSError:
        return False


def _read_safetensors(path: Path, *, unsafe_pickle: bool = False, metadata_only: bool = False) -> Read:
    """Tensors (None with ``metadata_only``) and the step from the header metadata; never unpickles."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a safetensors file: install safetensors (pip install safetensors)"
        ) from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: None if metadata_only else f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise _corrupt(path, exc) from None
    return Read(tensors, _stored_step(metadata))


# --------------------------------------------------------------------------- Hugging Face directories

#: Weight files of a Hugging Face model directory; the indexes list the shards of sharded weights.
_HF_INDEXES = {"model.safetensors.index.json": _read_safetensors, "pytorch_model.bin.index.json": _read_torch}
_HF_SINGLE = {"model.safetensors": _read_safetensors, "pytorch_model.bin": _read_torch}


def _is_hf_dir(path: Path) -> bool:
    return (
        path.is_dir()
        and (path / "config.json").is_file()
        and any((path / f).is_file() for f in (*_HF_INDEXES, *_HF_SINGLE))
    )


def _read_file(path: Path, reader: Reader, unsafe_pickle: bool, metadata_only: bool) -> Read:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    return reader(path, unsafe_pickle=unsafe_pickle, metadata_only=metadata_only)


def _hf_step(path: Path) -> int | None:
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            return _int_or_none(json.loads(state.read_text()).get("global_step"))
        except (json.JSONDecodeError, OSError, AttributeError):
            pass
    return None


def _read_hf(path: Path, *, unsafe_pickle: bool = False, metadata_only: bool = False) -> Read:
    """The weights (one file, or the shards its index lists) and the step from ``trainer_state.json``."""
    for index_name, reader in _HF_INDEXES.items():
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, OSError) as exc:
                raise CheckpointError(f"checkpoint {str(index)!r} is corrupt ({exc})") from None
            tensors: dict[str, Any] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(_read_file(path / shard, reader, unsafe_pickle, metadata_only).state_dict)
            return Read(tensors, _hf_step(path))
    name, reader = next(
        ((n, r) for n, r in _HF_SINGLE.items() if (path / n).is_file()), ("pytorch_model.bin", _read_torch)
    )
    return Read(_read_file(path / name, reader, unsafe_pickle, metadata_only).state_dict, _hf_step(path))


# --------------------------------------------------------------------------- the table

#: Every format, tried in order: a path is the first format that recognises it (torch, last, takes any
#: file). Add a format here.
FORMATS: tuple[CheckpointFormat, ...] = (
    CheckpointFormat(
        name="huggingface",
        description="a Hugging Face model directory (config.json plus model.safetensors or pytorch_model.bin)",
        recognise=_is_hf_dir,
        read=_read_hf,
        directory=True,
    ),
    CheckpointFormat(
        name="safetensors",
        description="a safetensors file",
        recognise=_is_safetensors,
        read=_read_safetensors,
        suffixes=(".safetensors",),
    ),
    CheckpointFormat(
        name="torch",
        description="a torch.save file (a state_dict, a dict holding one, or a Lightning checkpoint)",
        recognise=Path.is_file,
        read=_read_torch,
        suffixes=(".pt", ".pth", ".ckpt", ".bin", ".pkl", ".tar"),
    ),
)

#: File suffixes picked up when a directory is given.
CHECKPOINT_SUFFIXES: tuple[str, ...] = tuple(s for f in FORMATS for s in f.suffixes)


def format_of(path: Path) -> CheckpointFormat:
    """The format of an existing file or directory: the first entry of :data:`FORMATS` that recognises it.

    Raises:
        CheckpointError: no format recognises it (a directory that is not a model directory).
    """
    for fmt in FORMATS:
        if fmt.directory == path.is_dir() and fmt.recognise(path):
            return fmt
    kinds = " or ".join(f.description for f in FORMATS if f.directory == path.is_dir())
    raise CheckpointError(f"checkpoint {'directory ' if path.is_dir() else ''}{str(path)!r} is not {kinds}")


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
        ``(state_dict, step or None, format name)`` with tensors on CPU. Cost: reading the file.

    Raises:
        CheckpointError: the file is missing, corrupt or truncated, a pickle needs ``unsafe_pickle``, or
            it holds no weights.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated (empty file)")
    fmt = format_of(path)
    read = fmt.read(path, unsafe_pickle=unsafe_pickle, metadata_only=metadata_only)
    return read.state_dict, read.step, read.format or fmt.name


def load_state_dict(path: str | Path, *, unsafe_pickle: bool = False) -> dict[str, Any]:
    """The weights of one checkpoint as a ``state_dict`` (see :func:`load_checkpoint`)."""
    return load_checkpoint(path, unsafe_pickle=unsafe_pickle)[0]
