"""tdiag --help, ls, export and combine on synthetic run stores; the README lists every command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from cli_helpers import assert_user_error, invoke
from diagnostics.cli.commands import COMMAND_NAMES

from diagnostics.store import open_run
from diagnostics.testing.synthetic import write_synthetic_run

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    healthy = write_synthetic_run(base / "healthy", steps=40, layers=1, seed=0)
    exploding = write_synthetic_run(base / "exploding", steps=60, layers=1, seed=1, explode_at=30)
    return Path(healthy), Path(exploding)


def test_every_command_has_help(runner, tdiag):
    result = invoke(runner, tdiag, "--help")
    assert result.exit_code == 0
    for name in tdiag.commands:
        sub = invoke(runner, tdiag, name, "--help")
        assert sub.exit_code == 0, (name, sub.stderr)
        assert "Usage:" in sub.stdout and name in sub.stdout


def test_register_adds_every_command(tdiag):
    expected = set(COMMAND_NAMES)
    try:
        import diagnostics.cli.report_cmd  # noqa: F401
    except ImportError:
        expected.discard("report")
    assert expected <= set(tdiag.commands)


def test_every_command_appears_in_readme(tdiag):
    text = README.read_text(encoding="utf-8")
    missing = [name for name in sorted(tdiag.commands) if not re.search(rf"tdiag {name}\b", text)]
    assert not missing, f"README.md does not show these commands (as 'tdiag NAME'): {missing}"


def test_ls_table_and_json(runner, tdiag, synthetic_runs):
    _, exploding = synthetic_runs
    result = invoke(runner, tdiag, "ls", exploding)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "loss" in out and "sa_sign_diversity" in out and "event(s)" in out
    assert "explosion_warning" in out
    as_json = invoke(runner, tdiag, "ls", exploding, "--json")
    summary = json.loads(as_json.stdout)
    metrics = {m["metric"]: m for m in summary["metrics"]}
    assert metrics["loss"]["steps"] == 60 and metrics["loss"]["last_step"] == 59
    assert summary["num_events"] >= 1
    assert {e["kind"] for e in summary["events"]} & {"explosion_warning", "loss_explosion"}


def test_export_csv_and_parquet(runner, tdiag, synthetic_runs, tmp_path):
    healthy, _ = synthetic_runs
    expected = open_run(healthy).series()
    result = invoke(runner, tdiag, "export", healthy, "--format", "csv", "-o", tmp_path / "s.csv")
    assert result.exit_code == 0, result.stderr
    df = pd.read_csv(tmp_path / "s.csv")
    assert len(df) == len(expected) and {"step", "metric", "key", "index", "value"} <= set(df.columns)
    result = invoke(runner, tdiag, "export", healthy, "--format", "parquet", "-o", tmp_path / "s.parquet")
    assert result.exit_code == 0, result.stderr
    assert len(pd.read_parquet(tmp_path / "s.parquet")) == len(expected)
    result = invoke(runner, tdiag, "export", healthy, "--table", "events", "-o", tmp_path / "e.csv")
    assert result.exit_code == 0 and (tmp_path / "e.csv").is_file()


def test_combine(runner, tdiag, synthetic_runs, tmp_path):
    healthy, exploding = synthetic_runs
    out = tmp_path / "merged"
    result = invoke(runner, tdiag, "combine", healthy, exploding, "-o", out)
    assert result.exit_code == 0, result.stderr
    merged = open_run(out).series("loss")
    assert len(merged) == 40 + 60
    again = invoke(runner, tdiag, "combine", healthy, exploding, "-o", out)
    assert_user_error(again, "merged")


def test_store_errors_are_one_line(runner, tdiag, tmp_path):
    assert_user_error(invoke(runner, tdiag, "ls", tmp_path / "nope"), "nope")
    assert_user_error(invoke(runner, tdiag, "export", tmp_path / "nope", "-o", tmp_path / "x.csv"), "nope")
    assert_user_error(invoke(runner, tdiag, "combine", tmp_path / "nope", "-o", tmp_path / "m"), "nope")
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())
