"""What a reward sees and TensorBoard shows of a round: whole-model totals,
per-module sums and the played arm (`optima.interfaces.RoundLosses`), computed
in the step's one no-grad pass and one device sync, and tags that say which of
them they hold whatever the reward reads; play counts and entropy for any policy."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_COCA
from optima.arms import ArmSpace
from optima.checkpoint import CheckpointManager
from optima.engine import BatchStream, Distiller, Network, play_stats
from optima.experiment import linear_warmup_decay, param_groups, reward_probe_batches
from optima.interfaces import Policy, Reward, RoundLosses
from optima.plugins.heads.vl_heads import attentional_pooler_head
from optima.plugins.losses.optima_loss import optima_loss
from optima.plugins.models.coca import coca_model
from optima.plugins.policies.paper import FixedPolicy
from optima.plugins.rewards.loss_decrement import combined_reward, kd_reward
from optima.plugins.tasks.synthetic_ve import SyntheticVisualEntailment
from optima.reporting import LAYOUT, TensorBoardReporter, text_records

MODULES = ("image", "text", "multimodal")


class Recording(Reward):
    """Test-only: wraps a reward and keeps what it was called with."""

    def __init__(self, inner: Reward):
        self.inner, self.terms, self.calls = inner, inner.terms, []

    def __call__(self, previous, current):
        self.calls.append((previous, current))
        return self.inner(previous, current)


class Cycle(Policy):
    """Test-only: a policy without diagnostics, playing every arm in turn."""

    def __init__(self, num_arms, seed=0):
        self.num_arms, self.selected = num_arms, 0

    def select(self):
        self.selected += 1
        return (self.selected - 1) % self.num_arms

    def update(self, arm, reward):
        pass

    def state_dict(self):
        return {"selected": self.selected}

    def load_state_dict(self, state):
        self.selected = int(state["selected"])


def distiller(reward: Reward, policy=None, rounds=3, callbacks=(), lr=1e-3, probe=0, val_size=0, arms=None,
              **options) -> Distiller:
    """A tiny CoCa distiller over 3 arms (`probe`: `distillation.reward_probe` batches;
    a reward with a probe of its own gets it from `val_size` held-out examples)."""
    torch.manual_seed(0)
    task = SyntheticVisualEntailment(image_size=32, context_length=12, train_size=32, val_size=val_size, test_size=8)
    t_model, s_model = coca_model(TINY_COCA), coca_model(TINY_COCA, layers=(1, 1, 1))
    teacher = Network(t_model, attentional_pooler_head(t_model, task))
    student = Network(s_model, attentional_pooler_head(s_model, task))
    loss = optima_loss(s_model.distill_modules(), t_model.distill_modules())
    arms = arms or ArmSpace(s_model.module_names(), [["image"], ["text", "multimodal"], ["multimodal"]])
    opt = torch.optim.AdamW(param_groups([student.model], [student.head, loss], None), lr=lr)
    cpu = torch.device("cpu")
    return Distiller(teacher=teacher, student=student, task=task, loss=loss, arms=arms,
                     policy=policy or FixedPolicy(len(arms), arm=1), reward=reward, optimizer=opt,
                     scheduler=linear_warmup_decay(opt, 2 * rounds),
                     stream=BatchStream(task, "train", 8, 1, torch.device("cpu")), steps_per_round=2, rounds=rounds,
                     device=cpu, callbacks=list(callbacks), probe=reward_probe_batches(reward, task, 8, probe, 0, cpu),
                     **options)


def test_a_reward_gets_each_rounds_losses_per_module_and_the_played_arm():
    reward = Recording(combined_reward())
    d = distiller(reward, policy=Cycle(3))
    d.run()
    assert len(reward.calls) == 2  # rounds 2 and 3
    (p1, c1), (p2, c2) = reward.calls
    assert (p1.arm, c1.arm, c2.arm) == (("image",), ("text", "multimodal"), ("multimodal",))
    assert p2 is c1 and c1 is d.history[1].losses  # previous is the last round, as played
    for losses in (p1, c1, c2):
        assert isinstance(losses, RoundLosses) and set(losses.total) == {"task", "kd", "hidden", "attn"}
        assert set(losses.per_module) == set(MODULES)  # the reward reads hidden and attn: every module has them
        for term in ("hidden", "attn"):
            assert all(losses.per_module[m][term] > 0 for m in MODULES)
            assert losses[term] == pytest.approx(sum(losses.per_module[m][term] for m in MODULES), rel=1e-5)
        assert losses.arm_totals() == {t: losses.of_arm(t) for t in ("hidden", "attn")}
    # today's reward, unchanged: the relative decrement of the whole model's totals
    expected = sum(max(0.0, (p1[t] - c1[t]) / p1[t]) for t in ("kd", "hidden", "attn")) / 3
    assert d.history[1].reward == pytest.approx(expected, abs=1e-12)


def test_a_reward_that_reads_no_layer_term_gets_the_arms_modules_only_and_no_partial_total():
    reward = Recording(kd_reward())
    d = distiller(reward)
    d.run(2)
    previous, current = reward.calls[0]
    assert set(current.total) == {"task", "kd"}  # hidden/attn are computed for the arm's layers only
    assert set(current.per_module) == {"text", "multimodal"} == set(current.arm)
    assert current.of_arm("hidden") > 0


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the wrapper below
def test_a_step_makes_one_device_sync(monkeypatch):
    """`tolist`, `item` and `float()` are where a tensor's value reaches the host;
    a distillation step (forward, losses with per-module sums, backward, gradient
    clipping, the non-finite checks) makes exactly one such transfer; the loss
    itself none. (The optimizer's own step counters live on the CPU and are
    not counted.)"""
    d = distiller(combined_reward())
    syncs, counting = [], [True]
    for name in ("tolist", "item", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: (
            counting[0] and syncs.append(_n)) or _o(self, *a))
    optimizer_step = d.optimizer.step

    def uncounted(*args, **kwargs):
        counting[0] = False
        try:
            return optimizer_step(*args, **kwargs)
        finally:
            counting[0] = True

    monkeypatch.setattr(d.optimizer, "step", uncounted)
    per_call = []
    for wrapped in ("train_step", "loss"):
        target = d if wrapped == "train_step" else d.loss
        inner = getattr(target, "forward" if wrapped == "loss" else wrapped)

        def counted(*args, _inner=inner, _what=wrapped, **kwargs):
            before = len(syncs)
            out = _inner(*args, **kwargs)
            per_call.append((_what, syncs[before:]))
            return out

        monkeypatch.setattr(target, "forward" if wrapped == "loss" else wrapped, counted)
    d.run(1)
    assert d.grad_clip and per_call == [("loss", []), ("train_step", ["tolist"])] * 2


def test_round_losses_survive_a_checkpoint_exactly(tmp_path):
    manager = CheckpointManager(tmp_path)
    d = distiller(combined_reward(), policy=Cycle(3))
    d.run(after_step=lambda d: d.step == 5 and manager.save({"loop": d.state_dict()}, step=d.step, round=d.round))
    restored = distiller(combined_reward(), policy=Cycle(3))
    restored.load_state_dict(manager.latest().state["loop"])
    assert restored.previous == d.history[1].losses and restored.previous.arm == ("text", "multimodal")
    assert [r.losses for r in restored.history] == [r.losses for r in d.history[:2]]
    restored.run()
    assert [r.losses for r in restored.history] == [r.losses for r in d.history]  # bit for bit, per module too


def _scalars(log_dir: Path):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("reward", [kd_reward, combined_reward])
def test_tensorboard_tags_say_what_they_hold_whatever_the_reward_reads(tmp_path, reward):
    tb = TensorBoardReporter(str(tmp_path))
    d = distiller(reward(), policy=Cycle(3), callbacks=[tb])
    tb.on_arms("student", d.arms.labels())
    d.run()
    tb.close()
    tags = _scalars(tmp_path / "student")
    reads_layers = reward is combined_reward
    for term in ("hidden", "attn"):
        # whole-model totals: always the whole model, or not logged at all
        assert (f"round/total/{term}" in tags) == reads_layers and (f"loss/total/{term}" in tags) == reads_layers
        arm_values = [v for _, v in tags[f"round/arm/{term}"]]
        assert len(arm_values) == 3
        for r, value in zip(d.history, arm_values):
            assert value == pytest.approx(sum(r.losses.per_module[m][term] for m in r.losses.arm), rel=1e-6)
            logged = {m for m in MODULES if r.step in dict(tags.get(f"round/module/{m}/{term}", []))}
            assert logged == (set(MODULES) if reads_layers else set(r.losses.arm))
        assert len(tags[f"loss/arm/{term}"]) == 6  # one per step
        if reads_layers:  # the total is the sum over modules, never one arm's share
            for (_, total), r in zip(tags[f"round/total/{term}"], d.history):
                assert total == pytest.approx(sum(r.losses.per_module[m][term] for m in MODULES), rel=1e-5)
                assert total > r.losses.of_arm(term) * 1.01
    assert [v for _, v in tags["round/total/kd"]] == pytest.approx([r.losses["kd"] for r in d.history])


def test_play_counts_and_entropy_are_logged_for_a_policy_that_reports_nothing(tmp_path):
    tb = TensorBoardReporter(str(tmp_path))
    d = distiller(kd_reward(), policy=Cycle(3), rounds=4, callbacks=[tb])
    tb.on_arms("student", d.arms.labels())
    d.run()
    tb.close()
    tags = _scalars(tmp_path / "student")
    assert not any(t.startswith("policy/") for t in tags)
    assert "plays/arm" not in tags  # a text record, not a line of arm indices
    assert text_records(tmp_path / "student", "plays/arm") == [
        (2, "round 1: **image** (arm 0)"), (4, "round 2: **text+multimodal** (arm 1)"),
        (6, "round 3: **multimodal** (arm 2)"), (8, "round 4: **image** (arm 0)")]
    assert [v for _, v in tags["plays/count/image"]] == [1, 1, 1, 2]
    assert [v for _, v in tags["plays/count/text+multimodal"]] == [0, 1, 1, 1]
    entropy = [v for _, v in tags["plays/entropy"]]
    assert entropy == pytest.approx([0.0, math.log(2), math.log(3), -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))])


def test_play_stats_counts_all_plays_and_takes_the_entropy_of_the_recent_ones():
    assert play_stats([], 3) == {"count": [0, 0, 0], "entropy": 0.0}
    stats = play_stats([2] * 30 + [0, 1], 3, window=2)
    assert stats["count"] == [1, 1, 30] and stats["entropy"] == pytest.approx(math.log(2))


def test_a_compiled_step_computes_what_an_eager_one_does():
    """`distillation.compile`: student and teacher under torch.compile (here the
    'aot_eager' backend, which needs no C++ compiler and compiles in seconds);
    the recorders' hooks are traced along, so the losses are the eager ones."""
    from optima.engine import compiled

    eager, fast = distiller(combined_reward()), distiller(combined_reward())
    fast.trained, fast.teacher_forward = compiled(fast.trained, "aot_eager"), compiled(fast.teacher, "aot_eager")
    assert compiled(fast.student, False) is fast.student
    batch = next(eager.stream)
    layers = eager.arm_layers(0)
    for _ in range(2):
        want, got = eager.train_step(batch, layers), fast.train_step(batch, layers)
        assert got.full == pytest.approx(want.full, rel=1e-4)  # decomposed ops round differently
        assert got.per_module.keys() == want.per_module.keys()
    assert type(fast.trained).__name__ == "OptimizedModule"



def test_a_compiled_step_is_not_recompiled_by_forwards_outside_the_loop():
    """The recorders' hooks are traced into the compiled graphs, which guard on
    what the hooks touch. Forwards outside `train_step` (an evaluation pass,
    another loop's recorder on the same networks) must leave nothing there that
    makes the next compiled step a new graph (the GPU benchmark's compiled steps,
    beside recorders left open, turned NaN at the step that recompiled). Counted
    with a backend that records each graph it is given."""
    from optima.engine import compiled

    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()  # Network.forward's compiled code is shared by every test
    d = distiller(combined_reward())
    other = Distiller(teacher=d.teacher, student=d.student, task=d.task, loss=d.loss, arms=d.arms, policy=d.policy,
                      reward=d.reward, optimizer=d.optimizer, scheduler=d.scheduler, stream=d.stream,
                      steps_per_round=2, device=torch.device("cpu"))  # left open: its hooks stay
    d.trained, d.teacher_forward = compiled(d.trained, backend), compiled(d.teacher_run, backend)
    batch, layers = next(d.stream), d.arm_layers(0)
    d.train_step(batch, layers)
    compiled_once = len(graphs)
    assert compiled_once >= 2  # the teacher's and the student's forwards
    for _ in range(2):
        other.train_step(batch, layers)
        with torch.no_grad():
            d.student.eval()(batch)  # an evaluation pass: the hooks fire outside any step
        assert d.train_step(batch, layers) is not None
    assert len(graphs) == compiled_once


def test_a_bf16_teacher_copy_runs_the_fused_attention_path_and_leaves_the_teacher_alone():
    """`Distiller(teacher_dtype=torch.bfloat16)` (the default with `amp` on a GPU):
    the teacher's forward runs a bf16 copy outside autocast, so its self-attention
    blocks take `nn.MultiheadAttention`'s fused inference op (`_native_multi_head_attention`)
    while the recorder still reads every layer; the caller's teacher keeps its
    float32 weights, and the losses are the float32 teacher's to bf16 precision."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FusedCalls(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            FusedCalls.calls += "_native_multi_head_attention" in str(func)
            return func(*args, **(kwargs or {}))

    full, half = distiller(combined_reward()), distiller(combined_reward(), teacher_dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in half.teacher.state_dict().items()}
    batch, layers = next(full.stream), full.arm_layers(0)
    for _ in range(2):
        want = full.train_step(batch, layers)
        with FusedCalls():
            got = half.train_step(batch, layers)
        assert got.full.keys() == want.full.keys() == {"task", "kd", "hidden", "attn"}
        for term in want.full:
            assert got.full[term] == pytest.approx(want.full[term], rel=0.05, abs=1e-3), term
    assert FusedCalls.calls == 2 * len(half.teacher.model.coca.visual.transformer.resblocks)
    assert half.teacher_run is not half.teacher and next(half.teacher_run.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(v, half.teacher.state_dict()[k]) and v.dtype == torch.float32 for k, v in before.items())
    on_cpu = distiller(combined_reward(), amp=True)
    assert on_cpu.teacher_run is on_cpu.teacher  # bf16 by default only with amp on a GPU


def test_tensorboard_layout_shows_every_arm_on_one_chart_and_no_tag_twice(tmp_path):
    """The custom scalars layout in the summary run (TensorBoard's CUSTOM SCALARS):
    each chart's regexes match what the run logged, e.g. every arm's posterior
    mean on one chart; the policy's own count and entropy are not logged again
    beside the engine's; the test metrics as one text table."""
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    from optima.plugins.policies.paper import ThompsonPolicy

    tb = TensorBoardReporter(str(tmp_path))
    d = distiller(kd_reward(), policy=ThompsonPolicy(3, warmup_rounds=3), rounds=6, callbacks=[tb])
    tb.on_arms("student", d.arms.labels())
    tb.on_stage("student", 12, "step")
    d.run()
    tb.on_eval("teacher", {"accuracy": 0.75})
    tb.on_eval("student", {"accuracy": 0.5})
    tb.close()
    tags = set(_scalars(tmp_path / "student"))
    assert not any(t.startswith(("policy/count", "policy/entropy")) for t in tags)  # plays/count, plays/entropy
    assert {"plays/entropy", "policy/warmup", "plays/count/image"} <= tags

    events = EventAccumulator(str(tmp_path / "summary"), size_guidance={"tensors": 0})
    events.Reload()
    assert events.SummaryMetadata(metadata.CONFIG_SUMMARY_TAG).plugin_data.plugin_name == metadata.PLUGIN_NAME
    [record] = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(record.tensor_proto).item())
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert [cat.title for cat in layout.category] == list(LAYOUT)

    def matched(title):
        return {t for t in tags if any(re.search(r, t) for r in charts[title])}

    arms = ["image", "text+multimodal", "multimodal"]
    assert matched("each arm's estimated mean reward (policy/mean: Figure 5)") == {f"policy/mean/{a}" for a in arms}
    assert matched("plays of each arm so far (plays/count)") == {f"plays/count/{a}" for a in arms}
    assert matched("whole model, each step (loss/total)") == {"loss/total/task", "loss/total/kd"}
    assert text_records(tmp_path / "summary", "eval/results") == [(0, "| network | test metric | value |\n"
                                                                   "|---|---|---:|\n| teacher | accuracy | 0.7500 |\n"
                                                                   "| student | accuracy | 0.5000 |")]


def test_a_resumed_stage_shows_each_played_arm_once(tmp_path):
    """The played arm is a text record; a resumed stage's writer purges from its
    restart step, so TensorBoard shows each round's record once. TensorBoard's
    reader takes a run's first session start as the start, not a restart: the
    first attempt opens its stage as a run does (`on_stage` from step 0 writes one)."""
    first = TensorBoardReporter(str(tmp_path))
    first.on_arms("student", ["image", "text"])
    first.on_stage("student", 12, "step")
    for r in range(1, 5):  # rounds 1-4, then killed; the checkpoint was at step 4 (round 2)
        first.writer("student").add_text("plays/arm", f"first {r}", 2 * r)
    first.close()
    resumed = TensorBoardReporter(str(tmp_path))
    resumed.on_stage("student", 12, "step", start=4)
    for r in range(3, 7):
        resumed.writer("student").add_text("plays/arm", f"resumed {r}", 2 * r)
    resumed.close()
    assert text_records(tmp_path / "student", "plays/arm") == [
        (2, "first 1"), (4, "first 2"), (6, "resumed 3"), (8, "resumed 4"), (10, "resumed 5"), (12, "resumed 6")]
