"""Runs of several processes (torchrun): who is who, agreement, gradient averaging.

torchrun starts one process per GPU and sets `RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
`LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`; `init()` starts the process
group from them with `cpu:gloo,cuda:nccl`, so small host-side agreements (shard
sizes, interrupts, arms) travel over gloo and never wait on a GPU, while
gradients travel over NCCL. Every helper here is a no-op in a single process,
so the loops call them unconditionally.

What must agree across ranks, and how (see `optima.engine`, `optima.experiment`):
the data (each rank its shard of every batch, `optima.data`), the weights
(`DistributedDataParallel` broadcasts rank 0's at wrap time and averages
gradients), the arm played each round (the policy is seeded identically and fed
a reward from loss totals summed over ranks; `check_same` stops the run if the
arms ever differ), checkpoints (rank 0 writes, all read the same one) and
interrupts (a signal on any rank stops every rank after the same step).
"""
from __future__ import annotations

import datetime
import inspect
import os
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from optima.errors import OptimaError


class RanksDisagree(OptimaError):
    """Ranks of one run computed different values where they must agree."""

    exit_code = 1


def launched() -> bool:
    """Whether this process was started as one of several (torchrun's `WORLD_SIZE` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(timeout_minutes: float = 30.0) -> bool:
    """Start the process group if torchrun launched several processes (and it is not
    started yet); on a GPU machine, pin this process to its GPU (`LOCAL_RANK`).
    Returns whether this run has several processes."""
    if not launched():
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that logs, reports and writes files."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this node (torchrun's `LOCAL_WORLD_SIZE`; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def device(requested: str) -> torch.device:
    """The device of this process for the binding `experiment.device`: 'auto' is
    this rank's GPU (or the CPU without one); 'cuda' becomes this rank's GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(requested)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank() if launched() else torch.cuda.current_device())
    return dev


# --- agreement (host side, small) ---------------------------------------------------

def all_gather_ints(value: int) -> list[int]:
    """`value` of every rank, in rank order."""
    if not active():
        return [int(value)]
    out = [torch.zeros((), dtype=torch.long) for _ in range(world_size())]
    dist.all_gather(out, torch.tensor(int(value), dtype=torch.long))
    return [int(t) for t in out]


def check_same(value: int, what: str) -> None:
    """Stop the run (`RanksDisagree`, on every rank) if `value` differs across ranks."""
    values = all_gather_ints(value)
    if len(set(values)) > 1:
        raise RanksDisagree(f"the ranks disagree on {what}: " + ", ".join(
            f"rank {r}: {v}" for r, v in enumerate(values)) + "; every rank must compute the same value (a "
            "policy must draw only from its own generator, seeded alike on every rank); stopped")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (a picklable object: a path, a decision)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def union(items: Iterable[str]) -> list[str]:
    """The distinct `items` of every rank, in rank order, then first seen."""
    mine = list(items)
    if not active():
        return list(dict.fromkeys(mine))
    every: list[list[str]] = [[] for _ in range(world_size())]
    dist.all_gather_object(every, mine)
    return list(dict.fromkeys(x for rank_items in every for x in rank_items))


def barrier() -> None:
    if active():
        dist.barrier()


# --- tensors -----------------------------------------------------------------------

def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over ranks (a new tensor; `t` itself in a single process)."""
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of `params` that have one over ranks, in one
    all-reduce (parameters outside `DistributedDataParallel`, e.g. a loss's
    projections). Every rank must hold gradients for the same parameters; those
    without one keep none, so the optimizer leaves them alone, as in one process."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Rank `src`'s parameters and buffers on every rank (e.g. a frozen teacher)."""
    if not active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src)


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` in `DistributedDataParallel` (the module itself in a single process).

    `static_graph=True`: the parameters a step leaves without gradient (e.g.
    CoCa's contrastive projections under a classification head) are the same
    every step, so DDP finds them once instead of searching the graph each step
    as `find_unused_parameters` would. No buffers are broadcast each step
    (transformers have no running statistics)."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, static_graph=True, **no_sync)

