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
    "is_dtensor",
    "rank",
    "rank_run_dir",
    "sharded_norms",
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


def _compiled_module_type() -> type | None:
    # torch._dynamo is imported only when a compiled model can exist (importing it costs about a second).
    import sys

    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers.

    Functional calls (``torch.func.functional_call``) on the wrapper would run DDP's forward, which
    prepares its reducer for a backward pass that never reaches it and may broadcast buffers; calls on
    ``model.module`` share the same parameters without touching DDP's hooks. A compiled model
    (``torch.compile(model)``) is unwrapped to ``model._orig_mod``: the diagnostics' extra passes run
    eagerly (torch.func transforms of a compiled graph are not supported, and shapes differing from the
    training batch would trigger recompilations), on the same parameters. Parameter names then lack the
    ``module.`` and ``_orig_mod.`` prefixes, so series match a single-process, uncompiled run.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    compiled = _compiled_module_type()
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        else:
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


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters), without importing it.

    >>> is_dtensor(torch.zeros(2))
    False
    """
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local") and hasattr(t, "full_tensor")


def sharded_norms(tensors: list[torch.Tensor]) -> list[float] | None:
    """L2 norms of ``DTensor`` shards (FSDP2 parameters and gradients) as whole-tensor norms; None when no
    tensor in ``tensors`` is a DTensor.

    Sharded tensors contribute their local sums of squares to one all-reduce over their mesh; replicated
    ones count once. Collective when a DTensor is sharded: every rank must call it with the same list.
    Cost: one fused norm over the local shards and one all-reduce of ``len(tensors)`` float64 numbers.
    """
    if not any(is_dtensor(t) for t in tensors):
        return None
    from torch.distributed.tensor import Replicate, Shard

    with torch.no_grad():
        squares = torch.zeros(len(tensors), dtype=torch.float64)
        sharded: set[int] = set()
        exact: dict[int, float] = {}
        group = None
        for i, t in enumerate(tensors):
            if is_dtensor(t) and t.device_mesh.ndim == 1 and isinstance(t.placements[0], Shard):
                squares[i] = float(torch.linalg.vector_norm(t.to_local().detach().double())) ** 2
                sharded.add(i)
                group = t.device_mesh.get_group()
            elif is_dtensor(t) and not all(isinstance(p, Replicate) for p in t.placements):
                # Other layouts (several mesh dimensions, partial sums): DTensor reduces them itself.
                exact[i] = float(torch.linalg.vector_norm(t.detach()).full_tensor())
            else:  # replicated or plain: the same on every rank
                local = t.to_local() if is_dtensor(t) else t
                squares[i] = float(torch.linalg.vector_norm(local.detach().double())) ** 2
        if group is not None:
            n = torch.distributed.get_world_size(group)
            for i in range(len(tensors)):
                if i not in sharded:
                    squares[i] /= n  # counted once after the sum over the ranks
            squares = squares.to(comm_device())
            torch.distributed.all_reduce(squares, group=group)
        values = squares.cpu().sqrt().tolist()
    return [exact.get(i, v) for i, v in enumerate(values)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled); identity without a process group."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
