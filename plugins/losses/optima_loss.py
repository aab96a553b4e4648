"""The OPTIMA step objective (method.md, "Losses at one step"):

    L(A) = L_pred + kd_weight * L_kd + hidden_weight * L_hidn(A) + attn_weight * L_attn(A)

Only the played arm's layers `A` get layer losses with gradients. The other
layers' losses are computed under `no_grad`, and only when the reward reads them,
to give the whole-model and per-module values the reward compares across rounds;
so an OPTIMA step never costs more than a layerwise step (`bench/step_time.py`
measures it). All of a step's values reach the host in one transfer.

Teacher and student may differ in width (the learnable projections), depth (the
layer map `layer_map`) and token layout (`optima.align`): given each model's
per-module token layouts, the teacher's patch grid is pooled onto the student's
(class token matched separately, hidden states average-pooled, attention queries
averaged and keys summed so rows still sum to 1); modules without a layout (text
and decoder tokens) are matched one to one and must have the same shapes.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from optima.align import Layout, align_attention, align_hidden, check_pair, layer_map
from optima.errors import ConfigError
from optima.interfaces import Capture, Loss, Module, StepLosses


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_T || p_S) at temperature `t`, scaled by t^2 so gradients keep their size;
    summed over positions and averaged over the batch. `mask` (the logits' leading
    dims, bool): only those positions count (e.g. a caption's tokens, not its padding)."""
    t, batch = temperature, student_logits.shape[0]
    if mask is not None:
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                  reduction="sum", log_target=True)
    return kl / batch * t * t


#: How `OptimaLoss` scales a layer's hidden-state MSE (`optima_loss.hidden_norm`).
HIDDEN_NORMS = ("none", "teacher_var")


class OptimaLoss(Loss):
    """Hidden-state MSE through a learnable `d_S x d_T` projection per student layer,
    attention-probability MSE (head-averaged; every attention of the layer), KD.

    `student_layouts` / `teacher_layouts`: `{module name: token layout}` (see
    `optima.align`; e.g. `{"image": {"prefix": 1, "grid": (7, 7)}, "text": None}`),
    usually `optima.align.token_layouts(model)`. Missing modules, or None for the
    whole dict, mean one to one: the teacher's tensors must then have the student's
    shapes. Layouts are checked against each other here, before any step.

    `hidden_norm = 'teacher_var'` divides each layer's hidden-state MSE by the
    variance of the teacher's (aligned) hidden state at that layer, so that a
    layer matters by how well it is matched, not by the scale of its residual
    stream (CoCa is pre-LN: raw MSE starts near 500 summed over layers while the
    task loss is about 1, docs/method.md). `'none'` (default) is the paper's MSE."""

    def __init__(self, student_modules: Sequence[Module], teacher_modules: Sequence[Module],
                 kd_weight: float = 1.0, hidden_weight: float = 1.0, attn_weight: float = 1.0,
                 temperature: float = 1.0, *, hidden_norm: str = "none",
                 student_layouts: Mapping[str, Layout] | None = None,
                 teacher_layouts: Mapping[str, Layout] | None = None):
        super().__init__()
        if hidden_norm not in HIDDEN_NORMS:
            raise ConfigError(f"optima_loss.hidden_norm must be one of {', '.join(map(repr, HIDDEN_NORMS))}, "
                              f"got {hidden_norm!r}")
        self.hidden_norm = hidden_norm
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
        #: module -> (teacher layout, student layout), normalised
        self.layouts = {m.name: check_pair(m.name, (teacher_layouts or {}).get(m.name),
                                           (student_layouts or {}).get(m.name)) for m in student_modules}
        self.proj = nn.ModuleDict({
            f"{m.name}_{i}": nn.Linear(m.width, teacher[m.name].width) for m in student_modules for i in range(len(m))})

    def forward(self, student: Capture, teacher: Capture, task_loss: torch.Tensor,
                arm_layers: frozenset[tuple[str, int]], need: frozenset[str]) -> StepLosses:
        kd = kd_loss(student.logits, teacher.logits, self.temperature, student.mask)
        objective = task_loss + self.weights["kd"] * kd
        totals = {"task": task_loss.detach(), "kd": kd.detach()}
        modules: dict[tuple[str, str], torch.Tensor] = {}  # (module, term) -> sum over its layers
        arm_terms: dict[str, torch.Tensor] = {}  # module -> its weighted layer terms in the objective
        skipped: set[tuple[str, str]] = set()  # (module, term) with a layer left out
        for term, distance in (("hidden", self._hidden), ("attn", self._attn)):
            total = torch.zeros((), device=task_loss.device)
            for s_key, t_key in self.pairs.items():
                with_grad = s_key in arm_layers and self.weights[term] > 0
                if not (with_grad or term in need):
                    skipped.add((s_key[0], term))
                    continue
                with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
                    value = distance(student.recorder, teacher.recorder, s_key, t_key)
                if with_grad:
                    weighted = self.weights[term] * value
                    objective = objective + weighted
                    arm_terms[s_key[0]] = arm_terms[s_key[0]] + weighted if s_key[0] in arm_terms else weighted
                total = total + value.detach()
                key = (s_key[0], term)
                modules[key] = modules[key] + value.detach() if key in modules else value.detach()
            if term in need:  # a sum over some layers only is no whole-model value
                totals[term] = total
        modules = {k: v for k, v in modules.items() if k not in skipped}
        per_module: dict[str, dict[str, torch.Tensor]] = {}
        for (module, term), value in modules.items():
            per_module.setdefault(module, {})[term] = value
        # 0-dim tensors: the engine reads them back with the objective in one device sync
        return StepLosses(objective=objective, full=totals, per_module=per_module, arm_terms=arm_terms)

    def _hidden(self, s_rec, t_rec, s_key, t_key) -> torch.Tensor:
        h_s = self.proj[f"{s_key[0]}_{s_key[1]}"](s_rec.hidden(s_key))
        h_t = self._aligned(t_rec.hidden(t_key), h_s, s_key, "hidden state", align_hidden).float()
        mse = F.mse_loss(h_s.float(), h_t)
        if self.hidden_norm == "teacher_var":
            mse = mse / (h_t.detach().var() + 1e-6)
        return mse

    def _attn(self, s_rec, t_rec, s_key, t_key) -> torch.Tensor:
        s_att = s_rec.attention(s_key)
        with torch.no_grad():
            t_att = [self._aligned(a_t, a_s, s_key, f"attention {j}", align_attention)
                     for j, (a_s, a_t) in enumerate(zip(s_att, t_rec.attention(t_key)))]
        return sum(F.mse_loss(a_s.float(), a_t.float()) for a_s, a_t in zip(s_att, t_att))

    def _aligned(self, teacher: torch.Tensor, student: torch.Tensor, key, what: str, align) -> torch.Tensor:
        """The teacher tensor in the student's token layout, checked against the student's
        shape (hidden states are compared after projection, so shapes must match exactly)."""
        t_layout, s_layout = self.layouts[key[0]]
        where = f"layer {key[0]}[{key[1]}] {what}"
        aligned = align(teacher, t_layout, s_layout, where)
        if aligned.shape != student.shape:
            pooled = f" (pooled from {tuple(teacher.shape)})" if aligned.shape != teacher.shape else ""
            hints = "".join(f" ({h})" for h in dict.fromkeys(l["hint"] for l in (t_layout, s_layout) if l and l["hint"]))
            how = ("its tokens are matched one to one" if (s_layout or {}).get("grid") is None
                   else "its patch grids are pooled, other axes matched one to one")
            raise ConfigError(f"{where}: teacher tensor {tuple(aligned.shape)}{pooled} does not match the student's "
                              f"{tuple(student.shape)}; module {key[0]!r} {how}: use the same context length and "
                              f"token counts, or give the models' token layouts to the loss{hints}")
        return aligned


def optima_loss(student_modules: Sequence[Module], teacher_modules: Sequence[Module], kd_weight: float = 1.0,
                hidden_weight: float = 1.0, attn_weight: float = 1.0, temperature: float = 1.0, *,
                hidden_norm: str = "none", student_layouts: Mapping[str, Layout] | None = None,
                teacher_layouts: Mapping[str, Layout] | None = None) -> OptimaLoss:
    """The paper's objective; the weights are a1, a2, a3 of method.md. The layouts
    (`{module: token layout}`, from `optima.align.token_layouts(model)`) let a teacher
    with another patch size be matched; the pipeline passes them, not gin."""
    return OptimaLoss(student_modules, teacher_modules, kd_weight, hidden_weight, attn_weight, temperature,
                      hidden_norm=hidden_norm, student_layouts=student_layouts, teacher_layouts=teacher_layouts)
