"""`optima sweep --launcher slurm` against a real Slurm cluster (`.ci/slurm/start.sh`
starts a single-node one on localhost): the same results as the local launcher,
a cancelled job and a job at its time limit resumed bit-exact by rerunning the
sweep, the teacher of a seed trained once by two jobs started together, bad
Slurm options refused in one line before anything is submitted. Without a
reachable cluster these tests skip, saying so; with OPTIMA_REQUIRE_SLURM=1 (CI,
`.ci/run`) they fail instead. The option parsing runs without Slurm."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, TINY
from optima.cli.main import app
from optima.errors import ConfigError
from optima.slurm import SlurmOptions, parse_sbatch_line, queue_states, read_jobs, time_minutes, torchrun_command

CONFIG = "tests/gin/tiny_ve.gin"
COMMON = [x for b in TINY for x in ("-b", b)]
LAYERWISE = "layerwise=distillation.policy = @layerwise_policy"


def _unreachable() -> str | None:
    """Why no Slurm cluster can take jobs here (None: one can)."""
    missing = [c for c in ("sbatch", "squeue", "sinfo", "scancel") if shutil.which(c) is None]
    if missing:
        return f"no {', '.join(missing)} on PATH"
    try:
        done = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s"
    if done.returncode != 0:
        return f"sinfo failed: {' '.join(done.stderr.split())}"
    if not any(s.rstrip("*") in ("idle", "mix", "mixed", "alloc", "allocated") for s in done.stdout.split()):
        return f"no node is up (sinfo: {' '.join(done.stdout.split()) or 'nothing'})"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _unreachable()
    if reason:
        message = f"no Slurm cluster reachable ({reason}); `.ci/slurm/start.sh` starts one on localhost (as root)"
        if os.environ.get("OPTIMA_REQUIRE_SLURM") == "1":
            pytest.fail(message + "; OPTIMA_REQUIRE_SLURM=1 requires it")
        pytest.skip(message)


def _optima(*args: str, cache: Path | None = None) -> subprocess.Popen:
    """`optima ARGS` at 80 columns; `cache`: its stage cache (and its Slurm jobs', which inherit it)."""
    env = {**os.environ, "COLUMNS": "80", "OPTIMA_PROGRESS_INTERVAL": "5"}
    if cache is not None:
        env["OPTIMA_CACHE"] = str(cache)
    return subprocess.Popen([sys.executable, "-m", "optima.cli.main", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(*args: str, timeout: float = 1800, cache: Path | None = None) -> tuple[int, str]:
    process = _optima(*args, cache=cache)
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def _rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _wait_for_jobs(*sweep_dirs: Path, timeout: float = 1800) -> None:
    """Until no job of these sweeps is queued or running."""
    ids = [j["job_id"] for d in sweep_dirs for j in read_jobs(d).values()]
    deadline = time.monotonic() + timeout
    while queue_states(ids):
        assert time.monotonic() < deadline, f"Slurm jobs {ids} still queued or running after {timeout} s"
        time.sleep(1)


# --- without Slurm ------------------------------------------------------------------

def test_slurm_options_are_checked_before_slurm_is_asked():
    assert [time_minutes(t) for t in ("90", "1:30", "4:00:00", "1-12", "1-0:30", "0-0:0:30")] == \
        [90, 2, 240, 2160, 1470, 1]
    assert parse_sbatch_line("--account=proj") == ("account", "proj")
    assert parse_sbatch_line("#SBATCH --qos=high") == ("qos", "high")
    assert parse_sbatch_line("exclusive") == ("exclusive", True)
    options = SlurmOptions(partition="gpu", time="4:00:00", gpus=8, cpus=64, nodes=2, sbatch=("--qos=high",))
    assert options.checked().sbatch_options() == {"time": "240", "nodes": "2", "ntasks-per-node": "1",
                                                  "cpus-per-task": "64", "partition": "gpu", "gpus-per-node": "8",
                                                  "qos": "high"}
    for bad, match in ((SlurmOptions(time="1h"), "--slurm-time '1h'"), (SlurmOptions(cpus=0), "--slurm-cpus"),
                       (SlurmOptions(time="2", signal_s=120), "not shorter than the time limit"),
                       (SlurmOptions(sbatch=("--time=5",)), "with --slurm-time"),
                       (SlurmOptions(sbatch=("--output=x",)), "the sweep sets --output itself"),
                       (SlurmOptions(partition="a b"), "not a partition name")):
        with pytest.raises(ConfigError, match=match):
            bad.checked()
    with pytest.raises(ConfigError, match=r"\[slurm\]: unknown Slurm option\(s\) \['gpu'\]"):
        SlurmOptions.from_mapping({"gpu": 1}, "v.toml: [slurm]")
    assert SlurmOptions.from_mapping({"partition": "gpu", "time": 90, "sbatch": ["--qos=high"]}, "v") == \
        SlurmOptions(partition="gpu", time="90", sbatch=("--qos=high",))


def test_torchrun_command_of_a_job():
    cmd = [sys.executable, "-m", "optima.cli.main", "run", "x.gin", "--run-dir", "r"]
    one_node = torchrun_command(cmd, gpus=8, nodes=1, job_id="12_3")
    assert one_node == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "8",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:29500", "--rdzv-id", "12_3",
                        "-m", "optima.cli.main", "run", "x.gin", "--run-dir", "r"]


# --- against Slurm ------------------------------------------------------------------

def test_bad_slurm_options_are_one_line_before_anything_is_submitted(slurm, tmp_path):
    before = queue_states()
    for options, says in ((["--slurm-partition", "nosuch"], "invalid partition specified: nosuch"),
                          (["--slurm-cpus", "4096"], "Requested node configuration is not available"),
                          (["--slurm-time", "1h"], "--slurm-time '1h'"),
                          (["--slurm-sbatch=--output=x.log"], "the sweep sets --output itself"),
                          (["--slurm-time", "1", "--slurm-signal", "90"], "not shorter than the time limit")):
        result = CliRunner().invoke(app, ["sweep", CONFIG, "--variant", "a=", "--sweep-dir", str(tmp_path / "s"),
                                          "--launcher", "slurm", *options])
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 2, result.output
        assert len(lines) == 1 and lines[0].startswith("optima: error:") and says in lines[0], result.output
        assert not (tmp_path / "s").exists()
    result = CliRunner().invoke(app, ["sweep", CONFIG, "--variant", "a=", "--slurm-gpus", "1"])
    assert result.exit_code == 2 and "add --launcher slurm" in result.output
    assert queue_states() == before  # nothing was submitted


@pytest.mark.slow
def test_slurm_sweep_gives_the_local_results_and_hparams(slurm, tmp_path):
    """2 variants x 2 seeds: the same results.csv as the local launcher (each
    with a stage cache of its own, so that nothing one trained is reused by the
    other); --status shows the jobs at 80 columns; every finished run is an
    HParams session."""
    grid = [CONFIG, *COMMON, "--variant", "optima=", "--variant", LAYERWISE, "--seeds", "0,1"]
    code, out = _run("sweep", *grid, "--sweep-dir", tmp_path / "local", "--jobs", "2", cache=tmp_path / "cache-local")
    assert code == 0, out
    code, out = _run("sweep", *grid, "--sweep-dir", tmp_path / "slurm", "--launcher", "slurm", "--slurm-time", "10",
                     cache=tmp_path / "cache-slurm")
    assert code == 0, out
    assert "submitted 4 run(s) to Slurm" in out and "[4/4 done, ETA 0s]" in out
    assert all(len(line) <= 80 for line in out.splitlines()), out
    local, on_slurm = _rows(tmp_path / "local"), _rows(tmp_path / "slurm")
    ignore = ("run_dir", "wall_s")
    assert [{k: v for k, v in r.items() if k not in ignore} for r in on_slurm] == \
        [{k: v for k, v in r.items() if k not in ignore} for r in local]
    assert {r["status"] for r in on_slurm} == {"done"}
    jobs = read_jobs(tmp_path / "slurm")
    for row in on_slurm:  # each run was a Slurm job, recorded as such
        record = json.loads((Path(row["run_dir"]) / "job.json").read_text())
        assert record["attempts"][-1]["slurm_job"] == jobs[f"{row['variant']}/seed-{row['seed']}"]["job_id"]

    code, out = _run("sweep", "--status", tmp_path / "slurm")
    assert code == 0, out
    assert all(len(line) <= 80 for line in out.splitlines()), out
    for label, job in jobs.items():
        assert re.search(rf"{re.escape(label)}\s+│\s+done\s+│\s+{job['job_id']}\s", out), out
    assert "4 runs: 4 done" in out

    # HParams: an experiment with the hparams and metrics, a session per run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    def plugin_data(run: Path) -> dict:
        events = EventAccumulator(str(run))
        events.Reload()
        return {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
                for tag, content in events.PluginTagToContent("hparams").items()}, events

    root = tmp_path / "slurm" / "tensorboard" / "hparams"
    experiment = plugin_data(root)[0]["_hparams_/experiment"].experiment
    assert [h.name for h in experiment.hparam_infos] == ["variant", "seed", "distillation.policy"]
    assert sorted(m.name.tag for m in experiment.metric_infos) == ["student/accuracy", "teacher/accuracy"]
    for row in on_slurm:
        data, events = plugin_data(root / row["variant"] / f"seed-{row['seed']}")
        hparams = data["_hparams_/session_start_info"].session_start_info.hparams
        assert hparams["variant"].string_value == row["variant"]
        assert hparams["seed"].number_value == int(row["seed"])
        assert hparams["distillation.policy"].string_value == (row["distillation.policy"] or "(config)")
        for metric in ("student/accuracy", "teacher/accuracy"):
            assert events.Scalars(metric)[0].value == pytest.approx(float(row[metric]))


def _student(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    (path,) = [p for p in run_dir.glob("*.safetensors")]
    return load_file(path)


@pytest.mark.slow
def test_cancelled_and_timed_out_jobs_resume_bit_exact(slurm, tmp_path):
    """One job scancelled mid-run (`optima sweep --cancel`), one stopped by
    Slurm's SIGTERM at its time limit (`--slurm-signal` before it): each saves
    a checkpoint, and rerunning its sweep resumes it to the weights and metrics
    of an uninterrupted run of the same config and seed. Each sweep has a stage
    cache of its own: with one, the runs would reuse each other's stages."""
    # 250 rounds: still running a minute after round 2 (Slurm checks time limits every 30 s)
    grid = [CONFIG, *COMMON, "-b", "distillation.rounds = 250", "--variant", "optima=", "--launcher", "slurm"]
    cancelled, timed, reference = tmp_path / "cancelled", tmp_path / "timed", tmp_path / "reference"

    def submit(*sweeps: tuple[Path, list[str]]) -> None:
        processes = [_optima("sweep", *grid, "--sweep-dir", d, *options, "--no-wait",
                             cache=d.with_name(d.name + "-cache")) for d, options in sweeps]
        for process in processes:
            out, _ = process.communicate(timeout=300)
            assert process.returncode == 0 and "submitted 1 run(s) to Slurm" in out, out

    submit((cancelled, ["--slurm-time", "10"]), (timed, ["--slurm-time", "10", "--slurm-signal", "45"]))
    submit((reference, ["--slurm-time", "10"]))  # it starts when one of the others has ended (2 CPUs)
    # at round 2: the first job is cancelled (`optima sweep --cancel`: scancel, Slurm's SIGTERM); the second's
    # time limit is lowered (as a user may lower their job's) to end 50 to 110 s later, so that Slurm sends
    # its SIGTERM (--slurm-signal 45 s before the limit) at one of its next checks (every 30 s), whatever the
    # machine's speed; the limit itself comes later, so that one SIGTERM stops the run
    todo = {cancelled, timed}
    deadline = time.monotonic() + 1200
    while todo:
        for sweep_dir in list(todo):
            log = sweep_dir / "optima" / "seed-0.log"
            if log.exists() and "student: round 2 " in log.read_text():
                todo.remove(sweep_dir)
                if sweep_dir == cancelled:
                    code, out = _run("sweep", "--cancel", cancelled)
                    assert code == 0 and "cancelled 1 Slurm job(s): optima/seed-0" in out, out
                else:
                    job_id = read_jobs(timed)["optima/seed-0"]["job_id"]
                    elapsed = subprocess.run(["squeue", "--noheader", "--job", job_id, "--format=%M"],
                                             capture_output=True, text=True, check=True).stdout.strip()
                    seconds = sum(int(x) * 60 ** i for i, x in enumerate(reversed(re.split("[:-]", elapsed))))
                    limit = -(-(seconds + 50) // 60)  # whole minutes, rounded up
                    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit}"], check=True)
        assert time.monotonic() < deadline, f"{todo} never reached round 2"
        time.sleep(0.2)
    _wait_for_jobs(cancelled, timed, reference)

    for sweep_dir in (cancelled, timed):
        run_dir = sweep_dir / "optima" / "seed-0"
        record = json.loads((run_dir / "job.json").read_text())
        assert [a["status"] for a in record["attempts"]] == ["interrupted"], record
        log = (sweep_dir / "optima" / "seed-0.log").read_text()
        assert "interrupted by SIGTERM" in log and "checkpoint saved" in log, log[-2000:]
        assert not (run_dir / "metrics.json").exists()
    code, out = _run("sweep", "--status", timed)
    assert code == 0 and re.search(r"optima/seed-0\s+│\s+interrupted", out), out

    # rerun both (the timed one with time to finish): they resume from their checkpoints
    reruns = [_optima("sweep", *grid, "--sweep-dir", d, "--slurm-time", "10", cache=d.with_name(d.name + "-cache"))
              for d in (cancelled, timed)]
    for process in reruns:
        out, _ = process.communicate(timeout=1800)
        assert process.returncode == 0, out
    expected = json.loads((reference / "optima" / "seed-0" / "metrics.json").read_text())["metrics"]
    weights = _student(reference / "optima" / "seed-0")
    for sweep_dir in (cancelled, timed):
        run_dir = sweep_dir / "optima" / "seed-0"
        record = json.loads((run_dir / "job.json").read_text())
        assert [a["status"] for a in record["attempts"]] == ["interrupted", "done"]
        log = (sweep_dir / "optima" / "seed-0.log").read_text()
        assert "--resume" in log.split("\n# ")[-1].splitlines()[0] and "resumed from" in log
        assert json.loads((run_dir / "metrics.json").read_text())["metrics"] == expected
        resumed = _student(run_dir)
        assert resumed.keys() == weights.keys()
        assert all(resumed[k].equal(weights[k]) for k in weights)


@pytest.mark.slow
def test_two_jobs_of_one_seed_started_together_train_the_teacher_once(slurm, tmp_path):
    """Two sweeps sharing a stage cache submit a run of seed 0 each at the same
    moment: one job trains the teacher while the other waits on the cache's
    lock (in another process, as on another node) and reuses it."""
    grid = [CONFIG, *COMMON, "-b", "teacher_training.steps = 100", "--launcher", "slurm", "--no-wait"]
    first = _optima("sweep", *grid, "--variant", "optima=", "--sweep-dir", tmp_path / "a", cache=tmp_path / "cache")
    second = _optima("sweep", *grid, "--variant", LAYERWISE, "--sweep-dir", tmp_path / "b", cache=tmp_path / "cache")
    for process in (first, second):
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0, out
    _wait_for_jobs(tmp_path / "a", tmp_path / "b")
    logs = [(tmp_path / "a" / "optima" / "seed-0.log").read_text(),
            (tmp_path / "b" / "layerwise" / "seed-0.log").read_text()]
    trained = [log for log in logs if "teacher: cached at" in log]
    waited = [log for log in logs if "another run is making teacher-" in log]
    assert len(trained) == 1 and len(waited) == 1, logs
    assert "teacher: reusing" in waited[0]
    assert len(list((tmp_path / "cache").glob("teacher-*.safetensors"))) == 1
    teacher = [json.loads((tmp_path / d / v / "seed-0" / "metrics.json").read_text())["metrics"]["teacher"]
               for d, v in (("a", "optima"), ("b", "layerwise"))]
    assert teacher[0] == teacher[1]
