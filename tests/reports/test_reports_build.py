"""The HTML report end to end on real (synthetic) run stores."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from diagnostics.reports import Panel, build_report, registry

from diagnostics.errors import ConfigError
from diagnostics.store import Event, Record, RunWriter, Status, open_run, open_runs
from diagnostics.testing.synthetic import write_synthetic_run

GOLD = Path(__file__).parent / "gold" / "synthetic_report.html"
EVIL = "<script>alert(1)</script> \"quoted\" & 'single'"


def scrub(text: str) -> str:
    """Remove what legitimately changes between machines: time, versions, paths and figure bytes.

    The chart data (JSON) stays: it pins the numbers every chart shows. The inline styles and scripts
    (uPlot's and the page's) are replaced by placeholders; tests below check them.
    """
    text = re.sub(r'<span class="generated-at">[^<]*</span>', '<span class="generated-at">T</span>', text)
    text = re.sub(r'<span class="version">[^<]*</span>', '<span class="version">V</span>', text)
    text = re.sub(r'<td class="value (created|version|path)">[^<]*</td>', r'<td class="value \1">X</td>', text)
    text = re.sub(r"<style>.*?</style>", "<style>CSS</style>", text, flags=re.S)
    text = re.sub(r"<script>.*?</script>", "<script>JS</script>", text, flags=re.S)
    # static figures: their presence and order are what the gold file pins
    text = re.sub(r"<svg\b.*?</svg>", "<svg/>", text, flags=re.S)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,PNG", text)
    return text


def has_figure(body: str) -> bool:
    """A chart, a heatmap, a matplotlib figure or a table."""
    return any(tag in body for tag in ('class="chart"', 'class="heat"', "<figure", "<table"))


# The one URL the report carries: uPlot's banner comment, inside its inline script (reports/vendor/README.md).
UPLOT_BANNER = re.compile(r"/\*! https://github\.com/leeoniya/uPlot \(v[0-9.]+\) \*/")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    healthy = write_synthetic_run(d / "healthy", steps=41, layers=1, seed=0)
    boom = write_synthetic_run(d / "boom", steps=90, layers=1, seed=1, explode_at=60, name=EVIL)
    tiny = _write_only(d / "tiny", ("loss", "grad_norm"))
    return {"dir": d, "healthy": healthy, "boom": boom, "tiny": tiny}


@pytest.fixture(scope="module")
def boom_html(stores, monkeypatch_module):
    out = build_report(stores["boom"], stores["dir"] / "boom.html")
    return out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("SOURCE_DATE_EPOCH", "1735689600")
    yield mp
    mp.undo()


def section(html_text: str, panel_id: str) -> str:
    m = re.search(rf'<section class="panel(?: absent)?" id="panel-{re.escape(panel_id)}">(.*?)</section>', html_text,
                  re.S)
    assert m, f"no section for panel {panel_id}"
    return m.group(1)


def test_gold_file(stores, monkeypatch_module):
    out = build_report(stores["healthy"], stores["dir"] / "gold.html", title="Gold report")
    text = scrub(out.read_text(encoding="utf-8"))
    # the same store through a Run object gives the same bytes: output is deterministic
    again = build_report(open_run(stores["healthy"]), stores["dir"] / "again.html", title="Gold report")
    assert again.read_bytes() == out.read_bytes()
    if os.environ.get("UPDATE_GOLD") == "1" or not GOLD.exists():
        GOLD.write_text(text, encoding="utf-8")
        if os.environ.get("UPDATE_GOLD") != "1":
            pytest.fail(f"gold file {GOLD} was missing and has been written; rerun")
    assert text == GOLD.read_text(encoding="utf-8"), "report differs from the gold file; UPDATE_GOLD=1 regenerates it"


def test_findings_of_an_exploding_run(boom_html):
    findings = re.search(r'<section id="findings">(.*?)</section>', boom_html, re.S).group(1)
    assert "Explosion warning" in findings
    assert "The loss exploded at step 62" in findings
    assert "before the loss exploded" in findings
    assert "Rank collapse at step" in findings and "layer blocks." in findings
    assert "failed" in findings and "NonDeterministicOperatorError" in findings
    assert "Non-finite value" in findings or "non-finite" in findings
    # overview, then findings, then the panels; the configuration is folded at the end
    assert (boom_html.index('id="overview"') < boom_html.index('id="findings"') < boom_html.index('id="panel-loss"')
            < boom_html.index('id="config"'))
    config = boom_html[boom_html.index('id="config"'):]
    assert "Estimator settings" in config and "hessian_eigen" in config and "<details" in config


def test_failed_estimates_are_shown_as_failed(boom_html):
    eig = section(boom_html, "eigenvalues")
    rows = re.findall(r"<tr><td>(\d+)</td>(.*?)</tr>", eig, re.S)
    failed_rows = [r for r in rows if "failed: loss is not finite" in r[1]]
    assert failed_rows, "failed probes must appear as failed"
    for _, cells in failed_rows:
        # every eigenvalue cell of a failed probe says 'failed', none holds a number
        values = re.findall(r'<td class="failed">([^<]*)</td>', cells)
        assert values and all(v.startswith("failed") for v in values)
    assert "(not converged)" in eig


def test_every_panel_section_present_on_full_store(boom_html):
    for panel in registry():
        body = section(boom_html, panel.id)
        assert "Not recorded: no run has" not in body, panel.id
        assert has_figure(body), panel.id
        assert '<p class="cite">' in body and "http" not in body


def _write_only(run_dir: Path, metrics: tuple[str, ...]) -> Path:
    with RunWriter(run_dir, name="partial", meta={"config": {"lr": 0.1}}) as w:
        for step in range(4):
            recs = []
            for m in metrics:
                for key in ("all", "layer.a", "layer.b"):
                    for i in range(3):
                        v = 0.2 + 0.1 * i + 0.05 * step if "weight" in m else 1.0 + step + i
                        recs.append(Record(m, v, key=key, index=i))
            w.write_step(step, recs, statuses=[Status("basics", "ok", None, 0.01)] if "monitor_seconds" in metrics else ())
    return run_dir


@pytest.mark.parametrize("panel", registry(), ids=lambda p: p.id)
def test_panel_present_and_not_recorded(panel, tmp_path):
    with_metrics = _write_only(tmp_path / "with", panel.metrics)
    text = build_report(with_metrics, tmp_path / "with.html").read_text(encoding="utf-8")
    body = section(text, panel.id)
    assert "Not recorded" not in body
    assert has_figure(body)
    other = ("sa_sigma1",) if panel.id != "spectral-alignment" else ("loss",)
    without = _write_only(tmp_path / "without", other)
    text = build_report(without, tmp_path / "without.html").read_text(encoding="utf-8")
    body = section(text, panel.id)
    note = re.findall(r'<p class="not-recorded">[^<]*</p>', body)
    assert len(note) == 1 and panel.metrics[0] in note[0]
    assert not has_figure(body)


def test_user_strings_are_escaped(tmp_path):
    run = tmp_path / "evil"
    meta = {"config": {EVIL: EVIL}, "diagnostics": {EVIL: {"k": EVIL}}, "versions": {"x": EVIL}}
    with RunWriter(run, name=EVIL, meta=meta) as w:
        for step in range(3):
            w.write_step(step, [Record("loss", 1.0 + step), Record("grad_norm", 2.0, key=EVIL),
                                Record("sa_sign_diversity", 0.5, key=EVIL)],
                         events=[Event("explosion_warning", EVIL, "warning", metric="loss", key=EVIL)],
                         statuses=[Status(EVIL, "failed", EVIL, 0.1)])
    text = build_report(run, tmp_path / "evil.html", title=EVIL).read_text(encoding="utf-8")
    assert "<script>alert(1)" not in text.lower()
    # the only script elements are the two inline scripts and the charts' JSON data
    tags = re.findall(r"<script\b[^>]*>", text, re.I)
    assert tags.count("<script>") == 2
    assert all(t in ("<script>", '<script type="application/json" class="chart-data">') for t in tags), tags
    assert "alert(1)" in text  # the string is shown, escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    outside_json = re.sub(r'<script type="application/json".*?</script>', "", text, flags=re.S)
    assert '"quoted"' not in outside_json and "'single'" not in outside_json
    assert "&quot;quoted&quot;" in text and "&amp;" in text
    # inside the JSON the name is escaped for HTML yet parses back to itself
    blocks = re.findall(r'<script type="application/json" class="chart-data">(.*?)</script>', text, re.S)
    assert blocks and all("<" not in b and ">" not in b and "&" not in b for b in blocks)
    labels = {s["label"] for b in blocks for s in json.loads(b)["series"]}
    assert EVIL in labels


def test_no_network_references(boom_html):
    # uPlot's banner comment is the one URL in the file, inside a comment of the inline script
    assert len(UPLOT_BANNER.findall(boom_html)) == 1
    text = UPLOT_BANNER.sub("", boom_html)
    low = text.lower()
    assert "http://" not in low and "https://" not in low and "//cdn" not in low
    assert "@import" not in low and "<link rel=\"stylesheet\"" not in low
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", text, re.I), "scripts must be inline"
    assert "sourcemappingurl" not in low
    for attr in re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', text, re.I):
        assert attr.startswith(("data:", "#")), attr
    assert not re.search(r"url\((?!#)", text), "CSS/SVG url() must only reference in-page ids"
    assert not re.search(r"\b(?:fetch|XMLHttpRequest|WebSocket|importScripts)\s*\(", text)


def test_nan_inf_single_step_and_empty(tmp_path, monkeypatch_module):
    single = tmp_path / "single"
    with RunWriter(single, name="single") as w:
        w.write_step(5, [Record("loss", math.nan), Record("grad_norm", math.inf), Record("sharpness", -math.inf),
                         Record("sa_sign_diversity", 0.3, key="l1"), Record("hessian_eigenvalue", 2.0, index=0)])
    text = build_report(single, tmp_path / "single.html").read_text(encoding="utf-8")
    assert "Only one step (5)" in text
    assert "non-finite value" in text
    empty = tmp_path / "empty"
    RunWriter(empty, name="empty").close()
    text = build_report(empty, tmp_path / "empty.html").read_text(encoding="utf-8")
    assert 'id="empty-note"' in text and "This run is empty" in text
    assert not any(tag in text for tag in ('class="chart"', 'class="heat"', "<figure"))


def test_several_runs_overlaid(stores, tmp_path, monkeypatch_module):
    runs = open_runs([stores["healthy"], stores["boom"]])
    text = build_report(runs, tmp_path / "both.html").read_text(encoding="utf-8")
    findings = re.search(r'<section id="findings">(.*?)</section>', text, re.S).group(1)
    assert re.search(r"<h3><span[^>]*></span>healthy</h3>", findings) and "&lt;script&gt;" in findings
    assert text.count('<section class="panel') == len(registry())
    # one card per run, and the run switches
    overview = re.search(r'<section id="overview">(.*?)</section>', text, re.S).group(1)
    assert overview.count('<div class="card ') == 2
    assert text.count('class="run-toggle"') == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        build_report([], tmp_path / "x.html")
    with pytest.raises(ConfigError):
        build_report([42], tmp_path / "x.html")


def test_cli_report(stores, tmp_path):
    from click.testing import CliRunner
    from diagnostics.cli.report_cmd import report

    res = CliRunner().invoke(report, [str(stores["tiny"]), "-o", str(tmp_path / "r.html"), "--title", "T"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.html").exists()
    (tmp_path / "notrun").mkdir()
    res = CliRunner().invoke(report, [str(tmp_path / "notrun"), "-o", str(tmp_path / "r2.html")])
    assert res.exit_code == 2 and "no run store" in res.output and "Traceback" not in res.output


def test_reports_import_without_torch(stores, tmp_path):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
        return None
sys.meta_path.insert(0, Block())
from diagnostics.reports import build_report
build_report({str(stores['tiny'])!r}, {str(tmp_path / 'nt.html')!r})
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_cli_report_errors_are_one_error_line(tmp_path):
    from click.testing import CliRunner
    from diagnostics.cli.report_cmd import report

    (tmp_path / "notrun").mkdir()
    res = CliRunner().invoke(report, [str(tmp_path / "notrun"), "-o", str(tmp_path / "r.html")])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output


def test_catalogue_holds_no_benchmark_panels():
    ids = [p.id for p in registry()]
    assert len(ids) == len(set(ids))
    assert "baselines" not in ids
    assert not any(m in p.metrics for p in registry() for m in ("max_attention_logit", "activation_kurtosis"))


def _extra_panel(panel_id: str = "extra") -> Panel:
    def draw(view, sink):
        return "<table><tr><td>extra</td></tr></table>\n"

    return Panel(id=panel_id, title="Extra", metrics=("custom_metric",), about="About.", citation="Cite.", draw=draw)


def test_extra_panels_follow_the_catalogue(tmp_path):
    run = _write_only(tmp_path / "run", ("loss", "custom_metric"))
    text = build_report(run, tmp_path / "x.html", extra_panels=[_extra_panel()]).read_text(encoding="utf-8")
    assert text.count('<section class="panel') == len(registry()) + 1
    assert "<td>extra</td>" in section(text, "extra")
    # after the catalogue's panels with data, before the one-line notes of those without
    assert text.index('id="panel-loss"') < text.index('id="panel-extra"') < text.index('id="panel-sharpness"')
    # without them the report is the catalogue alone
    text = build_report(run, tmp_path / "y.html").read_text(encoding="utf-8")
    assert 'id="panel-extra"' not in text


def test_extra_panels_are_checked(tmp_path):
    run = _write_only(tmp_path / "run", ("loss",))
    with pytest.raises(ConfigError, match="already in the report"):
        build_report(run, tmp_path / "x.html", extra_panels=[_extra_panel("loss")])
    with pytest.raises(ConfigError, match="expected Panel"):
        build_report(run, tmp_path / "x.html", extra_panels=["not a panel"])
    assert not (tmp_path / "x.html").exists()


def test_cost_panel_says_when_the_budget_spaced_out_the_every_step_diagnostics(tmp_path):
    run = tmp_path / "spaced"
    with RunWriter(run, name="spaced", meta={"budget": 0.05}) as w:
        for step in range(0, 40, 4):
            w.write_step(step, [Record("loss", 1.0), Record("monitor_overhead", 0.04),
                                Record("monitor_stride", 1.0 if step < 8 else 4.0)],
                         events=[], statuses=[Status("loss", "ok", None, 0.001)])
    text = build_report(run, tmp_path / "spaced.html").read_text(encoding="utf-8")
    assert "so they ran every 1 to 4 steps (monitor_stride)" in text
    # a run whose stride stayed 1 gets no such sentence
    with RunWriter(tmp_path / "dense", name="dense", meta={"budget": 0.05}) as w:
        for step in range(10):
            records = [Record("loss", 1.0), Record("monitor_overhead", 0.04), Record("monitor_stride", 1.0)]
            w.write_step(step, records, events=[], statuses=[Status("loss", "ok", None, 0.001)])
    assert "monitor_stride);" not in build_report(tmp_path / "dense", tmp_path / "dense.html").read_text(encoding="utf-8")


def test_cost_panel_says_why_a_run_ended_above_its_budget_and_what_cost_most(tmp_path):
    def write(name: str, final: float) -> Path:
        with RunWriter(tmp_path / name, name=name, meta={"budget": 0.05}) as w:
            for step in range(20):
                overhead = 3.0 if step < 19 else final
                w.write_step(step, [Record("loss", 1.0), Record("monitor_overhead", overhead),
                                    Record("monitor_seconds", 2.5 if step == 1 else 0.001, key="hessian_top"),
                                    Record("monitor_seconds", 0.01, key="<b>grad_norm</b>")],
                             events=[], statuses=[Status("loss", "ok", None, 0.001)])
        return tmp_path / name

    text = build_report(write("short", 0.9), tmp_path / "short.html").read_text(encoding="utf-8")
    assert "Ended above the budget: 90.0% of the training time of the 200 steps up to step 19" in text
    assert "against a budget of 5% (costliest: hessian_top 2.52 s, &lt;b&gt;grad_norm&lt;/b&gt; 0.2 s)" in text
    assert "the first two runs of each diagnostic" in text
    # a run that ended within its budget gets no such note, whatever came before
    text = build_report(write("within", 0.04), tmp_path / "within.html").read_text(encoding="utf-8")
    assert "Ended above the budget" not in text
