"""A policy for rewards that decay with an arm's own plays (`raw_ucb_policy`).

OPTIMA's reward is a decrement of the distillation losses, and it shrinks for
whichever arm is played most: a *rested rotting* bandit (Levine et al. 2017,
"Rotting bandits"). A policy that averages an arm's whole history believes a
much-played arm is better than it now is; RAW-UCB looks at every recent window
of each arm's own rewards and trusts the most pessimistic one.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from optima.errors import ConfigError
from optima.plugins.policies.base import AUTO, F64, I64, TINY_VARIANCE, SeededPolicy, argmax, check_number, \
    check_scale, floats, vec


class SuccessiveDifferences:
    """The noise variance of rewards whose means drift, from the squared
    differences of each arm's successive rewards (von Neumann's mean square
    successive difference: `E (r_n - r_{n-1})^2 = 2 sigma^2` when the mean moves
    little between two plays), pooled over arms. A slow trend (rotting) or a
    rare jump barely enters it, where a plain variance would count the trend as
    noise. Python floats, updated in play order, so a resumed copy is exact."""

    def __init__(self, num_arms: int):
        self.last: list[float | None] = [None] * num_arms
        self.sum_sq, self.pairs = 0.0, 0
        self.total, self.total_sq, self.n = 0.0, 0.0, 0  # all rewards: the fallback before any pair

    def add(self, arm: int, reward: float) -> None:
        if self.last[arm] is not None:
            self.sum_sq += (reward - self.last[arm]) ** 2
            self.pairs += 1
        self.last[arm] = reward
        self.total += reward
        self.total_sq += reward * reward
        self.n += 1

    def variance(self) -> float:
        """`sum (r_n - r_{n-1})^2 / (2 pairs)`; before any arm was played twice,
        the variance of all rewards (0 with fewer than two)."""
        if self.pairs:
            return max(self.sum_sq / (2.0 * self.pairs), TINY_VARIANCE)
        if self.n > 1:
            mean = self.total / self.n
            return max(self.total_sq / self.n - mean * mean, TINY_VARIANCE)
        return 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sd_last": vec([math.nan if v is None else v for v in self.last]),
                "sd_sums": vec([self.sum_sq, self.total, self.total_sq]),
                "sd_counts": torch.tensor([self.pairs, self.n], dtype=I64)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last = [None if math.isnan(v) else v for v in floats(state, "sd_last", len(self.last))]
        self.sum_sq, self.total, self.total_sq = floats(state, "sd_sums", 3)
        self.pairs, self.n = (int(v) for v in torch.as_tensor(state["sd_counts"]).reshape(2))


class ArmHistories:
    """Every arm's rewards in play order with their running sums (`prefix[k][n]`:
    the sum of arm `k`'s first `n` rewards, added one by one in float64, so a copy
    rebuilt from the rewards holds the same bits)."""

    def __init__(self, num_arms: int):
        self.rewards: list[list[float]] = [[] for _ in range(num_arms)]
        self.prefix: list[list[float]] = [[0.0] for _ in range(num_arms)]

    def add(self, arm: int, reward: float) -> None:
        self.rewards[arm].append(reward)
        self.prefix[arm].append(self.prefix[arm][-1] + reward)

    def recent_means(self, arm: int) -> np.ndarray:
        """Means of the last `h` rewards of `arm`, for `h = 1 .. plays`."""
        prefix = np.asarray(self.prefix[arm])
        n = len(prefix) - 1
        h = np.arange(1, n + 1)
        return (prefix[n] - prefix[n - h]) / h

    def reset(self, arm: int) -> None:
        self.rewards[arm], self.prefix[arm] = [], [0.0]

    def state_dict(self, prefix: str = "history") -> dict[str, torch.Tensor]:
        lengths = [len(r) for r in self.rewards]
        return {f"{prefix}_lengths": torch.tensor(lengths, dtype=I64),
                f"{prefix}_rewards": vec([x for r in self.rewards for x in r])}

    def load_state_dict(self, state: Mapping[str, Any], prefix: str = "history") -> None:
        lengths = [int(v) for v in torch.as_tensor(state[f"{prefix}_lengths"]).reshape(-1)]
        if len(lengths) != len(self.rewards) or min(lengths, default=0) < 0:
            raise ConfigError(f"policy state: {prefix}_lengths does not fit {len(self.rewards)} arms")
        flat = floats(state, f"{prefix}_rewards", sum(lengths))
        self.rewards = [[] for _ in lengths]
        self.prefix = [[0.0] for _ in lengths]
        start = 0
        for arm, n in enumerate(lengths):
            for reward in flat[start:start + n]:
                self.add(arm, reward)
            start += n


class RawUCBPolicy(SeededPolicy):
    """RAW-UCB (Seznec, Menard, Lazaric & Valko 2020, "A single algorithm for both
    restless and rested rotting bandits", AISTATS): for rewards that decay, with
    an arm's own plays or with time.

    Each arm is played once (lowest index first); then round `t` plays
    `argmax_k min_{h = 1 .. N_k} ( mean of arm k's last h rewards
    + scale * sqrt(2 alpha log(t) / h) )`, `N_k` the arm's plays and `t` the
    rewards seen so far (confidence `delta_t = t^-alpha`). The minimum over
    windows is the most pessimistic recent average an arm's noise allows: an arm
    whose last rewards fell is judged by them, a steady arm by its long average.
    Followed: the paper's Algorithm 1 (RAW-UCB) and Seznec's reference
    implementation in SMPyBandits (`Policies/RAWUCB.py`, class `RAWUCB`: every
    window `h`, `delta_t = 1 / t^alpha`, `alpha = 1` by default, unplayed arms
    first). The exact form is used (all windows, O(N_k) per arm and round with
    running sums), not the paper's geometric grid of windows (EFF-RAW-UCB).

    `scale` is the rewards' sub-Gaussian noise scale `sigma`: a number, or
    `'auto'` (the default): the noise estimated from each arm's successive
    rewards (`SuccessiveDifferences`; a trend such as rotting barely enters it),
    so that rewards of 0.001 or of 100 give the same plays. `alpha` (> 0) sets
    the confidence; the paper's analysis takes larger values, its experiments
    and the reference code 1. Nothing is drawn: the generator is kept only for
    the shared interface.

    `diagnostics()`: per arm "index" (inf before the arm's first play), "window"
    (the `h` that gives the minimum; 0 before the first play) and "recent_mean"
    (the mean over that window; 0 before the first play), "count", "entropy",
    and the "scale" in use.
    """

    def __init__(self, num_arms: int, alpha: float = 1.0, scale: float | str = AUTO, entropy_window: int = 20,
                 seed: int = 0):
        super().__init__(num_arms, seed=seed, entropy_window=entropy_window)
        self.alpha = check_number("alpha", alpha, 0.0)
        self.scale = check_scale("scale", scale)
        self.history = ArmHistories(self.num_arms)
        self.noise = SuccessiveDifferences(self.num_arms)

    def _scale(self) -> float:
        return math.sqrt(self.noise.variance()) if self.scale == AUTO else self.scale

    def _windows(self) -> list[tuple[float, int, float]]:
        """Per arm (index, window h of the minimum, mean over it)."""
        t = max(self.n_updates, 1)
        width = self._scale() * math.sqrt(2.0 * self.alpha * math.log(t))
        out = []
        for arm in range(self.num_arms):
            n = len(self.history.rewards[arm])
            if n == 0:
                out.append((math.inf, 0, 0.0))
                continue
            means = self.history.recent_means(arm)
            bounds = means + width / np.sqrt(np.arange(1, n + 1))
            h = int(np.argmin(bounds))  # the shortest of equal minima
            out.append((float(bounds[h]), h + 1, float(means[h])))
        return out

    def indices(self) -> list[float]:
        return [index for index, _, _ in self._windows()]

    def select(self) -> int:
        return argmax(self.indices())  # an unplayed arm (inf) first, lowest index first

    def update(self, arm: int, reward: float) -> None:
        arm, reward = self._check_update(arm, reward)
        self.history.add(arm, reward)
        self.noise.add(arm, reward)
        self._record_play(arm)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        windows = self._windows()
        out = {"index": vec([w[0] for w in windows]), "window": vec([float(w[1]) for w in windows]),
               "recent_mean": vec([w[2] for w in windows])}
        out.update(super().diagnostics())
        out["scale"] = torch.tensor(self._scale(), dtype=F64)
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        auto = self.scale == AUTO
        state.update({"alpha": torch.tensor(self.alpha, dtype=F64),
                      "scale": torch.tensor(0.0 if auto else self.scale, dtype=F64),
                      "auto": torch.tensor(int(auto), dtype=I64)})
        state.update(self.history.state_dict())
        state.update(self.noise.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.alpha = float(state["alpha"])
        self.scale = AUTO if int(state["auto"]) else float(state["scale"])
        self.history.load_state_dict(state)
        if [len(r) for r in self.history.rewards] != self._counts:
            raise ConfigError("RawUCBPolicy state: its reward histories do not match its play counts")
        self.noise.load_state_dict(state)

    def __repr__(self) -> str:
        return f"RawUCBPolicy(num_arms={self.num_arms}, alpha={self.alpha}, scale={self.scale!r}, seed={self.seed})"
