"""Epsilon-greedy with forgetting means (`eps_greedy_policy`): the simplest policy
that tracks a change, a baseline for the others."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from optima.plugins.policies.base import F64, WarmupPolicy, argmax, check_number, floats, vec


class EpsilonGreedyPolicy(WarmupPolicy):
    """Epsilon-greedy: a uniformly random arm with probability `epsilon`, else the
    arm with the best exponentially weighted mean.

    - `update(k, r)`: `mean_k <- mean_k + step_size * (r - mean_k)` (the first
      reward of an arm sets its mean); halflife `log(0.5) / log(1 - step_size)`
      plays of that arm. An idle arm's mean stays as it was: only `epsilon`
      brings it back.
    - `select()`: one `torch.rand` from the generator; below `epsilon`, one
      `torch.randint` picks the arm; else the first of the best means.

    Warm-up: `warmup_rounds` (default `num_arms`) rounds in `warmup` order.
    Nothing depends on the reward's scale. (`examples/optima-audio` ships an
    epsilon-greedy with sample means as a third-party example plugin.)
    """

    def __init__(self, num_arms: int, epsilon: float = 0.1, step_size: float = 0.1,
                 warmup_rounds: int | None = None, warmup: str = "round_robin", entropy_window: int = 20,
                 seed: int = 0):
        super().__init__(num_arms, seed=seed, entropy_window=entropy_window, warmup_rounds=warmup_rounds,
                         warmup=warmup)
        self.epsilon = check_number("epsilon", epsilon, 0.0, 1.0, strict_low=False)
        self.step_size = check_number("step_size", step_size, 0.0, 1.0)
        self._means = [0.0] * self.num_arms

    def _choose(self) -> int:
        if float(torch.rand((), generator=self.generator, dtype=F64)) < self.epsilon:
            return int(torch.randint(self.num_arms, (), generator=self.generator))
        return argmax(self._means)

    def _learn(self, arm: int, reward: float) -> None:
        if self._counts[arm] == 0:
            self._means[arm] = reward
        else:
            self._means[arm] += self.step_size * (reward - self._means[arm])

    def diagnostics(self) -> dict[str, torch.Tensor]:
        out = {"mean": vec(self._means)}
        out.update(super().diagnostics())
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({"epsilon": torch.tensor(self.epsilon, dtype=F64),
                      "step_size": torch.tensor(self.step_size, dtype=F64), "means": vec(self._means)})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.epsilon, self.step_size = float(state["epsilon"]), float(state["step_size"])
        self._means = floats(state, "means", self.num_arms)

    def __repr__(self) -> str:
        return (f"EpsilonGreedyPolicy(num_arms={self.num_arms}, epsilon={self.epsilon}, "
                f"step_size={self.step_size}, seed={self.seed})")
