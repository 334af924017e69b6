"""Training checkpoints: finding them, reading them safely, and matching them to a model.

- :mod:`~diagnostics.checkpoints.formats`: the table of formats (torch pickles and Lightning ``.ckpt``,
  safetensors, Hugging Face model directories), each with how to recognise and how to read it;
- :mod:`~diagnostics.checkpoints.discover`: files and directories to checkpoints in step order;
- :mod:`~diagnostics.checkpoints.match`: a checkpoint's keys to the model's (wrapper prefixes, tied
  weights, shapes).

Pickles load with ``torch.load(weights_only=True)`` unless ``unsafe_pickle=True`` (``--unsafe-pickle``).
Every problem raises :class:`~diagnostics.errors.CheckpointError` naming the file.
"""

from diagnostics.checkpoints.discover import CheckpointInfo, discover_checkpoints, inspect_checkpoints
from diagnostics.checkpoints.formats import (
    CHECKPOINT_SUFFIXES,
    FORMATS,
    STEP_KEYS,
    WEIGHT_KEYS,
    CheckpointFormat,
    UnsafePickleWarning,
    format_of,
    load_checkpoint,
    load_state_dict,
)
from diagnostics.checkpoints.match import apply_checkpoint, match_state_dict

__all__ = [
    # finding and ordering
    "CheckpointInfo",
    "discover_checkpoints",
    "inspect_checkpoints",
    # formats and safe reading
    "FORMATS",
    "CheckpointFormat",
    "CHECKPOINT_SUFFIXES",
    "WEIGHT_KEYS",
    "STEP_KEYS",
    "UnsafePickleWarning",
    "format_of",
    "load_checkpoint",
    "load_state_dict",
    # matching a model
    "match_state_dict",
    "apply_checkpoint",
]
