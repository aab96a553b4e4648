"""The four paper tasks end to end: each shipped `gin/<task>_tiny12.gin` runs through
the CLI (teacher fine-tuning, OPTIMA distillation, test evaluation) on tiny files
of the task's official format, with tiny CoCas in place of the checkpoints."""
import json

import pytest
from typer.testing import CliRunner

from optima.cli.main import app

from real_format_data import PAPER_TASKS, tiny_paper_bindings

METRIC = {"snlive": "accuracy", "vqa": "accuracy", "nlvr2": "accuracy", "coco": "cider"}
# Pinned: each tiny run's test metrics (teacher, tiny12) and its second round's
# reward. The range checks below hold for any behaviour; these notice a change of
# a task's reading, batching, loss or metric, or of the distillation. Tiny files:
# the metrics are 0 or 1 here, the reward is the sensitive value. Deterministic
# on the CPU with one thread (the tolerance is for another CPU's rounding). To
# update on purpose: read the new values from the run's metrics.json, check the
# change is the one intended, and say why in the commit.
PINNED = {"coco": ((0.0, 0.0), 0.06676768602479932), "nlvr2": ((1.0, 1.0), 0.08029107638561968),
          "snlive": ((1.0, 0.0), 0.006273288362439408), "vqa": ((0.0, 0.0), 0.017788583878316975)}


@pytest.mark.parametrize("task", sorted(PAPER_TASKS))
def test_shipped_paper_config_runs_end_to_end(task, tmp_path):
    config, _, make = PAPER_TASKS[task]
    data = make(tmp_path / "data")
    args = ["run", config, "--run-dir", str(tmp_path / "run")]
    for b in tiny_paper_bindings(task, data):
        args += ["-b", b]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(summary["metrics"]) == ["teacher", "tiny12"]
    for net in ("teacher", "tiny12"):
        value = summary["metrics"][net][METRIC[task]]
        assert value == value and value >= 0  # a number, not NaN
    assert len(summary["stages"]["tiny12"]["plays"]) == 2
    metrics, reward = PINNED[task]
    assert (summary["metrics"]["teacher"][METRIC[task]], summary["metrics"]["tiny12"][METRIC[task]]) == metrics
    assert summary["stages"]["tiny12"]["plays"] == [4, 4]
    assert summary["stages"]["tiny12"]["rewards"][1] == pytest.approx(reward, rel=1e-5)
    assert (tmp_path / "run" / "tiny12.safetensors").exists()
