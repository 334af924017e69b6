"""tdiag analyze: end to end with report, ls and export; resuming; every bad input as one line, exit 2."""

from __future__ import annotations

import json
import pickle

import pandas as pd
import pytest
import torch
from cli_helpers import assert_user_error, invoke, save_mlp_checkpoints

import diagnostics.app.analyze as analyze_module
from diagnostics.store import open_run
from diagnostics.store.schema import database_path

CHEAP = "loss,grad_norm,weight_norm"
BASE = (
    "--model",
    "mlp-digits",
    "--data",
    "digits",
    "--batches",
    "1",
    "--batch-size",
    "16",
    "--diagnostics",
    CHEAP,
    "-q",
)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    save_mlp_checkpoints(folder, steps=(2, 4, 6))
    return folder


class Evil:
    """Unpickling this object creates MARKER: proof that code stored in a checkpoint ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_end_to_end_analyze_report_ls_export(runner, tdiag, ckpts, tmp_path):
    run = tmp_path / "run"
    # The default diagnostics (the standard preset) on the smallest data that still has two batches.
    result = invoke(
        runner,
        tdiag,
        "analyze",
        ckpts,
        "--model",
        "mlp-digits",
        "--batches",
        "2",
        "--batch-size",
        "8",
        "--run",
        run,
    )
    assert result.exit_code == 0, result.stderr
    assert "analysed 3 checkpoint(s)" in result.stdout
    assert open_run(run).series("loss")["step"].tolist() == [2, 4, 6]

    listing = invoke(runner, tdiag, "ls", run, "--json")
    summary = json.loads(listing.stdout)
    assert summary["checkpoints_analysed"] == 3 and summary["last_step"] == 6
    assert invoke(runner, tdiag, "ls", run).exit_code == 0

    result = invoke(runner, tdiag, "export", run, "--format", "csv", "-o", tmp_path / "series.csv")
    assert result.exit_code == 0, result.stderr
    df = pd.read_csv(tmp_path / "series.csv")
    assert set(df["step"]) == {2, 4, 6} and "loss" in set(df["metric"])

    if "report" not in tdiag.commands:
        pytest.skip("the report command is not available yet")
    result = invoke(runner, tdiag, "report", run, "-o", tmp_path / "report.html")
    assert result.exit_code == 0, result.stderr
    assert "<html" in (tmp_path / "report.html").read_text(encoding="utf-8").lower()


def test_interrupted_analysis_resumes_without_duplicates(runner, tdiag, ckpts, tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = analyze_module._monitor_step
    calls = []

    def ctrl_c_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(analyze_module, "_monitor_step", ctrl_c_on_second)
    result = invoke(runner, tdiag, "analyze", ckpts, *BASE, "--run", run)
    assert result.exit_code == 130 and "resume" in result.stderr
    assert open_run(run).series("loss")["step"].tolist() == [2]
    monkeypatch.setattr(analyze_module, "_monitor_step", original)

    result = invoke(runner, tdiag, "analyze", ckpts, *BASE[:-1], "--run", run)
    assert result.exit_code == 0, result.stderr
    assert "analysed 2 checkpoint(s), 1 already in the run" in result.stdout
    series = open_run(run).series()
    assert not series.duplicated(["step", "metric", "key", "index"]).any()
    assert open_run(run).series("loss")["step"].tolist() == [2, 4, 6]
    result = invoke(runner, tdiag, "analyze", ckpts, *BASE, "--run", run, "--force")
    assert result.exit_code == 0 and len(open_run(run).series()) == len(series)


def test_config_file_with_flag_override(runner, tdiag, ckpts, tmp_path):
    config = tmp_path / "analysis.toml"
    config.write_text(
        f'[analyze]\ncheckpoints = ["{ckpts}"]\nmodel = "mlp-digits"\ndata = "digits"\n'
        f'diagnostics = "{CHEAP}"\nbatches = 1\nrun = "from_config"\nquiet = true\n'
    )
    result = invoke(runner, tdiag, "analyze", "--config", config, "--run", tmp_path / "from_flag")
    assert result.exit_code == 0, result.stderr
    assert database_path(tmp_path / "from_flag").is_file()
    assert not (tmp_path / "from_config").exists()


# ------------------------------------------------------------------------------------- bad input


def _nothing_written(run) -> bool:
    return not database_path(run).exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--model", "no_such_pkg_xyz.models:Net"), ("module 'no_such_pkg_xyz.models' not found",)),
        (("--model", "missing_dir/net.py:Net"), ("file", "not found")),
        (("--model", "torch.nn:NoSuchThing"), ("has no attribute 'NoSuchThing'",)),
        (("--model", "mlp-digits", "--data", "torch:pi"), ("data spec", "neither an iterable")),
        (("--model", "mlp-digits", "--loss", "torch:pi"), ("loss spec", "not callable")),
        (
            ("--model", "mlp-digits", "--diagnostics", "loss,hessian_nonsense"),
            ("unknown diagnostic 'hessian_nonsense'", "grad_norm"),
        ),
        (
            ("--model", "cnn-digits", "--data", "digits"),
            ("does not match the model", "missing key(s)", "ckpt_0002.pt"),
        ),
        (("--model", "mlp-digits", "--device", "cuda:7"), ("cuda",)),
    ],
)
def test_bad_specs_and_options(runner, tdiag, ckpts, tmp_path, args, fragments):
    run = tmp_path / "run"
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("CUDA present")
    result = invoke(runner, tdiag, "analyze", ckpts, *args, "--batches", "1", "--run", run)
    assert_user_error(result, *fragments)
    assert _nothing_written(run)


def test_bad_checkpoints(runner, tdiag, ckpts, tmp_path):
    run = tmp_path / "run"
    good = (ckpts / "ckpt_0002.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 20)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "README.txt").write_text("nothing to see")
    cases = [
        (tmp_path / "truncated.pt", ("truncated.pt", "corrupt or truncated")),
        (tmp_path / "garbage.pt", ("garbage.pt",)),
        (empty, ("holds no checkpoints",)),
        (tmp_path / "absent.pt", ("absent.pt", "not found")),
    ]
    for path, fragments in cases:
        assert_user_error(invoke(runner, tdiag, "analyze", path, *BASE, "--run", run), *fragments)
        assert _nothing_written(run)
    # A corrupt file next to good ones: nothing is analysed, not even the good ones.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a_0001.pt").write_bytes(good)
    (mixed / "b_0002.pt").write_bytes(good[:100])
    assert_user_error(invoke(runner, tdiag, "analyze", mixed, *BASE, "--run", run), "b_0002.pt")
    assert _nothing_written(run)


def test_missing_required_options(runner, tdiag, ckpts, tmp_path):
    assert_user_error(invoke(runner, tdiag, "analyze", ckpts, "--run", tmp_path / "r"), "--model")
    assert_user_error(invoke(runner, tdiag, "analyze", ckpts, "--model", "mlp-digits"), "--run")
    assert_user_error(
        invoke(runner, tdiag, "analyze", "--model", "mlp-digits", "--run", tmp_path / "r"), "no checkpoints"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("modle = 'typo'\n")
    assert_user_error(invoke(runner, tdiag, "analyze", "--config", bad), "unknown option 'modle'")


def test_run_directory_of_another_model(runner, tdiag, ckpts, tmp_path):
    run = tmp_path / "run"
    assert invoke(runner, tdiag, "analyze", ckpts / "ckpt_0002.pt", *BASE, "--run", run).exit_code == 0
    rows = len(open_run(run).series())
    other = tmp_path / "cnn"
    from diagnostics.zoo import get_model

    other.mkdir()
    torch.save(get_model("cnn-digits").state_dict(), other / "c_1.pt")
    result = invoke(
        runner,
        tdiag,
        "analyze",
        other,
        "--model",
        "cnn-digits",
        "--diagnostics",
        CHEAP,
        "--batches",
        "1",
        "--run",
        run,
    )
    assert_user_error(result, "another model", "--run")
    assert len(open_run(run).series()) == rows


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_and_its_code_never_runs(runner, tdiag, ckpts, tmp_path, writer):
    marker = tmp_path / "MARKER"
    folder = tmp_path / "evil"
    folder.mkdir()
    state = torch.load(ckpts / "ckpt_0002.pt", weights_only=True)["model"]
    payload = {"model": state, "step": 1, "hook": Evil(marker)}
    if writer == "torch":
        torch.save(payload, folder / "evil.pt")
    else:
        with (folder / "evil.pt").open("wb") as f:
            pickle.dump(payload, f)
    run = tmp_path / "run"
    result = invoke(runner, tdiag, "analyze", folder, *BASE, "--run", run)
    assert_user_error(result, "evil.pt", "--unsafe-pickle")
    assert not marker.exists()
    assert _nothing_written(run)


def test_unsafe_pickle_flag_loads_with_a_warning(runner, tdiag, tmp_path):
    from diagnostics.zoo import get_model

    folder = tmp_path / "whole"
    folder.mkdir()
    torch.save(get_model("mlp-digits"), folder / "model_5.pt")  # a whole pickled module
    run = tmp_path / "run"
    refused = invoke(runner, tdiag, "analyze", folder, *BASE, "--run", run)
    assert_user_error(refused, "--unsafe-pickle")
    result = invoke(runner, tdiag, "analyze", folder, *BASE, "--run", run, "--unsafe-pickle")
    assert result.exit_code == 0, result.stderr
    assert "warning:" in result.stderr and "pickle" in result.stderr
    assert open_run(run).series("loss")["step"].tolist() == [5]


def test_lightning_and_safetensors_checkpoints(runner, tdiag, ckpts, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(ckpts / "ckpt_0002.pt", weights_only=True)["model"]
    folder = tmp_path / "mixed_formats"
    folder.mkdir()
    lightning = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "global_step": 30, "epoch": 0}
    torch.save(lightning, folder / "epoch=0-step=30.ckpt")
    save_file(dict(state), folder / "weights.safetensors", metadata={"step": "10"})
    run = tmp_path / "run"
    result = invoke(runner, tdiag, "analyze", folder, *BASE, "--run", run)
    assert result.exit_code == 0, result.stderr
    assert open_run(run).series("loss")["step"].tolist() == [10, 30]
