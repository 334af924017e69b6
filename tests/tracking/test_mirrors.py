"""Logger mirrors: the Monitor's scalars in TensorBoard event files, an offline W&B run and an MLflow store."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from diagnostics import Monitor
from diagnostics.errors import ConfigError
from diagnostics.store import open_run
from diagnostics.store.records import Record
from diagnostics.tracking.mirrors import CallbackMirror, resolve_mirrors, scalars_from_records

STEPS = 3
DIAGS = ["loss", "grad_norm", "weight_norm"]


def _train(run: Path, mirrors: list) -> dict[int, dict[str, float]]:
    """Three monitored steps of a tiny model; returns the scalars as the store holds them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with Monitor(model, run=run, diagnostics=DIAGS, optimizer=opt, mirrors=mirrors) as mon:
        for step in range(STEPS):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(step, (x, y), loss)
            opt.step()
    series = open_run(run).series()
    expected: dict[int, dict[str, float]] = {}
    for row in series.itertuples():
        name = row.metric if row.key == "all" else f"{row.metric}/{row.key}"
        expected.setdefault(int(row.step), {})["diagnostics/" + name] = float(row.value)
    return expected


def _steps_of(expected: dict[int, dict[str, float]], name: str) -> list[int]:
    return [s for s in sorted(expected) if name in expected[s]]


def test_scalars_from_records_keeps_scalars_only() -> None:
    recs = [Record("loss", 1.5), Record("grad_norm", 2.0, key="fc.weight"), Record("hessian_eigenvalue", 3.0, index=0),
            Record("hessian_eigenvalue", 1.0, index=1), Record("learning_rate", 0.1, index=0)]
    assert scalars_from_records(recs) == {"diagnostics/loss": 1.5, "diagnostics/grad_norm/fc.weight": 2.0,
                                          "diagnostics/learning_rate": 0.1}
    assert scalars_from_records(recs, per_key=False, metrics=["l*"], prefix="") == {"loss": 1.5, "learning_rate": 0.1}


def test_callback_mirror_sees_every_committed_step(tmp_path: Path) -> None:
    seen: dict[int, dict[str, float]] = {}
    expected = _train(tmp_path / "run", [lambda step, scalars: seen.__setitem__(step, scalars)])
    assert seen == expected
    assert set(seen[0]) >= {"diagnostics/loss", "diagnostics/grad_norm", "diagnostics/grad_norm/0.weight"}


def test_bad_mirrors_are_refused_and_failing_mirrors_only_warn(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown mirror 'neptune'"):
        resolve_mirrors("neptune")
    with pytest.raises(ConfigError, match="cannot use int"):
        resolve_mirrors([3])
    assert isinstance(resolve_mirrors(print)[0], CallbackMirror)

    def broken(step: int, scalars: dict) -> None:
        raise OSError("dashboard down")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(tmp_path / "run", [broken])
    msgs = [str(w.message) for w in caught if "mirror" in str(w.message)]
    assert len(msgs) == 1 and "dashboard down" in msgs[0]  # warned once, training went on


def test_tensorboard_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    own = SummaryWriter(log_dir=str(tmp_path / "tb_user"))
    expected = _train(tmp_path / "run", ["tensorboard", own])
    own.close()
    for log_dir in (tmp_path / "run" / "tensorboard", tmp_path / "tb_user"):
        acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
        for name in expected[0]:
            steps = _steps_of(expected, name)  # per-parameter values may be recorded on fewer steps
            events = acc.Scalars(name)
            assert [e.step for e in events] == steps
            assert [e.value for e in events] == pytest.approx([expected[s][name] for s in steps], rel=1e-6)


def _wandb_history(run_dir: Path) -> list[dict]:
    """History rows of an offline W&B run, read from its transaction log.

    The ``.wandb`` file is a 7-byte header then LevelDB-log records (32 KiB blocks; each record has a
    7-byte header: CRC32, little-endian length, type 1 full / 2 first / 3 middle / 4 last) holding
    protobuf ``Record`` messages.
    """
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.glob("*.wandb")
    data = log.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
        else:
            break
    rows = []
    for chunk in chunks:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(chunk)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from diagnostics.tracking.mirrors import WandbMirror

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    mirror = WandbMirror(mode="offline", dir=str(tmp_path), project="tdiag-test")
    expected = _train(tmp_path / "run", [mirror])
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = _wandb_history(run_dir)
    by_step = {int(r["trainer/step"]): r for r in rows if "trainer/step" in r}
    assert sorted(by_step) == list(range(STEPS))
    for step in range(STEPS):
        assert set(expected[step]) <= set(by_step[step])
        for name, value in expected[step].items():
            assert by_step[step][name] == pytest.approx(value, rel=1e-6)


def test_mlflow_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this flag
    from diagnostics.tracking.mirrors import MLflowMirror

    uri = (tmp_path / "mlruns").as_uri()
    mirror = MLflowMirror(tracking_uri=uri, experiment="tdiag", run_name="tiny")
    expected = _train(tmp_path / "run", [mirror])
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(mirror.run_id).info.status == "FINISHED"
    for name in expected[0]:
        stored = name if name.count("/") == 2 else name + "/all"  # key "all" is explicit in MLflow
        history = sorted(client.get_metric_history(mirror.run_id, stored), key=lambda m: m.step)
        steps = _steps_of(expected, name)
        assert [m.step for m in history] == steps
        assert [m.value for m in history] == pytest.approx([expected[s][name] for s in steps], rel=1e-6)
