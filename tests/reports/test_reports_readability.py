"""What makes the report readable: the labels name the formula drawn, scales and axes, the overview,
grouped findings, per-layer views, and the chart data's escaping."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from diagnostics.reports import build_report
from diagnostics.reports.charts import Chart, ChartSink, Line, json_for_html
from diagnostics.reports.findings import group_findings, run_findings
from diagnostics.reports.panels.base import choose_scale, layer_matrix, signed_scale
from diagnostics.reports.panels.layerviews import most_changed, row_labels
from diagnostics.reports.summary import (
    adam_threshold_label,
    explosion_score_level,
    run_outcome,
    sgd_threshold_label,
)
from diagnostics.reports.views import load_report_view

from diagnostics.store import Event, Record, RunWriter


def _sharpness_run(path, *, momentum=0.0, nesterov=False, lr=0.1, steps=6, with_lr=True):
    """A run whose sharpness diagnostic used SGD with this momentum: threshold and ratio as it stores them."""
    if nesterov:
        thr = 2 * (1 + momentum) / (lr * (1 + 2 * momentum))
    else:
        thr = 2 * (1 + momentum) / lr
    with RunWriter(path, name="sgd") as w:
        for step in range(steps):
            lam = 5.0 + 8.0 * step
            recs = [Record("loss", 1.0), Record("sharpness", lam), Record("stability_threshold", thr),
                    Record("sharpness_ratio", lam / thr)]
            if with_lr:
                recs.append(Record("learning_rate", lr))
            w.write_step(step * 10, recs)
    return path


def _section(text: str, panel_id: str) -> str:
    m = re.search(rf'<section class="panel(?: absent)?" id="panel-{panel_id}">(.*?)</section>', text, re.S)
    assert m
    return m.group(1)


def _chart_data(html_text: str) -> list[dict]:
    blocks = re.findall(r'<script type="application/json" class="chart-data">(.*?)</script>', html_text, re.S)
    return [json.loads(b) for b in blocks]


# --- the momentum label -------------------------------------------------------------------------------------


def test_momentum_threshold_is_labelled_with_its_formula(tmp_path):
    run = _sharpness_run(tmp_path / "run", momentum=0.9)
    text = build_report(run, tmp_path / "r.html").read_text(encoding="utf-8")
    body = _section(text, "sharpness")
    charts = _chart_data(body)
    labels = [s["label"] for c in charts for s in c["series"]]
    titles = [c["title"] for c in charts]
    # the line drawn is 2(1+β)/lr = 38 for lr 0.1 and β 0.9, and it says so
    assert any("2(1+β)/lr, β = 0.9" in lab for lab in labels), labels
    assert not any(re.search(r"\b2/lr\b", lab) for lab in labels), labels
    assert any("sharpness ÷ 2(1+β)/lr" in t for t in titles), titles
    assert "sharpness x lr / 2" not in text and "sharpness × lr / 2" not in text
    threshold = next(s for c in charts for s in c["series"] if s["label"].startswith("threshold"))
    assert threshold["y"][0] == pytest.approx(38.0)
    # the edge of stability is drawn at ratio 1 and labelled
    ratio = next(c for c in charts if c["title"].startswith("sharpness ÷"))
    assert ratio["rules"] == [{"y": 1.0, "label": "threshold: ratio 1 (edge of stability)", "color": "#333333",
                               "dash": [6, 4], "run": None}]


@pytest.mark.parametrize(("momentum", "nesterov", "expected"), [
    (0.0, False, "2/lr"),
    (0.9, False, "2(1+β)/lr, β = 0.9"),
    (0.5, True, "2(1+β)/((1+2β)·lr), Nesterov β = 0.5"),
])
def test_sgd_threshold_label(tmp_path, momentum, nesterov, expected):
    run = _sharpness_run(tmp_path / "run", momentum=momentum, nesterov=nesterov)
    (view,) = load_report_view(run).runs
    assert sgd_threshold_label(view) == expected


def test_threshold_label_without_learning_rate_says_so(tmp_path):
    run = _sharpness_run(tmp_path / "run", momentum=0.9, with_lr=False)
    (view,) = load_report_view(run).runs
    assert sgd_threshold_label(view) == "stability threshold (as stored)"


def test_adam_threshold_label(tmp_path):
    with RunWriter(tmp_path / "run", name="adam") as w:
        for step in range(3):
            w.write_step(step, [Record("learning_rate", 1e-3), Record("adam_threshold", 38.0 / 1e-3),
                                Record("adam_sharpness", 100.0), Record("adam_sharpness_ratio", 100.0 / 38e3)])
    (view,) = load_report_view(tmp_path / "run").runs
    assert adam_threshold_label(view) == "(2+2β₁)/((1−β₁)·lr), β₁ = 0.9 (38/lr)"


def test_adam_run_gets_no_sgd_threshold_from_its_learning_rate(tmp_path):
    """An Adam run's raw sharpness is not compared with 2/lr: its threshold is the preconditioned one."""
    from diagnostics.reports.panels.curvature import _threshold_curve

    with RunWriter(tmp_path / "adam", name="adam") as w:
        for step in range(3):
            w.write_step(step, [Record("learning_rate", 1e-3), Record("sharpness", 50.0),
                                Record("adam_threshold", 38.0 / 1e-3), Record("adam_sharpness", 100.0)])
    (adam,) = load_report_view(tmp_path / "adam").runs
    assert _threshold_curve(adam) is None
    with RunWriter(tmp_path / "gd", name="gd") as w:  # no stored threshold: 2/lr from the learning rate
        for step in range(3):
            w.write_step(step, [Record("learning_rate", 0.1), Record("sharpness", 5.0)])
    (gd,) = load_report_view(tmp_path / "gd").runs
    curve = _threshold_curve(gd)
    assert curve is not None and curve[1][0] == 20.0 and "2/lr" in curve[2]


def test_edge_of_stability_finding_names_the_threshold(tmp_path):
    run = _sharpness_run(tmp_path / "run", momentum=0.9, steps=8)  # ratio reaches 1 at step 50
    (view,) = load_report_view(run).runs
    eos = [f for f in run_findings(view) if f.kind == "edge_of_stability"]
    assert len(eos) == 1 and "2(1+β)/lr, β = 0.9" in eos[0].text and "2/lr " not in eos[0].text


# --- outcome, explosion score level ---------------------------------------------------------------------


def _loss_run(path, losses, events=None):
    with RunWriter(path, name="r") as w:
        for step, loss in enumerate(losses):
            w.write_step(step, [Record("loss", loss)], events=(events or {}).get(step, ()))
    (view,) = load_report_view(path).runs
    return view


def test_outcome_stable_spike_explosion(tmp_path):
    assert run_outcome(_loss_run(tmp_path / "a", [1.0] * 40)).kind == "stable"
    spike = run_outcome(_loss_run(tmp_path / "b", [1.0] * 30 + [5.0] * 3 + [1.0] * 10))
    assert (spike.kind, spike.step) == ("spike", 30) and spike.text == "spike at step 30, recovered"
    boom = run_outcome(_loss_run(tmp_path / "c", [1.0] * 30 + [5.0] * 12))
    assert (boom.kind, boom.step, boom.text) == ("explosion", 30, "explosion at step 30")


def test_explosion_score_level_from_the_detector_state(tmp_path):
    layers = {f"l{i}": {"eligible": i < 8} for i in range(12)}
    meta = {"diagnostics": {"explosion_detector": {"min_layers": 2}},
            "diagnostic_state": {"explosion_detector": {"detector": {"layers": layers}}}}
    with RunWriter(tmp_path / "run", name="r", meta=meta) as w:
        for step in range(3):
            w.write_step(step, [Record("explosion_score", 0.1 * step)])
    (view,) = load_report_view(tmp_path / "run").runs
    assert explosion_score_level(view) == (0.25, "warning level 2/8 layers")
    text = build_report(tmp_path / "run", tmp_path / "r.html").read_text(encoding="utf-8")
    score = next(c for c in _chart_data(text) if c["title"].startswith("explosion score"))
    assert score["rules"][0]["y"] == 0.25 and score["rules"][0]["label"] == "warning level 2/8 layers"


# --- scales and axes ----------------------------------------------------------------------------------------


def test_log_scale_only_beyond_two_decades():
    assert choose_scale([np.array([1.0, 50.0])]) == "linear"
    assert choose_scale([np.array([1.0, 500.0])]) == "log"
    assert choose_scale([np.array([-1.0, 500.0])]) == "linear"
    assert signed_scale([np.array([0.0, 0.01, 500.0])])[0] == "asinh"
    # a bias-corrected GSNR: slightly negative estimates beside one layer's spike
    assert signed_scale([np.array([-0.004, 0.03, 0.2]), np.array([0.1, 2000.0])]) == ("asinh", pytest.approx(0.0092))
    assert signed_scale([np.array([-0.5, 0.2, 1.0])]) == ("linear", None)


def test_loss_axis_turns_logarithmic_from_one_decade(tmp_path):
    view = _loss_run(tmp_path / "run", [3.0] * 25 + [40.0] * 12)
    assert view is not None
    text = build_report(tmp_path / "run", tmp_path / "r.html").read_text(encoding="utf-8")
    loss = next(c for c in _chart_data(text) if c["title"] == "loss")
    assert loss["scale"] == "log"


def test_heatmap_columns_start_at_the_first_recorded_step(tmp_path):
    with RunWriter(tmp_path / "run", name="r") as w:
        for step in (50, 100, 150, 200):
            w.write_step(step, [Record("sa_sign_diversity", 0.5, key=f"l{i}") for i in range(3)])
    (view,) = load_report_view(tmp_path / "run").runs
    mat, edges = layer_matrix(view, "sa_sign_diversity", ["l0", "l1", "l2"])
    assert edges[0] == 50 and edges[-1] == pytest.approx(200) and mat.shape == (3, 4)
    assert not np.isnan(mat).any()


def test_layer_colour_scale_is_shared_across_runs(tmp_path):
    runs = []
    for name, scale in (("small", 1e-3), ("large", 1e2)):
        with RunWriter(tmp_path / name, name=name) as w:
            for step in range(5):
                w.write_step(step, [Record("gsnr_mean", scale * (1 + i), key=f"blocks.{i}.fc") for i in range(12)])
        runs.append(tmp_path / name)
    text = build_report(runs, tmp_path / "r.html").read_text(encoding="utf-8")
    body = _section(text, "gsnr")
    # one colour bar for both runs' heatmaps, on a log scale (five decades)
    assert body.count('class="scbar"') == 1 and "GSNR (mean) (log scale)" in body
    assert body.count('class="sheat"') == 2
    # the most-changed charts share one y-range and one scale
    charts = [c for c in _chart_data(body) if c["title"].startswith("gsnr_mean")]
    assert len(charts) == 2 and charts[0]["yrange"] == charts[1]["yrange"] and charts[0]["scale"] == "log"


# --- many layers ----------------------------------------------------------------------------------------------


def test_row_labels_grouped_by_block_and_thinned():
    names = [f"blocks.{b}.{part}" for b in range(3) for part in ("attn.q", "attn.k", "attn.v", "mlp.fc1",
                                                                 "mlp.fc2", "ln1", "ln2", "ln3")] + ["head"]
    ticks, texts, groups = row_labels(names, max_labels=100)
    assert [g for _, g in groups] == ["blocks.0", "blocks.1", "blocks.2", ""]
    assert texts[0] == "attn.q" and texts[-1] == "head" and len(ticks) == len(names)
    ticks, texts, groups = row_labels(names, max_labels=8)
    assert len(ticks) < len(names) and {0, 8, 16} <= set(ticks)
    # few rows: full names, no groups
    ticks, texts, groups = row_labels(names[:5], max_labels=100)
    assert texts == names[:5] and groups == []


def test_most_changed_layers(tmp_path):
    with RunWriter(tmp_path / "run", name="r") as w:
        for step in range(20):
            w.write_step(step, [Record("activation_effective_rank", 10.0 - (step * i / 10.0 if i in (3, 7) else 0),
                                       key=f"layer{i}") for i in range(15)])
    (view,) = load_report_view(tmp_path / "run").runs
    assert most_changed([(0, view)], "activation_effective_rank", 2, log=False) == ["layer3", "layer7"]
    text = build_report(tmp_path / "run", tmp_path / "r.html").read_text(encoding="utf-8")
    body = _section(text, "effective-rank")
    assert "The 6 of 15 layers whose activation_effective_rank changed most" in body
    assert "<details" in body and "All 15 layers of activation_effective_rank" in body


def test_findings_grouped_and_counted(tmp_path):
    layers = [f"blocks.{i}.fc" for i in range(13)]
    events = {200: [Event("rank_collapse", f"{k}: activation effective rank fell", "warning",
                          metric="activation_effective_rank", key=k) for k in layers[:11]]}
    with RunWriter(tmp_path / "run", name="r") as w:
        for step in (100, 200):
            w.write_step(step, [Record("activation_effective_rank", 5.0, key=k) for k in layers],
                         events=events.get(step, ()))
    (view,) = load_report_view(tmp_path / "run").runs
    groups = group_findings(view, run_findings(view))
    rank = [g for g in groups if g.kind == "rank_collapse"]
    assert len(rank) == 1 and len(rank[0].items) == 11
    assert rank[0].summary == "Activation effective rank collapsed in 11 of 13 layers from step 200."
    text = build_report(tmp_path / "run", tmp_path / "r.html").read_text(encoding="utf-8")
    findings = re.search(r'<section id="findings">(.*?)</section>', text, re.S).group(1)
    assert findings.count("<details>") == 1 and "show all 11" in findings
    # the layer is named once, not twice
    assert "blocks.0.fc: blocks.0.fc" not in findings


# --- overview --------------------------------------------------------------------------------------------------


def test_overview_cards(tmp_path):
    warn = {25: [Event("explosion_warning", "l1: drift", "warning", metric="sa_sign_diversity", key="l1")]}
    _loss_run(tmp_path / "boom", [1.0] * 30 + [5.0] * 12, events=warn)
    _loss_run(tmp_path / "calm", [1.0 - 0.01 * i for i in range(40)])
    text = build_report([tmp_path / "calm", tmp_path / "boom"], tmp_path / "r.html").read_text(encoding="utf-8")
    overview = re.search(r'<section id="overview">(.*?)</section>', text, re.S).group(1)
    cards = re.findall(r'<div class="card (\w+)".*?</dl></div>', overview, re.S)
    assert cards == ["stable", "explosion"]
    assert "Explosion at step 30" in overview
    assert "step 25 (l1), 5 steps before the explosion" in overview
    assert "0.61 at step 39" in overview
    assert text.index('id="overview"') < text.index('id="findings"')


# --- the charts' data in the page ---------------------------------------------------------------------------


def test_json_for_html_cannot_end_its_element():
    evil = "</script><script>alert(1)</script><!-- & \u2028\u2029 >"
    text = json_for_html({"label": evil, "x": [1, 2]})
    assert not any(ch in text for ch in "<>&\u2028\u2029")
    assert json.loads(text) == {"label": evil, "x": [1, 2]}
    with pytest.raises(ValueError):
        json_for_html({"y": math.nan})


def test_chart_data_keeps_extremes_and_marks_nonfinite():
    steps = np.arange(100_000)
    values = np.ones(100_000)
    values[54_321] = 1e6
    values[77_777] = math.nan
    html = ChartSink().chart(Chart("loss", "loss", [Line("run", steps, values, "#000")]))
    (data,) = _chart_data(html)
    s = data["series"][0]
    assert len(s["x"]) < 5000 and 54_321 in s["x"] and max(v for v in s["y"] if v is not None) == 1e6
    assert 77_777 in s["bad"]
    # the static fallback sits next to the live chart
    assert '<div class="static">' in html and "<svg" in html


def test_overview_edge_of_stability_follows_the_sharpness_diagnostics_events(tmp_path):
    """Adam's first ratios (its preconditioner still settling) can be far above 1 with no event: the card
    says "not reached" from the diagnostic's events, not "reached at step 0" from the series. A store with
    ratios and no sharpness diagnostic recorded (no events to go by) still reads the series."""
    for name, meta in (("monitored", {"sharpness": {"every": 10}}), ("series_only", None)):
        with RunWriter(tmp_path / name, name=name) as w:
            if meta:
                w.set_meta("diagnostics", meta)
            for step, ratio in ((0, 9422.0), (10, 0.08), (20, 0.26)):
                w.write_step(step, [Record("loss", 1.0), Record("adam_sharpness_ratio", ratio)])
    text = build_report([tmp_path / "monitored", tmp_path / "series_only"], tmp_path / "r.html").read_text(
        encoding="utf-8")
    overview = re.search(r'<section id="overview">(.*?)</section>', text, re.S).group(1)
    cards = re.findall(r'<div class="card \w+".*?</dl></div>', overview, re.S)
    assert "not reached; latest ratio 0.26 at step 20" in cards[0]
    assert "reached at step 0" in cards[1]
    # The findings agree: none for the monitored run, the series' crossing for the other.
    monitored, series_only = load_report_view([tmp_path / "monitored", tmp_path / "series_only"]).runs
    assert not [f for f in run_findings(monitored) if f.kind == "edge_of_stability"]
    (eos,) = [f for f in run_findings(series_only) if f.kind == "edge_of_stability"]
    assert eos.step == 0


def test_a_large_latest_ratio_is_written_out(tmp_path):
    with RunWriter(tmp_path / "run", name="run") as w:
        w.set_meta("diagnostics", {"sharpness": {"every": 10}})
        w.write_step(10, [Record("loss", 1.0), Record("adam_sharpness_ratio", 2.8)],
                     events=[Event("edge_of_stability", "crossed", "warning", metric="adam_sharpness_ratio",
                                   data={"direction": "up", "ratio": 2.8})])
        w.write_step(20, [Record("loss", 9.0), Record("adam_sharpness_ratio", 1030.6)])
    text = build_report([tmp_path / "run"], tmp_path / "r.html").read_text(encoding="utf-8")
    assert "crossed at step 10; latest ratio 1,031 at step 20" in text


def test_adams_settling_steps_are_left_out_of_the_sharpness_charts_and_said_so(tmp_path):
    """The ratios of the probes whose status says Adam's preconditioner was still settling are not drawn
    (their thousands would set the chart's scale); the note names the steps and the largest value. The
    settled ratios, and a run with no settling status (the control), are drawn whole."""
    from diagnostics.reports.panels.curvature import sharpness_ratio_chart

    from diagnostics.store import Status
    from diagnostics.store.catalog import ADAM_SETTLING_REASON

    for name, settling in (("adam", True), ("control", False)):
        with RunWriter(tmp_path / name, name=name) as w:
            for step, ratio in ((0, 9422.0), (10, 55.0), (20, 0.26), (30, 0.3)):
                reason = f"{ADAM_SETTLING_REASON} at its step {step + 1}" if settling and step <= 10 else None
                w.write_step(step, [Record("loss", 1.0), Record("adam_sharpness_ratio", ratio)],
                             statuses=[Status("sharpness", "ok", reason)])
    view = load_report_view([tmp_path / "adam", tmp_path / "control"])
    chart = sharpness_ratio_chart(view, group="g")
    adam, control = chart.lines
    assert list(adam.x) == [20, 30] and list(control.x) == [0, 10, 20, 30]
    assert "adam: steps 0-10, up to 9,422" in chart.note and "control" not in chart.note
    only_adam = sharpness_ratio_chart(load_report_view([tmp_path / "adam"]), group="g")
    assert only_adam.scale == "linear"  # 0.26 and 0.3 only, no longer four decades


def test_several_runs_top_eigenvalues_name_each_run_once_in_the_legend(tmp_path):
    """With several runs (one colour each), only a run's top eigenvalue has a legend entry, named for the
    thinner others; every eigenvalue is still drawn. One run keeps an entry per eigenvalue (its own colours)."""
    from diagnostics.reports.panels.curvature import eigen_chart

    for name in ("a", "b"):
        with RunWriter(tmp_path / name, name=name) as w:
            for step in (0, 10):
                w.write_step(step, [Record("loss", 1.0)] + [Record("hessian_eigenvalue", 9.0 - j, index=j)
                                                          for j in range(3)])
    two = eigen_chart(load_report_view([tmp_path / "a", tmp_path / "b"]), "hessian", group="g")
    assert len(two.lines) == 6
    named = [ln.label for ln in two.lines if ln.legend]
    assert named == ["a λ1 (thick; λ2-λ3 thin)", "b λ1 (thick; λ2-λ3 thin)"]
    html = ChartSink().chart(two)
    (data,) = _chart_data(html)
    assert [s.get("legend", True) for s in data["series"]] == [True, False, False] * 2
    static_legend = re.search(r'<div class="slegend">(.*?)</div>', html, re.S).group(1)
    assert static_legend.count("<span>") == 2 and "λ2" not in static_legend.replace("λ2-λ3", "")
    one = eigen_chart(load_report_view([tmp_path / "a"]), "hessian", group="g")
    assert [ln.legend for ln in one.lines] == [True] * 3 and one.lines[0].label.endswith("λ1")
