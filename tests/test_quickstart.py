"""The quickstart end to end with tiny bindings, and what it leaves behind."""
import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from optima.cli.main import app

TINY = [
    "synthetic_ve_task.train_size = 256", "synthetic_ve_task.test_size = 64", "synthetic_ve_task.val_size = 0",
    "teacher_training.steps = 4", "teacher_training.warmup_steps = 0", "teacher_training.batch_size = 16",
    "distillation.rounds = 4", "distillation.steps_per_round = 2", "distillation.batch_size = 16",
    "distillation.warmup_steps = 0", "optima_policy.warmup_rounds = 7",
]


def _run(run_dir, *extra):
    args = ["run", "gin/quickstart.gin", "--run-dir", str(run_dir)]
    for b in TINY + list(extra):
        args += ["-b", b]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))  # the teacher is trained here, then reused
    out = _run(tmp_path / "run")
    run = tmp_path / "run"
    assert "test accuracy" in out and "teacher" in out and "student" in out
    header, body = (run / "config.gin").read_text().split("\n", 1)
    assert header.startswith("# optima run gin/quickstart.gin") and "distillation.rounds = 4" in body
    operative = (run / "operative_config.gin").read_text()
    assert "optima_policy.variance_scale = 0.001" in operative
    summary = json.loads((run / "metrics.json").read_text())
    stage = summary["stages"]["student"]
    assert len(stage["plays"]) == 4 and stage["rewards"][0] is None
    assert all(0.0 <= r <= 1.0 for r in stage["rewards"][1:])
    assert 0.0 <= summary["metrics"]["student"]["accuracy"] <= 1.0
    assert (run / "student.safetensors").exists()

    def scalars(stage_dir):
        events = EventAccumulator(str(stage_dir))
        events.Reload()
        return events, set(events.Tags()["scalars"])

    tb = run / "tensorboard"
    _, teacher_tags = scalars(tb / "teacher")
    assert "loss/total/task" in teacher_tags
    events, tags = scalars(tb / "student")
    for term in ("task", "kd", "hidden", "attn"):  # the combined reward reads every layer term
        assert f"loss/total/{term}" in tags and f"round/total/{term}" in tags
    for term in ("hidden", "attn"):
        assert f"loss/arm/{term}" in tags and f"round/arm/{term}" in tags
        assert {f"round/module/{m}/{term}" for m in ("image", "text", "multimodal")} <= tags
    assert {"plays/arm", "plays/entropy", "round/reward", "policy/entropy"} <= tags
    for arm in ("image", "text+multimodal", "image+text+multimodal"):
        assert f"policy/mean/{arm}" in tags and f"plays/count/{arm}" in tags and f"policy/sd/{arm}" in tags
    assert len(events.Scalars("loss/total/kd")) == 8  # one per step
    assert [int(e.value) for e in events.Scalars("plays/arm")] == stage["plays"]
    assert [e.step for e in events.Scalars("plays/arm")] == [2, 4, 6, 8]  # at the step each round ended
    assert len(events.Scalars("round/reward")) == 3  # no reward in the first round
    _, summary_tags = scalars(tb / "summary")
    assert {"eval/teacher/accuracy", "eval/student/accuracy"} <= summary_tags

    # the teacher is cached: a second run reuses it and logs no teacher step
    out2 = _run(tmp_path / "run2", "distillation.reward = @kd_reward()")
    assert "teacher: reusing" in out2
    assert not (tmp_path / "run2" / "tensorboard" / "teacher").exists()
    assert "distillation.reward = @kd_reward()" in (tmp_path / "run2" / "operative_config.gin").read_text()
    # the same student stage again is reused as well
    out3 = _run(tmp_path / "run3", "distillation.reward = @kd_reward()")
    assert "student: reusing" in out3
