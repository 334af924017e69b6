"""The HTML page: inline CSS (screen and print), findings, configuration tables, then the panels.

Nothing here references the network: no scripts, fonts, stylesheets or links other than in-page
anchors. Every user-supplied string goes through :func:`~.panels.base.esc`.
"""

from __future__ import annotations

import json
from typing import Any

from .findings import Finding
from .panels.base import esc
from .views import ReportView, RunView

CSS = """
:root { --fg: #1d1d1f; --muted: #5f6368; --line: #dadce0; --err: #b3261e; --warn: #b26a00; --ok: #1e6b2f; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: var(--fg);
       margin: 0 auto; max-width: 1000px; padding: 1.5rem; line-height: 1.45; font-size: 15px; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem 0; }
h2 { font-size: 1.2rem; border-bottom: 1px solid var(--line); padding-bottom: .2rem; margin-top: 2rem; }
h3 { font-size: 1rem; margin: 1rem 0 .3rem 0; }
p.generated, p.cite, .muted { color: var(--muted); font-size: .85rem; }
p.about { margin: .3rem 0; }
p.cite { font-style: italic; margin: .2rem 0 .6rem 0; }
p.not-recorded { color: var(--muted); font-style: italic; }
nav ul { columns: 2; padding-left: 1.2rem; margin: .3rem 0; }
nav a, a { color: #1a4f9c; }
ul.findings { padding-left: 0; list-style: none; }
ul.findings li { padding: .25rem .5rem; margin: .2rem 0; border-left: 4px solid var(--line); }
ul.findings li.error { border-color: var(--err); background: #fdecea; }
ul.findings li.warning { border-color: var(--warn); background: #fff4e0; }
ul.findings li.info { border-color: #8ab4f8; background: #f1f6fe; }
.sev { font-weight: 600; text-transform: uppercase; font-size: .75rem; margin-right: .4rem; }
table { border-collapse: collapse; margin: .4rem 0 1rem 0; font-size: .82rem; }
th, td { border: 1px solid var(--line); padding: .2rem .45rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.failed { color: var(--err); font-weight: 600; }
td.notconv { color: var(--warn); }
table.kv td:first-child { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: nowrap; }
td.value { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; word-break: break-all; }
figure.fig { margin: .5rem 0; }
figure.fig svg, figure.fig img { max-width: 100%; height: auto; display: block; }
section.panel { margin-bottom: 1.5rem; }
details summary { cursor: pointer; color: var(--muted); }
@media print {
  body { max-width: none; padding: 0; font-size: 10.5pt; }
  nav { display: none; }
  section.panel, figure.fig, table { break-inside: avoid; page-break-inside: avoid; }
  h2 { break-after: avoid; page-break-after: avoid; }
  ul.findings li { background: none !important; }
  details { display: block; }
  details > * { display: block; }
  a { color: inherit; text-decoration: none; }
}
"""

# Meta keys shown in the run table, in this order; everything else follows alphabetically.
META_ORDER = ("run_name", "created", "schema_version", "model_fingerprint", "loss_reduction", "curvature_mode",
              "gradients_seen", "num_classes")
MAX_VALUE_CHARS = 300


def _value(v: Any) -> str:
    if isinstance(v, str):
        s = v
    else:
        try:
            s = json.dumps(v, sort_keys=True, allow_nan=True)
        except (TypeError, ValueError):
            s = str(v)
    if len(s) > MAX_VALUE_CHARS:
        s = s[: MAX_VALUE_CHARS - 1] + "\u2026"
    return s


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k in sorted(d, key=str):
        v = d[k]
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and len(v) <= 40:
            out += _flatten(v, name + ".")
        else:
            out.append((name, v))
    return out


def kv_table(pairs: list[tuple[str, Any]], cls: str = "kv") -> str:
    """Two-column key/value table; ``created`` and ``versions.*`` cells carry classes for scrubbing."""
    rows = []
    for k, v in pairs:
        extra = ""
        if k == "created":
            extra = " created"
        elif k.startswith("versions."):
            extra = " version"
        elif k == "path":
            extra = " path"
        rows.append(f'<tr><td>{esc(k)}</td><td class="value{extra}">{esc(_value(v))}</td></tr>')
    return f'<table class="{cls}"><tbody>' + "".join(rows) + "</tbody></table>\n"


def run_config_html(run: RunView, several: bool) -> str:
    """The run's metadata: summary, configuration and versions, then the estimators' settings."""
    meta = dict(run.meta)
    out = [f"<h3>{esc('Run ' + run.name) if several else 'Run'}</h3>\n"]
    general = [(k, meta[k]) for k in META_ORDER if k in meta]
    summary = meta.get("model_summary")
    if isinstance(summary, dict):
        if "num_params" in summary:
            general.append(("model_summary.num_params", summary["num_params"]))
        params = summary.get("parameters")
        if isinstance(params, dict):
            general.append(("model_summary.parameter_tensors", len(params)))
    general.append(("path", run.path))
    general.append(("steps recorded", len(run.steps)))
    if len(run.steps):
        general.append(("step range", f"{int(run.steps[0])} to {int(run.steps[-1])}"))
    general.append(("metrics recorded", len(run.metrics)))
    out.append(kv_table(general))
    config = meta.get("config")
    if isinstance(config, dict) and config:
        out.append("<h3>Configuration</h3>\n" + kv_table(_flatten(config)))
    diags = meta.get("diagnostics")
    if isinstance(diags, dict) and diags:
        rows = []
        for name in sorted(diags, key=str):
            s = diags[name]
            text = ", ".join(f"{k}={_value(v)}" for k, v in sorted(s.items(), key=lambda t: str(t[0]))) \
                if isinstance(s, dict) else _value(s)
            rows.append(f"<tr><td>{esc(name)}</td><td class=\"value\">{esc(text)}</td></tr>")
        out.append('<h3>Estimator settings</h3>\n<table class="kv"><thead><tr><th>diagnostic</th><th>settings'
                   "</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>\n")
    versions = meta.get("versions")
    if isinstance(versions, dict) and versions:
        out.append("<h3>Versions</h3>\n" + kv_table([(f"versions.{k}", v) for k, v in sorted(versions.items())]))
    # diagnostic_state is the Monitor's resume state (baselines, counters, vectors): not for reading.
    rest = {k: v for k, v in meta.items()
            if k not in META_ORDER
            and k not in ("config", "diagnostics", "versions", "model_summary", "diagnostic_state")}
    if rest:
        out.append("<h3>Other metadata</h3>\n" + kv_table(_flatten(rest)))
    if isinstance(summary, dict) and isinstance(summary.get("parameters"), dict):
        params = summary["parameters"]
        rows = "".join(f"<tr><td>{esc(k)}</td><td class=\"value\">{esc(_value(v))}</td></tr>"
                       for k, v in list(params.items())[:500])
        more = f"<p class=\"muted\">{len(params) - 500} more not shown.</p>" if len(params) > 500 else ""
        out.append(f"<details><summary>Model parameters ({len(params)} tensors)</summary>"
                   f'<table class="kv"><tbody>{rows}</tbody></table>{more}</details>\n')
    return "".join(out)


def findings_html(view: ReportView, findings: dict[str, list[Finding]]) -> str:
    """The findings list, per run when there are several."""
    out = ['<section id="findings">\n<h2>Findings</h2>\n']
    several = len(view.runs) > 1
    for run in view.runs:
        if several:
            out.append(f"<h3>{esc(run.name)}</h3>\n")
        out.append('<ul class="findings">\n')
        for f in findings[run.name]:
            out.append(f'<li class="{esc(f.severity)}" data-kind="{esc(f.kind)}"><span class="sev">{esc(f.severity)}'
                       f"</span>{esc(f.text)}</li>\n")
        out.append("</ul>\n")
    out.append("</section>\n")
    return "".join(out)


def page_html(view: ReportView, findings: dict[str, list[Finding]], sections: list[tuple[str, str, str]],
              generated_at: str, version: str) -> str:
    """Assemble the document. ``sections`` are ``(anchor id, title, html)`` in order."""
    several = len(view.runs) > 1
    toc = ['<li><a href="#findings">Findings</a></li>', '<li><a href="#config">Runs and configuration</a></li>']
    toc += [f'<li><a href="#{esc(sid)}">{esc(title)}</a></li>' for sid, title, _ in sections]
    runs_line = ", ".join(run.name for run in view.runs)
    empty_note = ""
    if all(r.empty for r in view.runs):
        empty_note = ('<p class="not-recorded" id="empty-note">' +
                      ("This run is empty" if not several else "These runs are empty") +
                      ": nothing was recorded, so there is nothing to plot.</p>\n")
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        # an empty data: icon stops the browser from asking the file system or network for a favicon
        '<link rel="icon" href="data:,">\n',
        f"<title>{esc(view.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n",
        f"<header>\n<h1>{esc(view.title)}</h1>\n",
        f'<p class="generated">Runs: {esc(runs_line)}. Generated <span class="generated-at">{esc(generated_at)}'
        f'</span> by training-diagnostics <span class="version">{esc(version)}</span>.</p>\n</header>\n',
        empty_note,
        "<nav><h2>Contents</h2><ul>" + "".join(toc) + "</ul></nav>\n",
        findings_html(view, findings),
        '<section id="config">\n<h2>Runs and configuration</h2>\n',
        "".join(run_config_html(r, several) for r in view.runs),
        "</section>\n",
        "".join(body for _, _, body in sections),
        "<footer><p class=\"muted\">Self-contained report: no scripts and no network resources. Figures are "
        "downsampled for display (each bucket's minimum and maximum and every alert step are kept); tables "
        "show the stored numbers.</p></footer>\n</body>\n</html>\n",
    ]
    return "".join(parts)
