"""The parameters' flat copies kept between monitored steps: reused only when nothing else holds them, freed
when a step does not use them, and the numbers they give the same as with fresh copies."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from diagnostics.metrics import Diagnostic
from diagnostics.metrics.flat_buffers import FlatBufferPool
from diagnostics.store import open_run
from diagnostics.store.records import Record
from diagnostics.tracking import Monitor


def test_a_buffer_given_back_is_lent_again_unless_a_view_of_it_lives():
    pool = FlatBufferPool()
    a = pool.take(10, torch.float32, torch.device("cpu"))
    pool.give_back(a)
    assert pool.kept_bytes == 40
    b = pool.take(10, torch.float32, torch.device("cpu"))
    assert b is a and pool.kept_bytes == 0
    view = b[2:5]
    pool.give_back(b)  # a view survives: its values must not be overwritten by a later step
    assert pool.kept_bytes == 0
    c = pool.take(10, torch.float32, torch.device("cpu"))
    assert c is not b and view.data_ptr() == b.data_ptr() + 8  # a new buffer; the view still on the old one
    other = pool.take(10, torch.float64, torch.device("cpu"))  # another dtype: a new one
    pool.give_back(c)
    pool.give_back(other)
    pool.give_back(pool.take(3, torch.float32, torch.device("cpu")))  # beyond MAX_KEPT: dropped
    assert pool.kept_bytes == 40 + 80


def test_a_step_that_uses_no_buffer_frees_them():
    pool = FlatBufferPool()
    pool.new_step()
    pool.give_back(pool.take(10, torch.float32, torch.device("cpu")))
    pool.new_step()  # the previous step used one: kept
    assert pool.kept_bytes == 40
    pool.new_step()  # this one used none: freed
    assert pool.kept_bytes == 0


class KeepsUpdate(Diagnostic):
    """Keeps each step's update in its state (what a diagnostic of a user's may do): a view of it
    (``ctx.update()``) or the flat update tensor itself (``ctx.update_flat()``)."""

    name = "keeps_update"
    requires = frozenset({"update"})

    def __init__(self, what: str) -> None:
        super().__init__(every=1)
        self.what = what
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def compute(self, ctx: Any) -> list[Record]:
        return []

    def compute_after_update(self, ctx: Any) -> list[Record]:
        kept = ctx.update()["0.weight"] if self.what == "view" else ctx.update_flat()
        self.kept.append((kept, kept.clone()))
        return []


def _run(tmp_path: Path, name: str, reuse: bool, extra: list[Any]) -> tuple[Any, Monitor]:
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), run=tmp_path / name,
                  diagnostics=["weight_norm", "update_ratio", *extra], budget=None, optimizer=opt)
    if not reuse:
        mon._flat_buffers.give_back = lambda t: None  # every step's copies fresh
    ptrs = []
    for step in range(6):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.step(step, (x, y), loss)
        opt.step()
        opt.zero_grad()
        ptrs.append(sorted(t.data_ptr() for t in mon._flat_buffers._kept))
    mon.close()
    assert mon._flat_buffers.kept_bytes == 0  # closing frees them
    with open_run(tmp_path / name) as run:
        return run.series(), ptrs


def test_the_monitor_reuses_the_copies_and_stores_the_same_numbers(tmp_path):
    reused, ptrs = _run(tmp_path, "reused", True, [])
    fresh, _ = _run(tmp_path, "fresh", False, [])
    assert len(ptrs[1]) == 2 and all(p == ptrs[1] for p in ptrs[1:])  # the same two buffers every step
    cols = ["metric", "key", "step"]
    reused, fresh = (s[s.metric != "monitor_seconds"] for s in (reused, fresh))  # timings differ, not values
    a, b = reused.sort_values(cols).reset_index(drop=True), fresh.sort_values(cols).reset_index(drop=True)
    assert set(a.metric) == {"weight_norm", "update_ratio"} and a[cols].equals(b[cols])
    assert all(math.isclose(x, y, rel_tol=0, abs_tol=0) for x, y in zip(a.value, b.value, strict=True))


@pytest.mark.parametrize("what", ["view", "tensor"])
def test_an_update_kept_by_a_diagnostic_is_never_overwritten(tmp_path, what):
    keeper = KeepsUpdate(what)
    _run(tmp_path, f"kept-{what}", True, [keeper])
    assert len(keeper.kept) == 6
    for kept, copy in keeper.kept:
        assert torch.equal(kept, copy)
    assert len({k.data_ptr() for k, _ in keeper.kept}) == 6  # each step's update in memory of its own
