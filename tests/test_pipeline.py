"""Multi-stage pipelines: Large -> mid -> small in one run, stage reuse across
experiments, and the dry run of every shipped experiment file."""
import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from optima.cli.main import app

from conftest import TINY

TWO_STAGE = [
    "experiment.student = None",
    "experiment.students = {'mid': @mid/coca_model, 'small': @small/coca_model}",
    "mid/coca_model.arch = %TINY_COCA", "mid/coca_model.layers = (3, 3, 3)",
    "small/coca_model.arch = %TINY_COCA", "small/coca_model.layers = (1, 1, 1)",
    "small/distillation.rounds = 2",
]


def _run(run_dir, bindings):
    args = ["run", "tests/gin/tiny_ve.gin", "--run-dir", str(run_dir)]
    for b in TINY + bindings:
        args += ["-b", b]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_two_stage_pipeline_and_stage_reuse(tmp_path, monkeypatch):
    import optima.experiment as exp

    distilled = {}  # stage -> (teacher, student) the stage was built with

    def spy(name, teacher, student, *args, **kwargs):
        distilled[name] = (teacher, student)
        return real(name, teacher, student, *args, **kwargs)

    real = exp.distillation
    monkeypatch.setattr(exp, "distillation", spy)
    _run(tmp_path / "two", TWO_STAGE)
    monkeypatch.setattr(exp, "distillation", real)
    # each student teaches the next: `small` distils from `mid` as trained (its cache
    # key says so, with mid's key upstream), not from the teacher
    assert distilled["small"][0] is distilled["mid"][1]
    assert [len(m) for m in distilled["small"][0].model.distill_modules()] == [3, 3, 3]
    from safetensors.torch import load_file

    mid, taught_by = load_file(str(tmp_path / "two" / "mid.safetensors")), distilled["small"][0].state_dict()
    assert len(mid) > 10 and all(torch.equal(taught_by[k], v) for k, v in mid.items())  # mid as saved
    summary = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert list(summary["metrics"]) == ["teacher", "mid", "small"]
    assert len(summary["stages"]["mid"]["plays"]) == 4  # distillation.rounds from TINY
    assert len(summary["stages"]["small"]["plays"]) == 2  # the scoped override
    assert summary["params_M"]["small"] < summary["params_M"]["mid"] < summary["params_M"]["teacher"]
    assert (tmp_path / "two" / "mid.safetensors").exists() and (tmp_path / "two" / "small.safetensors").exists()

    # an experiment with the first stage only reuses both the teacher and that stage
    out = _run(tmp_path / "one", TWO_STAGE[:1] + ["experiment.students = {'mid': @mid/coca_model}"] + TWO_STAGE[2:4])
    assert "teacher: reusing" in out and "mid: reusing" in out
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["stages"]["mid"]["plays"] == summary["stages"]["mid"]["plays"]
    assert one["metrics"]["mid"] == summary["metrics"]["mid"]


EXPERIMENTS = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "gin").glob("*.gin"))


# the paper's configs need checkpoints and data that are not in the repository
PAPER = {f"{task}_{student}.gin" for task in ("snlive", "vqa", "nlvr2", "coco") for student in ("tiny12", "tiny6")}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_dry_run_of_every_experiment(name, tmp_path):
    result = CliRunner().invoke(app, ["run", f"gin/{name}", "--dry-run"])
    out = result.output
    if name in PAPER:  # the plan, then what is missing and where it comes from, and a non-zero exit
        assert result.exit_code == 2, out
        assert re.search(r"optima: error: \d+ file\(s\) the run needs are missing", out.splitlines()[-1]), out
        assert "from open_clip's coca_ViT-L-14 weights 'laion2b_s13b_b90k': https://huggingface.co/laion/" \
               "CoCa-ViT-L-14-laion2B-s13B-b90k" in " ".join(out.split())
    else:
        assert result.exit_code == 0, out
    assert "models (built on the meta device)" in out and "teacher" in out
    assert ("63 arms" if name == "quickstart_finer_arms.gin" else "7 arms") in out  # layer groups: 2^6 - 1
    assert not list(tmp_path.iterdir())  # nothing written


def test_dry_run_counts_parameters_with_a_unit_that_shows_small_modules():
    from optima.cli.run import count_text

    assert [count_text(n) for n in (0, 940, 1000, 12_345, 999_999, 86_200_000, 1_234_000_000)] == [
        "0", "940", "1 K", "12.3 K", "1 M", "86.2 M", "1.23 B"]
    result = CliRunner().invoke(app, ["run", "tests/gin/tiny_ve.gin", "--dry-run", "-b", "coca_model.arch = %TINY_COCA",
                                      "-b", "coca_model.layers = (1, 1, 1)"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = [l for l in result.output.splitlines() if "│ image " in l or "│ text " in l]
    assert rows and all(re.search(r"\d K │\s*$|\d K\s*│\s*$", r) for r in rows), result.output
    assert " 0.0 " not in result.output


def test_dry_run_of_a_paper_config_says_what_is_missing_and_where_it_comes_from(tmp_path):
    args = ["run", "gin/snlive_tiny6.gin", "--dry-run", "-b", f"snli_ve_task.data_dir = '{tmp_path}/snli'",
            "-b", f"COCA_LARGE_CHECKPOINT = '{tmp_path}/large.bin'", "-b", f"COCA_BASE_CHECKPOINT = '{tmp_path}/base.bin'"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    for missing in ("teacher pretrained: {}/large.bin missing", "tiny6 init_from: {}/base.bin missing",
                    "data: {}/snli/snli_ve_test.jsonl missing", "data: {}/snli/flickr30k_images missing"):
        assert missing.format(tmp_path) in lines, result.output
    assert "  from open_clip's coca_ViT-B-32 weights 'laion2b_s13b_b90k': https://huggingface.co/laion/" \
           f"CoCa-ViT-B-32-laion2B-s13B-b90k, file open_clip_pytorch_model.bin, saved as {tmp_path}/base.bin" in lines
    assert any(line.startswith("  from SNLI-VE annotations: snli_ve_{train,dev,test}.jsonl, made by the scripts of "
                               "https://github.com/necla-ml/SNLI-VE") for line in lines), result.output
    assert lines[-1] == "optima: error: 6 file(s) the run needs are missing (listed above with where each comes " \
                        "from); put them in place or bind other paths"
    # everything in place (the dry run reads none of it): exit 0
    for name in ("large.bin", "base.bin", "snli/snli_ve_train.jsonl", "snli/snli_ve_dev.jsonl",
                 "snli/snli_ve_test.jsonl", "snli/flickr30k_images/"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).mkdir() if name.endswith("/") else (tmp_path / name).write_text("")
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "data: all present" in result.output and "missing" not in result.output


@pytest.mark.parametrize("task", ["snlive", "vqa", "nlvr2", "coco"])
def test_the_tiny12_stage_of_a_tiny12_run_and_of_a_tiny6_run_has_one_cache_key(task):
    """gin/<task>_tiny12.gin binds the tiny6/ scope too (gin/common/students.gin);
    those bindings do not change Tiny12, so the Tiny6 run reuses the Tiny12 run's
    stage (the README's promise) instead of distilling it again."""
    from optima import config
    from optima.experiment import _bindings

    config.setup()
    keys = []
    for student, stages in (("tiny12", ["tiny12"]), ("tiny6", ["tiny12", "tiny6"])):
        config.parse([f"gin/{task}_{student}.gin"])
        keys.append(_bindings("tiny12", stages))
    assert keys[0] == keys[1]
    assert "tiny12/coca_model.layers = (4, 4, 4)" in keys[0] and "tiny6/" not in keys[0]
    assert "@student/torch.optim.Adafactor" in keys[0]
    assert "student/Adafactor.lr = " in keys[0]  # a scope the stage refers to stays in its key
