"""The four paper tasks end to end: each shipped `gin/<task>_tiny12.gin` runs through
the CLI (teacher fine-tuning, OPTIMA distillation, test evaluation) on tiny files
of the task's official format, with tiny CoCas in place of the checkpoints."""
import json

import pytest
from typer.testing import CliRunner

from optima.cli.main import app

from real_format_data import PAPER_TASKS, tiny_paper_bindings

METRIC = {"snlive": "accuracy", "vqa": "accuracy", "nlvr2": "accuracy", "coco": "cider"}


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
    assert (tmp_path / "run" / "tiny12.safetensors").exists()
