"""The paper's policy (`optima_policy`: non-stationary Gaussian Thompson sampling,
`docs/method.md`, "Policy") and its baselines (fixed, layerwise, random).

Shared behaviour (seeding, state, counts, entropy, warm-up) is in
`optima.plugins.policies.base`; the policies that go beyond the paper are in
`thompson.py`, `ucb.py`, `exp3.py`, `greedy.py` and `grouped.py` (`docs/policies.md`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from optima.errors import ConfigError
from optima.plugins.policies.base import (ALL_WARMUPS, AUTO, F64, I64, PER_MODULE, TINY_VARIANCE, SeededPolicy,
                                          WarmupPolicy, check_number, check_scale, floats, vec)

class ThompsonPolicy(WarmupPolicy):
    """OPTIMA's non-stationary Gaussian Thompson sampling (`docs/method.md`, "Policy").

    Arm `k` has the belief `N(mu_k, c / (n_k + 1))`, `c = variance_scale`.

    - Warm-up (the first `warmup_rounds` updates, default `2 * num_arms`, at least
      `num_arms`): arms are played in `warmup_order`. `warmup = 'random'` (the
      paper, the default) draws it at construction from the generator: a random
      permutation of all arms (every arm once), then uniformly random arms up to
      `warmup_rounds`; `'round_robin'` plays passes over all arms, each pass in
      a new random order (every arm `warmup_rounds // num_arms` times or once
      more: no arm is left with a single play by chance). `select()` returns `warmup_order[n_updates]`. At
      the end of warm-up, `mu_k` is the mean of arm `k`'s warm-up rewards and
      `n_k` their number (0 and 0 for an arm with none).
    - `warmup = 'per_module'`: a shorter warm-up for many arms, one round per
      module (or layer-group unit): the arm of that module alone (where it is
      an arm, else the smallest arm holding it), the modules in a random order,
      `warmup_rounds` defaulting to (and at least) the number of modules, so
      every module is distilled once (4 rounds, not 30, for 15 arms over 4
      modules). Arms not played start from a prior shared across arms: `mu_k`
      the mean of all warm-up rewards, `n_k = 0` (sd `sqrt(c)`, the widest
      belief); an unplayed arm is then tried when its draw beats the played
      ones. Needs `arm_features` (passed by the engine); without them every
      arm is its own unit (a round-robin pass).
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
    the draws are dominated by noise for most of a run. `variance_scale` is a
    number (`c`), or `'auto'`: `c` is an estimate of the reward noise variance
    `sigma^2`, so that the sd is `sigma / sqrt(n + 1)`, what Gaussian TS with
    known noise would use after `n` plays. At the end of warm-up `c` is the
    pooled within-arm variance of the warm-up rewards (the variance of all of
    them when no arm was played twice); after each later update it moves like
    the means, `c <- gamma * c + (1 - gamma) * (r - mu_k)^2` with `mu_k` before
    the update, so it follows the rewards' shrinking scale during training.
    `diagnostics()` reports "mean" (mu), "sd", "count" (all plays, warm-up
    included), "entropy" of the recent plays and "variance_scale" (c).

    A non-finite reward raises `ValueError`.
    """

    default_warmup = "random"
    warmups = ALL_WARMUPS
    #: Absent from checkpoints written before they existed; loaded with these defaults.
    optional_state = {"warmup": 0, "auto": 0, "warm_sq": None}

    def __init__(self, num_arms: int, gamma: float = 0.9, warmup_rounds: int | None = None,
                 variance_scale: float | str = 1.0, entropy_window: int = 20, seed: int = 0,
                 warmup: str = "random", arm_features: Any = None):
        # which units (modules or layer groups) each arm distils; one unit per arm when not given
        features = torch.eye(num_arms, dtype=F64) if arm_features is None or not isinstance(num_arms, int) \
            else torch.as_tensor(arm_features, dtype=F64, device="cpu")
        # a row of zeros is the empty arm (`distillation.empty_arm`): it covers no unit
        if features.dim() != 2 or features.shape[0] != num_arms or not ((features == 0) | (features == 1)).all():
            raise ConfigError(f"arm_features must be a 0/1 matrix with one row per arm ({num_arms}), got shape "
                              f"{tuple(features.shape)}")
        self._unit_arms = _covering_arms(features)
        super().__init__(num_arms, seed=seed, entropy_window=entropy_window, warmup_rounds=warmup_rounds,
                         warmup=warmup)
        self.gamma = check_number("gamma", gamma, 0.0, 1.0)
        self.variance_scale = check_scale("variance_scale", variance_scale)
        self._c = 1.0 if self.variance_scale == AUTO else self.variance_scale
        # During warm-up: sum, sum of squares and count of each arm's rewards; after: mu and n.
        self._mu = [0.0] * self.num_arms
        self._n = [0.0] * self.num_arms
        self._warm_sum = [0.0] * self.num_arms
        self._warm_sq = [0.0] * self.num_arms

    def default_warmup_rounds(self) -> int:
        return len(self._unit_arms) if self.warmup == PER_MODULE else 2 * self.num_arms

    def min_warmup_rounds(self) -> int:
        return len(self._unit_arms) if self.warmup == PER_MODULE else self.num_arms

    def min_warmup_reason(self) -> str:
        if self.warmup != PER_MODULE:
            return super().min_warmup_reason()
        return f"the number of modules or units ({len(self._unit_arms)}), so that every one is played once"

    def make_warmup_order(self) -> torch.Tensor:
        """'per_module': passes over one arm per unit (the unit alone where that is
        an arm), each pass in a new random order; else `base.warmup_order`."""
        if self.warmup != PER_MODULE:
            return super().make_warmup_order()
        arms = torch.tensor(self._unit_arms, dtype=I64)
        passes = [arms[torch.randperm(len(arms), generator=self.generator, device="cpu")]
                  for _ in range(-(-self.warmup_rounds // len(arms)))]
        return torch.cat(passes)[:self.warmup_rounds]

    @property
    def halflife(self) -> float:
        """`log(0.5) / log(gamma)` rounds; inf for gamma = 1."""
        return math.inf if self.gamma == 1.0 else math.log(0.5) / math.log(self.gamma)

    @property
    def scale(self) -> float:
        """The variance scale `c` in use (the estimate, with 'auto')."""
        return self._c

    def _sd(self) -> list[float]:
        return [math.sqrt(self._c / (n + 1.0)) for n in self._n]

    def _mean(self) -> list[float]:
        if self.in_warmup:  # running warm-up mean; 0 for arms not played yet
            return self._mean_of_warmup()
        return list(self._mu)

    def _choose(self) -> int:
        z = torch.randn(self.num_arms, generator=self.generator, dtype=F64).tolist()
        theta = [m + s * x for m, s, x in zip(self._mu, self._sd(), z)]
        return max(range(self.num_arms), key=theta.__getitem__)  # the first of equal maxima, as torch.argmax

    def _learn(self, arm: int, reward: float) -> None:
        if self.in_warmup:
            self._warm_sum[arm] += reward
            self._warm_sq[arm] += reward * reward
            self._n[arm] += 1.0
            if self._n_updates + 1 == self.warmup_rounds:  # warm-up ends with this update: the prior
                self._mu = self._mean_of_warmup()
                if self.warmup == PER_MODULE:  # arms not played: the mean of all warm-up rewards, n = 0
                    shared = sum(self._warm_sum) / sum(self._n)
                    self._mu = [m if n > 0 else shared for m, n in zip(self._mu, self._n)]
                if self.variance_scale == AUTO:
                    self._c = self._warmup_variance()
        else:
            if self.variance_scale == AUTO:
                self._c = max(self.gamma * self._c + (1.0 - self.gamma) * (reward - self._mu[arm]) ** 2,
                              TINY_VARIANCE)
            self._mu[arm] = self.gamma * self._mu[arm] + (1.0 - self.gamma) * reward
            self._n[arm] += 1.0

    def _mean_of_warmup(self) -> list[float]:
        return [s / n if n > 0 else 0.0 for s, n in zip(self._warm_sum, self._n)]

    def _warmup_variance(self) -> float:
        """Pooled within-arm variance of the warm-up rewards; with no arm played
        twice, the variance of all of them; 1 (the paper) with a single reward."""
        played = [(s, q, n) for s, q, n in zip(self._warm_sum, self._warm_sq, self._n) if n > 0]
        total = sum(n for _, _, n in played)
        dof = total - len(played)
        if dof > 0:
            variance = sum(q - s * s / n for s, q, n in played) / dof
        elif total > 1:
            s, q = sum(p[0] for p in played), sum(p[1] for p in played)
            variance = (q - s * s / total) / (total - 1)
        else:
            variance = 1.0
        return max(variance, TINY_VARIANCE)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        out = {"mean": vec(self._mean()), "sd": vec(self._sd())}
        out.update(super().diagnostics())
        out["variance_scale"] = torch.tensor(self._c, dtype=F64)
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        auto = self.variance_scale == AUTO
        state.update({
            "gamma": torch.tensor(self.gamma, dtype=F64),
            "variance_scale": torch.tensor(self._c, dtype=F64),
            "auto": torch.tensor(int(auto), dtype=I64),
            "mu": vec(self._mu), "n": vec(self._n), "warm_sum": vec(self._warm_sum), "warm_sq": vec(self._warm_sq),
        })
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = {**{k: v for k, v in self.optional_state.items() if v is not None}, **state}
        if "warm_sq" not in state:  # an older checkpoint: only 'auto' reads it, and it could not be 'auto'
            state["warm_sq"] = torch.zeros(self.num_arms, dtype=F64)
        super().load_state_dict(state)
        self.gamma = float(state["gamma"])
        self._c = float(state["variance_scale"])
        self.variance_scale = AUTO if int(state["auto"]) else self._c
        k = self.num_arms
        self._mu, self._n = floats(state, "mu", k), floats(state, "n", k)
        self._warm_sum, self._warm_sq = floats(state, "warm_sum", k), floats(state, "warm_sq", k)

    def __repr__(self) -> str:
        return (f"ThompsonPolicy(num_arms={self.num_arms}, gamma={self.gamma}, "
                f"warmup_rounds={self.warmup_rounds}, warmup={self.warmup!r}, "
                f"variance_scale={self.variance_scale!r}, entropy_window={self.entropy_window}, seed={self.seed})")


def _covering_arms(features: torch.Tensor) -> list[int]:
    """One arm per unit, in unit order, each unit covered: the arm of that unit
    alone if there is one, else the smallest arm holding it (lowest index);
    an arm that covers several units this way is listed once."""
    arms: list[int] = []
    sizes = features.sum(1)
    for unit in range(features.shape[1]):
        holders = [k for k in range(features.shape[0]) if features[k, unit] > 0]
        if not holders:
            continue
        best = min(holders, key=lambda k: (float(sizes[k]), k))
        if best not in arms:
            arms.append(best)
    return arms


class FixedPolicy(SeededPolicy):
    """Always the same arm: the paper's fixed-arm baseline.

    `arm` may be negative, Python-style: -1 (the default) is the last arm, which
    in the default `ArmSpace` ordering (by subset size) is the arm of all modules.
    """

    def __init__(self, num_arms: int, arm: int = -1, seed: int = 0, entropy_window: int = 20):
        super().__init__(num_arms, seed=seed, entropy_window=entropy_window)
        if isinstance(arm, bool) or not isinstance(arm, int) or not -self.num_arms <= arm < self.num_arms:
            raise ConfigError(f"arm = {arm!r} must be an integer in [{-self.num_arms}, {self.num_arms - 1}]")
        self.arm = arm % self.num_arms

    def select(self) -> int:
        return self.arm

    def update(self, arm: int, reward: float) -> None:
        arm, _ = self._check_update(arm, reward)
        self._record_play(arm)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["arm"] = torch.tensor(self.arm, dtype=I64)
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


class RandomPolicy(SeededPolicy):
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
