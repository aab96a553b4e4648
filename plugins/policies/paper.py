"""Bandit policies over the arms of an `optima.arms.ArmSpace`.

Every policy draws only from its own `torch.Generator` seeded by `seed`, so the
same seed and the same rewards give the same arms in every process. Their
`state_dict()` holds tensors only (hyper-parameters, counters and the
generator's state included), so it can be saved with `safetensors` or loaded
with `torch.load(weights_only=True)`; `load_state_dict` restores everything and
the policy continues exactly as the saved one would have.

All policies count the plays of each arm (an arm is played when it is passed to
`update`) and report, in `diagnostics()`, "count" (per arm) and "entropy" (nats,
0-dim) of the empirical distribution of the last `entropy_window` played arms.

`update` rejects an arm out of range and a non-finite reward with `ValueError`
(a programming error: the reward raises on non-finite losses first).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from optima.errors import ConfigError
from optima.interfaces import Policy

_F = torch.float64
_I = torch.int64


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def _entropy(recent: torch.Tensor, num_arms: int) -> torch.Tensor:
    """Entropy in nats of the empirical distribution of `recent` (0 when empty)."""
    if recent.numel() == 0:
        return torch.zeros((), dtype=_F)
    p = torch.bincount(recent, minlength=num_arms).to(_F) / recent.numel()
    p = p[p > 0]
    return -(p * p.log()).sum()


class _SeededPolicy(Policy):
    """Shared bookkeeping: generator, per-arm play counts, recent plays."""

    def __init__(self, num_arms: int, seed: int = 0, entropy_window: int = 20):
        self.num_arms = _check_int("num_arms", num_arms, 1)
        self.seed = _check_seed(seed)
        self.entropy_window = _check_int("entropy_window", entropy_window, 1)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self._counts = torch.zeros(self.num_arms, dtype=_I)
        self._recent = torch.zeros(0, dtype=_I)

    # -- helpers ---------------------------------------------------------------
    def _check_update(self, arm: int, reward: float) -> tuple[int, float]:
        if isinstance(arm, bool) or not isinstance(arm, int):
            try:
                arm = int(arm)  # numpy / 0-dim tensor ints
            except (TypeError, ValueError):
                raise ValueError(f"arm must be an integer, got {arm!r}") from None
        if not 0 <= arm < self.num_arms:
            raise ValueError(f"arm {arm} out of range 0..{self.num_arms - 1}")
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(f"non-finite reward {reward} for arm {arm}")
        return arm, reward

    def _record_play(self, arm: int) -> None:
        self._counts[arm] += 1
        recent = torch.cat([self._recent, torch.tensor([arm], dtype=_I)])
        self._recent = recent[-self.entropy_window:]

    @property
    def counts(self) -> torch.Tensor:
        """Plays of each arm so far (a copy)."""
        return self._counts.clone()

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return {"count": self._counts.to(_F),
                "entropy": _entropy(self._recent, self.num_arms)}

    # -- state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_arms": torch.tensor(self.num_arms, dtype=_I),
            "seed": torch.tensor(self.seed, dtype=_I),
            "entropy_window": torch.tensor(self.entropy_window, dtype=_I),
            "generator": self.generator.get_state().clone(),
            "counts": self._counts.clone(),
            "recent": self._recent.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ConfigError(f"{type(self).__name__} state lacks {missing}; "
                              "was it saved by another policy?")
        num_arms = int(state["num_arms"])
        if num_arms != self.num_arms:
            raise ConfigError(f"{type(self).__name__} state has {num_arms} arms, "
                              f"this policy has {self.num_arms}")
        self.seed = int(state["seed"])
        self.entropy_window = int(state["entropy_window"])
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8).clone().cpu())
        self._counts = torch.as_tensor(state["counts"], dtype=_I).clone().reshape(self.num_arms)
        self._recent = torch.as_tensor(state["recent"], dtype=_I).clone().reshape(-1)


class ThompsonPolicy(_SeededPolicy):
    """OPTIMA's non-stationary Gaussian Thompson sampling (`docs/method.md`, "Policy").

    Arm `k` has the belief `N(mu_k, c / (n_k + 1))`, `c = variance_scale`.

    - Warm-up (the first `warmup_rounds` updates, default `2 * num_arms`, at least
      `num_arms`): arms are played in `warmup_order`, drawn at construction from
      the generator: a random permutation of all arms (every arm once), then
      uniformly random arms up to `warmup_rounds`. `select()` returns
      `warmup_order[n_updates]`, so two selects without an update return the same
      arm (the engine skips the update of the first round, which has no
      previous round to compare with). At the end of warm-up, `mu_k` is the mean
      of arm `k`'s warm-up rewards and `n_k` their number (0 and 0 for an arm
      with none).
    - Then each `select()` draws `theta_k = mu_k + sqrt(c / (n_k + 1)) * z_k`,
      `z = torch.randn(num_arms, generator, float64)` (one call), and plays
      `argmax_k theta_k`. `update(k, r)`: `mu_k <- gamma * mu_k + (1 - gamma) * r`,
      `n_k <- n_k + 1`, for the played arm only.

    `gamma` in (0, 1] sets how fast old rewards are forgotten: the halflife is
    `log(0.5) / log(gamma)` rounds (`halflife`; infinite for gamma = 1, which
    keeps mu at its warm-up mean). Note that with gamma < 1, `n_k` keeps growing
    while `mu_k` forgets: the sd shrinks as in the paper.

    Scale: rewards are relative loss decrements, often 0.001 to 0.1, while the
    paper's sd `1/sqrt(n+1)` is 0.3 after ten plays, so with `c = 1` (the paper)
    the draws are dominated by noise for most of a run. `variance_scale` shrinks
    the variance to `c/(n+1)`; `diagnostics()` reports "mean" (mu), "sd",
    "count" (all plays, warm-up included) and "entropy" of the recent plays to
    see whether the policy has settled.

    A non-finite reward raises `ValueError`.
    """

    def __init__(self, num_arms: int, gamma: float = 0.9, warmup_rounds: int | None = None,
                 variance_scale: float = 1.0, entropy_window: int = 20, seed: int = 0):
        super().__init__(num_arms, seed=seed, entropy_window=entropy_window)
        gamma = float(gamma)
        if not (0.0 < gamma <= 1.0):
            raise ConfigError(f"gamma must be in (0, 1], got {gamma}")
        variance_scale = float(variance_scale)
        if not (variance_scale > 0.0 and math.isfinite(variance_scale)):
            raise ConfigError(f"variance_scale must be a finite number > 0, got {variance_scale}")
        if warmup_rounds is None:
            warmup_rounds = 2 * self.num_arms
        if isinstance(warmup_rounds, bool) or not isinstance(warmup_rounds, int) \
                or warmup_rounds < self.num_arms:
            raise ConfigError(f"warmup_rounds must be an integer >= num_arms ({self.num_arms}), "
                              f"so that every arm is played once, got {warmup_rounds!r}")
        self.gamma = gamma
        self.variance_scale = variance_scale
        self.warmup_rounds = int(warmup_rounds)
        perm = torch.randperm(self.num_arms, generator=self.generator)
        fill = torch.randint(self.num_arms, (self.warmup_rounds - self.num_arms,),
                             generator=self.generator)
        self._warmup_order = torch.cat([perm, fill]).to(_I)
        self._n_updates = 0
        # During warm-up: sum and count of each arm's rewards; after: mu and n.
        self._mu = torch.zeros(self.num_arms, dtype=_F)
        self._n = torch.zeros(self.num_arms, dtype=_F)
        self._warm_sum = torch.zeros(self.num_arms, dtype=_F)

    @property
    def in_warmup(self) -> bool:
        return self._n_updates < self.warmup_rounds

    @property
    def warmup_order(self) -> tuple[int, ...]:
        return tuple(int(a) for a in self._warmup_order)

    @property
    def n_updates(self) -> int:
        return self._n_updates

    @property
    def halflife(self) -> float:
        """`log(0.5) / log(gamma)` rounds; inf for gamma = 1."""
        return math.inf if self.gamma == 1.0 else math.log(0.5) / math.log(self.gamma)

    def _sd(self) -> torch.Tensor:
        return torch.sqrt(self.variance_scale / (self._n + 1.0))

    def _mean(self) -> torch.Tensor:
        if self.in_warmup:  # running warm-up mean; 0 for arms not played yet
            return self._mean_of_warmup()
        return self._mu.clone()

    def select(self) -> int:
        if self.in_warmup:
            return int(self._warmup_order[self._n_updates])
        z = torch.randn(self.num_arms, generator=self.generator, dtype=_F)
        theta = self._mu + self._sd() * z
        return int(torch.argmax(theta))

    def update(self, arm: int, reward: float) -> None:
        arm, reward = self._check_update(arm, reward)
        if self.in_warmup:
            self._warm_sum[arm] += reward
            self._n[arm] += 1.0
            self._n_updates += 1
            if not self.in_warmup:  # warm-up just ended: the prior
                self._mu = self._mean_of_warmup()
        else:
            self._mu[arm] = self.gamma * self._mu[arm] + (1.0 - self.gamma) * reward
            self._n[arm] += 1.0
            self._n_updates += 1
        self._record_play(arm)

    def _mean_of_warmup(self) -> torch.Tensor:
        return torch.where(self._n > 0, self._warm_sum / self._n.clamp(min=1.0),
                           torch.zeros_like(self._n))

    def diagnostics(self) -> dict[str, torch.Tensor]:
        out = {"mean": self._mean(), "sd": self._sd()}
        out.update(super().diagnostics())
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "gamma": torch.tensor(self.gamma, dtype=_F),
            "variance_scale": torch.tensor(self.variance_scale, dtype=_F),
            "warmup_rounds": torch.tensor(self.warmup_rounds, dtype=_I),
            "warmup_order": self._warmup_order.clone(),
            "n_updates": torch.tensor(self._n_updates, dtype=_I),
            "mu": self._mu.clone(),
            "n": self._n.clone(),
            "warm_sum": self._warm_sum.clone(),
        })
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.gamma = float(state["gamma"])
        self.variance_scale = float(state["variance_scale"])
        self.warmup_rounds = int(state["warmup_rounds"])
        self._warmup_order = torch.as_tensor(state["warmup_order"], dtype=_I).clone().reshape(-1)
        if self._warmup_order.numel() != self.warmup_rounds:
            raise ConfigError("ThompsonPolicy state: warmup_order does not have warmup_rounds entries")
        self._n_updates = int(state["n_updates"])
        self._mu = torch.as_tensor(state["mu"], dtype=_F).clone().reshape(self.num_arms)
        self._n = torch.as_tensor(state["n"], dtype=_F).clone().reshape(self.num_arms)
        self._warm_sum = torch.as_tensor(state["warm_sum"], dtype=_F).clone().reshape(self.num_arms)

    def __repr__(self) -> str:
        return (f"ThompsonPolicy(num_arms={self.num_arms}, gamma={self.gamma}, "
                f"warmup_rounds={self.warmup_rounds}, variance_scale={self.variance_scale}, "
                f"entropy_window={self.entropy_window}, seed={self.seed})")


class FixedPolicy(_SeededPolicy):
    """Always the same arm: the paper's fixed-arm baseline.

    `arm` may be negative, Python-style: -1 (the default) is the last arm, which
    in the default `ArmSpace` ordering (by subset size) is the arm of all modules.
    """

    def __init__(self, num_arms: int, arm: int = -1, seed: int = 0, entropy_window: int = 20):
        super().__init__(num_arms, seed=seed, entropy_window=entropy_window)
        if isinstance(arm, bool) or not isinstance(arm, int) or not -self.num_arms <= arm < self.num_arms:
            raise ConfigError(f"arm must be an integer in [{-self.num_arms}, {self.num_arms - 1}], "
                              f"got {arm!r}")
        self.arm = arm % self.num_arms

    def select(self) -> int:
        return self.arm

    def update(self, arm: int, reward: float) -> None:
        arm, _ = self._check_update(arm, reward)
        self._record_play(arm)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["arm"] = torch.tensor(self.arm, dtype=_I)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.arm = int(state["arm"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_arms={self.num_arms}, arm={self.arm}, seed={self.seed})"


class LayerwisePolicy(FixedPolicy):
    """The paper's layerwise baseline: every module every round, i.e. always the
    last arm (all modules in the default `ArmSpace` ordering); `FixedPolicy(arm=-1)`."""

    def __init__(self, num_arms: int, seed: int = 0, entropy_window: int = 20):
        super().__init__(num_arms, arm=-1, seed=seed, entropy_window=entropy_window)


class RandomPolicy(_SeededPolicy):
    """The paper's random-arm baseline: a uniformly random arm each round
    (`torch.randint` from the policy's generator). Two selects without an update
    draw two arms."""

    def select(self) -> int:
        return int(torch.randint(self.num_arms, (1,), generator=self.generator))

    def update(self, arm: int, reward: float) -> None:
        arm, _ = self._check_update(arm, reward)
        self._record_play(arm)

    def __repr__(self) -> str:
        return f"RandomPolicy(num_arms={self.num_arms}, seed={self.seed})"
