"""Batches for the loops: endless shuffled passes over a split, made ahead of the
step by `torch.utils.data.DataLoader` worker processes when the task can.

- A task with a `batch_source` (`optima.interfaces.BatchSource`: batch k made
  alone) is read through one DataLoader per stream: the sampler yields
  `(epoch, k)` indices from the stream's position on, the workers make those
  batches (decode, augmentation, tokenisation) in their packed form
  (`BatchSource.packed_shard`: an image task's uint8 pixels), `pin_memory` on
  CUDA, a few batches prefetched per worker; the training process moves each
  to its device and unpacks it there (`BatchSource.unpack`: normalised
  float32 images). Because batch k depends only on the pass's seed and k, the
  batches are the same, in the same order, for any number of workers, and a
  resumed stream starts at its batch without making earlier ones.
- A task with only `batches` is read in the training process, as a generator
  (a resumed one through `Task.batches_from`).
- In a run of several processes (`optima.distributed`), each process gets its
  shard of every batch (`BatchSource.shard`, or rows sliced off the whole
  batch) and `share`, its fraction of the batch's examples, by which the loops
  weight its losses so that the processes together compute the whole batch's.
"""
from __future__ import annotations

import functools
import os
import re
import signal
import sys
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from optima import distributed
from optima.checkpoint import preserved_rng
from optima.errors import ConfigError, OptimaError, warning
from optima.interfaces import SKIPPED_RECORDS, Batch, BatchSource, Task, batch_rows, slice_rows

#: The DataLoader's default: batches each worker makes ahead.
PREFETCH = 2


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Worker processes per training process: the CPUs left to this process (its
    share of the node's, one kept for the training process itself), at most 16."""
    per_process = available_cpus() // max(1, distributed.local_world_size())
    return max(0, min(16, per_process - 1))


class WorkerDied(OptimaError):
    """A DataLoader worker process died (killed, out of memory): the run stops;
    its checkpoints are intact, so it can be resumed."""

    exit_code = 1
    resumable = True


#: torch's words for a dead worker, from its SIGCHLD handler or its loader.
_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (is killed by signal: [^.]+|exited "
                          r"unexpectedly(?: with exit code -?\d+)?)")


def worker_died(e: BaseException) -> WorkerDied | None:
    """`e` as one line when it is torch's error for a dead DataLoader worker, else None."""
    m = _WORKER_DIED.search(str(e)) if isinstance(e, RuntimeError) else None
    if m is None:
        return None
    pids = m.group(1).strip().replace(" ", "")
    return WorkerDied(f"a data loader worker process (pid {pids}) {m.group(2)}, so the run stopped; "
                      "its checkpoints are intact")


def die_with_parent(parent: int, worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: the worker gets SIGKILL when the process
    that made it ends, however it ends (on Linux: prctl PR_SET_PDEATHSIG), so
    no worker outlives a killed run; if that process is gone already, exit."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)


def to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Passes(Dataset):
    """Item `(epoch, k)`: this process's shard of batch k of the epoch's pass
    (seed `seed + epoch`), packed. Lives in the workers and in the training
    process (the sampler's lengths, `unpack`); keeps the last two passes it
    built, as the sampler runs a few batches ahead into the next pass."""

    def __init__(self, task: Task, split: str, batch_size: int, shuffle: bool, seed: int, rank: int, world: int):
        self.task, self.split, self.batch_size, self.shuffle, self.seed = task, split, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self._sources: dict[int, BatchSource] = {}

    def source(self, epoch: int) -> BatchSource:
        if epoch not in self._sources:
            self._sources = {e: s for e, s in self._sources.items() if e == epoch - 1}
            self._sources[epoch] = self.task.batch_source(self.split, self.batch_size, shuffle=self.shuffle,
                                                          seed=self.seed + epoch)
        return self._sources[epoch]

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return len(self.source(0))

    def __getitem__(self, index: tuple[int, int]) -> tuple[int, int, Batch]:
        epoch, k = index
        return epoch, k, self.source(epoch).packed_shard(k, self.rank, self.world)


class _Indices:
    """The sampler: `(epoch, k)` from a position on, epoch after epoch (once, if not endless)."""

    def __init__(self, passes: _Passes, epoch: int, position: int, endless: bool):
        self.passes, self.epoch, self.position, self.endless = passes, epoch, position, endless

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self.position
        while True:
            n = len(self.passes.source(epoch))
            if n == 0:
                raise ConfigError(f"the {self.passes.split} split of {type(self.passes.task).__name__} has no examples")
            yield from ((epoch, k) for k in range(start, n))
            if not self.endless:
                return
            epoch, start = epoch + 1, 0


def loader(task: Task, split: str, batch_size: int, *, shuffle: bool, seed: int, device: torch.device,
           workers: int, prefetch: int = PREFETCH, epoch: int = 0, position: int = 0, endless: bool = False,
           rank: int = 0, world: int = 1) -> Iterator[tuple[int, int, Batch]]:
    """Batches of `task.batch_source` passes (which must exist) made by a
    DataLoader, on `device` and unpacked: items `(epoch, k, batch)` from batch
    `position` of `epoch` on. The loader draws its seeds from its own
    generator, never from the global RNG; its workers stop when the iterator
    is dropped."""
    passes = _Passes(task, split, batch_size, shuffle, seed, rank, world)
    options: dict[str, Any] = {}
    if workers > 0:
        options = {"prefetch_factor": prefetch, "persistent_workers": True,
                   "worker_init_fn": functools.partial(die_with_parent, os.getpid())}
    items = DataLoader(passes, batch_size=None, sampler=_Indices(passes, epoch, position, endless),
                       num_workers=workers, pin_memory=device.type == "cuda", collate_fn=_keep,
                       generator=torch.Generator().manual_seed(seed), **options)
    return ((e, k, passes.source(e).unpack(to_device(batch, device))) for e, k, batch in items)


def _keep(item):
    return item


def eval_batches(task: Task, split: str, batch_size: int, device: torch.device, workers: int = 0) -> Iterator[Batch]:
    """One unshuffled pass over `split`, on `device` (made by workers when the task can)."""
    if task.batch_source(split, batch_size, shuffle=False, seed=0) is None:
        return (to_device(b, device) for b in task.batches(split, batch_size, shuffle=False, seed=0))
    items = loader(task, split, batch_size, shuffle=False, seed=0, device=device, workers=workers)
    return (batch for _, _, batch in items)


class SkippedRecords:
    """The distinct reasons examples were left out of batches (`SKIPPED_RECORDS`),
    in order; each new one goes to `warn` (as `optima: warning: <reason>`). Batches made
    by worker processes carry their reasons with them, so they all arrive here."""

    def __init__(self, warn: Callable[[str], None] | None = None):
        self.warn = warn
        self._reasons: dict[str, None] = {}

    def take(self, batch: Batch) -> Batch:
        """`batch` without its `SKIPPED_RECORDS`, which are recorded."""
        if SKIPPED_RECORDS not in batch:
            return batch
        self.add(batch[SKIPPED_RECORDS])
        return {k: v for k, v in batch.items() if k != SKIPPED_RECORDS}

    def add(self, reasons: Iterable[str]) -> None:
        for reason in reasons:
            if reason not in self._reasons:
                self._reasons[reason] = None
                if self.warn is not None:
                    self.warn(warning(reason))

    def why_none(self) -> str:
        return f" (all {len(self)} unreadable; the first: {next(iter(self._reasons))})" if self._reasons else ""

    def load(self, reasons: Iterable[str]) -> None:
        self._reasons = dict.fromkeys(str(r) for r in reasons)

    def __iter__(self):
        return iter(self._reasons)

    def __len__(self) -> int:
        return len(self._reasons)


class BatchStream:
    """Endless shuffled batches of one split, epoch after epoch (epoch e shuffled
    with `seed + e`); its position is state, so that a resumed run sees the same
    batches.

    `workers` > 0: that many DataLoader worker processes make the batches of a
    task that has a `batch_source` (see the module doc), `prefetch` each ahead;
    0 makes them in this process. After `load_state_dict`, the first `next` goes
    on after the epoch's first `position` batches without making them. In a run
    of several processes each gets its shard of every batch; `share` is the
    fraction of the batch's examples the last `next` returned.

    Examples a task left out (`SKIPPED_RECORDS`) are reported to `warn` once each
    and kept in `skipped_records` (state too); a batch left with no rows (on any
    process) is passed over. A pass that yields no rows at all is a
    `ConfigError`, not an endless loop.
    """

    def __init__(self, task: Task, split: str, batch_size: int, seed: int, device: torch.device, *,
                 warn: Callable[[str], None] | None = None, workers: int = 0, prefetch: int = PREFETCH):
        self.task, self.split, self.batch_size, self.seed, self.device = task, split, batch_size, seed, device
        self.workers, self.prefetch = workers, prefetch
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.epoch, self.position = 0, 0
        self.share = 1.0
        self.skipped_records = SkippedRecords(warn)
        self._it: Iterator | None = None
        self._rows: int | None = 0  # rows seen in this epoch, if it started at its beginning
        self._mapped = task.batch_source(split, batch_size, shuffle=True, seed=seed) is not None

    def __iter__(self):
        return self

    def _start(self) -> None:
        with preserved_rng():  # starting a stream draws nothing from the run's RNGs
            if self._mapped:
                self._it = loader(self.task, self.split, self.batch_size, shuffle=True, seed=self.seed,
                                       device=self.device, workers=self.workers, prefetch=self.prefetch,
                                       epoch=self.epoch, position=self.position, endless=True,
                                       rank=self.rank, world=self.world)
            else:
                self._it = self._generated()

    def _generated(self) -> Iterator[tuple[int, int, Batch]]:
        """The task's own `batches`, from the stream's position on (whole batches,
        sliced per process); an empty pass yields `(epoch, -1, None)`."""
        epoch, start = self.epoch, self.position
        while True:
            seed = self.seed + epoch
            if start:
                with preserved_rng():
                    it = iter(self.task.batches_from(self.split, self.batch_size, seed=seed, start=start))
            else:
                it = iter(self.task.batches(self.split, self.batch_size, shuffle=True, seed=seed))
            k = start - 1
            for k, batch in enumerate(it, start):
                yield epoch, k, to_device(slice_rows(batch, self.rank, self.world), self.device)
            if k < 0:
                yield epoch, -1, None
            epoch, start = epoch + 1, 0

    def __next__(self) -> Batch:
        if self._it is None:
            self._rows = None if self.position else 0
            self._start()
        while True:
            epoch, k, batch = next(self._it)
            if epoch != self.epoch:  # a new pass began
                self._check_rows()
                self._rows = 0
            self.epoch, self.position = epoch, k + 1
            if batch is None:  # a pass without batches
                self._rows = 0 if k < 0 else self._rows
                self._check_rows()
                continue
            batch = self.skipped_records.take(batch)
            rows = batch_rows(batch)
            if self._rows is not None:
                self._rows += rows
            counts = distributed.all_gather_ints(rows)
            if min(counts) == 0:  # nothing left (damaged files), or fewer rows than processes: passed over by all
                continue
            self.share = rows / sum(counts)
            return batch

    def _check_rows(self) -> None:
        if self._rows == 0:
            raise ConfigError(f"the {self.split} split of {type(self.task).__name__} has no usable "
                              f"examples{self.skipped_records.why_none()}")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "skipped_records": list(self.skipped_records)}

    def load_state_dict(self, state) -> None:
        self.close()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped_records.load(state.get("skipped_records", ()))

    def close(self) -> None:
        """Stop the worker processes (a later `next` starts them again)."""
        self._it = None
