"""Report findings name a probe cut into calls whose run had not ended when the records stop."""

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
