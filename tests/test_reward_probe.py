"""`distillation.reward_probe`: the reward measured on fixed probe batches before
and after each round (docs/method.md, "Reward of a round", the probe)."""
from __future__ import annotations

import copy

import pytest
from typer.testing import CliRunner

from conftest import TINY
from optima.arms import build_policy
from optima.checkpoint import rng_state, set_rng_state
from optima.cli.main import app
from optima.engine import Distiller, guarded_reward
from optima.plugins.policies.paper import ThompsonPolicy
from optima.plugins.rewards.loss_decrement import combined_reward
from test_round_losses import distiller


def _distiller(probe: int, lr: float = 1e-3, rounds: int = 4) -> Distiller:
    return distiller(combined_reward(), policy=build_policy(ThompsonPolicy, 3, 0), rounds=rounds, lr=lr, probe=probe)


def test_the_reward_compares_the_probe_before_and_after_each_round():
    d = _distiller(probe=2)
    assert len(d.probe) == 2
    before = d.probe_losses()
    assert before.total == d.probe_losses().total  # the same batches, no gradient: the same values
    first = d.play_round()
    after = d.probe_losses()
    # round 1 has a reward too: the probe before it is the comparison
    assert first.reward is not None
    assert first.reward == pytest.approx(guarded_reward(d.reward, before, after)[0])
    assert d.previous.total == after.total
    assert set(after.total) >= {"kd", "hidden", "attn"}
    # the round's own training sums are still what the round logs
    assert first.losses.total != after.total
    d.close()


def test_without_training_the_probe_does_not_move_and_the_reward_is_zero():
    d = _distiller(probe=1, lr=0.0)
    rewards = [r.reward for r in d.run()]
    assert rewards == [0.0] * 4
    d.close()


def test_without_a_probe_the_first_round_has_no_reward():
    d = _distiller(probe=0)
    assert d.play_round().reward is None and not d.probe
    d.close()


def test_resume_mid_run_continues_with_the_same_rewards():
    d = _distiller(probe=2, rounds=6)
    d.run(rounds=3)
    state, rng = copy.deepcopy(d.state_dict()), rng_state()  # what a checkpoint holds
    more = [(r.arm, r.reward) for r in d.run(rounds=6)[3:]]
    e = _distiller(probe=2, rounds=6)
    e.load_state_dict(state)
    set_rng_state(rng)
    assert [(r.arm, r.reward) for r in e.run(rounds=6)[3:]] == more
    d.close()
    e.close()


@pytest.mark.parametrize("value, expected", [
    ("-1", "distillation.reward_probe must be an integer >= 0 (batches; 0: the round's own losses), got -1"),
    ("1000", "distillation.reward_probe = 1000: the training split holds only 16 batch(es) of 16"),
])
def test_bad_probe_sizes_are_one_line_errors(tmp_path, value, expected):
    args = ["run", "tests/gin/tiny_ve.gin", "--run-dir", str(tmp_path / "run")]
    for b in [*TINY, f"distillation.reward_probe = {value}"]:
        args += ["-b", b]
    result = CliRunner().invoke(app, args, env={"OPTIMA_CACHE": str(tmp_path / "cache"), "COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())
