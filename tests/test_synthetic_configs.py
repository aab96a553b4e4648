"""gin/synthetic/: every config resolves (dry run), and each task's pipeline runs
end to end at tiny sizes: pretraining (cached, shared by the tasks), teacher,
student from sampled BASE layers, distillation, evaluation."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optima.cli.main import app
from optima.plugins.tasks.synthetic_world.world import VOCAB_SIZE

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "gin" / "synthetic").glob("*.gin") if p.name != "common.gin")
TASKS = {"ve": "world_ve_task", "vqa": "world_vqa_task", "nlvr2": "world_nlvr2_task",
         "captions": "world_captions_task"}


def tiny(task: str) -> list[str]:
    """Bindings that shrink every stage of a synthetic config to seconds."""
    return ["pretraining.steps = 2", "pretraining.batch_size = 8", "corpus/world_captions_task.train_size = 32",
            "teacher_training.steps = 2", "teacher_training.batch_size = 8", "teacher_training.warmup_steps = 0",
            f"{TASKS[task]}.train_size = 48", f"{TASKS[task]}.test_size = 8",
            "distillation.rounds = 2", "distillation.steps_per_round = 2", "distillation.batch_size = 8",
            "distillation.warmup_steps = 0", "optima_policy.warmup_rounds = 7"]


def test_every_task_and_student_has_a_config():
    base = sorted(f"{t}_{s}.gin" for t in TASKS for s in ("tiny12", "tiny6"))
    # the rest are variants of one of them, `<task>_<student>_<what>.gin`, built on it
    extra = [c for c in CONFIGS if c not in base]
    assert set(base) <= set(CONFIGS) and extra == ["ve_tiny6_long.gin"]
    for name in extra:
        parent = "_".join(name.split("_")[:2])
        assert f"include 'synthetic/{parent}.gin'" in (ROOT / "gin" / "synthetic" / name).read_text()


@pytest.mark.parametrize("name", CONFIGS)
def test_dry_run(name):
    result = CliRunner().invoke(app, ["run", f"gin/synthetic/{name}", "--dry-run"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "large" in out and "base" in out and "teacher" in out and "7 arms" in out
    student = name.split("_")[1].removesuffix(".gin")
    # students keep every 2nd (Tiny12) or 4th (Tiny6) BASE layer; the layer map to the teacher's 8/4/4
    image = "[1, 3, 5, 7]" if student == "tiny12" else "[3, 7]"
    assert f"{student}: layer map image: student layer i -> teacher layer {image}" in out


def test_the_vocabulary_fits_the_models():
    text = (ROOT / "gin" / "synthetic" / "common.gin").read_text()
    assert text.count(f"'vocab_size': {VOCAB_SIZE}") == 4 and f"WORLD_VOCAB = {VOCAB_SIZE}" in text


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_end_to_end_at_tiny_sizes(task, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))
    args = ["run", f"gin/synthetic/{task}_tiny6.gin", "--run-dir", str(tmp_path / "run")]
    for b in tiny(task):
        args += ["-b", b]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(summary["stages"]) == ["large", "base", "teacher", "tiny6"]
    assert summary["stages"]["large"]["cached"] is False
    metric = "cider" if task == "captions" else "accuracy"
    assert set(summary["metrics"]) == {"teacher", "tiny6"}
    assert all(summary["metrics"][n][metric] >= 0 for n in ("teacher", "tiny6"))
    assert summary["params_M"]["tiny6"] < summary["params_M"]["teacher"]
    # a second run reuses every stage it shares
    again = CliRunner().invoke(app, args[:2] + ["--run-dir", str(tmp_path / "again")] + args[4:])
    out = " ".join(again.output.split())
    assert again.exit_code == 0 and "large: reusing" in out and "base: reusing" in out and "teacher: reusing" in out
    if task == "ve":  # the student's export evaluates alone: it does not need BASE's checkpoint to start from
        export = tmp_path / "export"
        assert CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(export)]).exit_code == 0
        ev = CliRunner().invoke(app, ["eval", f"gin/synthetic/{task}_tiny6.gin", "--checkpoint", str(export),
                                      "--out", str(tmp_path / "eval"), *args[4:]])
        assert ev.exit_code == 0, ev.output
        evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        assert evaluated["stage"] == "tiny6" and evaluated["metrics"] == summary["metrics"]["tiny6"]
