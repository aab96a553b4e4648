"""`optima sweep`: variants x seeds as real `optima run` subprocesses at the
tests/gin/tiny_ve.gin at its tiniest sizes: rows, skipping on a rerun, a failing variant, the
teacher shared by a seed's variants, Ctrl-C and resuming; and its parts
(variant parsing, the variants file, statistics, the stage lock) in process."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from conftest import ROOT
from optima.cli.main import app
from optima.errors import ConfigError
from optima.sweep import Job, Stats, Sweep, Variant, load_variants_file, parse_seeds, parse_variant, \
    results_csv, results_markdown, split_bindings, summarize

from conftest import TINY

COMMON = [x for b in TINY for x in ("-b", b)]
LAYERWISE = "layerwise=distillation.policy = @layerwise_policy"


def _sweep(tmp_path, *args, env=None):
    """`optima sweep` in this process (its runs are subprocesses), at 80 columns: exit code and
    output, its lines as wrapped (each within 80 columns) joined by single spaces."""
    result = CliRunner().invoke(app, ["sweep", "tests/gin/tiny_ve.gin", *COMMON, "--sweep-dir", str(tmp_path / "sweep"),
                                      *args], env={"COLUMNS": "80", **(env or {})})
    # an error line and a log's path are printed whole, never cut or folded
    too_wide = [line for line in result.output.splitlines() if len(line) > 80
                and not line.startswith("optima: error:") and not line.strip().startswith("log: ")]
    assert not too_wide, result.output
    return result.exit_code, " ".join(result.output.split())


def _rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _attempts(log: Path) -> int:
    return sum(line.startswith("# ") for line in log.read_text().splitlines())


def test_sweep_rows_teacher_per_seed_failure_and_rerun(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))
    variants = tmp_path / "variants.toml"
    variants.write_text('[optima]\n\n[layerwise]\nbindings = ["distillation.policy = @layerwise_policy"]\n\n'
                        '[broken]\nbindings = ["distillation.rounds = 0"]\nseeds = [1]\n')
    # 3 jobs: without the seed's first run going alone (or the stage lock), a layerwise run would
    # train the teacher its seed's optima run is training
    code, out = _sweep(tmp_path, "--variants", str(variants), "--seeds", "0,1", "--jobs", "3",
                       env={"OPTIMA_PROGRESS_INTERVAL": "1"})
    assert code == 1, out  # a run failed; the others finished
    # not on a terminal: a line per run start and end, and one per interval, each saying where the sweep stands
    assert "[0/5 done, ETA ?] starting optima/seed-0" in out and "[4/5 done, ETA 0s]" in out
    assert re.search(r"\[\d/5 done, ETA [^]]+\] \d running: \S+/seed-\d \d+m\d\ds", out), out
    sweep = tmp_path / "sweep"
    rows = _rows(sweep)
    assert [(r["variant"], r["seed"]) for r in rows] == [
        ("optima", "0"), ("optima", "1"), ("layerwise", "0"), ("layerwise", "1"), ("broken", "1")]
    for r in rows[:4]:
        assert r["status"] == "done" and r["error"] == ""
        summary = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        assert float(r["student/accuracy"]) == summary["metrics"]["student"]["accuracy"]
        assert float(r["teacher/accuracy"]) == summary["metrics"]["teacher"]["accuracy"]
        assert float(r["wall_s"]) > 0
    assert [r["distillation.policy"] for r in rows] == ["", "", "@layerwise_policy", "@layerwise_policy", ""]
    assert [r["distillation.rounds"] for r in rows] == ["", "", "", "", "0"]
    # the failing variant: reported with optima's one-line error, its log kept
    broken = rows[4]
    assert broken["status"] == "failed" and broken["student/accuracy"] == ""
    assert broken["error"].startswith("optima: error:") and "distillation.rounds" in broken["error"]
    assert "distillation.rounds" in (sweep / "broken" / "seed-1.log").read_text()
    assert "failed broken/seed-1" in out
    assert "| optima: error:" in out and f"log: {sweep / 'broken' / 'seed-1.log'}" in out  # its log's tail
    # each run directory holds its bindings; the grid is in sweep.json
    job = json.loads((sweep / "layerwise" / "seed-1" / "job.json").read_text())
    assert job["bindings"][-2:] == ["distillation.policy = @layerwise_policy", "experiment.seed = 1"]
    assert job["attempts"][0]["status"] == "done"
    assert [v["name"] for v in json.loads((sweep / "sweep.json").read_text())["variants"]] == \
        ["optima", "layerwise", "broken"]
    # one teacher per seed: the layerwise runs reuse the seeds' teachers
    assert len(list((tmp_path / "cache").glob("teacher-*.safetensors"))) == 2
    for seed in (0, 1):
        assert "teacher: reusing" in (sweep / "layerwise" / f"seed-{seed}.log").read_text()
    # results.md: per variant and metric median, mean, std, n; ties named
    md = (sweep / "results.md").read_text()
    # (paired with layerwise, the reference when present: tests/test_paired.py)
    assert "## student/accuracy" in md and "| variant | median | mean | std | n | vs layerwise |" in md
    assert "| layerwise |" in md and "(2 seeds) |" in md and "## Runs that did not finish" in md

    # optima report: Figure 3 per student metric, and the arms of each variant that chose arms
    result = CliRunner().invoke(app, ["report", str(sweep)])
    assert result.exit_code == 0, result.output
    figures = {"student-accuracy-per-variant", "student-accuracy-paired", "optima-student-arm-posterior",
               "optima-student-arm-plays"}
    assert {p.stem for p in (sweep / "figures").glob("*.png")} == figures  # layerwise plays one arm: no figure
    events = EventAccumulator(str(sweep / "tensorboard" / "figures"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == figures
    for seed in (0, 1):  # and every run wrote its own
        assert (sweep / "optima" / f"seed-{seed}" / "figures" / "student-arm-posterior.png").exists()

    # a rerun of the finished variants starts no process and leaves the rows as they were
    before = {p: _attempts(p) for p in sweep.glob("*/seed-*.log")}
    code, out = _sweep(tmp_path, "--variant", "optima=", "--variant", LAYERWISE, "--seeds", "0,1")
    assert code == 0, out
    assert "(4 finished, 0 to run)" in out
    assert {p: _attempts(p) for p in sweep.glob("*/seed-*.log")} == before
    assert [r["student/accuracy"] for r in _rows(sweep)[:4]] == [r["student/accuracy"] for r in rows[:4]]
    # a variant name keeps its bindings within a sweep directory
    code, out = _sweep(tmp_path, "--variant", "optima=distillation.rounds = 3", "--seeds", "0")
    assert code == 2 and "variant optima" in out and "another name" in out


def test_ctrl_c_stops_runs_with_a_checkpoint_and_rerun_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))
    sweep = tmp_path / "sweep"
    long_run = ["-b", "distillation.rounds = 30", "-b", "distillation.checkpoint_every = 1000"]
    cmd = [sys.executable, "-m", "optima.cli.main", "sweep", "tests/gin/tiny_ve.gin", *COMMON, *long_run,
           "--sweep-dir", str(sweep), "--variant", "optima="]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = sweep / "optima" / "seed-0.log"
    deadline = time.monotonic() + 300
    while not (log.exists() and "student: round 2 " in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out
    assert "interrupted" in out
    text = log.read_text()
    assert "interrupted by SIGINT" in text and "checkpoint saved" in text
    row, = _rows(sweep)
    assert row["status"] == "interrupted"
    assert not (sweep / "optima" / "seed-0" / "metrics.json").exists()
    # the rerun continues from the checkpoint the interrupted run saved
    code, out = _sweep(tmp_path, *long_run, "--variant", "optima=")
    assert code == 0, out
    text = log.read_text()
    assert "--resume" in text.split("\n# ")[-1].splitlines()[0] and "student: resumed from" in text
    row, = _rows(sweep)
    assert row["status"] == "done"
    record = json.loads((sweep / "optima" / "seed-0" / "job.json").read_text())
    assert [a["status"] for a in record["attempts"]] == ["interrupted", "done"]
    assert float(row["wall_s"]) == pytest.approx(sum(a["wall_s"] for a in record["attempts"]), abs=0.11)


# --- in process -------------------------------------------------------------------------

def test_variant_and_seed_parsing():
    assert parse_variant("optima=") == Variant("optima", ())
    assert parse_variant("kd=distillation.reward = @kd_reward(); optima_policy.gamma = 0.5") == \
        Variant("kd", ("distillation.reward = @kd_reward()", "optima_policy.gamma = 0.5"))
    assert split_bindings("a.b = 'x;y'; c.d = [1; 2]; ") == ["a.b = 'x;y'", "c.d = [1; 2]"]
    assert parse_seeds("0,1,2") == (0, 1, 2)
    for bad in ("distillation.policy = @x", "my variant=a.b = 1", "=a.b = 1"):
        with pytest.raises(ConfigError, match="variant"):
            parse_variant(bad)
    for bad in ("", "0,0", "-1", "a"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def test_variants_file(tmp_path):
    path = tmp_path / "arms.toml"
    path.write_text('seeds = 5\nbindings = ["distillation.rounds = 4"]\n\n[optima]\n\n'
                    '[layerwise]\nbindings = ["distillation.policy = @layerwise_policy"]\n\n'
                    '[fixed-image]\nbindings = ["distillation.policy = @fixed_policy", "fixed_policy.arm = 0"]\n'
                    'seeds = 3\n')
    variants, common, seeds = load_variants_file(str(path))
    assert [v.name for v in variants] == ["optima", "layerwise", "fixed-image"]
    assert variants[2] == Variant("fixed-image", ("distillation.policy = @fixed_policy", "fixed_policy.arm = 0"),
                                  (0, 1, 2))
    assert common == ("distillation.rounds = 4",) and seeds == (0, 1, 2, 3, 4)
    sweep = Sweep("tests/gin/tiny_ve.gin", variants, tmp_path / "s", common, seeds)
    assert [(j.label) for j in sweep.jobs()][-4:] == ["layerwise/seed-4", "fixed-image/seed-0",
                                                       "fixed-image/seed-1", "fixed-image/seed-2"]
    assert len(sweep.jobs()) == 13
    for text, match in (('["a b"]\n', "variant name"), ("[x]\nbinding = []\n", "unknown key"),
                        ("seeds = 0\n[x]\n", "seeds must be"), ("rounds = 3\n[x]\n", "unknown top-level"),
                        ("[x]\nbindings = 'a.b = 1'\n", "list of strings"), ("seeds = [1\n", "not a TOML"),
                        ("seeds = 2\n", "no variants")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=match) as e:
            load_variants_file(str(path))
        assert str(path) in str(e.value)


def test_statistics_and_ties(tmp_path):
    def job(variant, seed, acc, status="done"):
        j = Job(variant, seed, ("distillation.policy = @x",) if variant == "b" else (), (), tmp_path, tmp_path)
        j.status, j.metrics = status, ({"student/accuracy": acc} if status == "done" else {})
        return j

    jobs = [job("a", 0, 0.90), job("a", 1, 0.92), job("a", 2, 0.94), job("b", 0, 0.80), job("b", 1, 0.81),
            job("b", 2, 0.0, "failed"), job("b", 3, float("nan"))]  # metrics.json holds NaN as null
    stats = summarize(jobs)["student/accuracy"]
    assert stats["a"].median == pytest.approx(0.92) and stats["a"].std == pytest.approx(0.02)
    assert stats["b"].n == 2 and stats["b"].mean == pytest.approx(0.805)
    lines = results_csv(jobs).splitlines()
    assert lines[0] == "variant,seed,status,distillation.policy,student/accuracy,wall_s,run_dir,error"
    assert lines[4].startswith("b,0,done,@x,0.8,")


def test_results_md_gives_medians_of_skewed_seeds(tmp_path):
    """Skewed values, where median and mean differ: one seed far off is what
    medians are for. a: 0.10, 0.20, 0.90 (median 0.2, mean 0.4); b, four seeds:
    0.30, 0.40, 0.50, 1.00 (median 0.45, mean 0.55, std 0.3109)."""
    def job(variant, seed, acc):
        j = Job(variant, seed, (), (), tmp_path, tmp_path)
        j.status, j.metrics = "done", {"student/accuracy": acc}
        return j

    jobs = [job("a", 0, 0.10), job("a", 1, 0.20), job("a", 2, 0.90),
            job("b", 0, 0.50), job("b", 1, 1.00), job("b", 2, 0.30), job("b", 3, 0.40)]
    stats = summarize(jobs)["student/accuracy"]
    assert (stats["a"].median, stats["a"].mean) == (pytest.approx(0.2), pytest.approx(0.4))
    assert (stats["b"].median, stats["b"].mean) == (pytest.approx(0.45), pytest.approx(0.55))
    md = results_markdown(Sweep("tests/gin/tiny_ve.gin", [Variant("a"), Variant("b")], tmp_path / "s"), jobs)
    assert "| a | 0.2000 | 0.4000 | 0.4359 | 3 |  |" in md  # the reference (no layerwise: the first variant)
    # b against a, paired on seeds 0-2: differences +0.4, +0.8, -0.6, mean +0.2000, an interval holding 0
    row = next(line for line in md.splitlines() if line.startswith("| b |"))
    assert row.startswith("| b | 0.4500 | 0.5500 | 0.3109 | 4 | +0.2000 [") and row.endswith("tie (3 seeds) |")


def test_sweep_refuses_another_config_in_its_directory(tmp_path):
    sweep = Sweep("tests/gin/tiny_ve.gin", [Variant("a")], tmp_path / "s")
    sweep.save_grid("optima sweep ...")
    with pytest.raises(ConfigError, match="holds a sweep of tests/gin/tiny_ve.gin"):
        Sweep("gin/snlive_tiny6.gin", [Variant("a")], tmp_path / "s")
    with pytest.raises(ConfigError, match="common bindings"):
        Sweep("tests/gin/tiny_ve.gin", [Variant("a")], tmp_path / "s", ["distillation.rounds = 2"])
    # seeds accumulate
    assert Sweep("tests/gin/tiny_ve.gin", [Variant("a", (), (1,))], tmp_path / "s").grid == [Variant("a", (), (0, 1))]


def test_dry_run_lists_runs_and_commands(tmp_path):
    result = CliRunner().invoke(app, ["sweep", "tests/gin/tiny_ve.gin", "--variant", LAYERWISE, "--seeds", "0,3",
                                      "--sweep-dir", str(tmp_path / "s"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "layerwise/seed-3" in result.output and "pending" in result.output
    assert not (tmp_path / "s").exists()
    result = CliRunner().invoke(app, ["sweep", "tests/gin/tiny_ve.gin", "--variants", str(tmp_path / "none.toml")])
    assert result.exit_code == 2 and "no such variants file" in result.output


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding an advisory lock on `path` until its stdin closes."""
    hold = "import fcntl, sys; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); " \
           "sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_one_sweep_process_per_directory(tmp_path):
    (tmp_path / "sweep").mkdir()
    holder = _hold_lock(tmp_path / "sweep" / ".sweep.lock")
    try:
        code, out = _sweep(tmp_path, "--variant", "optima=")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert code == 2 and "is being swept by another optima sweep process" in out
    assert not (tmp_path / "sweep" / "optima").exists()


def test_a_cache_without_file_locks_is_a_warning_not_a_traceback(tmp_path, monkeypatch):
    """NFS without lockd or Lustre mounted noflock refuse flock: the run says so
    and goes on without the lock (only the guard against duplicate work is lost)."""
    import errno
    import fcntl

    from optima.experiment import _held_locks, _lock_stage
    from optima.reporting import Reporter

    messages = []

    class Messages(Reporter):
        def on_message(self, text):
            messages.append(text)

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    path = tmp_path / "teacher-abc.safetensors"
    _lock_stage(path, "teacher", Messages(), None)
    assert not _held_locks
    assert len(messages) == 1 and messages[0].startswith(
        f"teacher: the cache's filesystem cannot lock {tmp_path / '.locks' / (path.name + '.lock')} "
        f"(Function not implemented); going on without the lock")


def test_stage_lock_makes_a_second_process_wait(tmp_path):
    """The lock that keeps two parallel runs from training the same teacher: while
    another process holds a stage's lock, a run waits (and says so), then goes on."""
    from optima.experiment import _lock_stage, _release_stage_locks
    from optima.reporting import Reporter

    messages = []

    class Messages(Reporter):
        def on_message(self, text):
            messages.append(text)

    path = tmp_path / "teacher-abc.safetensors"
    (tmp_path / ".locks").mkdir()
    holder = _hold_lock(tmp_path / ".locks" / f"{path.name}.lock")  # another run is training this stage
    entered = threading.Event()

    def second_run():
        _lock_stage(path, "teacher", Messages(), None)
        entered.set()
        _release_stage_locks()

    thread = threading.Thread(target=second_run)
    thread.start()
    deadline = time.monotonic() + 30
    while not messages and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert not entered.is_set()
    assert messages == ["teacher: another run is making teacher-abc.safetensors; waiting to reuse it"]
    holder.stdin.close()  # the first run is done
    holder.wait(timeout=30)
    thread.join(timeout=30)
    assert entered.is_set()


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "gin" / "sweeps").glob("*.toml")))
def test_shipped_variants_files_are_valid_quickstart_variants(path):
    from optima import config as cfg
    from optima.experiment import experiment

    variants, common, _ = load_variants_file(path)
    cfg.setup()
    for v in variants:
        cfg.parse(["gin/quickstart.gin"], [*common, *v.bindings])
        experiment(None, validate_only=True)


# --- a killed sweep, plugin files, the live display ---------------------------------------

def _processes_running(run_dir: Path, parent: int | None = None) -> list[int]:
    """The pids of the processes of `optima run ... run_dir` (its data loader's workers
    too, unless `parent`: only the children of that process)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"optima.cli.main" in cmdline and str(run_dir).encode() in cmdline and parent in (None, ppid):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_killed_sweep_takes_its_runs_with_it_and_the_rerun_resumes(tmp_path, monkeypatch):
    """SIGKILL of `optima sweep`: its running `optima run` gets SIGTERM (it saves a
    checkpoint and ends), and a rerun started at once waits for it, then resumes
    it. Not on a terminal, the sweep's lines come as they happen (flushed)."""
    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))
    sweep = tmp_path / "sweep"
    long_run = ["-b", "distillation.rounds = 30", "-b", "distillation.checkpoint_every = 1000"]
    cmd = [sys.executable, "-m", "optima.cli.main", "sweep", "tests/gin/tiny_ve.gin", *COMMON, *long_run,
           "--sweep-dir", str(sweep), "--variant", "optima="]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "COLUMNS": "80"})
    lines = [process.stdout.readline()]  # the header, then the run's start, while it runs
    while "starting optima/seed-0" not in lines[-1] and len(lines) < 6:
        lines.append(process.stdout.readline())
    assert "[0/1 done, ETA ?] starting optima/seed-0" in lines[-1] and process.poll() is None, lines
    log, run_dir = sweep / "optima" / "seed-0.log", sweep / "optima" / "seed-0"
    deadline = time.monotonic() + 300
    while not (log.exists() and "student: round 2 " in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.1)
    (run,) = _processes_running(run_dir, parent=process.pid)
    process.kill()
    process.wait()
    code, out = _sweep(tmp_path, *long_run, "--variant", "optima=")  # at once: the run may still be saving
    assert code == 0, out
    assert not _processes_running(run_dir) and not Path(f"/proc/{run}").exists()
    first, second = ("\n" + log.read_text()).split("\n# ")[1:]
    assert "interrupted by SIGTERM" in first and "checkpoint saved" in first, first
    assert "--resume" in second.splitlines()[0] and "student: resumed from" in second
    row, = _rows(sweep)
    assert row["status"] == "done"


def test_sweep_takes_package_files_for_config_and_variants(tmp_path, monkeypatch):
    """`package:path` names a plugin's shipped gin file and variants file, as for `optima run`."""
    package = tmp_path / "optima_sweep_example"
    (package / "gin").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "gin" / "tiny.gin").write_text((ROOT / "tests" / "gin" / "tiny_ve.gin").read_text())
    (package / "variants.toml").write_text('seeds = 2\n[layerwise]\nbindings = ["distillation.policy = '
                                           '@layerwise_policy"]\n[slurm]\npartition = "gpu"\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(app, ["sweep", "optima_sweep_example:gin/tiny.gin", "--variants",
                                      "optima_sweep_example:variants.toml", "--sweep-dir", str(tmp_path / "s"),
                                      "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "1 variant(s), 2 run(s)" in out and "layerwise/seed-1" in out  # [slurm] is not a variant
    assert "optima run optima_sweep_example:gin/tiny.gin" in out
    sweep = Sweep("optima_sweep_example:gin/tiny.gin", [Variant("a")], tmp_path / "s",
                  config_file=str(package / "gin" / "tiny.gin"))
    sweep.save_grid("optima sweep ...")  # a rerun with the same package file is the same sweep
    Sweep("optima_sweep_example:gin/tiny.gin", [Variant("a")], tmp_path / "s", config_file=str(package / "gin" / "tiny.gin"))
    for args, says in ((["optima_sweep_example:gin/none.gin"], "has no file gin/none.gin"),
                       (["tests/gin/tiny_ve.gin", "--variants", "optima_sweep_example:none.toml"],
                        "has no file none.toml")):
        result = CliRunner().invoke(app, ["sweep", *args, "--dry-run"], env={"COLUMNS": "200"})
        assert result.exit_code == 2 and says in result.output, result.output


@pytest.mark.slow
def test_live_display_fits_80_columns_on_a_terminal(tmp_path):
    """In a terminal 80 columns wide: the sweep's bar with runs done/total, its
    ETA and each running run's last line, every line within 80 columns."""
    import fcntl
    import pty
    import struct
    import termios

    env = {**os.environ, "COLUMNS": "80", "LINES": "24", "TERM": "xterm", "OPTIMA_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "optima.cli.main", "sweep", "tests/gin/tiny_ve.gin", *COMMON,
           "--sweep-dir", str(tmp_path / "sweep"), "--variant", "optima=", "--variant", LAYERWISE]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the sweep in a pseudo-terminal
        os.chdir(ROOT)
        os.execve(sys.executable, cmd, env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child has ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert os.waitstatus_to_exitcode(status) == 0, out
    lines = re.split(r"\r\n|\r|\n", out)
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    bars = [line for line in lines if line.startswith("runs ")]
    assert any(re.search(r"━+.* 0/2 .*ETA \?", line) for line in bars), bars
    assert any(re.search(r" 1/2 .*ETA \d+m\d\ds", line) for line in bars), bars
    assert any(re.match(r"(optima|layerwise)/seed-0 .*(student: round|teacher|starting)", line) for line in lines)
    assert any(line.startswith("done optima/seed-0") for line in lines)


def test_hparams_of_finished_runs(tmp_path):
    """The HParams entries: variant, seed and the variants' bindings, numbers where they are numbers."""
    from optima.sweep import hparams_of

    def job(variant, seed, bindings, status="done"):
        j = Job(variant, seed, bindings, (), tmp_path, tmp_path)
        j.status, j.metrics = status, {"student/accuracy": 0.5}
        return j

    values, discrete = hparams_of([
        job("optima", 0, ()), job("fast", 0, ("optima_policy.gamma = 0.5", "distillation.policy = @x")),
        job("slow", 1, ("optima_policy.gamma = 0.9",)), job("broken", 0, ("optima_policy.gamma = 'a'",), "failed")])
    assert values == {
        "optima/seed-0": {"variant": "optima", "seed": 0, "distillation.policy": "(config)"},
        "fast/seed-0": {"variant": "fast", "seed": 0, "optima_policy.gamma": 0.5, "distillation.policy": "@x"},
        "slow/seed-1": {"variant": "slow", "seed": 1, "optima_policy.gamma": 0.9, "distillation.policy": "(config)"}}
    assert discrete == {"variant": ["fast", "optima", "slow"], "distillation.policy": ["(config)", "@x"]}
