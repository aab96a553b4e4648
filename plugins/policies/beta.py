"""Thompson sampling for a binary reward (`decayed_beta_ts_policy`): Beta-Bernoulli
posteriors whose counts of every arm decay each round.

A reward in {0, 1} (e.g. "the held-out score did not get worse over the
round", AutoSeM's reward, Guo et al. 2019) is a coin: arm `k` pays 1 with
probability `theta_k`. The Beta posterior of that probability needs no scale
and no variance estimate; discounting forgets old rounds so that an arm whose
coin changes is tried again.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from optima.plugins.policies.base import F64, ForgetfulPolicy, argmax, check_number, default_gamma, vec


class DecayedBetaThompsonPolicy(ForgetfulPolicy):
    """Discounted Beta-Bernoulli Thompson sampling (Raj & Kalyani 2017,
    "Taming non-stationary bandits: a Bayesian approach", dTS).

    Each update multiplies every arm's success count `S_k` and failure count
    `F_k` by `gamma`, then the played arm adds `S += r`, `F += 1 - r`. A reward
    in [0, 1] counts as a fractional success (a reward of 0.3 adds 0.3 and
    0.7); a reward outside [0, 1] raises `ValueError` (it is not a binary
    reward: bind a reward that is, or another policy). Each `select()` draws
    `theta_k ~ Beta(prior_successes + S_k, prior_failures + F_k)` (two
    `torch._standard_gamma` draws per arm from the policy's generator, `X / (X + Y)`)
    and plays the largest: an idle arm's counts fade to the prior (by default
    Beta(1, 1), uniform) and it is tried again.

    `gamma` unbound: `1 - 1 / (4 sqrt(horizon))` when the run passes its number
    of rounds (`horizon`), else 0.95, as `discounted_ts_policy`. Warm-up:
    `warmup_rounds` (default `num_arms`) rounds in `warmup` order, whose
    rewards count like any other. `diagnostics()`: per arm "mean" (posterior
    mean of `theta_k`), "sd" (its posterior sd), "weight" (`S_k + F_k`, the
    plays still counted), "count", "entropy".
    """

    def __init__(self, num_arms: int, gamma: float | None = None, prior_successes: float = 1.0,
                 prior_failures: float = 1.0, warmup_rounds: int | None = None, warmup: str = "round_robin",
                 entropy_window: int = 20, seed: int = 0, horizon: int | None = None):
        super().__init__(num_arms, gamma=default_gamma(gamma, horizon), seed=seed, warmup_rounds=warmup_rounds,
                         warmup=warmup, entropy_window=entropy_window)
        self.prior_successes = check_number("prior_successes", prior_successes, 0.0)
        self.prior_failures = check_number("prior_failures", prior_failures, 0.0)

    def _check_update(self, arm: int, reward: float) -> tuple[int, float]:
        arm, reward = super()._check_update(arm, reward)
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"decayed_beta_ts_policy takes rewards in [0, 1] (successes), got {reward} for "
                             f"arm {arm}")
        return arm, reward

    def beta_parameters(self) -> tuple[list[float], list[float]]:
        """Per arm (a, b) of the Beta posterior."""
        n, s, _ = self.memory.stats()
        a = [self.prior_successes + sk for sk in s]
        b = [self.prior_failures + max(nk - sk, 0.0) for nk, sk in zip(n, s)]
        return a, b

    def _choose(self) -> int:
        a, b = self.beta_parameters()
        x = torch._standard_gamma(torch.tensor(a, dtype=F64), generator=self.generator).tolist()
        y = torch._standard_gamma(torch.tensor(b, dtype=F64), generator=self.generator).tolist()
        return argmax([xk / (xk + yk) if xk + yk > 0 else 0.5 for xk, yk in zip(x, y)])

    def diagnostics(self) -> dict[str, torch.Tensor]:
        a, b = self.beta_parameters()
        means = [ak / (ak + bk) for ak, bk in zip(a, b)]
        sds = [(ak * bk / ((ak + bk) ** 2 * (ak + bk + 1.0))) ** 0.5 for ak, bk in zip(a, b)]
        out = {"mean": vec(means), "sd": vec(sds), "weight": vec(self.memory.stats()[0])}
        out.update(super().diagnostics())
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({"prior_successes": torch.tensor(self.prior_successes, dtype=F64),
                      "prior_failures": torch.tensor(self.prior_failures, dtype=F64)})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.prior_successes = float(state["prior_successes"])
        self.prior_failures = float(state["prior_failures"])

    def __repr__(self) -> str:
        return (f"DecayedBetaThompsonPolicy(num_arms={self.num_arms}, gamma={self.memory.gamma}, "
                f"prior=Beta({self.prior_successes}, {self.prior_failures}), seed={self.seed})")

