"""The `optima` command. Heavy imports (torch, open_clip) happen inside commands,
so `optima --help` answers at once."""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional

import typer

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False,
                  help="OPTIMA: module-wise adaptive distillation of multimodal models, declared in gin.")


@app.callback()
def _root() -> None:
    """OPTIMA: module-wise adaptive distillation of multimodal models, declared in gin."""


@contextlib.contextmanager
def user_errors():
    """A user error becomes one line on stderr and its exit code (2 for config
    errors); OPTIMA_DEBUG=1 shows the traceback instead."""
    from optima.errors import OptimaError

    try:
        yield
    except OptimaError as e:
        if os.environ.get("OPTIMA_DEBUG"):
            raise
        # gin appends "In call to configurable ..." lines; the first line is the message
        rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
        who = "optima" if rank == "0" else f"optima (rank {rank})"  # torchrun: every process reports
        typer.echo(f"{who}: error: {str(e).splitlines()[0]}", err=True)
        raise typer.Exit(e.exit_code) from None


@app.command()
def run(
    config: str = typer.Argument(..., help="Experiment gin file, e.g. gin/quickstart.gin."),
    binding: Optional[List[str]] = typer.Option(
        None, "--binding", "-b", help="Extra gin binding, repeatable: -b 'distillation.reward = @kd_reward()'."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Where logs go (default runs/<config>-<time>)."),
    no_plugins: bool = typer.Option(False, "--no-plugins", help="Load built-in plugins only."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Resolve the pipeline and print the plan; train nothing."),
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="RUN_DIR",
        help="Continue the run in RUN_DIR from its last checkpoints (same file and bindings as that run)."),
    force: bool = typer.Option(False, "--force", help="With --resume: continue even if bindings differ."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1,
        help="Torch threads (experiment.threads; default: OMP_NUM_THREADS if set, else 1, the fastest for the "
             "shipped CPU configs)."),
) -> None:
    """Run the experiment a gin file declares; SIGINT/SIGTERM save a checkpoint first."""
    with user_errors():
        from optima.cli.run import run_command

        run_command(config, binding or [], run_dir, external_plugins=False if no_plugins else None,
                    dry_run=dry_run, resume=resume, force=force, threads=threads)


@app.command()
def export(
    run_dir: str = typer.Argument(..., help="A finished run directory (it has metrics.json)."),
    out: str = typer.Option(..., "--out", help="New (or empty) folder to write the export to."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Stage to export (default: the run's last student)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in its library (default: <run>-<stage>)."),
    no_card: bool = typer.Option(False, "--no-card", help="Skip MODEL_CARD.md (and its latency measurement)."),
    no_plugins: bool = typer.Option(False, "--no-plugins", help="Load built-in plugins only."),
) -> None:
    """Export a run's student for use without OPTIMA (CoCa: an open_clip model), its head and a model card."""
    with user_errors():
        from optima.cli.export import export_command

        export_command(run_dir, out, stage, name, card=not no_card, external_plugins=False if no_plugins else None)


@app.command(name="eval")
def eval_(
    config: str = typer.Argument(..., help="Experiment gin file that builds the network, e.g. gin/quickstart.gin."),
    checkpoint: str = typer.Option(
        ..., "--checkpoint", help="A run directory, a stage's .safetensors (a run's or a cached teacher) or an "
                                  "`optima export` folder."),
    stage: Optional[str] = typer.Option(
        None, "--stage", help="Which network the checkpoint is (teacher or a student stage; default: from its name)."),
    split: str = typer.Option("test", "--split", help="Split to evaluate: val or test."),
    binding: Optional[List[str]] = typer.Option(None, "--binding", "-b", help="Extra gin binding, repeatable."),
    out: Optional[str] = typer.Option(
        None, "--out", help="New folder for metrics.json and the predictions (default runs/eval-<stage>-<split>-<time>)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or auto (default: experiment.device)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default: experiment.eval_batch_size."),
    no_plugins: bool = typer.Option(False, "--no-plugins", help="Load built-in plugins only."),
) -> None:
    """Evaluate a saved teacher or student on a task's split; write metrics.json and the predictions."""
    with user_errors():
        from optima.cli.eval import eval_command

        eval_command(config, checkpoint, stage=stage, split=split, bindings=binding or [], out=out, device=device,
                     batch_size=batch_size, external_plugins=False if no_plugins else None)


@app.command()
def plugins(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    no_plugins: bool = typer.Option(False, "--no-plugins", help="Load built-in plugins only."),
) -> None:
    """List plugins (version, hooks) and the components they register; exit 2 if one is malformed."""
    with user_errors():
        from optima.cli.plugins import plugins_command

        code = plugins_command(as_json, external=False if no_plugins else None)
    raise typer.Exit(code)


@app.command()
def sweep(
    config: Optional[str] = typer.Argument(
        None, metavar="CONFIG|SWEEP_DIR",
        help="Experiment gin file (a path or package:path), e.g. gin/quickstart.gin; with --status or --cancel "
             "the sweep directory."),
    variant: Optional[List[str]] = typer.Option(
        None, "--variant", metavar="NAME='BINDING; BINDING'",
        help="A variant: its name and gin bindings, repeatable: --variant layerwise='distillation.policy = "
             "@layerwise_policy' (no bindings: the config as it is)."),
    variants: Optional[str] = typer.Option(
        None, "--variants", metavar="FILE.toml",
        help="A TOML file of variants (a path or package:path; docs/sweeps.md)."),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="Seeds of the variants that do not set their own, e.g. 0,1,2 (default: the "
                              "variants file's, else 0)."),
    binding: Optional[List[str]] = typer.Option(
        None, "--binding", "-b", help="A gin binding for every run, repeatable (before the variant's)."),
    sweep_dir: Optional[str] = typer.Option(
        None, "--sweep-dir", help="Where the runs go (default sweeps/<config>-<time>); pass it again to resume."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Local launcher: runs at a time (each an `optima run` process)."),
    threads: int = typer.Option(1, "--threads", help="Torch threads per run (OMP_NUM_THREADS)."),
    no_plugins: bool = typer.Option(False, "--no-plugins", help="Runs load built-in plugins only."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs, their status and commands; run nothing."),
    launcher: str = typer.Option("local", "--launcher", help="local (subprocesses here) or slurm (a job per run)."),
    slurm_partition: Optional[str] = typer.Option(None, "--slurm-partition", help="Slurm: the partition."),
    slurm_time: Optional[str] = typer.Option(
        None, "--slurm-time", help="Slurm: time limit of a run, e.g. 90 (minutes), 4:00:00, 1-12:00:00 (default 60)."),
    slurm_gpus: Optional[int] = typer.Option(
        None, "--slurm-gpus", help="Slurm: GPUs per node of a run (> 1: torchrun, a process per GPU; default 0)."),
    slurm_cpus: Optional[int] = typer.Option(None, "--slurm-cpus", help="Slurm: CPUs per node of a run (default 1)."),
    slurm_nodes: Optional[int] = typer.Option(
        None, "--slurm-nodes", help="Slurm: nodes per run (> 1: torchrun on each, through srun; default 1)."),
    slurm_sbatch: Optional[List[str]] = typer.Option(
        None, "--slurm-sbatch", metavar="--OPTION=VALUE",
        help="Slurm: a further #SBATCH line, repeatable: --slurm-sbatch=--account=proj --slurm-sbatch=--qos=high."),
    slurm_array_parallelism: Optional[int] = typer.Option(
        None, "--slurm-array-parallelism", help="Slurm: runs (array tasks) running at once (default 64)."),
    slurm_signal: Optional[int] = typer.Option(
        None, "--slurm-signal", metavar="SECONDS",
        help="Slurm: SIGTERM this long before the time limit, to save a checkpoint (default 120)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Slurm: submit and return (watch with --status)."),
    status: bool = typer.Option(False, "--status", help="Show each run of SWEEP_DIR: queued, running, done, "
                                                        "failed, with Slurm job ids; rewrite its results."),
    cancel: bool = typer.Option(False, "--cancel", help="Cancel SWEEP_DIR's queued and running Slurm jobs "
                                                        "(running runs save a checkpoint; a rerun resumes them)."),
) -> None:
    """Run variants x seeds of a config, each run in SWEEP_DIR/<variant>/seed-<k>/ (finished runs are
    skipped, interrupted ones resumed), here or on Slurm; write results.csv, results.md and TensorBoard
    HParams entries."""
    with user_errors():
        from optima.cli.sweep import cancel_command, status_command, sweep_command
        from optima.errors import ConfigError

        if status or cancel:
            target = config or sweep_dir
            if target is None or (status and cancel):
                raise ConfigError("usage: optima sweep --status SWEEP_DIR, or optima sweep --cancel SWEEP_DIR")
            raise typer.Exit(status_command(target) if status else cancel_command(target))
        if config is None:
            raise ConfigError("optima sweep needs a CONFIG (a gin file), e.g. optima sweep gin/quickstart.gin "
                              "--variants gin/sweeps/baselines.toml")
        slurm = {"partition": slurm_partition, "time": slurm_time, "gpus": slurm_gpus, "cpus": slurm_cpus,
                 "nodes": slurm_nodes, "sbatch": slurm_sbatch, "array_parallelism": slurm_array_parallelism,
                 "signal_s": slurm_signal}
        code = sweep_command(config, variant or [], variants, seeds, binding or [], sweep_dir, jobs, threads,
                             no_plugins, dry_run, launcher=launcher, slurm=slurm, wait=not no_wait)
    raise typer.Exit(code)


@app.command()
def report(
    path: str = typer.Argument(..., metavar="RUN_DIR|SWEEP_DIR", help="A run directory or a sweep directory."),
) -> None:
    """Write the figures of a run (each arm's estimated mean reward and share of plays over rounds) or of a sweep
    (each variant's metric over seeds, and the arms of each variant) as PNGs in <dir>/figures/ and as
    TensorBoard images."""
    with user_errors():
        from optima.cli.report import report_command

        report_command(path)


@app.command()
def compare(
    a: str = typer.Argument(..., metavar="A", help="A finished run directory or a sweep directory."),
    b: str = typer.Argument(..., metavar="B", help="Another one, compared with A."),
) -> None:
    """Two runs or sweeps side by side: each test metric (a sweep's: median over seeds) and each arm's share of
    the plays, A, B and B - A (sweeps: variant by variant)."""
    with user_errors():
        from optima.cli.compare import compare_command

        compare_command(a, b)


@app.command()
def bandit(
    config: Optional[str] = typer.Argument(
        None, help="gin file of policies and environments (default gin/bandit/default.gin)."),
    binding: Optional[List[str]] = typer.Option(
        None, "--binding", "-b", help="Extra gin binding, repeatable: -b 'discounted_ts_policy.gamma = 0.99'."),
    policy: Optional[List[str]] = typer.Option(
        None, "--policy", "-p",
        help="Policy gin name, repeatable (replaces bandit.policies): -p optima -p auto/optima."),
    env: Optional[List[str]] = typer.Option(
        None, "--env", "-e", help="Environment, repeatable: abrupt, drift, idle_recovers, optima_scale, replay."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Runs per policy and environment (default 40)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Rounds of every environment (default: its own)."),
    jobs: int = typer.Option(min(2, os.cpu_count() or 1), "--jobs", "-j", help="Worker processes."),
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (default runs/bandit-<time>)."),
    no_plugins: bool = typer.Option(False, "--no-plugins", help="Load built-in plugins only."),
) -> None:
    """Compare bandit policies on simulated environments: regret table and curves (PNG)."""
    with user_errors():
        from optima.cli.bandit import bandit_command

        bandit_command(config, binding or [], policy or [], env or [], seeds, rounds, jobs, out,
                       external_plugins=False if no_plugins else None)


data_app = typer.Typer(no_args_is_help=True, help="Data sets: synthesize official-format data to check a setup.")
app.add_typer(data_app, name="data")


@data_app.command()
def synth(
    task: str = typer.Argument(..., help="snlive, vqa, nlvr2 or coco (the prefixes of the paper's gin files)."),
    out: str = typer.Option(..., "--out", help="New (or empty) folder to write the data set to."),
    size: int = typer.Option(..., "--size", help="Training examples."),
    image_size: int = typer.Option(224, "--image-size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="The world's seed: the same seed gives the same files."),
    eval_size: Optional[int] = typer.Option(
        None, "--eval-size", help="Examples in each evaluation split (default: size // 5, at least 1)."),
) -> None:
    """Render the synthetic world into TASK's official file layout and formats (JPEG/PNG images, the
    annotation files the real loaders read), so the paper's configs run end to end before any download."""
    with user_errors():
        from optima.cli.data import synth_command

        synth_command(task, out, size, image_size, seed, eval_size)


def main() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        app()
        return
    # Under torchrun a run's models (DDP and its gloo process group) end as cyclic
    # garbage, kept alive by the exit's exception chain (a stopped run's frames).
    # Freed in the interpreter's teardown, gloo's threads can abort the process
    # (SIGABRT instead of the run's exit code): free them while it is alive.
    try:
        app()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    import gc

    gc.collect()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
