"""What `optima run` shows while it trains (cli/progress.py), through the CLI at
80 columns: on a terminal, a row per stage with bar, count and times that the
status never displaces; behind a pipe, flushed lines as the run goes."""
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from optima.cli.main import app
from optima.cli.progress import LiveReporter, PlainReporter, RunClock, StageProgress

from conftest import ROOT, TINY

CONFIG = str(ROOT / "tests" / "gin" / "tiny_ve.gin")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# a stage's row: "k/n name", the bar, done/total, elapsed, time left
ROW = r"{label}\s+[━╸╺]+\s+{count}\s+\d+:\d\d:\d\d\s+(\d+:\d\d:\d\d|-:--:--)$"


def _screen_lines(output: str) -> list[str]:
    """Every line the terminal was sent, each frame of the live display included."""
    return [line for line in ANSI.sub("", output).replace("\r", "\n").split("\n")]


def _bindings() -> list[str]:
    return [arg for binding in TINY for arg in ("-b", binding)]


@pytest.mark.slow
def test_live_display_keeps_bar_count_and_time_left_at_80_columns(tmp_path, monkeypatch):
    # short paths: a message naming a file is printed unbroken on purpose (the terminal
    # wraps it), so every line here is the display's own; this environment's scripts
    # first on PATH so that the TensorBoard hint names `tensorboard`, not a clone's long path
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    result = CliRunner().invoke(app, ["run", CONFIG, *_bindings(), "--run-dir", "r"],
                                env={"COLUMNS": "80", "TTY_COMPATIBLE": "1", "OPTIMA_CACHE": "c",
                                     "OMP_NUM_THREADS": None})
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["torch_threads"] == 1
    lines = _screen_lines(result.output)
    too_wide = [line for line in lines if cell_len(line) > 80]
    assert not too_wide, too_wide
    for label, count in (("1/2 teacher", "4/4"), ("2/2 student", "8/8"), ("run 2/2", "12/12")):
        assert any(re.fullmatch(ROW.format(label=label, count=count), line.rstrip()) for line in lines), \
            (label, result.output[-3000:])
    # the status (the step's losses, the round's arm and reward) is a line of its own
    assert any(re.match(r"student: step 8 round 4 arm \S+ reward [\d.-]+ \| round losses task=", line) for line in lines)


def test_status_never_displaces_a_stage_row():
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    run = RunClock([("large", 800), ("teacher", 1000), ("tiny6", 300)])
    progress = StageProgress(console, run)
    reporter = LiveReporter(progress, run)
    reporter.on_stage("tiny6", 300, "step", 120)
    reporter.on_step("tiny6", 150, {f"module/{m}/{t}": 1.2345 for m in ("image", "text", "multimodal")
                                    for t in ("hidden", "attn", "kd", "task")}, 1e-4)
    console.print(progress.get_renderable())
    lines = console.file.getvalue().splitlines()
    assert all(cell_len(line) <= 80 for line in lines), lines
    assert re.fullmatch(ROW.format(label="3/3 tiny6", count="150/300"), lines[0].rstrip()), lines
    assert re.fullmatch(ROW.format(label="run 3/3", count="1950/2100"), lines[1].rstrip()), lines
    assert lines[2].startswith("tiny6: step 150 ") and lines[2].endswith("…") and cell_len(lines[2]) == 80


class _Stream(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushed = ""

    def flush(self):
        self.flushed = self.getvalue()


def test_log_lines_are_flushed_at_stage_start_and_end_and_between():
    out = _Stream()
    reporter = PlainReporter(out, RunClock([("teacher", 4), ("student", 8)]), interval=0.0)
    reporter.on_stage("teacher", 4, "step")
    assert out.flushed == out.getvalue() and out.flushed.startswith("stage 1 of 2: teacher, 4 steps (run 0/12")
    reporter.on_step("teacher", 2, {"total/task": 0.5}, 1e-3)  # interval 0: a progress line at every step
    assert out.flushed.splitlines()[-1].startswith("teacher: step 2/4, about ")
    assert "run 2/12 steps" in out.flushed.splitlines()[-1]
    reporter.on_step("teacher", 4, {"total/task": 0.4}, 1e-3)
    assert out.flushed.splitlines()[-1].startswith("teacher: done, 4 steps in ")


@pytest.mark.slow
def test_a_log_behind_a_pipe_shows_each_stage_as_it_starts(tmp_path):
    """Flushed, not held in a pipe's buffer until the process ends: the first
    stage's line arrives while the run has its stages still to do."""
    args = [sys.executable, "-m", "optima.cli.main", "run", CONFIG, *_bindings(), "--run-dir", str(tmp_path / "r")]
    env = {**os.environ, "OPTIMA_CACHE": str(tmp_path / "c"), "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    env.pop("PYTHONUNBUFFERED", None)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    arrivals = []
    for line in proc.stdout:
        arrivals.append((time.monotonic(), line.rstrip("\n")))
    assert proc.wait() == 0, "\n".join(line for _, line in arrivals)
    text = [line for _, line in arrivals]
    first = next(i for i, line in enumerate(text) if line.startswith("stage 1 of 2: teacher, 4 steps"))
    assert any(line.startswith("stage 2 of 2: student, 8 steps") for line in text[first:])
    assert any(line.startswith("teacher: done, 4 steps in ") for line in text)
    # lines held in a buffer would all arrive together at the end
    assert arrivals[-1][0] - arrivals[first][0] > 1.0, arrivals
