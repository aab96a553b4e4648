"""Simulated bandits to compare policies in seconds (`optima bandit`).

An `Environment` holds, for every seed, round and arm, the expected reward
(`means`) and the reward the arm would pay if played (`rewards`), drawn up front
and vectorised over seeds with numpy. `simulate` runs a policy (any registered
one, by gin name: the real class, third-party ones included) on every seed and
returns its dynamic pseudo-regret per round, `max_k means[t, k] - means[t, a_t]`.
Every policy sees the same rewards for the same seed (common random numbers),
and the policy's own seed is the seed's index.

Environments (`ENVIRONMENTS`; `docs/policies.md` gives the measured table):

- `abrupt`: 3 arms, the best arm changes abruptly three times (Garivier &
  Moulines 2011's setting); noise sd 0.1.
- `drift`: 5 arms whose means drift slowly (sines of period 500 rounds, phases
  spread), so the best arm keeps changing; noise sd 0.1.
- `idle_recovers`: 3 arms; the best arm falls at 30% of the run, the policy
  moves to the second, and the first comes back (better than ever) at 60%
  while idle; noise sd 0.1. What the paper's policy misses (docs/policies.md).
- `optima_scale`: 7 arms (CoCa's module subsets) at OPTIMA's scale: rewards
  are relative loss decrements that shrink over training (level 0.1 to 0.005
  over 500 rounds), arms differ by 0.1 to 0.6 of the level (0.01 to 0.06 at
  the start), noise sd half the level, clipped at 0 as the real reward is; the
  best arm changes once, at 40% of the run.
- `rested_rotting`: 5 arms whose means fall with their own plays (rested
  rotting, what OPTIMA's reward does) at OPTIMA's scale, the best arms rotting
  fastest, 500 rounds; regret is against the oracle that plays the best arm at
  its current play count.
- `rotting`: `rested_rotting` whose rewards also shrink with training time
  (a level falling from 1 to 0.05), OPTIMA's situation: rested and restless.
- `fifteen_arms`: 15 arms, the subsets of 4 modules, at OPTIMA's scale (what
  the warm-up costs with many arms).
- `piecewise_bernoulli`: 3 Bernoulli arms, 4 changes, 5,000 rounds (the
  standard piecewise-stationary problem; `--rounds 300` for a short run).
- Plugins add their own (`optima_register_bandit_environments`, docs/plugins.md).
- `replay`: the per-round rewards of every fixed arm recorded on real quickstart
  distillation runs (`optima/bandit_data/quickstart_fixed_arms.json`, made by
  `bench/record_arm_rewards.py`): each arm's mean is its recorded curve smoothed
  over 5 rounds (averaged over the recorded seeds), its noise the recorded
  residuals' sd; 7 arms over the quickstart's rounds. A replay assumes an
  arm's curve would not change had other arms been played in between.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import gin
import numpy as np

from optima.arms import build_policy
from optima.errors import ConfigError

DATA_DIR = Path(__file__).resolve().parent / "bandit_data"
REPLAY_FILE = DATA_DIR / "quickstart_fixed_arms.json"


@dataclass
class Environment:
    """Rewards of every arm at every round for `seeds` runs."""

    name: str
    means: np.ndarray  # (seeds, rounds, arms) expected rewards
    rewards: np.ndarray  # (seeds, rounds, arms) what each arm pays if played
    #: (arms, groups) 0/1: which groups (e.g. modules) each arm contains, when arms
    #: have that structure (for policies that take `arm_features`); None otherwise
    features: np.ndarray | None = None
    labels: list[str] = field(default_factory=list)
    #: True: arms change with their own plays, not with time ("rested"): `means[s, n, k]`
    #: and `rewards[s, n, k]` are what arm `k` pays at its `(n + 1)`-th play
    rested: bool = False
    #: rested only: (seeds, rounds) non-increasing factors by which every reward of
    #: round t is multiplied (rewards that also shrink with training time); None: 1
    level: np.ndarray | None = None

    @property
    def seeds(self) -> int:
        return self.means.shape[0]

    @property
    def rounds(self) -> int:
        return self.means.shape[1]

    @property
    def num_arms(self) -> int:
        return self.means.shape[2]

    def best(self) -> np.ndarray:
        """(seeds, rounds) what the best policy expects to earn each round: the best
        arm's mean; for a rested environment, the oracle that plays the best arm
        at its current play count, which (arms only decaying with their plays,
        rotting) earns the `rounds` largest means over all arms and play counts,
        in decreasing order (Levine et al. 2017), times `level` when there is one."""
        if not self.rested:
            return self.means.max(axis=2)
        flat = -np.sort(-self.means.reshape(self.seeds, -1), axis=1)[:, :self.rounds]
        # with a non-increasing level the largest values go to the earliest rounds (rearrangement inequality)
        return flat if self.level is None else flat * self.level


def _noisy(name: str, means: np.ndarray, sd: float | np.ndarray, rng: np.random.Generator, clip: bool = False,
           **extra) -> Environment:
    rewards = means + rng.standard_normal(means.shape) * sd
    if clip:  # OPTIMA's rewards are decrements clipped at 0
        rewards = np.maximum(rewards, 0.0)
        # the expected reward of a clipped Gaussian, so that regret is about what arms pay
        sd_arr = np.broadcast_to(sd, means.shape)
        z = means / sd_arr
        phi = np.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + _erf(z / math.sqrt(2)))
        means = means * cdf + sd_arr * phi
    return Environment(name, means, rewards, **extra)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[float])(x)


def _piecewise(rounds: int, phases: Sequence[tuple[float, Sequence[float]]]) -> np.ndarray:
    """(rounds, arms) means from `(start fraction, means)` phases."""
    out = np.empty((rounds, len(phases[0][1])))
    starts = [int(round(f * rounds)) for f, _ in phases] + [rounds]
    for (_, values), a, b in zip(phases, starts, starts[1:]):
        out[a:b] = values
    return out


def abrupt(seeds: int, rounds: int | None, rng: np.random.Generator) -> Environment:
    rounds = rounds or 1000
    means = _piecewise(rounds, [(0.0, [0.6, 0.4, 0.3]), (0.25, [0.3, 0.6, 0.4]), (0.5, [0.4, 0.3, 0.6]),
                                (0.75, [0.6, 0.4, 0.3])])
    return _noisy("abrupt", np.broadcast_to(means, (seeds, *means.shape)).copy(), 0.1, rng)


def drift(seeds: int, rounds: int | None, rng: np.random.Generator) -> Environment:
    rounds = rounds or 1000
    t = np.arange(rounds)[:, None]
    phase = 2 * math.pi * np.arange(5)[None, :] / 5
    means = 0.5 + 0.2 * np.sin(2 * math.pi * t / 500 + phase)
    return _noisy("drift", np.broadcast_to(means, (seeds, *means.shape)).copy(), 0.1, rng)


def idle_recovers(seeds: int, rounds: int | None, rng: np.random.Generator) -> Environment:
    rounds = rounds or 1000
    means = _piecewise(rounds, [(0.0, [0.6, 0.5, 0.3]), (0.3, [0.2, 0.5, 0.3]), (0.6, [0.7, 0.5, 0.3])])
    return _noisy("idle_recovers", np.broadcast_to(means, (seeds, *means.shape)).copy(), 0.1, rng)


#: Arms of `optima_scale` and `replay`: the non-empty subsets of CoCa's modules,
#: in `ArmSpace` order.
MODULES = ("image", "text", "multimodal")
SUBSETS = [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


def _subset_features() -> np.ndarray:
    features = np.zeros((len(SUBSETS), len(MODULES)))
    for k, subset in enumerate(SUBSETS):
        features[k, list(subset)] = 1.0
    return features


def _subset_labels() -> list[str]:
    return ["+".join(MODULES[i] for i in subset) for subset in SUBSETS]


def optima_scale(seeds: int, rounds: int | None, rng: np.random.Generator) -> Environment:
    rounds = rounds or 500
    t = np.arange(rounds)[:, None]
    level = 0.005 + 0.095 * np.exp(-t / (0.2 * rounds))  # 0.1 -> ~0.005: losses converge
    # each arm's advantage, as a fraction of the level: arm 4 best, then from 40% of
    # the run arm 1 (a module whose turn comes later)
    early = np.array([0.2, 0.1, 0.25, 0.35, 0.6, 0.3, 0.5])
    late = np.array([0.2, 0.65, 0.25, 0.35, 0.3, 0.3, 0.5])
    shape = np.where(t < int(0.4 * rounds), early, late)
    means = level * (0.5 + shape)
    return _noisy("optima_scale", np.broadcast_to(means, (seeds, *means.shape)).copy(), 0.5 * level, rng, clip=True,
                  features=_subset_features(), labels=_subset_labels())


def load_replay(path: Path | str = REPLAY_FILE) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(rounds, arms) smoothed mean curves, (arms,) residual sds, arm labels, from
    recorded fixed-arm runs (the first round of a run has no reward and is dropped).
    A file that is missing, not JSON, or not such a recording raises a one-line
    `ConfigError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no recorded rewards; make them with bench/record_arm_rewards.py")
    remedy = "remake it with bench/record_arm_rewards.py (or restore it from git)"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON reward recording ({str(e).splitlines()[0]}); {remedy}") from None
    try:
        labels = [str(a) for a in record["arms"]]
        curves: dict[int, list[list[float]]] = {}
        for run in record["runs"]:
            rewards = [float(r) for r in run["rewards"] if r is not None]
            if not all(math.isfinite(r) for r in rewards):
                raise ValueError("a reward is not finite")
            curves.setdefault(int(run["arm"]), []).append(rewards)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise ConfigError(f"{path}: not a reward recording of fixed-arm runs ({what}: it needs 'arms' and "
                          f"'runs', each run with 'arm' and 'rewards'); {remedy}") from None
    if not labels or sorted(curves) != list(range(len(labels))):
        raise ConfigError(f"{path}: recordings cover arms {sorted(curves)}, not all {len(labels)} arms; {remedy}")
    rounds = min(len(c) for runs in curves.values() for c in runs)
    if rounds < 1:
        raise ConfigError(f"{path}: a recorded run has no reward; {remedy}")
    means, sds = np.empty((rounds, len(labels))), np.empty(len(labels))
    kernel = np.ones(5) / 5
    for arm, runs in curves.items():
        raw = np.array([c[:rounds] for c in runs])  # (recorded seeds, rounds)
        padded = np.pad(raw.mean(axis=0), 2, mode="edge")
        means[:, arm] = np.convolve(padded, kernel, mode="valid")
        sds[arm] = float(np.sqrt(np.mean((raw - means[None, :, arm]) ** 2)))
    return means, sds, labels


def replay(seeds: int, rounds: int | None, rng: np.random.Generator, path: str | None = None) -> Environment:
    """`path`: a recording of your own (`bench/record_arm_rewards.py`); the
    quickstart's by default (`replay_environment.path = 'rewards.json'`)."""
    means, sds, labels = load_replay(REPLAY_FILE if path is None else path)
    if rounds is not None and rounds < means.shape[0]:
        means = means[:rounds]
    features = _subset_features() if labels == _subset_labels() else None
    return _noisy("replay", np.broadcast_to(means, (seeds, *means.shape)).copy(), sds[None, None, :], rng,
                  clip=True, features=features, labels=labels)


def rested_rotting(seeds: int, rounds: int | None, rng: np.random.Generator) -> Environment:
    """5 arms whose rewards shrink with their own plays (rested rotting: OPTIMA's
    reward, a loss decrement, shrinks for the arm played most), at OPTIMA's
    scale: arm `k` pays `start_k / (1 + n / tau_k)` in expectation at its
    `(n+1)`-th play (start 0.1 to 0.04, the better arms rotting faster: tau 20,
    50, 100, 200 plays, the last arm never), noise sd 0.02, clipped at 0 as the
    real reward is; default 500 rounds. The best policy moves between arms as
    they rot; regret is against the oracle that plays the best arm at its
    current play count."""
    rounds = rounds or 500
    start = np.array([0.10, 0.085, 0.07, 0.055, 0.04])
    tau = np.array([20.0, 50.0, 100.0, 200.0, 1e9])
    n = np.arange(rounds)[:, None]
    means = start / (1.0 + n / tau)
    return _noisy("rested_rotting", np.broadcast_to(means, (seeds, *means.shape)).copy(), 0.02, rng, clip=True,
                  rested=True)


def rotting(seeds: int, rounds: int | None, rng: np.random.Generator) -> Environment:
    """`rested_rotting` whose rewards also shrink with training time, as OPTIMA's
    do: every reward of round `t` is multiplied by a level falling from 1 to
    0.05 as `optima_scale`'s (0.1 to 0.005 there), so an arm measured early looks better than one
    measured late. What the paper's policy meets in distillation: an idle arm
    keeps its early, high estimate while the played arm's falls."""
    env = rested_rotting(seeds, rounds, rng)
    t = np.arange(env.rounds)
    level = 0.05 + 0.95 * np.exp(-t / (0.2 * env.rounds))
    return Environment("rotting", env.means, env.rewards, rested=True,
                       level=np.broadcast_to(level, (seeds, env.rounds)).copy())


#: Modules of `fifteen_arms`: CoCa's and one more, as the example audio plugin's model.
MODULES4 = ("image", "text", "multimodal", "audio")


def fifteen_arms(seeds: int, rounds: int | None, rng: np.random.Generator) -> Environment:
    """15 arms, the non-empty subsets of 4 modules (`examples/optima-audio`'s
    model), at OPTIMA's scale as `optima_scale` (level 0.1 to 0.005, noise sd
    half the level, clipped at 0): an arm's advantage is the sum of its modules'
    effects (image 0.25, text 0.05, multimodal 0.15, audio 0.1 of the level) less
    0.08 per pair of modules (they compete for the student), so image+multimodal
    is best and the all-modules arm is not; default 200 rounds."""
    import itertools

    rounds = rounds or 200
    effects = np.array([0.25, 0.05, 0.15, 0.1])
    subsets = [c for k in range(1, 5) for c in itertools.combinations(range(4), k)]
    shape = np.array([effects[list(c)].sum() - 0.08 * len(c) * (len(c) - 1) / 2 for c in subsets])
    t = np.arange(rounds)[:, None]
    level = 0.005 + 0.095 * np.exp(-t / (0.2 * rounds))
    means = level * (0.5 + shape)
    features = np.zeros((len(subsets), 4))
    for k, c in enumerate(subsets):
        features[k, list(c)] = 1.0
    labels = ["+".join(MODULES4[i] for i in c) for c in subsets]
    return _noisy("fifteen_arms", np.broadcast_to(means, (seeds, *means.shape)).copy(), 0.5 * level, rng,
                  clip=True, features=features, labels=labels)


def piecewise_bernoulli(seeds: int, rounds: int | None, rng: np.random.Generator) -> Environment:
    """3 Bernoulli arms (rewards 0 or 1), 4 changes at 20/40/60/80% of the run,
    each of which changes the best arm, twice to an arm that recovered while
    idle; 5,000 rounds by default (the standard piecewise-stationary problem
    of Besson et al. 2022 and Cao et al. 2019 has this size)."""
    rounds = rounds or 5000
    means = _piecewise(rounds, [(0.0, [0.2, 0.5, 0.8]), (0.2, [0.2, 0.5, 0.3]), (0.4, [0.7, 0.5, 0.3]),
                                (0.6, [0.7, 0.5, 0.9]), (0.8, [0.1, 0.6, 0.4])])
    means = np.broadcast_to(means, (seeds, *means.shape)).copy()
    rewards = (rng.random(means.shape) < means).astype(float)
    return Environment("piecewise_bernoulli", means, rewards)


#: The built-in environments: name -> factory(seeds, rounds or None for its
#: default, numpy generator) -> `Environment`. `plugins/builtin.py` registers
#: them through the `optima_register_bandit_environments` hook, as a plugin
#: registers its own; `optima bandit` takes them from the registry.
ENVIRONMENTS: dict[str, Callable[[int, int | None, np.random.Generator], Environment]] = {
    "abrupt": abrupt, "drift": drift, "idle_recovers": idle_recovers, "optima_scale": optima_scale,
    "replay": replay, "rested_rotting": rested_rotting, "rotting": rotting, "fifteen_arms": fifteen_arms,
    "piecewise_bernoulli": piecewise_bernoulli,
}


#: What `optima bandit` compares when `bandit.environments` is not bound: all but
#: the long `piecewise_bernoulli` (run it by name: `optima bandit -e piecewise_bernoulli`).
DEFAULT_ENVIRONMENTS = tuple(name for name in ENVIRONMENTS if name != "piecewise_bernoulli")


def make_environment(name: str, seeds: int, rounds: int | None = None, seed: int = 0,
                     factories: Mapping[str, Callable] | None = None) -> Environment:
    """Environment `name` of `factories` (the built-in `ENVIRONMENTS` by default;
    `optima bandit` passes the registry's, plugins' included) for `seeds` runs.
    A factory must return an `Environment` of `seeds` runs with finite rewards."""
    factories = ENVIRONMENTS if factories is None else factories
    if name not in factories:
        raise ConfigError(f"unknown environment {name!r}; choose from {', '.join(factories)}")
    # one generator per environment name, so adding an environment changes no other
    rng = np.random.default_rng([seed, *name.encode()])
    env = factories[name](seeds, rounds, rng)
    _check_environment(name, env, seeds, rounds)
    return env


def _check_environment(name: str, env: Environment, seeds: int, rounds: int | None) -> None:
    """A plugin's environment is checked before any policy runs on it (one line)."""
    if not isinstance(env, Environment):
        raise ConfigError(f"environment {name!r} returned {type(env).__name__}, not an optima.bandit.Environment")
    means, rewards = np.asarray(env.means), np.asarray(env.rewards)
    if means.ndim != 3 or means.shape != rewards.shape or means.shape[0] != seeds or 0 in means.shape:
        raise ConfigError(f"environment {name!r}: means and rewards must both have shape (seeds={seeds}, rounds, "
                          f"arms), got {means.shape} and {rewards.shape}")
    if rounds is not None and means.shape[1] > rounds:
        raise ConfigError(f"environment {name!r} has {means.shape[1]} rounds, more than the {rounds} asked")
    if not (np.isfinite(means).all() and np.isfinite(rewards).all()):
        raise ConfigError(f"environment {name!r}: its means or rewards are not all finite")
    if env.features is not None and np.asarray(env.features).shape[0] != means.shape[2]:
        raise ConfigError(f"environment {name!r}: features need one row per arm ({means.shape[2]})")


def simulate(factory: Callable, env: Environment) -> np.ndarray:
    """(seeds, rounds) regret of the policy `factory` makes, one run per seed."""
    regret = np.empty((env.seeds, env.rounds))
    best = env.best()
    for s in range(env.seeds):
        # arm_features and the number of rounds where the policy takes them
        policy = build_policy(factory, env.num_arms, s, env.features, horizon=env.rounds)
        rewards, means = env.rewards[s].tolist(), env.means[s]
        level = [1.0] * env.rounds if env.level is None else env.level[s].tolist()
        plays = [0] * env.num_arms
        rows, arms = [], []
        for t in range(env.rounds):
            arm = int(policy.select())
            row = plays[arm] if env.rested else t  # a rested arm pays by its own play count
            plays[arm] += 1
            try:
                policy.update(arm, level[t] * rewards[row][arm])
            except ValueError as e:  # e.g. a binary-reward policy given a reward outside [0, 1]
                raise ConfigError(f"environment {env.name!r}, seed {s}, round {t}: the policy refuses its "
                                  f"reward: {str(e).splitlines()[0]}") from None
            rows.append(row)
            arms.append(arm)
        regret[s] = best[s] - np.asarray(level) * means[rows, arms]
    return regret


@dataclass
class Result:
    policy: str
    environment: str
    final: list[float]  # total regret per seed
    curve: list[float]  # mean cumulative regret per round
    curve_se: list[float]  # its standard error over seeds
    cpu_seconds: float  # CPU time of the simulation (what it takes on an idle core)

    @property
    def mean(self) -> float:
        return float(np.mean(self.final))

    @property
    def std(self) -> float:
        return float(np.std(self.final, ddof=1)) if len(self.final) > 1 else 0.0


def run_one(label: str, factory: Callable, env: Environment) -> Result:
    start = time.process_time()
    regret = simulate(factory, env)
    cumulative = regret.cumsum(axis=1)
    se = cumulative.std(axis=0, ddof=1) / math.sqrt(env.seeds) if env.seeds > 1 else np.zeros(env.rounds)
    return Result(label, env.name, cumulative[:, -1].tolist(), cumulative.mean(axis=0).tolist(), se.tolist(),
                  time.process_time() - start)


# Work shared with forked worker processes (set before the pool starts).
_JOBS: dict[str, object] = {}


def _work(task: tuple[str, str]) -> Result:
    import torch

    torch.set_num_threads(1)
    label, env_name = task
    try:
        return run_one(label, _JOBS["policies"][label], _JOBS["environments"][env_name])
    except ConfigError as e:
        raise ConfigError(f"policy {label!r}: {e}") from None


def benchmark(policies: Mapping[str, Callable], environments: Mapping[str, Environment],
              jobs: int = 1) -> list[Result]:
    """Every policy on every environment; `jobs` worker processes (fork) share the work."""
    tasks = [(p, e) for e in environments for p in policies]
    _JOBS.update(policies=dict(policies), environments=dict(environments))
    try:
        if jobs > 1 and len(tasks) > 1 and "fork" in _start_methods():
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # longest first: the tasks' lengths differ by environment
            order = sorted(tasks, key=lambda t: -environments[t[1]].rounds)
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
                done = dict(zip(order, pool.map(_work, order)))
            return [done[t] for t in tasks]
        return [_work(t) for t in tasks]
    finally:
        _JOBS.clear()


def _start_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()


@gin.configurable("bandit")
def settings(policies: Sequence[Callable] = gin.REQUIRED, environments: Sequence[str] = DEFAULT_ENVIRONMENTS,
             seeds: int = 40, rounds: int | None = None, seed: int = 0) -> dict[str, object]:
    """What `optima bandit` compares (`gin/bandit/default.gin`): `policies` (gin references,
    e.g. `[@optima_policy, @auto/optima_policy]`), `environments` (names of
    registered environments: `ENVIRONMENTS` and plugins'), `seeds` runs each, `rounds` (None: each environment's
    default), `seed` of the environments' rewards."""
    return {"policies": list(policies), "environments": list(environments), "seeds": seeds, "rounds": rounds,
            "seed": seed}


def policy_labels() -> list[str]:
    """The labels of `bandit.policies` as written: `optima`, `auto/optima`, ..."""
    refs = gin.get_bindings("bandit", resolve_references=False).get("policies", [])
    labels = []
    for ref in refs:
        name = getattr(ref, "scoped_selector", None)
        if name is None:
            raise ConfigError(f"bandit.policies must list policies as gin references (@name_policy), got {ref!r}")
        labels.append(name.removesuffix("_policy"))
    return labels


# --- reporting ---------------------------------------------------------------------------

def regret_figure(results: Sequence[Result], environments: Mapping[str, Environment]):
    """Mean cumulative regret per round, one panel per environment, a line per
    policy, shaded +- one standard error over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(environments)
    policies = list(dict.fromkeys(r.policy for r in results))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    styles = ["-", "--", ":"]
    for ax, name in zip(axes.flat, names):
        env = environments[name]
        for i, policy in enumerate(policies):
            r = next((r for r in results if r.policy == policy and r.environment == name), None)
            if r is None:
                continue
            x = np.arange(1, len(r.curve) + 1)
            y, se = np.array(r.curve), np.array(r.curve_se)
            color = colors(i % 10)
            ax.plot(x, y, color=color, ls=styles[(i // 10) % 3], label=policy, lw=1.4)
            ax.fill_between(x, y - se, y + se, color=color, alpha=0.2, lw=0)
        ax.set_title(f"{name} ({env.num_arms} arms, {env.seeds} seeds)")
        ax.set_xlabel("round")
        ax.set_ylabel("cumulative regret (reward units)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 5),
               frameon=False, title="policy (line: mean over seeds; band: ± 1 standard error)")
    return fig


def table_markdown(results: Sequence[Result], environments: Sequence[str]) -> str:
    """Regret mean +- std per policy (rows) and environment (columns); the best
    mean of each column in bold."""
    policies = list(dict.fromkeys(r.policy for r in results))
    cell = {(r.policy, r.environment): r for r in results}
    best = {e: min(cell[p, e].mean for p in policies if (p, e) in cell) for e in environments}
    lines = ["| policy | " + " | ".join(environments) + " |", "|---|" + "---:|" * len(environments)]
    for p in policies:
        cells = []
        for e in environments:
            r = cell.get((p, e))
            text = "-" if r is None else f"{r.mean:.3g} ± {r.std:.2g}"
            cells.append(f"**{text}**" if r is not None and r.mean == best[e] else text)
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, results: Sequence[Result], environments: Mapping[str, Environment],
                  meta: Mapping[str, object]) -> dict[str, Path]:
    """`results.json`, `table.md` and `regret.png` in `out`."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "table.md", "figure": out / "regret.png"}
    data = {**meta, "environments": {n: {"arms": e.num_arms, "rounds": e.rounds, "seeds": e.seeds}
                                     for n, e in environments.items()},
            "results": [{"policy": r.policy, "environment": r.environment, "mean": r.mean, "std": r.std,
                         "final": r.final, "cpu_seconds": r.cpu_seconds} for r in results]}
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    paths["table"].write_text(table_markdown(results, list(environments)) + "\n")
    fig = regret_figure(results, environments)
    fig.savefig(paths["figure"], dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def default_out_dir() -> str:
    return os.path.join("runs", f"bandit-{time.strftime('%Y%m%d-%H%M%S')}")
