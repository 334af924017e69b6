"""Matching a checkpoint to the model: wrapper prefixes, tied weights, missing keys and shapes."""

from __future__ import annotations

import pytest
import torch
from checkpoint_helpers import make_model

from diagnostics.checkpoints import inspect_checkpoints, match_state_dict
from diagnostics.errors import CheckpointError

def test_ddp_and_compile_prefixes(tmp_path):
    model = make_model()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        matched = match_state_dict({prefix + k: v for k, v in model.state_dict().items()}, model)
        assert set(matched) == set(model.state_dict())


def test_tied_weights_may_be_absent():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    sd = {"emb.weight": torch.zeros(5, 3)}
    assert set(match_state_dict(sd, model)) == {"emb.weight"}


def test_mismatching_model_lists_keys_and_file(tmp_path):
    torch.save(make_model().state_dict(), tmp_path / "m.pt")
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 5), torch.nn.Linear(5, 2))
    with pytest.raises(CheckpointError) as info:
        inspect_checkpoints(tmp_path / "m.pt", model=other)
    message = str(info.value)
    assert "m.pt" in message and "missing key(s)" in message and "1.weight" in message
    with pytest.raises(CheckpointError, match="shape mismatch"):
        inspect_checkpoints(tmp_path / "m.pt", model=make_model(width=7))
