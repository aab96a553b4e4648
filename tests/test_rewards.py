"""Tests of `optima.plugins.rewards.loss_decrement` (docs/method.md, "Reward of a round")."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optima.engine import RoundAccumulator
from optima.errors import ConfigError
from optima.interfaces import Reward
from optima.plugins.rewards.loss_decrement import (
    RelativeDecrementReward,
    combined_reward,
    kd_reward,
    layerwise_reward,
)


def test_factories_terms_and_interface():
    assert kd_reward().terms == ("kd",)
    assert layerwise_reward().terms == ("hidden", "attn")
    assert combined_reward().terms == ("kd", "hidden", "attn")
    for factory in (kd_reward, layerwise_reward, combined_reward):
        assert isinstance(factory(), Reward)
        assert factory.__doc__ and "\n" not in factory.__doc__.strip()


PREV = {"kd": 2.0, "hidden": 10.0, "attn": 4.0, "task": 1.0}
CUR = {"kd": 1.5, "hidden": 11.0, "attn": 3.0, "task": 0.5}
# kd: (2-1.5)/2 = 0.25; hidden: (10-11)/10 = -0.1 -> 0; attn: (4-3)/4 = 0.25


def test_kd_formula_on_hand_numbers():
    assert kd_reward()(PREV, CUR) == pytest.approx(0.25)


def test_layerwise_formula_on_hand_numbers():
    assert layerwise_reward()(PREV, CUR) == pytest.approx((0.0 + 0.25) / 2)


def test_combined_formula_on_hand_numbers():
    assert combined_reward()(PREV, CUR) == pytest.approx((0.25 + 0.0 + 0.25) / 3)


def test_other_hand_numbers():
    r = combined_reward()
    prev = {"kd": 1.0, "hidden": 8.0, "attn": 0.5}
    cur = {"kd": 0.9, "hidden": 2.0, "attn": 0.5}
    # 0.1 + 0.75 + 0.0
    assert r(prev, cur) == pytest.approx(0.85 / 3)


def test_increase_is_clipped_at_zero():
    r = combined_reward()
    prev = {"kd": 1.0, "hidden": 1.0, "attn": 1.0}
    cur = {"kd": 5.0, "hidden": 1.5, "attn": 100.0}
    assert r(prev, cur) == 0.0


def test_previous_zero_counts_as_zero():
    r = combined_reward()
    prev = {"kd": 0.0, "hidden": 2.0, "attn": 0.0}
    cur = {"kd": 0.0, "hidden": 1.0, "attn": 0.0}
    assert r(prev, cur) == pytest.approx(0.5 / 3)
    assert kd_reward()({"kd": 0.0}, {"kd": 0.0}) == 0.0
    assert kd_reward()({"kd": -1.0}, {"kd": -2.0}) == 0.0


def test_drop_to_zero_is_one_and_negative_current_is_clipped_at_one():
    assert kd_reward()({"kd": 3.0}, {"kd": 0.0}) == 1.0
    assert kd_reward()({"kd": 3.0}, {"kd": -3.0}) == 1.0
    assert combined_reward()({"kd": 1, "hidden": 1, "attn": 1}, {"kd": 0, "hidden": 0, "attn": 0}) == 1.0


def test_tensor_values_are_accepted():
    assert kd_reward()({"kd": torch.tensor(4.0)}, {"kd": torch.tensor(3.0)}) == pytest.approx(0.25)


def test_unknown_term_is_config_error_naming_valid_terms():
    with pytest.raises(ConfigError, match="kd, hidden, attn"):
        RelativeDecrementReward(["kd", "logits"])
    with pytest.raises(ConfigError):
        RelativeDecrementReward([])
    with pytest.raises(ConfigError):
        RelativeDecrementReward(["kd", "kd"])


def test_missing_term_is_value_error_naming_it():
    with pytest.raises(ValueError, match="attn"):
        combined_reward()({"kd": 1.0, "hidden": 1.0}, {"kd": 1.0, "hidden": 1.0, "attn": 1.0})
    with pytest.raises(ValueError, match="hidden"):
        layerwise_reward()(PREV, {"kd": 1.0, "attn": 1.0})
    # a term the reward does not read may be missing
    assert kd_reward()({"kd": 1.0}, {"kd": 0.5}) == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["previous", "current"])
def test_non_finite_raises(bad, where):
    prev, cur = dict(PREV), dict(CUR)
    (prev if where == "previous" else cur)["hidden"] = bad
    with pytest.raises(ValueError, match="non-finite loss 'hidden'"):
        combined_reward()(prev, cur)
    # a reward that does not read the bad term is unaffected
    assert kd_reward()(prev, cur) == pytest.approx(0.25)


loss = st.floats(min_value=0.0, max_value=1e30, allow_nan=False, allow_infinity=False)
terms3 = st.fixed_dictionaries({"kd": loss, "hidden": loss, "attn": loss})


@settings(max_examples=200, deadline=None)
@given(prev=terms3, cur=terms3)
def test_property_reward_in_unit_interval(prev, cur):
    for reward in (kd_reward(), layerwise_reward(), combined_reward()):
        r = reward(prev, cur)
        assert isinstance(r, float)
        assert 0.0 <= r <= 1.0


@settings(max_examples=100, deadline=None)
@given(prev=terms3, cur=terms3, bad=st.sampled_from([math.nan, math.inf, -math.inf]),
       term=st.sampled_from(["kd", "hidden", "attn"]), in_prev=st.booleans())
def test_property_non_finite_raises(prev, cur, bad, term, in_prev):
    (prev if in_prev else cur)[term] = bad
    with pytest.raises(ValueError, match="non-finite"):
        combined_reward()(prev, cur)


def test_round_accumulator_sums_and_resets():
    acc = RoundAccumulator()
    assert acc.steps == 0 and acc.totals() == {}
    acc.add({"kd": 1.0, "hidden": 2.0, "attn": 0.5})
    acc.add({"kd": 0.25, "hidden": 3.0, "attn": torch.tensor(0.5)})
    acc.add({"kd": 0.75, "hidden": 1.0, "attn": 1.0})
    assert acc.steps == 3
    assert acc.totals() == pytest.approx({"kd": 2.0, "hidden": 6.0, "attn": 2.0})
    # totals() is a copy
    acc.totals()["kd"] = 99.0
    assert acc.totals()["kd"] == pytest.approx(2.0)
    acc.reset()
    assert acc.steps == 0 and acc.totals() == {}
    acc.add({"kd": 4.0})
    assert acc.steps == 1 and acc.totals() == {"kd": 4.0}


def test_round_accumulator_feeds_reward_and_propagates_nan():
    acc = RoundAccumulator()
    for v in (1.0, 1.0):
        acc.add({"kd": v, "hidden": v, "attn": v})
    previous = acc.totals()
    acc.reset()
    for v in (0.5, 1.0):
        acc.add({"kd": v, "hidden": v, "attn": v})
    assert combined_reward()(previous, acc.totals()) == pytest.approx(0.25)
    acc.add({"kd": math.nan, "hidden": 1.0, "attn": 1.0})
    assert math.isnan(acc.totals()["kd"])
    with pytest.raises(ValueError, match="non-finite"):
        combined_reward()(previous, acc.totals())
