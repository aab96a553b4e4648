"""docs/plugins.md's guide, run from its text: a fourth module added to CoCa
through the public extension API ("Adding a module to CoCa") and the arm-aware
reward ("optima_register_rewards"), distilled together for a few rounds."""
from __future__ import annotations

import re
import types

import pytest
import torch

from conftest import ROOT, TINY_COCA
from optima import registry
from optima.align import pair_layouts
from optima.arms import ArmSpace
from optima.engine import BatchStream, Distiller, Network
from optima.errors import ConfigError
from optima.experiment import linear_warmup_decay, param_groups
from optima.interfaces import Policy, Reward
from optima.plugins.heads.vl_heads import attentional_pooler_head
from optima.plugins.losses.optima_loss import optima_loss
from optima.plugins.tasks.synthetic_ve import SyntheticVisualEntailment

DOCS = ROOT / "docs" / "plugins.md"


def _plugin_from_docs(heading: str, name: str) -> types.ModuleType:
    """The plugin module (the python block with `@hookimpl`) under `heading`."""
    text = DOCS.read_text()
    section = re.split(r"^#{2,3} ", text.split(heading, 1)[1], maxsplit=1, flags=re.M)[0]
    source = next(b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "@hookimpl" in b)
    module = types.ModuleType(name)
    exec(compile(source, f"docs/plugins.md ({heading.strip('# ')})", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def documented():
    plugins = [("docs_depth", _plugin_from_docs("## Adding a module to CoCa", "docs_depth")),
               ("docs_reward", _plugin_from_docs("### optima_register_rewards", "docs_reward"))]
    return registry.load(external=False, plugins=plugins).components


class WithDepth(SyntheticVisualEntailment):
    """The synthetic task, with a depth map per image (its brightness) for the depth module."""

    def batches(self, split, batch_size, *, shuffle, seed):
        for batch in super().batches(split, batch_size, shuffle=shuffle, seed=seed):
            yield {**batch, "depth": batch["image"].mean(1, keepdim=True)}


class Cycle(Policy):
    """Test-only: every arm in turn."""

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


class Recording(Reward):
    def __init__(self, inner):
        self.inner, self.terms, self.calls = inner, inner.terms, []

    def __call__(self, previous, current):
        self.calls.append((previous, current))
        return self.inner(previous, current)


def test_the_docs_depth_coca_has_four_modules_and_coca_layouts(documented):
    component = documented["depth_coca_model"]
    model = component.factory(TINY_COCA, layers=(1, 1, 1), depth_layers=2, depth_width=16, patch_size=8)
    assert model.module_names() == component.modules == ("image", "text", "multimodal", "depth")
    assert len(ArmSpace(model.module_names())) == 15
    assert model.token_layout("image") == model.coca.token_layout("image") and model.token_layout("depth") is None
    assert model.vocab_projection() is model.coca.vocab_projection()
    task = WithDepth(image_size=32, context_length=12, train_size=8, val_size=0, test_size=0)
    batch = next(task.batches("train", 4, shuffle=False, seed=0))
    assert model(batch).shape == (4, 12, model.feature_dim)
    # the decoder cross-attends to the image tokens and the 16 depth tokens
    from optima.taps import Recorder

    recorder = Recorder(model.distill_modules())
    model(batch)
    image_tokens = model.coca.encode_image(batch["image"]).shape[1]
    assert recorder.attention(("multimodal", 0))[1].shape[-1] == image_tokens + 16
    assert recorder.hidden(("depth", 1)).shape == (4, 16, 16)
    recorder.remove()
    with torch.device("meta"):  # --dry-run builds models there
        assert component.factory(TINY_COCA).module_names() == component.modules


def test_memory_of_another_width_is_a_clear_error(documented):
    model = documented["depth_coca_model"].factory(TINY_COCA, layers=(1, 1, 1), depth_width=16, patch_size=8)
    text = model.coca.encode_text(torch.randint(1, 100, (2, 12)))
    with pytest.raises(ConfigError, match=r"memory tokens of width 16.*memory_width = 32"):
        model.coca.decode(torch.zeros(2, 5, 16), text)


def test_the_docs_depth_coca_distils_with_the_docs_arm_aware_reward(documented):
    torch.manual_seed(0)
    factory = documented["depth_coca_model"].factory
    task = WithDepth(image_size=32, context_length=12, train_size=32, val_size=0, test_size=0)
    t_model = factory(TINY_COCA, depth_layers=2, depth_width=16, patch_size=8)
    s_model = factory(TINY_COCA, layers=(1, 1, 1), depth_layers=1, depth_width=16, patch_size=8)
    teacher = Network(t_model, attentional_pooler_head(t_model, task))
    student = Network(s_model, attentional_pooler_head(s_model, task))
    loss = optima_loss(s_model.distill_modules(), t_model.distill_modules(), **pair_layouts(s_model, t_model))
    arms = ArmSpace(s_model.module_names(), [["depth"], ["image", "depth"], ["text", "multimodal"]])
    reward = Recording(documented["own_arm_reward"].factory())
    opt = torch.optim.AdamW(param_groups([student.model], [student.head, loss], None), lr=1e-3)
    d = Distiller(teacher=teacher, student=student, task=task, loss=loss, arms=arms, policy=Cycle(len(arms)),
                  reward=reward, optimizer=opt, scheduler=linear_warmup_decay(opt, 8),
                  stream=BatchStream(task, "train", 8, 1, torch.device("cpu")), steps_per_round=2, rounds=4,
                  device=torch.device("cpu"))
    proj = {k: loss.proj[k].weight.clone() for k in ("depth_0", "text_0")}
    d.run(1)  # arm "depth": the depth layer's loss trains, the text layer's has no gradient
    assert not torch.equal(proj["depth_0"], loss.proj["depth_0"].weight)
    assert torch.equal(proj["text_0"], loss.proj["text_0"].weight)
    d.run()
    d.close()
    assert [r.losses.arm for r in d.history] == [("depth",), ("image", "depth"), ("text", "multimodal"), ("depth",)]
    assert len(reward.calls) == 3
    for r, (previous, current) in zip(d.history[1:], reward.calls):
        assert current is r.losses and set(current.per_module) == {"image", "text", "multimodal", "depth"}
        falls = []
        for term in ("hidden", "attn"):  # the docs' formula, by hand: the played arm's own losses
            before = sum(previous.per_module[m][term] for m in r.losses.arm)
            after = sum(current.per_module[m][term] for m in r.losses.arm)
            falls.append(min(1.0, max(0.0, (before - after) / before)))
        assert r.reward == pytest.approx(sum(falls) / 2, abs=1e-12)
    # the modules outside the arm do not count: the whole model's fall gives other rewards
    whole = [sum(max(0.0, (p[t] - c[t]) / p[t]) for t in ("hidden", "attn")) / 2 for p, c in reward.calls]
    assert [r.reward for r in d.history[1:]] != pytest.approx(whole, abs=1e-6)


def test_the_docs_world_task_reuses_the_synthetic_world():
    """"Reusing the synthetic world": the counting task from the docs' text,
    registered as a plugin; its batches are reproducible and its labels are
    the scenes' object counts."""
    components = registry.load(external=False,
                               plugins=[("docs_world", _plugin_from_docs("## Reusing the synthetic world",
                                                                         "docs_world"))]).components
    task = components["world_count_task"].factory(train_size=40, val_size=0, test_size=8, max_objects=3)
    assert task.num_outputs == 4 and task.size("train") == 40
    batch = next(task.batches("train", 8, shuffle=True, seed=1))
    again = next(task.batches("train", 8, shuffle=True, seed=1))
    assert batch["image"].shape == (8, 3, 32, 32) and torch.equal(batch["image"], again["image"])
    counts = [len(task.scene(i)) for i in range(40)]
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1))[:8]
    assert batch["label"].tolist() == [counts[i] for i in order] and set(counts) <= {2, 3}
    logits = torch.nn.functional.one_hot(batch["label"], 4).float()
    assert task.summarize(task.metric(logits, batch))["accuracy"] == 1.0
