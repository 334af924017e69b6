"""Finding checkpoints in files and directories, and ordering them by stored step, name or position."""

from __future__ import annotations

import pytest
import torch
from checkpoint_helpers import make_model

from diagnostics.checkpoints import discover_checkpoints, inspect_checkpoints
from diagnostics.errors import CheckpointError

def test_directory_sorted_by_stored_step_else_name(tmp_path):
    model = make_model()
    sd = model.state_dict()
    torch.save({"model": sd, "step": 200}, tmp_path / "z_first.pt")
    torch.save({"model": sd, "step": 10}, tmp_path / "z_second.pt")
    infos = inspect_checkpoints(tmp_path, model=model)
    assert [i.path.name for i in infos] == ["z_second.pt", "z_first.pt"]
    other = tmp_path / "named"
    other.mkdir()
    for n in (100, 20, 3):
        torch.save(sd, other / f"step_{n}.pt")
    infos = inspect_checkpoints(other)
    assert [(i.step, i.step_source) for i in infos] == [(3, "name"), (20, "name"), (100, "name")]
    # The same file given twice is analysed once.
    assert len(discover_checkpoints([other, other / "step_3.pt"])) == 3


def test_empty_directory_and_missing_path(tmp_path):
    (tmp_path / "notes.txt").write_text("no checkpoints here")
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        discover_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        discover_checkpoints(tmp_path / "nope.pt")
