"""`optima bandit` (optima/bandit.py, cli/bandit.py): environments, regret, the
command on tiny settings, its table and figure."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from optima import bandit
from optima.cli.main import app
from optima.interfaces import Policy
from optima.plugins.policies.paper import FixedPolicy


@pytest.mark.parametrize("name", list(bandit.ENVIRONMENTS))
def test_environments_have_the_declared_shape_and_repeat_per_seed(name):
    env = bandit.make_environment(name, seeds=3, rounds=20)
    assert env.means.shape == env.rewards.shape == (3, min(20, env.rounds), env.num_arms)
    assert np.isfinite(env.rewards).all()
    again = bandit.make_environment(name, seeds=3, rounds=20)
    assert np.array_equal(env.rewards, again.rewards)
    assert not np.array_equal(env.rewards[0], env.rewards[1])  # seeds differ
    if env.features is not None:
        assert env.features.shape[0] == env.num_arms and set(np.unique(env.features)) <= {0.0, 1.0}


def test_idle_recovers_has_the_best_arm_come_back_while_idle():
    env = bandit.make_environment("idle_recovers", seeds=1, rounds=1000)
    best = env.means[0].argmax(axis=1)
    assert best[0] == 0 and best[400] == 1 and best[800] == 0  # falls at 30%, back at 60%
    assert env.means[0, 800, 0] > env.means[0, 0, 0]  # better than ever


def test_clipped_rewards_and_their_expected_value():
    env = bandit.make_environment("optima_scale", seeds=400, rounds=50)
    assert (env.rewards >= 0).all()
    # the regret's means are what the clipped rewards pay on average
    assert np.allclose(env.rewards.mean(axis=0), env.means[0], atol=5 * env.rewards.std(axis=0).max() / 20)


def test_regret_of_a_fixed_arm_by_hand():
    env = bandit.make_environment("abrupt", seeds=2, rounds=40)
    regret = bandit.simulate(lambda num_arms, seed: FixedPolicy(num_arms, arm=1, seed=seed), env)
    assert np.allclose(regret, env.means.max(axis=2) - env.means[:, :, 1])
    assert (regret >= 0).all()


class _Oracle(Policy):
    """Knows the best arm of the abrupt environment (a policy from outside OPTIMA)."""

    def __init__(self, num_arms, seed=0):
        self.num_arms, self.t = num_arms, 0

    def select(self):
        means = bandit.make_environment("abrupt", seeds=1, rounds=100).means[0, self.t]
        return int(means.argmax())

    def update(self, arm, reward):
        self.t += 1

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_benchmark_runs_any_policy_class_and_an_oracle_has_no_regret():
    env = bandit.make_environment("abrupt", seeds=2, rounds=100)
    results = bandit.benchmark({"oracle": _Oracle, "fixed": lambda num_arms, seed: FixedPolicy(num_arms, seed=seed)},
                               {"abrupt": env}, jobs=1)
    assert [r.policy for r in results] == ["oracle", "fixed"]
    assert results[0].mean == 0.0 and results[1].mean > 0.0
    assert len(results[0].curve) == 100 and len(results[0].final) == 2


def test_worker_processes_give_the_same_results():
    envs = {n: bandit.make_environment(n, seeds=2, rounds=30) for n in ("abrupt", "drift")}
    factories = {"fixed": lambda num_arms, seed: FixedPolicy(num_arms, arm=0, seed=seed)}
    from optima.plugins.policies.thompson import DiscountedThompsonPolicy

    factories["dts"] = DiscountedThompsonPolicy
    one = bandit.benchmark(factories, envs, jobs=1)
    two = bandit.benchmark(factories, envs, jobs=2)
    assert [(r.policy, r.environment, r.final) for r in one] == [(r.policy, r.environment, r.final) for r in two]


def test_replay_reads_the_recorded_quickstart_curves():
    means, sds, labels = bandit.load_replay()
    assert labels == ["image", "text", "multimodal", "image+text", "image+multimodal", "text+multimodal",
                      "image+text+multimodal"]
    assert means.shape[1] == 7 and means.shape[0] >= 20 and (sds > 0).all()
    record = json.loads(bandit.REPLAY_FILE.read_text())
    assert record["command"].startswith("OPTIMA_CACHE=") and "bench/record_arm_rewards.py" in record["command"]


def test_optima_bandit_on_tiny_settings_writes_its_table_and_figure(tmp_path):
    out = tmp_path / "bandit"
    result = CliRunner().invoke(app, ["bandit", "--seeds", "3", "--rounds", "25", "-p", "optima",
                                      "-p", "auto/optima", "-p", "discounted_ts_policy", "-e", "abrupt",
                                      "-e", "replay", "--jobs", "1", "--out", str(out),
                                      "-b", "auto/optima_policy.variance_scale = 'auto'"])
    assert result.exit_code == 0, result.output
    assert "total regret" in result.output and "discounted_ts" in result.output
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| policy | abrupt | replay |"
    assert [line.split("|")[1].strip() for line in table[2:]] == ["optima", "auto/optima", "discounted_ts"]
    data = json.loads((out / "results.json").read_text())
    assert {(r["policy"], r["environment"]) for r in data["results"]} == {
        (p, e) for p in ("optima", "auto/optima", "discounted_ts") for e in ("abrupt", "replay")}
    assert all(len(r["final"]) == 3 for r in data["results"])
    assert data["environments"]["abrupt"] == {"arms": 3, "rounds": 25, "seeds": 3}
    import matplotlib.image

    image = matplotlib.image.imread(out / "regret.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400


@pytest.mark.parametrize("args, message", [
    (["-p", "no_such"], "unknown configurable 'no_such_policy'"),
    (["-e", "no_such"], "unknown environment 'no_such'; choose from abrupt, drift"),
    (["-p", "discounted_ts", "-b", "discounted_ts_policy.gamma = 2.0"],
     "discounted_ts_policy.gamma = 2.0 must be a number in (0, 1]"),
    (["-p", "sw_ucb", "-b", "sw_ucb_policy.window = 2"],
     "sw_ucb_policy.window = 2 must be an integer >= the number of arms (3)"),
    (["--seeds", "0"], "bandit.seeds = 0 must be an integer >= 1"),
])
def test_bad_input_is_one_line(args, message, tmp_path):
    result = CliRunner().invoke(app, ["bandit", "-e", "abrupt", "--rounds", "5", "--out", str(tmp_path / "o"), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert message in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_the_regret_table_fits_80_columns(tmp_path):
    """Every policy name and every mean±std cell whole on its row at 80 columns."""
    from rich.cells import cell_len

    envs = ["abrupt", "drift", "idle_recovers", "optima_scale", "replay"]
    policies = ["optima", "auto/optima", "discounted_ucb", "sw_ucb", "eps_greedy"]
    result = CliRunner().invoke(app, ["bandit", "--seeds", "2", "--rounds", "20", "--jobs", "1",
                                      "--out", str(tmp_path / "o"), *(a for e in envs for a in ("-e", e)),
                                      *(a for p in policies for a in ("-p", p)),
                                      "-b", "auto/optima_policy.variance_scale = 'auto'"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(cell_len(line) <= 80 for line in lines), [line for line in lines if cell_len(line) > 80]
    cell = r"\s+[\d.]+±[\d.]+"
    for policy in policies:
        assert any(re.fullmatch(rf"\s*{re.escape(policy)}{cell * len(envs)}\s*", line) for line in lines), \
            (policy, result.output)


def _damaged_recordings(tmp_path):
    text = bandit.REPLAY_FILE.read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])  # a copy cut short, as by a full disk
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    no_runs = tmp_path / "no_runs.json"
    no_runs.write_text(json.dumps({"arms": ["image"]}))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"arms": ["image"], "runs": [{"arm": 0, "rewards": ["high", 0.1]}]}))
    return [cut, binary, no_runs, wrong]


def test_a_damaged_replay_recording_is_one_line_naming_it(tmp_path):
    for path in _damaged_recordings(tmp_path):
        with pytest.raises(bandit.ConfigError) as info:
            bandit.load_replay(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "\n" not in message and "bench/record_arm_rewards.py" in message


def test_optima_bandit_replays_a_recording_given_by_binding_and_refuses_a_damaged_one(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(bandit.REPLAY_FILE.read_text())
    ok = CliRunner().invoke(app, ["bandit", "-e", "replay", "-p", "random", "--seeds", "2", "--jobs", "1",
                                  "--out", str(tmp_path / "ok"), "-b", f"replay_environment.path = '{mine}'"])
    assert ok.exit_code == 0, ok.output
    cut = _damaged_recordings(tmp_path)[0]
    result = CliRunner().invoke(app, ["bandit", "-e", "replay", "-p", "random", "--seeds", "2",
                                      "--out", str(tmp_path / "o"), "-b", f"replay_environment.path = '{cut}'"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"{cut}: not a JSON reward recording" in lines[0]
    assert not (tmp_path / "o").exists()


def test_rotting_rewards_shrink_with_plays_and_with_training_time():
    env = bandit.make_environment("rotting", seeds=2, rounds=100)
    assert env.rested and env.level.shape == (2, 100) and np.all(np.diff(env.level, axis=1) < 0)
    sorted_means = -np.sort(-env.means.reshape(2, -1), axis=1)[:, :100]
    assert np.allclose(env.best(), sorted_means * env.level)
    from optima.plugins.policies.paper import FixedPolicy

    regret = bandit.simulate(lambda num_arms, seed: FixedPolicy(num_arms, arm=2, seed=seed), env)
    assert np.allclose(regret, env.best() - env.level * env.means[:, :, 2])


def test_fifteen_arms_are_the_subsets_of_four_modules():
    env = bandit.make_environment("fifteen_arms", seeds=1, rounds=10)
    assert env.num_arms == 15 and env.features.shape == (15, 4) and env.labels[-1] == "image+text+multimodal+audio"
    assert env.labels[int(env.means[0, 0].argmax())] == "image+multimodal"


def test_a_policy_that_refuses_an_environment_s_rewards_is_one_line_naming_both():
    from optima.plugins.policies.beta import DecayedBetaThompsonPolicy

    means = np.full((2, 20, 2), 0.5)
    env = bandit.Environment("gaussian", means, means + 0.6)  # rewards of 1.1: not successes
    with pytest.raises(bandit.ConfigError) as info:
        bandit.benchmark({"decayed_beta_ts": DecayedBetaThompsonPolicy}, {"gaussian": env})
    message = str(info.value)
    assert message.startswith("policy 'decayed_beta_ts': environment 'gaussian', seed 0, round ") and \
        "takes rewards in [0, 1]" in message and "\n" not in message
