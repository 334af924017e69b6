"""Checkpoint formats: reading each safely into a state dict and a step; refusing unsafe pickles."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import pytest
import torch
from checkpoint_helpers import Marker, make_model

from diagnostics.checkpoints import (
    FORMATS,
    UnsafePickleWarning,
    apply_checkpoint,
    discover_checkpoints,
    format_of,
    inspect_checkpoints,
    load_checkpoint,
)
from diagnostics.errors import CheckpointError

def test_raw_state_dict_and_wrapped_dicts(tmp_path):
    model = make_model()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "raw.pt")
    torch.save({"model": sd, "step": 7, "optimizer": {"lr": 0.1}}, tmp_path / "a.pt")
    torch.save({"model_state_dict": sd, "global_step": torch.tensor(9)}, tmp_path / "b.pth")
    torch.save({"state_dict": sd, "epoch": 2}, tmp_path / "c.pt")
    torch.save({"module": sd, "iteration": 3}, tmp_path / "d.pt")
    expected = {"raw.pt": None, "a.pt": 7, "b.pth": 9, "c.pt": 2, "d.pt": 3}
    for name, step in expected.items():
        weights, stored, fmt = load_checkpoint(tmp_path / name)
        assert stored == step and fmt == "torch"
        assert torch.equal(weights["0.weight"], sd["0.weight"])


def test_lightning_prefix_is_stripped_and_extra_entries_left(tmp_path):
    model = make_model()
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    sd["criterion.weight"] = torch.ones(2)  # a LightningModule's own buffer
    torch.save(
        {"state_dict": sd, "global_step": 40, "epoch": 1, "pytorch-lightning_version": "2.4"},
        tmp_path / "x.ckpt",
    )
    target = make_model()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    assert apply_checkpoint(target, tmp_path / "x.ckpt") == 40
    assert torch.equal(target[0].weight, model[0].weight)
    assert load_checkpoint(tmp_path / "x.ckpt")[2] == "lightning"


def test_safetensors_with_step_metadata(tmp_path):
    from safetensors.torch import save_file

    model = make_model()
    save_file(model.state_dict(), tmp_path / "m.safetensors", metadata={"step": "12"})
    weights, step, fmt = load_checkpoint(tmp_path / "m.safetensors")
    assert (step, fmt) == (12, "safetensors")
    assert torch.equal(weights["2.bias"], model.state_dict()["2.bias"])


def test_huggingface_directory(tmp_path):
    from safetensors.torch import save_file

    model = make_model()
    d = tmp_path / "checkpoint-300"
    d.mkdir()
    (d / "config.json").write_text("{}")
    save_file(model.state_dict(), d / "model.safetensors")
    infos = inspect_checkpoints(tmp_path, model=model)
    assert [(i.step, i.step_source, i.format) for i in infos] == [(300, "name", "huggingface")]
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 301}))
    assert inspect_checkpoints(d)[0].step == 301


@pytest.mark.parametrize("cut", [0, 10, 0.5])
def test_corrupt_or_truncated(tmp_path, cut):
    path = tmp_path / "m.pt"
    torch.save(make_model().state_dict(), path)
    data = path.read_bytes()
    size = int(len(data) * cut) if isinstance(cut, float) else cut
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_garbage_and_truncated_safetensors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    from safetensors.torch import save_file

    save_file(make_model().state_dict(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "m.safetensors")


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    payload = {"model": make_model().state_dict(), "step": 1, "x": Marker(str(marker))}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "--unsafe-pickle" in str(info.value)
    with pytest.raises(CheckpointError):
        inspect_checkpoints(tmp_path, model=make_model())
    assert not marker.exists()


def test_unsafe_pickle_loads_with_a_warning(tmp_path):
    model = make_model()
    torch.save(model, tmp_path / "whole.pt")  # a pickled nn.Module
    with pytest.raises(CheckpointError, match="--unsafe-pickle"):
        load_checkpoint(tmp_path / "whole.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights, _, _ = load_checkpoint(tmp_path / "whole.pt", unsafe_pickle=True)
    assert any(issubclass(w.category, UnsafePickleWarning) for w in caught)
    assert set(weights) == set(model.state_dict())
    assert os.path.exists(tmp_path / "whole.pt")


# ------------------------------------------------------------------ every entry of the FORMATS table
# One writer per format, saving the given weights with step 5; a new format adds its writer here.


def _write_torch(folder, state_dict):
    torch.save({"model": state_dict, "step": 5}, folder / "w.pt")
    return folder / "w.pt"


def _write_safetensors(folder, state_dict):
    from safetensors.torch import save_file

    save_file(state_dict, folder / "w.safetensors", metadata={"step": "5"})
    return folder / "w.safetensors"


def _write_huggingface(folder, state_dict):
    from safetensors.torch import save_file

    d = folder / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    save_file(state_dict, d / "model.safetensors")
    return d


WRITERS = {"torch": _write_torch, "safetensors": _write_safetensors, "huggingface": _write_huggingface}


def test_every_format_has_a_writer_in_this_file():
    assert {f.name for f in FORMATS} == set(WRITERS)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_format_is_recognised_read_and_discovered(tmp_path, name):
    model = make_model()
    sd = model.state_dict()
    path = WRITERS[name](tmp_path, sd)
    assert format_of(path).name == name
    weights, step, fmt = load_checkpoint(path)
    assert (step, fmt) == (5, name)
    assert all(torch.equal(weights[k], v) for k, v in sd.items())
    assert set(load_checkpoint(path, metadata_only=True)[0]) == set(sd)
    assert discover_checkpoints(tmp_path) == [path]
    [info] = inspect_checkpoints(tmp_path, model=model)
    assert (info.step, info.step_source, info.format) == (5, "stored", name)
