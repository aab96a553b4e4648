"""`optima eval`: a saved teacher or student (a run's, a cached teacher, or an
export) on a task's split with the task's metric; writes `metrics.json` and the
predictions in the task's official format."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from optima.errors import ConfigError

console = Console()
SPLITS = ("val", "test")


def default_out(stage: str, split: str) -> str:
    return os.path.join("runs", f"eval-{stage}-{split}-{time.strftime('%Y%m%d-%H%M%S')}")


def eval_command(config: str, checkpoint: str, *, stage: str | None, split: str, bindings: Sequence[str],
                 out: str | None, device: str | None, batch_size: int | None,
                 external_plugins: bool | None = None) -> dict:
    from optima import config as cfg
    from optima import predictions as preds
    from optima.checkpoint import write_text_atomic
    from optima.engine import evaluate
    from optima.experiment import resolve_device
    from optima.export import infer_stage, load_network_weights, read_run

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: evaluate on one of {', '.join(SPLITS)}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if not os.path.exists(checkpoint):
        raise ConfigError(f"--checkpoint {checkpoint}: no such file or folder")
    registry = cfg.setup(external_plugins)
    for name, error in registry.failures.items():
        console.print(f"[yellow]warning:[/] plugin {name!r} failed to load and is skipped: {error}")
    cfg.parse([config], [*bindings, *([f"experiment.device = {device!r}"] if device else [])])
    spec = cfg.declared()
    pretrained = None
    if Path(checkpoint, "metrics.json").is_file() or Path(checkpoint, "config.gin").is_file():  # a run directory
        run = read_run(checkpoint)
        stage = run.check_stage(stage)
        weights, pretrained = run.weights(stage), run.pretrained
    else:
        stage = stage or infer_stage(checkpoint, spec.stage_names())
        if stage is None:
            raise ConfigError(f"--checkpoint {checkpoint}: which network is it? pass --stage "
                              f"({', '.join(spec.stage_names())})")
        weights = checkpoint
    if stage not in spec.stage_names():
        raise ConfigError(f"--stage {stage!r}: {config} declares the stages {', '.join(spec.stage_names())}")
    out = out or default_out(stage, split)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {out} already exists and is not empty; pass another --out")

    dev = resolve_device(spec.device)
    task = spec.task()
    network = spec.network(stage, task, dev, pretrained, complete=weights is not None)
    if weights is not None:
        load_network_weights(network, weights)
    bs = batch_size or spec.eval_batch_size
    size = getattr(task, "size", None)
    total = math.ceil(size(split) / bs) if callable(size) else None
    records = [] if task.predictions_file else None
    columns = (TextColumn(f"[bold]eval {stage} on {split}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("eval", total=total)
        metrics = evaluate(network, task, split, bs, dev, predictions=records,
                           on_batch=lambda: progress.advance(bar))
    result = {"config": config, "bindings": list(bindings), "checkpoint": checkpoint, "weights": weights,
              "stage": stage, "split": split, "device": str(dev), "batch_size": bs, "metrics": metrics}
    if records is not None:
        result["predictions"] = task.predictions_file
        preds.write(records, os.path.join(out, task.predictions_file))
    write_text_atomic(os.path.join(out, "metrics.json"), json.dumps(result, indent=1))
    console.print(f"{checkpoint}: {stage} on the {split} split")
    table = Table()
    for k in metrics:
        table.add_column(k, justify="right")
    table.add_row(*(f"{v:.4f}" for v in metrics.values()))
    console.print(table)
    console.print(f"wrote {os.path.join(out, 'metrics.json')}"
                  + (f" and {os.path.join(out, task.predictions_file)}" if records is not None else ""))
    return result
