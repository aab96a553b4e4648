"""`gin/ablations/`: each file includes the quickstart and changes only the reward
or only the policy (with the arms it plays); a run's operative config shows the
swap took effect."""
import re
from pathlib import Path

import gin
import pytest
import torch
from typer.testing import CliRunner

from optima import config
from optima.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
ABLATIONS = sorted((ROOT / "gin" / "ablations").glob("*.gin"))
#: file -> the distillation parameters it changes and their values
EXPECTED = {
    "reward_kd": {"reward": "@kd_reward()"},
    "reward_layerwise": {"reward": "@layerwise_reward()"},
    "reward_combined": {"reward": "@combined_reward()"},
    "policy_random": {"policy": "@random_policy"},
    "policy_layerwise": {"policy": "@layerwise_policy"},
    "policy_encoders": {"policy": "@fixed_policy", "arms": "[['image', 'text']]"},
}
TINY = [
    "pretraining.steps = 1", "pretraining.batch_size = 8", "corpus/world_captions_task.train_size = 16",
    "world_ve_task.train_size = 64", "world_ve_task.test_size = 8",
    "teacher_training.steps = 1", "teacher_training.batch_size = 8", "teacher_training.warmup_steps = 0",
    "distillation.rounds = 2", "distillation.steps_per_round = 1", "distillation.batch_size = 8",
    "distillation.warmup_steps = 0",
]


def _statements() -> set[str]:
    """gin's config as one string per binding (continuation lines joined)."""
    out: list[str] = []
    for line in gin.config_str().splitlines():
        if line[:1].isspace() and out:
            out[-1] += " " + line.strip()
        elif line.strip() and not line.startswith("#"):
            out.append(line.strip())
    return set(out)


def test_every_ablation_is_expected():
    assert {p.stem for p in ABLATIONS} == set(EXPECTED)


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_an_ablation_changes_only_its_reward_or_policy(path):
    changes = EXPECTED[path.stem]
    config.setup(external_plugins=False)
    config.parse([str(ROOT / "gin" / "quickstart.gin")])
    base = _statements()
    config.parse([str(path)])
    ablation = _statements()
    gin.clear_config()
    bindings = {f"distillation.{parameter} = {value}" for parameter, value in changes.items()}
    assert bindings <= ablation
    assert ablation - base <= bindings
    assert all(s.startswith(tuple(f"distillation.{p} = " for p in changes)) for s in base - ablation)


@pytest.mark.slow
@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_the_swap_is_in_the_operative_config(path, tmp_path):
    args = ["run", str(path.relative_to(ROOT)), "--run-dir", str(tmp_path / "run"), "--no-plugins"]
    for b in TINY:
        args += ["-b", b]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds waiting
    try:
        result = CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    operative = (tmp_path / "run" / "operative_config.gin").read_text()
    for parameter, value in EXPECTED[path.stem].items():
        used = re.findall(rf"^(?:\w+/)?distillation\.{parameter} = (.+)$", operative, re.M)
        assert used == [value]


def test_the_encoders_ablation_plays_one_arm_of_both_encoders(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["run", str(ROOT / "gin" / "ablations" / "policy_encoders.gin"), "--dry-run",
                                      "--no-plugins"])
    assert result.exit_code == 0, result.output
    assert "tiny6: 1 arm: image+text\n" in result.output
