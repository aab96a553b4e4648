"""The training loops: task fine-tuning, evaluation and OPTIMA distillation.

`Distiller.play_round` is the method in one place: the policy picks an arm, the
student is distilled on that arm's layers for `T` steps, the round's full-model
losses give the reward, the policy learns from it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from optima.arms import ArmSpace
from optima.interfaces import Batch, Capture, DistillableModel, Head, Loss, Policy, Reward, Task
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
        images = batch["image"]
        if images.dim() == 5:
            n = images.shape[1]
            batch = {**batch, "image": images.flatten(0, 1), "text": batch["text"].repeat_interleave(n, 0)}
        return self.head(self.model(batch))


class BatchStream:
    """Endless shuffled batches of one split, epoch after epoch; its position is
    state so that a resumed run sees the same batches."""

    def __init__(self, task: Task, split: str, batch_size: int, seed: int, device: torch.device):
        self.task, self.split, self.batch_size, self.seed, self.device = task, split, batch_size, seed, device
        self.epoch, self.position = 0, 0
        self._it: Iterator[Batch] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        while True:
            if self._it is None:
                self._it = iter(self.task.batches(self.split, self.batch_size, shuffle=True,
                                                  seed=self.seed + self.epoch))
                for _ in range(self.position):  # fast-forward after a resume
                    next(self._it)
            try:
                batch = next(self._it)
                self.position += 1
                return to_device(batch, self.device)
            except StopIteration:
                self._it, self.epoch, self.position = None, self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state) -> None:
        self.epoch, self.position, self._it = int(state["epoch"]), int(state["position"]), None


def to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs when asked; full precision otherwise."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(network: Network, task: Task, split: str, batch_size: int, device: torch.device,
             amp: bool = False) -> dict[str, float]:
    was_training = network.training
    network.eval()
    batches = (to_device(b, device) for b in task.batches(split, batch_size, shuffle=False, seed=0))
    with autocast(device, amp):
        metrics = task.evaluate(network, batches)
    network.train(was_training)
    return metrics


class Callback(Protocol):
    def on_step(self, stage: str, step: int, losses: dict[str, float], lr: float) -> None: ...
    def on_round(self, stage: str, result: "RoundResult") -> None: ...


def finetune(network: Network, task: Task, *, steps: int, batch_size: int, optimizer: torch.optim.Optimizer,
             scheduler: Any, seed: int, device: torch.device, grad_clip: float | None = 1.0, amp: bool = False,
             on_step: Callable[[int, dict[str, float], float], None] | None = None) -> None:
    """Plain task training (the teacher's fine-tuning)."""
    network.train()
    stream = BatchStream(task, "train", batch_size, seed, device)
    for step in range(1, steps + 1):
        batch = next(stream)
        with autocast(device, amp):
            loss = task.loss(network(batch).float(), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        optimizer.step()
        scheduler.step()
        if on_step:
            on_step(step, {"task": loss.item()}, optimizer.param_groups[0]["lr"])


class RoundAccumulator:
    """Sums per-step full-model losses over one round.

    `add(terms)` adds one step's values (floats, or 0-dim tensors); `totals()` is
    the per-term sum over the steps added since the last `reset()` (a term
    missing from some steps is summed over the steps that had it); `steps`
    counts the `add` calls. Non-finite values are summed as they are, so that
    the reward raises on them.
    """

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}
        self._steps = 0

    @property
    def steps(self) -> int:
        return self._steps

    def add(self, terms: Mapping[str, float]) -> None:
        for name, value in terms.items():
            self._totals[name] = self._totals.get(name, 0.0) + float(value)
        self._steps += 1

    def totals(self) -> dict[str, float]:
        return dict(self._totals)

    def reset(self) -> None:
        self._totals = {}
        self._steps = 0

    def __repr__(self) -> str:
        return f"RoundAccumulator(steps={self._steps}, totals={self._totals!r})"


@dataclass
class RoundResult:
    round: int  # 1-based
    arm: int
    arm_label: str
    reward: float | None  # None in the first round: nothing to compare with
    totals: dict[str, float]  # full-model losses accumulated over the round
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


class Distiller:
    """OPTIMA distillation of `student` from a frozen `teacher`, in rounds of `T` steps."""

    def __init__(self, *, teacher: Network, student: Network, task: Task, loss: Loss, arms: ArmSpace,
                 policy: Policy, reward: Reward, optimizer: torch.optim.Optimizer, scheduler: Any,
                 stream: BatchStream, steps_per_round: int, rounds: int, device: torch.device,
                 grad_clip: float | None = 1.0, amp: bool = False, callbacks: Sequence[Callback] = (),
                 name: str = "student"):
        self.name, self.rounds = name, rounds
        self.teacher, self.student, self.task, self.loss = teacher, student, task, loss
        self.arms, self.policy, self.reward = arms, policy, reward
        self.optimizer, self.scheduler, self.stream = optimizer, scheduler, stream
        self.steps_per_round, self.device, self.grad_clip, self.amp = steps_per_round, device, grad_clip, amp
        self.callbacks = list(callbacks)
        self.teacher.eval().requires_grad_(False)
        self.teacher_rec = Recorder(teacher.model.distill_modules())
        self.student_rec = Recorder(student.model.distill_modules())
        self.need = frozenset(reward.terms)
        self.step = 0
        self.round = 0
        self.previous: dict[str, float] | None = None  # last round's totals
        self.history: list[RoundResult] = []

    def arm_layers(self, arm: int) -> frozenset[tuple[str, int]]:
        modules = set(self.arms[arm])
        return frozenset(k for k in self.student_rec.keys() if k[0] in modules)

    def train_step(self, batch: Batch, arm_layers: frozenset[tuple[str, int]]) -> dict[str, float]:
        self.student.train()
        with autocast(self.device, self.amp):
            with torch.no_grad():
                t_logits = self.teacher(batch)
            s_logits = self.student(batch)
            task_loss = self.task.loss(s_logits.float(), batch)
            losses = self.loss(Capture(s_logits, self.student_rec), Capture(t_logits, self.teacher_rec),
                               task_loss, arm_layers, self.need)
        self.optimizer.zero_grad(set_to_none=True)
        losses.objective.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.student_rec.clear()
        self.teacher_rec.clear()
        self.step += 1
        return losses.full

    def play_round(self) -> RoundResult:
        self.round += 1
        arm = self.policy.select()
        layers = self.arm_layers(arm)
        round_losses = RoundAccumulator()
        for _ in range(self.steps_per_round):
            full = self.train_step(next(self.stream), layers)
            round_losses.add(full)
            for cb in self.callbacks:
                cb.on_step(self.name, self.step, full, self.optimizer.param_groups[0]["lr"])
        totals = round_losses.totals()
        reward = None
        if self.previous is not None:
            reward = self.reward(self.previous, totals)
            self.policy.update(arm, reward)
        self.previous = totals
        result = RoundResult(self.round, arm, self.arms.label(arm), reward, totals, self.policy.diagnostics())
        self.history.append(result)
        for cb in self.callbacks:
            cb.on_round(self.name, result)
        return result

    def run(self) -> list[RoundResult]:
        while self.round < self.rounds:
            self.play_round()
        return self.history

    def close(self) -> None:
        self.teacher_rec.remove()
        self.student_rec.remove()

