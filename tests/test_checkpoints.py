"""Checkpoint formats, step inference, model matching and the refusal of unsafe pickles."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import pytest
import torch

from diagnostics.checkpoints import (
    UnsafePickleWarning,
    apply_checkpoint,
    discover_checkpoints,
    inspect_checkpoints,
    load_checkpoint,
    match_state_dict,
)
from diagnostics.errors import CheckpointError


def make_model(width: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


class Marker:
    """Unpickling this object creates a file: proof that code stored in a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


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


def test_mismatching_model_lists_keys_and_file(tmp_path):
    torch.save(make_model().state_dict(), tmp_path / "m.pt")
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 5), torch.nn.Linear(5, 2))
    with pytest.raises(CheckpointError) as info:
        inspect_checkpoints(tmp_path / "m.pt", model=other)
    message = str(info.value)
    assert "m.pt" in message and "missing key(s)" in message and "1.weight" in message
    with pytest.raises(CheckpointError, match="shape mismatch"):
        inspect_checkpoints(tmp_path / "m.pt", model=make_model(width=7))


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


def test_empty_directory_and_missing_path(tmp_path):
    (tmp_path / "notes.txt").write_text("no checkpoints here")
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        discover_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        discover_checkpoints(tmp_path / "nope.pt")


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
