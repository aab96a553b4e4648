"""Several processes (gloo on the CPU, 2 processes): each rank distils its shard
of every batch and every rank plays the arms a single process plays with the
same global batch, with the same losses within float tolerance; ranks that
disagree stop; a 2-process run stopped by SIGTERM on one rank saves, stops
both, and its resume ends as the single-process run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import ROOT, TINY_COCA
from optima import distributed
from optima.arms import ArmSpace
from optima.engine import BatchStream, Distiller, Network
from optima.experiment import linear_warmup_decay, param_groups
from optima.plugins.heads.vl_heads import attentional_pooler_head
from optima.plugins.losses.optima_loss import optima_loss
from optima.plugins.models.coca import coca_model
from optima.plugins.policies.paper import ThompsonPolicy
from optima.plugins.rewards.loss_decrement import combined_reward
from optima.plugins.tasks.synthetic_ve import SyntheticVisualEntailment

# 45 examples in batches of 8: 5 batches of 8, then one of 5, split 2 + 3 over
# two processes (their losses weighted by rows); 5 rounds of 2 steps cross it.
ROUNDS, TRAIN = 5, 45


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distiller() -> Distiller:
    torch.manual_seed(0)
    task = SyntheticVisualEntailment(image_size=32, context_length=12, train_size=TRAIN, val_size=0, test_size=8)
    t_model = coca_model(TINY_COCA, layers=(2, 2, 2))
    teacher = Network(t_model, attentional_pooler_head(t_model, task))
    s_model = coca_model(TINY_COCA, layers=(1, 1, 1))
    student = Network(s_model, attentional_pooler_head(s_model, task))
    loss = optima_loss(s_model.distill_modules(), t_model.distill_modules())
    arms = ArmSpace(s_model.module_names())
    opt = torch.optim.AdamW(param_groups([student.model], [student.head, loss], 5e-3), lr=1e-3)
    return Distiller(teacher=teacher, student=student, task=task, loss=loss, arms=arms,
                     policy=ThompsonPolicy(len(arms), warmup_rounds=len(arms), variance_scale=1e-3, seed=3),
                     reward=combined_reward(), optimizer=opt, scheduler=linear_warmup_decay(opt, 2 * ROUNDS, 2),
                     stream=BatchStream(task, "train", 8, 1, torch.device("cpu")), steps_per_round=2,
                     rounds=ROUNDS, device=torch.device("cpu"))


def _history(d: Distiller) -> dict:
    return {"arms": [r.arm for r in d.history], "rewards": [r.reward for r in d.history],
            "totals": [dict(r.losses.total) for r in d.history],
            "per_module": [{m: dict(v) for m, v in r.losses.per_module.items()} for r in d.history],
            "weights": {k: v.tolist() for k, v in d.student.state_dict().items() if "resblocks.0.mlp.c_fc" in k}}


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init()
    d = _distiller()
    d.run()
    record = _history(d)
    try:
        distributed.check_same(rank, "a value that differs on purpose")
    except distributed.RanksDisagree as e:
        record["disagreement"] = str(e)
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    distributed.shutdown()


def test_two_processes_play_the_arms_of_one_with_the_same_losses(tmp_path):
    """Both ranks play the single process's arms, get its rewards and round
    losses (float tolerance: the batch is summed in another order), and end
    with its weights; `check_same` stops both ranks, naming every rank's value."""
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    d = _distiller()
    d.run()
    single = _history(d)
    assert len(set(single["arms"])) > 2  # warm-up and Thompson sampling: several arms
    # Pinned (the ranks are compared with the single process, today's code on both
    # sides): the single process's arms and first round. Deterministic on the CPU
    # with one thread; the tolerance is for another CPU's rounding. To update on
    # purpose: print `_history(d)` after `d = _distiller(); d.run()`, check that
    # the change is the one intended, and say why in the commit.
    assert single["arms"] == [5, 5, 3, 4, 6]
    assert single["totals"][0] == pytest.approx({"task": 2.2123438119888306, "kd": 0.039076780900359154,
                                                 "hidden": 8.316817283630371, "attn": 0.005451552337035537}, rel=1e-6)
    for got in ranks:
        assert got["arms"] == single["arms"]
        assert got["rewards"][0] is None and got["rewards"][1:] == pytest.approx(single["rewards"][1:], rel=1e-3)
        for mine, theirs in zip(got["totals"], single["totals"]):
            assert mine == pytest.approx(theirs, rel=1e-5)
        for mine, theirs in zip(got["per_module"], single["per_module"]):
            assert mine.keys() == theirs.keys()
            for module in mine:
                assert mine[module] == pytest.approx(theirs[module], rel=1e-5)
        for name, w in got["weights"].items():
            assert torch.allclose(torch.tensor(w), torch.tensor(single["weights"][name]), atol=1e-5)
        assert got["disagreement"] == ("the ranks disagree on a value that differs on purpose: rank 0: 0, rank 1: 1; "
                                       "every rank must compute the same value (a policy must draw only from its own "
                                       "generator, seeded alike on every rank); stopped")
    assert ranks[0] == ranks[1]


# --- the CLI under torchrun --------------------------------------------------------------

BINDINGS = [
    "synthetic_ve_task.train_size = 64", "synthetic_ve_task.test_size = 32", "synthetic_ve_task.val_size = 0",
    "teacher_training.steps = 4", "teacher_training.warmup_steps = 0", "teacher_training.batch_size = 8",
    "distillation.rounds = 4", "distillation.steps_per_round = 2", "distillation.batch_size = 8",
    "distillation.warmup_steps = 0", "distillation.arms = [['image'], ['text', 'multimodal'], ['text']]",
    "optima_policy.warmup_rounds = 3",
]


def _optima(args: list[str], cache: Path, processes: int = 1, **env: str) -> subprocess.CompletedProcess:
    optima = str(Path(sys.executable).parent / "optima")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
              "--master-port", str(_free_port()), optima] if processes > 1 else [optima]
    bindings = [x for b in BINDINGS for x in ("-b", b)]
    return subprocess.run([*launch, "run", "tests/gin/tiny_ve.gin", *bindings, *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=900,
                          env={**os.environ, "OPTIMA_CACHE": str(cache), "OMP_NUM_THREADS": "1", **env})


EXIT_PROBE = """
import atexit, gc, os, sys
from torch.nn.parallel import DistributedDataParallel

def alive():  # what the interpreter's teardown would free (after atexit) instead of the run
    n = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"rank {os.environ['RANK']}: DDP models alive at exit: {n}", file=sys.stderr)

atexit.register(alive)
sys.argv[0] = "optima"
from optima.cli.main import main
main()
"""


@pytest.mark.slow
def test_a_stopped_torchrun_run_frees_its_models_before_the_interpreter_exits(tmp_path):
    """A stopped run's DDP model (and its gloo process group) are cyclic garbage
    of its error's frames: freed in the interpreter's teardown, gloo's threads
    once aborted a rank (SIGABRT instead of 143). `main` collects them first."""
    probe = tmp_path / "optima_probe.py"
    probe.write_text(EXIT_PROBE)
    bindings = [x for b in BINDINGS for x in ("-b", b)]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(_free_port()), str(probe), "run", "tests/gin/tiny_ve.gin", *bindings, "--run-dir",
                           str(tmp_path / "ddp")], cwd=ROOT, text=True, capture_output=True, timeout=900,
                          env={**os.environ, "OPTIMA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
                               "OPTIMA_TEST_KILL_AT": "step:3", "OPTIMA_TEST_KILL_SIGNAL": "TERM",
                               "OPTIMA_TEST_KILL_RANK": "1"})
    assert "interrupted by SIGTERM after step 3" in done.stderr, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: DDP models alive at exit: 0" in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_sigterm_on_one_rank_saves_stops_both_and_resumes(tmp_path):
    """`torchrun --nproc-per-node 2 optima run`: the teacher is fine-tuned and the
    student distilled on two processes. SIGTERM to rank 1 after distillation
    step 3: rank 0 saves a checkpoint, both ranks stop with exit code 143 and
    name it; `--resume` ends with the single-process run's arms and metrics."""
    single = _optima(["--run-dir", str(tmp_path / "single")], tmp_path / "cache1")
    assert single.returncode == 0, single.stderr[-2000:]
    run = tmp_path / "ddp"
    stopped = _optima(["--run-dir", str(run)], tmp_path / "cache2", processes=2, OPTIMA_TEST_KILL_AT="step:3",
                      OPTIMA_TEST_KILL_SIGNAL="TERM", OPTIMA_TEST_KILL_RANK="1")
    assert stopped.returncode != 0
    saved = run / "checkpoints" / "student" / "step-000000003"
    for who in ("optima: error", "optima (rank 1): error"):
        assert f"{who}: interrupted by SIGTERM after step 3 of student (round 2); checkpoint saved to {saved}" \
            in stopped.stderr.replace("\n", ""), stopped.stderr[-3000:]
    assert stopped.stderr.count("exitcode  : 143") == 2  # torchrun's report: both ranks stopped, neither killed
    resumed = _optima(["--resume", str(run)], tmp_path / "cache2", processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "student: resumed from" in resumed.stdout
    want, got = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "single", run))
    assert got["stages"]["student"]["plays"] == want["stages"]["student"]["plays"]
    assert got["stages"]["student"]["rewards"][1:] == pytest.approx(want["stages"]["student"]["rewards"][1:],
                                                                    rel=1e-3)
    assert got["metrics"] == want["metrics"]
    # rank 0 alone writes: one TensorBoard run per stage, the run's figures, one round log
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == ["figures", "student", "summary", "teacher"]
    assert sorted(p.name for p in (run / "rounds").iterdir()) == ["student.jsonl"]
