"""Exp3.S (Auer, Cesa-Bianchi, Freund & Schapire 2002): exponential weights built for
an adversary, with a share of the weight spread over all arms each round so
that it can track the best arm when it changes (`exp3_policy`; `share = 0` is
plain Exp3)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from optima.plugins.policies.base import AUTO, F64, I64, WarmupPolicy, check_number, check_scale, floats, vec

#: Per-round decay of the running maximum that scales rewards with `reward_scale = 'auto'`
#: (halflife about 69 rounds): a reward the size of the current ones maps near 1.
MAX_DECAY = 0.99


class Exp3Policy(WarmupPolicy):
    """Exp3.S: exponential weights, `exploration` mixed in uniformly, a `share` of
    the total weight spread over all arms each round.

    - Play `k ~ p`, `p_k = (1 - exploration) * w_k / sum(w) + exploration / K`
      (one `torch.rand` from the generator, inverse CDF).
    - `update(k, r)`: `x = min(r / scale, 1)`; `w_k *= exp(exploration * x / (p_k K))`;
      then every `w_j += e * share / K * sum(w)` (Auer et al. 2002, Exp3.S, with
      the pre-update sum); weights are renormalised to sum 1 (the rule is scale-free).
    - `reward_scale`: rewards must be in [0, 1] and should use that range (OPTIMA's
      are 0.001..0.1): a number, or `'auto'` (the default): a running maximum of
      the rewards that decays by 0.99 each round, so the current rewards map
      near [0, 1] as they shrink during training.

    Warm-up: `warmup_rounds` (default `num_arms`) rounds in `warmup` order, with
    the update above (a warm-up arm is played with certainty, but its weight
    update uses `p_k` as if drawn).
    """

    def __init__(self, num_arms: int, exploration: float = 0.1, share: float = 0.01,
                 reward_scale: float | str = AUTO, warmup_rounds: int | None = None, warmup: str = "round_robin",
                 entropy_window: int = 20, seed: int = 0):
        super().__init__(num_arms, seed=seed, entropy_window=entropy_window, warmup_rounds=warmup_rounds,
                         warmup=warmup)
        self.exploration = check_number("exploration", exploration, 0.0, 1.0)
        self.share = check_number("share", share, 0.0, 1.0, strict_low=False)
        self.reward_scale = check_scale("reward_scale", reward_scale)
        self._weights = [1.0 / self.num_arms] * self.num_arms
        self._max = 0.0

    def probabilities(self) -> list[float]:
        total, k, eta = sum(self._weights), self.num_arms, self.exploration
        return [(1.0 - eta) * w / total + eta / k for w in self._weights]

    def _choose(self) -> int:
        u = float(torch.rand((), generator=self.generator, dtype=F64))
        cumulative = 0.0
        p = self.probabilities()
        for arm, pk in enumerate(p):
            cumulative += pk
            if u < cumulative:
                return arm
        return self.num_arms - 1  # u within rounding of 1

    def _scale(self) -> float:
        return self._max if self.reward_scale == AUTO else self.reward_scale

    def _learn(self, arm: int, reward: float) -> None:
        if self.reward_scale == AUTO:
            self._max = max(abs(reward), MAX_DECAY * self._max)
        scale = self._scale()
        x = min(max(reward, 0.0) / scale, 1.0) if scale > 0 else 0.0
        p = self.probabilities()
        k, total = self.num_arms, sum(self._weights)
        weights = list(self._weights)
        weights[arm] *= math.exp(self.exploration * x / (p[arm] * k))
        spread = math.e * self.share / k * total
        weights = [w + spread for w in weights]
        norm = sum(weights)
        self._weights = [w / norm for w in weights]

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """"probability" of each arm at the next draw, "count", "entropy", "reward_scale"."""
        out = {"probability": vec(self.probabilities())}
        out.update(super().diagnostics())
        out["reward_scale"] = torch.tensor(self._scale(), dtype=F64)
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        auto = self.reward_scale == AUTO
        state.update({"exploration": torch.tensor(self.exploration, dtype=F64),
                      "share": torch.tensor(self.share, dtype=F64),
                      "reward_scale": torch.tensor(self._max if auto else self.reward_scale, dtype=F64),
                      "auto": torch.tensor(int(auto), dtype=I64), "weights": vec(self._weights)})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.exploration, self.share = float(state["exploration"]), float(state["share"])
        auto = bool(int(state["auto"]))
        self.reward_scale = AUTO if auto else float(state["reward_scale"])
        self._max = float(state["reward_scale"]) if auto else 0.0
        self._weights = floats(state, "weights", self.num_arms)

    def __repr__(self) -> str:
        return (f"Exp3Policy(num_arms={self.num_arms}, exploration={self.exploration}, share={self.share}, "
                f"reward_scale={self.reward_scale!r}, seed={self.seed})")
