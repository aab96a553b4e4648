"""The pipeline a gin file declares, as stages (each a gin configurable):

0. `pretraining` (optional): models pretrained with their own objective on a
   caption corpus, e.g. `experiment.pretraining = {'large': @large/coca_model,
   'base': @base/coca_model}` (CoCa's contrastive + captioning loss); the
   teacher starts from one (`experiment.teacher_pretrained = 'large'`, passed
   as its factory's `pretrained`) and the students sample their layers from
   one (`experiment.students_init_from = 'base'`, passed as `init_from`). This
   is how the synthetic protocol gets the paper's CoCa-Large and CoCa-Base;
1. `teacher_training`: the teacher fine-tuned on the task (or a checkpoint as is);
2. students built by their model factories (e.g. layers sampled from CoCa-Base);
3. `distillation`: each student distilled with any policy and reward, in order:
   `experiment.students = {'tiny12': @tiny12/coca_model, 'tiny6': @tiny6/coca_model}`
   distils Large -> Tiny12 -> Tiny6 (each student teaches the next). A stage runs
   inside the gin scope of its name, so `tiny6/distillation.rounds = 10` overrides
   one stage;
4. evaluation of every network on the task's test split.

Stages 0, 1 and 3 are cached under `experiment.cache_dir` by a key over everything
that decides their result: the initial weights (architecture, initialisation,
checkpoint), the task's fingerprint, the upstream stage's key, the seed and the
stage's gin bindings (`teacher_training.*` and the `teacher/` scope for the
teacher; `pretraining.*` and the stage's scope for a pretraining stage, whose
data is its corpus and whose seed is `pretraining.seed`, not the experiment's;
for a student stage every binding outside the teacher's and the other
stages' scopes, and outside scopes none of its bindings refers to, such as
the `tiny6/` scope `gin/common/students.gin` binds for a Tiny12-only run too).
A rerun, or a second experiment that shares a stage, reuses it; a stage is
locked while it is made (`.locks/` in the cache), so a parallel run that needs
the same stage (a sweep's) waits and then reuses it.
A stage built from a third-party plugin's components (a model, task, policy...
that `@name` references) is also keyed on that code: the plugin distribution's
version and installed files, and the source of the component's module
(`plugin_code`), so a reinstalled or edited plugin makes the stage again.
`OPTIMA_FRESH=1` (or `OPTIMA_FRESH=teacher,tiny6`) makes every (those) stage(s)
again whatever the cache holds, replacing the cache entries.
Bindings that only decide how a run is kept alive (`checkpoint_every`,
`keep_checkpoints`, `on_nonfinite`, `experiment.cache_dir`,
`experiment.data_workers`, `experiment.threads`) are left out of the keys.

Runs survive interruptions (`optima.checkpoint`): the teacher's fine-tuning every
`teacher_training.checkpoint_every` steps and each distillation stage every
`distillation.checkpoint_every` rounds (and at its last round) save a checkpoint
in `run_dir/checkpoints/<stage>/`; `experiment` resumes each stage from its
newest intact checkpoint there, bit for bit on the CPU. SIGINT and SIGTERM stop
a run after its current step with a checkpoint (`Interrupted`, exit code 130 or
143 in the CLI). Every binding is checked before any heavy work
(`optima.validation`).

Under torchrun every process runs the pipeline (`optima.distributed`): the loops
train their shards with DistributedDataParallel, rank 0 alone reports, writes
caches, checkpoints and outputs, and evaluates (the others get its metrics).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gin
import numpy as np
import torch

from optima import distributed
from optima.align import pair_layouts
from optima.arms import ArmSpace, build_policy
from optima.checkpoint import (Interrupts, RunKeeper, failed_writes, fault_point, is_operational, write_atomic,
                               write_json_atomic, write_text_atomic)
from optima.data import SkippedRecords, default_workers, to_device, worker_died
from optima.engine import BatchStream, Distiller, Finetuner, Network, evaluate
from optima.errors import ConfigError, warning
from optima.interfaces import Batch, batch_rows
from optima.predictions import write as write_predictions
from optima.program import program
from optima.reporting import Reporter, Reporters, RoundLog, TensorBoardReporter
from optima.stages import TEACHER
from optima.validation import check_value, integer, validate_experiment



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def torch_threads(threads: int | None) -> int:
    """The torch thread count a run uses: `experiment.threads` (`optima run
    --threads`) when bound, else `OMP_NUM_THREADS` when it is a positive integer
    (a sweep's `--threads`, torchrun's default), else 1. One thread, because
    the shipped CPU configs train tiny models, for which a second thread mostly
    waits on the first, and on a busy 2-core machine the two spin on each other
    (bench/thread_count.py; bench/results/thread_count.json)."""
    if threads is not None:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else 1


def resolve_device(device: str) -> torch.device:
    """'auto': a GPU if there is one (this process's, under torchrun), else the CPU."""
    return distributed.device(device)


def default_cache_dir() -> str:
    return os.environ.get("OPTIMA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "optima"))


@gin.configurable
def linear_warmup_decay(optimizer: torch.optim.Optimizer, total_steps: int,
                        warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to each group's lr, then linear decay to zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(pretrained: Sequence[torch.nn.Module], new: Sequence[torch.nn.Module],
                 new_lr: float | None) -> list[dict[str, Any]]:
    """Pretrained weights at the optimizer's lr; new parts (heads, projections) at
    `new_lr` when given (CoCa's recipe: e.g. 1e-3 pooler vs 5e-5 encoder).

    A parameter shared by two parts (the captioning head uses the model's own
    vocabulary projection) is listed once, in the first group that reaches it:
    torch refuses a parameter in two groups, and it is the model's weight."""
    seen: set[int] = set()

    def unique(modules: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
        out = []
        for m in modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    old = unique(pretrained)
    fresh = unique(new)
    return [{"params": old}, {"params": fresh, **({"lr": new_lr} if new_lr is not None else {})}]


# --- stage keys ------------------------------------------------------------------

def _weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _statements(config_text: str) -> list[str]:
    """gin's config text as one string per binding (continuation lines joined)."""
    out: list[str] = []
    for line in config_text.splitlines():
        if line[:1].isspace() and out:
            out[-1] += " " + line.strip()
        elif line.strip() and not line.startswith("#"):
            out.append(line.strip())
    return out


def _bindings(stage: str, stages: Sequence[str]) -> str:
    """The bindings that configure `stage` (see module doc). Which students follow
    does not change a stage, so `experiment.student(s)` is left out."""
    statements = [s for s in _statements(gin.config_str()) if not is_operational(s.split("=", 1)[0].strip())]
    if stage == TEACHER:
        return "\n".join(s for s in statements if s.startswith(("teacher_training.", "teacher/")))
    others = tuple(f"{s}/" for s in stages if s != stage) + (
        "teacher_training.", "teacher/", "experiment.student ", "experiment.students ")
    kept = [s for s in statements if not s.startswith(others)]
    # A scope that is not this stage's and that no kept binding refers to (`@scope/...`)
    # is another experiment's stage (students.gin binds tiny6/ for the Tiny12-only
    # config too): its bindings leave this stage as it is, so they stay out of its key.
    while True:
        referenced = {stage} | {scope for s in kept for path in re.findall(r"@([\w./]+)/", s)
                                for scope in path.split("/")}
        narrowed = [s for s in kept if set(_scopes(s)) <= referenced]
        if narrowed == kept:
            return "\n".join(kept)
        kept = narrowed


def _scopes(statement: str) -> list[str]:
    """`a/b/conf.param = v` -> ['a', 'b'] (a macro or unscoped binding: [])."""
    name = statement.split("=", 1)[0].strip()
    return name.split("/")[:-1]


def stage_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: `OPTIMA_FRESH=1` (or `all`): no stage is reused from the cache, each is made
#: again and its cache entry replaced; `OPTIMA_FRESH=teacher,tiny6`: those stages.
FRESH_ENV = "OPTIMA_FRESH"


def fresh(stage: str) -> bool:
    """Whether `OPTIMA_FRESH` asks for `stage` to be made again rather than reused."""
    value = os.environ.get(FRESH_ENV, "").strip()
    if value.lower() in ("", "0", "false", "no"):
        return False
    return value.lower() in ("1", "all", "true", "yes") or stage in {v.strip() for v in value.split(",")}


def _source_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def plugin_code(config_text: str) -> dict[str, str]:
    """The code of the third-party components `config_text` references
    (`@name`), for a stage's cache key: per distribution that provides one, its
    version and a digest of its installed files' record; per module of such a
    component, a digest of its source (an editable install's edits too). Empty
    when every component is this project's, so their keys do not change."""
    import importlib.metadata as metadata
    import inspect
    import sys

    from optima.registry import DISTRIBUTION, ENTRY_POINT_GROUP

    # the distributions that provide plugins (not torch, whose optimizers are configurables too)
    plugin_dists = {ep.dist.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
                    if getattr(ep, "dist", None) is not None} - {DISTRIBUTION}
    providers = metadata.packages_distributions()
    code: dict[str, str] = {}
    for name in sorted(set(re.findall(r"@([\w./]+)", config_text))):
        try:
            configurable = gin.config._REGISTRY.get_match(name.rsplit("/", 1)[-1])
        except Exception:  # noqa: BLE001 (not a configurable gin knows: nothing to key on)
            configurable = None
        module = sys.modules.get(getattr(getattr(configurable, "wrapped", None), "__module__", None) or "")
        if module is None:
            continue
        dists = [d for d in providers.get(module.__name__.split(".")[0], []) if d in plugin_dists]
        for dist in dists:
            try:
                record = metadata.distribution(dist).read_text("RECORD") or ""
                code[dist] = f"{metadata.version(dist)} {hashlib.sha256(record.encode()).hexdigest()[:16]}"
            except metadata.PackageNotFoundError:
                continue
        source = inspect.getsourcefile(module) if dists else None
        if source and os.path.isfile(source):
            code[module.__name__] = _source_digest(source)
    return code


def _plugin_key(stage_bindings: str) -> dict[str, Any]:
    """The `plugins` part of a stage's key (none for this project's components alone)."""
    code = plugin_code(stage_bindings + "\n" + _experiment_statements())
    return {"plugins": code} if code else {}


def _experiment_statements() -> str:
    """`experiment.*` bindings: the task, head and models every stage is built from."""
    return "\n".join(s for s in _statements(gin.config_str()) if s.startswith("experiment."))


def _save_atomic(network: torch.nn.Module, path: Path) -> None:
    """Written to a temporary file, fsynced, renamed: a half-written stage is never
    reused, and a failed write (a full disk) leaves what was there. Rank 0 writes."""
    from safetensors.torch import save_model

    if distributed.is_main():
        write_atomic(path, lambda tmp: save_model(network, str(tmp)))


def _save_state_atomic(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors, atomically (see `_save_atomic`); tensors that share
    memory are written as copies (safetensors refuses shared storage)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def _holds_state(path: Path, state: Mapping[str, torch.Tensor], reporter: Reporter) -> bool:
    """Whether a cached checkpoint file holds exactly `state`'s tensors (names and
    shapes); an unreadable or different one is reported, removed and redone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if shapes == {k: tuple(v.shape) for k, v in state.items()}:
            return True
        problem = "its tensors differ from the model's"
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        problem = f"unreadable ({str(e).splitlines()[0]})"
    reporter.on_message(f"warning: cache file {path} is {problem}; redoing it")
    with contextlib.suppress(OSError):
        path.unlink()
    return False


def _load_cached(network: torch.nn.Module, path: Path, device: torch.device, reporter: Reporter) -> bool:
    """Load a cached stage; a corrupt cache file is reported, removed and redone."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(network, str(path), device=str(device))
        return True
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        reporter.on_message(warning(f"cache file {path} is unreadable ({str(e).splitlines()[0]}); redoing it"))
        with contextlib.suppress(OSError):
            path.unlink()
        return False


def _reuse(network: torch.nn.Module, path: Path, device: torch.device, reporter: Reporter, *also: Path) -> bool:
    """Load the cached stage `path` if it (and `also`) exists. Rank 0 decides and
    checks the file (see `_load_cached`); the other ranks then load the same file."""
    from safetensors.torch import load_model

    usable = None
    if distributed.is_main():
        usable = path.exists() and all(p.exists() for p in also) and _load_cached(network, path, device, reporter)
    usable = distributed.broadcast_object(usable)
    if usable and not distributed.is_main():
        load_model(network, str(path), device=str(device))
    return bool(usable)


_held_locks: dict[Path, int] = {}  # the stage locks this process holds: lock file -> descriptor


def _lock_stage(path: Path, stage: str, reporter: Reporter, keeper: RunKeeper | None) -> None:
    """Lock the cached stage `path` until `_release_stage_locks` (which `_run`
    calls when the stage is done, or failed): while another process holds it
    (it is making that stage), wait, then find the stage cached. An advisory
    lock on `.locks/<file name>.lock` in the cache, released by the system when
    its process ends, however it ends."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        return
    lock = path.parent / ".locks" / f"{path.name}.lock"
    if lock in _held_locks or not distributed.is_main():  # one rank of a torchrun run makes the stages
        return
    with failed_writes(lambda: None, lambda why: f"could not write {lock}: {why}"):
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not waiting:
                reporter.on_message(f"{stage}: another run is making {path.name}; waiting to reuse it")
                waiting = True
            if keeper is not None and keeper.signalled:  # rank 0 alone waits here: no agreement to ask for
                os.close(fd)
                raise keeper.interrupts.stop(f"while waiting for {path.name}") from None
            time.sleep(0.5)
        except OSError as e:  # a filesystem without locks (NFS without lockd, Lustre's noflock)
            os.close(fd)
            reporter.on_message(f"{stage}: the cache's filesystem cannot lock {lock} ({e.strerror}); going on "
                                "without the lock: two runs started together may both make this stage (set "
                                "OPTIMA_CACHE to a local directory to share it safely)")
            return
    _held_locks[lock] = fd


def _release_stage_locks() -> None:
    while _held_locks:
        os.close(_held_locks.popitem()[1])


# --- stages ----------------------------------------------------------------------

@gin.configurable(denylist=["network", "task", "seed", "device", "reporter", "cache", "keeper", "workers"])
def teacher_training(network: Network, task, seed: int, device: torch.device, reporter: Reporter, cache: Path,
                     keeper: RunKeeper | None = None, workers: int = 0, *,
                     steps: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
                     optimizer: Callable = gin.REQUIRED, head_lr: float | None = None, warmup_steps: int = 0,
                     grad_clip: float = 1.0, amp: bool = False, compile: bool | str = False, checkpoint_every: int = 500,
                     keep_checkpoints: int = 2, on_nonfinite: str = "stop") -> dict[str, Any]:
    """Fine-tune the teacher on the task (`steps = 0`: use it as loaded), or load
    the cached result. With a `keeper`, a checkpoint every `checkpoint_every`
    steps (the last `keep_checkpoints` kept), and the fine-tuning resumes from
    the newest one. `on_nonfinite`: 'stop' or 'skip' a step whose loss is NaN or inf."""
    if steps < 0 or batch_size < 1:
        raise ConfigError(f"teacher_training.steps must be >= 0 and .batch_size >= 1, got {steps}, {batch_size}")
    bindings = _bindings(TEACHER, ())
    key = stage_key(weights=_weights_digest(network), task=task.fingerprint(), seed=seed, bindings=bindings,
                    **_plugin_key(bindings))
    if steps == 0:
        return {"key": key, "cached": False, "trained": False}
    path = cache / f"teacher-{key}.safetensors"
    _lock_stage(path, TEACHER, reporter, keeper)  # parallel runs train a teacher once
    if not fresh(TEACHER) and _reuse(network, path, device, reporter):
        reporter.on_message(f"teacher: reusing {path}")
        return {"key": key, "cached": True, "path": str(path)}
    opt = optimizer(param_groups([network.model], [network.head], head_lr))
    tuner = Finetuner(network, task, steps=steps, batch_size=batch_size, optimizer=opt,
                      scheduler=linear_warmup_decay(opt, steps, warmup_steps), seed=seed, device=device,
                      grad_clip=grad_clip, amp=amp, callbacks=[reporter], on_nonfinite=on_nonfinite, name=TEACHER,
                      workers=workers, compile=compile)
    result: dict[str, Any] = {"key": key, "cached": False, "path": str(path)}
    after_step = None
    if keeper is not None:
        found = keeper.resume(TEACHER, tuner, keep=keep_checkpoints, key=key)
        if found is not None:
            result["resumed_from_step"] = found.step

        def after_step(t: Finetuner) -> None:
            fault_point("teacher", t.step)
            saved = None
            if t.step % checkpoint_every == 0 and t.step < steps:
                saved = keeper.save(TEACHER, t, keep=keep_checkpoints, key=key)
            if keeper.interrupted:
                saved = saved or keeper.save(TEACHER, t, keep=keep_checkpoints, key=key)
                raise keeper.stop(f"after teacher step {t.step}", saved)

    reporter.on_stage(TEACHER, steps, "step", tuner.step)
    try:
        tuner.run(after_step)
    finally:
        tuner.stream.close()
    _save_atomic(network, path)
    reporter.on_message(f"teacher: cached at {path}")
    if tuner.skipped:
        result["skipped_steps"] = tuner.skipped
    skipped_records = distributed.union(tuner.stream.skipped_records)  # each rank met its shards' files
    if skipped_records:
        result["skipped_records"] = skipped_records
    return result


@gin.configurable(denylist=["name", "factory", "device", "reporter", "cache", "keeper", "workers"])
def pretraining(name: str, factory: Callable, device: torch.device, reporter: Reporter, cache: Path,
                keeper: RunKeeper | None = None, workers: int = 0, *, corpus: Callable = gin.REQUIRED, steps: int = gin.REQUIRED,
                batch_size: int = gin.REQUIRED, optimizer: Callable = gin.REQUIRED, warmup_steps: int = 0,
                term_weights: Mapping[str, float] | None = None, seed: int = 0, grad_clip: float = 1.0,
                amp: bool = False, compile: bool | str = False, checkpoint_every: int = 500, keep_checkpoints: int = 2,
                on_nonfinite: str = "stop") -> dict[str, Any]:
    """Pretrain the model `factory()` with its own objective
    (`DistillableModel.pretraining_losses`, e.g. CoCa's contrastive + captioning
    loss) on the batches of `corpus()` (a task in the captioning batch format),
    or find it cached. Returns `{"key", "path", "cached"}`; `path` is the
    checkpoint (`checkpoint_state()`, safetensors) that the teacher's and the
    students' factories load.

    `seed` (not the experiment's) draws the initial weights and the data order:
    like a downloaded CoCa, one pretrained model serves every experiment seed.
    `term_weights`: weight of each term (1 where not given; CoCa: caption 2,
    contrastive 1). Checkpointed and resumed like `teacher_training`."""
    for binding, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}/pretraining.{binding} must be an integer >= {low}, got {value!r}")
    seed_everything(seed)
    model = factory().to(device)
    data = corpus()
    bindings = _pretraining_bindings(name)
    key = stage_key(weights=_weights_digest(model), corpus=data.fingerprint(), seed=seed, bindings=bindings,
                    **_plugin_key(bindings))
    path = cache / f"pretrained-{key}.safetensors"
    _lock_stage(path, name, reporter, keeper)  # runs of a sweep pretrain once
    result: dict[str, Any] = {"key": key, "path": str(path), "cached": True}
    usable = (not fresh(name) and path.exists() and _holds_state(path, model.checkpoint_state(), reporter)
              if distributed.is_main() else None)
    if distributed.broadcast_object(usable):  # rank 0 checks the file
        reporter.on_message(f"{name}: reusing {path}")
        return result
    probe = next(iter(data.batches("train", 2, shuffle=False, seed=0)))
    terms = model.pretraining_losses({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in probe.items()})
    unknown = sorted(set(term_weights or {}) - set(terms))
    if unknown:
        raise ConfigError(f"{name}/pretraining.term_weights names {unknown}, but {type(model).__name__}'s "
                          f"pretraining terms are {sorted(terms)}")
    opt = optimizer([p for p in model.parameters() if p.requires_grad])
    tuner = Finetuner(model, data, steps=steps, batch_size=batch_size, optimizer=opt,
                      scheduler=linear_warmup_decay(opt, steps, warmup_steps), seed=seed, device=device,
                      grad_clip=grad_clip, amp=amp, callbacks=[reporter], on_nonfinite=on_nonfinite, name=name,
                      binding=f"{name}/pretraining.on_nonfinite", workers=workers, objective=model.pretraining_losses,
                      term_weights=term_weights, compile=compile)
    result["cached"] = False
    after_step = None
    if keeper is not None:
        found = keeper.resume(name, tuner, keep=keep_checkpoints, key=key)
        if found is not None:
            result["resumed_from_step"] = found.step

        def after_step(t: Finetuner) -> None:
            fault_point(name, t.step)
            saved = None
            if t.step % checkpoint_every == 0 and t.step < steps:
                saved = keeper.save(name, t, keep=keep_checkpoints, key=key)
            if keeper.interrupted:
                saved = saved or keeper.save(name, t, keep=keep_checkpoints, key=key)
                raise keeper.stop(f"after {name} pretraining step {t.step}", saved)

    reporter.on_stage(name, steps, "step", tuner.step)
    try:
        tuner.run(after_step)
    finally:
        tuner.stream.close()
    result["final_terms"] = dict(tuner.last_terms)
    if distributed.is_main():
        _save_state_atomic(model.checkpoint_state(), path)
    distributed.barrier()  # the teacher and students load it from there
    reporter.on_message(f"{name}: pretrained, cached at {path}")
    if tuner.skipped:
        result["skipped_steps"] = tuner.skipped
    return result


def _pretraining_bindings(name: str) -> str:
    """The bindings of pretraining stage `name`: `pretraining.*` and its own scope
    (the corpus's bindings are in its fingerprint, the model's in its weights)."""
    statements = [s for s in _statements(gin.config_str()) if not is_operational(s.split("=", 1)[0].strip())]
    return "\n".join(s for s in statements if s.startswith(("pretraining.", f"{name}/")))


@gin.configurable(denylist=["name", "teacher", "student", "task", "seed", "device", "reporter", "workers"])
def distillation(name: str, teacher: Network, student: Network, task, seed: int, device: torch.device,
                 reporter: Reporter, workers: int = 0, *, rounds: int = gin.REQUIRED, steps_per_round: int = gin.REQUIRED,
                 batch_size: int = gin.REQUIRED, policy: Callable = gin.REQUIRED, reward=gin.REQUIRED,
                 loss: Callable = gin.REQUIRED, optimizer: Callable = gin.REQUIRED,
                 arms: Sequence[Sequence[str]] | None = None, arm_groups: Any = 1, head_lr: float | None = None,
                 warmup_steps: int = 0, grad_clip: float = 1.0, amp: bool = False, compile: bool | str = False,
                 checkpoint_every: int = 5, keep_checkpoints: int = 2, on_nonfinite: str = "stop",
                 reward_probe: int = 0, empty_arm: bool = False, alignment_gate: bool = False,
                 gate_halflife: float = 0.0) -> Distiller:
    """Build the `Distiller` of one stage: `rounds` rounds of `steps_per_round` (T) steps.

    `checkpoint_every` (rounds) and `keep_checkpoints`: how often the stage is
    saved in a run and how many checkpoints are kept (the last round is always
    saved; a checkpoint holds the student and its optimizer's moments, so every
    round would cost a big student seconds per round); `on_nonfinite`: 'stop' at
    a NaN or inf loss, or 'skip' that step. `compile`: True runs student and
    teacher under `torch.compile` (inductor; a string names another backend),
    faster on a GPU after the first steps compile (also `teacher_training.compile`,
    `pretraining.compile`). `arm_groups` (default 1: whole modules, the paper)
    splits modules into layer groups, and the arms are sets of groups
    (`optima.arms.layer_groups`; `arms` then lists groups, e.g.
    `[['image.1', 'text.2']]`). `reward_probe` (batches; 0, the default, is the
    paper's reward over the round's own training losses): the reward compares the
    whole model's losses on these fixed training batches before and after each
    round instead (`Distiller.probe_losses`, docs/method.md); a reward with a probe of
    its own (`Reward.probe`, e.g. `heldout_task_reward`) measures on those batches.
    `empty_arm` adds the arm without layer losses (task and output KD only).
    `alignment_gate` drops, at each step, the layer losses of every module of the
    played arm whose gradient points against the task loss's (`Distiller._gated`);
    `gate_halflife` (steps; 0: each step's own cosine) averages that evidence."""
    for binding, value in (("rounds", rounds), ("steps_per_round", steps_per_round), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"distillation.{binding} must be an integer >= 1, got {value!r}")
    if isinstance(reward_probe, bool) or not isinstance(reward_probe, int) or reward_probe < 0:
        raise ConfigError(f"distillation.reward_probe must be an integer >= 0 (batches; 0: the round's own "
                          f"losses), got {reward_probe!r}")
    for binding, value in (("empty_arm", empty_arm), ("alignment_gate", alignment_gate)):
        if not isinstance(value, bool):
            raise ConfigError(f"distillation.{binding} must be True or False, got {value!r}")
    if isinstance(gate_halflife, bool) or not isinstance(gate_halflife, (int, float)) or gate_halflife < 0:
        raise ConfigError(f"distillation.gate_halflife must be a number of steps >= 0, got {gate_halflife!r}")
    arm_space = ArmSpace.of_model(student.model, arms, arm_groups, empty=empty_arm)
    if arm_space.names != teacher.model.module_names():
        raise ConfigError(f"teacher modules {teacher.model.module_names()} differ from the student's {arm_space.names}")
    objective = loss(student.model.distill_modules(), teacher.model.distill_modules(),
                     **pair_layouts(student.model, teacher.model)).to(device)
    opt = optimizer(param_groups([student.model], [student.head, objective], head_lr))
    total = rounds * steps_per_round
    return Distiller(
        name=name, teacher=teacher, student=student, task=task, loss=objective, arms=arm_space,
        policy=build_policy(policy, len(arm_space), seed, arm_space.features(), horizon=rounds),
        reward=reward, optimizer=opt,
        scheduler=linear_warmup_decay(opt, total, warmup_steps),
        stream=BatchStream(task, "train", batch_size, seed + 1, device, warn=reporter.on_message, workers=workers),
        steps_per_round=steps_per_round,
        rounds=rounds, device=device, grad_clip=grad_clip, amp=amp, callbacks=[reporter],
        on_nonfinite=on_nonfinite, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        compile=compile, probe=reward_probe_batches(reward, task, batch_size, reward_probe, seed, device),
        alignment_gate=alignment_gate, gate_halflife=gate_halflife)


def reward_probe_batches(reward, task, batch_size: int, reward_probe: int, seed: int,
                         device: torch.device) -> list[Batch]:
    """The fixed batches the reward measures the model on: the reward's own
    (`Reward.probe`, e.g. held-out batches), or `reward_probe` training batches."""
    own = getattr(reward, "probe", None)
    if own is None:
        return probe_batches(task, batch_size, reward_probe, seed, device)
    if reward_probe:
        raise ConfigError(f"distillation.reward_probe = {reward_probe}: {type(reward).__name__} measures the model "
                          f"on its own {own[1]} batch(es) of the {own[0]!r} split; leave reward_probe at 0")
    return probe_batches(task, batch_size, own[1], seed, device, split=own[0],
                         binding=f"{type(reward).__name__}'s probe ({own[1]} batches)")


def probe_batches(task, batch_size: int, count: int, seed: int, device: torch.device, split: str = "train",
                  binding: str | None = None) -> list[Batch]:
    """`count` batches of `split` in an order of their own (seed + 2; the stream
    uses seed + 1), on `device`: the reward's probe."""
    if count == 0:
        return []
    batches = [to_device(b, device) for b in itertools.islice(
        task.batches(split, batch_size, shuffle=True, seed=seed + 2), count)]
    if len(batches) < count:
        what = binding or f"distillation.reward_probe = {count}"
        hint = " (give the task held-out examples, e.g. its val_size binding)" if split != "train" else ""
        where = "the training split" if split == "train" else f"the {split!r} split"
        raise ConfigError(f"{what}: {where} holds only {len(batches)} batch(es) of {batch_size}{hint}")
    return batches


@dataclass(frozen=True)
class Declared:
    """What a parsed config declares, its factories uncalled (`optima.config.declared()`):
    what `optima eval` and `optima export` rebuild a stage's network from."""

    task: Callable
    teacher: Callable
    head: Callable
    #: student stages by name, in order
    stages: Mapping[str, Callable]
    seed: int
    device: str
    eval_batch_size: int
    #: the pretraining stages whose checkpoints the teacher / the students start from, if any
    teacher_pretrained: str | None = None
    students_init_from: str | None = None

    def stage_names(self) -> list[str]:
        return [TEACHER, *self.stages]

    def network(self, stage: str, task, device: torch.device,
                pretrained: Mapping[str, str] | None = None, complete: bool = False) -> Network:
        """The stage's network (model + head) as the run builds it, in the stage's
        gin scope. `pretrained`: the run's pretraining checkpoints by stage name
        (its `metrics.json`), for a config whose models start from one.
        `complete`: the caller loads every weight next (an export, a saved
        network), so the starting checkpoint is not needed."""
        if stage not in self.stage_names():
            raise ConfigError(f"no stage {stage!r}; the config's stages are {', '.join(self.stage_names())}")
        binding, source = ("pretrained", self.teacher_pretrained) if stage == TEACHER \
            else ("init_from", self.students_init_from)
        weights = {}
        if source is not None and not complete:
            path = (pretrained or {}).get(source)
            if not path:
                raise ConfigError(f"the config's {stage} starts from the pretraining stage {source!r}, whose "
                                  f"checkpoint only a run records: pass the run directory as --checkpoint")
            weights = {binding: path}
        factory = self.teacher if stage == TEACHER else self.stages[stage]
        with gin.config_scope(stage):
            return _network(factory, self.head, task, device, **weights)


@gin.configurable(denylist=["run_dir", "reporters", "dry_run", "validate_only", "declared_only"])
def experiment(run_dir: str | None, reporters: Sequence[Reporter] = (), dry_run: bool = False,
               validate_only: bool = False, declared_only: bool = False, *,
               task: Callable = gin.REQUIRED, teacher: Callable = gin.REQUIRED, head: Callable = gin.REQUIRED,
               student: Callable | None = None, students: Mapping[str, Callable] | None = None,
               pretraining: Mapping[str, Callable] | None = None, teacher_pretrained: str | None = None,
               students_init_from: str | None = None,
               seed: int = 0, device: str = "auto", eval_batch_size: int = 256,
               cache_dir: str | None = None, data_workers: int | None = None,
               threads: int | None = None) -> dict[str, Any]:
    """Pretraining (optional, cached), teacher (cached), one or more distillation
    stages (cached), test evaluation.

    `student` is shorthand for `students = {'student': ...}`. `pretraining`:
    name -> model factory, each pretrained by the `pretraining` stage in the
    scope of its name; `teacher_pretrained` / `students_init_from`: the
    pretraining stage whose checkpoint is passed as the teacher factory's
    `pretrained` / every student factory's `init_from`. Writes TensorBoard
    events (one run per stage), `<student>.safetensors`, the test predictions
    of every network in the task's official format
    (`predictions/<stage>/<Task.predictions_file>`) and, last, `metrics.json`
    (so its presence marks a finished run) to `run_dir`, and checkpoints to
    `run_dir/checkpoints/`; a stage with
    checkpoints there is resumed from its newest intact one. Every binding is
    validated first (`optima.validation`); `validate_only` stops there, and
    `declared_only` returns what is declared (`Declared`). With
    `dry_run`, builds every model on the meta device and returns the plan
    instead (nothing is loaded, trained or written).

    `data_workers`: DataLoader worker processes that make the batches of a task
    with a `batch_source` (the image tasks), per training process; None: one
    fewer than the CPUs available to the process (`optima.data.default_workers`).
    The batches do not depend on it, so it may change on resume.

    `threads`: torch's intra-op threads in the training process (`torch_threads`:
    None is `OMP_NUM_THREADS` if set, else 1), set here before any other torch
    work and recorded as `torch_threads` in `metrics.json`; DataLoader workers
    run one thread each (torch sets that in every worker). A CPU run is bit for
    bit the same only at the same thread count, so a resume should keep it; it
    is not part of the stage keys (a cached stage is reused at any count).
    """
    if threads is not None:
        check_value("experiment.threads", threads, integer(1))
    torch.set_num_threads(torch_threads(threads))
    if (student is None) == (students is None):
        raise ConfigError("bind exactly one of experiment.student and experiment.students")
    stages = dict(students) if students is not None else {"student": student}
    if TEACHER in stages:
        raise ConfigError(f"'{TEACHER}' is reserved; rename that student in experiment.students")
    pretrain = dict(pretraining or {})
    for name in pretrain:
        if name == TEACHER or name in stages:
            raise ConfigError(f"experiment.pretraining stage {name!r} has the name of another stage; rename it")
    for binding, name in (("teacher_pretrained", teacher_pretrained), ("students_init_from", students_init_from)):
        if name is not None and name not in pretrain:
            raise ConfigError(f"experiment.{binding} = {name!r} is not a stage of experiment.pretraining "
                              f"({', '.join(map(repr, pretrain)) or 'none bound'})")
    validate_experiment(task=task, teacher=teacher, stages=stages, seed=seed, device=device,
                        eval_batch_size=eval_batch_size, data_workers=data_workers, device_present=not dry_run,
                        pretraining=list(pretrain))
    if validate_only:
        return {}
    if declared_only:
        return Declared(task, teacher, head, stages, seed, device, eval_batch_size, teacher_pretrained,
                        students_init_from)
    if dry_run:
        from optima.plan import dry_run_plan

        return dry_run_plan(task, teacher, head, stages, seed, pretrain)

    with Interrupts() as interrupts:
        try:
            return _run(run_dir, reporters, interrupts, task=task, teacher=teacher, head=head, stages=stages,
                        seed=seed, device=device, eval_batch_size=eval_batch_size, cache_dir=cache_dir,
                        workers=default_workers() if data_workers is None else data_workers, pretrain=pretrain,
                        teacher_pretrained=teacher_pretrained, students_init_from=students_init_from)
        except RuntimeError as e:  # torch raises a dead worker's error wherever the run is (SIGCHLD)
            died = worker_died(e)
            if died is None:
                raise
            raise died from None


def _run(run_dir: str, reporters: Sequence[Reporter], interrupts: Interrupts, *, task: Callable, teacher: Callable,
         head: Callable, stages: Mapping[str, Callable], seed: int, device: str, eval_batch_size: int,
         cache_dir: str | None, workers: int, pretrain: Mapping[str, Callable], teacher_pretrained: str | None,
         students_init_from: str | None) -> dict[str, Any]:
    dev = resolve_device(device)
    cache = Path(cache_dir or default_cache_dir())
    seed_everything(seed)
    the_task = task()
    for split in ("train", "test"):  # before any training: no hang on no data, no metric of nothing at the end
        _require_examples(the_task, split)
    # rank 0 reports (TensorBoard, the round log, the CLI's progress); the other ranks only compute
    tb = TensorBoardReporter(os.path.join(run_dir, "tensorboard")) if distributed.is_main() else None
    rounds = RoundLog(os.path.join(run_dir, "rounds")) if distributed.is_main() else None
    reporter = Reporters([tb, rounds, *reporters]) if tb is not None else Reporter()
    if rounds is not None:
        rounds.warn = reporter.on_message
    keeper = RunKeeper(run_dir, interrupts, reporter.on_message)
    summary: dict[str, Any] = {"metrics": {}, "params_M": {}, "stages": {}, "torch_threads": torch.get_num_threads()}
    try:
        if tb is not None:
            tb.add_text("config/config.gin", gin.config_str())
        checkpoints = {}
        for name, factory in pretrain.items():
            with gin.config_scope(name):
                summary["stages"][name] = pretraining(name, factory, dev, reporter, cache, keeper, workers)
            _release_stage_locks()
            checkpoints[name] = summary["stages"][name]["path"]
        teacher_weights = {"pretrained": checkpoints[teacher_pretrained]} if teacher_pretrained else {}
        student_weights = {"init_from": checkpoints[students_init_from]} if students_init_from else {}

        if pretrain:
            seed_everything(seed)  # the pretraining stages drew from pretraining.seed
        with gin.config_scope(TEACHER):
            teacher_net = _network(teacher, head, the_task, dev, **teacher_weights)
        summary["params_M"][TEACHER] = _count(teacher_net)
        networks = {TEACHER: teacher_net}
        _reset_peak_memory(dev)
        summary["stages"][TEACHER] = teacher_training(teacher_net, the_task, seed, dev, reporter, cache, keeper,
                                                     workers)
        _record_peak_memory(summary["stages"][TEACHER], dev)
        _release_stage_locks()
        upstream, current_teacher = summary["stages"][TEACHER]["key"], teacher_net
        for i, (name, factory) in enumerate(stages.items()):
            seed_everything(seed + 1 + i)
            _reset_peak_memory(dev)
            with gin.config_scope(name):
                student_net = _network(factory, head, the_task, dev, **student_weights)
                summary["params_M"][name] = _count(student_net)
                result = _distillation_stage(name, current_teacher, student_net, the_task, seed, dev, reporter,
                                             cache, upstream, list(stages), keeper, workers)
                _release_stage_locks()
            summary["stages"][name] = _record_peak_memory(result, dev)
            if rounds is not None:
                _share_round_log(rounds.path(name), Path(result["path"]), reused=result["cached"])
            networks[name] = student_net
            upstream, current_teacher = result["key"], student_net
        unreadable = SkippedRecords(reporter.on_message)
        predictions: dict[str, list[dict]] = {}
        for name, net in networks.items():
            if keeper.interrupted:  # every stage is finished and cached: a resume only evaluates
                raise keeper.stop("before the evaluation")
            # rank 0 evaluates the whole split (a task's metric is over all of it) and tells the others
            records = [] if the_task.predictions_file and distributed.is_main() else None
            metrics = evaluate(net, the_task, "test", eval_batch_size, dev, skipped=unreadable,
                               workers=workers, predictions=records) if distributed.is_main() else None
            summary["metrics"][name] = distributed.broadcast_object(metrics)
            if records is not None:
                predictions[name] = records
            reporter.on_eval(name, summary["metrics"][name])
        # damaged files left out of training (stages trained in this run) and evaluation
        reasons = [r for stage in summary["stages"].values() for r in stage.get("skipped_records", ())]
        summary["skipped_records"] = list(dict.fromkeys([*reasons, *unreadable]))  # one line per damaged file
        if tb is not None:
            tb.add_text("config/operative_config.gin", gin.operative_config_str())
    except BaseException:
        with contextlib.suppress(Exception):  # the error in flight is the one to report
            reporter.close()
        raise
    else:
        reporter.close()  # a log write that fails here stops the run like any other write
    finally:
        _release_stage_locks()
    for name in stages:
        _save_atomic(networks[name], Path(run_dir) / f"{name}.safetensors")
    if distributed.is_main():
        if predictions:  # the test split's predictions in the task's official format
            summary["predictions"] = {
                name: os.path.relpath(write_predictions(records, os.path.join(run_dir, "predictions", name,
                                                                               the_task.predictions_file)), run_dir)
                for name, records in predictions.items()}
        write_json_atomic(os.path.join(run_dir, "metrics.json"), summary, indent=1)  # NaN and inf as null
        _write_figures(run_dir, reporter)
    return summary


def _require_examples(task, split: str) -> None:
    """A `ConfigError` unless `split` yields at least one example (damaged ones
    are left out; the first readable one ends the search)."""
    skipped = SkippedRecords()
    for batch in task.batches(split, 1, shuffle=False, seed=0):
        if batch_rows(skipped.take(batch)):
            return
    raise ConfigError(f"the {split} split of {type(task).__name__} has no examples{skipped.why_none()}; "
                      "check its data files and bindings")


def _share_round_log(log: Path, stage_file: Path, reused: bool) -> None:
    """A stage's round log is kept beside it in the cache, so that a run reusing
    the stage has its rounds (and figures) too."""
    kept = stage_file.with_suffix(".rounds.jsonl")
    source, target = (kept, log) if reused else (log, kept)
    if source.exists():
        write_text_atomic(target, source.read_text(encoding="utf-8"))


def _write_figures(run_dir: str, reporter: Reporter) -> None:
    """The run's figures (`optima report RUN_DIR` makes them again); a figure that
    fails costs a warning, never the finished run."""
    from optima.figures import write_run_figures

    try:
        write_run_figures(run_dir, warn=reporter.on_message, operative=gin.operative_config_str())
    except Exception as e:  # noqa: BLE001 (the run is done and saved; say what failed and go on)
        reporter.on_message(warning(f"the run's figures were not written: {type(e).__name__}: {e}; "
                                    f"try: {program()} report {run_dir}"))


def _network(model_factory: Callable, head: Callable, task, device: torch.device, **weights: str) -> Network:
    """`weights`: a pretraining stage's checkpoint as the factory's `pretrained` or `init_from`."""
    try:
        model = model_factory(**weights)
    except TypeError as e:
        if weights and any(f"'{k}'" in str(e) for k in weights):
            raise ConfigError(f"{getattr(model_factory, '__name__', model_factory)} takes no "
                              f"{'/'.join(weights)} argument, so it cannot start from a pretraining stage "
                              f"(experiment.teacher_pretrained / students_init_from)") from None
        raise
    return Network(model, head(model, task)).to(device)


def _distillation_stage(name, teacher, student, task, seed, device, reporter, cache, upstream, stages,
                        keeper: RunKeeper | None = None, workers: int = 0):
    bindings = _bindings(name, stages)
    key = stage_key(weights=_weights_digest(student), task=task.fingerprint(), seed=seed, upstream=upstream,
                    bindings=bindings, **_plugin_key(bindings))
    path = cache / f"student-{key}.safetensors"
    _lock_stage(path, name, reporter, keeper)
    record = path.with_suffix(".json")
    if not fresh(name) and _reuse(student, path, device, reporter, record):
        reporter.on_message(f"{name}: reusing {path}")
        return {**json.loads(record.read_text()), "cached": True}
    distiller = distillation(name, teacher, student, task, seed, device, reporter, workers)
    resumed = None
    hooks: dict[str, Any] = {}
    if keeper is not None:
        keep = distiller.keep_checkpoints
        resumed = keeper.resume(name, distiller, keep=keep, key=key)

        def after_step(d: Distiller) -> None:
            fault_point("step", d.step)
            if keeper.interrupted:  # mid-round: the checkpoint holds the round in progress
                raise keeper.stop(f"after step {d.step} of {name} (round {d.round})",
                                  keeper.save(name, d, keep=keep, key=key))

        def after_round(d: Distiller, result) -> None:
            if d.round % d.checkpoint_every == 0 or d.round == d.rounds:
                keeper.save(name, d, keep=keep, key=key)

        hooks = {"after_step": after_step, "after_round": after_round}
    reporter.on_arms(name, distiller.arms.labels())
    reporter.on_units(name, list(distiller.arms.units))
    reporter.on_stage(name, distiller.rounds * distiller.steps_per_round, "step", distiller.step)
    try:
        distiller.run(**hooks)
    finally:
        distiller.close()
        distiller.stream.close()
    result = {"key": key, "path": str(path), "arms": distiller.arms.labels(),
              "plays": [r.arm for r in distiller.history], "rewards": [r.reward for r in distiller.history]}
    if distiller.skipped:
        result["skipped_steps"] = distiller.skipped
    skipped_records = distributed.union(distiller.stream.skipped_records)
    if skipped_records:
        result["skipped_records"] = skipped_records
    _save_atomic(student, path)
    if distributed.is_main():
        write_json_atomic(record, result)
    return {**result, "cached": False, **({"resumed_from_step": resumed.step} if resumed else {})}


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _record_peak_memory(stage: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """On a GPU, the stage's peak memory (`torch.cuda.max_memory_allocated`, GiB;
    a resumed stage: since the resume) goes into metrics.json with it."""
    if device.type == "cuda":
        stage["peak_gpu_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    return stage


def _count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6
