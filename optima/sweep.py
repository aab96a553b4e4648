"""Sweeps: a grid of variants (each a list of gin bindings) x seeds of one config.

Every run is an `optima run` subprocess with its own run directory,
`SWEEP_DIR/<variant>/seed-<k>/`, and its output in `SWEEP_DIR/<variant>/seed-<k>.log`
(Hydra's multirun layout, with names instead of job numbers). The sweep drives
only the command line, so any config works, third-party plugins included.

- Stages are shared through the stage cache (`optima.experiment`): variants
  that differ only in distillation bindings train one teacher per seed. A seed's
  first run goes alone (no other run of that seed starts before it ends), so
  two jobs never wait on the same untrained teacher; the stage cache's lock
  makes that safe in any case.
- Resumable: a run whose directory holds `metrics.json` is finished and
  skipped; one with `config.gin` but no metrics was interrupted and continues
  with `optima run --resume`; a failing run is reported (its log kept, its
  error line shown) and the others go on.
- `SWEEP_DIR/sweep.json` holds the grid (config, common bindings, variants);
  a rerun may add variants or seeds, but a variant name keeps its bindings.
  Each run directory gets `job.json` (variant, seed, bindings, attempts with
  their wall time and exit status) once `optima run` has created it.
- `results.csv` (a row per run) and `results.md` (per variant and metric:
  median, mean, std, n) are written from the run directories' files, never
  from logs, after every finished run.

Variants file (TOML; `optima sweep CONFIG --variants FILE`): top-level
`seeds` (a count, meaning 0..n-1, or a list) and `bindings` apply to every
variant; each table is a variant with its `bindings` and optionally its own
`seeds`. See `docs/sweeps.md`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from optima.checkpoint import write_json_atomic, write_text_atomic
from optima.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
#: Status of a run: finished (`done`), never started (`pending`), started and not
#: finished (`unfinished`: resumed on the next sweep), or how its last attempt ended.
STATUSES = ("done", "pending", "unfinished", "failed", "interrupted")


@dataclass(frozen=True)
class Variant:
    name: str
    bindings: tuple[str, ...] = ()
    seeds: tuple[int, ...] | None = None  # None: the sweep's default seeds


# --- parsing what the user gives ------------------------------------------------------

def split_bindings(text: str) -> list[str]:
    """'a = 1; b = "x;y"' -> ['a = 1', 'b = "x;y"']: semicolons outside quotes and
    brackets separate bindings."""
    out, current, quote, depth = [], [], None, 0
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == ";" and depth == 0:
            out.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    out.append("".join(current).strip())
    return [b for b in out if b]


def check_name(name: str, where: str) -> str:
    if not NAME.match(name):
        raise ConfigError(f"{where}: variant name {name!r} must be letters, digits and _ . + - "
                          "(it names the variant's directory)")
    return name


def parse_variant(text: str) -> Variant:
    """`--variant NAME='BINDING; BINDING'` (no bindings: the config as it is)."""
    name, sep, bindings = text.partition("=")
    if not sep or name != name.strip():  # 'a.b = 1': a binding without a name
        raise ConfigError(f"--variant {text!r}: expected NAME='BINDING; BINDING', e.g. "
                          "--variant layerwise='distillation.policy = @layerwise_policy'")
    return Variant(check_name(name.strip(), f"--variant {text!r}"), tuple(split_bindings(bindings)))


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2)."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct non-negative integers separated by commas, e.g. 0,1,2")
    return seeds


def _seeds_value(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return tuple(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in value) and len(set(value)) == len(value):
        return tuple(value)
    raise ConfigError(f"{where}: seeds must be a count >= 1 (seeds 0..n-1) or a list of distinct "
                      f"non-negative integers, got {value!r}")


def _bindings_value(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(b, str) for b in value):
        raise ConfigError(f"{where}: bindings must be a list of strings, e.g. "
                          f"[\"distillation.policy = @layerwise_policy\"], got {value!r}")
    return tuple(b.strip() for b in value if b.strip())


def _read_toml(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such variants file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a TOML variants file ({e})") from None


#: the variants file's table of Slurm options (`optima.slurm.SlurmOptions`), not a variant
SLURM_TABLE = "slurm"


def load_slurm_table(path: str) -> dict[str, Any]:
    """The `[slurm]` table of a variants file (empty if it has none)."""
    table = _read_toml(path).get(SLURM_TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {SLURM_TABLE} must be a table of Slurm options, e.g. [slurm] with "
                          "partition = \"gpu\"")
    return table


def load_variants_file(path: str) -> tuple[list[Variant], tuple[str, ...], tuple[int, ...] | None]:
    """The variants, common bindings and default seeds of a TOML variants file
    (the CLI resolves `package:path` first); its `[slurm]` table is read by `load_slurm_table`."""
    data = _read_toml(path)
    common: tuple[str, ...] = ()
    seeds = None
    variants = []
    for key, value in data.items():
        if key == SLURM_TABLE:
            continue
        if isinstance(value, dict):
            where = f"{path}: [{key}]"
            unknown = sorted(set(value) - {"bindings", "seeds"})
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown}; a variant has 'bindings' and 'seeds'")
            variants.append(Variant(check_name(key, where), _bindings_value(value.get("bindings", []), where),
                                    _seeds_value(value["seeds"], where) if "seeds" in value else None))
        elif key == "bindings":
            common = _bindings_value(value, f"{path}: bindings")
        elif key == "seeds":
            seeds = _seeds_value(value, f"{path}: seeds")
        else:
            raise ConfigError(f"{path}: unknown top-level key {key!r}; expected 'seeds', 'bindings' "
                              "and one [table] per variant")
    if not variants:
        raise ConfigError(f"{path}: no variants; add a table per variant, e.g. [layerwise] with "
                          "bindings = [\"distillation.policy = @layerwise_policy\"]")
    return variants, common, seeds


def binding_key(binding: str) -> str:
    """'distillation.rounds = 4' -> 'distillation.rounds'."""
    return binding.split("=", 1)[0].strip()


# --- the grid and its runs -------------------------------------------------------------

@dataclass
class Job:
    """One run of the grid: a variant at a seed."""

    variant: str
    seed: int
    variant_bindings: tuple[str, ...]
    bindings: tuple[str, ...]  # everything after the config: common, variant's, the seed
    run_dir: Path
    log: Path
    status: str = "pending"
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0  # summed over attempts
    error: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.variant}/seed-{self.seed}"

    @property
    def record(self) -> Path:
        return self.run_dir / "job.json"


def read_metrics(run_dir: Path) -> dict[str, float]:
    """`metrics.json`'s test metrics as {'<network>/<metric>': value} (NaN for a null)."""
    summary = json.loads((run_dir / "metrics.json").read_text())
    return {f"{net}/{name}": math.nan if v is None else float(v)
            for net, metrics in summary["metrics"].items() for name, v in metrics.items()}


def error_line(log: Path, returncode: int) -> str:
    """The line that says why a run failed: optima's one-line error, else the
    last line of a traceback, else the exit status."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    lines = lines[max((i for i, ln in enumerate(lines) if ln.startswith("# ")), default=-1) + 1:]  # last attempt
    lines = [ln for ln in lines if not ln.startswith("In call to configurable")]  # gin's context lines
    errors = [ln for ln in lines if ln.startswith("optima: error:")]
    if errors:
        return errors[-1]
    if any(ln.startswith("Traceback") for ln in lines):
        return lines[-1]
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}" + (f": {lines[-1]}" if lines else "")


class Sweep:
    """The grid of `variants` x seeds of `config`, kept in `sweep_dir`."""

    def __init__(self, config: str, variants: Sequence[Variant], sweep_dir: str | os.PathLike,
                 common_bindings: Sequence[str] = (), seeds: Sequence[int] | None = None,
                 no_plugins: bool = False, config_file: str | None = None):
        """`config` as `optima run` takes it (a path or `package:path`), `config_file` the
        file it names (default: `config`, a path)."""
        self.config_file = config_file or config
        if not os.path.isfile(self.config_file):
            raise ConfigError(f"{config}: no such gin file")
        names = [v.name for v in variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"variant(s) {duplicates} given twice; each variant needs its own name")
        for b in common_bindings:
            if "=" not in b:
                raise ConfigError(f"binding {b!r} is not of the form 'configurable.parameter = value'")
        for v in variants:
            for b in v.bindings:
                if "=" not in b:
                    raise ConfigError(f"variant {v.name}: binding {b!r} is not of the form "
                                      "'configurable.parameter = value'")
        self.config = config
        self.dir = Path(sweep_dir)
        self.common = tuple(common_bindings)
        self.no_plugins = no_plugins
        default = tuple(seeds) if seeds else (0,)
        self.variants = [Variant(v.name, v.bindings, v.seeds or default) for v in variants]
        self.grid = self._merge_with_stored()
        self.live: dict[str, Job] = {}  # jobs run by this process, by label: their status is known here

    @classmethod
    def load(cls, sweep_dir: str | os.PathLike) -> "Sweep":
        """The sweep in `sweep_dir`, as its `sweep.json` describes it."""
        grid = Path(sweep_dir) / "sweep.json"
        try:
            stored = json.loads(grid.read_text())
            variants = [Variant(v["name"], tuple(v["bindings"]), tuple(v["seeds"])) for v in stored["variants"]]
            config, common = stored["config"], stored.get("bindings", ())
        except FileNotFoundError:
            raise ConfigError(f"{sweep_dir} is not a sweep directory (it has no sweep.json)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{grid}: unreadable ({e})") from None
        sweep = cls.__new__(cls)
        sweep.config, sweep.dir, sweep.common, sweep.no_plugins = config, Path(sweep_dir), tuple(common), False
        sweep.config_file = stored.get("config_file", config)
        sweep.variants = sweep.grid = variants
        sweep.live = {}
        return sweep

    # the grid on disk ---------------------------------------------------------
    @property
    def grid_file(self) -> Path:
        return self.dir / "sweep.json"

    def _merge_with_stored(self) -> list[Variant]:
        """This invocation's variants added to those already in `sweep.json` (a
        variant keeps its bindings; seeds accumulate); refused if the config or
        the common bindings differ."""
        if not self.grid_file.exists():
            return list(self.variants)
        try:
            stored = json.loads(self.grid_file.read_text())
            old = [Variant(v["name"], tuple(v["bindings"]), tuple(v["seeds"])) for v in stored["variants"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.grid_file}: unreadable ({e}); pass another --sweep-dir") from None
        stored_file = stored.get("config_file", stored["config"])
        if os.path.realpath(stored_file) != os.path.realpath(self.config_file):
            raise ConfigError(f"{self.dir} holds a sweep of {stored['config']}, not {self.config}; "
                              "pass another --sweep-dir")
        if tuple(stored.get("bindings", ())) != self.common:
            raise ConfigError(f"{self.dir} was swept with common bindings {stored.get('bindings')}, now "
                              f"{list(self.common)}; pass the same -b (and variants file bindings) or another "
                              "--sweep-dir")
        merged = {v.name: v for v in old}
        for v in self.variants:
            if v.name in merged:
                if merged[v.name].bindings != v.bindings:
                    raise ConfigError(f"variant {v.name} in {self.grid_file} has bindings "
                                      f"{list(merged[v.name].bindings)}, now {list(v.bindings)}; give the new "
                                      "one another name, or pass another --sweep-dir")
                seeds = merged[v.name].seeds + tuple(s for s in v.seeds if s not in merged[v.name].seeds)
                merged[v.name] = Variant(v.name, v.bindings, seeds)
            else:
                merged[v.name] = v
        return list(merged.values())

    @contextlib.contextmanager
    def lock(self):
        """One `optima sweep` process per sweep directory (an advisory lock,
        released when the process ends, however it ends)."""
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".sweep.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{self.dir} is being swept by another optima sweep process; wait for it to "
                                  "end, or pass another --sweep-dir") from None
            yield
        finally:
            os.close(fd)

    def save_grid(self, command: str) -> None:
        write_json_atomic(self.grid_file, {
            "config": self.config, "config_file": self.config_file, "bindings": list(self.common),
            "command": command,
            "variants": [{"name": v.name, "bindings": list(v.bindings), "seeds": list(v.seeds)} for v in self.grid],
        }, indent=1)

    def jobs(self, only_current: bool = False) -> list[Job]:
        """Every run of the grid (or of this invocation's variants), variant by
        variant, with its status read from its directory."""
        out = []
        for v in self.variants if only_current else self.grid:
            for seed in v.seeds:
                if f"{v.name}/seed-{seed}" in self.live:
                    out.append(self.live[f"{v.name}/seed-{seed}"])
                    continue
                run_dir = self.dir / v.name / f"seed-{seed}"
                job = Job(v.name, seed, v.bindings, (*self.common, *v.bindings, f"experiment.seed = {seed}"),
                          run_dir, self.dir / v.name / f"seed-{seed}.log")
                refresh(job)
                out.append(job)
        return out

    def command(self, job: Job) -> list[str]:
        cmd = [sys.executable, "-m", "optima.cli.main", "run", self.config]
        for b in job.bindings:
            cmd += ["-b", b]
        # a run directory with config.gin holds an unfinished run: it continues
        resume = (job.run_dir / "config.gin").exists()
        cmd += ["--resume" if resume else "--run-dir", str(job.run_dir)]
        if self.no_plugins:
            cmd.append("--no-plugins")
        return cmd


def refresh(job: Job) -> None:
    """Read a job's status, metrics and attempts from its run directory."""
    if job.record.exists():
        try:
            record = json.loads(job.record.read_text())
            job.attempts = list(record.get("attempts", []))
            job.wall_s = sum(a.get("wall_s", 0.0) for a in job.attempts)
            job.error = record.get("error")
            last = job.attempts[-1]["status"] if job.attempts else "pending"
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            last = "pending"
    else:
        last = "pending"
    if (job.run_dir / "metrics.json").exists():
        job.status, job.error = "done", None
        try:
            job.metrics = read_metrics(job.run_dir)
        except (OSError, ValueError, KeyError, TypeError) as e:
            job.status, job.error = "failed", f"unreadable {job.run_dir / 'metrics.json'}: {e}"
    elif (job.run_dir / "config.gin").exists():
        job.status = last if last in ("failed", "interrupted") else "unfinished"
    else:
        job.status = "pending"


def _write_record(job: Job, config: str) -> None:
    """`job.json` in the run directory, once `optima run` has made it a run
    directory (before that, a file there would make `optima run` refuse it)."""
    if not (job.run_dir / "config.gin").exists():
        return
    write_json_atomic(job.record, {
        "variant": job.variant, "seed": job.seed, "config": config, "variant_bindings": list(job.variant_bindings),
        "bindings": list(job.bindings), "status": job.status, "error": job.error, "attempts": job.attempts,
    }, indent=1)


# --- running ------------------------------------------------------------------------

class SweepObserver:
    """What the runner tells its display (no-op base)."""

    def on_start(self, job: Job, resumed: bool) -> None: ...
    def on_poll(self, running: Sequence[Job]) -> None: ...
    def on_finish(self, job: Job) -> None: ...
    def on_stopping(self, running: Sequence[Job]) -> None: ...
    def on_wait(self, job: Job) -> None: ...  # its run directory is still in use by an earlier process


class SweepInterrupted(Exception):
    """Ctrl-C or SIGTERM: the running runs were stopped (each saves a checkpoint)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class _Running:
    job: Job
    process: subprocess.Popen
    started: float
    log_file: Any


def run_sweep(sweep: Sweep, jobs: int = 1, threads: int = 1, observer: SweepObserver | None = None,
              poll_s: float = 0.5) -> list[Job]:
    """Run this invocation's unfinished runs, `jobs` at a time, and write the
    results after each; returns every job of the grid. On SIGINT/SIGTERM no run
    starts, each running one gets one SIGINT (it saves a checkpoint and stops;
    a second signal stops them at once) and `SweepInterrupted` is raised once
    they have ended. The runs die with the sweep: should it be killed (SIGKILL),
    each gets SIGTERM and saves a checkpoint."""
    observer = observer or SweepObserver()
    sweep.dir.mkdir(parents=True, exist_ok=True)
    todo = [j for j in sweep.jobs(only_current=True) if j.status != "done"]
    sweep.live.update({j.label: j for j in todo})
    # seeds with a finished run have their teacher in the cache: no need to go alone
    warm = {j.seed for j in sweep.jobs() if j.status == "done"}
    started_seeds: set[int] = set()
    running: list[_Running] = []
    env = run_environment(threads)
    signals: list[int] = []

    def on_signal(signum, frame):
        signals.append(signum)
        for r in running:  # the runs are in their own sessions: forward the signal
            _signal(r.process, signal.SIGINT)

    def next_job() -> Job | None:
        """The first run whose seed has its teacher, or whose seed nobody has started."""
        return next((j for j in todo if j.seed in warm or
                     (j.seed not in started_seeds and all(r.job.seed != j.seed for r in running))), None)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    announced = False
    try:
        while (todo and not signals) or running:
            while not signals and len(running) < jobs and (job := next_job()) is not None:
                todo.remove(job)
                started_seeds.add(job.seed)
                # a run of a killed sweep may still be saving its checkpoint: let it end, then resume it
                if wait_for_run_dir(job.run_dir, lambda: observer.on_wait(job)):
                    refresh(job)
                    if job.status == "done":  # it finished meanwhile
                        write_results(sweep)
                        observer.on_finish(job)
                        continue
                running.append(start_run(job, sweep.command(job), env, new_session=True))
                observer.on_start(job, "--resume" in running[-1].process.args)
            if signals and running and not announced:
                observer.on_stopping([r.job for r in running])
                announced = True
            time.sleep(poll_s)
            observer.on_poll([r.job for r in running])
            for r in [r for r in running if r.process.poll() is not None]:
                running.remove(r)
                finish_run(sweep, r, stopped=bool(signals))
                warm.add(r.job.seed)  # finished or not, its teacher stage has ended
                write_results(sweep)
                observer.on_finish(r.job)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for r in running:  # only after an error in this loop: never leave a run behind
            _signal(r.process, signal.SIGTERM)
            r.process.wait()
            finish_run(sweep, r, stopped=True)
    all_jobs = write_results(sweep)
    if signals:
        raise SweepInterrupted(signals[0])
    return all_jobs


def _signal(process: subprocess.Popen, signum: int) -> None:
    if process.poll() is None:
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass


def run_environment(threads: int) -> dict[str, str]:
    """The environment of a run: `threads` torch threads, unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1", "COLUMNS": os.environ.get("COLUMNS", "120")}


#: the file `optima run` locks in its run directory while it runs (`optima.cli.run`)
RUN_DIR_LOCK = ".optima.lock"


def wait_for_run_dir(run_dir: Path, on_wait=None, poll_s: float = 0.2) -> bool:
    """Return once no process holds the run directory's lock (an `optima run`
    still saving its checkpoint after its sweep was killed); `on_wait()` is
    called once if it has to wait. Whether it waited."""
    import fcntl

    lock = Path(run_dir) / RUN_DIR_LOCK
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return waited
            except BlockingIOError:
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                time.sleep(poll_s)
    finally:
        os.close(fd)


def _die_with_parent() -> None:
    """In a run's process before it starts: SIGTERM when its parent (the sweep,
    or the Slurm job's wrapper) dies, however it dies (Linux; elsewhere nothing)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def start_run(job: Job, cmd: Sequence[str], env: Mapping[str, str], note: str = "",
              new_session: bool = False) -> _Running:
    """Start `cmd` (the run `job`) with its output appended to the job's log."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    log = open(job.log, "a", encoding="utf-8")
    args = cmd[cmd.index("optima.cli.main") + 1:] if "optima.cli.main" in cmd else cmd
    log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} optima {shlex.join(args)}" + (f" ({note})" if note else "")
              + "\n")
    log.flush()
    parent = os.getpid()

    def before_exec() -> None:
        _die_with_parent()
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    # own session (local sweep): a Ctrl-C reaches the sweep only, which forwards one SIGINT per run
    process = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=dict(env), start_new_session=new_session, preexec_fn=before_exec)
    job.status = "running"
    return _Running(job, process, time.monotonic(), log)


def finish_run(sweep: Sweep, r: _Running, stopped: bool, **attempt: Any) -> None:
    """Record how the run `r` ended in its job and its `job.json`; `stopped`:
    the sweep (or Slurm) asked it to stop; `attempt`: more to record."""
    job, code = r.job, r.process.returncode
    r.log_file.close()
    wall = time.monotonic() - r.started
    if code == 0 and (job.run_dir / "metrics.json").exists():
        job.status, job.error = "done", None
        job.metrics = read_metrics(job.run_dir)
    else:
        interrupted = stopped and code in (130, 143, -signal.SIGINT, -signal.SIGTERM)
        job.status = "interrupted" if interrupted else "failed"
        job.error = error_line(job.log, code)
    job.attempts.append({"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - wall)),
                         "wall_s": round(wall, 1), "exit_code": code, "status": job.status, **attempt})
    job.wall_s = sum(a["wall_s"] for a in job.attempts)
    _write_record(job, sweep.config)


# --- results --------------------------------------------------------------------------

def write_results(sweep: Sweep) -> list[Job]:
    """`results.csv`, `results.md` and the HParams entries of the whole grid,
    from the run directories. Serialised by a lock in the sweep directory
    (Slurm jobs write them as they end): the last writer has seen every run."""
    import fcntl

    sweep.dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(sweep.dir / ".results.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        jobs = sweep.jobs()
        write_text_atomic(sweep.dir / "results.csv", results_csv(jobs))
        write_text_atomic(sweep.dir / "results.md", results_markdown(sweep, jobs))
        write_hparams(sweep.dir / "tensorboard" / "hparams", jobs)
    finally:
        os.close(fd)
    return jobs


def _hparam_value(text: str) -> float | str:
    """A binding's value as the HParams dashboard sorts it: a number where it is one."""
    try:
        return float(text.replace("_", ""))
    except ValueError:
        return text


def hparams_of(jobs: Sequence[Job]) -> tuple[dict[str, dict[str, Any]], dict[str, list]]:
    """{run label: {hparam: value}} of the finished runs (variant, seed and each
    binding a variant sets: a number where every value set is one, the run
    left out where its variant leaves it to the config; else text, '(config)'
    where left to the config), and the values of each text hparam (the
    dashboard's filters)."""
    done = [j for j in jobs if j.status == "done"]
    keys = binding_columns(done)
    bound = {j.label: {binding_key(b): b.split("=", 1)[1].strip() for b in j.variant_bindings} for j in done}
    numeric = {k: all(isinstance(_hparam_value(b[k]), float) for b in bound.values() if k in b) for k in keys}
    out = {}
    for j in done:
        values: dict[str, Any] = {"variant": j.variant, "seed": j.seed}
        for k in keys:
            text = bound[j.label].get(k)
            if numeric[k]:
                if text is not None:
                    values[k] = _hparam_value(text)
            else:
                values[k] = text if text is not None else "(config)"
        out[j.label] = values
    discrete = {k: sorted({v[k] for v in out.values()}) for k in ("variant", *keys) if not numeric.get(k, False)}
    return out, discrete


def _hparams_summaries(values: Mapping[str, Any], metrics: Sequence[str],
                       discrete: Mapping[str, list]) -> tuple[Any, Any, Any]:
    """The HParams plugin's three summaries (TensorBoard's protos, no TensorFlow
    or torch needed): the experiment (which hparams and metrics exist), a
    session's start (its hparam values) and end."""
    from google.protobuf import struct_pb2
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    def summary(tag: str, **data: Any) -> Summary:
        content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data)
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                      content=content.SerializeToString()))
        return Summary(value=[Summary.Value(tag=tag, metadata=meta)])

    start = plugin_data_pb2.SessionStartInfo()
    infos = []
    for name, value in values.items():
        if isinstance(value, str):
            start.hparams[name].string_value = value
            kind = api_pb2.DATA_TYPE_STRING
            domain = struct_pb2.ListValue(values=[struct_pb2.Value(string_value=v) for v in discrete.get(name, ())])
        else:
            start.hparams[name].number_value = float(value)
            kind, domain = api_pb2.DATA_TYPE_FLOAT64, None
        infos.append(api_pb2.HParamInfo(name=name, type=kind, domain_discrete=domain if discrete.get(name) else None))
    experiment = api_pb2.Experiment(hparam_infos=infos,
                                    metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in metrics])
    return (summary(metadata.EXPERIMENT_TAG, experiment=experiment),
            summary(metadata.SESSION_START_INFO_TAG, session_start_info=start),
            summary(metadata.SESSION_END_INFO_TAG,
                    session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)))


def write_hparams(directory: Path, jobs: Sequence[Job]) -> None:
    """TensorBoard's HParams dashboard for the sweep: one session per finished
    run (`<directory>/<variant>/seed-<k>`) with its hparams (`hparams_of`) and
    its test metrics as scalars; rewritten whole (swapped in when complete)."""
    import shutil

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    values, discrete = hparams_of(jobs)
    if not values:
        return
    metrics = metric_columns([j for j in jobs if j.status == "done"])
    fresh = directory.with_name(directory.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)

    def write(run: Path, *summaries: Summary) -> None:
        writer = EventFileWriter(str(run))
        for summary in summaries:
            writer.add_event(Event(wall_time=time.time(), step=0, summary=summary))
        writer.close()

    every: dict[str, Any] = {}  # each hparam with a value of its kind, in order
    for run in values.values():
        every.update({k: v for k, v in run.items() if k not in every})
    write(fresh, _hparams_summaries(every, metrics, discrete)[0])
    for job in jobs:
        if job.label in values:
            _, start, end = _hparams_summaries(values[job.label], metrics, discrete)
            scalars = Summary(value=[Summary.Value(tag=m, simple_value=v) for m, v in job.metrics.items()
                                     if math.isfinite(v)])
            write(fresh / job.variant / f"seed-{job.seed}", start, end, scalars)
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    fresh.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def binding_columns(jobs: Iterable[Job]) -> list[str]:
    """The keys the variants bind, in order of first appearance."""
    keys: list[str] = []
    for j in jobs:
        for b in j.variant_bindings:
            if binding_key(b) not in keys:
                keys.append(binding_key(b))
    return keys


def metric_columns(jobs: Iterable[Job]) -> list[str]:
    keys: list[str] = []
    for j in jobs:
        for k in j.metrics:
            if k not in keys:
                keys.append(k)
    return keys


def results_csv(jobs: Sequence[Job]) -> str:
    import csv
    import io

    bindings, metrics = binding_columns(jobs), metric_columns(jobs)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["variant", "seed", "status", *bindings, *metrics, "wall_s", "run_dir", "error"])
    for j in jobs:
        bound = {binding_key(b): b.split("=", 1)[1].strip() for b in j.variant_bindings}
        writer.writerow([j.variant, j.seed, j.status, *(bound.get(k, "") for k in bindings),
                         *(repr(j.metrics[m]) if m in j.metrics else "" for m in metrics),
                         f"{j.wall_s:.1f}" if j.attempts else "", str(j.run_dir), j.error or ""])
    return out.getvalue()


@dataclass
class Stats:
    median: float
    mean: float
    std: float  # sample standard deviation (n - 1); nan for n < 2
    n: int
    values: list[float]


def summarize(jobs: Sequence[Job]) -> dict[str, dict[str, Stats]]:
    """{metric: {variant: Stats}} over the finished runs with a finite value,
    variants in grid order."""
    out: dict[str, dict[str, Stats]] = {}
    for metric in metric_columns(jobs):
        per_variant: dict[str, list[float]] = {}
        for j in jobs:
            if j.status == "done" and math.isfinite(j.metrics.get(metric, math.nan)):
                per_variant.setdefault(j.variant, []).append(j.metrics[metric])
        out[metric] = {v: Stats(statistics.median(xs), statistics.fmean(xs),
                                statistics.stdev(xs) if len(xs) > 1 else math.nan, len(xs), xs)
                       for v, xs in per_variant.items()}
    return out


def per_seed(jobs: Sequence[Job], metric: str) -> dict[str, dict[int, float]]:
    """{variant: {seed: value}} over the finished runs with a finite value, variants in grid order."""
    out: dict[str, dict[int, float]] = {}
    for j in jobs:
        if j.status == "done" and math.isfinite(j.metrics.get(metric, math.nan)):
            out.setdefault(j.variant, {})[j.seed] = j.metrics[metric]
    return out


def teacher_per_seed(jobs: Sequence[Job], metric: str) -> dict[int, list[float]]:
    """{seed: [its teacher's values]}: one value per seed, as every variant of a
    seed reuses that seed's teacher (several only if variants bound the teacher
    differently)."""
    out: dict[int, list[float]] = {}
    for j in jobs:
        if j.status == "done" and math.isfinite(j.metrics.get(metric, math.nan)):
            values = out.setdefault(j.seed, [])
            if j.metrics[metric] not in values:
                values.append(j.metrics[metric])
    return out


def results_markdown(sweep: Sweep, jobs: Sequence[Job]) -> str:
    from optima import paired

    counts = {s: sum(j.status == s for j in jobs) for s in STATUSES}
    variants = [v.name for v in sweep.grid]
    against = paired.references(variants)
    lines = [f"# Sweep of `{sweep.config}`", "",
             f"{len(jobs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".",
             "Each metric is the test metric of a network (`<network>/<metric>`) in the runs' `metrics.json`,",
             "over the seeds of each variant: median, mean, sample standard deviation (std, n - 1) and n.",
             "The `vs` columns compare each variant with "
             + " and with ".join(f"`{a}`" for a in against) + " seed by seed (`optima/paired.py`):",
             "the mean of the per-seed differences (variant minus the other, over the seeds both finished),",
             f"its {paired.LEVEL:.0%} bootstrap interval ({paired.RESAMPLES:,} resamples of the seeds) and the "
             "verdict the interval gives:",
             "`better` or `worse` when it excludes 0, `tie` when it holds 0.",
             "The teacher is trained once per seed and shared by every variant of that seed: its statistics",
             "are over seeds, not runs.", ""]
    stats = summarize(jobs)
    for metric, per_variant in stats.items():
        network = metric.split("/", 1)[0]
        if network == "teacher":
            teachers = teacher_per_seed(jobs, metric)
            values = [x for xs in teachers.values() for x in xs]
            std = f"{statistics.stdev(values):.4f}" if len(values) > 1 else ""
            lines += [f"## {metric}", "", "| seeds | median | mean | std | n |", "|---|---:|---:|---:|---:|",
                      f"| {', '.join(map(str, sorted(teachers)))} | {statistics.median(values):.4f} | "
                      f"{statistics.fmean(values):.4f} | {std} | {len(values)} |", ""]
            continue
        seeds = per_seed(jobs, metric)
        versus = {a: paired.compare_all(seeds, a, metric) for a in against if a in per_variant}
        lines += [f"## {metric}", "",
                  "| variant | median | mean | std | n |" + "".join(f" vs {a} |" for a in versus),
                  "|---|---:|---:|---:|---:|" + "---|" * len(versus)]
        for v in variants:
            if v not in per_variant:
                continue
            s = per_variant[v]
            cells = ["" if v == a else (p.cell() if (p := versus[a].get(v)) else "no common seed")
                     for a in versus]
            std = "" if s.n < 2 else f"{s.std:.4f}"
            lines.append(f"| {v} | {s.median:.4f} | {s.mean:.4f} | {std} | {s.n} |"
                         + "".join(f" {c} |" for c in cells))
        lines.append("")
    failed = [j for j in jobs if j.status in ("failed", "interrupted")]
    if failed:
        lines += ["## Runs that did not finish", "", "| run | status | error | log |", "|---|---|---|---|"]
        lines += [f"| {j.label} | {j.status} | {(j.error or '').replace('|', '/')} | {j.log} |" for j in failed]
        lines.append("")
    common = "".join(f" -b {shlex.quote(b)}" for b in sweep.common)
    lines += ["## Variants", "", f"Every run is `optima run {sweep.config}{common}`, then its variant's bindings",
              "and `-b 'experiment.seed = SEED'`:", ""]
    for v in sweep.grid:
        lines.append(f"- **{v.name}** (seeds {', '.join(map(str, v.seeds))}): "
                     + ("; ".join(f"`{b}`" for b in v.bindings) or "the config as it is"))
    return "\n".join(lines) + "\n"
