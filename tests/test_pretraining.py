"""The pretraining stage: CoCa's objective (open_clip's CoCaLoss) on the synthetic
caption corpus lowers the loss, is cached by a key over what decides it, and its
checkpoint is what the teacher (`pretrained`) and students (`init_from`) load."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from optima.errors import ConfigError
from optima.experiment import pretraining, seed_everything
from optima.plugins.models.coca import coca_model
from optima.plugins.tasks.synthetic_world.tasks import WorldCaptions
from optima.plugins.tasks.synthetic_world.world import VOCAB_SIZE
from optima.reporting import Reporter

from conftest import TINY_COCA

ARCH = {**TINY_COCA, "text_cfg": {**TINY_COCA["text_cfg"], "vocab_size": VOCAB_SIZE, "context_length": 16},
        "multimodal_cfg": {**TINY_COCA["multimodal_cfg"], "vocab_size": VOCAB_SIZE, "context_length": 16}}


class Messages(Reporter):
    def __init__(self):
        self.messages, self.steps = [], []

    def on_message(self, text):
        self.messages.append(text)

    def on_step(self, stage, step, losses, lr):
        self.steps.append((stage, step, losses))


def corpus():
    return WorldCaptions(seed=1, train_size=512, val_size=0, test_size=64)


def factory(**kw):
    return coca_model(ARCH, layers=(2, 2, 2), **kw)


def run(cache, reporter=None, steps=60, **kw):
    return pretraining("small", factory, torch.device("cpu"), reporter or Messages(), cache, corpus=corpus,
                       steps=steps, batch_size=32, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3),
                       term_weights={"caption": 2.0, "contrastive": 1.0}, **kw)


@torch.no_grad()
def coca_losses(model):
    model.eval()
    batch = next(corpus().batches("test", 64, shuffle=False, seed=0))
    return {k: float(v) for k, v in model.pretraining_losses(batch).items()}


def test_pretraining_lowers_the_coca_loss_and_its_checkpoint_loads(tmp_path):
    reporter = Messages()
    result = run(tmp_path, reporter)
    assert result["cached"] is False and result["path"].endswith(".safetensors")
    seed_everything(0)  # the stage's seed: the weights it started from
    before = coca_losses(factory())
    after = coca_losses(factory(pretrained=result["path"]))
    assert after["caption"] < 0.7 * before["caption"], (before, after)
    assert after["contrastive"] < before["contrastive"], (before, after)
    assert {k for _, _, losses in reporter.steps for k in losses} == {"total/caption", "total/contrastive"}
    # a deeper checkpoint is what students sample their layers from
    student = coca_model(ARCH, layers=(1, 1, 1), init_from=result["path"], init_from_arch={**ARCH, "vision_cfg": {
        **ARCH["vision_cfg"], "layers": 2}, "text_cfg": {**ARCH["text_cfg"], "layers": 2},
        "multimodal_cfg": {**ARCH["multimodal_cfg"], "layers": 2}})
    assert student.init_report["init"] == "sampled" and student.init_report["layers"]["image"] == [1]


def test_pretraining_is_cached_by_its_key(tmp_path):
    first = run(tmp_path, steps=5)
    reporter = Messages()
    again = run(tmp_path, reporter, steps=5)
    assert again["cached"] is True and again["path"] == first["path"]
    assert any("reusing" in m for m in reporter.messages) and not reporter.steps
    other = run(tmp_path, steps=5, seed=1)  # another seed: other weights, other key
    assert other["path"] != first["path"] and other["cached"] is False


def test_a_damaged_cache_file_is_redone(tmp_path):
    first = run(tmp_path, steps=3)
    with open(first["path"], "r+b") as f:
        f.truncate(100)
    reporter = Messages()
    again = run(tmp_path, reporter, steps=3)
    assert again["cached"] is False and any("redoing" in m for m in reporter.messages)
    assert coca_losses(factory(pretrained=again["path"]))  # loads


def test_unknown_term_weights_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"term_weights names \['captioning'\].*\['caption', 'contrastive'\]"):
        pretraining("small", factory, torch.device("cpu"), Messages(), tmp_path, corpus=corpus, steps=2,
                    batch_size=8, optimizer=lambda p: torch.optim.AdamW(p), term_weights={"captioning": 2.0})


def test_experiment_refuses_a_missing_pretraining_stage(tmp_path):
    from optima.cli.main import app

    result = CliRunner().invoke(app, ["run", "gin/synthetic/ve_tiny6.gin", "--run-dir", str(tmp_path / "r"),
                                      "-b", "experiment.teacher_pretrained = 'huge'"])
    assert result.exit_code == 2
    assert "experiment.teacher_pretrained = 'huge' is not a stage of experiment.pretraining ('large', 'base')" \
        in " ".join(result.output.split())


CHILD = """
import sys, torch
sys.path.insert(0, 'tests')
torch.set_num_threads(1)
from pathlib import Path
from optima.checkpoint import RunKeeper
from test_pretraining import run, Messages
cache, run_dir = Path(sys.argv[1]), sys.argv[2]
print(run(cache, steps=5, keeper=RunKeeper(run_dir), checkpoint_every=2)["path"])
"""


def test_killed_pretraining_resumes_to_the_same_weights(tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    def child(cache, run_dir, **env):
        return subprocess.run([sys.executable, "-c", CHILD, str(cache), str(run_dir)], capture_output=True, text=True,
                              env={**os.environ, **env})

    reference = child(tmp_path / "ref-cache", tmp_path / "ref-run")
    assert reference.returncode == 0, reference.stderr
    killed = child(tmp_path / "cache", tmp_path / "run", OPTIMA_TEST_KILL_AT="small:3")  # after step 3; saved at 2
    assert killed.returncode == -9 and not list((tmp_path / "cache").glob("pretrained-*"))
    resumed = child(tmp_path / "cache", tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr
    assert "small: resumed from" in resumed.stdout and "(step 2)" in resumed.stdout
    a, b = (load_file(r.stdout.strip().splitlines()[-1]) for r in (reference, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
