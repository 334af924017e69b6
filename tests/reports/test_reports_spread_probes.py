"""Probes cut into calls in the report: drawn at the step they measured, named when one had not ended."""

from __future__ import annotations

from diagnostics.reports.findings import group_findings, run_findings
from diagnostics.reports.views import load_report_view

from diagnostics.store import Record, RunWriter, Status


def _view(tmp_path, statuses_at):
    with RunWriter(tmp_path / "run", name="run") as w:
        for step in range(12):
            w.write_step(step, [Record("loss", 1.0)], statuses=statuses_at(step))
    (view,) = load_report_view(tmp_path / "run").runs
    return view


def _status(name: str, status: str, products: int) -> Status:
    return Status(name, status, "stopped by the budget" if status == "continues" else None, 0.5, products)


def test_a_probe_still_going_at_the_last_step_is_a_finding(tmp_path):
    def at(step):
        out = [_status("sharpness", "continues" if step != 3 else "ok", 2)] if step >= 2 else []
        if step in (1, 2):
            out.append(_status("hessian_top", "continues" if step == 1 else "ok", 4))
        return out

    view = _view(tmp_path, at)
    found = [f for f in run_findings(view) if f.kind == "unended"]
    assert [f.step for f in found] == [4]  # sharpness's run from step 4 on; hessian_top's ended at 2
    assert found[0].text == ("The last probe of sharpness had not ended when the records stop: its calls from "
                             "step 4 on (16 products) stored no numbers; a probe cut into calls stores them "
                             "when it ends.")
    assert "Nothing alarming" not in " ".join(f.text for f in run_findings(view))
    (group,) = [g for g in group_findings(view, run_findings(view)) if g.kind == "unended"]
    assert group.severity == "info"


def test_ended_probes_give_no_such_finding(tmp_path):
    view = _view(tmp_path, lambda step: [_status("hessian_top", "continues" if step % 3 else "ok", 4)]
                 if step < 10 else [])
    assert not [f for f in run_findings(view) if f.kind == "unended"]


def test_a_spread_probe_is_drawn_at_the_step_it_measured(tmp_path):
    from diagnostics.store import Event

    crossing = Event("edge_of_stability", "sharpness_ratio crossed 1", "warning", metric="sharpness_ratio",
                     key="all", data={"ratio": 1.2, "direction": "up", "probe_step": 3})
    with RunWriter(tmp_path / "run", name="run") as w:
        for step in range(30):
            recs = [Record("loss", 1.0)]
            events = []
            if step == 1:  # ended within its call
                recs += [Record("sharpness", 5.0), Record("sharpness_ratio", 0.5),
                         Record("hessian_eigenvalue", 9.0, index=0), Record("hessian_eigenvalue", 4.0, index=1)]
            if step == 12:  # began at step 3
                recs += [Record("sharpness", 12.0), Record("sharpness_ratio", 1.2), Record("sharpness_probe_step", 3.0)]
                events = [crossing]
            if step == 20:  # began at step 8
                recs += [Record("hessian_eigenvalue", 10.0, index=0), Record("hessian_eigenvalue", 6.0, index=1),
                         Record("hessian_probe_step", 8.0)]
            w.write_step(step, recs, events=events)
    (view,) = load_report_view(tmp_path / "run").runs
    steps, values = view.metrics["sharpness_ratio"].curve()
    assert list(steps) == [1, 3] and list(values) == [0.5, 1.2]
    assert list(view.metrics["sharpness"].curve()[0]) == [1, 3]
    assert list(view.metrics["hessian_eigenvalue"].curve(index=1)[0]) == [1, 8]
    assert list(view.metrics["hessian_eigenvalue"].curve(index=1)[1]) == [4.0, 6.0]
    assert list(view.metrics["loss"].curve()[0]) == list(range(30))  # other metrics stay where they are
    (eos,) = view.events_of("edge_of_stability")
    assert eos.step == 3
