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
        self.status: dict[str, str] = {}

    def on_stage(self, stage, total, unit):
        self.tasks[stage] = self.progress.add_task(stage, total=total, status="")

    def on_step(self, stage, step, losses, lr):
        text = self.status.get(stage, "") + " ".join(f"{k}={v:.3g}" for k, v in losses.items())
        self.progress.update(self.tasks[stage], completed=step, status=text)

    def on_round(self, stage, result):
        reward = "-" if result.reward is None else f"{result.reward:.3f}"
        self.status[stage] = f"round {result.round} arm {result.arm_label} reward {reward} | "
        if not self.progress.console.is_terminal:  # no live bar in logs: one line per round
            losses = " ".join(f"{k}={v:.4g}" for k, v in result.totals.items())
            self.progress.console.print(f"{stage}: {self.status[stage]}round losses {losses}")

    def on_message(self, text):
        self.progress.console.print(text)


def default_run_dir(config: str) -> str:
    return os.path.join("runs", f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_run_dir(run_dir: str) -> None:
    """Never overwrite an earlier run: its logs and weights stay as they were."""
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise ConfigError(f"run directory {run_dir} already holds files; pass another --run-dir")
    os.makedirs(run_dir, exist_ok=True)


def run_command(config: str, bindings: Sequence[str], run_dir: str | None, external_plugins: bool | None,
                dry_run: bool = False) -> dict:
    import gin

    from optima import config as cfg
    from optima.experiment import experiment

    registry = cfg.setup(external_plugins)
    for name, error in registry.failures.items():
        console.print(f"[yellow]warning:[/] plugin {name!r} failed to load and is skipped: {error}")
    cfg.parse([config], bindings)
    if dry_run:
        try:
            plan = experiment(None, dry_run=True)
        except Exception as e:
            raise cfg.translate_call_error(e) from None
        print_plan(plan, config)
        return plan
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
    for stage, info in summary["stages"].items():
        if "plays" not in info:
            continue
        plays = Table(title=f"{stage}: arm plays" + (" (cached stage)" if info.get("cached") else ""))
        plays.add_column("arm")
        plays.add_column("rounds", justify="right")
        for k, label in enumerate(info["arms"]):
            plays.add_row(label, str(info["plays"].count(k)))
        console.print(plays)
    console.print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir}/tensorboard)")


def print_plan(plan: dict, config: str) -> None:
    console.print(f"[bold]dry run of {config}[/]: task {plan['task']}")
    models = Table(title="models (built on the meta device)")
    for col in ("model", "params (M)", "module", "layers", "width", "module params (M)"):
        models.add_column(col, justify="left" if col in ("model", "module") else "right")
    for name, m in plan["models"].items():
        for i, (mod, info) in enumerate(m["modules"].items()):
            models.add_row(name if i == 0 else "", f"{m['params_M']:.1f}" if i == 0 else "", mod,
                           str(info["layers"]), str(info["width"]), f"{info['params_M']:.1f}")
    console.print(models)
    stages = Table(title="stages")
    for col in ("stage", "from", "steps", "rounds x T", "policy", "reward"):
        stages.add_column(col)
    for name, s in plan["stages"].items():
        if s["kind"] == "fine-tune":
            stages.add_row(name, "task", str(s["steps"]), "", "", "")
        else:
            stages.add_row(name, s["teacher"], str(s["steps"]), f"{s['rounds']} x {s['steps_per_round']}",
                           s["policy"], s["reward"])
    console.print(stages)
    for name, s in plan["stages"].items():
        if s["kind"] == "distill":
            console.print(f"{name}: {len(s['arms'])} arms: {', '.join(s['arms'])}")
            for module, teacher_layers in s["layer_map"].items():
                console.print(f"{name}: layer map {module}: student layer i -> {s['teacher']} layer "
                              f"{teacher_layers} (0-based)")
    for name, m in plan["models"].items():
        for what, c in m["checkpoints"].items():
            state = "[green]exists[/]" if c["exists"] else "[red]missing[/]"
            console.print(f"{name} {what}: {c['path']} {state}")
    if plan["missing_data"]:
        for p in plan["missing_data"]:
            console.print(f"data: {p} [red]missing[/]")
    else:
        console.print("data: all present")
