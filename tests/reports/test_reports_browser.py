"""Open the report in headless Chromium: it renders from disk, offline, without console errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from diagnostics.reports import build_report

from diagnostics.testing.synthetic import write_synthetic_run

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), None)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found at /usr/bin/chromium: install Debian's "
                    "'chromium' package (apt-get install -y chromium; .ci/run does) to run the browser test")
def test_report_renders_in_chromium(tmp_path):
    run = write_synthetic_run(tmp_path / "run", steps=90, layers=1, seed=2, explode_at=60,
                              name="<script>alert(1)</script>")
    report = build_report(run, tmp_path / "report.html")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_screenshot.png"
    if shot.exists():
        shot.unlink()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1280,4000",
           report.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot; stderr:\n{res.stderr[-3000:]}"
    (ARTIFACTS / "report_chromium_stderr.txt").write_text(res.stderr)
    # console messages from the page are logged as CONSOLE lines; errors also as Uncaught ...
    page_errors = [line for line in res.stderr.splitlines()
                   if re.search(r"Uncaught|CONSOLE[:(]\d+|Console error|Failed to load resource|net::ERR_", line)]
    assert not page_errors, "\n".join(page_errors)


# Appended to a copy of the report: zooms the overview's loss chart through uPlot's API, puts the cursor
# on one step, and writes what the page shows into the DOM, which --dump-dom prints.
PROBE = """<script>
window.addEventListener("load", function () {
  var out = {};
  try {
    var u = window.tdiag.charts["chart-1"];
    out.charts = window.tdiag.list.length;
    out.title = u.root.querySelector(".u-title").textContent;
    u.setScale("x", {min: 30, max: 60});
  } catch (e) { out.error = String(e && e.stack || e); }
  // uPlot applies scale changes on its next commit
  setTimeout(function () {
    try {
      out.x = [u.scales.x.min, u.scales.x.max];
      var other = window.tdiag.list[1];
      out.other = [other.scales.x.min, other.scales.x.max];
      var i = u.valToIdx(45);
      u.setCursor({left: u.valToPos(u.data[0][i], "x"), top: 10});
      out.step = u.data[0][i];
      // switching a run off hides its series in every chart
      var box = document.querySelector('input.run-toggle[data-run="0"]');
      box.click();
      out.hidden = window.tdiag.list.every(function (c) {
        return c.tdiagSpec.series.every(function (sr, k) { return sr.run !== 0 || !c.series[k + 1].show; });
      });
      out.shown = u.series[2].show;
      out.legend = Array.prototype.map.call(u.root.querySelectorAll(".u-legend .u-series"), function (tr) {
        return [tr.querySelector(".u-label").textContent, tr.querySelector(".u-value").textContent];
      });
    } catch (e) { out.error = String(e && e.stack || e); }
    var pre = document.createElement("pre");
    pre.id = "probe";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }, 100);
});
</script>
"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found at /usr/bin/chromium: install Debian's "
                    "'chromium' package (apt-get install -y chromium; .ci/run does) to run the browser test")
def test_chart_zooms_and_shows_the_hovered_value(tmp_path):
    import html
    import json

    from diagnostics.store import open_run

    calm = write_synthetic_run(tmp_path / "calm", steps=90, layers=1, seed=3, name="calm")
    run = write_synthetic_run(tmp_path / "run", steps=90, layers=1, seed=2, explode_at=60, name="boom")
    report = build_report([calm, run], tmp_path / "report.html")
    text = report.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=1400,3000", "--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert m, f"the probe did not run; stderr:\n{res.stderr[-3000:]}"
    out = json.loads(html.unescape(m.group(1)))
    assert "error" not in out, out["error"]
    assert out["charts"] > 5 and out["title"] == "loss"
    # zoomed to steps 30..60, and the other overview charts followed
    assert out["x"] == [30, 60] and out["other"] == [30, 60]
    # the legend shows the step under the cursor and the loss stored at that step
    assert out["step"] == 45
    assert out["legend"][0] == ["step", "45"]
    label, value = out["legend"][2]
    df = open_run(run).series(metric="loss")
    stored = float(df.loc[df["step"] == 45, "value"].iloc[0])
    assert label == "boom" and abs(float(value) - stored) <= 1e-4 * abs(stored), (value, stored)
    assert out["hidden"] and out["shown"]
