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
from optima.errors import ConfigError
from optima.stages import TEACHER

def _stage_bindings(configurable: str, scope: str, resolve: bool = True) -> dict[str, Any]:
    with gin.config_scope(scope):
        try:
            return gin.get_bindings(configurable, resolve_references=resolve)
        except ValueError:
            return {}


def stage_outline() -> list[tuple[str, int]]:
    """The stages a run of the parsed config trains, in order, with their steps:
    pretraining stages, the teacher (unless `teacher_training.steps = 0`), the
    students. Read from the bindings alone (nothing built), for the CLI's
    progress ("stage k of n", the run's steps); a value that is not a positive
    integer counts 0 steps (validation reports it)."""
    def steps(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    exp = _stage_bindings("experiment", "")
    outline = [(name, steps(_stage_bindings("pretraining", name).get("steps")))
               for name in (exp.get("pretraining") or {})]
    teacher_steps = steps(_stage_bindings("teacher_training", TEACHER).get("steps"))
    if teacher_steps:
        outline.append((TEACHER, teacher_steps))
    students = exp.get("students") or ({"student": None} if exp.get("student") is not None else {})
    for name in students:
        d = _stage_bindings("distillation", name)
        outline.append((name, steps(d.get("rounds")) * steps(d.get("steps_per_round"))))
    return outline


def _describe(model: torch.nn.Module, head: torch.nn.Module) -> dict[str, Any]:
    modules = {m.name: {"layers": len(m), "width": m.width,
                        "params_M": m.num_parameters() / 1e6}
               for m in model.distill_modules()}
    # one count per parameter: a head may share the model's (the caption head's vocabulary projection)
    together = torch.nn.ModuleList([model, head])
    return {"params_M": sum(p.numel() for p in together.parameters()) / 1e6,
            "modules": modules,
            "checkpoints": {k: {"path": v, "exists": bool(v) and os.path.exists(v),
                                "source": getattr(model, "checkpoint_sources", {}).get(k)}
                            for k, v in getattr(model, "checkpoints", {}).items() if v}}


def dry_run_plan(task: Callable, teacher: Callable, head: Callable, stages: Mapping[str, Callable],
                 seed: int, pretraining: Mapping[str, Callable] | None = None) -> dict[str, Any]:
    the_task = task()
    missing = list(getattr(the_task, "missing_paths", lambda: [])())
    plan: dict[str, Any] = {"task": type(the_task).__name__, "missing_data": [str(p) for p in missing],
                            "data_sources": getattr(the_task, "sources", ""), "models": {}, "stages": {}}
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


def missing_files(plan: Mapping[str, Any]) -> list[str]:
    """The data and checkpoint files a plan needs that do not exist."""
    checkpoints = [c["path"] for m in plan["models"].values() for c in m["checkpoints"].values() if not c["exists"]]
    return list(dict.fromkeys([*checkpoints, *plan["missing_data"]]))

