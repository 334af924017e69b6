"""A writer killed with SIGKILL mid-run loses at most the step in flight, and the run can be resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from diagnostics.store import Record, RunWriter, open_run

RECORDS_PER_STEP = 300

CHILD = textwrap.dedent(
    f"""
    import sys
    from diagnostics.store import Record, RunWriter
    w = RunWriter(sys.argv[1], resume=True)
    step = 0
    while True:
        w.write_step(step, [Record("m", float(step), key=str(i)) for i in range({RECORDS_PER_STEP})],
                     source=f"ckpt{{step}}")
        print(step, flush=True)  # printed only after the commit returned
        step += 1
    """
)


def test_sigkill_loses_at_most_the_step_in_flight_and_resume_works(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    committed = -1
    deadline = time.monotonic() + 15
    try:
        while committed < 40 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            committed = int(line)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=10)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert committed >= 40, "the child did not get going"

    run = open_run(tmp_path)
    steps = run.steps()
    # Every step the child reported is there. It may have committed a few more before the kill landed
    # (the pipe is read behind it), but never with a gap.
    assert steps[: committed + 1] == list(range(committed + 1))
    assert steps == list(range(len(steps)))
    # No step is half written.
    per_step = run.series().groupby("step").size()
    assert (per_step == RECORDS_PER_STEP).all()
    assert run.sources()["source"].tolist() == [f"ckpt{s}" for s in steps]
    run.close()

    with RunWriter(tmp_path, resume=True) as w:
        assert len(w.completed_sources()) == len(steps)
        w.write_step(len(steps), [Record("m", -1.0)])
    assert open_run(tmp_path).steps()[-1] == len(steps)
