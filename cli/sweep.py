"""`optima sweep`: variants x seeds of one config, each run an `optima run`
process, started here (`--launcher local`) or as Slurm jobs (`--launcher slurm`,
`optima.slurm`); a display of the runs, then the results table; `--status` and
`--cancel` of a sweep directory (`optima.sweep` does the work)."""
from __future__ import annotations

import math
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from optima.errors import ConfigError
from optima.program import program
from optima.sweep import (Job, Sweep, SweepInterrupted, SweepObserver, Variant, load_slurm_table,
                          load_variants_file, parse_seeds, parse_variant, per_seed, refresh, run_sweep, summarize,
                          write_results)

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: seconds between two progress lines when the output is not a terminal (a log, a pipe)
INTERVAL_ENV = "OPTIMA_PROGRESS_INTERVAL"


def default_sweep_dir(config: str) -> str:
    return os.path.join("sweeps", f"{Path(config.rsplit(':', 1)[-1]).stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 1)] + "…"


def _log_lines(log: Path, n: int) -> list[str]:
    """The last `n` lines a run printed (its progress, or its error)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = [ANSI.sub("", ln).strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return []
    return [ln for ln in lines if ln and not ln.startswith("# ")][-n:]


def _resolve(spec: str) -> str:
    """A path, or the file a plugin's `package:path` names (as `optima run` reads it)."""
    from optima.config import package_file

    found = package_file(spec)
    return str(found) if found is not None else spec


# --- the display ---------------------------------------------------------------------

class SweepDisplay(SweepObserver):
    """Runs done/total with an ETA, and what each running run printed last. On
    a terminal a live display that fits its width; otherwise (a log, a pipe) a
    flushed line per run start and end and one every `interval_s` seconds."""

    def __init__(self, console: Console, total: int, done: int, parallel: int, interval_s: float | None = None):
        self.console, self.total, self.done, self.parallel = console, total, done, max(1, parallel)
        self.ended = done  # finished or not: what the ETA counts
        self.started = time.monotonic()
        self.walls: list[float] = []  # of the runs finished by this invocation
        self.running: dict[str, float] = {}  # label -> when it started here
        self.interval_s = float(os.environ.get(INTERVAL_ENV, 30)) if interval_s is None else interval_s
        self.last_line = time.monotonic()
        self.progress: Progress | None = None
        if console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}", table_column=Column(width=22, no_wrap=True, overflow="ellipsis")),
                BarColumn(bar_width=10), TextColumn("{task.fields[count]}", table_column=Column(no_wrap=True)),
                TimeElapsedColumn(), TextColumn("{task.fields[eta]}", table_column=Column(no_wrap=True)),
                TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                console=console, transient=False)
            self.overall = self.progress.add_task("runs", total=total, completed=done, count=self._count(),
                                                  eta=self._eta(), status="")
            self.rows: dict[str, Any] = {}

    def __enter__(self) -> "SweepDisplay":
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def _count(self) -> str:
        return f"{self.done}/{self.total}"

    def _where(self) -> str:
        """Where the sweep stands, at the start of each line of a log (never wrapped away)."""
        return f"[{self._count()} done, {self._eta()}]"

    def _eta(self) -> str:
        """The runs left times the mean time of a run finished here, `parallel` at a time."""
        left = self.total - self.ended
        if left == 0:
            return "ETA 0s"
        if not self.walls:
            return "ETA ?"
        return f"ETA {_duration(statistics.fmean(self.walls) * math.ceil(left / self.parallel))}"

    def _status_width(self) -> int:
        return max(10, self.console.width - 60)

    def print(self, text: str, unbroken: bool = False) -> None:
        """A line for the log (cut to the width on a terminal), flushed; `unbroken`:
        never cut or folded (a path, to be copied whole)."""
        if unbroken:
            console = self.progress.console if self.progress is not None else self.console
            console.print(text, soft_wrap=True, highlight=False)
            console.file.flush()
        elif self.progress is not None:
            self.progress.console.print(text, overflow="ellipsis", no_wrap=True, crop=True)
        else:
            self.console.print(text, overflow="fold", soft_wrap=False, highlight=False)
            self.console.file.flush()
        self.last_line = time.monotonic()

    def on_start(self, job: Job, resumed: bool) -> None:
        self.running[job.label] = time.monotonic()
        what = "resuming" if resumed else "starting"
        if self.progress is not None:
            self.rows[job.label] = self.progress.add_task(job.label, total=None, count="", eta="", status=what)
            self.progress.update(self.overall, status=f"{len(self.running)} running")
        else:
            self.print(f"{self._where()} {what} {job.label}")

    def on_poll(self, running: Sequence[Job]) -> None:
        if self.progress is not None:
            for job in running:
                if job.label in self.rows:
                    last = (_log_lines(job.log, 1) or [""])[0]
                    self.progress.update(self.rows[job.label], status=escape(_cut(last, self._status_width())))
        elif time.monotonic() - self.last_line >= self.interval_s:
            now = time.monotonic()
            runs = ", ".join(f"{j.label} {_duration(now - self.running.get(j.label, now))}" for j in running)
            self.print(f"{self._where()} {len(running)} running" + (f": {runs}" if runs else "")
                       + f"; {_duration(now - self.started)} elapsed")

    def on_finish(self, job: Job) -> None:
        started = self.running.pop(job.label, None)
        took = job.attempts[-1]["wall_s"] if job.attempts else (time.monotonic() - started if started else 0.0)
        self.ended += 1
        if job.status == "done":
            self.done += 1
            self.walls.append(took)
        if self.progress is not None:
            if job.label in self.rows:
                self.progress.remove_task(self.rows.pop(job.label))
            self.progress.update(self.overall, completed=self.done, count=self._count(), eta=self._eta(),
                                 status=f"{len(self.running)} running")
        where = "" if self.progress is not None else self._where() + " "
        if job.status == "done":
            metrics = "  ".join(f"{k}={v:.4g}" for k, v in job.metrics.items())
            self.print(f"{where}[green]done[/] {job.label} ({_duration(took)})  {metrics}")
        else:
            colour = "yellow" if job.status == "interrupted" else "red"
            self.print(f"{where}[{colour}]{job.status}[/] {job.label} ({_duration(took)}): "
                       f"{escape(job.error or '')}")
            if job.status == "failed":  # the tail of its log
                for line in _log_lines(job.log, 4):
                    self.print(f"[dim]  | {escape(line)}[/]")
                self.print(f"[dim]  log: {escape(str(job.log))}[/]", unbroken=True)

    def on_stopping(self, running: Sequence[Job]) -> None:
        self.print(f"[yellow]stopping[/]: {len(running)} running run(s) save a checkpoint and stop (Ctrl-C "
                   "again: stop them at once)")

    def on_wait(self, job: Job) -> None:
        self.print(f"waiting: {job.run_dir} is still in use by an earlier run (a killed sweep's, saving its "
                   "checkpoint); it resumes once that ends")


# --- optima sweep CONFIG ---------------------------------------------------------------

def slurm_options(variants_file: str | None, given: Mapping[str, Any]):
    """The Slurm options: the variants file's `[slurm]` table, then the
    command line's `--slurm-*` options (those given)."""
    from optima.slurm import SlurmOptions

    options = SlurmOptions()
    if variants_file:
        table = load_slurm_table(variants_file)
        if table:
            options = SlurmOptions.from_mapping(table, f"{variants_file}: [slurm]")
    given = {k: (tuple(v) if k == "sbatch" and v else v) for k, v in given.items()}
    if not given.get("sbatch"):
        given.pop("sbatch", None)
    return options.updated(**given).checked()


def sweep_command(config: str, variant_args: Sequence[str], variants_file: str | None, seeds: str | None,
                  bindings: Sequence[str], sweep_dir: str | None, jobs: int, threads: int, no_plugins: bool,
                  dry_run: bool, launcher: str = "local", slurm: Mapping[str, Any] | None = None,
                  wait: bool = True) -> int:
    console = Console()
    if jobs < 1 or threads < 1:
        raise ConfigError(f"--jobs and --threads must be >= 1, got {jobs} and {threads}")
    if launcher not in ("local", "slurm"):
        raise ConfigError(f"--launcher {launcher!r}: expected local or slurm")
    variants: list[Variant] = []
    common: tuple[str, ...] = ()
    default_seeds = None
    if variants_file:
        variants_file = _resolve(variants_file)
        variants, common, default_seeds = load_variants_file(variants_file)
    variants += [parse_variant(v) for v in variant_args]
    if not variants:
        variants = [Variant("base")]
    if seeds is not None:
        default_seeds = parse_seeds(seeds)
    sweep_dir = sweep_dir or default_sweep_dir(config)
    sweep = Sweep(config, variants, sweep_dir, (*common, *bindings), default_seeds, no_plugins=no_plugins,
                  config_file=_resolve(config))
    options = None
    if launcher == "slurm":  # every option checked, by Slurm too, before anything is written or submitted
        from optima.slurm import check_with_slurm

        options = slurm_options(variants_file, slurm or {})
        check_with_slurm(options)
    elif any(v for k, v in (slurm or {}).items()):
        given = [f"--slurm-{k.replace('_', '-')}" for k, v in (slurm or {}).items() if v]
        raise ConfigError(f"{', '.join(given)} given with --launcher local; add --launcher slurm")
    todo = sweep.jobs(only_current=True)
    done = sum(j.status == "done" for j in todo)
    where = f"{options.cpus} CPU(s)" + (f", {options.gpus} GPU(s)" if options.gpus else "") + \
        (f" on {options.nodes} nodes" if options.nodes > 1 else "") + " each, as Slurm jobs" if options else \
        f"{jobs} at a time, {threads} torch thread(s) each"
    console.print(f"[bold]sweep of {config}[/]: {len(sweep.variants)} variant(s), {len(todo)} run(s) "
                  f"({done} finished, {len(todo) - done} to run) in {sweep_dir}; {where}")
    if dry_run:
        print_plan(console, sweep, todo)
        return 0
    rerun = f"{program()} sweep ... --sweep-dir {shlex.quote(sweep_dir)}"
    command = "optima sweep " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["sweep"] else sys.argv[1:])
    if options is not None:
        return _sweep_on_slurm(console, sweep, todo, options, threads, command, wait)
    _refuse_if_on_slurm(sweep)
    try:
        with sweep.lock(), SweepDisplay(console, len(todo), done, jobs) as display:
            sweep.save_grid(command)
            jobs_after = run_sweep(sweep, jobs=jobs, threads=threads, observer=display)
    except SweepInterrupted as e:
        console.print(f"[yellow]interrupted[/]: unfinished runs keep their checkpoints; the same command with "
                      f"--sweep-dir resumes them ({rerun})")
        print_results(console, sweep, sweep.jobs())
        return 130 if e.signum == 2 else 143
    return _summary(console, sweep, jobs_after, rerun)


def _summary(console: Console, sweep: Sweep, jobs: Sequence[Job], rerun: str) -> int:
    print_results(console, sweep, jobs)
    failed = [j for j in jobs if j.status in ("failed", "interrupted")]
    if failed:
        console.print(f"[red]{len(failed)} run(s) did not finish[/] (logs beside their run directories); "
                      f"fix and rerun: finished runs are skipped ({rerun})")
        return 1
    return 0


def _refuse_if_on_slurm(sweep: Sweep) -> None:
    from optima.slurm import jobs_file, live_jobs

    if jobs_file(sweep.dir).exists():
        live = live_jobs(sweep.dir)
        if live:
            raise ConfigError(f"{len(live)} run(s) of {sweep.dir} are queued or running in Slurm; wait for them "
                              f"({program()} sweep --status {sweep.dir}) or cancel them ({program()} sweep --cancel "
                              f"{sweep.dir}) before sweeping it here")


def _sweep_on_slurm(console: Console, sweep: Sweep, todo: Sequence[Job], options, threads: int, command: str,
                    wait: bool) -> int:
    from optima import slurm

    with sweep.lock():
        sweep.save_grid(command)
        live = slurm.live_jobs(sweep.dir)
        new = [j for j in todo if j.status != "done" and j.label not in live]
        submitted = slurm.submit(sweep, new, options, threads) if new else {}
    watched = {**{label: job_id for label, (job_id, _) in live.items()
                  if any(j.label == label for j in todo)}, **submitted}
    ids = sorted({i.split("_")[0] for i in submitted.values()}, key=lambda i: int(i) if i.isdigit() else 0)
    console.print(f"submitted {len(submitted)} run(s) to Slurm" + (f" (job {', '.join(ids)})" if ids else "")
                  + (f"; {len(watched) - len(submitted)} already queued or running" if len(watched) > len(submitted)
                     else ""))
    status = f"{program()} sweep --status {shlex.quote(str(sweep.dir))}"
    if not wait or not watched:
        if watched:
            console.print(f"watch them: {status}; stop them: {program()} sweep --cancel {shlex.quote(str(sweep.dir))}")
            return 0
        return _summary(console, sweep, write_results(sweep), f"{program()} sweep ... --sweep-dir {sweep.dir}")
    done = sum(j.status == "done" for j in todo)
    try:
        with SweepDisplay(console, len(todo), done, min(options.array_parallelism, len(watched))) as display:
            jobs_after = watch(sweep, watched, display)
    except KeyboardInterrupt:
        console.print(f"[yellow]stopped watching[/]: the jobs go on in Slurm; {status} shows them, {program()} sweep "
                      f"--cancel {shlex.quote(str(sweep.dir))} stops them")
        return 130
    return _summary(console, sweep, jobs_after, f"{program()} sweep ... --launcher slurm --sweep-dir {sweep.dir}")


def watch(sweep: Sweep, watched: Mapping[str, str], display: SweepObserver, poll_s: float = 2.0) -> list[Job]:
    """Follow the Slurm jobs `watched` ({label: job id}) until each has left
    the queue, telling `display` as they start and end; the grid's jobs after."""
    from optima import slurm

    by_label = {j.label: j for j in sweep.jobs()}
    left, started = dict(watched), set()
    while left:
        states = slurm.queue_states(list(left.values()))
        for label, job_id in list(left.items()):
            job = by_label[label]
            state = states.get(job_id)
            if state == "RUNNING" and label not in started:
                started.add(label)
                display.on_start(job, (job.run_dir / "config.gin").exists())
            elif state not in slurm.LIVE_STATES:
                del left[label]
                refresh(job)
                _explain_end(sweep, job, job_id)
                display.on_finish(job)
        display.on_poll([by_label[label] for label in left if label in started])
        if left:
            time.sleep(poll_s)
    return write_results(sweep)


def _explain_end(sweep: Sweep, job: Job, job_id: str) -> None:
    """A job that left the queue without recording its attempt (cancelled
    before it ran, killed at its time limit, out of memory...) gets an error."""
    from optima import slurm

    recorded = bool(job.attempts) and job.attempts[-1].get("slurm_job") == job_id
    if job.status == "done" or recorded:
        return
    state = slurm.ended_state(sweep.dir, job_id)
    job.status = "failed" if state in ("FAILED", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL") else "interrupted"
    job.error = (f"Slurm job {job_id} ended ({state or 'cancelled, timed out or killed'}) before its run "
                 "recorded how it ended; rerun the sweep to resume it")


def print_plan(console: Console, sweep: Sweep, jobs: Sequence[Job]) -> None:
    table = Table(title="runs")
    for col in ("run", "status", "command"):
        table.add_column(col)
    for j in jobs:
        cmd = sweep.command(j)
        table.add_row(j.label, j.status, f"{program()} " + shlex.join(cmd[3:]))
    console.print(table)


def print_results(console: Console, sweep: Sweep, jobs: Sequence[Job]) -> None:
    from optima import paired

    variants = [v.name for v in sweep.grid]
    for metric, per_variant in summarize(jobs).items():
        if metric.startswith("teacher/"):  # one teacher per seed, shared by the variants: results.md
            continue
        ref = paired.reference_variant([v for v in variants if v in per_variant])
        versus = paired.compare_all(per_seed(jobs, metric), ref, metric)
        table = Table(title=f"{metric} over seeds")
        for col in ("variant", "median", "mean", "std", "n", f"vs {ref}"):
            table.add_column(col, justify="left" if col in ("variant", f"vs {ref}") else "right")
        for v in sweep.grid:
            if v.name in per_variant:
                s = per_variant[v.name]
                p = versus.get(v.name)
                table.add_row(v.name, f"{s.median:.4f}", f"{s.mean:.4f}", "" if s.n < 2 else f"{s.std:.4f}",
                              str(s.n), "reference" if v.name == ref else f"{p.mean:+.4f} {p.verdict}" if p else "")
        console.print(table)
    console.print(f"vs: the mean of the per-seed differences; better/worse/tie by its 95% bootstrap interval. "
                  f"results: {sweep.dir}/results.csv, "
                  f"{sweep.dir}/results.md (figures: {program()} report {sweep.dir}; HParams: {program('tensorboard')} --logdir "
                  f"{sweep.dir}/tensorboard)")


# --- optima sweep --status / --cancel SWEEP_DIR ------------------------------------------

def status_command(sweep_dir: str) -> int:
    """Each run's state (queued and running from Slurm's queue, the rest from
    the run directories), with its Slurm job and its error; results rewritten."""
    from optima import slurm

    console = Console()
    sweep = Sweep.load(sweep_dir)
    submitted = slurm.read_jobs(sweep.dir)
    live = slurm.live_jobs(sweep.dir) if submitted else {}
    jobs = write_results(sweep)
    counts: dict[str, int] = {}
    rows = []
    for j in jobs:
        status = j.status
        if j.label in live:
            status = "running" if live[j.label][1] in ("RUNNING", "COMPLETING") else "queued"
        counts[status] = counts.get(status, 0) + 1
        note = j.error or ("" if status in ("done", "pending", "queued") else (_log_lines(j.log, 1) or [""])[0])
        row = [j.label, status]
        if submitted:
            row.append(str(submitted.get(j.label, {}).get("job_id", "")))
        rows.append([*row, _duration(j.wall_s) if j.attempts else "", note])
    headers = ["run", "status", *(["job"] if submitted else []), "time"]
    table = Table(title=f"runs of {sweep_dir}")
    for i, header in enumerate(headers):  # whole, never cut: the error column gives way instead
        table.add_column(header, no_wrap=True, justify="right" if header == "time" else "left",
                         min_width=max([len(header), *(len(r[i]) for r in rows)]))
    table.add_column("error or last line", overflow="ellipsis", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"{len(jobs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f". results: "
                  f"{sweep.dir}/results.csv")
    return 0


def cancel_command(sweep_dir: str) -> int:
    from optima import slurm

    console = Console()
    Sweep.load(sweep_dir)  # a sweep directory
    if not slurm.jobs_file(Path(sweep_dir)).exists():
        raise ConfigError(f"{sweep_dir} has no Slurm jobs (it was swept with --launcher local: Ctrl-C stops it)")
    cancelled = slurm.cancel(Path(sweep_dir))
    if not cancelled:
        console.print(f"no run of {sweep_dir} is queued or running in Slurm")
        return 0
    console.print(f"cancelled {len(cancelled)} Slurm job(s): " + ", ".join(f"{label} ({job_id})"
                                                                            for label, job_id in cancelled))
    console.print("running runs save a checkpoint and stop; rerunning the sweep resumes them")
    return 0
