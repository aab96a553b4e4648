"""Tests of `optima.plugins.policies.paper` (docs/method.md, "Policy")."""
from __future__ import annotations

import io
import math

import pytest
import safetensors.torch
import torch

from optima.errors import ConfigError
from optima.interfaces import Policy
from optima.plugins.policies.paper import FixedPolicy, LayerwisePolicy, RandomPolicy, ThompsonPolicy


def reward_stream(seed: int, means: list[float], sd: float):
    """Deterministic Gaussian rewards per arm, from a generator of its own."""
    g = torch.Generator().manual_seed(seed)

    def draw(arm: int) -> float:
        return float(means[arm] + sd * torch.randn((), generator=g, dtype=torch.float64))
    return draw


def play(policy: Policy, rounds: int, draw) -> list[int]:
    arms = []
    for _ in range(rounds):
        arm = policy.select()
        policy.update(arm, draw(arm))
        arms.append(arm)
    return arms


MEANS7 = [0.02, 0.02, 0.02, 0.08, 0.02, 0.02, 0.02]


# --------------------------------------------------------------------- Thompson

def test_warmup_plays_every_arm_and_has_warmup_rounds_entries():
    for seed in range(5):
        p = ThompsonPolicy(7, seed=seed)
        assert p.warmup_rounds == 14
        order = p.warmup_order
        assert len(order) == 14
        assert sorted(order[:7]) == list(range(7))  # a permutation first
        assert all(0 <= a < 7 for a in order)
        played = []
        while p.in_warmup:
            arm = p.select()
            assert p.select() == arm  # no update, same arm
            played.append(arm)
            p.update(arm, 0.01)
        assert tuple(played) == order
        assert set(played) == set(range(7))
        assert p.diagnostics()["count"].sum() == 14
    q = ThompsonPolicy(3, warmup_rounds=10, seed=1)
    assert len(q.warmup_order) == 10 and set(q.warmup_order) == {0, 1, 2}


def test_warmup_order_differs_across_seeds():
    orders = {ThompsonPolicy(7, seed=s).warmup_order for s in range(6)}
    assert len(orders) > 1


def test_posterior_updates_equal_hand_computed_values():
    p = ThompsonPolicy(2, gamma=0.5, warmup_rounds=4, variance_scale=0.5, seed=3)
    # warm-up rewards (recorded for the arm passed to update)
    p.update(0, 0.1)
    p.update(0, 0.3)
    p.update(1, 0.5)
    assert p.in_warmup
    d = p.diagnostics()
    assert d["mean"].tolist() == pytest.approx([0.2, 0.5])  # running warm-up means
    p.update(0, 0.2)
    assert not p.in_warmup
    d = p.diagnostics()
    # arm 0: mean(0.1, 0.3, 0.2) = 0.2, n = 3; arm 1: 0.5, n = 1
    assert d["mean"].tolist() == pytest.approx([0.2, 0.5])
    assert d["sd"].tolist() == pytest.approx([math.sqrt(0.5 / 4), math.sqrt(0.5 / 2)])
    p.update(1, 0.1)  # mu1 = 0.5*0.5 + 0.5*0.1 = 0.3, n1 = 2
    p.update(1, 0.7)  # mu1 = 0.5*0.3 + 0.5*0.7 = 0.5, n1 = 3
    p.update(0, 1.0)  # mu0 = 0.5*0.2 + 0.5*1.0 = 0.6, n0 = 4
    d = p.diagnostics()
    assert d["mean"].tolist() == pytest.approx([0.6, 0.5])
    assert d["sd"].tolist() == pytest.approx([math.sqrt(0.1), math.sqrt(0.125)])
    assert d["count"].tolist() == [4.0, 3.0]
    # 4 plays of arm 0 and 3 of arm 1 among the last 7 (window 20)
    assert float(d["entropy"]) == pytest.approx(-(4 / 7 * math.log(4 / 7) + 3 / 7 * math.log(3 / 7)))
    assert d["entropy"].shape == () and d["mean"].shape == (2,)
    assert d["mean"].dtype.is_floating_point and d["count"].dtype.is_floating_point
    assert p.halflife == pytest.approx(1.0)


def test_arm_without_warmup_reward_gets_zero_prior():
    p = ThompsonPolicy(3, gamma=0.9, warmup_rounds=3, seed=0)
    p.update(0, 0.4)
    p.update(0, 0.2)
    p.update(1, 0.6)
    d = p.diagnostics()
    assert d["mean"].tolist() == pytest.approx([0.3, 0.6, 0.0])
    assert d["sd"].tolist() == pytest.approx([math.sqrt(1 / 3), math.sqrt(1 / 2), 1.0])
    p.update(2, 1.0)  # mu2 = 0.9*0 + 0.1*1.0
    assert p.diagnostics()["mean"].tolist() == pytest.approx([0.3, 0.6, 0.1])


def test_select_draws_one_standard_normal_vector_and_takes_argmax():
    p = ThompsonPolicy(4, gamma=0.8, variance_scale=0.3, seed=11)
    play(p, 20, reward_stream(0, [0.1, 0.2, 0.3, 0.4], 0.05))
    assert not p.in_warmup
    for _ in range(10):
        d = p.diagnostics()
        g = torch.Generator()
        g.set_state(p.state_dict()["generator"])
        z = torch.randn(4, generator=g, dtype=torch.float64)
        expected = int(torch.argmax(d["mean"] + d["sd"] * z))
        assert p.select() == expected
        assert torch.equal(p.generator.get_state(), g.get_state())  # exactly one draw
        p.update(expected, 0.05)


def test_tiny_variance_plays_the_best_mean():
    p = ThompsonPolicy(3, warmup_rounds=3, variance_scale=1e-12, seed=0)
    for arm, r in [(0, 0.1), (1, 0.5), (2, 0.3)]:
        p.update(arm, r)
    assert [p.select() for _ in range(5)] == [1] * 5


def test_learns_the_best_arm_on_stationary_gaussian_rewards():
    rounds = 400
    for seed in (0, 1, 2):
        p = ThompsonPolicy(7, gamma=0.9, variance_scale=0.001, seed=seed)
        arms = play(p, rounds, reward_stream(100 + seed, MEANS7, 0.01))
        first = sum(a == 3 for a in arms[: rounds // 2]) / (rounds // 2)
        second = sum(a == 3 for a in arms[rounds // 2:]) / (rounds // 2)
        assert second > first
        assert second > 0.5
        assert float(p.diagnostics()["entropy"]) < math.log(7) / 2


def test_learns_the_best_arm_on_bernoulli_rewards():
    probs = [0.2, 0.2, 0.2, 0.2, 0.7]
    g = torch.Generator().manual_seed(5)
    p = ThompsonPolicy(5, gamma=0.95, variance_scale=0.05, seed=4)
    arms = []
    for _ in range(400):
        arm = p.select()
        p.update(arm, float(torch.rand((), generator=g) < probs[arm]))
        arms.append(arm)
    first = sum(a == 4 for a in arms[:200]) / 200
    second = sum(a == 4 for a in arms[200:]) / 200
    assert second > first and second > 0.5


def test_same_seed_same_arms_other_seed_different():
    def run(seed):
        return play(ThompsonPolicy(7, variance_scale=0.01, seed=seed), 150,
                    reward_stream(7, MEANS7, 0.01))
    assert run(0) == run(0)
    assert run(0) != run(1)


@pytest.mark.parametrize("rounds_before", [5, 40])  # mid-warm-up and after it
def test_state_dict_round_trip_continues_identically(rounds_before):
    a = ThompsonPolicy(7, gamma=0.7, variance_scale=0.01, entropy_window=5, seed=2)
    play(a, rounds_before, reward_stream(1, MEANS7, 0.02))
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    # a fresh instance with other hyper-parameters takes all of them from the state
    b = ThompsonPolicy(7, gamma=0.3, variance_scale=1.0, warmup_rounds=20, seed=99)
    b.load_state_dict(state)
    assert (b.gamma, b.variance_scale, b.warmup_rounds, b.entropy_window, b.seed) == (0.7, 0.01, 14, 5, 2)
    assert b.warmup_order == a.warmup_order and b.in_warmup == a.in_warmup
    for k, v in a.diagnostics().items():
        assert torch.equal(v, b.diagnostics()[k]), k
    draw = reward_stream(9, MEANS7, 0.02)
    rewards = [draw(i % 7) for i in range(60)]
    seq_a, seq_b = [], []
    for r in rewards:
        x, y = a.select(), b.select()
        seq_a.append(x)
        seq_b.append(y)
        a.update(x, r)
        b.update(y, r)
    assert seq_a == seq_b
    for k, v in a.diagnostics().items():
        assert torch.equal(v, b.diagnostics()[k]), k


def test_state_dict_is_a_snapshot():
    a = ThompsonPolicy(3, seed=0)
    play(a, 10, reward_stream(0, [0.1, 0.2, 0.3], 0.01))
    state = a.state_dict()
    saved = {k: v.clone() for k, v in state.items()}
    play(a, 10, reward_stream(1, [0.1, 0.2, 0.3], 0.01))
    for k in saved:
        assert torch.equal(saved[k], state[k]), k


def test_state_dict_survives_torch_weights_only_and_safetensors():
    for make in (lambda: ThompsonPolicy(7, variance_scale=0.01, seed=5),
                 lambda: RandomPolicy(7, seed=5), lambda: FixedPolicy(7, arm=2, seed=5)):
        a = make()
        play(a, 20, reward_stream(3, MEANS7, 0.01))
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        via_torch = torch.load(buf, weights_only=True)
        via_st = safetensors.torch.load(safetensors.torch.save(a.state_dict()))
        b, c = make(), make()
        b.load_state_dict(via_torch)
        c.load_state_dict(via_st)
        draw = reward_stream(4, MEANS7, 0.01)
        rewards = [draw(0) for _ in range(30)]
        seqs = []
        for p in (a, b, c):
            seq = []
            for r in rewards:
                arm = p.select()
                p.update(arm, r)
                seq.append(arm)
            seqs.append(seq)
        assert seqs[0] == seqs[1] == seqs[2]


def test_state_of_empty_history_round_trips():
    a = ThompsonPolicy(4, seed=1)
    b = ThompsonPolicy(4, seed=2)
    b.load_state_dict(a.state_dict())
    assert b.warmup_order == a.warmup_order
    assert play(a, 30, reward_stream(0, [0.1] * 4, 0.05)) == play(b, 30, reward_stream(0, [0.1] * 4, 0.05))


def test_load_state_dict_rejects_mismatch():
    a = ThompsonPolicy(7, seed=0)
    with pytest.raises(ConfigError, match="arms"):
        ThompsonPolicy(3, seed=0).load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match="lacks"):
        ThompsonPolicy(7, seed=0).load_state_dict(RandomPolicy(7).state_dict())


@pytest.mark.parametrize("kwargs, name", [
    ({"gamma": 0.0}, "gamma"), ({"gamma": 1.5}, "gamma"), ({"gamma": -0.1}, "gamma"),
    ({"variance_scale": 0.0}, "variance_scale"), ({"variance_scale": -1.0}, "variance_scale"),
    ({"warmup_rounds": 6}, "warmup_rounds"), ({"entropy_window": 0}, "entropy_window"),
    ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
])
def test_thompson_validation(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        ThompsonPolicy(7, **kwargs)


def test_thompson_edge_parameters_are_valid():
    p = ThompsonPolicy(7, gamma=1.0, warmup_rounds=7)
    assert p.halflife == math.inf
    assert ThompsonPolicy(7, gamma=0.9).halflife == pytest.approx(math.log(0.5) / math.log(0.9))
    with pytest.raises(ConfigError, match="num_arms"):
        ThompsonPolicy(0)


@pytest.mark.parametrize("make", [lambda: ThompsonPolicy(3), lambda: RandomPolicy(3),
                                  lambda: FixedPolicy(3)])
def test_update_rejects_non_finite_reward_and_bad_arm(make):
    p = make()
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="non-finite"):
            p.update(0, bad)
    for arm in (-1, 3):
        with pytest.raises(ValueError, match="out of range"):
            p.update(arm, 0.1)
    assert p.diagnostics()["count"].sum() == 0  # nothing recorded


def test_entropy_window_uses_last_plays_only():
    p = ThompsonPolicy(2, warmup_rounds=2, entropy_window=3, seed=0)
    for arm in (0, 1, 0, 0, 0):
        p.update(arm, 0.1)
    assert float(p.diagnostics()["entropy"]) == 0.0  # last three are arm 0
    p.update(1, 0.1)
    assert float(p.diagnostics()["entropy"]) == pytest.approx(
        -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))


# ------------------------------------------------------------------- baselines

def test_fixed_policy():
    p = FixedPolicy(7, arm=2)
    assert all(p.select() == 2 for _ in range(5))
    play(p, 10, lambda a: 0.1)
    d = p.diagnostics()
    assert float(d["entropy"]) == 0.0
    assert d["count"].tolist() == [0, 0, 10, 0, 0, 0, 0]
    assert FixedPolicy(7).select() == 6
    assert FixedPolicy(7, arm=-7).select() == 0
    for bad in (7, -8, 1.0):
        with pytest.raises(ConfigError, match="arm"):
            FixedPolicy(7, arm=bad)
    assert float(FixedPolicy(7).diagnostics()["entropy"]) == 0.0


def test_layerwise_policy_is_the_all_modules_arm():
    from optima.arms import ArmSpace

    space = ArmSpace(["image", "text", "multimodal"])
    p = LayerwisePolicy(len(space), seed=3)
    assert isinstance(p, FixedPolicy)
    arms = play(p, 20, lambda a: 0.05)
    assert set(arms) == {6} and space[6] == ("image", "text", "multimodal")
    assert float(p.diagnostics()["entropy"]) == 0.0


def test_random_policy_uniform_and_seeded():
    p = RandomPolicy(7, seed=0)
    arms = play(p, 700, lambda a: 0.0)
    counts = p.diagnostics()["count"]
    assert counts.sum() == 700 and set(arms) == set(range(7))
    assert counts.min() > 60 and counts.max() < 140
    assert float(p.diagnostics()["entropy"]) > 0.5 * math.log(7)
    assert play(RandomPolicy(7, seed=0), 50, lambda a: 0.0) == arms[:50]
    assert play(RandomPolicy(7, seed=1), 50, lambda a: 0.0) != arms[:50]


def test_random_policy_round_trip():
    a = RandomPolicy(5, seed=8)
    play(a, 13, lambda x: 0.0)
    b = RandomPolicy(5, seed=0)
    b.load_state_dict(a.state_dict())
    assert play(a, 40, lambda x: 0.0) == play(b, 40, lambda x: 0.0)
    assert torch.equal(a.diagnostics()["count"], b.diagnostics()["count"])
