"""The training loops: task fine-tuning, evaluation and OPTIMA distillation.

`Distiller.play_round` is the method in one place: the policy picks an arm, the
student is distilled on that arm's layers for `T` steps, the round's losses
(`RoundLosses`: whole model, per module, the played arm) give the reward, the
policy learns from it.

Both loops (`Finetuner`, `Distiller`) can be saved and restored at any step
(`state_dict`), and check every loss for NaN and inf before the optimizer step.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from optima import distributed
from optima.arms import ArmSpace
from optima.checkpoint import CheckpointError, check_same_layout
from optima.data import BatchStream, SkippedRecords, eval_batches  # BatchStream: the loops take one
from optima.errors import ConfigError, OptimaError
from optima.interfaces import (Batch, Capture, DistillableModel, Head, Loss, Policy, Reward, RoundLosses, StepLosses,
                               Task, batch_rows)
from optima.taps import Recorder


class Network(nn.Module):
    """A model and its task head: `batch -> logits`.

    A batch with several images per example (`image` of shape `(B, n, 3, H, W)`,
    e.g. NLVR2's pairs) runs as one forward of `B * n` (image, text) pairs, so the
    recorder sees every layer once; the head receives `(B * n, L, D)` features.
    """

    def __init__(self, model: DistillableModel, head: Head):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, batch: Batch) -> torch.Tensor:
        images = batch.get("image")  # audio- or video-only tasks may have none
        if images is not None and images.dim() == 5:
            n = images.shape[1]
            batch = {**batch, "image": images.flatten(0, 1), "text": batch["text"].repeat_interleave(n, 0)}
        return self.head(self.model(batch))


def compiled(module: nn.Module, how: bool | str) -> nn.Module:
    """`module` under `torch.compile` when `how` is True (inductor) or names a
    backend (e.g. 'aot_eager'); `module` itself when False. The recorders' hooks
    are traced with it; the first steps pay the compilation."""
    if how is False:
        return module
    return torch.compile(module, **({} if how is True else {"backend": how}))


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def teacher_copy(teacher: Network, dtype: torch.dtype | None) -> Network:
    """`teacher` itself, or a frozen copy of it in `dtype` (a frozen network needs no
    float32 master weights: a bf16 copy halves its reads and skips autocast's
    casts). A copy leaves `teacher` as it was: the caller may evaluate or save it."""
    if dtype is None or dtype == _dtype_of(teacher):
        return teacher
    return copy.deepcopy(teacher).to(dtype).eval().requires_grad_(False)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs when asked; full precision otherwise."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(network: Network, task: Task, split: str, batch_size: int, device: torch.device,
             amp: bool = False, skipped: SkippedRecords | None = None, workers: int = 0,
             predictions: list[dict[str, Any]] | None = None,
             on_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """`task.evaluate` over `split`, in order (`workers` DataLoader processes make
    the batches of a task with a `batch_source`). Examples the task left out go to
    `skipped`; a split without any example is a `ConfigError` (no metric of
    nothing). With a `predictions` list (and a task with a `predictions_file`),
    the task's per-example records in its official format are appended to it in
    the same pass; `on_batch()` runs after each batch (a progress bar)."""
    skipped = SkippedRecords() if skipped is None else skipped
    rows = 0

    def batches():
        nonlocal rows
        for batch in eval_batches(task, split, batch_size, device, workers):
            batch = skipped.take(batch)
            n = batch_rows(batch)
            rows += n
            if n:
                yield batch
            if on_batch is not None:
                on_batch()

    was_training = network.training
    network.eval()
    with autocast(device, amp):
        if predictions is not None and task.predictions_file:
            metrics = task.evaluate(network, batches(), predictions=predictions)
        else:
            metrics = task.evaluate(network, batches())
    network.train(was_training)
    if rows == 0:
        raise ConfigError(f"the {split} split of {type(task).__name__} has no usable examples to evaluate on"
                          f"{skipped.why_none()}")
    return metrics


#: What a loop does with a step whose loss (or gradient norm) is NaN or inf.
NONFINITE_ACTIONS = ("skip", "stop")


class NonFiniteLossError(OptimaError):
    """A loss was NaN or inf and the stage was set to stop (`on_nonfinite = 'stop'`).
    Raised before the optimizer step, so no weight saw the bad value; checkpoints
    already written are intact and the run can be resumed (e.g. set to 'skip')."""

    exit_code = 1
    resumable = True

    def __init__(self, message: str, binding: str):
        super().__init__(message)
        self.resume_bindings = [f"{binding} = 'skip'"]


class Callback(Protocol):
    """What the loops report to (e.g. `optima.reporting.Reporter`). `on_nonfinite`
    and `on_message` are optional.

    `on_step`'s `losses` say what they hold by their keys: `total/<term>`, the
    whole model's value (the teacher's `total/task`; a student's `task`, `kd`,
    and `hidden`/`attn` when the reward reads them), and `arm/<term>`, the played
    arm's layers (a student's `hidden`, `attn`). Empty for a skipped step."""

    def on_step(self, stage: str, step: int, losses: dict[str, float], lr: float) -> None: ...
    def on_round(self, stage: str, result: "RoundResult") -> None: ...


def first_nonfinite(values: Mapping[str, float]) -> tuple[str, float] | None:
    """The first `(name, value)` that is NaN or inf, or None."""
    for name, value in values.items():
        value = float(value)
        if not math.isfinite(value):
            return name, value
    return None


def _check_action(action: str, binding: str) -> str:
    if action not in NONFINITE_ACTIONS:
        raise ConfigError(f"{binding} = {action!r} must be one of {', '.join(map(repr, NONFINITE_ACTIONS))}")
    return action


class _Loop:
    """What the fine-tuning and distillation loops share: the optimizer step
    guarded against non-finite values, callbacks, and the step counter."""

    name: str
    binding: str  # e.g. "distillation.on_nonfinite", for messages
    on_nonfinite: str
    optimizer: torch.optim.Optimizer
    scheduler: Any
    grad_clip: float | None
    callbacks: list
    step: int
    skipped: int

    def _where(self) -> str:
        return f"step {self.step + 1}"

    def _optimizer_step(self, objective: torch.Tensor, values: Mapping[str, torch.Tensor | float],
                        share: float = 1.0) -> dict[str, float] | None:
        """Back-propagate `objective` and step, unless a value, the objective or
        (with `grad_clip`) the gradient norm is non-finite: then skip the step
        (counted, reported; its batch and its place in the lr schedule are used
        up) or raise `NonFiniteLossError` naming the step and the term. Returns
        `values` as floats if the weights were updated, else None; `self.step`
        counts the step either way.

        One host sync per step: the values (0-dim tensors or floats), the
        objective and the gradient norm are read back together, after the
        backward pass (a non-finite step's gradients are dropped unused). In a
        run of several processes this process's objective is weighted by its
        `share` of the batch, so that the averaged gradients are the whole
        batch's, and the values are summed over processes weighted alike (one
        all-reduce): every process sees the same numbers and decides alike."""
        world = distributed.world_size()
        self.optimizer.zero_grad(set_to_none=True)
        (objective * (share * world) if world > 1 else objective).backward()
        self._reduce_gradients()
        names = [*values, "objective"]
        checked = torch.stack([torch.as_tensor(v).detach().to(objective.device, torch.float32).reshape(())
                               for v in [*values.values(), objective]])
        if world > 1:
            checked = distributed.all_reduce_sum(checked * share)
        if self.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = nn.utils.clip_grad_norm_(params, self.grad_clip)  # gradients are averaged: equal on every rank
            checked = torch.cat([checked, norm.detach().to(checked.device, torch.float32).reshape(1)])
            names.append("grad_norm")
        read = dict(zip(names, checked.tolist()))
        bad = first_nonfinite(read)
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            term, value = bad
            if self.on_nonfinite == "stop":
                what = "gradient norm" if term == "grad_norm" else "loss"
                raise NonFiniteLossError(
                    f"{self.name}: non-finite {what} at {self._where()}: {term} = {value}; stopped before the "
                    f"optimizer step ({self.binding} = 'stop'; 'skip' skips such steps)", self.binding)
            self.skipped += 1
            self.step += 1
            self.scheduler.step()
            for cb in self.callbacks:
                if hasattr(cb, "on_nonfinite"):
                    cb.on_nonfinite(self.name, self.step, term, value, self.skipped)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {name: read[name] for name in values}

    def _reduce_gradients(self) -> None:
        """Average over processes the gradients that `DistributedDataParallel` does not."""

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _message(self, text: str) -> None:
        for cb in self.callbacks:
            if hasattr(cb, "on_message"):
                cb.on_message(text)


class _Objective(nn.Module):
    """`objective(batch)` as the forward of a module holding `network`'s parameters."""

    def __init__(self, network: nn.Module, objective: Callable[[Batch], Mapping[str, torch.Tensor]]):
        super().__init__()
        self.network, self.objective = network, objective

    def forward(self, batch: Batch) -> Mapping[str, torch.Tensor]:
        return self.objective(batch)


class Finetuner(_Loop):
    """Plain task training (the teacher's fine-tuning) for `steps` steps, resumable:
    `state_dict()` holds the network, optimizer, scheduler, data position and
    counters (the global RNGs are the caller's, see `optima.checkpoint.rng_state`)."""

    def __init__(self, network: nn.Module, task: Task, *, steps: int, batch_size: int,
                 optimizer: torch.optim.Optimizer, scheduler: Any, seed: int, device: torch.device,
                 grad_clip: float | None = 1.0, amp: bool = False, callbacks: Sequence[Any] = (),
                 on_nonfinite: str = "stop", name: str = "teacher", binding: str = "teacher_training.on_nonfinite",
                 workers: int = 0, objective: Callable[[Batch], Mapping[str, torch.Tensor]] | None = None,
                 term_weights: Mapping[str, float] | None = None, compile: bool | str = False):
        """`objective(batch)`: the named loss terms of a step (default: the task loss of
        `network(batch)`, `{"task": ...}`); the step minimises their sum weighted by
        `term_weights` (1 where not given). The pretraining stage passes the model's
        `pretraining_losses`. `compile`: see `compiled`."""
        self.network, self.task, self.steps, self.device, self.amp = network, task, steps, device, amp
        self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, grad_clip
        self.callbacks, self.name, self.binding = list(callbacks), name, binding
        self.on_nonfinite = _check_action(on_nonfinite, binding)
        self.objective = objective or (lambda batch: {"task": self.task.loss(self.network(batch).float(), batch)})
        self.term_weights = dict(term_weights or {})
        self.stream = BatchStream(task, "train", batch_size, seed, device, warn=self._message, workers=workers)
        # the objective as a module's forward, so that DistributedDataParallel (several
        # processes) sees the step and averages the gradients
        self.trained = compiled(distributed.wrap(_Objective(network, self.objective), device), compile)
        self.step = 0
        self.skipped = 0
        self.last_terms: dict[str, float] = {}

    def train_step(self) -> float | None:
        """One step; the (weighted) objective over the whole batch, or None if the
        step was skipped. `last_terms` holds the step's terms, unweighted."""
        batch = next(self.stream)
        with autocast(self.device, self.amp):
            terms = self.trained(batch)
        loss = sum(self.term_weights.get(k, 1.0) * v.float() for k, v in terms.items())
        read = self._optimizer_step(loss, terms, self.stream.share)
        if read is None:
            return None
        self.last_terms = read
        return sum(self.term_weights.get(k, 1.0) * v for k, v in read.items())

    def run(self, after_step: Callable[["Finetuner"], None] | None = None) -> None:
        self.network.train()
        while self.step < self.steps:
            loss = self.train_step()
            for cb in self.callbacks:
                reported = {} if loss is None else {f"total/{k}": v for k, v in self.last_terms.items()}
                cb.on_step(self.name, self.step, reported, self._lr())
            if after_step:
                after_step(self)

    def state_dict(self) -> dict[str, Any]:
        return {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "stream": self.stream.state_dict(),
                "step": self.step, "skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "the checkpoint") -> None:
        check_same_layout(state["network"], self.network.state_dict(), f"{self.name} network", source)
        self.network.load_state_dict(state["network"])
        _load_optimizer(self.optimizer, self.scheduler, state, source)
        self.stream.load_state_dict(state["stream"])
        self.step, self.skipped = int(state["step"]), int(state["skipped"])


def _load_optimizer(optimizer, scheduler, state: Mapping[str, Any], source: str) -> None:
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {source}: its optimizer state does not fit this optimizer "
                              f"({str(e).splitlines()[0]})") from None


def finetune(network: Network, task: Task, *, steps: int, batch_size: int, optimizer: torch.optim.Optimizer,
             scheduler: Any, seed: int, device: torch.device, grad_clip: float | None = 1.0, amp: bool = False,
             on_step: Callable[[int, dict[str, float], float], None] | None = None,
             on_nonfinite: str = "stop") -> None:
    """Plain task training (the teacher's fine-tuning), start to end (see `Finetuner`);
    `on_step(step, losses, lr)` gets the losses as callbacks do (`{"total/task": value}`)."""

    class _OnStep:
        def on_step(self, stage, step, losses, lr):
            if on_step:
                on_step(step, losses, lr)

    Finetuner(network, task, steps=steps, batch_size=batch_size, optimizer=optimizer, scheduler=scheduler,
              seed=seed, device=device, grad_clip=grad_clip, amp=amp, callbacks=[_OnStep()],
              on_nonfinite=on_nonfinite).run()


class RoundAccumulator:
    """Sums per-step losses over one round: whole-model terms and per-module terms.

    `add(terms, per_module)` adds one step's values (floats, or 0-dim tensors);
    `totals()` and `per_module()` are the sums over the steps added since the
    last `reset()` (a term missing from some steps is summed over the steps that
    had it); `steps` counts the `add` calls. Non-finite values are summed as they
    are, so that the reward's guard sees them (the Distiller never adds a skipped
    step's values).
    """

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}
        self._modules: dict[str, dict[str, float]] = {}
        self._steps = 0

    @property
    def steps(self) -> int:
        return self._steps

    def add(self, terms: Mapping[str, float], per_module: Mapping[str, Mapping[str, float]] | None = None) -> None:
        _add_into(self._totals, terms)
        for module, values in (per_module or {}).items():
            _add_into(self._modules.setdefault(module, {}), values)
        self._steps += 1

    def totals(self) -> dict[str, float]:
        return dict(self._totals)

    def per_module(self) -> dict[str, dict[str, float]]:
        return {m: dict(v) for m, v in self._modules.items()}

    def reset(self) -> None:
        self._totals, self._modules = {}, {}
        self._steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self._totals), "per_module": self.per_module(), "steps": self._steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._totals = _floats(state["totals"])
        self._modules = {str(m): _floats(v) for m, v in state.get("per_module", {}).items()}
        self._steps = int(state["steps"])

    def __repr__(self) -> str:
        return f"RoundAccumulator(steps={self._steps}, totals={self._totals!r}, per_module={self._modules!r})"


def _add_into(sums: dict[str, float], values: Mapping[str, float]) -> None:
    for name, value in values.items():
        sums[name] = sums.get(name, 0.0) + float(value)


def _floats(values: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in values.items()}


def read_values(reward: Reward, losses: Mapping[str, float]) -> dict[str, float]:
    """The values of `losses` that `reward` reads, by name: its terms in the
    totals (`kd`) and in each module (`hidden[image]`), for the finiteness checks."""
    values = {t: losses[t] for t in reward.terms if t in losses}
    for module, terms in getattr(losses, "per_module", {}).items():
        values.update({f"{t}[{module}]": terms[t] for t in reward.terms if t in terms})
    return values


def guarded_reward(reward: Reward, previous: Mapping[str, float] | None,
                   current: Mapping[str, float]) -> tuple[float | None, str | None]:
    """The reward of a round, or `(None, why)` when none may reach the policy.

    `previous`, `current`: `RoundLosses` (plain mappings of totals work too).
    `(None, None)` without a previous round; `(None, why)` when a value the
    reward reads is non-finite in `current` (a round's sums can overflow even
    when every step was finite), or when the reward is not a number in [0, 1] (a
    plugin's bug). `previous` is only ever a round whose values were finite. A
    term missing from either round is a programming error: the reward's
    `ValueError` goes up.
    """
    bad = first_nonfinite(read_values(reward, current))
    if bad is not None:
        return None, f"non-finite round loss {bad[0]} = {bad[1]}"
    if previous is None:
        return None, None
    value = float(reward(previous, current))
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        return None, f"{type(reward).__name__} returned {value}, not a number in [0, 1]"
    return value, None


@dataclass
class RoundOutcome:
    losses: RoundLosses  # the round's sums, scaled to T steps when steps were skipped
    reward: float | None  # what the policy gets, if anything
    note: str | None  # why it gets nothing (None in the first round)
    previous: RoundLosses | None  # what the next round compares with


def round_outcome(reward: Reward, previous: RoundLosses | None, losses: RoundAccumulator,
                  steps_per_round: int, arm: Sequence[str] = (), probe: RoundLosses | None = None) -> RoundOutcome:
    """A finished round's losses and reward (what `Distiller` does at a round's end).

    `losses` holds the round's finite steps, played on the modules `arm`; if
    some were skipped, the sums are scaled to `steps_per_round` steps so that
    rounds stay comparable. The reward is `guarded_reward`'s: never NaN, inf or
    outside [0, 1]. The round becomes the next one's `previous` only if the
    values the reward reads are finite; otherwise the next round compares with
    the last good one. With `probe` (the whole model's losses on the fixed probe
    batches after the round, `distillation.reward_probe`), the reward compares
    probes instead: `previous` is then the probe before the round.
    """
    totals, modules, finite_steps = losses.totals(), losses.per_module(), losses.steps
    if 0 < finite_steps < steps_per_round:
        scale = steps_per_round / finite_steps
        totals = {k: v * scale for k, v in totals.items()}
        modules = {m: {k: v * scale for k, v in terms.items()} for m, terms in modules.items()}
    current = RoundLosses(totals, modules, tuple(arm), steps_per_round if finite_steps else 0)
    if finite_steps == 0:
        return RoundOutcome(current, None, "every step was skipped", previous if probe is None else probe)
    measured = current if probe is None else probe
    value, note = guarded_reward(reward, previous, measured)
    usable = first_nonfinite(read_values(reward, measured)) is None
    return RoundOutcome(current, value, note, measured if usable else previous)


@dataclass
class RoundResult:
    round: int  # 1-based
    step: int  # the distillation step at which the round ended (round * T)
    arm: int
    arm_label: str
    reward: float | None  # None in the first round (nothing to compare with) or when withheld (see note)
    losses: RoundLosses  # the round's summed losses: whole model, per module, the played arm's modules
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)  # the policy's
    skipped: int = 0  # steps of the round skipped for non-finite values
    note: str | None = None  # why the policy got no reward, if it got none after the first round
    plays: dict[str, Any] = field(default_factory=dict)  # `play_stats` after this round (engine, any policy)


#: The step value a reward reads to get the gradient alignment measured
#: (`Distiller._alignment`): the cosine between distillation and task gradients.
ALIGN = "align"


#: Plays of the last rounds whose entropy is logged (`plays/entropy`), for every policy.
PLAY_ENTROPY_WINDOW = 20


def play_stats(plays: Sequence[int], num_arms: int, window: int = PLAY_ENTROPY_WINDOW) -> dict[str, Any]:
    """What the engine reports about the arms played so far, whatever the policy:
    `count` (plays per arm, a list) and `entropy` (nats) of the empirical
    distribution of the last `window` plays (0 before any play)."""
    count = [0] * num_arms
    for arm in plays:
        count[arm] += 1
    recent = [0] * num_arms
    for arm in plays[-window:]:
        recent[arm] += 1
    n = sum(recent)
    entropy = -sum(c / n * math.log(c / n) for c in recent if c) if n else 0.0
    return {"count": count, "entropy": entropy}


def _cosine(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Cosine between two gradients given per parameter (None: no gradient, zeros);
    0 where either is zero. A 0-dim tensor, no gradient, no host sync."""
    dot = sq_a = sq_b = None
    for x, y in zip(a, b):
        if x is not None and y is not None:
            d = (x.float() * y.float()).sum()
            dot = d if dot is None else dot + d
        if x is not None:
            sq = x.float().pow(2).sum()
            sq_a = sq if sq_a is None else sq_a + sq
        if y is not None:
            sq = y.float().pow(2).sum()
            sq_b = sq if sq_b is None else sq_b + sq
    if dot is None or sq_a is None or sq_b is None:
        ref = next(t for t in (*a, *b) if t is not None) if any(t is not None for t in (*a, *b)) else None
        return torch.zeros((), device=None if ref is None else ref.device)
    norm = (sq_a * sq_b).sqrt()
    return torch.where(norm > 0, dot / norm.clamp_min(1e-30), torch.zeros_like(norm)).detach()


def _reward_state(reward: Reward) -> dict[str, Any]:
    """A stateful reward's state (`Reward.state_dict`); `{}` for rewards without one."""
    return dict(reward.state_dict()) if hasattr(reward, "state_dict") else {}


def _losses_state(losses: RoundLosses) -> dict[str, Any]:
    return {"total": dict(losses.total), "per_module": {m: dict(v) for m, v in losses.per_module.items()},
            "arm": list(losses.arm), "steps": losses.steps}


def _losses_from(state: Mapping[str, Any]) -> RoundLosses:
    return RoundLosses(_floats(state["total"]), {str(m): _floats(v) for m, v in state["per_module"].items()},
                       tuple(state["arm"]), int(state.get("steps", 0)))


@dataclass
class _OpenRound:
    """A round in progress: its arm, the steps taken and their summed losses."""

    arm: int
    steps: int = 0
    skipped: int = 0
    losses: RoundAccumulator = field(default_factory=RoundAccumulator)

    def state_dict(self) -> dict[str, Any]:
        return {"arm": self.arm, "steps": self.steps, "skipped": self.skipped, "losses": self.losses.state_dict()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "_OpenRound":
        round_ = cls(int(state["arm"]), int(state["steps"]), int(state["skipped"]))
        round_.losses.load_state_dict(state["losses"])
        return round_


def step_report(step: StepLosses, arm: Sequence[str]) -> dict[str, float]:
    """A step's values as callbacks get them: `total/<term>` (whole model) and
    `arm/<term>` (the played arm's modules, `RoundLosses.arm_totals`)."""
    arm_totals = RoundLosses(step.full, step.per_module, tuple(arm)).arm_totals()
    return {**{f"total/{t}": v for t, v in step.full.items()}, **{f"arm/{t}": v for t, v in arm_totals.items()}}


class Distiller(_Loop):
    """OPTIMA distillation of `student` from a frozen `teacher`, in rounds of `T` steps.

    Resumable at any step: `state_dict()` holds the student, the loss's
    parameters (projections), optimizer, scheduler, policy, data position,
    counters, the previous round's losses, the history and the round in
    progress (the global RNGs are the caller's, see `optima.checkpoint`);
    `load_state_dict` continues exactly where the saved run was.

    `on_nonfinite` ('stop' or 'skip') decides what a step with a NaN or inf loss
    does (see `_Loop._optimizer_step`). A round's totals are summed over its
    finite steps and, if some were skipped, scaled to `T` steps so that rounds
    stay comparable; a round without finite values gives the policy no reward
    and is not compared with (the next round compares with the last good one).
    `checkpoint_every` (rounds) and `keep_checkpoints` are read by whoever
    checkpoints the run (`optima.experiment`); the engine writes nothing.

    `amp` runs the student under bf16 autocast on a GPU, and the frozen teacher
    as a bf16 copy outside autocast (`teacher_dtype`, default: bf16 with `amp` on
    a GPU, else the teacher's own; `teacher_copy`).
    """

    def __init__(self, *, teacher: Network, student: Network, task: Task, loss: Loss, arms: ArmSpace,
                 policy: Policy, reward: Reward, optimizer: torch.optim.Optimizer, scheduler: Any,
                 stream: BatchStream, steps_per_round: int, device: torch.device, rounds: int | None = None,
                 grad_clip: float | None = 1.0, amp: bool = False, callbacks: Sequence[Callback] = (),
                 name: str = "student", on_nonfinite: str = "stop", checkpoint_every: int = 5,
                 keep_checkpoints: int = 2, binding: str = "distillation.on_nonfinite", compile: bool | str = False,
                 probe: Sequence[Batch] = (), teacher_dtype: torch.dtype | None = None,
                 alignment_gate: bool = False, gate_halflife: float = 0.0):
        self.name, self.rounds, self.binding = name, rounds, binding
        self.teacher, self.student, self.task, self.loss = teacher, student, task, loss
        self.arms, self.policy, self.reward = arms, policy, reward
        self.optimizer, self.scheduler, self.stream = optimizer, scheduler, stream
        self.steps_per_round, self.device, self.grad_clip, self.amp = steps_per_round, device, grad_clip, amp
        self.on_nonfinite = _check_action(on_nonfinite, binding)
        self.checkpoint_every, self.keep_checkpoints = checkpoint_every, keep_checkpoints
        self.callbacks = list(callbacks)
        self.teacher.eval().requires_grad_(False)
        distributed.broadcast_module(self.teacher)  # every process distils from rank 0's teacher
        # DistributedDataParallel in a run of several processes; the loss's parameters
        # (projections) are averaged by `_reduce_gradients`
        self.trained = compiled(distributed.wrap(student, device), compile)
        if teacher_dtype is None:
            teacher_dtype = torch.bfloat16 if amp and device.type == "cuda" else None
        #: the network the teacher's forward runs: `teacher`, or a copy of it in
        #: `teacher_dtype`, run outside autocast (see `_teacher_logits`)
        self.teacher_run = teacher_copy(teacher, teacher_dtype)
        self.teacher_forward = compiled(self.teacher_run, compile)  # `compile`: see `compiled`
        # recording only this loop's own forwards (see `Recorder`'s `always`)
        self.teacher_rec = Recorder(self.teacher_run.model.distill_modules(), always=False)
        self.student_rec = Recorder(student.model.distill_modules(), always=False)
        self.need = frozenset(reward.terms)
        self.alignment_gate, self.gate_halflife = alignment_gate, float(gate_halflife)
        #: module -> moving average of its cosine with the task gradient (the gate's evidence)
        self.gate_mean: dict[str, torch.Tensor] = {}
        self.step = 0
        self.round = 0
        self.skipped = 0
        self.previous: RoundLosses | None = None  # the last round with finite values (or probe)
        # Fixed batches on which the reward measures the whole model before and after
        # each round (empty: the round's own training losses, the paper's reward).
        self.probe = list(probe)
        self.history: list[RoundResult] = []
        self._open: _OpenRound | None = None

    def arm_layers(self, arm: int) -> frozenset[tuple[str, int]]:
        return self.arms.layers(arm, self.student_rec.keys())

    def _where(self) -> str:
        arm = f", arm {self.arms.label(self._open.arm)}" if self._open is not None else ""
        return f"step {self.step + 1} (round {self.round}{arm})"

    def train_step(self, batch: Batch, arm_layers: frozenset[tuple[str, int]], share: float = 1.0) -> StepLosses | None:
        """One step on `arm_layers`; its losses (whole model and per module, as
        floats over the whole batch), or None if the step was skipped for a
        non-finite value. `share`: this process's part of the batch (see `_optimizer_step`)."""
        self.student.train()
        try:
            with self.teacher_rec.recording():
                t_logits = self._teacher_logits(batch)
            with autocast(self.device, self.amp):
                with self.student_rec.recording():
                    s_logits = self.trained(batch)
                task_loss = self.task.loss(s_logits.float(), batch)
                mask = self.task.logit_mask(batch)
                losses = self.loss(Capture(s_logits, self.student_rec, mask),
                                   Capture(t_logits, self.teacher_rec, mask), task_loss, arm_layers, self.need)
            if ALIGN in self.need:
                losses.full[ALIGN] = self._alignment(task_loss, losses.objective)
            if self.alignment_gate and losses.arm_terms:
                losses = self._gated(task_loss, losses)
            checked = {**losses.full, **{f"{t}[{m}]": v for m, terms in losses.per_module.items()
                                         for t, v in terms.items()}}
            read = self._optimizer_step(losses.objective, checked, share)
        finally:
            self.student_rec.clear()
            self.teacher_rec.clear()
        if read is None:
            return None
        return StepLosses(losses.objective, {t: read[t] for t in losses.full},
                          {m: {t: read[f"{t}[{m}]"] for t in terms} for m, terms in losses.per_module.items()})

    def _gated(self, task_loss: torch.Tensor, losses: StepLosses) -> StepLosses:
        """`distillation.alignment_gate`: drop from this step's objective the layer
        terms of every module of the arm whose gradient points against the task
        loss's: cosine over the student's weights < 0 (Du et al. 2018), on this
        batch (`gate_halflife = 0`) or as a moving average over the module's
        steps with that half-life in steps (a single batch's cosine between two
        gradients of this size is mostly noise around 0, so its sign is a coin
        flip). `kept/<module>` (1 kept, 0 dropped) is added to the step's values.
        One extra backward pass through the student per module of the arm."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        g_task = torch.autograd.grad(task_loss, params, retain_graph=True, allow_unused=True)
        objective, full = losses.objective, dict(losses.full)
        for module, term in losses.arm_terms.items():
            g_module = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            cos = _cosine(g_task, g_module)
            if self.gate_halflife > 0:
                decay = 0.5 ** (1.0 / self.gate_halflife)
                mean = self.gate_mean.get(module)
                cos = cos if mean is None else decay * mean + (1.0 - decay) * cos
                self.gate_mean[module] = cos
            keep = cos >= 0
            objective = torch.where(keep, objective, objective - term)
            full[f"kept/{module}"] = keep.float()
        return StepLosses(objective, full, losses.per_module, losses.arm_terms)

    def _alignment(self, task_loss: torch.Tensor, objective: torch.Tensor) -> torch.Tensor:
        """Cosine between the gradients of the step's distillation terms (the
        objective less the task loss: KD and the played arm's layer losses) and of
        the task loss, over the student's weights, on this batch (Du et al. 2018,
        "Adapting auxiliary losses using gradient similarity"). Two extra backward
        passes through the student per step (`bench/step_time.py` measures it)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        g_task = torch.autograd.grad(task_loss, params, retain_graph=True, allow_unused=True)
        g_distil = torch.autograd.grad(objective - task_loss, params, retain_graph=True, allow_unused=True)
        return _cosine(g_task, g_distil)

    @torch.no_grad()
    def _teacher_logits(self, batch: Batch) -> torch.Tensor:
        """The teacher's forward (its recorder keeps the layers). A teacher in its own
        dtype runs under the student's autocast; a copy in a lower dtype runs as it
        is, on inputs of its dtype, outside autocast: no per-step weight casts, and
        attention blocks take `nn.MultiheadAttention`'s fused inference path."""
        dtype = _dtype_of(self.teacher_run)
        if dtype == _dtype_of(self.teacher):
            with autocast(self.device, self.amp):
                return self.teacher_forward(batch)
        batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        with torch.autocast(self.device.type, enabled=False):
            return self.teacher_forward(batch)

    def _reduce_gradients(self) -> None:
        distributed.average_gradients(self.loss.parameters())

    def probe_losses(self) -> RoundLosses:
        """The whole model's losses on the probe batches, summed (no gradient, the
        student in eval mode). The same batches every round, so the difference
        between two probes is the round's effect alone, without the sampling noise
        of the round's own training batches. Every process evaluates the whole
        probe with the same weights: the same values everywhere."""
        sums = RoundAccumulator()
        self.student.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.amp):
                for batch in self.probe:
                    with self.teacher_rec.recording():
                        t_logits = self._teacher_logits(batch)
                    with self.student_rec.recording():
                        s_logits = self.trained(batch)
                    mask = self.task.logit_mask(batch)
                    losses = self.loss(Capture(s_logits, self.student_rec, mask),
                                       Capture(t_logits, self.teacher_rec, mask),
                                       self.task.loss(s_logits.float(), batch), frozenset(), self.need)
                    sums.add({t: float(v) for t, v in losses.full.items()},
                             {m: {t: float(v) for t, v in terms.items()} for m, terms in losses.per_module.items()})
        finally:
            self.student_rec.clear()
            self.teacher_rec.clear()
            self.student.train()
        return RoundLosses(sums.totals(), sums.per_module(), (), sums.steps)

    @property
    def in_round(self) -> bool:
        """Whether a round was started and not finished (a mid-round checkpoint)."""
        return self._open is not None

    def play_round(self, after_step: Callable[["Distiller"], None] | None = None) -> RoundResult:
        """Play a round (or finish the one in progress): select an arm, `T` steps,
        reward, policy update. `after_step(self)` runs after every step."""
        if self._open is None:
            if self.probe and self.round == 0:  # the probe before the first round: round 1 gets a reward too
                self.previous = self.probe_losses()
            self.round += 1
            arm = self.policy.select()
            distributed.check_same(arm, f"the arm of {self.name}'s round {self.round}")
            self._open = _OpenRound(arm)
        current = self._open
        layers = self.arm_layers(current.arm)
        modules = self.arms.modules_of(current.arm)
        while current.steps < self.steps_per_round:
            batch = next(self.stream)
            step = self.train_step(batch, layers, self.stream.share)
            current.steps += 1
            if step is None:
                current.skipped += 1
            else:
                current.losses.add(step.full, step.per_module)
            reported = {} if step is None else step_report(step, modules)
            for cb in self.callbacks:
                cb.on_step(self.name, self.step, reported, self._lr())
            if after_step:
                after_step(self)
        return self._finish_round()

    def _finish_round(self) -> RoundResult:
        current = self._open
        outcome = round_outcome(self.reward, self.previous, current.losses, self.steps_per_round,
                                self.arms.modules_of(current.arm), self.probe_losses() if self.probe else None)
        if outcome.reward is not None:
            self.policy.update(current.arm, outcome.reward)
        self.previous = outcome.previous
        self._open = None
        result = RoundResult(self.round, self.step, current.arm, self.arms.label(current.arm), outcome.reward,
                             outcome.losses, self.policy.diagnostics(), skipped=current.skipped, note=outcome.note)
        self.history.append(result)
        result.plays = self.play_stats()
        for cb in self.callbacks:
            if outcome.note and hasattr(cb, "on_message"):
                cb.on_message(f"{self.name}: round {self.round}: no reward for the policy ({outcome.note})")
            cb.on_round(self.name, result)
        return result

    def play_stats(self) -> dict[str, Any]:
        """Plays per arm so far and the entropy of the recent plays (`play_stats`)."""
        return play_stats([r.arm for r in self.history], len(self.arms))

    def run(self, rounds: int | None = None, *, after_step: Callable[["Distiller"], None] | None = None,
            after_round: Callable[["Distiller", RoundResult], None] | None = None) -> list[RoundResult]:
        """Play until `rounds` rounds (default: `self.rounds`) are done, finishing a
        round in progress first; returns the history of all rounds."""
        target = self.rounds if rounds is None else rounds
        if target is None:
            raise ValueError("Distiller.run needs the number of rounds (Distiller(rounds=...) or run(rounds))")
        while self.round < target or self._open is not None:
            result = self.play_round(after_step)
            if after_round:
                after_round(self, result)
        return self.history

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(), "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "policy": self.policy.state_dict(), "stream": self.stream.state_dict(),
            "reward": _reward_state(self.reward),
            "gate_mean": {m: float(v) for m, v in self.gate_mean.items()},
            "step": self.step, "round": self.round, "skipped": self.skipped,
            "previous": None if self.previous is None else _losses_state(self.previous),
            "history": [{"round": r.round, "arm": r.arm, "reward": r.reward, "losses": _losses_state(r.losses),
                         "skipped": r.skipped, "note": r.note} for r in self.history],
            "open_round": None if self._open is None else self._open.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "the checkpoint") -> None:
        """Restore a `state_dict()`; a state of another architecture (student or
        projections) or another arm space is refused with `CheckpointError`."""
        check_same_layout(state["student"], self.student.state_dict(), "student", source)
        check_same_layout(state["loss"], self.loss.state_dict(), "distillation loss (projections)", source)
        arms = [int(r["arm"]) for r in state["history"]]
        if state["open_round"] is not None:
            arms.append(int(state["open_round"]["arm"]))
        if any(not 0 <= a < len(self.arms) for a in arms):
            raise CheckpointError(f"checkpoint {source} played arms {sorted(set(arms))}, but there are "
                                  f"{len(self.arms)} arms now")
        self.student.load_state_dict(state["student"])
        self.loss.load_state_dict(state["loss"])
        _load_optimizer(self.optimizer, self.scheduler, state, source)
        self.policy.load_state_dict(state["policy"])
        self.gate_mean = {m: torch.tensor(v, dtype=torch.float32, device=self.device)
                          for m, v in state.get("gate_mean", {}).items()}
        if hasattr(self.reward, "load_state_dict"):  # a checkpoint of before stateful rewards holds none
            self.reward.load_state_dict(state.get("reward", {}))
        self.stream.load_state_dict(state["stream"])
        self.step, self.round, self.skipped = int(state["step"]), int(state["round"]), int(state["skipped"])
        self.previous = None if state["previous"] is None else _losses_from(state["previous"])
        # Every round has exactly T steps (skipped ones count), so its end step is round * T.
        self.history = [RoundResult(int(r["round"]), int(r["round"]) * self.steps_per_round, int(r["arm"]),
                                    self.arms.label(int(r["arm"])),
                                    None if r["reward"] is None else float(r["reward"]),
                                    _losses_from(r["losses"]),
                                    skipped=int(r["skipped"]), note=r["note"]) for r in state["history"]]
        self._open = None if state["open_round"] is None else _OpenRound.from_state(state["open_round"])

    def close(self) -> None:
        self.teacher_rec.remove()
        self.student_rec.remove()
