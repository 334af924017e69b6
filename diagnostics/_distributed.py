"""torch.distributed helpers for the Monitor and the curvature operators.

Under data parallelism every rank runs the same diagnostics on its shard, and collectives inside them
(the curvature operators all-reduce their products) must be joined by every rank in the same order. Two
rules keep ranks in step:

* Every collective a diagnostic issues goes through :func:`guarded_all_reduce`: a two-number header
  ``[failed, done]`` is all-reduced first, so a rank that has already failed (or finished) is noticed by
  the others, which then abandon the diagnostic instead of waiting for a payload that never comes.
* After every diagnostic each rank calls :func:`end_phase` with its own outcome; the result says whether
  the diagnostic failed on any rank, so all ranks record the same status and meet at the same point.

A rank that failed outside any collective therefore costs the others one header reduction, never a hang.
Every function here is a no-op (or the identity) when no process group with more than one rank exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "RemoteFailure",
    "all_ranks_any",
    "comm_device",
    "end_phase",
    "guarded_all_reduce",
    "is_distributed",
    "rank",
    "rank_run_dir",
    "unwrap_model",
    "world_size",
]


class RemoteFailure(RuntimeError):
    """Another rank failed (or left) the diagnostic this rank is running; the collective was abandoned."""


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def comm_device() -> torch.device:
    """Device for small control tensors: the current CUDA device under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper; other models unchanged.

    Functional calls (``torch.func.functional_call``) on the wrapper would run DDP's forward, which
    prepares its reducer for a backward pass that never reaches it and may broadcast buffers; calls on
    ``model.module`` share the same parameters without touching DDP's hooks. Parameter names then lack
    the ``module.`` prefix, so series match a single-process run.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def rank_run_dir(run_dir: str | Path, r: int | None = None) -> Path:
    """Per-rank run directory: ``RUN-rank{r}`` next to ``RUN`` (merge them with ``tdiag combine``)."""
    run_dir = Path(run_dir)
    r = rank() if r is None else r
    return run_dir.with_name(f"{run_dir.name}-rank{r}")


def _header(failed: bool, done: bool) -> tuple[int, int]:
    h = torch.tensor([float(failed), float(done)], dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(h)
    return int(round(float(h[0]))), int(round(float(h[1])))


def guarded_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place, after checking that every rank reached the same collective.

    Cost: one extra all-reduce of two float64 numbers.

    Raises:
        RemoteFailure: another rank failed in, or finished, the current diagnostic; the payload was not
            exchanged and every rank treats the diagnostic as failed.
    """
    if not is_distributed():
        return tensor
    failed, done = _header(False, False)
    if failed or done:
        raise RemoteFailure(
            f"diagnostic abandoned on rank {rank()}: {failed} rank(s) failed"
            + (f", {done} rank(s) had finished (ranks issued different collectives)" if done else "")
        )
    torch.distributed.all_reduce(tensor)
    return tensor


def end_phase(failed: bool) -> bool:
    """Meet the other ranks at the end of a diagnostic; return True when it failed on any rank.

    Call exactly once per diagnostic on every rank, unless the diagnostic raised :class:`RemoteFailure`
    (that header reduction already was the meeting point). Without a process group returns ``failed``.
    """
    if not is_distributed():
        return failed
    n_failed, n_done = _header(failed, True)
    return n_failed > 0 or n_done < world_size()


def all_ranks_any(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (one all-reduce; identity without a group)."""
    if not is_distributed():
        return flag
    t = torch.tensor([float(flag)], dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(t)
    return float(t) > 0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled); identity without a process group."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
