"""An epsilon-greedy bandit: a policy from outside OPTIMA, selected by name in gin
(`distillation.policy = @epsilon_greedy_policy`)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from optima.errors import ConfigError
from optima.interfaces import Policy


class EpsilonGreedyPolicy(Policy):
    """Epsilon-greedy: every arm once, then a random arm with probability `epsilon`, else the best mean.

    - Warm-up: the first `num_arms` updates play a random permutation of the
      arms (drawn at construction), so every arm is tried once. `select()` returns
      the next arm of the permutation until it is updated (the engine does not
      update in the first round, which has no reward).
    - Then `select()` plays a uniformly random arm with probability `epsilon`,
      else the arm with the highest mean reward (lowest index on ties).
    - `update(k, r)`: `mean_k += step * (r - mean_k)`, `step = step_size`, or
      `1 / n_k` (the sample mean) when `step_size` is None. A constant step
      forgets old rewards, which suits OPTIMA's drifting rewards.

    Draws only from its own generator seeded by `seed`; `state_dict()` holds
    tensors only.
    """

    def __init__(self, num_arms: int, seed: int = 0, epsilon: float = 0.1, step_size: float | None = None):
        if isinstance(num_arms, bool) or not isinstance(num_arms, int) or num_arms < 1:
            raise ConfigError(f"num_arms must be an integer >= 1, got {num_arms!r}")
        if not 0.0 <= float(epsilon) <= 1.0:
            raise ConfigError(f"epsilon_greedy_policy.epsilon must be in [0, 1], got {epsilon}")
        if step_size is not None and not 0.0 < float(step_size) <= 1.0:
            raise ConfigError(f"epsilon_greedy_policy.step_size must be in (0, 1] or None, got {step_size}")
        self.num_arms, self.seed = num_arms, int(seed)
        self.epsilon = float(epsilon)
        self.step_size = None if step_size is None else float(step_size)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._order = torch.randperm(num_arms, generator=self.generator)
        self._means = torch.zeros(num_arms, dtype=torch.float64)
        self._counts = torch.zeros(num_arms, dtype=torch.int64)
        self._n_updates = 0

    def select(self) -> int:
        if self._n_updates < self.num_arms:
            return int(self._order[self._n_updates])
        if float(torch.rand((), generator=self.generator, dtype=torch.float64)) < self.epsilon:
            return int(torch.randint(self.num_arms, (1,), generator=self.generator))
        return int(torch.argmax(self._means))

    def update(self, arm: int, reward: float) -> None:
        arm, reward = int(arm), float(reward)
        if not 0 <= arm < self.num_arms:
            raise ValueError(f"arm {arm} out of range 0..{self.num_arms - 1}")
        if not math.isfinite(reward):
            raise ValueError(f"non-finite reward {reward} for arm {arm}")
        self._counts[arm] += 1
        step = self.step_size if self.step_size is not None else 1.0 / float(self._counts[arm])
        self._means[arm] += step * (reward - self._means[arm])
        self._n_updates += 1

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return {"mean": self._means.clone(), "count": self._counts.to(torch.float64)}

    def state_dict(self) -> dict[str, Any]:
        return {"num_arms": torch.tensor(self.num_arms), "seed": torch.tensor(self.seed),
                "epsilon": torch.tensor(self.epsilon, dtype=torch.float64),
                "step_size": torch.tensor(-1.0 if self.step_size is None else self.step_size, dtype=torch.float64),
                "generator": self.generator.get_state().clone(), "order": self._order.clone(),
                "means": self._means.clone(), "counts": self._counts.clone(),
                "n_updates": torch.tensor(self._n_updates)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_arms"]) != self.num_arms:
            raise ConfigError(f"state has {int(state['num_arms'])} arms, this policy has {self.num_arms}")
        self.seed, self.epsilon = int(state["seed"]), float(state["epsilon"])
        step = float(state["step_size"])
        self.step_size = None if step < 0 else step
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8).clone())
        self._order = torch.as_tensor(state["order"]).clone()
        self._means = torch.as_tensor(state["means"], dtype=torch.float64).clone()
        self._counts = torch.as_tensor(state["counts"], dtype=torch.int64).clone()
        self._n_updates = int(state["n_updates"])

    def __repr__(self) -> str:
        return (f"EpsilonGreedyPolicy(num_arms={self.num_arms}, epsilon={self.epsilon}, "
                f"step_size={self.step_size}, seed={self.seed})")
