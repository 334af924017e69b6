"""tdiag demo: the quick version end to end (fast), the full version under its time budget (slow)."""

from __future__ import annotations

import time

import pytest
from cli_helpers import assert_user_error, invoke

from diagnostics.app.demo import explosion_step
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
    # No bare "no warning": either the warning fired or the summary says why it could not.
    assert "first explosion warning at step" in lines[1] or "detector never armed" in lines[1]
    events = open_run(out / "runs" / "exploding").events()
    assert "loss_explosion" in set(events["kind"])  # the report measures the lead against this step
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
    from diagnostics.app.demo import MARKER, _fresh
    from diagnostics.errors import ConfigError

    (tmp_path / "runs" / "stable").mkdir(parents=True)
    with pytest.raises(ConfigError):
        _fresh(tmp_path / "runs" / "stable", tmp_path)
    (tmp_path / MARKER).write_text("")
    assert not _fresh(tmp_path / "runs" / "stable", tmp_path).exists()


def test_summary_lines_say_lead_lateness_and_why_no_warning(tmp_path):
    from diagnostics.app.demo import DemoResult

    def lines(**kw):
        return DemoResult(
            out=tmp_path, report=None, runs={}, stable_final_loss=2.5, stable_steps=220, **kw
        ).summary_lines()

    early = lines(warning_step=167, warning_detail="layer a", explosion_step=193)
    assert early[1] == "exploding run: first explosion warning at step 167 (layer a)"
    assert early[2] == "exploding run: the loss exploded at step 193, 26 steps after the warning"
    late = lines(warning_step=200, warning_detail="layer a", explosion_step=193)
    assert late[2].endswith("193, 7 steps before the warning")
    unarmed = lines(detector_note="the detector never armed", stable_note="the detector never armed")
    assert unarmed[1] == "exploding run: no explosion warning fired (the detector never armed)"
    assert unarmed[3].endswith("no warnings (the detector never armed)") and len(unarmed) == 4
    edge = lines(edge_note="reached it at step 140", stable_edge_note="stayed below it")
    assert edge[4] == ("sharpness vs stability threshold: exploding run reached it "
                       "at step 140; stable run stayed below it")


def test_demo_pair_differs_in_the_ramp_and_the_stable_run_keeps_its_rate():
    from diagnostics.app.demo import _QUICK_STABLE, EXPLODING, STABLE

    # Batches seeded like the first suite's trainer (1000 + seed).
    assert EXPLODING.seed == STABLE.seed == 1
    assert EXPLODING.batch_seed == 1001
    assert (STABLE.lr_at(199), EXPLODING.lr_at(199)) == pytest.approx((1e-3, 1.0))
    # the stable run never ramps, in the quick version either
    assert [STABLE.lr_at(s) for s in range(STABLE.steps)] == pytest.approx([1e-3] * STABLE.steps)
    assert [_QUICK_STABLE.lr_at(s) for s in range(_QUICK_STABLE.steps)] == pytest.approx([1e-3] * _QUICK_STABLE.steps)


def test_a_quiet_armed_detector_reports_how_close_its_score_came(tmp_path):
    import pandas as pd

    from diagnostics.app.demo_summary import peak_note

    scores = pd.DataFrame({"step": [30, 31, 32, 33], "value": [1.5, float("nan"), 2.75, 2.75]})
    assert peak_note(scores, 3.13) == "its score peaked at 2.75 at step 32, below the threshold 3.13"
    # above the threshold without a warning: the detector wanted more probes in a row
    assert peak_note(scores, 2.0).endswith("above, but not for long enough, the threshold 2")
    assert peak_note(scores, None) == "its score peaked at 2.75 at step 32"
    assert peak_note(scores[scores["step"] == 31], 3.13) is None


def test_the_peak_before_an_explosion_is_taken_over_the_benchmark_horizon(tmp_path):
    from diagnostics.app.demo_summary import LEAD_WINDOW, detector_note
    from diagnostics.store import RunWriter
    from diagnostics.store.records import Record

    with RunWriter(tmp_path / "run") as w:
        w.set_meta("diagnostics", {"explosion_detector": {"method": "signals", "threshold": 3.0,
                                                           "features": [{"metric": "sa_sign_diversity"}]}})
        for step, value in ((30, 2.9), (140, 1.0), (180, 2.5), (200, 1.2)):
            w.write_step(step, [Record("explosion_score", value)])
    assert detector_note(tmp_path / "run") == "its score peaked at 2.90 at step 30, below the threshold 3"
    assert LEAD_WINDOW == 50
    assert detector_note(tmp_path / "run", before=190) == (
        "its score peaked at 2.50 at step 180 in the 50 steps up to the explosion, below the threshold 3")


def test_the_edge_note_names_the_first_crossing_or_the_latest_ratio(tmp_path):
    from diagnostics.app.demo_summary import edge_note
    from diagnostics.store import RunWriter
    from diagnostics.store.records import Event, Record

    with RunWriter(tmp_path / "quiet") as w:
        for step, ratio in ((0, 9000.0), (10, 0.2), (20, 0.3)):  # step 0: Adam settling, no event
            w.write_step(step, [Record("adam_sharpness_ratio", ratio)])
    assert edge_note(tmp_path / "quiet") == "stayed below it (latest ratio 0.30 at step 20)"
    with RunWriter(tmp_path / "crossing") as w:
        for step, ratio in ((10, 0.2), (140, 2.816), (150, 0.8), (170, 2.1)):
            up = ratio > 1 and step in (140, 170)
            events = [Event("edge_of_stability", "crossed", severity="warning", metric="adam_sharpness_ratio",
                            data={"ratio": ratio, "direction": "up", "probe_step": step})] if up else []
            w.write_step(step, [Record("adam_sharpness_ratio", ratio)], events=events)
    assert edge_note(tmp_path / "crossing", before=192) == (
        "reached it at step 140, 52 steps before the explosion (ratio 2.82)")
    with RunWriter(tmp_path / "none") as w:
        w.write_step(0, [Record("loss", 1.0)])
    assert edge_note(tmp_path / "none") is None
