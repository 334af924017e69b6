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
