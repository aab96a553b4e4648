"""NaN and inf: detected before the optimizer step, skipped or stopping the run;
no non-finite reward ever reaches the policy."""
from __future__ import annotations

import json
import math

import gin
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from optima.arms import ArmSpace
from optima.checkpoint import CheckpointManager
from optima.cli.main import app
from optima.engine import (BatchStream, Distiller, Finetuner, Network, NonFiniteLossError, RoundAccumulator,
                           first_nonfinite, guarded_reward, round_outcome)
from optima.experiment import linear_warmup_decay, param_groups
from optima.interfaces import Loss
from optima.program import program
from optima.plugins.models.coca import coca_model
from optima.plugins.heads.vl_heads import attentional_pooler_head
from optima.plugins.losses.optima_loss import optima_loss
from optima.plugins.policies.paper import FixedPolicy, RandomPolicy, ThompsonPolicy
from optima.plugins.rewards.loss_decrement import combined_reward, kd_reward, layerwise_reward
from optima.plugins.tasks.synthetic_ve import SyntheticVisualEntailment
from conftest import TINY

from conftest import TINY_COCA


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (conftest's default is 2): OpenMP threads that spin on a
    busy 2-core machine make these runs several times slower."""
    torch.set_num_threads(1)


class InjectNonFinite(Loss):
    """Test-only: the wrapped loss, with `value` put into `term` ('objective' or a
    full-model term) at the given 1-based calls. The call count is a buffer, so it
    is checkpointed and a resumed run counts on."""

    def __init__(self, inner: Loss, at: dict[int, str], value: float = math.nan):
        super().__init__()
        self.inner, self.at, self.value = inner, dict(at), value
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, student, teacher, task_loss, arm_layers, need):
        self.calls += 1
        out = self.inner(student, teacher, task_loss, arm_layers, need)
        term = self.at.get(int(self.calls))
        if term == "objective":
            out.objective = out.objective * self.value
        elif term is not None:
            out.full[term] = self.value
        return out


def nan_injecting_loss(student_modules, teacher_modules, at_step: int = 3, term: str = "kd", **kwargs):
    return InjectNonFinite(optima_loss(student_modules, teacher_modules, **kwargs), {at_step: term})


class Events:
    def __init__(self):
        self.skips, self.messages, self.rounds, self.steps = [], [], [], {}

    def on_step(self, stage, step, losses, lr): self.steps[step] = losses
    def on_round(self, stage, result): self.rounds.append(result)
    def on_nonfinite(self, *args): self.skips.append(args)
    def on_message(self, text): self.messages.append(text)


def tiny_distiller(at: dict[int, str], on_nonfinite: str, value=math.nan, rounds=3) -> tuple[Distiller, Events]:
    torch.manual_seed(0)
    task = SyntheticVisualEntailment(image_size=32, context_length=12, train_size=32, val_size=0, test_size=8)
    t_model, s_model = coca_model(TINY_COCA), coca_model(TINY_COCA, layers=(1, 1, 1))
    teacher = Network(t_model, attentional_pooler_head(t_model, task))
    student = Network(s_model, attentional_pooler_head(s_model, task))
    loss = InjectNonFinite(optima_loss(s_model.distill_modules(), t_model.distill_modules()), at, value)
    arms = ArmSpace(s_model.module_names())
    opt = torch.optim.AdamW(param_groups([student.model], [student.head, loss], None), lr=1e-3)
    events = Events()
    d = Distiller(teacher=teacher, student=student, task=task, loss=loss, arms=arms,
                  policy=ThompsonPolicy(len(arms), warmup_rounds=7), reward=combined_reward(), optimizer=opt,
                  scheduler=linear_warmup_decay(opt, 6), stream=BatchStream(task, "train", 8, 1, torch.device("cpu")),
                  steps_per_round=2, rounds=rounds, device=torch.device("cpu"), on_nonfinite=on_nonfinite,
                  callbacks=[events])
    return d, events


def _weights(d: Distiller) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in d.student.state_dict().items()}


@pytest.mark.parametrize("term, value", [("kd", math.nan), ("objective", math.inf)])
def test_skip_leaves_the_weights_counts_and_reports(term, value):
    d, events = tiny_distiller({3: term}, "skip", value=value)
    seen = {}
    d.run(after_step=lambda d: seen.__setitem__(d.step, _weights(d)))
    assert d.step == 6 and d.skipped == 1
    assert all(torch.equal(seen[2][k], seen[3][k]) for k in seen[2])  # step 3 changed nothing
    assert not all(torch.equal(seen[3][k], seen[4][k]) for k in seen[3])  # step 4 trained
    assert len(events.skips) == 1
    stage, step, bad_term, value, skipped = events.skips[0]
    assert (stage, step, bad_term, skipped) == ("student", 3, term, 1) and not math.isfinite(value)
    assert [r.skipped for r in d.history] == [0, 1, 0]
    for r in d.history:
        assert all(math.isfinite(v) for v in r.losses.values())
        assert r.reward is None or 0.0 <= r.reward <= 1.0
    # round 2 (steps 3, 4) is scaled from its one finite step (4) to T = 2 steps;
    # rounds 1 and 3 are plain sums (scaling by finite / T would halve round 2 instead)
    assert events.steps[3] == {}
    for term, value in d.history[1].losses.total.items():
        assert value == pytest.approx(2 * events.steps[4][f"total/{term}"], rel=1e-12), term
    for term, value in d.history[0].losses.total.items():
        assert value == pytest.approx(events.steps[1][f"total/{term}"] + events.steps[2][f"total/{term}"], rel=1e-12)
    assert d.history[1].reward is not None and d.history[1].note is None


@pytest.mark.parametrize("term", ["hidden", "objective"])
def test_stop_names_the_step_and_term_before_the_optimizer_step(term):
    d, _ = tiny_distiller({3: term}, "stop")
    seen = {}
    with pytest.raises(NonFiniteLossError) as info:
        d.run(after_step=lambda d: seen.__setitem__(d.step, _weights(d)))
    message = str(info.value)
    assert f"non-finite loss at step 3 (round 2, arm " in message and f"{term} = nan" in message
    assert "distillation.on_nonfinite = 'stop'" in message and info.value.exit_code == 1
    assert d.step == 2 and all(torch.equal(seen[2][k], v) for k, v in d.student.state_dict().items())
    assert info.value.resume_bindings == ["distillation.on_nonfinite = 'skip'"]


def test_a_round_without_a_finite_step_gives_no_reward():
    d, events = tiny_distiller({3: "kd", 4: "kd"}, "skip")
    d.run()
    assert d.history[1].reward is None and d.history[1].note == "every step was skipped"
    assert d.history[2].reward is not None  # compared with round 1, the last good one
    assert any("round 2: no reward for the policy" in m for m in events.messages)


def test_the_teacher_loop_checks_its_loss_too():
    torch.manual_seed(0)
    task = SyntheticVisualEntailment(image_size=32, context_length=12, train_size=32, val_size=0, test_size=8)
    model = coca_model(TINY_COCA, layers=(1, 1, 1))
    net = Network(model, attentional_pooler_head(model, task))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    original = task.loss
    task.loss = lambda logits, batch: original(logits, batch) * (math.nan if tuner.step == 1 else 1.0)
    tuner = Finetuner(net, task, steps=3, batch_size=8, optimizer=opt, scheduler=linear_warmup_decay(opt, 3),
                      seed=0, device=torch.device("cpu"), on_nonfinite="skip")
    tuner.run()
    assert tuner.step == 3 and tuner.skipped == 1
    tuner = Finetuner(net, task, steps=3, batch_size=8, optimizer=opt, scheduler=linear_warmup_decay(opt, 3),
                      seed=0, device=torch.device("cpu"))
    with pytest.raises(NonFiniteLossError, match=r"teacher: non-finite loss at step 2: task = nan.*"
                                                 r"teacher_training.on_nonfinite = 'stop'"):
        tuner.run()


# --- property tests: the reward and the policy under any loss values ------------------

loss_values = st.one_of(st.just(0.0), st.floats(-1e3, 1e3), st.floats(1e300, 1.7e308), st.floats(-1.7e308, -1e300),
                        st.sampled_from([math.inf, -math.inf, math.nan, 1e-320, -0.0]))
step_terms = st.fixed_dictionaries({"task": loss_values, "kd": loss_values, "hidden": loss_values,
                                    "attn": loss_values})


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.double()).all()) if t.is_floating_point() else True


@settings(max_examples=300, deadline=None)
@given(rounds=st.lists(st.lists(step_terms, min_size=1, max_size=4), min_size=1, max_size=20),
       reward=st.sampled_from([combined_reward(), kd_reward(), layerwise_reward()]),
       policy=st.sampled_from(["optima", "random", "fixed"]), engine_skips=st.booleans())
def test_property_no_loss_values_make_the_policy_or_reward_non_finite(rounds, reward, policy, engine_skips):
    """What `Distiller` does at each step and round end, for any values: finite,
    zero, negative, huge, inf, NaN. `engine_skips=False` also adds the steps the
    engine would have skipped, as a loop without the step check would."""
    n = 7
    bandit = {"optima": ThompsonPolicy(n, warmup_rounds=n, gamma=0.9, variance_scale=1e-3),
              "random": RandomPolicy(n), "fixed": FixedPolicy(n)}[policy]
    previous = None
    for steps in rounds:
        arm = bandit.select()
        assert 0 <= arm < n
        acc = RoundAccumulator()
        for terms in steps:
            if not engine_skips or first_nonfinite(terms) is None:
                acc.add(terms)
        out = round_outcome(reward, previous, acc, len(steps))
        assert out.reward is None or (isinstance(out.reward, float) and 0.0 <= out.reward <= 1.0)
        if out.reward is not None:
            bandit.update(arm, out.reward)
        previous = out.previous
        assert previous is None or all(math.isfinite(previous[t]) for t in reward.terms)
        state = bandit.state_dict()
        assert all(_finite(v) for v in state.values()), state
        assert all(_finite(v) for v in bandit.diagnostics().values())


@settings(max_examples=300, deadline=None)
@given(previous=st.none() | st.fixed_dictionaries({"kd": st.floats(0, 1e308), "hidden": st.floats(0, 1e308),
                                                    "attn": st.floats(0, 1e308)}),
       current=st.fixed_dictionaries({"kd": loss_values, "hidden": loss_values, "attn": loss_values}))
def test_property_guarded_reward_is_none_or_in_the_unit_interval(previous, current):
    value, note = guarded_reward(combined_reward(), previous, current)
    if first_nonfinite(current) is not None:
        assert value is None and "non-finite round loss" in note
    elif previous is None:
        assert (value, note) == (None, None)
    else:
        assert 0.0 <= value <= 1.0 and note is None


def test_a_policy_refuses_a_non_finite_reward_as_documented():
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="non-finite reward"):
            ThompsonPolicy(3).update(0, bad)


# --- the CLI with an injected NaN ------------------------------------------------------

@pytest.fixture
def nan_loss_configurable():
    if not gin.config._REGISTRY.matching_selectors("nan_injecting_loss"):
        gin.external_configurable(nan_injecting_loss, name="nan_injecting_loss")


def _cli(*args):
    result = CliRunner().invoke(app, ["run", "tests/gin/tiny_ve.gin", *args])
    return result.exit_code, result.output


@pytest.mark.slow
def test_cli_stop_then_resume_with_skip(tmp_path, nan_loss_configurable):
    run = tmp_path / "run"
    bindings = [x for b in TINY + ["distillation.loss = @nan_injecting_loss", "nan_injecting_loss.at_step = 5",
                                   "distillation.rounds = 4"] for x in ("-b", b)]
    code, out = _cli("--run-dir", str(run), *bindings)
    assert code == 1, out
    line = next(l for l in out.splitlines() if l.startswith("optima: error:"))
    assert "student: non-finite loss at step 5 (round 3, arm " in line and "kd = nan" in line
    assert f"resume with: {program()} run tests/gin/tiny_ve.gin" in line  # as the user can type it
    assert "-b \"distillation.on_nonfinite = 'skip'\" --resume " + str(run) in line
    assert not (run / "metrics.json").exists()
    for path in CheckpointManager(run / "checkpoints" / "student").paths():  # all intact
        CheckpointManager.load(path)

    code, out = _cli(*bindings, "-b", "distillation.on_nonfinite = 'skip'", "--resume", str(run))
    assert code == 0, out
    assert "student: step 5: kd = nan; step skipped (1 so far)" in out
    stage = json.loads((run / "metrics.json").read_text())["stages"]["student"]
    assert stage["skipped_steps"] == 1 and len(stage["plays"]) == 4
    assert all(r is None or 0.0 <= r <= 1.0 for r in stage["rewards"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard" / "student"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("nonfinite/skipped")] == [(5, 1.0)]
