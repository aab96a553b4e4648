"""`optima run`: parse the gin file, run the experiment with rich progress."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from optima.errors import ConfigError
from optima.reporting import Reporter

console = Console(stderr=False)


class RichReporter(Reporter):
    """One progress bar per stage; the distillation bar shows round, arm, reward, losses."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}
        self.status = ""

    def on_stage(self, stage, total, unit):
        self.tasks[stage] = self.progress.add_task(stage, total=total, status="")

    def on_step(self, stage, step, losses, lr):
        text = self.status if stage == "distill" else ""
        text += " ".join(f"{k}={v:.3g}" for k, v in losses.items())
        self.progress.update(self.tasks[stage], completed=step, status=text)

    def on_round(self, result):
        reward = "-" if result.reward is None else f"{result.reward:.3f}"
        self.status = f"round {result.round} arm {result.arm_label} reward {reward} | "
        if not self.progress.console.is_terminal:  # no live bar in logs: one line per round
            losses = " ".join(f"{k}={v:.4g}" for k, v in result.totals.items())
            self.progress.console.print(f"{self.status}round losses {losses}")

    def on_message(self, text):
        self.progress.console.print(text)


def default_run_dir(config: str) -> str:
    return os.path.join("runs", f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_run_dir(run_dir: str) -> None:
    """Never overwrite an earlier run: its logs and weights stay as they were."""
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise ConfigError(f"run directory {run_dir} already holds files; pass another --run-dir")
    os.makedirs(run_dir, exist_ok=True)


def run_command(config: str, bindings: Sequence[str], run_dir: str | None, external_plugins: bool | None) -> dict:
    import gin

    from optima import config as cfg
    from optima.experiment import experiment

    registry = cfg.setup(external_plugins)
    for name, error in registry.failures.items():
        console.print(f"[yellow]warning:[/] plugin {name!r} failed to load and is skipped: {error}")
    cfg.parse([config], bindings)
    run_dir = run_dir or default_run_dir(config)
    prepare_run_dir(run_dir)
    with open(os.path.join(run_dir, "config.gin"), "w") as f:
        f.write(f"# optima run {config}" + "".join(f" -b {b!r}" for b in bindings) + "\n")
        f.write(gin.config_str())

    columns = (TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        try:
            summary = experiment(run_dir, [RichReporter(progress)])
        except Exception as e:
            raise cfg.translate_call_error(e) from None
    with open(os.path.join(run_dir, "operative_config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    print_summary(summary, run_dir)
    return summary


def print_summary(summary: dict, run_dir: str) -> None:
    table = Table(title="OPTIMA run")
    table.add_column("network")
    table.add_column("params (M)", justify="right")
    metric_names = sorted({k for m in summary["metrics"].values() for k in m})
    for name in metric_names:
        table.add_column(f"test {name}", justify="right")
    for net, metrics in summary["metrics"].items():
        table.add_row(net, f"{summary['params_M'][net]:.2f}", *(f"{metrics[k]:.4f}" for k in metric_names))
    console.print(table)
    plays = Table(title="arm plays")
    plays.add_column("arm")
    plays.add_column("rounds", justify="right")
    for k, label in enumerate(summary["arms"]):
        plays.add_row(label, str(summary["plays"].count(k)))
    console.print(plays)
    console.print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir})")
