"""Rewards beyond the paper's loss decrement (docs/method.md, "Rewards that see the task").

- `heldout_task_reward`: the relative decrement of the student's *task* loss on
  fixed held-out batches (the task's `val` split, never trained on), measured
  before and after the round. Signed: a round that made the held-out loss worse
  earns less than one that changed nothing, so an arm that hurts the task is
  seen as such (the paper's clipped decrement gives both 0).
- `heldout_gain_reward`: 1 if the held-out task loss did not get worse over the
  round, else 0 (AutoSeM, Guo et al. 2019); scale-free, for a Beta-Bernoulli policy.
- `alignment_reward`: how well the played arm's distillation agrees with the
  task on the same batches: the cosine between the gradients of the step's
  distillation terms and of the task loss, averaged over the round's steps
  (Du et al. 2018), mapped from [-1, 1] to [0, 1]. No held-out data, no
  comparison across rounds; two extra backward passes per step.
- `advantage_reward`: any reward relative to what every arm has been earning
  lately, so that arms measured at different points of training compare
  fairly (loss decrements shrink as training goes on; an idle arm would keep its
  early, high estimate).

Every value lies in [0, 1], as the engine requires.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from optima.errors import ConfigError
from optima.interfaces import Reward, RoundLosses

#: Held-out batches measured before and after each round (each costs a forward of
#: teacher and student, no backward): 4 batches of the distillation's batch size.
HELDOUT_BATCHES = 4


def _task_loss(losses: RoundLosses, which: str) -> float:
    try:
        value = float(losses["task"])
    except KeyError:
        raise ValueError(f"the {which} held-out losses lack the task loss (have {sorted(losses)})") from None
    if not math.isfinite(value):
        raise ValueError(f"non-finite held-out task loss {value} in the {which} round")
    return value


class HeldOutTaskReward(Reward):
    """`clip(0.5 + 0.5 * (L^{t-1} - L^t) / L^{t-1}, 0, 1)` of the held-out task loss
    `L` (`binary=False`), or `1 if L^t <= L^{t-1} else 0` (`binary=True`).
    `batches` held-out batches of `split` are measured before and after every round."""

    terms = ("task",)

    def __init__(self, batches: int = HELDOUT_BATCHES, split: str = "val", binary: bool = False):
        name = "heldout_gain_reward" if binary else "heldout_task_reward"
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ConfigError(f"{name}.batches must be an integer >= 1, got {batches!r}")
        if split == "test":
            raise ConfigError(f"{name}.split = 'test': a reward must never see the test split; use 'val'")
        self.probe = (str(split), batches)
        self.binary = bool(binary)

    def __call__(self, previous: RoundLosses, current: RoundLosses) -> float:
        before, after = _task_loss(previous, "previous"), _task_loss(current, "current")
        if self.binary:
            return 1.0 if after <= before else 0.0
        if before <= 0.0:
            return 0.5
        return min(1.0, max(0.0, 0.5 + 0.5 * (before - after) / before))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(probe={self.probe!r}, binary={self.binary})"


class AlignmentReward(Reward):
    """`(1 + mean cosine) / 2` over the round's steps (`Distiller._alignment`)."""

    terms = ("align",)

    def __call__(self, previous: RoundLosses, current: RoundLosses) -> float:
        try:
            total = float(current["align"])
        except KeyError:
            raise ValueError(f"the round's losses lack the gradient alignment (have {sorted(current)})") from None
        if not math.isfinite(total) or current.steps < 1:
            raise ValueError(f"gradient alignment {total} over {current.steps} step(s) is no mean")
        return min(1.0, max(0.0, 0.5 + 0.5 * total / current.steps))


class AdvantageReward(Reward):
    """`base`'s reward relative to a running mean `b` of every arm's recent base
    rewards: `clip(0.5 + 0.5 * (r - b) / b, 0, 1)` (0.5: as good as any arm was
    lately). `b` is an exponential moving average with a half-life of `halflife`
    rounds over all rounds, whatever arm was played; it starts at the first
    reward. Rewards shrink multiplicatively as training goes on, so the ratio, not
    the difference, removes that trend."""

    def __init__(self, base: Reward, halflife: float = 10.0):
        if not isinstance(base, Reward):
            raise ConfigError(f"advantage_reward.base must be a reward bound called (e.g. @combined_reward()), "
                              f"got {base!r}")
        if isinstance(halflife, bool) or not isinstance(halflife, (int, float)) or not halflife > 0:
            raise ConfigError(f"advantage_reward.halflife must be a number of rounds > 0, got {halflife!r}")
        self.base, self.halflife = base, float(halflife)
        self.terms, self.probe = base.terms, getattr(base, "probe", None)
        self.decay = 0.5 ** (1.0 / self.halflife)
        self.baseline: float | None = None

    def __call__(self, previous: RoundLosses, current: RoundLosses) -> float:
        raw = float(self.base(previous, current))
        b = self.baseline
        self.baseline = raw if b is None else self.decay * b + (1.0 - self.decay) * raw
        if b is None:
            return 0.5
        if b <= 0.0:
            return 0.5 if raw <= 0.0 else 1.0
        return min(1.0, max(0.0, 0.5 + 0.5 * (raw - b) / b))

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "base": self.base.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        baseline = state.get("baseline")
        self.baseline = None if baseline is None else float(baseline)
        self.base.load_state_dict(state.get("base", {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base!r}, halflife={self.halflife})"


def heldout_task_reward(batches: int = HELDOUT_BATCHES, split: str = "val") -> HeldOutTaskReward:
    """Signed relative decrement of the held-out task loss over the round."""
    return HeldOutTaskReward(batches, split)


def heldout_gain_reward(batches: int = HELDOUT_BATCHES, split: str = "val") -> HeldOutTaskReward:
    """1 if the held-out task loss did not get worse over the round, else 0 (AutoSeM)."""
    return HeldOutTaskReward(batches, split, binary=True)


def alignment_reward() -> AlignmentReward:
    """Cosine between the arm's distillation gradient and the task gradient, round mean."""
    return AlignmentReward()


def advantage_reward(base: Reward, halflife: float = 10.0) -> AdvantageReward:
    """`base`'s reward relative to every arm's recent rewards (no training-time trend)."""
    return AdvantageReward(base, halflife)
