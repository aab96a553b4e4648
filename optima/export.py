"""From a finished run to files other people use (`optima export`), and the
saved networks `optima eval` reads.

An export of stage `S` of a run is a folder with:

- the model in its own library's format, written by the model plugin's
  `DistillableModel.export` (CoCa: open_clip's JSON model config and state
  dict, loadable with `open_clip.add_model_config(dir)` and
  `open_clip.create_model(name, pretrained=dir/open_clip_model.safetensors)`
  and no OPTIMA code);
- `head.safetensors`: the task head's weights; its metadata names the head's
  registered factory, its bindings and the task's number of outputs, so that
  `load_head(path, model)` rebuilds it;
- `MODEL_CARD.md` (`optima.model_card`) and `export.json` (what was exported,
  from which run, with which metrics).

A run is finished when its `metrics.json` exists: the run writes it last.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from optima.checkpoint import failed_writes, write_text_atomic
from optima.errors import ConfigError
from optima.program import program
from optima.stages import TEACHER

EXPORT_RECORD = "export.json"
HEAD_FILE = "head.safetensors"
CARD_FILE = "MODEL_CARD.md"


@dataclass(frozen=True)
class Run:
    """A finished run directory and its `metrics.json`."""

    directory: Path
    summary: dict[str, Any]

    @property
    def stages(self) -> list[str]:
        """The run's networks in order: the teacher, then the distillation stages."""
        return [TEACHER, *self.students]

    @property
    def students(self) -> list[str]:
        return [s for s, info in self.summary["stages"].items() if s != TEACHER and "arms" in info]

    @property
    def pretrained(self) -> dict[str, str]:
        """The checkpoints of the run's pretraining stages, by name (what its models started from)."""
        return {s: info["path"] for s, info in self.summary["stages"].items()
                if s not in self.stages and isinstance(info, dict) and info.get("path")}

    def check_stage(self, stage: str | None) -> str:
        """`stage`, or the run's last student when None; a stage the run does not have is refused."""
        if stage is None:
            if not self.students:
                raise ConfigError(f"run {self.directory} has no student stage")
            return self.students[-1]
        if stage not in self.stages:
            raise ConfigError(f"run {self.directory} has no stage {stage!r}; its stages are {', '.join(self.stages)}")
        return stage

    def weights(self, stage: str) -> str | None:
        """The stage's weights file (network layout: model and head), or None for a
        teacher used as loaded (`teacher_training.steps = 0`)."""
        if stage == TEACHER:
            info = self.summary["stages"][TEACHER]
            path = info.get("path")
            if path is None:
                return None
            if not os.path.isfile(path):
                raise ConfigError(f"the teacher of run {self.directory} was cached at {path}, which no longer "
                                  f"exists; rerun the experiment to train it again")
            return path
        path = self.directory / f"{stage}.safetensors"
        if not path.is_file():
            raise ConfigError(f"run {self.directory} has no {path.name}; was it moved or deleted?")
        return str(path)


def read_run(run_dir: str | os.PathLike) -> Run:
    """A finished run, or a one-line `ConfigError` saying why it is not one."""
    directory = Path(run_dir)
    if not directory.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not (directory / "config.gin").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (it has no config.gin)")
    metrics = directory / "metrics.json"
    if not metrics.is_file():
        raise ConfigError(f"run {run_dir} has not finished (no metrics.json); finish it first with "
                          f"`{program()} run CONFIG.gin --resume {run_dir}`")
    try:
        summary = json.loads(metrics.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{metrics} is not valid JSON ({e}); the run's record is damaged") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("stages"), dict) or TEACHER not in summary["stages"]:
        raise ConfigError(f"{metrics} has no 'stages'; is it an OPTIMA run's metrics.json?")
    return Run(directory, summary)


def parse_run_config(run: Run, bindings: Sequence[str] = (), external_plugins: bool | None = None):
    """Parse the run's own `config.gin` (plus `bindings`) and return its `Declared` experiment."""
    from optima import config as cfg

    cfg.setup(external_plugins)
    cfg.parse([str(run.directory / "config.gin")], bindings)
    return cfg.declared()


# -- loading saved networks ------------------------------------------------------


def load_network_weights(network: torch.nn.Module, checkpoint: str) -> None:
    """Load a saved network into `network` (same architecture): a `.safetensors`
    file in the run's layout (`<stage>.safetensors`, a cached teacher) or an
    export folder (the model plugin's `load_export`, then `head.safetensors`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    path = Path(checkpoint)
    try:
        if path.is_dir():
            if not (path / EXPORT_RECORD).is_file():
                raise ConfigError(f"{checkpoint} is not an `optima export` folder (no {EXPORT_RECORD})")
            network.model.load_export(str(path))
            network.head.load_state_dict(load_file(str(path / HEAD_FILE)))
        else:
            load_model(network, str(path))
    except (RuntimeError, SafetensorError, OSError) as e:
        first = " ".join(str(e).strip().splitlines()[:2])[:300]
        raise ConfigError(f"{checkpoint} does not fit the {type(network.model).__name__} the config builds "
                          f"(another architecture, head or task?): {first}") from None


def infer_stage(checkpoint: str, stages: Sequence[str]) -> str | None:
    """The stage a checkpoint holds, when its name says it: an export (its
    record), `<stage>.safetensors` of a run, a cached `teacher-<key>.safetensors`
    (or a cached `student-<key>.safetensors` when there is one student stage)."""
    path = Path(checkpoint)
    if path.is_dir() and (path / EXPORT_RECORD).is_file():
        return json.loads((path / EXPORT_RECORD).read_text(encoding="utf-8")).get("stage")
    stem = path.name.removesuffix(".safetensors")
    if stem in stages:
        return stem
    if stem.startswith(f"{TEACHER}-"):
        return TEACHER
    students = [s for s in stages if s != TEACHER]
    if stem.startswith("student-") and len(students) == 1:
        return students[0]
    return None


# -- export ------------------------------------------------------------------------


def default_name(run_dir: str | os.PathLike, stage: str) -> str:
    """`<run folder>-<stage>`, with characters a model name cannot hold replaced."""
    return re.sub(r"[^\w.-]+", "-", f"{Path(os.path.abspath(run_dir)).name}-{stage}").strip("-")


def _prepare_out(out: str) -> bool:
    """Refuse a non-empty `out` (nothing is overwritten); returns whether it was created here."""
    if os.path.exists(out):
        if not os.path.isdir(out) or os.listdir(out):
            raise ConfigError(f"{out} already exists and is not empty; pass another --out")
        return False
    with failed_writes(lambda: None, lambda why: f"could not write the export to {out}: {why}"):
        os.makedirs(out)
    return True


def _undo(out: str, created: bool) -> Callable[[], None]:
    """What removes a failed export: `out` itself when it was created here, else what was written in it."""
    def undo() -> None:
        if created:
            shutil.rmtree(out, ignore_errors=True)
            return
        for entry in os.listdir(out):
            p = os.path.join(out, entry)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
    return undo


def head_binding_name() -> str:
    """The gin name of the parsed config's `experiment.head` (e.g. `attentional_pooler_head`)."""
    import gin

    return gin.query_parameter("experiment.head").configurable.name


def _stage_bindings(name: str, stage: str) -> dict[str, Any]:
    import gin

    with gin.config_scope(stage):
        try:
            return dict(gin.get_bindings(name))
        except ValueError:
            return {}


def save_head(head: torch.nn.Module, path: str, *, factory: str, bindings: dict[str, Any], num_outputs: int) -> None:
    """The head's weights, with what `load_head` needs to rebuild it."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(tensors, path, metadata={"optima_head": factory, "bindings": json.dumps(bindings),
                                       "num_outputs": str(int(num_outputs))})


class _Outputs:
    """What a head factory reads of a task: its number of outputs."""

    def __init__(self, num_outputs: int):
        self.num_outputs = num_outputs


def load_head(path: str, model: torch.nn.Module, external_plugins: bool | None = None) -> torch.nn.Module:
    """The task head of an export, rebuilt by its registered factory over `model`
    (e.g. `CoCaModel(open_clip_coca)`) with its bindings, its weights loaded.
    Logits: `head(model(batch))`."""
    from safetensors import safe_open

    from optima import registry

    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such head file")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "optima_head" not in meta:
        raise ConfigError(f"{path} is not an exported OPTIMA head (its metadata names no head factory)")
    components = registry.load(external=external_plugins).components
    component = components.get(meta["optima_head"])
    if component is None:
        raise ConfigError(f"{path}: head {meta['optima_head']!r} is not registered; install the plugin that "
                          f"provides it (`optima plugins` lists what is)")
    head = component.factory(model, _Outputs(int(meta["num_outputs"])), **json.loads(meta["bindings"]))
    head.load_state_dict(tensors)
    return head.eval()


def export_run(run_dir: str, out: str, stage: str | None = None, name: str | None = None,
               bindings: Sequence[str] = (), external_plugins: bool | None = None,
               card: bool = True, on_message=lambda text: None) -> dict[str, Any]:
    """Export `stage` (default: the last student) of the finished run `run_dir` to
    `out` (a new or empty folder): the model plugin's files, `head.safetensors`,
    `MODEL_CARD.md` (`card`) and `export.json`. On failure `out` is left as it
    was (removed if it was created here, emptied otherwise); the run is only read."""
    run = read_run(run_dir)
    stage = run.check_stage(stage)
    weights = run.weights(stage)
    spec = parse_run_config(run, bindings, external_plugins)
    if stage not in spec.stage_names():
        raise ConfigError(f"{run_dir}/config.gin declares no stage {stage!r} (it declares "
                          f"{', '.join(spec.stage_names())})")
    name = name or default_name(run_dir, stage)
    created = _prepare_out(out)
    # Every file goes through the checkpoints' write mechanism: a full or
    # read-only disk is one line naming the folder, and `out` is left as it was
    # (removed if it was created here, emptied otherwise); so is any other failure.
    with failed_writes(_undo(out, created), lambda why: f"could not write the export to {out}: {why}; "
                                                        "nothing was left there"):
        device = torch.device("cpu")
        task = spec.task()
        network = spec.network(stage, task, device, run.pretrained)
        if weights is not None:
            load_network_weights(network, weights)
        network.eval()
        model_info = network.model.export(out, name)
        head_factory = head_binding_name()
        head_bindings = _stage_bindings(head_factory, stage)
        save_head(network.head, os.path.join(out, HEAD_FILE), factory=head_factory, bindings=head_bindings,
                  num_outputs=task.num_outputs)
        record = {"stage": stage, "run_dir": os.path.abspath(run_dir), "weights": weights, "name": name,
                  "directory": out,
                  "model": model_info, "head": {"file": HEAD_FILE, "factory": head_factory, "bindings": head_bindings,
                                                "num_outputs": int(task.num_outputs)},
                  "task": type(task).__name__, "metrics": run.summary.get("metrics", {})}
        if card:
            from optima.model_card import write_card

            on_message("model card: measuring parameters, FLOPs and CPU latency")
            record["card"] = write_card(os.path.join(out, CARD_FILE), run=run, spec=spec, stage=stage,
                                        task=task, student=network, export=record,
                                        load_weights=load_network_weights)
        write_text_atomic(os.path.join(out, EXPORT_RECORD), json.dumps(record, indent=1, default=str))
        return record
