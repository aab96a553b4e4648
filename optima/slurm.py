"""Sweeps on Slurm (`optima sweep --launcher slurm`), through submitit.

Each run of the grid is one Slurm job (the runs of one submission are the tasks
of a job array), which runs `run_job` on a node: the same `optima run` command
the local launcher starts, with its output appended to the run's log
(`SWEEP_DIR/<variant>/seed-<k>.log`) and its attempt recorded in its `job.json`,
as locally. The sweep directory, the run directories and `$OPTIMA_CACHE` must
be on a file system that the submitting machine and every node share.

- Order: a seed's first run (when no run of that seed has finished) is
  submitted in a first job array; the seed's other runs in a second one that
  starts once the first has ended (`--dependency=afterany`), so they find the
  teacher in the stage cache instead of holding an allocation while they wait
  for it. The stage cache's lock makes concurrent jobs safe in any case.
- Signals: Slurm sends SIGTERM `signal_s` seconds before the time limit (and at
  a cancel, a preemption, the limit itself) to every process of the job; the
  `optima run` process saves a checkpoint and stops, `run_job` records the attempt
  as `interrupted`, and rerunning the sweep resubmits it with `--resume`.
- State: `SWEEP_DIR/slurm/jobs.json` maps each run to its Slurm job ids;
  `squeue` tells which are queued or running (it needs no Slurm accounting),
  the run directories tell the rest; submitit's files go to `SWEEP_DIR/slurm/`.

Nothing is submitted before `sbatch --test-only` has accepted the job options.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from optima.checkpoint import write_json_atomic
from optima.errors import ConfigError

#: squeue's states of a job that has not ended
LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
               "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED", "REQUEUE_FED", "RESV_DEL_HOLD")
#: sbatch options that the sweep sets itself, and the option that sets them
_OWNED = {"time": "--slurm-time", "t": "--slurm-time", "partition": "--slurm-partition", "p": "--slurm-partition",
          "gpus-per-node": "--slurm-gpus", "gpus": "--slurm-gpus", "G": "--slurm-gpus",
          "cpus-per-task": "--slurm-cpus", "c": "--slurm-cpus", "nodes": "--slurm-nodes", "N": "--slurm-nodes",
          "array": "--slurm-array-parallelism", "signal": "--slurm-signal", "ntasks-per-node": None,
          "ntasks": None, "n": None, "output": None, "o": None, "error": None, "e": None, "open-mode": None,
          "job-name": None, "J": None, "wrap": None, "dependency": None, "d": None}
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_SBATCH_LINE = re.compile(r"^(?:#SBATCH\s+)?(?:--)?([A-Za-z][A-Za-z0-9-]*)(?:=(.*))?$")


def time_minutes(text: str) -> int:
    """Slurm's time formats -> whole minutes (Slurm rounds up too): '90' (minutes),
    'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM', 'D-HH:MM:SS'."""
    m = _TIME.match(str(text).strip())
    if m is None:
        raise ConfigError(f"--slurm-time {text!r}: expected Slurm's time format, e.g. 90 (minutes), 4:00:00 "
                          "or 1-12:00:00")
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = ((int(days) * 24 + a) * 60 + b) * 60 + c
    elif m.group(4) is not None:  # HH:MM:SS
        seconds = (a * 60 + b) * 60 + c
    elif m.group(3) is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds <= 0:
        raise ConfigError(f"--slurm-time {text!r}: the time limit must be more than 0")
    return math.ceil(seconds / 60)


def parse_sbatch_line(text: str) -> tuple[str, str | bool]:
    """'--account=proj' (or 'account=proj'), '#SBATCH --qos=high', '--exclusive' -> (key, value or True)."""
    m = _SBATCH_LINE.match(text.strip())
    if m is None:
        raise ConfigError(f"--slurm-sbatch {text!r}: expected a long sbatch option, e.g. --account=myproject, "
                          "--qos=high or --constraint=a100")
    key, value = m.group(1), m.group(2)
    if key in _OWNED:
        where = _OWNED[key]
        raise ConfigError(f"--slurm-sbatch {text!r}: " + (f"set --{key} with {where}" if where else
                                                           f"the sweep sets --{key} itself"))
    return key, True if value is None else value


@dataclass(frozen=True)
class SlurmOptions:
    """How each run of a sweep is submitted (CLI `--slurm-*` options, or the
    variants file's `[slurm]` table)."""

    partition: str | None = None
    time: str = "60"  # Slurm's time format; minutes alone: '90'
    gpus: int = 0  # GPUs per node of a run (torchrun starts one process per GPU when > 1)
    cpus: int = 1  # CPUs per node of a run
    nodes: int = 1  # nodes per run (> 1: torchrun on each node through srun)
    sbatch: tuple[str, ...] = ()  # further sbatch options, e.g. '--account=proj', '--qos=high'
    array_parallelism: int = 64  # array tasks running at once
    signal_s: int = 120  # SIGTERM this many seconds (>= 10) before the time limit (checkpoint time)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> "SlurmOptions":
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{where}: unknown Slurm option(s) {unknown}; expected {sorted(names)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "sbatch":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{where}: sbatch must be a list of strings, e.g. [\"--account=proj\"], "
                                      f"got {value!r}")
                values[key] = tuple(value)
            elif key in ("partition", "time"):
                if not isinstance(value, (str, int)) or isinstance(value, bool):
                    raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
                values[key] = str(value)
            else:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
                values[key] = value
        return replace(cls(), **values).checked(where)

    def updated(self, **values: Any) -> "SlurmOptions":
        """These options with the given ones (None: keep) replaced."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def checked(self, where: str = "Slurm options") -> "SlurmOptions":
        """Refuses what Slurm would refuse later or what cannot work, one line each."""
        time_minutes(self.time)
        for name, least in (("gpus", 0), ("cpus", 1), ("nodes", 1), ("array_parallelism", 1), ("signal_s", 10)):
            if getattr(self, name) < least:
                raise ConfigError(f"{where}: --slurm-{name.replace('_', '-')} must be >= {least}, got "
                                  f"{getattr(self, name)}")
        if self.signal_s >= time_minutes(self.time) * 60:
            raise ConfigError(f"{where}: --slurm-signal {self.signal_s} s is not shorter than the time limit "
                              f"{self.time}; a run would be stopped as it starts")
        if self.partition is not None and not re.fullmatch(r"[A-Za-z0-9_.,-]+", self.partition):
            raise ConfigError(f"{where}: --slurm-partition {self.partition!r} is not a partition name")
        for line in self.sbatch:
            parse_sbatch_line(line)
        return self

    def sbatch_options(self) -> dict[str, str | bool]:
        """The options of every job, as sbatch's long option names (what `#SBATCH` lines hold)."""
        out: dict[str, str | bool] = {"time": str(time_minutes(self.time)), "nodes": str(self.nodes),
                                      "ntasks-per-node": "1", "cpus-per-task": str(self.cpus)}
        if self.partition:
            out["partition"] = self.partition
        if self.gpus:
            out["gpus-per-node"] = str(self.gpus)
        out.update(parse_sbatch_line(line) for line in self.sbatch)
        return out

    def command_line(self) -> str:
        """These options as `optima sweep` options (for messages)."""
        default = SlurmOptions()
        parts = [f"--slurm-{f.name.replace('_', '-')} {shlex.quote(str(getattr(self, f.name)))}"
                 for f in fields(self) if f.name != "sbatch" and getattr(self, f.name) != getattr(default, f.name)]
        parts += [f"--slurm-sbatch {shlex.quote(line)}" for line in self.sbatch]
        return " ".join(parts)


def _which(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        raise ConfigError(f"no `{command}` on PATH: --launcher slurm runs where Slurm's commands are (a login "
                          "node of the cluster)")
    return path


def check_with_slurm(options: SlurmOptions) -> str:
    """Ask Slurm whether it would accept a job with these options, submitting
    nothing (`sbatch --test-only`); its answer, or a one-line ConfigError."""
    cmd = [_which("sbatch"), "--test-only", "--job-name=optima-check", "--output=/dev/null", "--wrap=true"]
    cmd += [f"--{k}" if v is True else f"--{k}={v}" for k, v in options.sbatch_options().items()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise ConfigError("sbatch --test-only did not answer within 60 s: is the Slurm controller up (sinfo)?") \
            from None
    text = " ".join((done.stderr + done.stdout).split())
    if done.returncode != 0:
        errors = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()] or [text]
        raise ConfigError(f"Slurm refuses the job options ({options.command_line() or 'the defaults'}): "
                          f"{'; '.join(errors)}; nothing was submitted")
    return text


# --- the sweep's Slurm jobs ----------------------------------------------------------

def jobs_file(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / "slurm" / "jobs.json"


def read_jobs(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """{run label: {'job_id', 'submitted', 'earlier'}} of a sweep directory."""
    path = jobs_file(sweep_dir)
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); `squeue --me` lists your jobs") from None


def queue_states(job_ids: Sequence[str] = ()) -> dict[str, str]:
    """{job id: state} of this user's jobs that have not ended (squeue, array
    tasks one per line as '<array id>_<task>')."""
    cmd = [_which("squeue"), "--noheader", "--array", "--user", getpass.getuser(), "--format=%i|%T"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise ConfigError("squeue did not answer within 60 s: is the Slurm controller up (sinfo)?") from None
    if done.returncode != 0:
        raise ConfigError(f"squeue failed: {' '.join(done.stderr.split()) or done.returncode}")
    states = dict(line.split("|", 1) for line in done.stdout.split() if "|" in line)
    return {j: states[j] for j in job_ids if j in states} if job_ids else states


def live_jobs(sweep_dir: Path) -> dict[str, tuple[str, str]]:
    """{run label: (job id, squeue state)} of the sweep's runs queued or running in Slurm."""
    submitted = read_jobs(sweep_dir)
    if not submitted:
        return {}
    states = queue_states()
    return {label: (s["job_id"], states[s["job_id"]]) for label, s in submitted.items()
            if states.get(s["job_id"]) in LIVE_STATES}


def _executor(sweep_dir: Path, options: SlurmOptions, name: str):
    import submitit

    folder = Path(sweep_dir) / "slurm"
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=0)
    extra = {k: v for k, v in options.sbatch_options().items()
             if k not in ("time", "nodes", "ntasks-per-node", "cpus-per-task", "partition", "gpus-per-node")}
    executor.update_parameters(
        time=time_minutes(options.time), nodes=options.nodes, ntasks_per_node=1, cpus_per_task=options.cpus,
        job_name=name, array_parallelism=options.array_parallelism, stderr_to_stdout=True,
        **({"partition": options.partition} if options.partition else {}),
        **({"gpus_per_node": options.gpus} if options.gpus else {}),
        # SIGTERM (which every process of the job gets) rather than submitit's USR2: `optima run` saves on it
        additional_parameters={**extra, "signal": f"TERM@{options.signal_s}"})
    return executor


def submit(sweep, jobs: Sequence, options: SlurmOptions, threads: int) -> dict[str, str]:
    """Submit `jobs` (of `sweep`, an `optima.sweep.Sweep`); {label: job id}. A
    seed's first run goes in a first array when no run of that seed has
    finished, its other runs in a second array that waits for the first."""
    import logging

    logging.getLogger("submitit").setLevel(logging.ERROR)  # its sacct warnings where Slurm keeps no accounting
    warm = {j.seed for j in sweep.jobs() if j.status == "done"}
    leaders, followers, seen = [], [], set()
    for job in jobs:
        if job.seed in warm or job.seed in seen:
            followers.append(job)
        else:
            leaders.append(job)
            seen.add(job.seed)
    name = f"optima-{sweep.dir.name}"
    record = read_jobs(sweep.dir)
    submitted: dict[str, str] = {}
    depends_on = None
    for group in (leaders, followers):
        if not group:
            continue
        executor = _executor(sweep.dir, options, name)
        if depends_on is not None and group is followers:
            executor.update_parameters(additional_parameters={
                **executor.parameters.get("additional_parameters", {}), "dependency": f"afterany:{depends_on}"})
        with executor.batch():
            handles = [executor.submit(run_job, str(sweep.dir), job.label, threads, sweep.no_plugins,
                                       options.gpus, options.nodes) for job in group]
        for job, handle in zip(group, handles):
            submitted[job.label] = handle.job_id
            earlier = record.get(job.label, {})
            record[job.label] = {"job_id": handle.job_id, "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "earlier": [*earlier.get("earlier", []), earlier["job_id"]] if earlier else []}
        if group is leaders:
            depends_on = handles[0].job_id.split("_")[0]
        write_json_atomic(jobs_file(sweep.dir), record, indent=1)
    return submitted


def cancel(sweep_dir: Path) -> list[tuple[str, str]]:
    """scancel (through submitit) the sweep's queued and running jobs: a running
    run gets SIGTERM, saves a checkpoint and stops. [(label, job id)]."""
    import submitit

    live = live_jobs(sweep_dir)
    for label, (job_id, _) in live.items():
        submitit.SlurmJob(folder=Path(sweep_dir) / "slurm" / "%j", job_id=job_id).cancel(check=False)
    return [(label, job_id) for label, (job_id, _) in live.items()]


def ended_state(sweep_dir: Path, job_id: str) -> str | None:
    """How Slurm says a job ended (TIMEOUT, CANCELLED, OUT_OF_MEMORY, ...:
    submitit asks sacct), or None where Slurm keeps no accounting."""
    import logging

    import submitit

    logging.getLogger("submitit").setLevel(logging.ERROR)
    try:
        state = submitit.SlurmJob(folder=Path(sweep_dir) / "slurm" / "%j", job_id=job_id).state
    except Exception:  # sacct missing or failing: the run's own record says the rest
        return None
    return None if state in ("UNKNOWN", "", None) else str(state).split()[0]


# --- in the job ----------------------------------------------------------------------

def torchrun_command(cmd: Sequence[str], gpus: int, nodes: int, job_id: str) -> list[str]:
    """`python -m optima.cli.main run ...` as torchrun runs it in a job of
    `nodes` nodes with `gpus` GPUs each: one process per GPU, through srun (one
    task per node) on several nodes, the first node the rendezvous."""
    assert cmd[1:3] == ["-m", "optima.cli.main"], cmd
    head = "localhost"
    if nodes > 1:
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ.get("SLURM_JOB_NODELIST", "")],
                               capture_output=True, text=True).stdout.split()
        head = hosts[0] if hosts else socket.gethostname()
    run = [cmd[0], "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(max(gpus, 1)),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{head}:29500", "--rdzv-id", job_id,
           "-m", "optima.cli.main", *cmd[3:]]
    return ["srun", "--nodes", str(nodes), "--ntasks-per-node", "1", *run] if nodes > 1 else run


def run_job(sweep_dir: str, label: str, threads: int, no_plugins: bool, gpus: int = 0, nodes: int = 1) -> str:
    """What a Slurm job runs: the run `label` of the sweep in `sweep_dir`, as
    the local launcher runs it (`--resume` when its directory holds an
    unfinished run), recorded in its `job.json`; returns its status."""
    from optima import sweep as sweeps

    sweep = sweeps.Sweep.load(sweep_dir)
    sweep.no_plugins = no_plugins
    job = next((j for j in sweep.jobs() if j.label == label), None)
    if job is None:
        raise ConfigError(f"{sweep_dir}/sweep.json has no run {label}")
    if job.status == "done":  # a duplicate submission: nothing to do
        return "done"
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "?"))
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        job_id = f"{job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    sweeps.wait_for_run_dir(job.run_dir)
    cmd = sweep.command(job)
    if gpus > 1 or nodes > 1:
        cmd = torchrun_command(cmd, gpus, nodes, job_id)
    signals: list[int] = []
    # Slurm signals every process of the job, `optima run` included: note it, do not pass it on (a second
    # SIGTERM would stop the run without its checkpoint)
    previous = {s: signal.signal(s, lambda signum, frame: signals.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = sweeps.start_run(job, cmd, sweeps.run_environment(threads), note=f"Slurm job {job_id} on "
                                   f"{socket.gethostname()}")
        while running.process.poll() is None:
            with contextlib.suppress(InterruptedError):
                running.process.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    sweeps.finish_run(sweep, running, stopped=bool(signals), slurm_job=job_id)
    sweeps.write_results(sweep)
    return running.job.status
