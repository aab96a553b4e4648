"""Where a run reports to: TensorBoard event files, and whatever the CLI shows.

TensorBoard: one run (sub-directory of `run_dir/tensorboard`) per stage, so the
teacher and each student show up as separate runs with the same tags. Every tag
says what it holds, whatever the reward or policy (`docs/plugins.md`, "TensorBoard
tags"):

- per step: `loss/total/<term>`, the whole model's value (teacher: `task`;
  students: `task`, `kd`, and `hidden`, `attn` summed over every layer when the
  reward reads them; a term computed for the arm's layers only is not logged
  here); `loss/arm/<term>`, the played arm's layers (`hidden`, `attn`); `lr`;
- per round, at the step the round ended (so they line up with the loss curves),
  summed over the round's steps: `round/total/<term>`, `round/arm/<term>` and
  `round/module/<module>/<term>` (as above, and per module); `round/reward`;
- per round, from the engine for every policy: `plays/arm`, a text record of
  the played arm (its label and index: an arm is a category, not a number to
  draw as a line), `plays/count/<arm label>` (plays so far) and
  `plays/entropy` (nats, of the last `optima.engine.PLAY_ENTROPY_WINDOW` plays);
- per round, what the policy reports (`Policy.diagnostics`): `policy/<stat>/<arm
  label>` for a per-arm tensor, `policy/<stat>` for a scalar, and
  `policy/unit_<stat>/<unit>` for a per-unit tensor named `unit_<stat>` (units:
  the modules, or the layer groups of `distillation.arm_groups`, e.g. `image.1`);
  a policy's own `count` and `entropy` are left out when the engine logs its
  plays (`ENGINE_STATS`): the same quantities, once;
- `nonfinite/skipped`: the count of steps skipped so far for a NaN or inf loss,
  at each skipped step,
and a `summary` run with `eval/<network>/<metric>`, `eval/results` (a text
table of every network's test metrics), the config texts, and the custom
scalars layout (`LAYOUT`, TensorBoard's CUSTOM SCALARS tab): every arm's
posterior mean on one chart (the paper's Figure 5), every arm's plays on one
chart, the rewards and each family of losses grouped.

Per-round log (`RoundLog`): `run_dir/rounds/<stage>.jsonl` holds each
distillation stage's rounds as JSON lines, for figures and analysis without
parsing event files: a first line `{"arms": [labels], "units": [modules or
layer groups]}`, then one line per round
with `round`, `step`, `arm` (index), `arm_label`, `reward` (null when none),
`note`, `skipped`, `plays` (the engine's `count` per arm and `entropy`),
`policy` (the policy's diagnostics: a list per arm, in the header's order, a
list per unit for a `unit_*` statistic, in the order of the header's `units`,
or a number) and `losses` (`total`, `arm` and `module` sums, as the `round/` tags).
A resumed stage drops the rounds logged after its checkpoint, and a reader
drops a last line cut short by a crash, with one warning; a stage reused
from the cache brings its log along (`optima.experiment`).

A resumed run writes new event files beside the old ones. Each stage's writer
opens with a purge at the step the stage restarts from (and the summary's at 0,
since every invocation writes it whole), so TensorBoard drops what the
interrupted attempt logged after its checkpoint and shows every step once.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from optima.checkpoint import CheckpointWriteError, failed_writes, finite_json, write_text_atomic
from optima.engine import RoundResult
from optima.errors import WARNING_PREFIX, ConfigError, warning

#: The policy diagnostics the engine's `plays/` tags already hold for every policy.
ENGINE_STATS = ("count", "entropy")

#: The custom scalars dashboard: {category: [(chart title, [tag regexes])]}, each
#: chart one plot of every tag its regexes match, in every run (stage).
LAYOUT = {
    "OPTIMA: the policy, round by round": [
        ("each arm's estimated mean reward (policy/mean: Figure 5)", [r"^policy/mean/"]),
        ("sd of each arm's estimate (policy/sd)", [r"^policy/sd/"]),
        ("plays of each arm so far (plays/count)", [r"^plays/count/"]),
        ("the round's reward (round/reward)", [r"^round/reward$"]),
        ("entropy of the recent plays (plays/entropy)", [r"^plays/entropy$"]),
        ("each unit's estimated effect, finer arms (policy/unit_effect)", [r"^policy/unit_effect/"]),
    ],
    "OPTIMA: losses": [
        ("whole model, each step (loss/total)", [r"^loss/total/"]),
        ("the played arm's layers, each step (loss/arm)", [r"^loss/arm/"]),
        ("whole model, summed over each round (round/total)", [r"^round/total/"]),
        ("the played arm's layers, summed over each round (round/arm)", [r"^round/arm/"]),
        ("each module, summed over each round (round/module)", [r"^round/module/"]),
        ("learning rate (lr)", [r"^lr$"]),
    ],
    "OPTIMA: evaluation": [
        ("test metrics (eval)", [r"^eval/"]),
    ],
}


def layout_summary():
    """`LAYOUT` as the custom scalars plugin's summary: its layout proto, under
    its config tag and plugin metadata (what `tensorboard.plugins.custom_scalar.summary.pb`
    writes, without the TensorFlow it imports)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    layout = layout_pb2.Layout(category=[
        layout_pb2.Category(title=title, chart=[
            layout_pb2.Chart(title=chart, multiline=layout_pb2.MultilineChartContent(tag=tags))
            for chart, tags in charts])
        for title, charts in LAYOUT.items()])
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout.SerializeToString()], tensor_shape=TensorShapeProto())
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor,
                                        metadata=metadata.create_summary_metadata())])


class Reporter:
    """No-op base: override what you need."""

    def on_stage(self, stage: str, total: int, unit: str, start: int = 0) -> None:
        """`stage` trains for `total` steps, from step `start` (> 0 when resumed)."""
    def on_arms(self, stage: str, labels: Sequence[str]) -> None: ...
    def on_units(self, stage: str, units: Sequence[str]) -> None:
        """The units the stage's arms are made of (modules, or layer groups such as `image.1`)."""
    def on_step(self, stage: str, step: int, losses: dict[str, float], lr: float) -> None: ...
    def on_round(self, stage: str, result: RoundResult) -> None: ...
    def on_eval(self, network: str, metrics: dict[str, float]) -> None: ...
    def on_message(self, text: str) -> None: ...
    def on_nonfinite(self, stage: str, step: int, term: str, value: float, skipped: int) -> None: ...
    def close(self) -> None: ...


class Reporters(Reporter):
    """Fans every event out to several reporters. A warning already given in this
    run is not repeated (e.g. a damaged file met by every stage)."""

    def __init__(self, reporters: Sequence[Reporter]):
        self.reporters = list(reporters)
        self._warned: set[str] = set()

    def _all(self, method: str, *args) -> None:
        for r in self.reporters:
            getattr(r, method)(*args)

    def on_stage(self, *args): self._all("on_stage", *args)
    def on_arms(self, *args): self._all("on_arms", *args)
    def on_units(self, *args): self._all("on_units", *args)
    def on_step(self, *args): self._all("on_step", *args)
    def on_round(self, *args): self._all("on_round", *args)
    def on_eval(self, *args): self._all("on_eval", *args)
    def on_message(self, text: str) -> None:
        if text.startswith(WARNING_PREFIX):
            if text in self._warned:
                return
            self._warned.add(text)
        self._all("on_message", text)
    def on_nonfinite(self, *args): self._all("on_nonfinite", *args)
    def close(self): self._all("close")


def _event_writes(method):
    """A `TensorBoardReporter` method whose writes go through `failed_writes`:
    SummaryWriter writes event files in a thread and raises its failure at a
    later call, so every call is guarded. A full disk is then one line naming
    the log folder (`CheckpointWriteError`: the CLI adds the resume command),
    not a traceback; once one write failed, the reporter writes nothing more."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self.failed:
            return None
        try:
            with failed_writes(lambda: None, lambda why: f"could not write the TensorBoard log {self.log_dir}: "
                                                         f"{why}; the checkpoints are intact"):
                return method(self, *args, **kwargs)
        except CheckpointWriteError:
            self.failed = True
            raise
    return guarded


def _quiet_event_writer_threads() -> None:
    """TensorBoard's writer thread keeps its error for the next call (which
    `_event_writes` reports in one line) and also raises it, which Python's
    threading.excepthook would print as a traceback: not for that thread."""
    previous = threading.excepthook
    if getattr(previous, "optima_quiet_event_writers", False):
        return

    def hook(args):
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.optima_quiet_event_writers = True
    threading.excepthook = hook


class TensorBoardReporter(Reporter):
    SUMMARY = "summary"

    def __init__(self, log_dir: str):
        _quiet_event_writer_threads()
        self.log_dir = log_dir
        self.writers = {}
        self.arm_labels: dict[str, list[str]] = {}
        self.unit_labels: dict[str, list[str]] = {}
        self.failed = False  # a write failed (the run stops): close without writing more
        self.evals: dict[str, dict[str, float]] = {}

    def writer(self, stage: str, purge_from: int | None = None):
        """The stage's writer, opened on first use; `purge_from`: TensorBoard then
        drops what earlier event files of the stage logged at that step or later."""
        from torch.utils.tensorboard import SummaryWriter

        if stage not in self.writers:
            if stage == self.SUMMARY:
                purge_from = 0  # every invocation writes the summary whole
            self.writers[stage] = SummaryWriter(os.path.join(self.log_dir, stage), purge_step=purge_from)
            if stage == self.SUMMARY:
                self.writers[stage]._get_file_writer().add_summary(layout_summary(), 0)
        return self.writers[stage]

    @_event_writes
    def on_stage(self, stage, total, unit, start=0):
        self.writer(self.SUMMARY)  # the layout, from the first stage on
        self.writer(stage, purge_from=start + 1)

    @_event_writes
    def add_text(self, tag: str, text: str) -> None:
        # Markdown: indent so that gin text keeps its lines
        self.writer(self.SUMMARY).add_text(tag, "    " + text.replace("\n", "\n    "))

    def on_arms(self, stage, labels):
        self.arm_labels[stage] = list(labels)

    def on_units(self, stage, units):
        self.unit_labels[stage] = list(units)

    @_event_writes
    def on_step(self, stage, step, losses, lr):
        w = self.writer(stage)
        for term, value in losses.items():
            w.add_scalar(f"loss/{term}", value, step)
        w.add_scalar("lr", lr, step)

    @_event_writes
    def on_round(self, stage, result: RoundResult):
        w, r, losses = self.writer(stage), result.step, result.losses
        if result.reward is not None:
            w.add_scalar("round/reward", result.reward, r)
        for family, values in (("total", losses.total), ("arm", losses.arm_totals()),
                               *((f"module/{m}", v) for m, v in losses.per_module.items())):
            for term, value in values.items():
                w.add_scalar(f"round/{family}/{term}", value, r)
        labels = self.arm_labels.get(stage, [])
        label = labels[result.arm] if result.arm < len(labels) else result.arm_label
        w.add_text("plays/arm", f"round {result.round}: **{label}** (arm {result.arm})", r)
        if result.plays:
            w.add_scalar("plays/entropy", result.plays["entropy"], r)
            for label, count in zip(labels, result.plays["count"]):
                w.add_scalar(f"plays/count/{label}", count, r)
        for stat, values in result.diagnostics.items():
            if result.plays and stat in ENGINE_STATS:  # logged above as plays/
                continue
            if values.dim() == 0:
                w.add_scalar(f"policy/{stat}", float(values), r)
            else:  # per arm, or per unit for `unit_*` statistics
                names = self.unit_labels.get(stage, []) if stat.startswith("unit_") else labels
                for label, v in zip(names, values.tolist()):
                    w.add_scalar(f"policy/{stat}/{label}", v, r)

    @_event_writes
    def on_nonfinite(self, stage, step, term, value, skipped):
        self.writer(stage).add_scalar("nonfinite/skipped", skipped, step)

    @_event_writes
    def on_eval(self, network, metrics):
        for name, value in metrics.items():
            self.writer(self.SUMMARY).add_scalar(f"eval/{network}/{name}", value, 0)
        self.evals[network] = dict(metrics)

    def close(self):
        if self.failed:  # the failure is being reported: close quietly, whatever is left unwritten
            for w in self.writers.values():
                with contextlib.suppress(Exception):
                    w.close()
            return
        self._flush_and_close()

    @_event_writes
    def _flush_and_close(self):
        if self.evals:  # one readable table, not lone points on charts
            rows = [f"| {network} | {name} | {value:.4f} |" for network, metrics in self.evals.items()
                    for name, value in metrics.items()]
            self.writer(self.SUMMARY).add_text(
                "eval/results", "\n".join(["| network | test metric | value |", "|---|---|---:|", *rows]), 0)
        for w in self.writers.values():
            w.flush()  # raises a failure of the writer's thread, which close() would not
            w.close()


class RoundLog(Reporter):
    """Each distillation stage's rounds as JSON lines in `log_dir/<stage>.jsonl`
    (format in the module doc), appended as rounds end."""

    def __init__(self, log_dir: str | os.PathLike, warn: Callable[[str], None] = print):
        self.dir = Path(log_dir)
        self.warn = warn  # where a torn last line is reported on resume
        self.arm_labels: dict[str, list[str]] = {}
        self.unit_labels: dict[str, list[str]] = {}

    def path(self, stage: str) -> Path:
        return self.dir / f"{stage}.jsonl"

    def on_arms(self, stage, labels):
        self.arm_labels[stage] = list(labels)

    def on_units(self, stage, units):
        self.unit_labels[stage] = list(units)

    def on_stage(self, stage, total, unit, start=0):
        if stage not in self.arm_labels:  # a fine-tuning stage: no rounds
            return
        kept = []
        if start > 0 and self.path(stage).exists():  # resumed: keep the rounds up to the checkpoint
            kept = [r for r in read_round_log(self.path(stage), self.warn)[1] if r["step"] <= start]
        lines = [{"arms": self.arm_labels[stage], "units": self.unit_labels.get(stage, [])}, *kept]
        write_text_atomic(self.path(stage), "".join(json.dumps(finite_json(x)) + "\n" for x in lines))

    def on_round(self, stage, result: RoundResult):
        losses = result.losses
        record = {
            "round": result.round, "step": result.step, "arm": result.arm, "arm_label": result.arm_label,
            "reward": result.reward, "note": result.note, "skipped": result.skipped, "plays": result.plays,
            "policy": {k: v.tolist() for k, v in result.diagnostics.items()},
            "losses": {"total": dict(losses.total), "arm": losses.arm_totals(),
                       "module": {m: dict(v) for m, v in losses.per_module.items()}},
        }
        path = self.path(stage)
        line = json.dumps(finite_json(record), allow_nan=False) + "\n"  # strict JSON: a non-finite loss as null
        size = path.stat().st_size
        # appended, not rewritten: a failed append is cut off again, and a crash
        # mid-line leaves a torn last line that `read_round_log` drops
        with failed_writes(lambda: os.truncate(path, size), lambda why: f"could not write {path}: {why}"):
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)


def read_round_log(path: str | os.PathLike, warn: Callable[[str], None] = print
                   ) -> tuple[list[str], list[dict[str, Any]]]:
    """A `RoundLog` file: the arm labels and the rounds. A last line cut short
    (the run died while appending it: lines are appended, not written
    atomically) is dropped with one warning through `warn`; the checkpoints know
    how far the run got. Any other line that is not a JSON record is a
    `ConfigError` naming the file and line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif i == len(lines) - 1 and i > 0 and not line.endswith("\n"):
            warn(warning(f"{path}: its last line ({n}) was cut short (the run stopped while writing it); "
                         "dropped it"))
        else:
            raise ConfigError(f"{path}:{n}: not a JSON record; the round log is damaged")
    if not records or "arms" not in records[0]:
        raise ConfigError(f"{path} is not a round log (its first line lacks 'arms')")
    return list(records[0]["arms"]), records[1:]


def text_records(run_dir: str | os.PathLike, tag: str) -> list[tuple[int, str]]:
    """Every text record of `tag` (e.g. `plays/arm`) in a TensorBoard run
    directory, as (step, text), as TensorBoard's server reads them (its plugin
    event accumulator: unsampled, and a resumed stage's purge drops what the
    interrupted attempt logged after its checkpoint)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    name = f"{tag}/text_summary"  # where torch's SummaryWriter.add_text puts `tag`
    if name not in events.Tags()["tensors"]:
        return []
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in events.Tensors(name)]
