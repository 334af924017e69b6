"""tdiag demo: the quick version end to end (fast), the full version under its time budget (slow)."""

from __future__ import annotations

import time

import pytest
from cli_helpers import assert_user_error, invoke

from diagnostics.demo import explosion_step
from diagnostics.store import open_run


def test_explosion_step_definition():
    assert explosion_step([3.0] * 30) is None
    # 10 consecutive steps above twice the running minimum, starting at step 25.
    assert explosion_step([3.0] * 25 + [7.0] * 10) == 25
    assert explosion_step([3.0] * 25 + [7.0] * 9 + [3.0]) is None  # too short a streak
    assert explosion_step([3.0] * 5 + [float("nan")]) == 5  # non-finite counts at once
    assert explosion_step([9.0] * 5 + [3.0] * 20) is None  # early training may move a lot


def test_quick_demo(runner, tdiag, tmp_path):
    out = tmp_path / "demo"
    started = time.perf_counter()
    result = invoke(runner, tdiag, "demo", "--out", out, "--quick", "--quiet")
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4, result.stdout
    assert (
        lines[0].startswith("report: ")
        and "exploding run:" in lines[1]
        and lines[3].startswith("stable run: final loss")
    )
    report = out / "report.html"
    assert report.is_file() and "stable" in report.read_text(encoding="utf-8")
    for name in ("stable", "exploding", "stable-checkpoints"):
        assert open_run(out / "runs" / name).steps()
    assert open_run(out / "runs" / "stable-checkpoints").sources()["step"].tolist() == [15, 30]
    assert "the loss exploded at step" in result.stdout
    assert (out / ".tdiag-demo").is_file()  # marks the directory as the demo's: a rerun may replace it
    print(f"quick demo: {seconds:.1f} s")


def test_demo_refuses_to_clean_foreign_directories(runner, tdiag, tmp_path):
    (tmp_path / "runs" / "stable").mkdir(parents=True)
    (tmp_path / "runs" / "stable" / "precious.txt").write_text("not the demo's")
    result = invoke(runner, tdiag, "demo", "--out", tmp_path, "--quick", "--quiet")
    assert_user_error(result, "not written by tdiag demo")
    assert (tmp_path / "runs" / "stable" / "precious.txt").is_file()


@pytest.mark.slow
def test_full_demo_within_budget(runner, tdiag, tmp_path):
    started = time.perf_counter()
    result = invoke(runner, tdiag, "demo", "--out", tmp_path / "demo", "--quiet")
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.stderr
    assert "the loss exploded at step" in result.stdout
    assert "final loss" in result.stdout
    assert seconds < 300, f"the demo took {seconds:.0f} s (budget 300 s on 2 cores)"


def test_demo_replaces_only_its_own_outputs(tmp_path):
    from diagnostics.demo import MARKER, _fresh
    from diagnostics.errors import ConfigError

    (tmp_path / "runs" / "stable").mkdir(parents=True)
    with pytest.raises(ConfigError):
        _fresh(tmp_path / "runs" / "stable", tmp_path)
    (tmp_path / MARKER).write_text("")
    assert not _fresh(tmp_path / "runs" / "stable", tmp_path).exists()
