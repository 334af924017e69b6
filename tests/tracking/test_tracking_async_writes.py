"""Store writes off the training thread (``async_writes=True``): the crash promise and equal stores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from diagnostics.errors import StoreError
from diagnostics.store import open_run
from diagnostics.tracking import Monitor

# The child reports, after each optimizer step, the step whose commit it has just queued; every step
# before it has been written, because the pipeline waits for the previous commit before queueing one.
CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from diagnostics.tracking import Monitor
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, run=sys.argv[1], diagnostics="cheap", optimizer=opt, async_writes=True)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    progress = open(sys.argv[2], "w")
    for step in range(100000):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.step(step, (x, y), loss)
        opt.step()
        opt.zero_grad()
        progress.write(f"{step}\\n")
        progress.flush()
        time.sleep(0.002)
    """
)


def _queued(progress: Path) -> int:
    lines = progress.read_text().split() if progress.is_file() else []
    return int(lines[-1]) if lines else -1


def test_sigkill_with_async_writes_loses_at_most_the_queued_step(tmp_path: Path) -> None:
    run_dir, progress = tmp_path / "run", tmp_path / "progress.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), str(progress)], env=env)
    try:
        deadline = time.time() + 180  # a loaded machine can take long to import torch
        while _queued(progress) < 30 and time.time() < deadline:
            time.sleep(0.05)
        assert _queued(progress) >= 30, "child never reached step 30"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    reported = _queued(progress)  # the child ran at least to this step before it was killed
    try:
        run = open_run(run_dir)
    except StoreError as exc:  # pragma: no cover - the failure this test exists to catch
        pytest.fail(f"the store did not survive SIGKILL: {exc}")
    steps = run.steps()
    # Every step before the last queued one is readable, in order, with its rows.
    assert steps == list(range(len(steps)))
    assert len(steps) >= reported, f"store has steps 0..{len(steps) - 1}, child had queued step {reported}"
    loss_steps = list(run.series(metric="loss").step)
    assert loss_steps == steps


def _train(run_dir: Path, *, async_writes: bool) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(4)]
    losses = []
    with Monitor(model, run=run_dir, diagnostics="cheap", optimizer=opt, async_writes=async_writes) as mon:
        for step in range(12):
            x, y = batches[step % 4]
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(step, (x, y), loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return losses


def test_async_writes_store_the_same_rows_and_leave_training_unchanged(tmp_path: Path) -> None:
    sync_losses = _train(tmp_path / "sync", async_writes=False)
    async_losses = _train(tmp_path / "async", async_writes=True)
    assert async_losses == sync_losses
    cols = ["step", "metric", "key", "value"]
    a, b = (
        s[s.metric != "monitor_seconds"][cols].sort_values(cols[:3]).reset_index(drop=True)  # timings differ
        for s in (open_run(tmp_path / "sync").series(), open_run(tmp_path / "async").series())
    )
    assert len(a) > 12 and a.equals(b)
