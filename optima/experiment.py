"""The experiment a gin file declares: fine-tune (or reuse) a teacher, distil a
student with OPTIMA, evaluate both. Each stage is a gin configurable:

- `experiment`: the task, the two models, the head, the seed, the device;
- `teacher_training`: the teacher's task fine-tuning (cached, see below);
- `distillation`: rounds, steps per round `T`, policy, reward, loss, arms.

A finished teacher is cached under `teacher_training.cache_dir` by a hash of its
initial weights (architecture, initialisation and checkpoint), the task's
fingerprint and every binding of the stage (`teacher_training.*` and anything in
the `teacher/` scope); a rerun, or a second student, reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import gin
import numpy as np
import torch

from optima.arms import ArmSpace
from optima.engine import BatchStream, Distiller, Network, evaluate, finetune
from optima.errors import ConfigError
from optima.reporting import Reporter, Reporters, TensorBoardReporter


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@gin.configurable
def linear_warmup_decay(optimizer: torch.optim.Optimizer, total_steps: int,
                        warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the optimizer's lr, then linear decay to zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _stage_bindings(config_text: str, prefixes: Sequence[str]) -> str:
    """The lines of gin's config text that configure one stage."""
    return "\n".join(line for line in config_text.splitlines() if line.startswith(tuple(prefixes)))


def _weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> str:
    return os.environ.get("OPTIMA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "optima"))


@gin.configurable(denylist=["network", "task", "seed", "device", "reporter"])
def teacher_training(network: Network, task, seed: int, device: torch.device, reporter: Reporter, *,
                     steps: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
                     optimizer: Callable = gin.REQUIRED, warmup_steps: int = 0, grad_clip: float = 1.0,
                     amp: bool = False, cache_dir: str | None = None) -> dict[str, Any]:
    """Fine-tune the teacher on the task, or load the cached result. Returns cache info."""
    from safetensors.torch import load_model, save_model

    key = hashlib.sha256(json.dumps({
        "weights": _weights_digest(network),
        "task": task.fingerprint(),
        "bindings": _stage_bindings(gin.config_str(), ("teacher_training.", "teacher/")),
        "seed": seed,
    }, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"teacher-{key}.safetensors"
    if path.exists():
        load_model(network, str(path), device=str(device))
        reporter.on_message(f"teacher: reusing {path}")
        return {"cached": True, "path": str(path)}
    reporter.on_stage("teacher", steps, "step")
    opt = optimizer(network.parameters())
    finetune(network, task, steps=steps, batch_size=batch_size, optimizer=opt,
             scheduler=linear_warmup_decay(opt, steps, warmup_steps), seed=seed, device=device,
             grad_clip=grad_clip, amp=amp, on_step=lambda s, l, lr: reporter.on_step("teacher", s, l, lr))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_model(network, str(tmp))
    os.replace(tmp, path)  # atomic: a half-written teacher is never reused
    reporter.on_message(f"teacher: cached at {path}")
    return {"cached": False, "path": str(path)}


@gin.configurable(denylist=["teacher", "student", "task", "seed", "device", "reporter"])
def distillation(teacher: Network, student: Network, task, seed: int, device: torch.device, reporter: Reporter, *,
                 rounds: int = gin.REQUIRED, steps_per_round: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
                 policy: Callable = gin.REQUIRED, reward=gin.REQUIRED, loss: Callable = gin.REQUIRED,
                 optimizer: Callable = gin.REQUIRED, arms: Sequence[Sequence[str]] | None = None,
                 warmup_steps: int = 0, grad_clip: float = 1.0, amp: bool = False) -> Distiller:
    """Distil `student` from `teacher` for `rounds` rounds of `steps_per_round` (T) steps."""
    if rounds < 1 or steps_per_round < 1 or batch_size < 1:
        raise ConfigError(f"distillation.rounds, .steps_per_round and .batch_size must be >= 1, got "
                          f"{rounds}, {steps_per_round}, {batch_size}")
    arm_space = ArmSpace(student.model.module_names(), arms)
    if arm_space.names != teacher.model.module_names():
        raise ConfigError(f"teacher modules {teacher.model.module_names()} differ from the student's {arm_space.names}")
    objective = loss(student.model.distill_modules(), teacher.model.distill_modules()).to(device)
    params = list(student.parameters()) + list(objective.parameters())
    opt = optimizer(params)
    total = rounds * steps_per_round
    distiller = Distiller(
        teacher=teacher, student=student, task=task, loss=objective, arms=arm_space,
        policy=policy(num_arms=len(arm_space), seed=seed), reward=reward, optimizer=opt,
        scheduler=linear_warmup_decay(opt, total, warmup_steps), stream=BatchStream(task, "train", batch_size,
                                                                                     seed + 1, device),
        steps_per_round=steps_per_round, device=device, grad_clip=grad_clip, amp=amp, callbacks=[reporter])
    reporter.on_arms(arm_space.labels())
    reporter.on_stage("distill", total, "step")
    distiller.run(rounds)
    distiller.close()
    return distiller


@gin.configurable(denylist=["run_dir", "reporters"])
def experiment(run_dir: str, reporters: Sequence[Reporter] = (), *, task: Callable = gin.REQUIRED,
               teacher: Callable = gin.REQUIRED, student: Callable = gin.REQUIRED, head: Callable = gin.REQUIRED,
               seed: int = 0, device: str = "auto", eval_batch_size: int = 256) -> dict[str, Any]:
    """Teacher fine-tuning (cached), OPTIMA distillation, test evaluation.

    Writes TensorBoard events, `metrics.json` and `student.safetensors` to `run_dir`.
    """
    from safetensors.torch import save_model

    dev = resolve_device(device)
    seed_everything(seed)
    the_task = task()
    teacher_model = teacher()
    teacher_net = Network(teacher_model, head(teacher_model, the_task)).to(dev)
    seed_everything(seed + 1)
    student_model = student()
    student_net = Network(student_model, head(student_model, the_task)).to(dev)

    tb = TensorBoardReporter(os.path.join(run_dir, "tensorboard"))
    reporter = Reporters([tb, *reporters])
    try:
        tb.add_text("config/config.gin", gin.config_str())
        cache = teacher_training(teacher_net, the_task, seed, dev, reporter)
        distiller = distillation(teacher_net, student_net, the_task, seed, dev, reporter)
        metrics = {}
        for name, net in (("teacher", teacher_net), ("student", student_net)):
            metrics[name] = evaluate(net, the_task, "test", eval_batch_size, dev)
            reporter.on_eval(name, metrics[name])
        tb.add_text("config/operative_config.gin", gin.operative_config_str())
    finally:
        reporter.close()
    save_model(student_net, os.path.join(run_dir, "student.safetensors"))
    summary = {
        "metrics": metrics,
        "teacher_cache": cache,
        "params_M": {"teacher": _count(teacher_net), "student": _count(student_net)},
        "arms": distiller.arms.labels(),
        "plays": [r.arm for r in distiller.history],
        "rewards": [r.reward for r in distiller.history],
    }
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6
