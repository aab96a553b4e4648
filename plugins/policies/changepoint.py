"""A policy that detects changes instead of forgetting on a schedule (`glr_ucb_policy`).

Windows and discounts forget at a fixed rate, right for one horizon and one rate
of change: too fast and a stationary stretch is re-explored over and over, too
slow and a change is noticed late. GLR-UCB keeps everything since an arm's last
change and restarts only when a generalized likelihood ratio test says
its mean moved; it needs neither the horizon nor the number of changes.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from optima.errors import ConfigError
from optima.plugins.policies.base import AUTO, F64, I64, SeededPolicy, argmax, check_horizon, check_number, \
    check_scale, floats, vec
from optima.plugins.policies.rotting import ArmHistories, SuccessiveDifferences


def glr_statistic(prefix: np.ndarray, variance: float) -> float:
    """`max_s s (n - s) / n * (mean_{1..s} - mean_{s+1..n})^2 / (2 variance)`: the
    Gaussian generalized likelihood ratio of "one change after sample s" against
    "no change" over `n` samples with running sums `prefix` (`prefix[0] = 0`)."""
    n = len(prefix) - 1
    if n < 2 or variance <= 0.0:
        return 0.0
    s = np.arange(1, n)
    before = prefix[1:n] / s
    after = (prefix[n] - prefix[1:n]) / (n - s)
    return float(np.max(s * (n - s) / n * (before - after) ** 2) / (2.0 * variance))


def glr_threshold(n: int, delta: float) -> float:
    """`beta(n, delta) = log(3 n^(3/2) / delta)` (Besson et al.'s practical threshold)."""
    return math.log(3.0 * n ** 1.5 / delta)


#: What a detected change restarts: the arm that changed, or every arm.
RESTARTS = ("local", "global")


class GlrUCBPolicy(SeededPolicy):
    """GLR-UCB (Besson, Kaufmann, Maillard & Seznec 2022,
    "Efficient change-point detection for tackling piecewise-stationary bandits",
    JMLR, Algorithm 1 with the sub-Gaussian GLR test instead of the Bernoulli
    one, so that it needs no reward range).

    - Each arm keeps its rewards since its last restart (`n_k` of them, mean
      `xbar_k`). An arm with none is played first (lowest index first).
    - Forced exploration: each round adds `alpha_t = exploration *
      sqrt(K log T / T)` to a credit, `T` the horizon when the run passes it, else
      the current round (anytime); when the credit reaches 1 the next arm in
      cyclic order is played (the paper's `t mod floor(K / alpha)` schedule,
      generalised to a varying alpha), so a change on an idle arm is seen.
      `exploration` 0.1 is the scale factor `alpha_0` of Besson's reference code
      (SMPyBandits, `Policies/GLR_UCB.py`: "multiplying it by 0.1 ... helps, a lot").
    - Otherwise: `argmax_k xbar_k + scale * sqrt(2 log(t) / n_k)`, `t` the rewards seen.
    - After each reward, the played arm's samples are tested for one change:
      `glr_statistic >= log(3 n^(3/2) / delta)` restarts every arm
      (`restart = 'global'`, the default: their samples are dropped, so all
      are explored again) or only that arm (`'local'`). `delta` unbound: `1 / sqrt(T)` (the paper's tuning, with the
      number of changes unknown), `T` as above.

    `scale` is the rewards' noise sd: a number, or `'auto'` (the default): the
    noise estimated from each arm's successive rewards (a change adds a single
    large difference to it), so that rewards of 0.001 or of 100 give the same
    plays. `diagnostics()`: per arm "mean" (since its restart; 0 when empty),
    "index" (inf when empty), "samples" (since its restart), "restarts",
    "count", "entropy", and the "scale" in use.
    """

    def __init__(self, num_arms: int, exploration: float = 0.1, delta: float | None = None,
                 scale: float | str = AUTO, restart: str = "global", entropy_window: int = 20, seed: int = 0,
                 horizon: int | None = None):
        super().__init__(num_arms, seed=seed, entropy_window=entropy_window)
        if restart not in RESTARTS:
            raise ConfigError(f"restart = {restart!r} must be one of {', '.join(map(repr, RESTARTS))}")
        self.restart = restart
        self.exploration = check_number("exploration", exploration, 0.0, strict_low=False)
        self.delta = None if delta is None else check_number("delta", delta, 0.0, 1.0, strict_high=True)
        self.scale = check_scale("scale", scale)
        self.horizon = check_horizon(horizon)
        self.segments = ArmHistories(self.num_arms)
        self.noise = SuccessiveDifferences(self.num_arms)
        self.restarts = [0] * self.num_arms
        self.credit = 0.0
        self.next_explore = 0

    def _time(self) -> int:
        """`T` of the forced exploration and the confidence: the horizon, or the current round."""
        return self.horizon if self.horizon is not None else self.n_updates + 1

    def _alpha(self) -> float:
        t = max(self._time(), 2)
        return min(1.0, self.exploration * math.sqrt(self.num_arms * math.log(t) / t))

    def _delta(self) -> float:
        return self.delta if self.delta is not None else 1.0 / math.sqrt(max(self._time(), 2))

    def _scale(self) -> float:
        return math.sqrt(self.noise.variance()) if self.scale == AUTO else self.scale

    def indices(self) -> list[float]:
        t = max(self.n_updates, 1)
        width = self._scale() * math.sqrt(2.0 * math.log(t)) if t > 1 else 0.0
        out = []
        for arm in range(self.num_arms):
            n = len(self.segments.rewards[arm])
            out.append(math.inf if n == 0 else self.segments.prefix[arm][-1] / n + width / math.sqrt(n))
        return out

    def select(self) -> int:
        indices = self.indices()
        if math.inf in indices:
            return indices.index(math.inf)
        if self.credit >= 1.0:
            return self.next_explore
        return argmax(indices)

    def update(self, arm: int, reward: float) -> None:
        arm, reward = self._check_update(arm, reward)
        empty = any(not r for r in self.segments.rewards)
        if self.credit >= 1.0 and not empty:  # this round was a forced exploration
            self.credit -= 1.0
            self.next_explore = (self.next_explore + 1) % self.num_arms
        self.segments.add(arm, reward)
        self.noise.add(arm, reward)
        self._record_play(arm)
        variance = self.noise.variance() if self.scale == AUTO else self.scale ** 2
        samples = len(self.segments.rewards[arm])
        if samples >= 2 and glr_statistic(np.asarray(self.segments.prefix[arm]), variance) >= \
                glr_threshold(samples, self._delta()):
            for changed in (range(self.num_arms) if self.restart == "global" else [arm]):
                self.segments.reset(changed)
            self.restarts[arm] += 1
        self.credit += self._alpha()

    def diagnostics(self) -> dict[str, torch.Tensor]:
        samples = [len(r) for r in self.segments.rewards]
        means = [p[-1] / n if n else 0.0 for p, n in zip(self.segments.prefix, samples)]
        out = {"mean": vec(means), "index": vec(self.indices()), "samples": vec([float(n) for n in samples]),
               "restarts": vec([float(r) for r in self.restarts])}
        out.update(super().diagnostics())
        out["scale"] = torch.tensor(self._scale(), dtype=F64)
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        auto = self.scale == AUTO
        state.update({"exploration": torch.tensor(self.exploration, dtype=F64),
                      "delta": torch.tensor(0.0 if self.delta is None else self.delta, dtype=F64),
                      "scale": torch.tensor(0.0 if auto else self.scale, dtype=F64),
                      "auto": torch.tensor(int(auto), dtype=I64),
                      "horizon": torch.tensor(0 if self.horizon is None else self.horizon, dtype=I64),
                      "restarts": torch.tensor(self.restarts, dtype=I64),
                      "restart": torch.tensor(RESTARTS.index(self.restart), dtype=I64),
                      "credit": torch.tensor(self.credit, dtype=F64),
                      "next_explore": torch.tensor(self.next_explore, dtype=I64)})
        state.update(self.segments.state_dict("segment"))
        state.update(self.noise.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.exploration = float(state["exploration"])
        self.delta = float(state["delta"]) or None
        self.scale = AUTO if int(state["auto"]) else float(state["scale"])
        self.horizon = int(state["horizon"]) or None
        self.restarts = [int(r) for r in torch.as_tensor(state["restarts"]).reshape(-1)]
        self.restart = RESTARTS[int(state["restart"])]
        if len(self.restarts) != self.num_arms:
            raise ConfigError("GlrUCBPolicy state: restarts does not fit its arms")
        self.credit = floats(state, "credit", 1)[0]
        self.next_explore = int(state["next_explore"])
        self.segments.load_state_dict(state, "segment")
        self.noise.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"GlrUCBPolicy(num_arms={self.num_arms}, exploration={self.exploration}, delta={self.delta}, "
                f"scale={self.scale!r}, horizon={self.horizon}, seed={self.seed})")
