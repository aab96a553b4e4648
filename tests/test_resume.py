"""Exact resume: a run killed anywhere (SIGKILL mid-round, mid-save, in the
teacher's training; SIGTERM) and resumed ends exactly as the uninterrupted run
(arms, rewards, final metrics, weights, bit for bit on the CPU); a changed
config is refused unless forced; another architecture is refused by name."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from conftest import ROOT, TINY_COCA
from optima.arms import ArmSpace
from optima.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state
from optima.cli.main import app
from optima.engine import BatchStream, Distiller, Network
from optima.experiment import linear_warmup_decay, param_groups
from optima.plugins.models.coca import coca_model
from optima.plugins.heads.vl_heads import attentional_pooler_head
from optima.plugins.losses.optima_loss import optima_loss
from optima.plugins.policies.paper import ThompsonPolicy
from optima.plugins.rewards.loss_decrement import combined_reward
from optima.plugins.tasks.synthetic_ve import SyntheticVisualEntailment
from optima.program import program
from optima.reporting import read_round_log, text_records

# 3 arms; 6 rounds of T = 2 steps (warm-up: 3 updates, Thompson sampling from
# round 5); 64 examples in batches of 8 (the data order turns over at step 8);
# a checkpoint every 2 rounds (2 kept); teacher: 4 steps, checkpoints every 2.
ROUNDS = 6
BINDINGS = [
    "synthetic_ve_task.train_size = 64", "synthetic_ve_task.test_size = 32", "synthetic_ve_task.val_size = 0",
    "teacher_training.steps = 4", "teacher_training.warmup_steps = 0", "teacher_training.batch_size = 8",
    "teacher_training.checkpoint_every = 2",
    f"distillation.rounds = {ROUNDS}", "distillation.steps_per_round = 2", "distillation.batch_size = 8",
    "distillation.warmup_steps = 0", "distillation.arms = [['image'], ['text', 'multimodal'], ['text']]",
    "optima_policy.warmup_rounds = 3", "distillation.checkpoint_every = 2", "distillation.keep_checkpoints = 2",
]
ARGS = [x for b in BINDINGS for x in ("-b", b)]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (conftest's default is 2): OpenMP threads that spin on a
    busy 2-core machine make these runs several times slower."""
    torch.set_num_threads(1)


# --- in process: the Distiller's state -------------------------------------------------

def _distiller(init_seed: int, layers=(1, 1, 1)) -> Distiller:
    """The same teacher and task every time; the student and projections
    initialised from `init_seed`."""
    torch.manual_seed(0)
    task = SyntheticVisualEntailment(image_size=32, context_length=12, train_size=40, val_size=0, test_size=8)
    t_model = coca_model(TINY_COCA)
    teacher = Network(t_model, attentional_pooler_head(t_model, task))
    torch.manual_seed(init_seed)
    s_model = coca_model(TINY_COCA, layers=layers)
    student = Network(s_model, attentional_pooler_head(s_model, task))
    loss = optima_loss(s_model.distill_modules(), t_model.distill_modules())
    arms = ArmSpace(s_model.module_names())
    opt = torch.optim.AdamW(param_groups([student.model], [student.head, loss], 5e-3), lr=1e-3)
    return Distiller(teacher=teacher, student=student, task=task, loss=loss, arms=arms,
                     policy=ThompsonPolicy(len(arms), warmup_rounds=len(arms), variance_scale=1e-3, seed=3),
                     reward=combined_reward(), optimizer=opt, scheduler=linear_warmup_decay(opt, 18, 3),
                     stream=BatchStream(task, "train", 8, 1, torch.device("cpu")), steps_per_round=2, rounds=9,
                     device=torch.device("cpu"))


def _history(d: Distiller):
    return [(r.round, r.arm, r.reward, r.losses) for r in d.history]


# Pinned: what the reference distiller plays and measures. The test below
# compares a resumed run with an uninterrupted one, both of today's code; these
# values notice when both change together (data order, initialisation, the loss,
# the reward, the policy). Torch on the CPU with one thread is deterministic, and
# CI runs on the same kind of machine; the tolerances leave room for another
# CPU's float rounding, not for another behaviour. To update on purpose: print
# `[r.arm for r in d.history]`, the rewards and round 1's totals of
# `_distiller(0).run()`, check that the change is the one intended, and say why
# in the commit.
PINNED_ARMS = [5, 5, 3, 4, 6, 0, 2, 1, 6]
PINNED_REWARDS = [None, 0.06960914249332227, 0.06888610616209424, 0.0932241436492318, 0.41654635275262825,
                  0.07856776435407663, 0.026749994633520416, 0.09081686314277992, 0.19942357639931596]
PINNED_ROUND_1 = {"task": 2.150570273399353, "kd": 0.024852711707353592, "hidden": 9.123040676116943,
                  "attn": 0.006220875307917595}


def assert_pinned(d: Distiller) -> None:
    assert [r.arm for r in d.history] == PINNED_ARMS
    assert dict(d.history[0].losses.total) == pytest.approx(PINNED_ROUND_1, rel=1e-6)
    assert d.history[0].reward is None
    assert [r.reward for r in d.history[1:]] == pytest.approx(PINNED_REWARDS[1:], rel=1e-5)


def test_a_distiller_restored_mid_round_continues_exactly(tmp_path):
    """Saved at step 11 (mid-round, after the data turned over at step 5 and 10,
    while Thompson sampling draws), restored into a differently initialised one."""
    manager = CheckpointManager(tmp_path)
    reference = _distiller(0)

    def save_at_11(d):
        if d.step == 11:
            assert d.in_round
            manager.save({"loop": d.state_dict(), "rng": rng_state()}, step=d.step, round=d.round)

    reference.run(after_step=save_at_11)
    assert_pinned(reference)
    torch.manual_seed(1234)  # the restored run must not depend on what came before
    resumed = _distiller(7)
    found = manager.latest()
    resumed.load_state_dict(found.state["loop"], source=str(found.path))
    set_rng_state(found.state["rng"])
    assert resumed.step == 11 and resumed.round == 6 and resumed.in_round
    resumed.run()
    assert _history(resumed) == _history(reference)
    assert not resumed.policy.in_warmup  # round 9 was drawn by Thompson sampling, after the resume
    for name, value in reference.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name
    for name, value in reference.loss.state_dict().items():
        assert torch.equal(value, resumed.loss.state_dict()[name]), name


def test_a_state_of_another_architecture_is_refused_naming_keys(tmp_path):
    d = _distiller(0)
    d.run(1)
    other = _distiller(5, layers=(1, 1, 2))
    with pytest.raises(CheckpointError) as info:
        other.load_state_dict(d.state_dict(), source="ckpt")
    message = str(info.value)
    assert "another architecture for the student" in message and "missing model." in message


# --- the CLI: refusals --------------------------------------------------------------------

def _cli(*args):
    result = CliRunner().invoke(app, ["run", "tests/gin/tiny_ve.gin", *args])
    lines = [l for l in result.output.splitlines() if l.startswith("optima: error:")]
    return result.exit_code, lines[-1] if lines else "", result.output


def test_resume_needs_a_run_directory(tmp_path):
    code, line, _ = _cli("--resume", str(tmp_path))
    assert code == 2 and "not a run directory (it has no config.gin)" in line
    code, line, _ = _cli("--force")
    assert code == 2 and "--force only applies with --resume" in line
    code, line, _ = _cli("--run-dir", str(tmp_path / "a"), "--resume", str(tmp_path / "b"))
    assert code == 2 and "not both" in line


def test_a_run_directory_in_use_is_refused(tmp_path):
    import fcntl

    from optima import config
    from optima.cli.run import LOCK

    config.setup()
    config.parse(["tests/gin/tiny_ve.gin"], BINDINGS)
    import gin

    (tmp_path / "config.gin").write_text("# optima run tests/gin/tiny_ve.gin\n" + gin.config_str())
    with open(tmp_path / LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, line, _ = _cli(*ARGS, "--resume", str(tmp_path))
    assert code == 2 and "in use by another optima process" in line


@pytest.mark.slow
def test_interrupt_then_changed_config_is_refused_unless_forced(tmp_path, monkeypatch):
    import optima.experiment as experiment_module

    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))  # no stage reused from another test
    run = tmp_path / "run"
    base = ARGS + ["-b", "distillation.rounds = 4"]

    def sigint_at_step_3(where, n):  # as if Ctrl-C came during step 3
        if (where, n) == ("step", 3):
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(experiment_module, "fault_point", sigint_at_step_3)
        code, line, out = _cli("--run-dir", str(run), *base)
    assert code == 130, out
    assert "interrupted by SIGINT after step 3 of student (round 2); checkpoint saved to " in line
    assert shlex.split(line.split("; resume with: ")[1]) == [
        program(), "run", "tests/gin/tiny_ve.gin", *base, "--resume", str(run)]
    saved = Path(line.split("checkpoint saved to ")[1].split(";")[0])
    assert saved.name == "step-000000003" and CheckpointManager.load(saved).manifest["round"] == 2

    changed = base + ["-b", "optima_policy.gamma = 0.5", "-b", "distillation.rounds = 5"]
    code, line, _ = _cli(*changed, "--resume", str(run))
    assert code == 2
    assert (f"--resume {run}: the config differs from the run's in 2 binding(s): distillation.rounds (4 -> 5); "
            "optima_policy.gamma (0.9 -> 0.5); pass the same file and bindings, or add --force") in line

    # forced, but the student is another architecture: refused by name, the run left as it was
    config_before = (run / "config.gin").read_text()
    code, line, _ = _cli(*base, "-b", "student/coca_model.layers = (1, 2, 2)", "--resume", str(run), "--force")
    assert code == 2
    assert "holds another architecture for the student: unexpected model." in line
    assert (run / "config.gin").read_text() == config_before

    # operational bindings may change; the run finishes
    code, line, out = _cli(*base, "-b", "distillation.checkpoint_every = 3", "--resume", str(run))
    assert code == 0, out
    assert "student: resumed from" in out and "step-000000003" in out.replace("\n", "")
    stage = json.loads((run / "metrics.json").read_text())["stages"]["student"]
    assert len(stage["plays"]) == 4 and stage["resumed_from_step"] == 3


def test_a_torn_last_line_of_the_round_log_is_dropped_with_one_warning(tmp_path, monkeypatch):
    """A crash while a round's line is appended leaves half a line at the end of
    rounds/<stage>.jsonl: `optima report` and `--resume` drop it with one
    warning; the resumed run's log holds every round once."""
    import optima.experiment as experiment_module

    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    base = ARGS + ["-b", "distillation.rounds = 4"]

    def sigint_at_step_5(where, n):
        if (where, n) == ("step", 5):
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(experiment_module, "fault_point", sigint_at_step_5)
        code, _, out = _cli("--run-dir", str(run), *base)
    assert code == 130, out
    log = run / "rounds" / "student.jsonl"
    whole = log.read_text()
    assert whole.count("\n") == 3  # the header and rounds 1, 2
    log.write_text(whole + '{"round": 3, "step": 6, "arm": 1, "arm_la')  # what the crash left
    warned = f"optima: warning: {log}: its last line (4) was cut short (the run stopped while writing it); dropped it"

    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert [l for l in result.output.splitlines() if "warning" in l] == [warned]

    code, _, out = _cli(*base, "--resume", str(run))
    assert code == 0, out
    assert [l for l in out.splitlines() if "cut short" in l] == [warned]
    _, rounds = read_round_log(log)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert [r["arm"] for r in rounds] == json.loads((run / "metrics.json").read_text())["stages"]["student"]["plays"]


@pytest.mark.slow
def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from optima import checkpoint

    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))  # no stage reused from another test
    run = tmp_path / "run"
    write = checkpoint._write_tensors

    def disk_full_at_round_4(path, tensors):
        if path.parent.name == ".step-000000008.tmp" and path.parent.parent.name == "student":
            path.write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, tensors)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "_write_tensors", disk_full_at_round_4)
        code, line, out = _cli("--run-dir", str(run), *ARGS, "-b", "distillation.rounds = 4")
    assert code == 1, out
    checkpoints = run / "checkpoints" / "student"
    assert (f"could not write checkpoint {checkpoints / 'step-000000008'}: no space left on device" in line
            and f"the previous checkpoint {checkpoints / 'step-000000004'} is intact; resume with: " in line)
    assert [p.name for p in checkpoints.iterdir()] == ["step-000000004"]
    CheckpointManager.load(checkpoints / "step-000000004")
    assert not (run / "metrics.json").exists()


# --- processes killed and resumed ----------------------------------------------------------
#
# Every run below is its own process, forked from one "zygote" process that has
# imported optima, torch and the plugins but run nothing (so no thread pool is
# forked): each run then costs its training only, not ~5 s of imports. A killed
# run leaves only what it wrote to disk; its resume is another fresh process.

ZYGOTE = r"""
import json, os, sys
from optima import config
config.setup()
import optima.cli.main, optima.cli.run, optima.experiment  # noqa: F401  (imports only, no torch work)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.clear()
        os.environ.update(job["env"])
        for fd, path in ((1, job["out"]), (2, job["err"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = ["optima", *job["args"]]
        code = 1
        try:
            optima.cli.main.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Runs:
    """`optima run` in fresh processes (forked from the zygote)."""

    def __init__(self, base: Path):
        self.base, self.count = base, 0
        self.zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=ROOT, env=_env(base / "unused"),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def start(self, args, cache: Path, **env) -> tuple[int, Path, Path]:
        self.count += 1
        out, err = self.base / f"run{self.count}.out", self.base / f"run{self.count}.err"
        job = {"args": ["run", "tests/gin/tiny_ve.gin", *map(str, args)], "env": _env(cache, **env),
               "out": str(out), "err": str(err)}
        self.zygote.stdin.write(json.dumps(job) + "\n")
        self.zygote.stdin.flush()
        return json.loads(self.zygote.stdout.readline())["pid"], out, err

    def wait(self) -> int:
        return json.loads(self.zygote.stdout.readline())["returncode"]

    def __call__(self, args, cache: Path, **env) -> subprocess.CompletedProcess:
        _, out, err = self.start(args, cache, **env)
        code = self.wait()
        return subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())

    def close(self) -> None:
        self.zygote.stdin.close()
        self.zygote.wait(timeout=60)


def _env(cache: Path, **extra) -> dict:
    # one torch thread: bit-exactness needs the same thread count in every run, and
    # on a shared 2-core machine spinning OpenMP threads cost far more than they give
    env = {k: v for k, v in os.environ.items() if k != "OPTIMA_TEST_KILL_AT"}
    return {**env, "OPTIMA_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1",
            **extra}


def _outcome(run_dir: Path):
    summary = json.loads((run_dir / "metrics.json").read_text())
    stage = summary["stages"]["student"]
    return {"plays": stage["plays"], "rewards": stage["rewards"], "metrics": summary["metrics"],
            "student": load_file(run_dir / "student.safetensors"),
            "teacher": load_file(summary["stages"]["teacher"]["path"])}


def _assert_tensorboard_shows_each_step_once(run_dir: Path, plays: list[int], teacher_steps: int) -> None:
    """The resumed run's new event files purge what the killed attempt logged
    after its checkpoint: TensorBoard's own reader sees every step once."""
    tb = run_dir / "tensorboard"

    def scalars(stage: str, tag: str):
        events = EventAccumulator(str(tb / stage))
        events.Reload()
        return events.Scalars(tag)

    if teacher_steps:
        assert [e.step for e in scalars("teacher", "loss/total/task")] == list(range(1, teacher_steps + 1))
    else:  # reused from the cache: nothing logged
        assert not (tb / "teacher").exists()
    assert [e.step for e in scalars("student", "loss/total/task")] == list(range(1, 2 * ROUNDS + 1))
    arms = text_records(tb / "student", "plays/arm")  # the played arm, as TensorBoard's server reads it
    assert [step for step, _ in arms] == list(range(2, 2 * ROUNDS + 1, 2))
    assert [int(text.rsplit("(arm ", 1)[1].rstrip(")")) for _, text in arms] == plays
    assert len(scalars("summary", "eval/student/accuracy")) == 1
    # the per-round log drops the rounds logged after the checkpoint as well
    _, rounds = read_round_log(run_dir / "rounds" / "student.jsonl")
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert [r["arm"] for r in rounds] == plays


def _assert_same(outcome, reference):
    assert outcome["plays"] == reference["plays"]
    assert outcome["rewards"] == reference["rewards"]  # floats, exactly
    assert outcome["metrics"] == reference["metrics"]
    for net in ("student", "teacher"):
        assert outcome[net].keys() == reference[net].keys()
        for name, value in reference[net].items():
            assert torch.equal(outcome[net][name], value), f"{net} {name}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not hasattr(os, "fork"):
        pytest.skip("os.fork is unavailable on this platform; the kill-and-resume tests fork each run from a helper process (POSIX only)")
    runs = Runs(tmp_path_factory.mktemp("runs"))
    yield runs
    runs.close()


@pytest.fixture(scope="module")
def reference(runs, tmp_path_factory):
    """The uninterrupted run, and its cache (which holds the trained teacher)."""
    base = tmp_path_factory.mktemp("reference")
    result = runs(["--run-dir", base / "run", *ARGS], base / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = _outcome(base / "run")
    assert len(outcome["plays"]) == ROUNDS
    return outcome, base / "cache"


def _warm_cache(reference_cache: Path, cache: Path) -> None:
    cache.mkdir()
    for teacher in reference_cache.glob("teacher-*.safetensors"):
        shutil.copy(teacher, cache / teacher.name)


@pytest.mark.slow
def test_sigkill_mid_round_and_a_truncated_checkpoint(runs, reference, tmp_path):
    """Killed in round 5 (after step 9); the newest checkpoint (round 4) is then
    truncated, so the resume falls back to round 2, with a warning."""
    ref, ref_cache = reference
    _warm_cache(ref_cache, tmp_path / "cache")
    run = tmp_path / "run"
    killed = runs(["--run-dir", run, *ARGS], tmp_path / "cache", OPTIMA_TEST_KILL_AT="step:9")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoints = run / "checkpoints" / "student"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000000004", "step-000000008"]
    newest = checkpoints / "step-000000008" / "tensors.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])

    resumed = runs([*ARGS, "--resume", run], tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "warning: checkpoint" in resumed.stdout and "step-000000008 is corrupt" in resumed.stdout
    assert f"student: resumed from {checkpoints / 'step-000000004'} (round 2, step 4)" in resumed.stdout
    _assert_same(_outcome(run), ref)
    _assert_tensorboard_shows_each_step_once(run, ref["plays"], teacher_steps=0)


@pytest.mark.slow
def test_sigkill_mid_save(runs, reference, tmp_path):
    """Killed while writing its third checkpoint (round 6, the last): the
    half-written one is a hidden .tmp directory, never used, removed on resume."""
    ref, ref_cache = reference
    _warm_cache(ref_cache, tmp_path / "cache")
    run = tmp_path / "run"
    killed = runs(["--run-dir", run, *ARGS], tmp_path / "cache", OPTIMA_TEST_KILL_AT="save:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoints = run / "checkpoints" / "student"
    half = checkpoints / ".step-000000012.tmp"
    assert half.is_dir() and (half / "tensors.safetensors").exists() and not (half / "manifest.json").exists()
    assert sorted(p.name for p in CheckpointManager(checkpoints).paths()) == ["step-000000004", "step-000000008"]

    resumed = runs([*ARGS, "--resume", run], tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "(round 4, step 8)" in resumed.stdout and not half.exists()
    _assert_same(_outcome(run), ref)


@pytest.mark.slow
def test_sigkill_in_the_teachers_training(runs, reference, tmp_path):
    """Killed after teacher step 3 (a checkpoint at step 2), nothing cached yet."""
    ref, _ = reference
    run = tmp_path / "run"
    killed = runs(["--run-dir", run, *ARGS], tmp_path / "cache", OPTIMA_TEST_KILL_AT="teacher:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not list((tmp_path / "cache").glob("teacher-*"))

    resumed = runs([*ARGS, "--resume", run], tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "teacher: resumed from" in resumed.stdout and "(step 2)" in resumed.stdout
    _assert_same(_outcome(run), ref)
    _assert_tensorboard_shows_each_step_once(run, ref["plays"], teacher_steps=4)


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_says_how_to_resume(runs, reference, tmp_path):
    ref, ref_cache = reference
    _warm_cache(ref_cache, tmp_path / "cache")
    run = tmp_path / "run"
    pid, out, err = runs.start(["--run-dir", run, *ARGS], tmp_path / "cache")
    deadline = time.monotonic() + 600
    while "student: round 1 " not in (out.read_text() if out.exists() else ""):  # SIGTERM once round 1 is done
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    assert runs.wait() == 143, out.read_text() + err.read_text()
    line = err.read_text().strip().splitlines()[-1]
    assert line.startswith("optima: error: interrupted by SIGTERM after step ")
    saved = Path(line.split("checkpoint saved to ")[1].split(";")[0])
    assert CheckpointManager.load(saved).step >= 2  # loadable, and not older than round 1

    command = shlex.split(line.split("resume with: ")[1])
    assert command[:3] == [program(), "run", "tests/gin/tiny_ve.gin"] and command[-2:] == ["--resume", str(run)]
    resumed = runs(command[3:], tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _assert_same(_outcome(run), ref)
