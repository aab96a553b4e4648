"""What `optima run` shows while it trains.

On a terminal (`LiveReporter`): one row per stage, `k/n name`, bar, steps
done/total, elapsed, time left, and a last row for the whole run (its steps
over every stage, time left); under them one status line (the step's losses,
a distillation round's arm and reward), cut to the terminal's width. The rows
are sized to the terminal, so the bar, count and times never give way to the
status (80 columns are enough).

Not on a terminal (a pipe, a log file: `PlainReporter`): plain lines, each
flushed at once: a stage's start and end, one line per distillation round, and
the progress every `interval` seconds, so a log shows where a run is within a
minute.
"""
from __future__ import annotations

import time
from typing import Sequence, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

from optima.reporting import Reporter

#: Seconds between a log's progress lines.
LOG_INTERVAL = 30.0
#: Widths of the rows' columns other than the bar (name, count, two times, the gaps).
NAME_WIDTH = 14
COUNT_WIDTH = 11
TIME_WIDTH = 8


def clock(seconds: float | None) -> str:
    """`h:mm:ss`, or `-:--:--` when not known."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def losses_text(losses: dict[str, float]) -> str:
    """Whole-model values as `kd=...`, the played arm's as `arm.hidden=...`."""
    return " ".join(f"{k.removeprefix('total/').replace('/', '.')}={v:.3g}" for k, v in losses.items())


class RunClock:
    """Stage k of n and the run's steps and time left, from the stages' outline
    (`optima.plan.stage_outline`). Stages before the one that starts are done
    (trained or reused from the cache); time left is the current stage's, at
    its own pace, plus the later stages' steps at the pace of this run's steps
    so far."""

    def __init__(self, outline: Sequence[tuple[str, int]]):
        self.outline = list(outline)
        self.total = sum(steps for _, steps in self.outline)
        self.stage: str | None = None
        self.index = 0  # of the current stage in the outline
        self.first = self.step = 0  # the current stage's first step (resumed: > 0) and its step
        self.started = time.monotonic()
        self.stage_started = self.started
        self.trained_steps = 0  # in this process, before the current stage
        self.trained_seconds = 0.0

    def start(self, stage: str, total: int, start: int) -> None:
        self.finish()
        names = [name for name, _ in self.outline]
        if stage not in names:  # a stage the outline missed (a plugin's): count it from here
            self.outline.append((stage, total))
            self.total += total
            names.append(stage)
        self.index = names.index(stage)
        self.stage, self.first, self.step = stage, start, start
        self.stage_started = time.monotonic()

    def advance(self, step: int) -> None:
        self.step = step

    def finish(self) -> None:
        if self.stage is not None:
            self.trained_steps += self.step - self.first
            self.trained_seconds += time.monotonic() - self.stage_started
            self.first = self.step
            self.stage_started = time.monotonic()

    @property
    def stages(self) -> int:
        return len(self.outline)

    def stage_total(self) -> int:
        return self.outline[self.index][1]

    def done(self) -> int:
        return sum(steps for _, steps in self.outline[:self.index]) + self.step

    def stage_left(self) -> float | None:
        steps = self.step - self.first
        if steps <= 0:
            return None
        return (time.monotonic() - self.stage_started) / steps * (self.stage_total() - self.step)

    def run_left(self) -> float | None:
        steps = self.trained_steps + self.step - self.first
        current = 0.0 if self.stage is not None and self.step >= self.stage_total() else self.stage_left()
        if current is None or steps <= 0:
            return None
        per_step = (self.trained_seconds + time.monotonic() - self.stage_started) / steps
        later = sum(steps for _, steps in self.outline[self.index + 1:])
        return current + later * per_step


class _Left(ProgressColumn):
    """Time left: a stage's at its pace; the run's row from the `RunClock`."""

    def __init__(self, clock_: RunClock):
        super().__init__(table_column=Column(width=TIME_WIDTH, no_wrap=True, justify="right"))
        self.run = clock_

    def render(self, task) -> Text:
        if task.fields.get("run"):
            left = self.run.run_left()
        elif task.finished:
            left = 0.0
        else:
            left = task.time_remaining
        return Text(clock(left), style="progress.remaining")


class StageProgress(Progress):
    """The stage rows and the run's row, then the status line, cut to the console's width."""

    def __init__(self, console: Console, run: RunClock):
        self.status = ""
        name = TextColumn("{task.description}", table_column=Column(width=NAME_WIDTH, no_wrap=True,
                                                                   overflow="ellipsis"))
        count = MofNCompleteColumn(table_column=Column(width=COUNT_WIDTH, no_wrap=True, justify="right"))
        elapsed = TimeElapsedColumn(table_column=Column(width=TIME_WIDTH, no_wrap=True, justify="right"))
        self.bar = BarColumn(bar_width=self._bar_width(console))
        super().__init__(name, self.bar, count, elapsed, _Left(run), console=console, transient=False)

    @staticmethod
    def _bar_width(console: Console) -> int:
        # the row: name, bar, count, two times and a space between columns, within the width
        others = NAME_WIDTH + COUNT_WIDTH + 2 * TIME_WIDTH + 4
        return max(5, min(40, console.width - others - 1))

    def get_renderables(self):
        if hasattr(self, "live"):  # (not while Progress builds its Live, which renders once)
            self.bar.bar_width = self._bar_width(self.console)  # the terminal may have been resized
        # the stages in the order they started, the run's row last
        yield self.make_tasks_table(sorted(self.tasks, key=lambda task: bool(task.fields.get("run"))))
        if self.status:
            yield Text(self.status, no_wrap=True, overflow="ellipsis", end="")


class LiveReporter(Reporter):
    """The terminal's display (module doc)."""

    def __init__(self, progress: StageProgress, run: RunClock, header: str = ""):
        self.progress, self.run, self.header = progress, run, header
        self.tasks: dict[str, int] = {}
        self.rounds: dict[str, str] = {}  # a distillation stage's last round, shown before its losses
        self.run_task = progress.add_task("run", total=max(1, run.total), run=True)

    def _describe_run(self) -> None:
        self.progress.update(self.run_task, completed=self.run.done(), total=max(1, self.run.total),
                             description=f"run {self.run.index + 1}/{self.run.stages}")

    def _announce(self) -> None:
        """The run's plan, once, when it starts (not before its bindings are checked:
        a refused run prints its one error line only)."""
        if self.header:
            self.progress.console.print(self.header, markup=False, highlight=False, soft_wrap=True)
            self.header = ""

    def on_stage(self, stage, total, unit, start=0):
        self._announce()
        self.run.start(stage, total, start)
        label = f"{self.run.index + 1}/{self.run.stages} {stage}"
        self.tasks[stage] = self.progress.add_task(label, total=total, completed=start)
        self._describe_run()
        self.progress.status = f"{stage}: starting at step {start} of {total}"

    def on_step(self, stage, step, losses, lr):
        self.run.advance(step)
        self.progress.update(self.tasks[stage], completed=step)
        self._describe_run()
        self.progress.status = f"{stage}: step {step} {self.rounds.get(stage, '')}{losses_text(losses)}"

    def on_round(self, stage, result):
        reward = "-" if result.reward is None else f"{result.reward:.3f}"
        self.rounds[stage] = f"round {result.round} arm {result.arm_label} reward {reward} | "
        losses = losses_text({f"total/{k}": v for k, v in result.losses.total.items()})
        self.progress.status = f"{stage}: step {result.step} {self.rounds[stage]}round losses {losses}"

    def on_message(self, text):
        self._announce()
        # one unbroken line, as written: messages name files (paths may hold [brackets])
        self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def on_nonfinite(self, stage, step, term, value, skipped):
        self.progress.console.print(f"{stage}: step {step}: {term} = {value}; step skipped ({skipped} so far)",
                                    markup=False, highlight=False, soft_wrap=True)

    def close(self):
        self.run.finish()


class PlainReporter(Reporter):
    """The log's lines (module doc), written to `out` and flushed one by one."""

    def __init__(self, out: TextIO, run: RunClock, interval: float = LOG_INTERVAL, header: str = ""):
        self.out, self.run, self.interval, self.header = out, run, interval, header
        self.totals: dict[str, int] = {}
        self.distilling: set[str] = set()  # stages with rounds
        self.last_line = time.monotonic()

    def line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()
        self.last_line = time.monotonic()

    def _where(self) -> str:
        return (f"run {self.run.done()}/{self.run.total} steps, {clock(time.monotonic() - self.run.started)} "
                f"elapsed, about {clock(self.run.run_left())} left")

    def _announce(self) -> None:
        """The run's plan, once, when it starts (see `LiveReporter._announce`)."""
        if self.header:
            header, self.header = self.header, ""
            self.line(header)

    def on_stage(self, stage, total, unit, start=0):
        self._announce()
        self.run.start(stage, total, start)
        self.totals[stage] = total
        resumed = f", resumed at step {start}" if start else ""
        self.line(f"stage {self.run.index + 1} of {self.run.stages}: {stage}, {total} steps{resumed} "
                  f"({self._where()})")

    def on_arms(self, stage, labels):
        self.distilling.add(stage)

    def _done(self, stage: str) -> None:
        seconds = time.monotonic() - self.run.stage_started
        self.run.finish()
        self.line(f"{stage}: done, {self.totals[stage]} steps in {clock(seconds)} ({self._where()})")

    def on_step(self, stage, step, losses, lr):
        self.run.advance(step)
        total = self.totals.get(stage, 0)
        if step >= total:
            if stage not in self.distilling:  # a distillation stage ends with its last round
                self._done(stage)
        elif time.monotonic() - self.last_line >= self.interval:
            self.line(f"{stage}: step {step}/{total}, about {clock(self.run.stage_left())} left in the stage; "
                      f"{self._where()} | {losses_text(losses)}")

    def on_round(self, stage, result):
        reward = "-" if result.reward is None else f"{result.reward:.3f}"
        losses = " ".join(f"{k}={v:.4g}" for k, v in result.losses.total.items())
        self.line(f"{stage}: round {result.round} arm {result.arm_label} reward {reward} | round losses {losses}")
        if result.step >= self.totals.get(stage, 0):
            self._done(stage)

    def on_message(self, text):
        self._announce()
        self.line(text)

    def on_nonfinite(self, stage, step, term, value, skipped):
        self.line(f"{stage}: step {step}: {term} = {value}; step skipped ({skipped} so far)")

    def close(self):
        self.run.finish()
