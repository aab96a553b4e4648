"""Rewards of a round: the relative decrement of the whole model's losses.

See `docs/method.md`, "Reward of a round". For each quantity `Q` the reward reads
(a subset of "kd", "hidden", "attn"), `Q^t` is the whole model's value summed
over the steps of round `t` (`RoundLosses.total`), and

    r_t = (1/|terms|) * sum_Q clip((Q^{t-1} - Q^t) / Q^{t-1}, 0, 1)

Each ratio is the relative decrement, clipped at 0 (a loss that went up earns
nothing). Losses are non-negative, so a ratio can only exceed 1 if a loss went
negative; it is clipped at 1 all the same, which keeps `r_t` in `[0, 1]`. Where
`Q^{t-1} <= 0` there is nothing left to decrease and the ratio counts as 0.

Non-finite losses (NaN, inf) are not turned into a reward: `__call__` raises
`ValueError` naming the term, so the engine can stop the run (or skip the
update) instead of feeding NaN to the bandit.
"""
from __future__ import annotations

import math
from typing import Sequence

from optima.errors import ConfigError
from optima.interfaces import LossTerms, Reward, RoundLosses

#: The loss terms a reward may read, in their canonical order.
VALID_TERMS: tuple[str, ...] = ("kd", "hidden", "attn")


class RelativeDecrementReward(Reward):
    """Mean over `terms` of the clipped relative decrement of each loss.

    `terms` is a non-empty subset of ("kd", "hidden", "attn"); an unknown or
    repeated term raises `ConfigError`. `__call__(previous, current)` takes the
    losses of the previous and the current round (`RoundLosses`, or any mapping
    of whole-model totals) and reads their totals; a term missing from either, or
    a non-finite value of a term it reads, raises `ValueError`.
    """

    def __init__(self, terms: Sequence[str]):
        if isinstance(terms, str):
            terms = (terms,)
        terms = tuple(terms)
        if not terms:
            raise ConfigError(f"a reward needs at least one term; valid terms: {', '.join(VALID_TERMS)}")
        unknown = [t for t in terms if t not in VALID_TERMS]
        if unknown:
            raise ConfigError(f"unknown reward term(s) {unknown}; valid terms: {', '.join(VALID_TERMS)}")
        if len(set(terms)) != len(terms):
            raise ConfigError(f"reward terms must not repeat, got {list(terms)}")
        self.terms: tuple[str, ...] = terms

    def __call__(self, previous: RoundLosses | LossTerms, current: RoundLosses | LossTerms) -> float:
        total = 0.0
        for term in self.terms:
            prev = _get(previous, term, "previous")
            cur = _get(current, term, "current")
            total += relative_decrement(prev, cur)
        return min(1.0, max(0.0, total / len(self.terms)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(terms={self.terms!r})"


def relative_decrement(previous: float, current: float) -> float:
    """`clip((previous - current) / previous, 0, 1)`; 0 where `previous <= 0`."""
    if previous <= 0.0:
        return 0.0
    return min(1.0, max(0.0, (previous - current) / previous))


def _get(losses: LossTerms, term: str, which: str) -> float:
    try:
        value = losses[term]
    except KeyError:
        raise ValueError(f"the {which} round's losses lack the term {term!r} "
                         f"(have {sorted(losses)})") from None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"non-finite loss {term!r} = {value} in the {which} round")
    return value


def kd_reward() -> RelativeDecrementReward:
    """KD-only reward: the relative decrement of `L_kd`."""
    return RelativeDecrementReward(("kd",))


def layerwise_reward() -> RelativeDecrementReward:
    """Layerwise reward: mean relative decrement of `L_hidn` and `L_attn` (all layers)."""
    return RelativeDecrementReward(("hidden", "attn"))


def combined_reward() -> RelativeDecrementReward:
    """Combined reward (the paper's default): mean over `L_kd`, `L_hidn`, `L_attn`."""
    return RelativeDecrementReward(("kd", "hidden", "attn"))

