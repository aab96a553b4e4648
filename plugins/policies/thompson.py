"""Gaussian Thompson sampling that forgets every arm, not just the played one:
discounted (`discounted_ts_policy`) and sliding-window (`sw_ts_policy`).

The paper's policy moves only the played arm's mean and its counts only grow,
so an arm that was bad for a while keeps a narrow, stale belief and is never
tried again when it recovers while idle (docs/policies.md measures it). Here
every arm's statistics fade each round (discounted) or drop out of a window:
an idle arm's belief widens back to the prior and it is tried again.

Both share the posterior (`posterior`, `sample_means`). Each arm `k` has
weighted statistics of its rewards: weight `n_k`, sum `s_k`, sum of squares
`q_k`, so a mean `xbar_k = s_k / n_k` and a spread `SS_k = q_k - s_k^2 / n_k`.
Rewards are modelled as `r ~ N(theta_k, sigma^2)` with arm means drawn from a
common prior `theta_k ~ N(m0, tau^2)` whose parameters are estimated from all
arms (empirical Bayes), so every scale comes from the rewards themselves:

- `m0`: the average of the arms' means (each arm counts once, whatever its plays);
- `tau^2`: the variance of the arms' means around `m0` (how different arms are);
- `s2`: the pooled within-arm variance `sum SS_k / sum max(n_k - 1, 0)` (the noise).

An arm's prior is worth `kappa0 = s2 / tau^2` plays (`prior_weight = 'auto'`,
or a number): an arm not played for a while (weight near 0) is believed to be
an average arm with the spread of the arms, and is tried again about as often
as such an arm would beat the best one. With `variance_scale = 'auto'` (the
default) the noise variance is unknown, with a Normal-Inverse-Gamma posterior
(prior `sigma^2 ~ InvGamma(2, 2 s2)`, so that an idle arm's draw is a Student
t with 4 degrees of freedom around `m0`, scale `tau`):

    kappa = kappa0 + n,   m = (kappa0 m0 + s) / kappa,   alpha = 2 + n / 2,
    beta = 2 s2 + SS / 2 + kappa0 n (xbar - m0)^2 / (2 kappa),
    sigma^2 = beta / Gamma(alpha),   theta = m + sqrt(sigma^2 / kappa) z.

Nothing to tune: rewards of 0.001 or of 100 give the same plays. With
`variance_scale = c` (a number) the noise variance is known: `sigma^2 = c`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from optima.plugins.policies.base import AUTO, F64, I64, ForgetfulPolicy, argmax, check_scale, default_gamma, \
    default_window, empirical_prior, vec

#: The prior's shape for the noise variance: InvGamma(PRIOR_ALPHA, PRIOR_ALPHA * s2) (module doc).
PRIOR_ALPHA = 2.0


@dataclass
class Posterior:
    """Per-arm Normal(-Inverse-Gamma) posterior (module doc)."""

    mean: list[float]  # m
    kappa: list[float]  # plays the mean is worth, prior included
    alpha: list[float]
    beta: list[float]
    prior_mean: float  # m0
    prior_weight: float  # kappa0
    noise: float  # s2


def posterior(n: list[float], s: list[float], q: list[float], prior_weight: float | str,
              variance_scale: float | str = AUTO) -> Posterior:
    m0, tau2, s2 = empirical_prior(n, s, q)
    if variance_scale != AUTO:  # known noise
        s2 = float(variance_scale)
    k0 = s2 / tau2 if prior_weight == AUTO else float(prior_weight)
    kappa = [k0 + nk for nk in n]
    mean = [(k0 * m0 + sk) / kk for sk, kk in zip(s, kappa)]
    alpha = [PRIOR_ALPHA + 0.5 * nk for nk in n]
    beta = []
    for nk, sk, qk, kk in zip(n, s, q, kappa):
        ss = max(qk - sk * sk / nk, 0.0) if nk > 0 else 0.0
        shift = k0 * nk * (sk / nk - m0) ** 2 / (2.0 * kk) if nk > 0 else 0.0
        beta.append(PRIOR_ALPHA * s2 + 0.5 * ss + shift)
    return Posterior(mean, kappa, alpha, beta, m0, k0, s2)


def sample_means(post: Posterior, variance_scale: float | str, generator: torch.Generator) -> list[float]:
    """One draw `theta_k` per arm: `Gamma(alpha)` draws (only with 'auto'), then
    one standard normal vector, from `generator`."""
    k = len(post.mean)
    if variance_scale == AUTO:
        # torch's gamma sampler with an explicit generator (torch.distributions takes none)
        gammas = torch._standard_gamma(torch.tensor(post.alpha, dtype=F64), generator=generator).tolist()
        variances = [b / max(g, 1e-300) for b, g in zip(post.beta, gammas)]
    else:
        variances = [float(variance_scale)] * k
    z = torch.randn(k, generator=generator, dtype=F64).tolist()
    return [m + math.sqrt(v / kk) * x for m, v, kk, x in zip(post.mean, variances, post.kappa, z)]


class _GaussianTS(ForgetfulPolicy):
    """Shared parts: bindings, the draw, diagnostics, over `self.memory`."""

    def __init__(self, num_arms: int, *, gamma: float | None = None, window: int | None = None, seed: int = 0,
                 variance_scale: float | str = AUTO, prior_weight: float | str = AUTO, warmup_rounds: int | None = None,
                 warmup: str = "round_robin", entropy_window: int = 20):
        super().__init__(num_arms, gamma=gamma, window=window, seed=seed, warmup_rounds=warmup_rounds,
                         warmup=warmup, entropy_window=entropy_window)
        self.variance_scale = check_scale("variance_scale", variance_scale)
        self.prior_weight = check_scale("prior_weight", prior_weight)

    def posterior(self) -> Posterior:
        return posterior(*self.memory.stats(), self.prior_weight, self.variance_scale)

    def _choose(self) -> int:
        return argmax(sample_means(self.posterior(), self.variance_scale, self.generator))

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """"mean" and "sd" of each arm's posterior mean (sd at the noise
        variance's posterior mean), "weight" (plays its statistics still count),
        "count", "entropy", and the prior's "prior_weight" (kappa0) and "noise_sd"."""
        post = self.posterior()
        if self.variance_scale == AUTO:
            variances = [b / (a - 1.0) for a, b in zip(post.alpha, post.beta)]
        else:
            variances = [self.variance_scale] * self.num_arms
        out = {"mean": vec(post.mean), "sd": vec([math.sqrt(v / kk) for v, kk in zip(variances, post.kappa)]),
               "weight": vec(self.memory.stats()[0])}
        out.update(super().diagnostics())
        out["prior_weight"] = torch.tensor(post.prior_weight, dtype=F64)
        out["noise_sd"] = torch.tensor(math.sqrt(post.noise), dtype=F64)
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        auto = self.variance_scale == AUTO
        auto_weight = self.prior_weight == AUTO
        state.update({"variance_scale": torch.tensor(0.0 if auto else self.variance_scale, dtype=F64),
                      "auto": torch.tensor(int(auto), dtype=I64),
                      "prior_weight": torch.tensor(0.0 if auto_weight else self.prior_weight, dtype=F64),
                      "auto_prior_weight": torch.tensor(int(auto_weight), dtype=I64)})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.variance_scale = AUTO if int(state["auto"]) else float(state["variance_scale"])
        self.prior_weight = AUTO if int(state["auto_prior_weight"]) else float(state["prior_weight"])

    def __repr__(self) -> str:
        memory = f"gamma={self.memory.gamma}" if hasattr(self.memory, "gamma") else f"window={self.memory.window}"
        return (f"{type(self).__name__}(num_arms={self.num_arms}, {memory}, variance_scale={self.variance_scale!r}, "
                f"prior_weight={self.prior_weight}, seed={self.seed})")


class DiscountedThompsonPolicy(_GaussianTS):
    """Discounted Gaussian Thompson sampling: every arm's statistics decay each round,
    so an idle arm's belief widens back to the prior and it is tried again.

    Each update multiplies every arm's weight, sum and sum of squares by `gamma`,
    then adds the played arm's reward (weight 1): an arm's statistics count
    about `1 / (1 - gamma)` recent plays at most, and halve in
    `log(0.5) / log(gamma)` rounds whether it is played or not (Raj & Kalyani
    2017, with a Gaussian posterior). The posterior and `variance_scale`
    ('auto': none to tune) are in the module doc. Warm-up: `warmup_rounds`
    (default `num_arms`) rounds in `warmup` order ('round_robin' or 'random'),
    whose rewards count like any other.

    `gamma` unbound: `1 - 1 / (4 sqrt(horizon))` when the run passes its number
    of rounds (`horizon`; distillation and `optima bandit` do), else 0.95
    (`base.horizon_gamma`).
    """

    def __init__(self, num_arms: int, gamma: float | None = None, variance_scale: float | str = AUTO,
                 prior_weight: float | str = AUTO, warmup_rounds: int | None = None, warmup: str = "round_robin",
                 entropy_window: int = 20, seed: int = 0, horizon: int | None = None):
        super().__init__(num_arms, gamma=default_gamma(gamma, horizon), seed=seed, variance_scale=variance_scale, prior_weight=prior_weight,
                         warmup_rounds=warmup_rounds, warmup=warmup, entropy_window=entropy_window)


class SlidingWindowThompsonPolicy(_GaussianTS):
    """Sliding-window Gaussian Thompson sampling: each arm's belief uses only the
    rewards of the last `window` rounds, so an arm not played within the window
    is back at the prior and is tried again.

    The posterior and `variance_scale` ('auto': none to tune) are in the module
    doc (Trovo et al. 2020 use the window with Beta posteriors). Warm-up as
    `discounted_ts_policy`. `window` unbound: `ceil(2 sqrt(H log H))` rounds (at
    least the number of arms) when the run passes its number of rounds `H`
    (`horizon`), else 50 (`base.horizon_window`).
    """

    def __init__(self, num_arms: int, window: int | None = None, variance_scale: float | str = AUTO,
                 prior_weight: float | str = AUTO, warmup_rounds: int | None = None, warmup: str = "round_robin",
                 entropy_window: int = 20, seed: int = 0, horizon: int | None = None):
        super().__init__(num_arms, window=default_window(window, horizon, num_arms), seed=seed, variance_scale=variance_scale,
                         prior_weight=prior_weight, warmup_rounds=warmup_rounds, warmup=warmup,
                         entropy_window=entropy_window)
