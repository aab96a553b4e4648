"""Thompson sampling that scales to many arms made of shared units
(`grouped_ts_policy`): finer arms over layer groups (docs/policies.md).

With `distillation.arm_groups = 2`, CoCa's 3 modules become 6 units and the
arms are the 63 non-empty sets of units: one belief per arm would need 63
plays before it knew anything. Here the reward of an arm is modelled as a sum
over its units, `r = w_0 + sum_{u in arm} w_u + noise`, and one posterior
over the `U + 1` unit effects is learnt from every round whatever arm was
played (discounted Bayesian linear regression, Normal-Inverse-Gamma). Each
round draws one effect per unit and plays the arm with the best drawn sum,
i.e. includes a unit when its draw is worth it: per-unit Thompson sampling.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from optima.errors import ConfigError
from optima.plugins.policies.base import AUTO, F64, I64, TINY_VARIANCE, WarmupPolicy, check_number, check_scale, \
    default_gamma

#: The noise variance's prior shape, as in `thompson.py`: InvGamma(2, 2 tau^2).
PRIOR_ALPHA = 2.0


class GroupedThompsonPolicy(WarmupPolicy):
    """Per-unit Thompson sampling over arms that share units (modules or layer groups).

    `arm_features` ((arms, units) 0/1, passed by the engine from the arm space:
    which units each arm distils; the identity when absent, one unit per arm).
    Design `x_a = (1, features_a)`. Every update decays the statistics by
    `gamma` (an idle unit's effect grows uncertain again) and adds the round:
    `V <- gamma V + x x^T`, `b <- gamma b + r x`, `n <- gamma n + 1`,
    `q <- gamma q + r^2`. Prior (empirical Bayes, from the rewards, so no
    scale to tune): effects `N(mu0, sigma^2 / prior_weight I)` with `mu0 =
    (mean reward, 0, ..., 0)`, `sigma^2 ~ InvGamma(2, 2 tau^2)`, `tau^2` the
    rewards' variance (all under the decayed weights). Posterior: `L = prior_weight
    I + V`, `mu = L^-1 (prior_weight mu0 + b)`, `alpha = 2 + n/2`,
    `beta = 2 tau^2 + (q + prior_weight |mu0|^2 - mu^T L mu) / 2`. A draw is
    `sigma^2 = beta / Gamma(alpha)`, `w = mu + sigma L^{-T/2} z`, and the arm
    played is `argmax_a x_a . w`. With `variance_scale = c` the noise variance
    is known (`sigma^2 = c`).

    Warm-up: `warmup_rounds` (default `min(arms, units + 1)`, as many as the
    effects to learn) rounds in `warmup` order over the arm list (with many
    arms, a random sample of them). `diagnostics()`: per arm "mean" and "sd"
    of `x_a . w`; per unit `unit_effect` and `unit_sd`; "count", "entropy".
    `gamma` unbound: from the run's number of rounds as `discounted_ts_policy`'s
    (`1 - 1 / (4 sqrt(horizon))`), else 0.95.
    """

    def __init__(self, num_arms: int, arm_features: Any = None, gamma: float | None = None,
                 variance_scale: float | str = AUTO, prior_weight: float = 1.0, warmup_rounds: int | None = None,
                 warmup: str = "round_robin", entropy_window: int = 20, seed: int = 0, horizon: int | None = None):
        features = torch.eye(int(num_arms), dtype=F64) if arm_features is None and isinstance(num_arms, int) \
            else torch.as_tensor(arm_features if arm_features is not None else [], dtype=F64, device="cpu")
        if features.dim() != 2 or features.shape[0] != num_arms or not ((features == 0) | (features == 1)).all() \
                or (features.sum(1) == 0).any():
            raise ConfigError(f"arm_features must be a 0/1 matrix with one row per arm ({num_arms}) and at least "
                              f"one unit in each row, got shape {tuple(features.shape)}")
        self._x = torch.cat([torch.ones(features.shape[0], 1, dtype=F64), features], dim=1)  # (arms, D)
        super().__init__(num_arms, seed=seed, entropy_window=entropy_window, warmup_rounds=warmup_rounds,
                         warmup=warmup)
        self.gamma = check_number("gamma", default_gamma(gamma, horizon), 0.0, 1.0)
        self.variance_scale = check_scale("variance_scale", variance_scale)
        self.prior_weight = check_number("prior_weight", prior_weight, 0.0)
        d = self._x.shape[1]
        self._v = torch.zeros(d, d, dtype=F64)
        self._b = torch.zeros(d, dtype=F64)
        self._n = 0.0
        self._q = 0.0

    @property
    def num_units(self) -> int:
        return self._x.shape[1] - 1

    def default_warmup_rounds(self) -> int:
        return min(self.num_arms, self.num_units + 1)

    def min_warmup_rounds(self) -> int:
        return 1

    def _learn(self, arm: int, reward: float) -> None:
        x, g = self._x[arm], self.gamma
        self._v = g * self._v + torch.outer(x, x)
        self._b = g * self._b + reward * x
        self._n = g * self._n + 1.0
        self._q = g * self._q + reward * reward

    def _posterior(self) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(mu, Cholesky factor of L, alpha, beta)."""
        d = self._x.shape[1]
        mean = float(self._b[0]) / self._n if self._n > 0 else 0.0
        tau2 = max(self._q / self._n - mean * mean, TINY_VARIANCE) if self._n > 0 else 1.0
        mu0 = torch.zeros(d, dtype=F64)
        mu0[0] = mean
        k0 = self.prior_weight
        precision = k0 * torch.eye(d, dtype=F64) + self._v
        chol = torch.linalg.cholesky(precision)
        mu = torch.cholesky_solve((k0 * mu0 + self._b).unsqueeze(1), chol).squeeze(1)
        alpha = PRIOR_ALPHA + 0.5 * self._n
        fit = self._q + k0 * float(mu0 @ mu0) - float(mu @ precision @ mu)
        beta = PRIOR_ALPHA * tau2 + 0.5 * max(fit, 0.0)
        return mu, chol, alpha, beta

    def _choose(self) -> int:
        mu, chol, alpha, beta = self._posterior()
        if self.variance_scale == AUTO:
            gamma = float(torch._standard_gamma(torch.tensor([alpha], dtype=F64), generator=self.generator))
            variance = beta / max(gamma, 1e-300)
        else:
            variance = self.variance_scale
        z = torch.randn(mu.shape[0], generator=self.generator, dtype=F64)
        # w ~ N(mu, variance L^-1): solve L^T y = z with L = chol chol^T
        w = mu + math.sqrt(variance) * torch.linalg.solve_triangular(chol.T, z.unsqueeze(1), upper=True).squeeze(1)
        return int(torch.argmax(self._x @ w))

    def diagnostics(self) -> dict[str, torch.Tensor]:
        mu, chol, alpha, beta = self._posterior()
        variance = beta / (alpha - 1.0) if self.variance_scale == AUTO else self.variance_scale
        cov = variance * torch.cholesky_inverse(chol)
        arm_sd = torch.einsum("ad,de,ae->a", self._x, cov, self._x).clamp(min=0).sqrt()
        out = {"mean": self._x @ mu, "sd": arm_sd, "unit_effect": mu[1:].clone(),
               "unit_sd": cov.diagonal()[1:].clamp(min=0).sqrt()}
        out.update(super().diagnostics())
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        auto = self.variance_scale == AUTO
        state.update({"features": self._x[:, 1:].clone(), "gamma": torch.tensor(self.gamma, dtype=F64),
                      "variance_scale": torch.tensor(0.0 if auto else self.variance_scale, dtype=F64),
                      "auto": torch.tensor(int(auto), dtype=I64),
                      "prior_weight": torch.tensor(self.prior_weight, dtype=F64),
                      "v": self._v.clone(), "b": self._b.clone(),
                      "n": torch.tensor(self._n, dtype=F64), "q": torch.tensor(self._q, dtype=F64)})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "features" in state:
            features = torch.as_tensor(state["features"], dtype=F64)
            if features.shape != self._x[:, 1:].shape or not torch.equal(features, self._x[:, 1:]):
                raise ConfigError(f"GroupedThompsonPolicy state has {features.shape[0]} arms over other units "
                                  f"than this policy's {self.num_arms} arms")
        super().load_state_dict(state)
        self.gamma = float(state["gamma"])
        self.variance_scale = AUTO if int(state["auto"]) else float(state["variance_scale"])
        self.prior_weight = float(state["prior_weight"])
        self._v = torch.as_tensor(state["v"], dtype=F64).clone()
        self._b = torch.as_tensor(state["b"], dtype=F64).clone()
        self._n, self._q = float(state["n"]), float(state["q"])

    def __repr__(self) -> str:
        return (f"GroupedThompsonPolicy(num_arms={self.num_arms}, units={self.num_units}, gamma={self.gamma}, "
                f"variance_scale={self.variance_scale!r}, prior_weight={self.prior_weight}, seed={self.seed})")
