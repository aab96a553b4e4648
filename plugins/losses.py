"""The OPTIMA step objective (method.md, "Losses at one step"):

    L(A) = L_pred + kd_weight * L_kd + hidden_weight * L_hidn(A) + attn_weight * L_attn(A)

Only the played arm's layers `A` get layer losses with gradients. The other
layers' losses are computed under `no_grad`, and only when the reward reads them,
to give the full-model values the reward compares across rounds; so an OPTIMA
step never costs more than a layerwise step (`bench/step_time.py` measures it).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from optima.errors import ConfigError
from optima.interfaces import Capture, Loss, Module, StepLosses


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """0-based teacher layer for each student layer: `g(l) = l * r` (1-based),
    `r = n_teacher // n_student` (rounded down when not an integer)."""
    if not 0 < n_student <= n_teacher:
        raise ConfigError(f"a student module needs 1..{n_teacher} layers (the teacher's count), got {n_student}")
    r = n_teacher // n_student
    return [(l + 1) * r - 1 for l in range(n_student)]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T || p_S) at temperature `t`, scaled by t^2 so gradients keep their size."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                    reduction="batchmean", log_target=True) * t * t


class OptimaLoss(Loss):
    """Hidden-state MSE through a learnable `d_S x d_T` projection per student layer,
    attention-probability MSE (head-averaged; every attention of the layer), KD."""

    def __init__(self, student_modules: Sequence[Module], teacher_modules: Sequence[Module],
                 kd_weight: float = 1.0, hidden_weight: float = 1.0, attn_weight: float = 1.0,
                 temperature: float = 1.0):
        super().__init__()
        for name, w in (("kd_weight", kd_weight), ("hidden_weight", hidden_weight), ("attn_weight", attn_weight)):
            if not w >= 0:
                raise ConfigError(f"optima_loss.{name} must be >= 0, got {w}")
        if not temperature > 0:
            raise ConfigError(f"optima_loss.temperature must be > 0, got {temperature}")
        self.weights = {"kd": kd_weight, "hidden": hidden_weight, "attn": attn_weight}
        self.temperature = temperature
        teacher = {m.name: m for m in teacher_modules}
        missing = [m.name for m in student_modules if m.name not in teacher]
        if missing:
            raise ConfigError(f"student modules {missing} have no teacher counterpart; teacher has {list(teacher)}")
        #: student (module, layer) -> teacher (module, layer)
        self.pairs = {(m.name, i): (m.name, j) for m in student_modules
                      for i, j in enumerate(layer_map(len(m), len(teacher[m.name])))}
        self.proj = nn.ModuleDict({
            f"{m.name}_{i}": nn.Linear(m.width, teacher[m.name].width) for m in student_modules for i in range(len(m))})

    def forward(self, student: Capture, teacher: Capture, task_loss: torch.Tensor,
                arm_layers: frozenset[tuple[str, int]], need: frozenset[str]) -> StepLosses:
        kd = kd_loss(student.logits, teacher.logits, self.temperature)
        objective = task_loss + self.weights["kd"] * kd
        totals = {"task": task_loss.detach(), "kd": kd.detach()}
        for term, distance in (("hidden", self._hidden), ("attn", self._attn)):
            total = torch.zeros((), device=task_loss.device)
            for s_key, t_key in self.pairs.items():
                with_grad = s_key in arm_layers and self.weights[term] > 0
                if not (with_grad or term in need):
                    continue
                with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
                    value = distance(student.recorder, teacher.recorder, s_key, t_key)
                if with_grad:
                    objective = objective + self.weights[term] * value
                total = total + value.detach()
            totals[term] = total
        values = torch.stack(list(totals.values())).tolist()  # one device sync per step
        return StepLosses(objective=objective, full=dict(zip(totals, values)))

    def _hidden(self, s_rec, t_rec, s_key, t_key) -> torch.Tensor:
        h_s = self.proj[f"{s_key[0]}_{s_key[1]}"](s_rec.hidden(s_key))
        return F.mse_loss(h_s.float(), _same_shape(t_rec.hidden(t_key), h_s, s_key).float())

    def _attn(self, s_rec, t_rec, s_key, t_key) -> torch.Tensor:
        with torch.no_grad():
            t_att = t_rec.attention(t_key)
        return sum(F.mse_loss(a_s.float(), _same_shape(a_t, a_s, s_key).float())
                   for a_s, a_t in zip(s_rec.attention(s_key), t_att))


def _same_shape(teacher: torch.Tensor, student: torch.Tensor, key) -> torch.Tensor:
    # hidden states are compared after projection, so both tensors must match exactly
    if teacher.shape != student.shape:
        raise ConfigError(f"layer {key[0]}[{key[1]}]: teacher tensor {tuple(teacher.shape)} does not match the "
                          f"student's {tuple(student.shape)}; use the same image size, patch size and context length")
    return teacher


def optima_loss(student_modules: Sequence[Module], teacher_modules: Sequence[Module], kd_weight: float = 1.0,
                hidden_weight: float = 1.0, attn_weight: float = 1.0, temperature: float = 1.0) -> OptimaLoss:
    """The paper's objective; the weights are a1, a2, a3 of method.md."""
    return OptimaLoss(student_modules, teacher_modules, kd_weight, hidden_weight, attn_weight, temperature)
