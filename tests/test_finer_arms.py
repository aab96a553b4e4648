"""Finer arms (the paper's future work): arms over layer groups inside modules,
declared by `distillation.arm_groups`; the engine distils exactly the arm's
layers; `grouped_ts_policy` learns one effect per unit, so it scales to the
larger arm space; checkpoints, TensorBoard tags and `--dry-run` handle it."""
from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from conftest import TINY_COCA
from optima.arms import ArmSpace, build_policy, layer_groups
from optima.cli.main import app
from optima.engine import BatchStream, Distiller, Network
from optima.errors import ConfigError
from optima.experiment import linear_warmup_decay, param_groups
from optima.plugins.heads.vl_heads import attentional_pooler_head
from optima.plugins.losses.optima_loss import optima_loss
from optima.plugins.models.coca import coca_model
from optima.plugins.policies.grouped import GroupedThompsonPolicy
from optima.plugins.policies.thompson import DiscountedThompsonPolicy
from optima.plugins.rewards.loss_decrement import combined_reward
from optima.plugins.tasks.synthetic_ve import SyntheticVisualEntailment

LAYERS = {"image": 2, "text": 2, "multimodal": 2}


def test_layer_groups_split_modules_into_consecutive_halves():
    units = layer_groups(LAYERS, 2)
    assert units == {"image.1": ("image", (0,)), "image.2": ("image", (1,)), "text.1": ("text", (0,)),
                     "text.2": ("text", (1,)), "multimodal.1": ("multimodal", (0,)),
                     "multimodal.2": ("multimodal", (1,))}
    assert layer_groups({"image": 5}, 2) == {"image.1": ("image", (0, 1, 2)), "image.2": ("image", (3, 4))}
    assert layer_groups({"image": 4, "text": 2}, {"image": [1, 3]}) == {
        "image.1": ("image", (0,)), "image.2": ("image", (1, 2, 3)), "text": ("text", (0, 1))}
    assert layer_groups(LAYERS, 1) == {m: (m, (0, 1)) for m in LAYERS}


@pytest.mark.parametrize("groups, message", [
    (3, "module 'image' has 2 layer(s): it can be split into 1 to 2 groups, not 3"),
    (0, "it can be split into 1 to 2 groups, not 0"),
    ({"audio": 2}, "unknown module(s) ['audio']"),
    ({"image": [1, 2]}, "group sizes [1, 2] must be integers >= 1 summing to its 2 layer(s)"),
    ("two", "a number of groups or a list of group sizes"),
])
def test_bad_groups_are_refused(groups, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        layer_groups(LAYERS, groups)


def test_grouped_arm_space_maps_arms_to_layers():
    space = ArmSpace(list(LAYERS), units=layer_groups(LAYERS, 2))
    assert len(space) == 63 and space.grouped
    assert space.labels()[:2] == ["image.1", "image.2"] and space.labels()[-1] == "+".join(layer_groups(LAYERS, 2))
    k = space.index(["text.2", "image.1"])
    assert space.label(k) == "image.1+text.2" and space.modules_of(k) == ("image", "text")
    keys = [(m, i) for m in LAYERS for i in range(2)]
    assert space.layers(k, keys) == {("image", 0), ("text", 1)}
    features = space.features()
    assert len(features) == 63 and features[k] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    explicit = ArmSpace(list(LAYERS), [["image.1"], ["image.2", "multimodal.2"]], layer_groups(LAYERS, 2))
    assert explicit.labels() == ["image.1", "image.2+multimodal.2"]
    with pytest.raises(ConfigError, match="unknown unit"):
        ArmSpace(list(LAYERS), [["image"]], layer_groups(LAYERS, 2))
    with pytest.raises(ConfigError, match="make 131071 arms"):
        ArmSpace(["m"], units={f"m.{i}": ("m", (i,)) for i in range(17)})


def test_module_arms_are_unchanged():
    space = ArmSpace(list(LAYERS))
    assert space.labels() == ["image", "text", "multimodal", "image+text", "image+multimodal", "text+multimodal",
                              "image+text+multimodal"]
    assert not space.grouped and space.modules_of(3) == ("image", "text")
    assert space.layers(3, [("image", 0), ("text", 5), ("multimodal", 0)]) == {("image", 0), ("text", 5)}


def test_build_policy_passes_arm_features_only_to_policies_that_take_them():
    space = ArmSpace(list(LAYERS), units=layer_groups(LAYERS, 2))
    grouped = build_policy(GroupedThompsonPolicy, len(space), 0, space.features())
    assert grouped.num_units == 6
    plain = build_policy(DiscountedThompsonPolicy, len(space), 0, space.features())
    assert plain.num_arms == 63


def test_build_policy_sees_through_gin_configurables_and_scopes():
    """gin wraps a configurable class (its `__init__` takes *args, **kwargs) and a
    scoped reference in a function: the arm features must still reach the policy."""
    import gin

    from optima import config

    config.setup(external_plugins=False)
    config.parse(["gin/quickstart.gin"], ["distillation.policy = @scoped/grouped_ts_policy",
                                           "scoped/grouped_ts_policy.gamma = 0.5"])
    factory = gin.get_bindings("distillation")["policy"]
    space = ArmSpace(list(LAYERS), units=layer_groups(LAYERS, 2))
    policy = build_policy(factory, len(space), 0, space.features())
    assert policy.num_units == 6 and policy.gamma == 0.5
    config.parse(["gin/quickstart_finer_arms.gin"])
    assert build_policy(gin.get_bindings("distillation")["policy"], 63, 0, space.features()).num_units == 6
    gin.clear_config()


def _additive(features, effects, sd, seed):
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor(features, dtype=torch.float64) @ torch.tensor(effects, dtype=torch.float64)

    def draw(arm):
        return float(means[arm] + sd * torch.randn((), generator=g, dtype=torch.float64))
    return draw, means


def test_grouped_ts_finds_the_best_set_of_units_among_63_arms_in_40_rounds():
    """Rewards add up over units (two help, four hurt; the best arm pays 0.05,
    the average arm 0.0): a policy with one belief per arm has not tried every
    arm once after 40 rounds; per-unit effects are learnt from every round."""
    space = ArmSpace(list(LAYERS), units=layer_groups(LAYERS, 2))
    effects = [0.02, -0.01, 0.03, -0.01, -0.02, -0.005]
    best = space.index(["image.1", "text.1"])
    regret = {"grouped": [], "per_arm": []}
    for seed in range(5):
        draw, means = _additive(space.features(), effects, 0.005, seed)
        assert int(torch.argmax(means)) == best
        for name, policy in (("grouped", build_policy(GroupedThompsonPolicy, 63, seed, space.features())),
                             ("per_arm", DiscountedThompsonPolicy(63, seed=seed))):
            arms = []
            for _ in range(40):
                arm = policy.select()
                policy.update(arm, draw(arm))
                arms.append(arm)
            regret[name].append(float(means[best] - means[arms[-10:]].mean()))  # per round, last 10 rounds
    # within 0.015 of the best arm's 0.05 on every seed (measured 0.005-0.010), while one
    # belief per arm is still warming up (measured 0.056)
    assert max(regret["grouped"]) <= 0.015, regret
    assert min(regret["per_arm"]) >= 0.04, regret


def test_grouped_ts_reports_per_unit_effects():
    space = ArmSpace(list(LAYERS), units=layer_groups(LAYERS, 2))
    policy = build_policy(GroupedThompsonPolicy, 63, 0, space.features())
    draw, _ = _additive(space.features(), [0.02, -0.01, 0.03, -0.01, -0.02, -0.005], 0.002, 0)
    for _ in range(60):
        arm = policy.select()
        policy.update(arm, draw(arm))
    d = policy.diagnostics()
    assert d["unit_effect"].shape == (6,) and d["mean"].shape == (63,)
    # the helpful units (often played together, so their split is uncertain) above 0, a hurting one below
    assert min(d["unit_effect"][0], d["unit_effect"][2]) > 0 > d["unit_effect"][4]
    other = build_policy(GroupedThompsonPolicy, 7, 0, ArmSpace(list(LAYERS)).features())
    with pytest.raises(ConfigError, match="arms"):
        other.load_state_dict(policy.state_dict())


def _distiller(policy_factory, rounds=3) -> Distiller:
    torch.manual_seed(0)
    task = SyntheticVisualEntailment(image_size=32, context_length=12, train_size=32, val_size=0, test_size=8)
    t_model, s_model = coca_model(TINY_COCA), coca_model(TINY_COCA, layers=(2, 2, 2))
    teacher = Network(t_model, attentional_pooler_head(t_model, task))
    student = Network(s_model, attentional_pooler_head(s_model, task))
    loss = optima_loss(s_model.distill_modules(), t_model.distill_modules())
    arms = ArmSpace.of_model(s_model, None, 2)
    opt = torch.optim.AdamW(param_groups([student.model], [student.head, loss], None), lr=1e-3)
    return Distiller(teacher=teacher, student=student, task=task, loss=loss, arms=arms,
                     policy=build_policy(policy_factory, len(arms), 0, arms.features()), reward=combined_reward(),
                     optimizer=opt, scheduler=linear_warmup_decay(opt, 2 * rounds),
                     stream=BatchStream(task, "train", 8, 1, torch.device("cpu")), steps_per_round=2, rounds=rounds,
                     device=torch.device("cpu"))


def test_the_engine_distils_exactly_the_arms_layer_groups():
    d = _distiller(GroupedThompsonPolicy)
    k = d.arms.index(["image.2", "multimodal.1"])
    assert d.arm_layers(k) == {("image", 1), ("multimodal", 0)}
    seen = []
    original = d.loss.forward

    def spy(student, teacher, task_loss, arm_layers, need):
        seen.append(arm_layers)
        return original(student, teacher, task_loss, arm_layers, need)

    d.loss.forward = spy
    history = d.run()
    for result, layers in zip(history, seen[::2]):
        assert layers == d.arm_layers(result.arm)
        assert result.losses.arm == d.arms.modules_of(result.arm)  # the reward sees the touched modules
    # exact resume: a fresh distiller loaded from the state plays the same next arms
    state = d.state_dict()
    more = [d.play_round().arm for _ in range(2)]
    e = _distiller(GroupedThompsonPolicy)
    e.load_state_dict(state)
    assert [e.play_round().arm for _ in range(2)] == more
    d.close()
    e.close()


TINY = [  # the quickstart (gin/synthetic/ve_tiny6.gin), tiny
    "pretraining.steps = 1", "pretraining.batch_size = 8", "corpus/world_captions_task.train_size = 16",
    "world_ve_task.train_size = 128", "world_ve_task.test_size = 16",
    "teacher_training.steps = 2", "teacher_training.warmup_steps = 0", "teacher_training.batch_size = 16",
    "distillation.rounds = 4", "distillation.steps_per_round = 2", "distillation.batch_size = 16",
    "distillation.warmup_steps = 0", "distillation.checkpoint_every = 2",
]


def test_finer_arms_config_runs_and_reports_units(tmp_path):
    run = tmp_path / "run"
    args = ["run", "gin/quickstart_finer_arms.gin", "--run-dir", str(run)]
    for b in TINY:
        args += ["-b", b]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stage = json.loads((run / "metrics.json").read_text())["stages"]["tiny6"]
    assert len(stage["arms"]) == 63 and stage["arms"][0] == "image.1" and len(stage["plays"]) == 4
    ea = EventAccumulator(str(run / "tensorboard" / "tiny6"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"policy/unit_effect/image.1", "policy/unit_sd/multimodal.2", "plays/count/image.1+text.2"} <= tags
    assert any(t.startswith("policy/mean/") for t in tags)
    assert list((run / "checkpoints" / "tiny6").iterdir())  # checkpointed like any run
    header, *rounds = [json.loads(line) for line in (run / "rounds" / "tiny6.jsonl").read_text().splitlines()]
    assert header["units"] == ["image.1", "image.2", "text.1", "text.2", "multimodal.1", "multimodal.2"]
    assert len(rounds[-1]["policy"]["unit_effect"]) == 6 and len(rounds[-1]["policy"]["mean"]) == 63
    assert {p.name for p in (run / "figures").glob("*.png")} == {"tiny6-unit-effect.png", "tiny6-unit-plays.png"}
    dry = CliRunner().invoke(app, ["run", "gin/quickstart_finer_arms.gin", "--dry-run"])
    assert dry.exit_code == 0 and "63 arms" in dry.output and "unit image.2: image layer 1" in dry.output


@pytest.mark.parametrize("bindings, expected", [
    (["distillation.arm_groups = 3"],
     "distillation.arm_groups = 3: module 'image' has 2 layer(s): it can be split into 1 to 2 groups, not 3"),
    (["distillation.arm_groups = 2"],
     "optima_policy.warmup_rounds = 7 must be an integer >= the number of arms (63), so that every arm is "
     "played once"),
    (["distillation.arm_groups = 2", "distillation.policy = @grouped_ts_policy",
      "distillation.arms = [['image.1'], ['image']]"],
     "distillation.arms = [['image.1'], ['image']]: arm ['image'] names unknown unit(s) ['image']"),
])
def test_bad_finer_arm_bindings_are_one_line(bindings, expected, tmp_path):
    args = ["run", "gin/quickstart.gin", "--run-dir", str(tmp_path / "run")]
    for b in bindings:
        args += ["-b", b]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"optima: error: {expected}"), lines[0]
