"""`optima sweep`: variants x seeds of one config, each run an `optima run`
subprocess; rich progress, then the results table (`optima.sweep` does the work)."""
from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from optima.errors import ConfigError
from optima.sweep import (Job, Sweep, SweepInterrupted, SweepObserver, Variant, compare, load_variants_file,
                          parse_seeds, parse_variant, run_sweep, summarize)

console = Console()
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def default_sweep_dir(config: str) -> str:
    return os.path.join("sweeps", f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def _last_line(log: Path) -> str:
    """The last line the run printed (its progress), for the live display."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [ANSI.sub("", ln).strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    return lines[-1][:90] if lines else ""


class RichSweepObserver(SweepObserver):
    """A bar for the sweep, a row per running run with its last log line, a line per finished run."""

    def __init__(self, progress: Progress, total: int, done: int):
        self.progress = progress
        self.overall = progress.add_task("runs", total=total, completed=done, status="")
        self.rows: dict[str, int] = {}

    def on_start(self, job: Job, resumed: bool) -> None:
        what = "resuming" if resumed else "starting"
        self.rows[job.label] = self.progress.add_task(job.label, total=None, status=what)

    def on_poll(self, running: Sequence[Job]) -> None:
        for job in running:
            self.progress.update(self.rows[job.label], status=_last_line(job.log))

    def on_finish(self, job: Job) -> None:
        self.progress.remove_task(self.rows.pop(job.label))
        took = _duration(job.attempts[-1]["wall_s"]) if job.attempts else ""
        if job.status == "done":
            self.progress.advance(self.overall)
            metrics = "  ".join(f"{k}={v:.4g}" for k, v in job.metrics.items())
            self.progress.console.print(f"[green]done[/] {job.label} ({took})  {metrics}")
        else:
            colour = "yellow" if job.status == "interrupted" else "red"
            self.progress.console.print(f"[{colour}]{job.status}[/] {job.label} ({took}): {job.error}  "
                                        f"[dim](log: {job.log})[/]")

    def on_stopping(self, running: Sequence[Job]) -> None:
        self.progress.console.print(f"[yellow]stopping[/]: {len(running)} running run(s) save a checkpoint "
                                    "and stop (Ctrl-C again: stop them at once)")


def sweep_command(config: str, variant_args: Sequence[str], variants_file: str | None, seeds: str | None,
                  bindings: Sequence[str], sweep_dir: str | None, jobs: int, threads: int, no_plugins: bool,
                  dry_run: bool) -> int:
    if jobs < 1 or threads < 1:
        raise ConfigError(f"--jobs and --threads must be >= 1, got {jobs} and {threads}")
    variants: list[Variant] = []
    common: tuple[str, ...] = ()
    default_seeds = None
    if variants_file:
        variants, common, default_seeds = load_variants_file(variants_file)
    variants += [parse_variant(v) for v in variant_args]
    if not variants:
        variants = [Variant("base")]
    if seeds is not None:
        default_seeds = parse_seeds(seeds)
    sweep_dir = sweep_dir or default_sweep_dir(config)
    sweep = Sweep(config, variants, sweep_dir, (*common, *bindings), default_seeds, no_plugins=no_plugins)
    todo = sweep.jobs(only_current=True)
    done = sum(j.status == "done" for j in todo)
    console.print(f"[bold]sweep of {config}[/]: {len(sweep.variants)} variant(s), {len(todo)} run(s) "
                  f"({done} finished, {len(todo) - done} to run) in {sweep_dir}; {jobs} at a time, "
                  f"{threads} torch thread(s) each")
    if dry_run:
        print_plan(sweep, todo)
        return 0
    rerun = f"optima sweep ... --sweep-dir {shlex.quote(sweep_dir)}"
    columns = (TextColumn("[bold]{task.description:<24}"), BarColumn(bar_width=20), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[status]}"))
    try:
        with sweep.lock(), Progress(*columns, console=console, transient=False) as progress:
            sweep.save_grid("optima sweep " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["sweep"] else sys.argv[1:]))
            jobs_after = run_sweep(sweep, jobs=jobs, threads=threads,
                                   observer=RichSweepObserver(progress, len(todo), done))
    except SweepInterrupted as e:
        console.print(f"[yellow]interrupted[/]: unfinished runs keep their checkpoints; the same command with "
                      f"--sweep-dir resumes them ({rerun})")
        print_results(sweep, sweep.jobs())
        return 130 if e.signum == 2 else 143
    print_results(sweep, jobs_after)
    failed = [j for j in jobs_after if j.status in ("failed", "interrupted")]
    if failed:
        console.print(f"[red]{len(failed)} run(s) did not finish[/] (logs beside their run directories); "
                      f"fix and rerun: finished runs are skipped ({rerun})")
        return 1
    return 0


def print_plan(sweep: Sweep, jobs: Sequence[Job]) -> None:
    table = Table(title="runs")
    for col in ("run", "status", "command"):
        table.add_column(col)
    for j in jobs:
        cmd = sweep.command(j)
        table.add_row(j.label, j.status, "optima " + shlex.join(cmd[3:]))
    console.print(table)


def print_results(sweep: Sweep, jobs: Sequence[Job]) -> None:
    for metric, per_variant in summarize(jobs).items():
        ref = next((v.name for v in sweep.grid if v.name in per_variant), None)
        table = Table(title=f"{metric} over seeds")
        for col in ("variant", "median", "mean", "std", "n", f"vs {ref}"):
            table.add_column(col, justify="left" if col in ("variant", f"vs {ref}") else "right")
        for v in sweep.grid:
            if v.name in per_variant:
                s = per_variant[v.name]
                table.add_row(v.name, f"{s.median:.4f}", f"{s.mean:.4f}", "" if s.n < 2 else f"{s.std:.4f}",
                              str(s.n), "reference" if v.name == ref else compare(s, per_variant[ref]))
        console.print(table)
    console.print(f"ties: a difference within the larger std is written 'tie'. results: {sweep.dir}/results.csv, "
                  f"{sweep.dir}/results.md (figures: optima report {sweep.dir})")
