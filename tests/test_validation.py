"""Bad bindings are refused before any heavy work: one line naming the binding
and what it allows, exit code 2, no run directory made, nothing trained."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from optima.cli.main import app

QUICK = "tests/gin/tiny_ve.gin"

#: (bindings, the one line must contain each of these)
BAD = [
    (["optima_policy.gamma = 0"], ["optima_policy.gamma = 0", "must be a number in (0, 1]"]),
    (["optima_policy.gamma = 1.5"], ["optima_policy.gamma = 1.5", "must be a number in (0, 1]"]),
    (["optima_policy.variance_scale = -1.0"],
     ["optima_policy.variance_scale = -1.0", "must be 'auto' or a number > 0"]),
    (["optima_policy.variance_scale = 'a lot'"],
     ["optima_policy.variance_scale = 'a lot'", "must be 'auto' or a number > 0"]),
    (["optima_policy.warmup = 'shuffled'"], ["optima_policy.warmup = 'shuffled'", "one of 'random', 'round_robin'"]),
    (["optima_policy.warmup_rounds = 3"],
     ["optima_policy.warmup_rounds = 3", "must be an integer >= the number of arms (7)"]),
    (["distillation.arms = [['image'], ['text']]", "optima_policy.warmup_rounds = 1"],
     ["optima_policy.warmup_rounds = 1", "the number of arms (2)"]),
    (["distillation.steps_per_round = 0"], ["distillation.steps_per_round = 0", "must be an integer >= 1"]),
    (["distillation.rounds = 2.5"], ["distillation.rounds = 2.5", "must be an integer >= 1"]),
    (["student/distillation.rounds = -1"], ["student/distillation.rounds = -1", "must be an integer >= 1"]),
    (["distillation.batch_size = 0"], ["distillation.batch_size = 0", "must be an integer >= 1"]),
    (["teacher_training.batch_size = 0"], ["teacher_training.batch_size = 0", "must be an integer >= 1"]),
    (["teacher_training.steps = -5"], ["teacher_training.steps = -5", "must be an integer >= 0"]),
    (["experiment.eval_batch_size = 0"], ["experiment.eval_batch_size = 0", "must be an integer >= 1"]),
    (["distillation.warmup_steps = -1"], ["distillation.warmup_steps = -1", "must be an integer >= 0"]),
    (["optima_loss.kd_weight = -1.0"], ["optima_loss.kd_weight = -1.0", "must be a number >= 0"]),
    (["optima_loss.attn_weight = 'a lot'"], ["optima_loss.attn_weight = 'a lot'", "must be a number >= 0"]),
    (["optima_loss.temperature = 0.0"], ["optima_loss.temperature = 0.0", "must be a number > 0"]),
    (["distillation.arms = [['image'], ['audio']]"],
     ["distillation.arms = [['image'], ['audio']]", "'audio'", "valid modules: image, text, multimodal"]),
    (["distillation.policy = @fixed_policy", "fixed_policy.arm = 7"],
     ["fixed_policy.arm = 7", "must be an integer in [-7, 6]"]),
    (["distillation.on_nonfinite = 'ignore'"], ["distillation.on_nonfinite = 'ignore'", "one of 'skip', 'stop'"]),
    (["distillation.compile = 1"], ["distillation.compile = 1", "True, False or a torch.compile backend name"]),
    (["experiment.data_workers = -1"], ["experiment.data_workers = -1", "must be an integer >= 0"]),
    (["distillation.checkpoint_every = 0"], ["distillation.checkpoint_every = 0", "must be an integer >= 1"]),
    (["teacher_training.keep_checkpoints = 0"], ["teacher_training.keep_checkpoints = 0", "must be an integer >= 1"]),
    (["distillation.grad_clip = -1.0"], ["distillation.grad_clip = -1.0", "a number >= 0 (or None)"]),
    (["experiment.seed = -1"], ["experiment.seed = -1", "must be an integer in [0, "]),
    (["experiment.device = 'gpu'"], ["experiment.device = 'gpu'", "'auto', 'cpu', 'cuda'"]),
    (["student/torch.optim.AdamW.lr = -0.1"], ["student/torch.optim.AdamW.lr = -0.1 must be a number > 0"]),
]


@pytest.mark.parametrize("bindings, expected", BAD, ids=[b[0] for b, _ in BAD])
def test_bad_binding_is_one_line_naming_it_with_exit_code_2(bindings, expected, tmp_path, monkeypatch):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv("OPTIMA_CACHE", str(cache))
    args = ["run", QUICK, "--run-dir", str(run_dir)]
    for b in bindings:
        args += ["-b", b]
    result = CliRunner().invoke(app, args)
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("optima: error: ")
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    # before any heavy work: no run directory made, nothing trained or cached
    assert not run_dir.exists() and not cache.exists()


def test_a_scoped_optimizer_binding_is_checked_in_its_own_scope(tmp_path, monkeypatch):
    """gin/quickstart.gin distils a stage `tiny6` with `@student/torch.optim.AdamW`:
    gin reads `student/...` bindings there, and so must the check of `lr`."""
    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["run", "gin/quickstart.gin", "--run-dir", str(tmp_path / "run"),
                                      "-b", "student/torch.optim.AdamW.lr = 'fast'"])
    assert (result.exit_code, result.output.strip()) == (
        2, "optima: error: student/torch.optim.AdamW.lr = 'fast' must be a number > 0"), result.output


def test_the_shipped_quickstart_is_valid():
    from optima import config
    from optima.experiment import experiment

    config.setup()
    config.parse(["gin/quickstart.gin"])
    assert experiment(None, validate_only=True) == {}
