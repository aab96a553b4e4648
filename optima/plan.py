"""`optima run --dry-run`: resolve the whole pipeline and build every model on the
meta device (shapes only: no weights allocated, nothing loaded or fetched), then
describe it: models and modules with layer and parameter counts, arms, layer
maps, steps and rounds, and which data and checkpoint paths exist."""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import gin
import torch

from optima.align import layer_map
from optima.arms import ArmSpace
from optima.config import TEACHER
from optima.errors import ConfigError

def _stage_bindings(configurable: str, scope: str, resolve: bool = True) -> dict[str, Any]:
    with gin.config_scope(scope):
        try:
            return gin.get_bindings(configurable, resolve_references=resolve)
        except ValueError:
            return {}


def _describe(model: torch.nn.Module, head: torch.nn.Module) -> dict[str, Any]:
    modules = {m.name: {"layers": len(m), "width": m.width,
                        "params_M": m.num_parameters() / 1e6}
               for m in model.distill_modules()}
    # one count per parameter: a head may share the model's (the caption head's vocabulary projection)
    together = torch.nn.ModuleList([model, head])
    return {"params_M": sum(p.numel() for p in together.parameters()) / 1e6,
            "modules": modules,
            "checkpoints": {k: {"path": v, "exists": bool(v) and os.path.exists(v)}
                            for k, v in getattr(model, "checkpoints", {}).items() if v}}


def dry_run_plan(task: Callable, teacher: Callable, head: Callable, stages: Mapping[str, Callable],
                 seed: int, pretraining: Mapping[str, Callable] | None = None) -> dict[str, Any]:
    the_task = task()
    missing = list(getattr(the_task, "missing_paths", lambda: [])())
    plan: dict[str, Any] = {"task": type(the_task).__name__, "missing_data": [str(p) for p in missing],
                            "models": {}, "stages": {}}
    for name, factory in (pretraining or {}).items():
        with gin.config_scope(name), torch.device("meta"):
            model = factory()
        p = _stage_bindings("pretraining", name)
        refs = _stage_bindings("pretraining", name, resolve=False)
        plan["models"][name] = {**_describe(model, torch.nn.Identity()), "role": "pretrained"}
        plan["stages"][name] = {"kind": "pretrain", "steps": p.get("steps"), "corpus": str(refs.get("corpus"))}
    built = {}
    for name, factory in ((TEACHER, teacher), *stages.items()):
        with gin.config_scope(name), torch.device("meta"):
            model = factory()
            built[name] = model
            plan["models"][name] = _describe(model, head(model, the_task))
    teacher_steps = _stage_bindings("teacher_training", TEACHER).get("steps")
    plan["stages"][TEACHER] = {"kind": "fine-tune", "steps": teacher_steps}
    upstream = TEACHER
    for name in stages:
        d = _stage_bindings("distillation", name)
        refs = _stage_bindings("distillation", name, resolve=False)
        s_model, t_model = built[name], built[upstream]
        arms = ArmSpace.of_model(s_model, d.get("arms"), d.get("arm_groups", 1), empty=d.get("empty_arm") is True)
        t_modules = {m.name: m for m in t_model.distill_modules()}
        rounds, steps = d.get("rounds"), d.get("steps_per_round")
        plan["stages"][name] = {
            "kind": "distill", "teacher": upstream, "rounds": rounds, "steps_per_round": steps,
            "steps": rounds * steps if isinstance(rounds, int) and isinstance(steps, int) else None,
            "arms": arms.labels(),
            "units": arms.describe_units() if arms.grouped else None,
            "policy": str(refs.get("policy")), "reward": str(refs.get("reward")),
            "layer_map": {m.name: layer_map(len(m), len(t_modules[m.name])) for m in s_model.distill_modules()},
        }
        upstream = name
    return plan

