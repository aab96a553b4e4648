"""The benchmark scripts run (tiny shapes, on the CPU): what CI can check of
them. Their figures are measured on real hardware, see bench/results/."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

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
    assert result["smoke"] and result["complete"] and result["shapes"]["batch"] == 4
    for student in ("tiny12", "tiny6"):
        for row in ("optima", "layerwise", "optima_teacher_autocast"):
            figures = result[student][row]
            assert figures["samples_per_s"] > 0 and figures["tflop_per_step"] > 0, figures
        assert "optima_compile" not in result[student]  # only with --compile
        assert set(result["goals"][student]) == {
            "optima_over_reference_samples_per_s", "optima_at_least_1.0x_reference", "optima_at_least_1.6x_reference",
            "best_compiled_over_reference_samples_per_s", "compiled_at_least_1.3x_reference",
            "optima_time_at_most_layerwise", "optima_memory_at_most_layerwise"}
    if reference_path(None) is None:
        assert "not found" in result["reference"]["error"]
    else:
        assert result["reference"]["tiny12.step_hidden_attn"]["samples_per_s"] > 0
        assert result["goals"]["tiny12"]["optima_over_reference_samples_per_s"] > 0


def test_gpu_step_compile_rows_run_at_small_shapes_on_the_cpu(tmp_path):
    """`--compile` adds the compiled rows (the teacher's forward alone, and
    student and teacher: `distillation.compile`), traced on the CPU by the
    aot_eager backend (inductor on a GPU); one student keeps it short."""
    done = subprocess.run([sys.executable, "bench/gpu_step.py", "--cpu-smoke", "--compile", "--only", "tiny6",
                           "--rows", "optima", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_step.json").read_text())
    rows = result["tiny6"]
    assert list(rows) == ["params_M", "optima", "optima_compile_teacher", "optima_compile"]
    for row in ("optima_compile_teacher", "optima_compile"):
        assert rows[row]["backend"] == "aot_eager" and rows[row]["compile_s"] > 0 and rows[row]["samples_per_s"] > 0
        assert rows[row]["tflop_per_step"] == rows["optima"]["tflop_per_step"]  # the eager step's count
    assert result["goals"]["tiny6"]["best_compiled_over_reference_samples_per_s"] is None  # no reference ran


def test_gpu_whole_run_runs_every_stage_at_small_shapes_on_the_cpu(tmp_path):
    """`bench/gpu_whole_run.py --cpu-smoke` (without its gpu_step stage, tested
    above): synthesized SNLI-VE, the paper config uninterrupted, SIGTERMed
    mid-distillation and resumed (equal to the uninterrupted run on the CPU),
    export and eval of the export; every stage timed into one JSON."""
    done = subprocess.run([sys.executable, "bench/gpu_whole_run.py", "--cpu-smoke", "--no-step", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_whole_run_cpu_smoke.json").read_text())
    assert result["complete"] and result["smoke"]
    stages = result["stages"]
    assert set(stages) == {"synth", "full", "interrupted", "resumed", "export", "eval"}
    for name, stage in stages.items():
        assert stage["seconds"] > 0 and stage["exit_code"] == (143 if name == "interrupted" else 0), (name, stage)
    teacher, student = stages["full"]["stages"]["teacher"], stages["full"]["stages"]["tiny12"]
    assert teacher["steps"] == 4 and student["steps"] == 32 and student["samples_per_s"] > 0
    assert not teacher["cached"] and stages["resumed"]["stages"]["teacher"]["cached"]  # one teacher for both
    assert stages["interrupted"]["sigterm_after_s"] > 0
    assert result["resumed_equals_uninterrupted"]["equal"], result["resumed_equals_uninterrupted"]
    assert "deterministic" not in result  # equal already: no second pair
    assert stages["eval"]["equals_run"], stages["eval"]


def _input_pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/input_pipeline.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_input_pipeline_runs_its_cpu_mode_and_its_gpu_mode_at_tiny_shapes(tmp_path):
    """`bench/input_pipeline.py` on the CPU, tiny: the loader's variants and the
    small step fed by each (`--device cpu`); the GPU mode's code (`--smoke`: the
    paper-shape step code at gpu_step's tiny shapes, the arms in turn, fed by a
    worker vs batches in memory); `--out` a folder."""
    done = _input_pipeline("--device", "cpu", "--images", "6", "--batch", "4", "--batches", "1", "--repeats", "1",
                           "--steps", "1", "--width", "32", "--workers", "1", "--load-threads", "2",
                           "--out", str(tmp_path / "cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "cpu" / "input_pipeline.json").read_text())
    assert result["data"]["images"] == 8  # rounded up to whole batches
    assert set(result["loader"]) == {"0_workers_2_threads", "0_workers_serial", "1_workers"}
    # (CPU time is counted in clock ticks, 10 ms: one batch of 4 images may show none)
    assert all(v["images_per_s"] > 0 and v["cpu_ms_per_image"] >= 0 for v in result["loader"].values())
    assert result["step"]["device"] == "cpu" and result["step"]["1_workers_ratio"] > 0

    done = _input_pipeline("--smoke", "--repeats", "1", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "input_pipeline_smoke.json").read_text())
    assert result["data"]["batch"] == 4 and result["data"]["images"] == 8 and result["step"]["smoke"]
    assert set(result["loader"]) == {"0_workers_serial", "1_workers"}
    step = result["step"]
    assert step["in_memory_ms"] > 0 and step["1_workers_ratio"] == pytest.approx(
        step["1_workers_ms"] / step["in_memory_ms"], abs=2e-3)
    assert set(result["goal_ratio_at_most_1.05"]) == {"1_workers"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU; on a GPU "
                    "--device cuda runs the real benchmark instead (minutes)")
def test_input_pipeline_cuda_without_a_gpu_is_a_one_line_error():
    done = _input_pipeline("--device", "cuda")
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "input_pipeline.py: --device cuda, but torch finds no GPU here; --device cpu or --smoke run on the CPU"]


def test_the_flop_count_includes_attention_on_the_fused_inference_path():
    """In eval mode without grad, `nn.MultiheadAttention` runs one fused op that
    torch's FLOP counter has no formula for (the reference's teacher took it, so
    its count missed the teacher's attention); `CompleteFlopCounter` counts it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_step import CompleteFlopCounter
    finally:
        sys.path.remove(str(ROOT / "bench"))
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(2, 10, 64)
    projections = 2 * 2 * 10 * 64 * (3 * 64 + 64)  # in (q, k, v) and out, batch 2
    with torch.no_grad():
        with FlopCounterMode(display=False) as plain:
            mha(x, x, x, need_weights=False)
        with CompleteFlopCounter() as complete:
            mha(x, x, x, need_weights=False)
    assert plain.get_total_flops() == 0  # the fused op, uncounted
    assert complete.get_total_flops() >= projections
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on
