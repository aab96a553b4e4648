"""What every built-in policy shares: a seeded generator, play counts, the
entropy of recent plays, the warm-up, checked bindings and tensor-only state.

Every policy draws only from its own `torch.Generator` seeded by `seed`, so the
same seed and the same rewards give the same arms in every process. Its
`state_dict()` holds tensors only (hyper-parameters, counters and the
generator's state included), so it can be saved with `safetensors` or loaded
with `torch.load(weights_only=True)`; `load_state_dict` restores everything and
the policy continues exactly as the saved one would have.

All policies count the plays of each arm (an arm is played when it is passed to
`update`) and report, in `diagnostics()`, "count" (per arm) and "entropy" (nats,
0-dim) of the empirical distribution of the last `entropy_window` played arms.
`update` rejects an arm out of range and a non-finite reward with `ValueError`
(a programming error: the reward raises on non-finite losses first).

Bad bindings raise `ConfigError` naming the parameter; `optima.validation`
prefixes the policy's gin name.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from optima.errors import ConfigError
from optima.interfaces import Policy

F64 = torch.float64
I64 = torch.int64
#: The warm-up orders a policy can play (`warmup` binding); `optima_policy` also
#: takes 'per_module' (`PER_MODULE`). Checkpoints store the index: append only.
WARMUPS = ("random", "round_robin")
PER_MODULE = "per_module"
ALL_WARMUPS = (*WARMUPS, PER_MODULE)
#: 'auto': a scale the policy sets from the rewards it sees.
AUTO = "auto"
#: Floor of an estimated reward variance (rewards can all be 0: clipped decrements).
TINY_VARIANCE = 1e-12


# Messages read "<parameter> = <value> must be <allowed>": optima.validation
# prefixes the policy's gin name, "sw_ucb_policy.window = 3 must be ...".

def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} = {value!r} must be an integer >= {minimum}")
    return int(value)


def check_number(name: str, value: Any, low: float, high: float | None = None, *, strict_low: bool = True,
                 strict_high: bool = False) -> float:
    """A finite real number in the interval (strictness of each end as given)."""
    try:
        ok = not isinstance(value, (bool, str)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if ok:
        v = float(value)
        ok = (v > low if strict_low else v >= low) and (high is None or (v < high if strict_high else v <= high))
    if not ok:
        interval = (f"> {low:g}" if strict_low else f">= {low:g}") if high is None else \
            f"in {'(' if strict_low else '['}{low:g}, {high:g}{')' if strict_high else ']'}"
        raise ConfigError(f"{name} = {value!r} must be a number {interval}")
    return float(value)


def check_scale(name: str, value: Any) -> float | str:
    """`'auto'` or a finite number > 0."""
    if value == AUTO:
        return AUTO
    try:
        return check_number(name, value, 0.0)
    except ConfigError:
        raise ConfigError(f"{name} = {value!r} must be 'auto' or a number > 0") from None


def check_horizon(horizon: Any) -> int | None:
    """`horizon` (the number of rounds, when the run knows it) or None."""
    if horizon is None:
        return None
    return check_int("horizon", horizon, 1)


# Defaults derived from the horizon H (the number of rounds), from Garivier &
# Moulines 2011 ("On upper-confidence bound policies for switching bandit
# problems", ALT; Remarks after their Theorems 1 and 3): SW-UCB's window
# `tau = 2 B sqrt(H log H / Upsilon)` and D-UCB's discount
# `gamma = 1 - sqrt(Upsilon / H) / (4 B)`, taken with the number of changes
# `Upsilon` unknown (1, their choice when it is not known) and the reward bound
# `B = 1`. The fixed defaults (window 50, gamma 0.95) are what a policy uses
# when the run does not know its horizon.

def horizon_window(horizon: int, num_arms: int) -> int:
    """`ceil(2 sqrt(H log H))` rounds, at least `num_arms` (every arm fits in it)."""
    return max(num_arms, math.ceil(2.0 * math.sqrt(horizon * math.log(horizon))))


def horizon_gamma(horizon: int) -> float:
    """`1 - 1 / (4 sqrt(H))`: a halflife of about `2.8 sqrt(H)` rounds."""
    return 1.0 - 1.0 / (4.0 * math.sqrt(horizon))


def default_window(window: Any, horizon: Any, num_arms: int, fallback: int = 50) -> Any:
    """`window` as bound; unbound (None): from `horizon` when known, else `fallback`."""
    if window is not None:
        return window
    horizon = check_horizon(horizon)
    return fallback if horizon is None else horizon_window(horizon, num_arms)


def default_gamma(gamma: Any, horizon: Any, fallback: float = 0.95) -> Any:
    """`gamma` as bound; unbound (None): from `horizon` when known, else `fallback`."""
    if gamma is not None:
        return gamma
    horizon = check_horizon(horizon)
    return fallback if horizon is None else horizon_gamma(horizon)


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed = {seed!r} must be an integer in [0, 2**63)")
    return int(seed)


def entropy(recent: list[int], num_arms: int) -> torch.Tensor:
    """Entropy in nats of the empirical distribution of `recent` (0 when empty)."""
    if not recent:
        return torch.zeros((), dtype=F64)
    p = torch.bincount(torch.tensor(recent, dtype=I64), minlength=num_arms).to(F64) / len(recent)
    p = p[p > 0]
    return -(p * p.log()).sum()


def warmup_order(num_arms: int, rounds: int, how: str, generator: torch.Generator) -> torch.Tensor:
    """The arms of the first `rounds` rounds, drawn from `generator`: 'random'
    (the paper: a random permutation, so every arm once, then uniformly random
    arms) or 'round_robin' (passes over all arms, each pass in a new random
    order: every arm `rounds // K` times or once more). Each pass is shuffled
    because rewards shrink during training: in a fixed order the first arm of
    every pass would always look best (`optima bandit -e replay` measured it)."""
    # on the CPU explicitly: validation builds policies inside `torch.device("meta")`
    if how == "round_robin":
        passes = [torch.randperm(num_arms, generator=generator, device="cpu") for _ in range(-(-rounds // num_arms))]
        return torch.cat(passes).to(I64)[:rounds]
    perm = torch.randperm(num_arms, generator=generator, device="cpu")
    fill = torch.randint(num_arms, (rounds - num_arms,), generator=generator, device="cpu")
    return torch.cat([perm, fill]).to(I64)[:rounds]


class SeededPolicy(Policy):
    """Shared bookkeeping: generator, per-arm play counts, recent plays.

    Subclasses add their own state in `state_dict` / `load_state_dict` (calling
    these first) and may keep it in Python floats: a policy runs thousands of
    rounds in `optima bandit`, where a small tensor op costs more than the math.
    """

    def __init__(self, num_arms: int, seed: int = 0, entropy_window: int = 20):
        self.num_arms = check_int("num_arms", num_arms, 1)
        self.seed = check_seed(seed)
        self.entropy_window = check_int("entropy_window", entropy_window, 1)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self._counts = [0] * self.num_arms
        self._recent: list[int] = []

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
        self._recent.append(arm)
        if len(self._recent) > self.entropy_window:
            del self._recent[0]

    @property
    def counts(self) -> torch.Tensor:
        """Plays of each arm so far (a copy)."""
        return torch.tensor(self._counts, dtype=I64)

    @property
    def n_updates(self) -> int:
        return sum(self._counts)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor(self._counts, dtype=F64), "entropy": entropy(self._recent, self.num_arms)}

    # -- state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_arms": torch.tensor(self.num_arms, dtype=I64),
            "seed": torch.tensor(self.seed, dtype=I64),
            "entropy_window": torch.tensor(self.entropy_window, dtype=I64),
            "generator": self.generator.get_state().clone(),
            "counts": torch.tensor(self._counts, dtype=I64),
            "recent": torch.tensor(self._recent, dtype=I64),
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
        self._counts = [int(c) for c in torch.as_tensor(state["counts"]).reshape(self.num_arms)]
        self._recent = [int(a) for a in torch.as_tensor(state["recent"]).reshape(-1)]


class WarmupPolicy(SeededPolicy):
    """A policy that first plays `warmup_rounds` arms in a fixed order (every arm
    at least once), then decides by itself (`_choose`).

    `warmup`: 'round_robin' (passes over all arms, each in a new random order) or
    'random' (a random permutation, then random arms; the paper's). `select()` returns the warm-up order's next entry
    until it is updated, so two selects without an update give the same arm (the
    engine does not update after the first round, which has no reward).
    """

    default_warmup = "round_robin"
    #: The `warmup` values this policy takes.
    warmups: tuple[str, ...] = WARMUPS

    def __init__(self, num_arms: int, seed: int = 0, entropy_window: int = 20, warmup_rounds: int | None = None,
                 warmup: str | None = None):
        super().__init__(num_arms, seed=seed, entropy_window=entropy_window)
        warmup = self.default_warmup if warmup is None else warmup
        if warmup not in self.warmups:
            raise ConfigError(f"warmup = {warmup!r} must be one of {', '.join(map(repr, self.warmups))}")
        self.warmup = warmup
        if warmup_rounds is None:
            warmup_rounds = self.default_warmup_rounds()
        minimum = self.min_warmup_rounds()
        if isinstance(warmup_rounds, bool) or not isinstance(warmup_rounds, int) or warmup_rounds < minimum:
            raise ConfigError(f"warmup_rounds = {warmup_rounds!r} must be an integer >= {self.min_warmup_reason()}")
        self.warmup_rounds = int(warmup_rounds)
        self._warmup_order = self.make_warmup_order().tolist()
        self._n_updates = 0

    def default_warmup_rounds(self) -> int:
        return self.num_arms

    def min_warmup_rounds(self) -> int:
        return self.num_arms

    def min_warmup_reason(self) -> str:
        """The least `warmup_rounds` and why, for the binding's error message."""
        minimum = self.min_warmup_rounds()
        return f"the number of arms ({minimum}), so that every arm is played once" \
            if minimum == self.num_arms else str(minimum)

    def make_warmup_order(self) -> torch.Tensor:
        """The arms of the warm-up rounds, drawn from the generator (`warmup_order`)."""
        return warmup_order(self.num_arms, self.warmup_rounds, self.warmup, self.generator)

    @property
    def in_warmup(self) -> bool:
        return self._n_updates < self.warmup_rounds

    @property
    def warmup_order(self) -> tuple[int, ...]:
        return tuple(self._warmup_order)

    @property
    def n_updates(self) -> int:
        return self._n_updates

    def select(self) -> int:
        if self.in_warmup:
            return self._warmup_order[self._n_updates]
        return self._choose()

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """As `SeededPolicy`'s, and "warmup": 1 while the next arm still comes
        from the warm-up order, else 0 (the figures shade the warm-up rounds by it)."""
        out = super().diagnostics()
        out["warmup"] = torch.tensor(float(self.in_warmup), dtype=F64)
        return out

    def _choose(self) -> int:
        raise NotImplementedError

    def update(self, arm: int, reward: float) -> None:
        arm, reward = self._check_update(arm, reward)
        self._learn(arm, reward)
        self._n_updates += 1
        self._record_play(arm)

    def _learn(self, arm: int, reward: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({"warmup": torch.tensor(ALL_WARMUPS.index(self.warmup), dtype=I64),
                      "warmup_rounds": torch.tensor(self.warmup_rounds, dtype=I64),
                      "warmup_order": torch.tensor(self._warmup_order, dtype=I64),
                      "n_updates": torch.tensor(self._n_updates, dtype=I64)})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.warmup = ALL_WARMUPS[int(state["warmup"])]
        self.warmup_rounds = int(state["warmup_rounds"])
        self._warmup_order = [int(a) for a in torch.as_tensor(state["warmup_order"]).reshape(-1)]
        if len(self._warmup_order) != self.warmup_rounds:
            raise ConfigError(f"{type(self).__name__} state: warmup_order does not have warmup_rounds entries")
        self._n_updates = int(state["n_updates"])


def floats(state: Mapping[str, Any], key: str, n: int | None = None) -> list[float]:
    """A float64 tensor of the state as a list (checked length `n`)."""
    values = [float(v) for v in torch.as_tensor(state[key], dtype=F64).reshape(-1)]
    if n is not None and len(values) != n:
        raise ConfigError(f"policy state: {key} has {len(values)} entries, expected {n}")
    return values


def vec(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def argmax(values: list[float]) -> int:
    """The first of equal maxima (as `torch.argmax`)."""
    return max(range(len(values)), key=values.__getitem__)


# -- forgetful reward statistics ------------------------------------------------------

def population(n: list[float], s: list[float], q: list[float]) -> tuple[float, float]:
    """Mean and variance of all rewards under the statistics' weights (0 and 1
    before any reward); the variance is at least `TINY_VARIANCE`."""
    total = sum(n)
    if total <= 0.0:
        return 0.0, 1.0
    mean = sum(s) / total
    return mean, max(sum(q) / total - mean * mean, TINY_VARIANCE)


def empirical_prior(n: list[float], s: list[float], q: list[float]) -> tuple[float, float, float]:
    """`(m0, tau^2, s2)` of `optima.plugins.policies.thompson`; with fewer than two arms or no
    repeated play, the weighted variance of all rewards stands in for the
    missing variance. Variances are at least `TINY_VARIANCE`."""
    played = [(nk, sk, qk) for nk, sk, qk in zip(n, s, q) if nk > 0]
    if not played:
        return 0.0, 1.0, 1.0
    means = [sk / nk for nk, sk, _ in played]
    m0 = sum(means) / len(means)
    total_variance = population(n, s, q)[1]
    dof = sum(max(nk - 1.0, 0.0) for nk, _, _ in played)
    noise = sum(max(qk - sk * sk / nk, 0.0) for nk, sk, qk in played) / dof if dof > 1e-9 else total_variance
    between = sum((x - m0) ** 2 for x in means) / len(means) if len(means) > 1 else total_variance
    return m0, max(between, TINY_VARIANCE), max(noise, TINY_VARIANCE)


class DiscountedStats:
    """Per-arm weight `n`, reward sum `s` and sum of squares `q`, each multiplied
    by `gamma` at every `add` before the played arm adds (1, r, r^2): every arm
    forgets, played or not (halflife `log(0.5) / log(gamma)` rounds)."""

    def __init__(self, num_arms: int, gamma: float):
        self.num_arms, self.gamma = num_arms, check_number("gamma", gamma, 0.0, 1.0)
        self.n, self.s, self.q = [0.0] * num_arms, [0.0] * num_arms, [0.0] * num_arms

    def add(self, arm: int, reward: float) -> None:
        g = self.gamma
        self.n = [g * v for v in self.n]
        self.s = [g * v for v in self.s]
        self.q = [g * v for v in self.q]
        self.n[arm] += 1.0
        self.s[arm] += reward
        self.q[arm] += reward * reward

    def stats(self) -> tuple[list[float], list[float], list[float]]:
        return self.n, self.s, self.q

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"gamma": torch.tensor(self.gamma, dtype=F64), "n": vec(self.n), "s": vec(self.s), "q": vec(self.q)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.gamma = float(state["gamma"])
        k = self.num_arms
        self.n, self.s, self.q = floats(state, "n", k), floats(state, "s", k), floats(state, "q", k)


class WindowStats:
    """The same statistics over the last `window` (arm, reward) pairs only,
    recomputed from them (exact, whatever the order of additions)."""

    def __init__(self, num_arms: int, window: int):
        self.num_arms, self.window = num_arms, check_int("window", window, 1)
        self.arms: list[int] = []
        self.rewards: list[float] = []

    def add(self, arm: int, reward: float) -> None:
        self.arms.append(arm)
        self.rewards.append(reward)
        if len(self.arms) > self.window:
            del self.arms[0], self.rewards[0]

    def stats(self) -> tuple[list[float], list[float], list[float]]:
        n, s, q = [0.0] * self.num_arms, [0.0] * self.num_arms, [0.0] * self.num_arms
        for a, r in zip(self.arms, self.rewards):
            n[a] += 1.0
            s[a] += r
            q[a] += r * r
        return n, s, q

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"window": torch.tensor(self.window, dtype=I64),
                "window_arms": torch.tensor(self.arms, dtype=I64), "window_rewards": vec(self.rewards)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.window = int(state["window"])
        self.arms = [int(a) for a in torch.as_tensor(state["window_arms"]).reshape(-1)]
        self.rewards = floats(state, "window_rewards", len(self.arms))
        if len(self.arms) > self.window or any(not 0 <= a < self.num_arms for a in self.arms):
            raise ConfigError("policy state: its window does not fit these arms")


class ForgetfulPolicy(WarmupPolicy):
    """A warm-up policy over `DiscountedStats` (bind `gamma`) or `WindowStats`
    (bind `window`): subclasses read `self.memory.stats()`."""

    def __init__(self, num_arms: int, *, gamma: float | None = None, window: int | None = None, seed: int = 0,
                 warmup_rounds: int | None = None, warmup: str | None = None, entropy_window: int = 20):
        super().__init__(num_arms, seed=seed, entropy_window=entropy_window, warmup_rounds=warmup_rounds,
                         warmup=warmup)
        self.memory = DiscountedStats(self.num_arms, gamma) if window is None else WindowStats(self.num_arms, window)

    def _learn(self, arm: int, reward: float) -> None:
        self.memory.add(arm, reward)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(self.memory.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state)
