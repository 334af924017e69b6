"""Findings: the few things a reader should know first, in plain language with step and layer.

Sources, in order of trust: the run's events (alerts raised while training), the status table (how
each estimator fared) and, where no event says it, the series themselves (a loss explosion by the
project's one definition, ``diagnostics.explosion``; a sharpness ratio above one; non-finite values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from diagnostics.explosion import FACTOR, PATIENCE, explosion_step

from .summary import adam_threshold_label, crossings_announced, sgd_threshold_label
from .views import RunView

# For runs whose store holds rank series but no rank_collapse events (written by other tools or older
# versions), the same rule as the activation_rank diagnostic: an effective rank that falls below this
# fraction of its baseline, the first value RANK_BASELINE_AFTER steps or more into the series (ranks of a
# freshly initialised network drop early in every healthy run).
RANK_COLLAPSE_FRACTION = 0.25
RANK_BASELINE_AFTER = 100

RANK_METRICS = ("activation_effective_rank", "weight_effective_rank", "grad_effective_rank")


@dataclass
class Finding:
    """One line of the findings list. ``text`` is plain (unescaped) text; the page escapes it."""

    run: str
    kind: str
    severity: str  # "error", "warning" or "info"
    text: str
    step: int | None = None
    layer: str | None = None
    metric: str | None = None


def _where(step: int | None, layer: str | None) -> str:
    parts = []
    if step is not None:
        parts.append(f"step {step}")
    if layer and layer != "all":
        parts.append(f"layer {layer}")
    return " in ".join(parts) if parts else ""


def _by_step(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(steps, values)`` with each step once (its first value), in step order."""
    steps, first = np.unique(np.asarray(steps), return_index=True)
    return steps, np.asarray(values, dtype=np.float64)[first]


def loss_explosion_step(steps: np.ndarray, values: np.ndarray) -> int | None:
    """Return the step at which the loss series exploded, else None: the explosion rule
    (``diagnostics.explosion.explosion_step``, its defaults) on the recorded steps. Cost O(n)."""
    steps, values = _by_step(steps, values)
    return explosion_step(values, [int(s) for s in steps])


def _explosion_text(steps: np.ndarray, values: np.ndarray, boom_step: int) -> str:
    """What the loss did from ``boom_step`` on, in the words of the explosion rule."""
    steps, values = _by_step(steps, values)
    i = int(np.searchsorted(steps, boom_step))
    val = values[i]
    if not np.isfinite(val):
        return "it became non-finite"
    # The streak starts with a finite loss above FACTOR x the lowest finite loss up to here; within
    # the streak the lowest value cannot fall, so "above that" holds until the streak is complete.
    lowest = float(np.min(values[: i + 1][np.isfinite(values[: i + 1])]))
    head = f"it rose to {val:.4g}, over {FACTOR:g}x its lowest value so far ({lowest:.4g}),"
    bad = np.flatnonzero(~np.isfinite(values[i : i + PATIENCE]))
    if len(bad):
        return f"{head} and became non-finite at step {int(steps[i + bad[0]])}"
    return f"{head} and stayed above that for {PATIENCE} consecutive recorded steps"


def _first_crossing(steps: np.ndarray, values: np.ndarray, level: float = 1.0) -> tuple[int, int] | None:
    """Return (first step with value >= level, number of such steps), or None."""
    with np.errstate(invalid="ignore"):
        above = np.isfinite(values) & (values >= level)
    if not above.any():
        return None
    return int(steps[np.argmax(above)]), int(above.sum())


def _group_by_layer(events: list) -> list[tuple[str | None, int, int, str]]:
    """Group events by key: (key, first step, count, first message), ordered by first step."""
    groups: dict[str | None, list] = {}
    for e in events:
        groups.setdefault(e.key, []).append(e)
    out = [(k, g[0].step, len(g), g[0].message) for k, g in groups.items()]
    return sorted(out, key=lambda t: (t[1], str(t[0])))


def _said(msg: str | None) -> str:
    """End of a finding that quotes an event's message: ': message', or a full stop when there is none."""
    return f": {msg}" if msg else "."


def _event_findings(run: str, events: list, kind: str, severity: str, label: str) -> list[Finding]:
    """One finding per event (``label`` at step and layer, then its message)."""
    return [Finding(run, kind, severity, f"{label} at {_where(e.step, e.key)}{_said(_unprefixed(e))}", e.step,
                    e.key, e.metric) for e in events]


def _unprefixed(e: Any) -> str:
    """The event's message without a leading "<key>: " (the finding already names the layer)."""
    msg = e.message or ""
    if e.key and msg.startswith(f"{e.key}: "):
        return msg[len(e.key) + 2:]
    return msg


def _grouped_findings(run: str, events: list, kind: str, severity: str, label: str, unit: str) -> list[Finding]:
    """One finding per layer (event key): its first step and message, and how many ``unit`` there were."""
    out = []
    for key, step, count, msg in _group_by_layer(events):
        if key and msg and msg.startswith(f"{key}: "):
            msg = msg[len(key) + 2:]
        more = f" ({count} {unit})" if count > 1 else ""
        out.append(Finding(run, kind, severity, f"{label} at {_where(step, key)}{more}{_said(msg)}", step, key))
    return out


def run_findings(run: RunView) -> list[Finding]:
    """Return the findings of one run, most important kinds first."""
    name = run.name
    out: list[Finding] = []
    if run.empty:
        return [Finding(name, "empty", "info", "This run is empty: nothing was recorded in its store.")]

    # --- explosion warnings and the explosion itself ---
    warnings = run.events_of("explosion_warning")
    lines = _grouped_findings(name, warnings, "explosion_warning", "warning", "Explosion warning", "warnings")
    out += lines

    explosions = run.events_of("loss_explosion")
    if explosions:
        e = explosions[0]
        boom_step: int | None = e.step
        out.append(Finding(name, "loss_explosion", "error",
                           f"The loss exploded at {_where(e.step, e.key)}{_said(e.message)}", e.step, e.key))
    else:
        boom_step = None
        c = run.curve("loss")
        if c is not None:
            boom_step = loss_explosion_step(*c)
            if boom_step is not None:
                what = _explosion_text(*c, boom_step)
                out.append(Finding(name, "loss_explosion", "error",
                                   f"The loss exploded at step {boom_step}: {what} (from the loss series).",
                                   boom_step))
    if warnings and boom_step is not None:
        first = min(e.step for e in warnings)
        if first <= boom_step:
            out.append(Finding(name, "lead_time", "info",
                               f"The first explosion warning (step {first}) came {boom_step - first} steps "
                               f"before the loss exploded (step {boom_step}).", first))
        else:
            out.append(Finding(name, "lead_time", "warning",
                               f"The first explosion warning (step {first}) came after the loss had already "
                               f"exploded (step {boom_step}).", first))
    elif warnings:
        out.append(Finding(name, "lead_time", "info", "The loss did not explode after the warnings in the "
                           "recorded steps."))

    # --- misuse: the run measured nothing, or not what a number claims (stores before the misuse kind
    # wrote "nothing_measured") ---
    for e in run.events_of("misuse", "nothing_measured"):
        who = e.key or e.data.get("diagnostic")
        out.append(Finding(name, "misuse", "warning",
                           f"Misuse{f' of {who}' if who else ''} at step {e.step}{_said(_unprefixed(e))}",
                           e.step, None, e.metric))

    # --- edge of stability ---
    eos = run.events_of("edge_of_stability")
    if eos:
        out += _event_findings(name, eos, "edge_of_stability", "info", "Edge of stability")
    elif not crossings_announced(run):
        for metric, label in (("sharpness_ratio", f"Sharpness reached its stability threshold "
                                                   f"{sgd_threshold_label(run)}"),
                              ("adam_sharpness_ratio", "Preconditioned sharpness reached Adam's threshold "
                                                       f"{adam_threshold_label(run)}")):
            c = run.curve(metric)
            hit = _first_crossing(*c) if c is not None else None
            if hit:
                step, count = hit
                out.append(Finding(name, "edge_of_stability", "info",
                                   f"{label} (edge of stability) first at step {step}; at or above it at "
                                   f"{count} of {len(c[0])} probes (from the {metric} series).", step))

    # --- rank collapse ---
    rc = run.events_of("rank_collapse")
    if rc:
        out += _event_findings(name, rc, "rank_collapse", "warning", "Rank collapse")
    elif "activation_rank" not in (run.meta.get("diagnostics") or {}):
        lines = []
        for metric in RANK_METRICS:
            md = run.metric(metric)
            if md is None:
                continue
            for key in md.layer_keys() or md.keys():
                s, v = md.curve(key) or (np.zeros(0), np.zeros(0))
                fin = np.isfinite(v)
                if fin.sum() < 3:
                    continue
                sf, vf = s[fin], v[fin]
                after = sf >= sf[0] + RANK_BASELINE_AFTER
                if not after.any():
                    continue
                sf, vf = sf[after], vf[after]
                if vf[0] > 0 and vf.min() < RANK_COLLAPSE_FRACTION * vf[0]:
                    i = int(np.argmax(vf < RANK_COLLAPSE_FRACTION * vf[0]))
                    lines.append(Finding(
                        name, "rank_collapse", "warning",
                        f"{metric.replace('_', ' ').capitalize()} fell below {RANK_COLLAPSE_FRACTION:.0%} of "
                        f"its baseline at step {int(sf[0])} at {_where(int(sf[i]), key)} ({vf[0]:.3g} to {vf[i]:.3g}; "
                        "from the series).",
                        int(sf[i]), key, metric))
        out += lines

    # --- estimator failures ---
    lines = []
    by_reason: dict[str, list] = {}
    for s in run.status_summary:
        if s.failed:
            by_reason.setdefault(s.first_failure_reason or "", []).append(s)
    grouped = {id(s) for group in by_reason.values() if len(group) >= 3 for s in group}
    for reason, group in by_reason.items():
        if len(group) >= 3:
            first = min(s.first_failure_step for s in group)
            names = ", ".join(s.diagnostic for s in group)
            lines.append(Finding(name, "estimator_failed", "warning",
                                 f"{len(group)} estimators failed from step {first} on"
                                 + (f": {reason}" if reason else "") + f" ({names}). Failed estimates are shown "
                                 "as failed, not as numbers.", first))
    for s in run.status_summary:
        if s.failed and id(s) not in grouped:
            reason = f": {s.first_failure_reason}" if s.first_failure_reason else ""
            lines.append(Finding(name, "estimator_failed", "warning",
                                 f"Estimator {s.diagnostic} failed at {s.failed} of {s.calls} steps, first at step "
                                 f"{s.first_failure_step}{reason}. Failed estimates are shown as failed, not as numbers.",
                                 s.first_failure_step))
        if s.not_converged:
            lines.append(Finding(name, "not_converged", "info",
                                 f"Estimator {s.diagnostic} did not converge at {s.not_converged} of {s.calls} "
                                 "steps; those values are flagged in the panels."))
        if s.unended_from is not None:
            spent = f" ({s.unended_products} products)" if s.unended_products is not None else ""
            lines.append(Finding(name, "unended", "info",
                                 f"The last probe of {s.diagnostic} had not ended when the records stop: its calls "
                                 f"from step {s.unended_from} on{spent} stored no numbers; a probe cut into calls "
                                 "stores them when it ends.", s.unended_from))
    failed_diags = {s.diagnostic for s in run.status_summary if s.failed}
    unexplained = [e for e in run.events_of("estimator_failed") if (e.key or e.metric) not in failed_diags]
    lines += _grouped_findings(name, unexplained, "estimator_failed", "warning", "Estimator failure", "times")
    out += lines

    # --- non-finite values ---
    lines = _grouped_findings(name, run.events_of("nonfinite"), "nonfinite", "error", "Non-finite value", "times")
    for metric in ("nonfinite_loss", "nonfinite_grads"):
        c = run.curve(metric)
        if c is not None:
            with np.errstate(invalid="ignore"):
                hit = c[1] > 0
            if hit.any():
                lines.append(Finding(name, "nonfinite", "error",
                                     f"{metric} was positive at {int(hit.sum())} steps, first at step "
                                     f"{int(c[0][np.argmax(hit)])}.", int(c[0][np.argmax(hit)])))
    for metric, md in run.metrics.items():
        for key, ks in md.by_key.items():
            bad = ~np.isfinite(ks.values)
            if bad.any():
                first = int(ks.steps[bad].min())
                lines.append(Finding(name, "nonfinite", "error",
                                     f"{metric} has {int(bad.sum())} non-finite value(s)"
                                     + (f" for {key}" if key != "all" else "") + f", first at step {first}.",
                                     first, key))
    out += lines

    if not out:
        out.append(Finding(name, "none", "info", "Nothing alarming was recorded: no alerts, failures or "
                           "non-finite values."))
    if len(run.steps) == 1:
        out.append(Finding(name, "single_step", "info", f"Only one step ({int(run.steps[0])}) was recorded; "
                           "series are shown as single points."))
    return out


# --- grouping for display --------------------------------------------------------------------------------


@dataclass
class FindingGroup:
    """Findings of one kind in one run: a counted summary line, the individual findings folded under it."""

    kind: str
    severity: str
    summary: str
    items: list[Finding]
    step: int | None = None


_SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}


def _first_step(items: list[Finding]) -> int | None:
    steps = [f.step for f in items if f.step is not None]
    return min(steps) if steps else None


def _layers_of(run: RunView, metric: str | None) -> int:
    md = run.metric(metric) if metric else None
    return len(md.layer_keys()) if md is not None else 0


def _of_layers(run: RunView, items: list[Finding], metric: str | None) -> str:
    """'3 of 13 layers' (or '3 layers' when the metric's layers are unknown)."""
    hit = len({f.layer for f in items if f.layer})
    total = _layers_of(run, metric)
    unit = "layer" if hit == 1 and not total else "layers"
    return f"{hit} of {total} {unit}" if total >= hit and total else f"{hit} {unit}"


def _summary(run: RunView, kind: str, items: list[Finding]) -> str:
    first = _first_step(items)
    at = f" from step {first}" if first is not None else ""
    if kind == "explosion_warning":
        metric = next((e.metric for e in run.events_of("explosion_warning") if e.metric), None)
        lead = min((f for f in items if f.step is not None), key=lambda f: f.step, default=None)
        where = f" ({lead.layer})" if lead is not None and lead.layer else ""
        return (f"Explosion warnings in {_of_layers(run, items, metric)}"
                + (f" ({metric})" if metric else "") + f", first at step {first}{where}.")
    if kind == "rank_collapse":
        parts = []
        by_metric: dict[str | None, list[Finding]] = {}
        for f in items:
            by_metric.setdefault(f.metric, []).append(f)
        for metric, group in by_metric.items():
            what = metric.replace("_", " ").capitalize() if metric else "Rank"
            g_first = _first_step(group)
            parts.append(f"{what} collapsed in {_of_layers(run, group, metric)}"
                         + (f" from step {g_first}" if g_first is not None else ""))
        return "; ".join(parts) + "."
    if kind == "edge_of_stability":
        return f"Edge of stability: {len(items)} crossings{at}."
    if kind == "estimator_failed":
        return f"Estimator failures: {len(items)}{at}. Failed estimates are shown as failed, not as numbers."
    if kind == "not_converged":
        return f"{len(items)} estimators did not converge at every probe; those values are flagged in the panels."
    if kind == "nonfinite":
        return f"Non-finite values in {len(items)} places{at}."
    if kind == "unended":
        return f"{len(items)} probes had not ended when the records stop; they stored no numbers."
    if kind == "misuse":
        return (f"Misuse: {len(items)} ways the run measured nothing or not what it claims{at}; each line "
                "names its fix.")
    return f"{len(items)} findings ({kind.replace('_', ' ')}){at}."


def group_findings(run: RunView, findings: list[Finding]) -> list[FindingGroup]:
    """Group one run's findings by kind, in the order the kinds first appear: one line per kind, the
    individual findings (when there are several) folded under it."""
    kinds: dict[str, list[Finding]] = {}
    for f in findings:
        kinds.setdefault(f.kind, []).append(f)
    out = []
    for kind, items in kinds.items():
        severity = min((f.severity for f in items), key=lambda s: _SEVERITY_RANK.get(s, 3))
        if len(items) == 1:
            out.append(FindingGroup(kind, severity, items[0].text, [], items[0].step))
        else:
            out.append(FindingGroup(kind, severity, _summary(run, kind, items), items, _first_step(items)))
    return out
