"""Finding checkpoints on disk and putting them in step order.

:func:`discover_checkpoints` expands the paths a user gives into checkpoint files and directories, using
the suffixes and directory formats of :data:`~diagnostics.checkpoints.formats.FORMATS`;
:func:`inspect_checkpoints` reads each one's step (cheaply: metadata only), optionally checks it
against the model, and sorts them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diagnostics.checkpoints.formats import CHECKPOINT_SUFFIXES, FORMATS, load_checkpoint
from diagnostics.checkpoints.match import match_state_dict
from diagnostics.errors import CheckpointError

__all__ = ["CheckpointInfo", "discover_checkpoints", "inspect_checkpoints"]


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint found on disk.

    Attributes:
        path: the file or Hugging Face directory.
        step: the training step it belongs to: stored in the checkpoint, else the number in its name,
            else its position in the list.
        step_source: where ``step`` came from: ``"stored"``, ``"name"`` or ``"position"``.
        format: the name of its entry in :data:`~diagnostics.checkpoints.formats.FORMATS` (``"torch"``,
            ``"safetensors"``, ``"huggingface"``), or ``"lightning"`` for a Lightning torch pickle.
    """

    path: Path
    step: int
    step_source: str
    format: str

    @property
    def source(self) -> str:
        """A stable id of this checkpoint for the run store's list of completed sources."""
        return f"checkpoint:{self.path.resolve()}"


def _is_checkpoint_dir(path: Path) -> bool:
    return any(f.directory and f.recognise(path) for f in FORMATS)


def _is_checkpoint_file(path: Path) -> bool:
    return path.is_file() and path.suffix in CHECKPOINT_SUFFIXES and not path.name.startswith(".")


def _number_in_name(path: Path) -> int | None:
    """The last integer in the name without suffix ("step_00300.pt" -> 300, "epoch=3-step=90" -> 90)."""
    numbers = re.findall(r"\d+", path.stem if path.is_file() else path.name)
    return int(numbers[-1]) if numbers else None


def discover_checkpoints(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand files and directories into the list of checkpoint paths (unsorted).

    A directory is either itself a checkpoint (a Hugging Face model directory), or is searched (not
    recursively) for files with a suffix in :data:`~diagnostics.checkpoints.formats.CHECKPOINT_SUFFIXES`
    and checkpoint sub-directories (``checkpoint-500/``).

    Raises:
        CheckpointError: a path does not exist, a directory holds no checkpoints, or nothing was given.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file() or _is_checkpoint_dir(path):
            found.append(path)
        elif path.is_dir():
            entries = sorted(p for p in path.iterdir() if _is_checkpoint_file(p) or _is_checkpoint_dir(p))
            if not entries:
                dirs = " or ".join(f.description for f in FORMATS if f.directory)
                raise CheckpointError(
                    f"directory {str(path)!r} holds no checkpoints (looked for files ending in "
                    f"{', '.join(CHECKPOINT_SUFFIXES)}, and for sub-directories that are {dirs})"
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


def inspect_checkpoints(
    paths: str | Path | Sequence[str | Path],
    *,
    model: Any | None = None,
    unsafe_pickle: bool = False,
) -> list[CheckpointInfo]:
    """Find checkpoints, read their steps, check them against ``model``, and sort them by step.

    Steps: the one stored in the checkpoint; for checkpoints without one, the last number in the file
    or directory name; else the position in the given order. The list is sorted by step (ties keep the
    given order). Reading uses memory maps where the format allows, so checking many large checkpoints
    is cheap.

    Args:
        paths: files, Hugging Face directories, or directories of checkpoints.
        model: when given, every checkpoint's keys and shapes are checked against it.
        unsafe_pickle: allow full pickles (see :func:`~diagnostics.checkpoints.formats.load_checkpoint`).

    Returns:
        The checkpoints in step order. Cost: one metadata read per checkpoint.

    Raises:
        CheckpointError: the first problem found (nothing is half-done).
    """
    infos: list[CheckpointInfo] = []
    for position, path in enumerate(discover_checkpoints(paths)):
        state_dict, stored, fmt = load_checkpoint(path, unsafe_pickle=unsafe_pickle, metadata_only=True)
        if model is not None:
            match_state_dict(state_dict, model, path=path)
        del state_dict
        named = _number_in_name(path)
        if stored is not None:
            step, source = stored, "stored"
        elif named is not None:
            step, source = named, "name"
        else:
            step, source = position, "position"
        infos.append(CheckpointInfo(path=path, step=int(step), step_source=source, format=fmt))
    infos.sort(key=lambda info: info.step)
    return infos
