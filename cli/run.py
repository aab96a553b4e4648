"""`optima run`: parse the gin file, run the experiment with rich progress;
`--resume RUN_DIR` continues a run from its checkpoints."""
from __future__ import annotations

import contextlib
import errno
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from optima.errors import ConfigError, OptimaError
from optima.program import program

console = Console(stderr=False)


def default_run_dir(config: str) -> str:
    return os.path.join("runs", f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")


LOCK = ".optima.lock"


def _holds_files(run_dir: str) -> bool:
    return os.path.isdir(run_dir) and any(name != LOCK for name in os.listdir(run_dir))


def prepare_run_dir(run_dir: str) -> bool:
    """Never overwrite an earlier run: its logs and weights stay as they were.
    Returns whether the directory was made here."""
    if _holds_files(run_dir):
        resumable = os.path.isfile(os.path.join(run_dir, "config.gin"))
        raise ConfigError(f"run directory {run_dir} already holds files; pass another --run-dir"
                          + (f", or --resume {run_dir} to continue that run" if resumable else ""))
    made = not os.path.isdir(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--run-dir {run_dir}: {_unusable(run_dir, e)}; pass a directory that can be "
                          "written") from None
    return made


def _unusable(run_dir: str, e: OSError) -> str:
    """Why a run directory cannot be made or written, in a user's words."""
    from optima.checkpoint import write_problem

    if os.path.isfile(run_dir):
        return "it is a file, not a directory"
    parent = Path(run_dir).parent
    while parent != parent.parent and not parent.exists():
        parent = parent.parent
    if e.errno == errno.ENOTDIR or parent.is_file():
        return f"{parent} is a file, not a directory"
    return write_problem(e) or str(e)


def discard_refused_run(run_dir: str, made: bool) -> None:
    """A new run refused at its start (e.g. its data turned out empty) leaves no
    run directory behind, so that the same command can simply be run again: when
    it holds nothing but what this command wrote (config.gin, the lock), those go."""
    if not os.path.isdir(run_dir) or set(os.listdir(run_dir)) - {"config.gin", LOCK}:
        return
    for name in ("config.gin", LOCK):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, name))
    if made:
        with contextlib.suppress(OSError):
            os.rmdir(run_dir)


@contextlib.contextmanager
def run_dir_lock(run_dir: str):
    """One process per run directory (an advisory lock, released when the process
    ends, however it ends)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    try:
        fd = os.open(os.path.join(run_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # e.g. a read-only file system
        raise ConfigError(f"--run-dir {run_dir}: {_unusable(run_dir, e)}; pass a directory that can be "
                          "written") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"run directory {run_dir} is in use by another optima process") from None
        yield
    finally:
        os.close(fd)


def check_resume(run_dir: str, config_text: str, force: bool) -> list[str]:
    """The bindings in which `config_text` differs from the run's `config.gin`
    (operational ones, such as checkpoint_every, may differ); refused unless `force`."""
    from optima.checkpoint import config_differences

    stored = os.path.join(run_dir, "config.gin")
    if not os.path.isfile(stored):
        raise ConfigError(f"--resume {run_dir}: not a run directory (it has no config.gin); "
                          "start a new run with --run-dir")
    with open(stored, encoding="utf-8") as f:
        differences = config_differences(f.read(), config_text)
    if differences and not force:
        raise ConfigError(f"--resume {run_dir}: the config differs from the run's in {len(differences)} "
                          f"binding(s): {'; '.join(differences)}; pass the same file and bindings, "
                          "or add --force to resume with these")
    return differences


def _quote(text: str) -> str:
    """Shell quoting that reads well for gin bindings: "a = 'x'" rather than shlex's
    'a = '"'"'x'"'"''."""
    quoted = shlex.quote(text)
    if quoted != text and "'" in text and not any(c in text for c in '"$`\\!'):
        return f'"{text}"'
    return quoted


def command_line(config: str, bindings: Sequence[str], *extra: str) -> str:
    """The `optima run` command line of `config` and `bindings`, then `extra`."""
    return " ".join([f"{program()} run", _quote(config), *(f"-b {_quote(b)}" for b in bindings), *extra])


class _Stopped(OptimaError):
    """A resumable failure, its message completed with how to resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_command(config: str, bindings: Sequence[str], run_dir: str | None, external_plugins: bool | None,
                dry_run: bool = False, resume: str | None = None, force: bool = False,
                threads: int | None = None) -> dict:
    """Run (or resume) the experiment of `config`. Under torchrun every process
    runs this: rank 0 prepares the run directory and reports, every rank trains
    its shard (`optima.distributed`). `threads`: torch's thread count
    (`--threads`, bound as `experiment.threads`)."""
    from optima import distributed

    several = distributed.init()
    options = ["--threads", str(threads)] if threads is not None else []
    try:
        return _run_command(config, bindings, run_dir, external_plugins, dry_run, resume, force, options)
    finally:
        if several:
            # The run is over (checkpoints written). torchrun sends SIGTERM to the ranks
            # still running when one has exited: it must not cut their report short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            distributed.shutdown()


def _run_command(config: str, bindings: Sequence[str], run_dir: str | None, external_plugins: bool | None,
                 dry_run: bool, resume: str | None, force: bool, options: Sequence[str] = ()) -> dict:
    import gin

    from optima import config as cfg
    from optima import distributed
    from optima.experiment import experiment
    from optima.plan import missing_files
    from optima.validation import check_component_bindings

    if force and not resume:
        raise ConfigError("--force only applies with --resume RUN_DIR")
    if resume and run_dir and os.path.abspath(run_dir) != os.path.abspath(resume):
        raise ConfigError("pass either --run-dir (a new run) or --resume RUN_DIR (continue one), not both")
    registry = cfg.setup(external_plugins)
    for line in registry.warning_lines() if distributed.is_main() else ():  # a broken package is skipped
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    # --threads N is the binding experiment.threads = N, after the user's
    threads = dict(zip(options[::2], options[1::2])).get("--threads")
    cfg.parse([config], [*bindings, *([f"experiment.threads = {threads}"] if threads else [])])
    # before gin calls anything: a component bound called where the engine calls it fails inside gin
    check_component_bindings()
    if dry_run:
        try:
            plan = experiment(None, dry_run=True)
        except Exception as e:
            raise cfg.translate_call_error(e) from None
        if distributed.is_main():
            print_plan(plan, config)
        missing = missing_files(plan)
        if missing:  # nothing to run with: the dry run says so in its exit code
            raise ConfigError(f"{len(missing)} file(s) the run needs are missing (listed above with where each "
                              "comes from); put them in place or bind other paths")
        return plan
    try:  # every binding is checked before anything is written or trained
        experiment(None, validate_only=True)
    except Exception as e:
        raise cfg.translate_call_error(e) from None
    config_text = gin.config_str()
    header = f"# optima run {config}" + "".join(f" -b {b!r}" for b in bindings) + "\n"
    if not distributed.is_main():  # rank 0 prepares the run directory: wait for its word
        word = distributed.broadcast_object(None)
        if isinstance(word, dict):
            raise ConfigError(word["refused"])
        return _run(config, bindings, word, options)
    told = False

    def go(directory: str) -> str:
        nonlocal told
        distributed.broadcast_object(directory)
        told = True
        return directory

    try:
        return _prepare_and_run(config, bindings, run_dir, resume, force, config_text, header, go, options)
    except BaseException as e:
        if not told:  # the other ranks are waiting: they stop with this message
            distributed.broadcast_object({"refused": str(e).splitlines()[0] if str(e) else type(e).__name__})
        raise


def _prepare_and_run(config: str, bindings: Sequence[str], run_dir: str | None, resume: str | None, force: bool,
                     config_text: str, header: str, go, options: Sequence[str] = ()) -> dict:
    """Rank 0's part of `run_command`: refuse or prepare the run directory, then
    `go(run_dir)` (the other ranks start) and run."""
    from optima.checkpoint import CheckpointManager, write_text_atomic

    if resume:
        run_dir = resume
        check_resume(run_dir, config_text, force)
    else:
        run_dir = run_dir or default_run_dir(config)
        made = prepare_run_dir(run_dir)
    with run_dir_lock(run_dir):
        config_path = os.path.join(run_dir, "config.gin")
        if not resume:
            if _holds_files(run_dir):  # another process got here first
                raise ConfigError(f"run directory {run_dir} already holds files; pass another --run-dir")
            write_text_atomic(config_path, header + config_text)
            try:
                return _run(config, bindings, go(run_dir), options)
            except ConfigError:
                discard_refused_run(run_dir, made)
                raise
        differences = check_resume(run_dir, config_text, force)
        if not differences:
            console.print(f"resuming {run_dir}")
            return _run(config, bindings, go(run_dir), options)
        # forced: the run goes on with the new config, the old one is kept beside it
        console.print(f"resuming {run_dir} with changed bindings (--force): {'; '.join(differences)}")
        backup = os.path.join(run_dir, f"config.before-{time.strftime('%Y%m%d-%H%M%S')}.gin")
        os.replace(config_path, backup)
        write_text_atomic(config_path, header.rstrip("\n") + f" --resume {run_dir} --force\n" + config_text)
        saves = CheckpointManager.saves
        try:
            return _run(config, bindings, go(run_dir), options)
        except ConfigError:
            if CheckpointManager.saves == saves:  # refused before it saved anything: leave the run as it was
                os.replace(backup, config_path)
            raise


def _run(config: str, bindings: Sequence[str], run_dir: str, options: Sequence[str] = ()) -> dict:
    import gin

    from optima import config as cfg
    from optima.cli.progress import LiveReporter, PlainReporter, RunClock, StageProgress
    from optima.plan import stage_outline
    from optima import distributed
    from optima.checkpoint import write_text_atomic
    from optima.experiment import experiment

    if not distributed.is_main():  # the other ranks train and stay quiet
        try:
            return experiment(run_dir, [])
        except Exception as e:
            raise cfg.translate_call_error(e) from None

    run_clock = RunClock(stage_outline())
    header = f"{run_dir}: {run_clock.stages} stage(s) to train or reuse: " \
        + ", ".join(f"{name} ({steps} steps)" for name, steps in run_clock.outline)
    with contextlib.ExitStack() as live:
        if console.is_terminal:
            reporter = LiveReporter(live.enter_context(StageProgress(console, run_clock)), run_clock, header=header)
        else:  # a pipe or a log: flushed lines
            reporter = PlainReporter(console.file, run_clock, header=header)
        try:
            summary = experiment(run_dir, [reporter])
        except Exception as e:
            error = cfg.translate_call_error(e)
            if isinstance(error, OptimaError) and getattr(error, "resumable", False):
                extra = [f"-b {_quote(b)}" for b in getattr(error, "resume_bindings", ())]
                message = f"{str(error).splitlines()[0]}; resume with: " \
                          f"{command_line(config, bindings, *extra, *options, '--resume', _quote(run_dir))}"
                raise _Stopped(message, error.exit_code) from e
            raise error from None
    write_text_atomic(os.path.join(run_dir, "operative_config.gin"), gin.operative_config_str())
    print_summary(summary, run_dir)
    return summary


def print_summary(summary: dict, run_dir: str) -> None:
    table = Table(title="OPTIMA run")
    table.add_column("network")
    table.add_column("params", justify="right")
    metric_names = sorted({k for m in summary["metrics"].values() for k in m})
    for name in metric_names:
        table.add_column(f"test {name}", justify="right")
    for net, metrics in summary["metrics"].items():
        table.add_row(net, count_text(summary['params_M'][net] * 1e6), *(f"{metrics[k]:.4f}" for k in metric_names))
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
    if summary.get("skipped_records"):
        console.print(f"{len(summary['skipped_records'])} damaged file(s): their records were skipped "
                      "(named in the warnings above and in metrics.json)", soft_wrap=True)
    console.print(f"run directory: {run_dir}  ({program('tensorboard')} --logdir {run_dir}/tensorboard)",
                  markup=False, highlight=False, soft_wrap=True)


def count_text(n: float) -> str:
    """A parameter count with 3 significant digits and a unit: 940, 12.3 K, 86.2 M, 1.23 B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size * 0.9995:  # what shows as 1 or more of this unit
            value = n / size
            return f"{value:.3g} {unit}" if value < 999.5 else f"{value:.0f} {unit}"
    return f"{n:.0f}"


def print_plan(plan: dict, config: str) -> None:
    console.print(f"[bold]dry run of {config}[/]: task {plan['task']}")
    models = Table(title="models (built on the meta device)")
    for col in ("model", "params", "module", "layers", "width", "module params"):
        models.add_column(col, justify="left" if col in ("model", "module") else "right")
    for name, m in plan["models"].items():
        for i, (mod, info) in enumerate(m["modules"].items()):
            models.add_row(name if i == 0 else "", count_text(m["params_M"] * 1e6) if i == 0 else "", mod,
                           str(info["layers"]), str(info["width"]), count_text(info["params_M"] * 1e6))
    console.print(models)
    stages = Table(title="stages")
    for col in ("stage", "from", "steps", "rounds x T", "policy", "reward"):
        stages.add_column(col)
    for name, s in plan["stages"].items():
        if s["kind"] == "fine-tune":
            stages.add_row(name, "task", str(s["steps"]), "", "", "")
        elif s["kind"] == "pretrain":
            stages.add_row(name, s["corpus"], str(s["steps"]), "", "", "")
        else:
            stages.add_row(name, s["teacher"], str(s["steps"]), f"{s['rounds']} x {s['steps_per_round']}",
                           s["policy"], s["reward"])
    console.print(stages)
    for name, s in plan["stages"].items():
        if s["kind"] == "distill":
            shown = s["arms"] if len(s["arms"]) <= 20 else s["arms"][:20] + ["..."]
            n = len(s["arms"])
            console.print(f"{name}: {n} arm{'s' if n != 1 else ''}: {', '.join(shown)}")
            for unit, layers in (s.get("units") or {}).items():
                console.print(f"{name}: unit {unit}: {layers}")
            for module, teacher_layers in s["layer_map"].items():
                console.print(f"{name}: layer map {module}: student layer i -> {s['teacher']} layer "
                              f"{teacher_layers} (0-based)")
    sources = {}
    for name, m in plan["models"].items():
        for what, c in m["checkpoints"].items():
            state = "[green]exists[/]" if c["exists"] else "[red]missing[/]"
            console.print(f"{name} {what}: {escape(c['path'])} {state}")
            if not c["exists"] and c.get("source"):
                sources[c["path"]] = c["source"]
    for source in dict.fromkeys(sources.values()):
        console.print(f"  from {source}", markup=False, highlight=False)
    if plan["missing_data"]:
        for p in plan["missing_data"]:
            console.print(f"data: {escape(p)} [red]missing[/]")
        if plan.get("data_sources"):
            console.print(f"  from {plan['data_sources']}", markup=False, highlight=False)
    else:
        console.print("data: all present")
