"""Checkpoints that survive kills, full disks and corruption; interrupts; resuming.

A stage's checkpoints live in `run_dir/checkpoints/<stage>/step-<step, 9 digits>/`:

- `tensors.safetensors`: every tensor of the state (weights, projections, heads,
  optimizer moments, policy state, torch RNG states),
- `state.json`: everything else (counters, history, scheduler, data position,
  python and numpy RNG states), tensors referenced by name,
- `manifest.json`, written last: format, stage, step, round, the stage's cache
  key, and the size and sha256 of the two files.

Writing is atomic: a hidden `.step-...tmp` directory, every file flushed and
fsynced, the directory fsynced, renamed, the parent fsynced; only then are the
checkpoints beyond the last `keep` removed. A kill at any moment leaves the
previous checkpoints as they were (and a `.tmp` directory that the next start
removes); a failed write (a full disk) removes its `.tmp` directory and raises
`CheckpointWriteError`. Reading goes newest first: a checkpoint whose manifest is
missing or unreadable, or whose files differ from it in size or checksum, is
renamed `<name>.corrupt` with a warning and the previous one is used.

Nothing is ever unpickled: tensors come from safetensors, the rest from JSON.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from optima import distributed
from optima.errors import ConfigError, OptimaError, warning

FORMAT = "optima-checkpoint/1"
TENSORS, STATE, MANIFEST = "tensors.safetensors", "state.json", "manifest.json"
_NAME = re.compile(r"^step-(\d{9})$")
#: Test hook, see `fault_point`.
KILL_ENV = "OPTIMA_TEST_KILL_AT"


# --- errors ------------------------------------------------------------------------

class CheckpointError(ConfigError):
    """A checkpoint cannot be used: written for another model, or none is intact."""


class CheckpointWriteError(OptimaError):
    """A checkpoint (or a run's output) could not be written, e.g. the disk is full.
    Earlier checkpoints are intact, so the run can be resumed."""

    exit_code = 1
    resumable = True


class Interrupted(OptimaError):
    """SIGINT or SIGTERM: the run saved a checkpoint (when it was in a loop) and
    stopped. Exit code 128 + the signal's number: 130 (SIGINT), 143 (SIGTERM)."""

    resumable = True

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:  # a property, so that gin's exception proxies keep it
        return 128 + self.signum


# --- a JSON codec that keeps tensors in a safetensors file -------------------------

def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`obj` (nested dicts, lists, tuples, tensors, numbers, strings, None, numpy
    arrays) -> JSON-able data; tensors go into `tensors` under their path."""
    if isinstance(obj, torch.Tensor):
        name = path or "tensor"
        while name in tensors:
            name += "'"
        tensors[name] = obj
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        sub = lambda k: f"{path}.{k}" if path else str(k)  # noqa: E731
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, sub(k)) for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors), encode(v, tensors, sub(k))] for k, v in obj.items()]}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path or 'the top'}")


def decode(data: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        return tensors[data["__tensor__"]]
    if "__ndarray__" in data:
        return np.asarray(data["__ndarray__"], dtype=data["dtype"])
    if "__float__" in data:
        return float(data["__float__"])
    if "__tuple__" in data:
        return tuple(decode(v, tensors) for v in data["__tuple__"])
    if "__items__" in data:
        return {decode(k, tensors): decode(v, tensors) for k, v in data["__items__"]}
    return {k: decode(v, tensors) for k, v in data.items()}


# --- RNG states --------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every global RNG: python, numpy, torch CPU and (when present) CUDA."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state((numpy[0], np.asarray(numpy[1], dtype=np.uint32), *numpy[2:]))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).clone())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).clone() for s in cuda])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without changing any global RNG (CPU side)."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py)
    np.random.set_state(npy)


# --- files -------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path))
    _fsync_file(path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then fsync and rename onto `path`: readers see the old file or
    the new one, never half of one. On failure the temporary file is removed and
    a failed write (a full disk) is a `CheckpointWriteError` naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with failed_writes(tmp, lambda why: f"could not write {path}: {why}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)


@contextlib.contextmanager
def failed_writes(tmp: Path | Callable[[], None], message: Callable[[str], str]) -> Iterator[None]:
    """Every write of a run (and of `optima export`) goes through this: if the
    block fails, `tmp` (a file or a directory) is removed, or `tmp()` called
    when it is a function that removes what the block wrote; a failure of the
    file system (no space left, quota, a read-only disk, ...: an `OSError`, or
    safetensors' error wrapping one) becomes a `CheckpointWriteError` of one
    line, `message(why)`."""
    try:
        yield
    except BaseException as e:
        if callable(tmp):
            tmp()
        elif tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        why = write_problem(e)
        if why is None:
            raise
        raise CheckpointWriteError(message(why)) from None


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_problem(e: BaseException) -> str | None:
    """Why a write failed, in a user's words, when the file system refused it (an
    `OSError`, or safetensors' error wrapping one); None for anything else."""
    if isinstance(e, OSError):
        return _reason(e)
    m = _OS_ERROR.search(str(e))  # safetensors (Rust): "I/O error: No space left on device (os error 28)"
    if m and type(e).__name__ == "SafetensorError":
        code = int(m.group(1))
        return _reason(OSError(code, os.strerror(code)))
    return None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None: JSON has no such
    numbers (Python would write a bare `NaN`, which JSON readers refuse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """`obj` as valid JSON, atomically; non-finite numbers are written as null."""
    write_text_atomic(path, json.dumps(finite_json(obj), indent=indent, allow_nan=False))


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device (the disk is full)"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e)


def _clonable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On the CPU, contiguous, and no two sharing memory (safetensors refuses that)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if t.numel() == 0 or storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        else:
            seen.add(storage.data_ptr())
        out[name] = t
    return out


# --- checkpoints -------------------------------------------------------------------

@dataclass
class Checkpoint:
    path: Path
    manifest: dict[str, Any]
    state: Any

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


class CheckpointManager:
    """The checkpoints of one stage in `directory` (see the module doc).

    `warn(text)` reports skipped (corrupt) checkpoints and removed leftovers.
    """

    saves = 0  # checkpoints this process started to write (the test hook `save:<n>` counts them)

    def __init__(self, directory: str | os.PathLike, keep: int = 2, warn: Callable[[str], None] = print):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"keep_checkpoints must be an integer >= 1, got {keep!r}")
        self.directory, self.keep, self.warn = Path(directory), keep, warn
        if self.directory.is_dir():
            for leftover in self.directory.glob(".*.tmp"):  # a save that was killed
                shutil.rmtree(leftover, ignore_errors=True)

    def paths(self) -> list[Path]:
        """Complete-looking checkpoints, oldest first (not verified)."""
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.iterdir() if p.is_dir() and _NAME.match(p.name)),
                      key=lambda p: p.name)

    # -- writing ---------------------------------------------------------------
    def save(self, state: Any, *, step: int, round: int | None = None, meta: Mapping[str, Any] | None = None) -> Path:
        """Write `state` as the checkpoint of `step`; keep the last `keep`."""
        final = self.directory / f"step-{step:09d}"
        tmp = self.directory / f".{final.name}.tmp"
        previous = self.paths()
        CheckpointManager.saves += 1
        intact = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        with failed_writes(tmp, lambda why: f"could not write checkpoint {final}: {why}; {intact}"):
            tensors: dict[str, torch.Tensor] = {}
            skeleton = encode(state, tensors)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _write_tensors(tmp / TENSORS, _clonable(tensors))
            fault_point("save", CheckpointManager.saves)
            _write_text(tmp / STATE, json.dumps(skeleton, allow_nan=False))
            manifest = {"format": FORMAT, "step": int(step), "round": round, **dict(meta or {}),
                        "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)}
                                  for name in (TENSORS, STATE)}}
            _write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False))
            _fsync_dir(tmp)
            if final.exists():  # e.g. a corrupt one we fell back from: replace it
                old = self.directory / f".{final.name}.old.tmp"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.directory)
        self._prune()
        return final

    def _prune(self) -> None:
        for old in self.paths()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for corrupt in self.directory.glob("step-*.corrupt"):
            shutil.rmtree(corrupt, ignore_errors=True)

    # -- reading ---------------------------------------------------------------
    def latest(self) -> Checkpoint | None:
        """The newest intact checkpoint, or None if there is none at all. Corrupt
        ones are renamed `<name>.corrupt` with a warning; if every one is corrupt,
        `CheckpointError`."""
        paths = self.paths()
        for path in reversed(paths):
            try:
                return self.load(path)
            except CheckpointError as e:
                self.warn(warning(f"{e}; falling back to the previous checkpoint"))
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_name(path.name + ".corrupt"))
        if paths:
            raise CheckpointError(f"every checkpoint in {self.directory} is corrupt; remove the directory to "
                                  "restart this stage from scratch")
        return None

    @staticmethod
    def load(path: str | os.PathLike) -> Checkpoint:
        """Verify (sizes, sha256) and read one checkpoint; `CheckpointError` if corrupt."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("format") != FORMAT:
                raise ValueError(f"unknown format {manifest.get('format')!r}")
            for name in (TENSORS, STATE):
                expected = manifest["files"][name]
                size = (path / name).stat().st_size
                if size != expected["bytes"]:
                    raise ValueError(f"{name} has {size} bytes, the manifest says {expected['bytes']} (truncated?)")
                if sha256(path / name) != expected["sha256"]:
                    raise ValueError(f"{name} does not match its checksum")
            tensors = load_file(str(path / TENSORS), device="cpu")
            state = decode(json.loads((path / STATE).read_text(encoding="utf-8")), tensors)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            reason = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            raise CheckpointError(f"checkpoint {path} is corrupt ({reason})") from None
        return Checkpoint(path, manifest, state)


def check_same_layout(saved: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], what: str,
                      source: str | os.PathLike) -> None:
    """Refuse a state dict of another architecture, naming the keys that differ."""
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(current[k].shape)}"
              for k in current if k in saved and tuple(saved[k].shape) != tuple(current[k].shape)]
    if not (missing or unexpected or shapes):
        return

    def names(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    parts = [f"{label} {names(items)}" for label, items in
             (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs model)", shapes)) if items]
    raise CheckpointError(f"checkpoint {source} holds another architecture for the {what}: {'; '.join(parts)}")


# --- one run's checkpoints ---------------------------------------------------------

class RunKeeper:
    """The checkpoints and interrupts of one run: stage `s` keeps its checkpoints
    in `run_dir/checkpoints/s/`. A loop (`Finetuner`, `Distiller`) is saved as
    `{"loop": loop.state_dict(), "rng": rng_state()}`, with the stage's cache key
    in the manifest.

    In a run of several processes (`optima.distributed`) rank 0 writes the
    checkpoints and picks the one to resume from, which every rank then loads
    (the run directory is on a file system they share); an interrupt on any
    rank stops every rank after the same step."""

    def __init__(self, run_dir: str | os.PathLike, interrupts: Interrupts | None = None,
                 message: Callable[[str], None] = print):
        self.run_dir, self.interrupts, self.message = Path(run_dir), interrupts, message
        self._managers: dict[str, CheckpointManager] = {}

    def manager(self, stage: str, keep: int) -> CheckpointManager:
        if stage not in self._managers:
            self._managers[stage] = CheckpointManager(self.run_dir / "checkpoints" / stage, keep, self.message)
        self._managers[stage].keep = keep
        return self._managers[stage]

    def resume(self, stage: str, loop: Any, *, keep: int, key: str) -> Checkpoint | None:
        """Load the newest intact checkpoint of `stage` into `loop` and restore every
        RNG; None (and nothing changed) if the stage has none."""
        found = self.manager(stage, keep).latest() if distributed.is_main() else None
        path = distributed.broadcast_object(None if found is None else str(found.path))
        if path is None:
            return None
        if found is None:  # another rank: the checkpoint rank 0 chose
            found = CheckpointManager.load(path)
        if found.manifest.get("key") != key:
            self.message(warning(f"{found.path} was written for another {stage} stage (other bindings, data or "
                                 "initial weights); continuing from it"))
        loop.load_state_dict(found.state["loop"], source=str(found.path))
        set_rng_state(found.state["rng"])
        where = f"round {found.manifest['round']}, " if found.manifest.get("round") is not None else ""
        self.message(f"{stage}: resumed from {found.path} ({where}step {found.step})")
        return found

    def save(self, stage: str, loop: Any, *, keep: int, key: str) -> Path | None:
        """Write a checkpoint of `loop` (rank 0; other ranks write nothing and get None)."""
        if not distributed.is_main():
            return None
        return self.manager(stage, keep).save(
            {"loop": loop.state_dict(), "rng": rng_state()}, step=loop.step, round=getattr(loop, "round", None),
            meta={"stage": stage, "key": key})

    @property
    def signalled(self) -> bool:
        """Whether SIGINT or SIGTERM arrived at this process (no agreement across ranks:
        for code that only rank 0 runs)."""
        return self.interrupts is not None and self.interrupts.requested is not None

    @property
    def interrupted(self) -> bool:
        """Whether SIGINT or SIGTERM arrived (at any rank: every rank must ask at the
        same points, and then all stop there)."""
        if self.interrupts is None:
            return False
        signum = max(distributed.all_gather_ints(self.interrupts.requested or 0))
        if signum and self.interrupts.requested is None:  # another rank was signalled
            self.interrupts.requested = signum
        return bool(signum)

    def stop(self, where: str, saved: Path | None = None) -> Interrupted:
        """The `Interrupted` to raise once the checkpoint is written: every rank
        waits here for rank 0's checkpoint (so none exits before it is saved),
        and names it."""
        saved = distributed.broadcast_object(saved)
        return self.interrupts.stop(where, saved)


# --- interrupts --------------------------------------------------------------------

class Interrupts:
    """While active (a context manager), SIGINT and SIGTERM do not kill the run:
    the first sets `requested` (the signal's number), and the training loops
    stop after their current step, save a checkpoint and raise `Interrupted`; a
    second signal raises `Interrupted` at once (the checkpoints already written
    stay intact). Outside the main thread this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise Interrupted(signum, f"interrupted twice ({signal.Signals(signum).name}); stopped at once, "
                              "without saving")
        self.requested = signum

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def stop(self, where: str, saved: Path | None = None) -> Interrupted:
        """The exception to raise once a requested interrupt has been honoured."""
        name = signal.Signals(self.requested).name
        what = f"checkpoint saved to {saved}" if saved else "nothing to save"
        return Interrupted(self.requested, f"interrupted by {name} {where}; {what}")


def fault_point(where: str, n: int) -> None:
    """Test hook for tests/test_resume.py and tests/test_distributed.py: with
    `OPTIMA_TEST_KILL_AT=<where>:<n>` (`step`: after distillation step n;
    `teacher`: after teacher step n; `save`: halfway through the n-th checkpoint
    this process writes), send this process SIGKILL there, as a preemption would
    (`OPTIMA_TEST_KILL_SIGNAL=TERM`: SIGTERM; `OPTIMA_TEST_KILL_RANK=r`: only
    in the process of rank r of a torchrun)."""
    spec = os.environ.get(KILL_ENV)
    if not spec or spec != f"{where}:{n}":
        return
    if os.environ.get("OPTIMA_TEST_KILL_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("OPTIMA_TEST_KILL_SIGNAL", "KILL")))


# --- comparing configs for --resume ------------------------------------------------

#: Bindings that decide how a run is kept alive, not its result: they may change
#: when a run is resumed, and they are left out of the stage cache keys.
OPERATIONAL = ("checkpoint_every", "keep_checkpoints", "on_nonfinite", "compile")
OPERATIONAL_BINDINGS = tuple(f"{c}.{p}" for c in ("distillation", "teacher_training", "pretraining")
                              for p in OPERATIONAL) \
    + ("experiment.cache_dir", "experiment.data_workers", "experiment.threads")


def is_operational(key: str) -> bool:
    """`key` like `student/distillation.checkpoint_every`."""
    return key.rsplit("/", 1)[-1] in OPERATIONAL_BINDINGS


def binding_values(config_text: str) -> dict[str, str]:
    """`gin.config_str()` text (or a saved `config.gin`) -> binding -> value text
    (whitespace collapsed); comments and blank lines are skipped."""
    values: dict[str, list[str]] = {}
    key = None
    for line in config_text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and key is not None:
            values[key].append(line.strip())
            continue
        name, sep, value = line.partition("=")
        if not sep:
            continue
        key = name.strip()
        values[key] = [value.strip().rstrip("\\").strip()]
    return {k: " ".join(" ".join(v).split()) for k, v in values.items()}


def config_differences(saved_text: str, current_text: str) -> list[str]:
    """The bindings (not operational ones) whose values differ, as
    `name (old -> new)`, sorted by name."""
    old, new = binding_values(saved_text), binding_values(current_text)

    def short(v: str | None) -> str:
        if v is None:
            return "unset"
        return v if len(v) <= 40 else v[:37] + "..."

    return [f"{k} ({short(old.get(k))} -> {short(new.get(k))})" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not is_operational(k)]
