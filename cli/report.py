"""`optima report RUN_DIR|SWEEP_DIR`: the figures of a run or a sweep, as PNGs and
TensorBoard images (`optima.figures`); for a sweep, results.csv and results.md again."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from optima.errors import ConfigError, warning
from optima.program import program

console = Console()


def report_command(path: str) -> list[Path]:
    from optima import figures

    where = Path(path)
    if (where / "sweep.json").exists():
        from optima.sweep import Sweep, write_results

        sweep = Sweep.load(where)
        jobs = write_results(sweep)
        done = sum(j.status == "done" for j in jobs)
        written = figures.write_sweep_figures(sweep)
        console.print(f"sweep {where}: {done} of {len(jobs)} runs finished; results.csv and results.md rewritten")
        tensorboard = where / "tensorboard"
    elif (where / "config.gin").exists():
        if not (where / "rounds").is_dir():
            console.print(warning(f"{where} has no rounds/ (a run made before round logs, or one that stopped "
                                  "before distilling): no figures of arms"), markup=False)
        written = figures.write_run_figures(where)
        tensorboard = where / "tensorboard"
    else:
        raise ConfigError(f"{path}: neither a run directory (config.gin) nor a sweep directory (sweep.json)")
    for p in written:
        console.print(f"wrote {p}")
    if written:
        console.print(f"TensorBoard: {program('tensorboard')} --logdir {tensorboard} (IMAGES, run 'figures')")
    return written
