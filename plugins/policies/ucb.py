"""Upper-confidence-bound policies for changing rewards (Garivier & Moulines 2011):
discounted UCB (`discounted_ucb_policy`) and sliding-window UCB (`sw_ucb_policy`).

Both play `argmax_k mean_k + scale * sqrt(2 * exploration * log(n_total) / n_k)`
over forgetful statistics (`n_k`: the arm's weighted plays, `n_total` their
sum); an arm with no weight left is played first (lowest index first). Nothing
is drawn: the generator is kept only for the shared interface.

`scale` is the reward's noise scale (Garivier & Moulines' bound `B`, up to the
constant): a number, or `'auto'` (the default): the pooled within-arm standard
deviation of the rewards under the statistics' weights (`s2` of
`optima.plugins.policies.thompson`), so that rewards of 0.001 or of 100 need
no tuning.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from optima.errors import ConfigError
from optima.plugins.policies.base import AUTO, F64, I64, ForgetfulPolicy, argmax, check_number, check_scale, \
    default_gamma, default_window, empirical_prior, vec


class _UCB(ForgetfulPolicy):
    def __init__(self, num_arms: int, *, gamma: float | None = None, window: int | None = None, seed: int = 0,
                 scale: float | str = AUTO, exploration: float = 1.0, warmup_rounds: int | None = None,
                 warmup: str = "round_robin", entropy_window: int = 20):
        super().__init__(num_arms, gamma=gamma, window=window, seed=seed, warmup_rounds=warmup_rounds,
                         warmup=warmup, entropy_window=entropy_window)
        self.scale = check_scale("scale", scale)
        self.exploration = check_number("exploration", exploration, 0.0, strict_low=False)

    def _scale(self, n, s, q) -> float:
        return math.sqrt(empirical_prior(n, s, q)[2]) if self.scale == AUTO else self.scale

    def indices(self) -> list[float]:
        """Each arm's upper confidence bound (inf for an arm with no weight)."""
        n, s, q = self.memory.stats()
        scale, log_total = self._scale(n, s, q), math.log(max(sum(n), 1.0))
        return [s_k / n_k + scale * math.sqrt(2.0 * self.exploration * log_total / n_k) if n_k > 0 else math.inf
                for n_k, s_k in zip(n, s)]

    def _choose(self) -> int:
        return argmax(self.indices())

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """"mean" (0 without weight), "bonus" (the index minus the mean; inf
        without weight), "weight", "count", "entropy", "scale"."""
        n, s, q = self.memory.stats()
        means = [s_k / n_k if n_k > 0 else 0.0 for n_k, s_k in zip(n, s)]
        out = {"mean": vec(means), "bonus": vec([u - m for u, m in zip(self.indices(), means)]), "weight": vec(n)}
        out.update(super().diagnostics())
        out["scale"] = torch.tensor(self._scale(n, s, q), dtype=F64)
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        auto = self.scale == AUTO
        state.update({"scale": torch.tensor(0.0 if auto else self.scale, dtype=F64),
                      "auto": torch.tensor(int(auto), dtype=I64),
                      "exploration": torch.tensor(self.exploration, dtype=F64)})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.scale = AUTO if int(state["auto"]) else float(state["scale"])
        self.exploration = float(state["exploration"])

    def __repr__(self) -> str:
        memory = f"gamma={self.memory.gamma}" if hasattr(self.memory, "gamma") else f"window={self.memory.window}"
        return (f"{type(self).__name__}(num_arms={self.num_arms}, {memory}, scale={self.scale!r}, "
                f"exploration={self.exploration}, seed={self.seed})")


class DiscountedUCBPolicy(_UCB):
    """Discounted UCB: every arm's weighted plays and reward sums decay by `gamma`
    each round (halflife `log(0.5) / log(gamma)` rounds), then the played arm
    adds its reward; the bonus grows for an idle arm as its weight fades.

    Warm-up: `warmup_rounds` (default `num_arms`) rounds in `warmup` order.
    `gamma` unbound: `1 - 1 / (4 sqrt(horizon))` when the run passes its number
    of rounds (`horizon`), else 0.95 (Garivier & Moulines 2011; `base.horizon_gamma`).
    """

    def __init__(self, num_arms: int, gamma: float | None = None, scale: float | str = AUTO,
                 exploration: float = 1.0, warmup_rounds: int | None = None, warmup: str = "round_robin",
                 entropy_window: int = 20, seed: int = 0, horizon: int | None = None):
        super().__init__(num_arms, gamma=default_gamma(gamma, horizon), seed=seed, scale=scale, exploration=exploration,
                         warmup_rounds=warmup_rounds, warmup=warmup, entropy_window=entropy_window)


class SlidingWindowUCBPolicy(_UCB):
    """Sliding-window UCB: means and counts over the last `window` rounds only; an
    arm not played within the window is played again at once.

    Warm-up: `warmup_rounds` (default `num_arms`) rounds in `warmup` order.
    `window` unbound: `ceil(2 sqrt(H log H))` rounds (at least the number of
    arms) when the run passes its number of rounds `H` (`horizon`), else 50
    (Garivier & Moulines 2011; `base.horizon_window`).
    """

    def __init__(self, num_arms: int, window: int | None = None, scale: float | str = AUTO,
                 exploration: float = 1.0, warmup_rounds: int | None = None, warmup: str = "round_robin",
                 entropy_window: int = 20, seed: int = 0, horizon: int | None = None):
        window = default_window(window, horizon, num_arms)
        if isinstance(window, int) and not isinstance(window, bool) and 0 < window < num_arms:
            raise ConfigError(f"window = {window!r} must be an integer >= the number of arms ({num_arms})")
        super().__init__(num_arms, window=window, seed=seed, scale=scale, exploration=exploration,
                         warmup_rounds=warmup_rounds, warmup=warmup, entropy_window=entropy_window)
