"""Rewards that see the task (held-out task loss, binary gain), the advantage over
every arm's recent rewards, the empty arm and the normalised hidden loss
(docs/method.md, "Rewards that see the task")."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import TINY, TINY_COCA
from optima.arms import ArmSpace, build_policy
from optima.checkpoint import rng_state, set_rng_state
from optima.cli.main import app
from optima.errors import ConfigError
from optima.interfaces import RoundLosses
from optima.plugins.losses.optima_loss import optima_loss
from optima.plugins.models.coca import coca_model
from optima.plugins.policies.paper import FixedPolicy, ThompsonPolicy
from optima.plugins.rewards.loss_decrement import combined_reward
from optima.plugins.rewards.task_aware import AdvantageReward, advantage_reward, heldout_gain_reward, \
    heldout_task_reward
from optima.plugins.tasks.synthetic_ve import SyntheticVisualEntailment
from test_round_losses import distiller


def _losses(**total) -> RoundLosses:
    return RoundLosses(total)


def test_heldout_reward_is_the_signed_relative_decrement_of_the_task_loss():
    r = heldout_task_reward()
    assert r.terms == ("task",) and r.probe == ("val", 4)
    assert r(_losses(task=2.0), _losses(task=1.5)) == pytest.approx(0.5 + 0.5 * 0.25)
    assert r(_losses(task=2.0), _losses(task=2.5)) == pytest.approx(0.5 - 0.5 * 0.25)  # worse: below 0.5
    assert r(_losses(task=2.0), _losses(task=2.0)) == 0.5
    assert r(_losses(task=1.0), _losses(task=9.0)) == 0.0  # clipped into [0, 1]
    gain = heldout_gain_reward()
    assert [gain(_losses(task=2.0), _losses(task=t)) for t in (1.9, 2.0, 2.1)] == [1.0, 1.0, 0.0]


def test_heldout_reward_refuses_the_test_split_and_bad_sizes():
    with pytest.raises(ConfigError, match="never see the test split"):
        heldout_task_reward(split="test")
    with pytest.raises(ConfigError, match="heldout_gain_reward.batches must be an integer >= 1"):
        heldout_gain_reward(batches=0)


def test_the_distiller_measures_the_heldout_reward_on_val_batches():
    reward = heldout_task_reward(batches=2)
    d = distiller(reward, val_size=16)
    task = d.task
    val = list(task.batches("val", 8, shuffle=True, seed=2))
    assert len(d.probe) == 2
    for probe, expected in zip(d.probe, val):  # the val split's batches, not the training split's
        assert torch.equal(probe["image"], expected["image"])
    train_images = torch.cat([b["image"] for b in task.batches("train", 8, shuffle=False, seed=0)])
    assert not any(torch.equal(img, t) for img in d.probe[0]["image"] for t in train_images)
    before = d.probe_losses()
    first = d.play_round()
    after = d.probe_losses()
    assert first.reward == pytest.approx(0.5 + 0.5 * (before["task"] - after["task"]) / before["task"])
    d.close()


def test_a_heldout_reward_without_heldout_examples_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"HeldOutTaskReward's probe \(4 batches\): the 'val' split holds only 0 "
                                          r"batch\(es\) of 8 \(give the task held-out examples"):
        distiller(heldout_task_reward(), val_size=0)


def test_advantage_removes_a_trend_shared_by_all_arms():
    base = combined_reward()
    adv = AdvantageReward(base, halflife=1e9)  # the baseline barely moves: the first reward
    prev = _losses(kd=1.0, hidden=1.0, attn=1.0)
    assert adv(prev, _losses(kd=0.9, hidden=0.9, attn=0.9)) == 0.5  # the first reward sets the baseline (0.1)
    assert adv(prev, _losses(kd=0.8, hidden=0.8, attn=0.8)) == pytest.approx(1.0)  # twice the baseline
    assert adv(prev, _losses(kd=0.95, hidden=0.95, attn=0.95)) == pytest.approx(0.25)  # half of it
    # a geometric decay of every arm's rewards gives every round the same value: no trend left
    adv = advantage_reward(base, halflife=1.0)
    values = []
    for t in range(12):
        r = 0.2 * 0.8 ** t  # the base reward of round t
        values.append(adv(prev, _losses(kd=1 - r, hidden=1 - r, attn=1 - r)))
    raw = [0.2 * 0.8 ** t for t in range(12)]
    assert raw[1] / raw[-1] > 8  # the base rewards fall eightfold ...
    assert max(values[5:]) - min(values[5:]) < 0.02  # ... the advantage stays level


def test_advantage_reward_state_resumes_exactly():
    def make():
        return distiller(advantage_reward(heldout_task_reward(batches=1)), val_size=8, rounds=6,
                         policy=build_policy(ThompsonPolicy, 3, 0))

    d = make()
    d.run(rounds=3)
    state, rng = copy.deepcopy(d.state_dict()), rng_state()
    assert state["reward"]["baseline"] is not None
    more = [(r.arm, r.reward) for r in d.run(rounds=6)[3:]]
    e = make()
    e.load_state_dict(state)
    set_rng_state(rng)
    assert [(r.arm, r.reward) for r in e.run(rounds=6)[3:]] == more
    # without the reward's state the same resume gives other rewards: the state matters
    f = make()
    f.load_state_dict({**state, "reward": {}})
    set_rng_state(rng)
    assert [r.reward for r in f.run(rounds=6)[3:]] != [r for _, r in more]
    for x in (d, e, f):
        x.close()


def test_the_empty_arm_trains_without_layer_losses():
    names = ("image", "text", "multimodal")
    space = ArmSpace(names, empty=True)
    assert len(space) == 8 and space[7] == () and space.label(7) == "none"
    assert space.labels()[:7] == ArmSpace(names).labels()  # the others keep their indices
    assert space.layers(7, [("image", 0), ("text", 0)]) == frozenset() and space.modules_of(7) == ()
    with pytest.raises(ConfigError, match="distillation.empty_arm = True"):
        ArmSpace(names, [[]])
    d = distiller(combined_reward(), policy=FixedPolicy(8, arm=7), arms=space, rounds=2)
    before = {k: v.clone() for k, v in d.loss.state_dict().items()}
    history = d.run()
    assert [r.arm_label for r in history] == ["none", "none"]
    assert all(torch.equal(v, d.loss.state_dict()[k]) for k, v in before.items())  # no projection trained
    assert history[1].reward is not None  # the whole model's losses are still measured
    d.close()


def test_hidden_norm_divides_each_layers_mse_by_the_teachers_variance():
    torch.manual_seed(0)
    s_model, t_model = coca_model(TINY_COCA, layers=(1, 1, 1)), coca_model(TINY_COCA)
    plain = optima_loss(s_model.distill_modules(), t_model.distill_modules())
    normed = optima_loss(s_model.distill_modules(), t_model.distill_modules(), hidden_norm="teacher_var")
    normed.load_state_dict(plain.state_dict())
    h_s, h_t = torch.randn(2, 5, 32), 3.0 * torch.randn(2, 5, 32)

    class Rec:
        def __init__(self, h):
            self.h = h

        def hidden(self, key):
            return self.h

    key = ("text", 0)
    t_key = plain.pairs[key]
    raw = plain._hidden(Rec(h_s), Rec(h_t), key, t_key)
    expected = F.mse_loss(plain.proj["text_0"](h_s), h_t) / (h_t.var() + 1e-6)
    assert normed._hidden(Rec(h_s), Rec(h_t), key, t_key).item() == pytest.approx(expected.item(), rel=1e-5)
    assert raw.item() == pytest.approx(F.mse_loss(plain.proj["text_0"](h_s), h_t).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="optima_loss.hidden_norm must be one of 'none', 'teacher_var'"):
        optima_loss(s_model.distill_modules(), t_model.distill_modules(), hidden_norm="layer")


def test_the_teacher_and_the_test_evaluation_never_read_the_val_split(tmp_path, monkeypatch):
    """Through a real `optima run` with the held-out reward: every read of 'val' comes
    from the reward's probe (`probe_batches`), none from fine-tuning or evaluation."""
    reads = []
    original = SyntheticVisualEntailment.batches

    def spy(self, split, *args, **kwargs):
        callers = {f.function for f in inspect.stack()[1:12]}
        reads.append((split, "probe_batches" in callers))
        return original(self, split, *args, **kwargs)

    monkeypatch.setattr(SyntheticVisualEntailment, "batches", spy)
    args = ["run", "tests/gin/tiny_ve.gin", "--run-dir", str(tmp_path / "run")]
    for b in [*TINY, "distillation.reward = @heldout_task_reward()", "heldout_task_reward.batches = 1",
              "synthetic_ve_task.val_size = 64"]:
        args += ["-b", b]
    result = CliRunner().invoke(app, args, env={"OPTIMA_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    val_reads = [from_probe for split, from_probe in reads if split == "val"]
    assert val_reads and all(val_reads)
    assert any(split == "train" for split, _ in reads) and any(split == "test" for split, _ in reads)


@pytest.mark.parametrize("binding, expected", [
    ("distillation.empty_arm = 'yes'", "distillation.empty_arm = 'yes' must be True or False"),
    ("optima_loss.hidden_norm = 'layer'", "optima_loss.hidden_norm = 'layer' must be one of 'none', 'teacher_var'"),
])
def test_bad_bindings_are_one_line_errors(tmp_path, binding, expected):
    args = ["run", "tests/gin/tiny_ve.gin", "--run-dir", str(tmp_path / "run")]
    for b in [*TINY, binding]:
        args += ["-b", b]
    result = CliRunner().invoke(app, args, env={"OPTIMA_CACHE": str(tmp_path / "cache"), "COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())


def test_alignment_reward_is_the_round_mean_of_the_gradient_cosine():
    from optima.plugins.rewards.task_aware import alignment_reward
    d = distiller(alignment_reward(), rounds=2)
    cosines = []
    original = d._alignment

    def keep(task_loss, objective):
        value = original(task_loss, objective)
        params = [p for p in d.student.parameters() if p.requires_grad]
        g_t = torch.autograd.grad(task_loss, params, retain_graph=True, allow_unused=True)
        g_d = torch.autograd.grad(objective - task_loss, params, retain_graph=True, allow_unused=True)
        flat = [torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])
                for gs in (g_t, g_d)]
        cosines.append(F.cosine_similarity(flat[0], flat[1], dim=0).item())
        assert value.item() == pytest.approx(cosines[-1], abs=1e-5)
        return value

    d._alignment = keep
    history = d.run()
    assert len(cosines) == 4 and -1 < min(cosines) and max(cosines) < 1
    for result, pair in zip(history, (cosines[:2], cosines[2:])):
        assert result.losses.steps == 2
        assert result.losses["align"] == pytest.approx(sum(pair), abs=1e-5)
    assert history[1].reward == pytest.approx(0.5 + 0.5 * sum(cosines[2:]) / 2, abs=1e-5)
    d.close()


def test_the_alignment_gate_drops_the_layer_losses_of_a_module_against_the_task(monkeypatch):
    """With the gate forced to find the multimodal decoder against the task, distilling
    text+multimodal trains the student as distilling text alone does."""
    import optima.engine as engine
    real = engine._cosine
    calls = []

    def against_multimodal(a, b):
        calls.append(real(a, b).item())
        return torch.tensor(-0.5 if len(calls) % 2 == 0 else 0.5)  # per step: text first, then multimodal

    gated = distiller(combined_reward(), policy=FixedPolicy(3, arm=1), rounds=2, alignment_gate=True)
    monkeypatch.setattr(engine, "_cosine", against_multimodal)
    history = gated.run()
    monkeypatch.setattr(engine, "_cosine", real)
    assert len(calls) == 8 and all(-1 <= c <= 1 for c in calls)  # 4 steps x the arm's 2 modules
    assert history[0].losses["kept/text"] == 2 and history[0].losses["kept/multimodal"] == 0
    text_only = ArmSpace(("image", "text", "multimodal"), [["image"], ["text"], ["multimodal"]])
    plain = distiller(combined_reward(), policy=FixedPolicy(3, arm=1), rounds=2, arms=text_only)
    plain.run()
    for (name, a), b in zip(gated.student.named_parameters(), plain.student.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    ungated = distiller(combined_reward(), policy=FixedPolicy(3, arm=1), rounds=2)
    ungated.run()
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gated.student.parameters(),
                                                                     ungated.student.parameters()))
    for d in (gated, plain, ungated):
        d.close()


def test_the_averaged_gate_resumes_exactly():
    def make():
        return distiller(combined_reward(), policy=FixedPolicy(3, arm=1), rounds=4, alignment_gate=True,
                         gate_halflife=3.0)

    d = make()
    d.run(rounds=2)
    state, rng = copy.deepcopy(d.state_dict()), rng_state()
    assert set(state["gate_mean"]) == {"text", "multimodal"}
    kept = [r.losses.total.get("kept/text") for r in d.run(rounds=4)[2:]]
    e = make()
    e.load_state_dict(state)
    set_rng_state(rng)
    assert [r.losses.total.get("kept/text") for r in e.run(rounds=4)[2:]] == kept
    for a, b in zip(d.student.parameters(), e.student.parameters()):
        assert torch.equal(a, b)
    d.close()
    e.close()
