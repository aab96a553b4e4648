"""The benchmark scripts run (tiny shapes, on the CPU): what CI can check of
them. Their figures are measured on real hardware, see bench/results/."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_step_runs_at_small_shapes_on_the_cpu(tmp_path):
    """`bench/gpu_step.py --cpu-smoke`: the project's OPTIMA and layerwise steps
    for both students, with samples/s, FLOPs and the goals, and the reference
    step beside them when the checkout has it."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_step import reference_path
    finally:
        sys.path.remove(str(ROOT / "bench"))
    done = subprocess.run([sys.executable, "bench/gpu_step.py", "--cpu-smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_step.json").read_text())
    assert result["smoke"] and result["shapes"]["batch"] == 4
    for student in ("tiny12", "tiny6"):
        for row in ("optima", "layerwise"):
            figures = result[student][row]
            assert figures["samples_per_s"] > 0 and figures["tflop_per_step"] > 0, figures
        assert set(result["goals"][student]) == {"optima_over_reference_samples_per_s", "optima_at_least_1.6x_reference",
                                                 "optima_time_at_most_layerwise", "optima_memory_at_most_layerwise"}
    if reference_path(None) is None:
        assert "not found" in result["reference"]["error"]
    else:
        assert result["reference"]["tiny12.step_hidden_attn"]["samples_per_s"] > 0
        assert result["goals"]["tiny12"]["optima_over_reference_samples_per_s"] > 0
