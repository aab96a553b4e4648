"""The stages as `optima.experiment` builds them from a gin file, not as a test
would build them by hand: what reaches the optimizer, the learning-rate schedule,
gradient clipping, and the policy's seed. Each of these could be wrong while
every loss stays finite and every metric in range, so each is checked by value."""
from __future__ import annotations

import math

import gin
import pytest
import torch

from conftest import TINY
from optima import config
from optima.experiment import distillation, experiment, teacher_training
from optima.reporting import Reporter
from optima.stages import TEACHER

CPU = torch.device("cpu")
# the student of tests/gin/tiny_ve.gin at its smallest; everything else as TINY has it
SMALL = [*TINY, "student/coca_model.layers = (1, 1, 1)"]


class Steps(Reporter):
    """What the loops report at each step: the learning rate after it."""

    def __init__(self):
        self.lrs: list[float] = []

    def on_step(self, stage, step, losses, lr):
        self.lrs.append(lr)


def _parsed(*bindings: str):
    config.setup(external_plugins=False)
    config.parse(["tests/gin/tiny_ve.gin"], [*SMALL, *bindings])
    spec = config.declared()
    return spec, spec.task()


def pipeline_distiller(*bindings: str, seed: int = 0, reporter: Reporter | None = None):
    """The student stage's `Distiller`, built by `optima.experiment.distillation`
    in the stage's gin scope, as a run builds it (teacher untrained)."""
    spec, task = _parsed(*bindings)
    teacher = spec.network(TEACHER, task, CPU)
    student = spec.network("student", task, CPU)
    with gin.config_scope("student"):
        return distillation("student", teacher, student, task, seed, CPU, reporter or Reporter())


def _params(d) -> list[torch.Tensor]:
    return [p for g in d.optimizer.param_groups for p in g["params"]]


def test_the_pipelines_optimizer_holds_the_layer_projections():
    d = pipeline_distiller()
    in_optimizer = {id(p) for p in _params(d)}
    projections = list(d.loss.proj.parameters())
    assert projections, "optima_loss has a projection per student layer"
    assert all(id(p) in in_optimizer for p in projections), "the projections are not trained"
    # and nothing else is missing: the student (model and head) and the loss, each parameter once
    trainable = {id(p) for module in (d.student, d.loss) for p in module.parameters() if p.requires_grad}
    assert in_optimizer == trainable and len(_params(d)) == len(trainable)
    assert not any(id(p) in in_optimizer for p in d.teacher.parameters())


def test_head_lr_goes_to_the_new_parts_head_and_projections():
    d = pipeline_distiller("distillation.head_lr = 5e-3")
    pretrained, new = d.optimizer.param_groups
    assert (pretrained["lr"], new["lr"]) == (pytest.approx(1e-3), pytest.approx(5e-3))
    in_new = {id(p) for p in new["params"]}
    assert {id(p) for p in d.loss.parameters()} <= in_new
    assert {id(p) for p in d.student.model.parameters()}.isdisjoint(in_new)
    assert {id(p) for p in d.student.head.parameters()} - {id(p) for p in d.student.model.parameters()} <= in_new


def test_a_distillation_stage_warms_up_then_decays_linearly_to_zero():
    # 4 rounds x 2 steps = 8 steps, 3 of warm-up, lr 1e-3 (tests/gin/tiny_ve.gin):
    # step k (0-based) runs at lr * (k + 1) / 3 while k < 3, then lr * (8 - k) / 5
    steps = Steps()
    d = pipeline_distiller("distillation.warmup_steps = 3", reporter=steps)
    used = [d.optimizer.param_groups[0]["lr"]]
    d.run()
    used += steps.lrs[:-1]  # each step reports the lr of the next one
    expected = [1 / 3, 2 / 3, 1, 1, 0.8, 0.6, 0.4, 0.2]
    assert used == pytest.approx([1e-3 * f for f in expected], rel=1e-9)
    assert steps.lrs[-1] == 0.0  # decayed to zero at the last step


def test_the_teacher_warms_up_then_decays_linearly_to_zero(tmp_path):
    spec, task = _parsed("teacher_training.steps = 6", "teacher_training.warmup_steps = 2",
                         "teacher/coca_model.layers = (1, 1, 1)")
    network = spec.network(TEACHER, task, CPU)
    steps = Steps()
    with gin.config_scope(TEACHER):
        teacher_training(network, task, 0, CPU, steps, tmp_path)
    # after step k (1-based): (k + 1) / 2 while k < 2, then (6 - k) / 4; lr 3e-4
    assert steps.lrs == pytest.approx([3e-4 * f for f in (1, 1, 0.75, 0.5, 0.25, 0)], rel=1e-9)


def _update_norm(grad_clip: float) -> float:
    """The size of the first update of a pipeline-built stage with plain SGD at lr 1
    (the update is then minus the gradient, after clipping)."""
    d = pipeline_distiller("distillation.optimizer = @student/torch.optim.SGD", "student/torch.optim.SGD.lr = 1.0",
                           "distillation.steps_per_round = 1", f"distillation.grad_clip = {grad_clip}")
    before = [p.detach().clone() for p in _params(d)]
    d.play_round()
    return math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(_params(d), before)))


def test_gradient_clipping_bounds_the_update_not_just_the_logged_norm():
    unclipped = _update_norm(1e6)
    assert unclipped > 0.1  # the premise: this step's gradient is far larger than the clip below
    assert _update_norm(0.01) == pytest.approx(0.01, rel=1e-4)


class _Stop(Exception):
    pass


def _policy_of_a_run(seed: int, tmp_path, monkeypatch):
    """The policy `optima.experiment.experiment` builds for the first student of a
    run with `experiment.seed = seed` (the run is stopped there)."""
    import optima.experiment as exp

    built = []

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        raise _Stop

    real = exp.build_policy
    monkeypatch.setattr(exp, "build_policy", spy)
    config.setup(external_plugins=False)
    config.parse(["tests/gin/tiny_ve.gin"], [*SMALL, "teacher_training.steps = 0", f"experiment.seed = {seed}"])
    with pytest.raises(_Stop):
        experiment(str(tmp_path / f"run-{seed}"))
    monkeypatch.setattr(exp, "build_policy", real)
    return built[0]


def _arms_played(policy, rounds: int = 20) -> list[int]:
    plays = []
    for _ in range(rounds):
        arm = policy.select()
        policy.update(arm, 0.01 * (arm + 1))  # the same rewards for every policy
        plays.append(arm)
    return plays


def test_each_experiment_seed_gives_the_policy_its_own_seed(tmp_path, monkeypatch):
    plays = {seed: _arms_played(_policy_of_a_run(seed, tmp_path, monkeypatch)) for seed in (0, 1, 2)}
    assert _arms_played(_policy_of_a_run(1, tmp_path / "again", monkeypatch)) == plays[1]  # a seed is a seed
    # seeds that gave the policy one seed would play alike: the spread over seeds would be understated
    assert len({tuple(p) for p in plays.values()}) == 3, plays
