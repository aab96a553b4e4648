"""`optima data synth`: the synthetic world in the real tasks' official file
layouts, read back by the real loaders; the same bytes for the same seed; one-line
errors; and every paper config (gin/{snlive,vqa,nlvr2,coco}_{tiny12,tiny6}.gin)
end to end on it through `optima run`, tiny CoCas in place of the checkpoints."""
from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optima.cli.main import app
from optima.plugins.tasks.synthetic_world import tasks as world

from real_format_data import tiny_coca_macro

runner = CliRunner()
TASKS = ("snlive", "vqa", "nlvr2", "coco")


def synth(task: str, out: Path, *extra: str):
    return runner.invoke(app, ["data", "synth", task, "--out", str(out), "--size", "6", "--eval-size", "3",
                               "--image-size", "32", *extra])


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def real_task(task: str, data: Path):
    from optima.plugins.tasks.coco_captions import CocoCaptions
    from optima.plugins.tasks.nlvr2 import Nlvr2
    from optima.plugins.tasks.snli_ve import SnliVe
    from optima.plugins.tasks.vqa import Vqa

    cls = {"snlive": SnliVe, "vqa": Vqa, "nlvr2": Nlvr2, "coco": CocoCaptions}[task]
    return cls(data_dir=str(data), image_size=32, context_length=16, load_threads=0)


@pytest.mark.parametrize("task", TASKS)
def test_the_real_loader_reads_every_split_and_the_world_s_labels(task, tmp_path):
    result = synth(task, tmp_path / "data")
    assert result.exit_code == 0, result.output
    loader = real_task(task, tmp_path / "data")
    assert loader.missing_paths() == []
    sizes = {split: len(loader.records(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 6, "val": 3, "test": 3}
    batch = next(iter(loader.batches("train", 6, shuffle=False, seed=0)))
    assert batch["image"].shape[-3:] == (3, 32, 32) and "skipped_records" not in batch
    # the texts and labels are the world task's, example by example
    kind = {"snlive": world.WorldEntailment, "vqa": world.WorldVqa, "nlvr2": world.WorldNlvr2,
            "coco": world.WorldCaptions}[task]
    split = kind(image_size=32, train_size=6, val_size=0, test_size=0)._split("train")
    records = loader.records("train")
    if task == "snlive":
        assert [(r.text, r.target) for r in records] == [(t, int(y)) for t, y in zip(split.texts, split.target)]
    elif task == "vqa":
        answers = loader.answers
        assert [r.text for r in records] == [t + "?" for t in split.texts]
        for i, r in enumerate(records):  # the simulated annotators' soft scores, through the official ones
            scores = {answers[k]: s for k, s in r.target}
            # (the vocabulary: the train questions' most common answers; the others score nothing)
            expected = {a: float(split.target[i, j]) for j, a in enumerate(world.ANSWERS)
                        if split.target[i, j] > 0 and a in answers}
            assert scores == pytest.approx(expected) and scores
    elif task == "nlvr2":
        assert [(r.text, r.target) for r in records] == [(t, int(y)) for t, y in zip(split.texts, split.target)]
        assert batch["image"].shape[:2] == (6, 2)
    else:
        assert [[ref.rstrip(".").lower() for ref in r.target] for r in records] == split.texts
        assert len(batch["references"][0]) == 5


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_ones(tmp_path):
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        result = synth("nlvr2", tmp_path / name, "--seed", seed)
        assert result.exit_code == 0, result.output
    a, b, c = (digests(tmp_path / n) for n in "abc")
    assert len(a) == 3 + 2 * 12 + 1  # 3 annotation files, 12 image pairs, optima_synth.json
    assert a == b
    assert {k for k in a if a[k] != c.get(k)} >= {"train.json", "images/train/0/train-0-0-img0.png"}


@pytest.mark.parametrize("args, message", [
    (["sneli", "--size", "4"], "unknown task 'sneli'; choose one of snlive, vqa, nlvr2, coco"),
    (["snlive", "--size", "0"], "--size must be an integer >= 1, got 0"),
    (["snlive", "--size", "4", "--image-size", "4"], "--image-size must be an integer >= 8, got 4"),
    (["snlive", "--size", "4", "--eval-size", "0"], "--eval-size must be an integer >= 1, got 0"),
])
def test_bad_arguments_are_one_line_errors(args, message, tmp_path):
    result = runner.invoke(app, ["data", "synth", *args, "--out", str(tmp_path / "data")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"optima: error: {message}"]
    assert not (tmp_path / "data").exists()


def test_a_non_empty_out_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = synth("snlive", out)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"optima: error: --out {out} is not empty; give a new or empty folder (nothing there is overwritten)"]
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary folder left behind
    (out / "mine.txt").unlink()  # an empty folder is filled
    assert synth("snlive", out).exit_code == 0 and (out / "snli_ve_train.jsonl").is_file()


# -- every paper config end to end --------------------------------------------------------------

CONFIGURABLE = {"snlive": "snli_ve_task", "vqa": "vqa_task", "nlvr2": "nlvr2_task", "coco": "coco_captions_task"}
METRIC = {"snlive": "accuracy", "vqa": "accuracy", "nlvr2": "accuracy", "coco": "cider"}


def tiny_bindings(task: str, data: Path, cache: Path) -> list[str]:
    """A shipped paper config at tiny shapes on the CPU: tiny random CoCas for the
    checkpoints (teacher 2/2/2, Tiny12 and Tiny6 1/1/1 of a narrower layout), a
    few steps; task, head, policy, reward, loss and optimizers as shipped."""
    task_name = CONFIGURABLE[task]
    students = [b for s in ("tiny12", "tiny6") for b in (
        f"{s}/coca_model.arch = %TINY_COCA", f"{s}/coca_model.init_from = None", f"{s}/coca_model.layers = (1, 1, 1)")]
    return [
        tiny_coca_macro(),
        "teacher/coca_model.arch = %TINY_COCA", "teacher/coca_model.pretrained = None",
        "teacher/coca_model.layers = (2, 2, 2)", *students,
        f"{task_name}.data_dir = '{data}'", f"{task_name}.image_size = 32", f"{task_name}.context_length = 16",
        f"{task_name}.load_threads = 0",
        "experiment.device = 'cpu'", "experiment.eval_batch_size = 4", "experiment.data_workers = 0",
        f"experiment.cache_dir = '{cache}'",
        "teacher_training.steps = 2", "teacher_training.batch_size = 2", "teacher_training.warmup_steps = 0",
        "teacher_training.amp = False",
        "distillation.rounds = 2", "distillation.steps_per_round = 1", "distillation.batch_size = 2",
        "distillation.warmup_steps = 0", "distillation.amp = False",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_every_paper_config_runs_end_to_end_on_synthesized_data(task, tmp_path):
    """gin/<task>_tiny12.gin, then gin/<task>_tiny6.gin with the same cache: the
    second reuses the teacher and Tiny12 and distils Tiny6 from Tiny12 (the
    paper's two stages); both evaluate every network with the real decoders."""
    assert synth(task, tmp_path / "data").exit_code == 0
    bindings = [a for b in tiny_bindings(task, tmp_path / "data", tmp_path / "cache") for a in ("-b", b)]
    for student, networks in (("tiny12", ["teacher", "tiny12"]), ("tiny6", ["teacher", "tiny12", "tiny6"])):
        run = tmp_path / student
        result = runner.invoke(app, ["run", f"gin/{task}_{student}.gin", "--run-dir", str(run), *bindings])
        assert result.exit_code == 0, result.output
        summary = json.loads((run / "metrics.json").read_text())
        assert list(summary["metrics"]) == networks
        for net in networks:
            value = summary["metrics"][net][METRIC[task]]
            assert value == value and value >= 0  # a number, not NaN
        predictions = summary["predictions"][student]
        assert (run / predictions).is_file()
        assert len(summary["stages"][student]["plays"]) == 2 and not summary["stages"][student]["cached"]
    # the Tiny6 run distilled only Tiny6: the teacher and Tiny12 came from the Tiny12 run's cache
    assert summary["stages"]["teacher"]["cached"] and summary["stages"]["tiny12"]["cached"]


def test_a_failed_write_is_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """A full disk halfway through: one line, and neither `--out` nor the
    temporary folder it was being made in is left."""
    from optima.plugins.tasks.synthetic_world import synth as module

    written = []

    def save_image(pixels, path):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)

    monkeypatch.setattr(module, "_save_image", save_image)
    result = synth("snlive", tmp_path / "data")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"optima: error: --out {tmp_path / 'data'}: writing the data set failed (No space left on device); "
        "nothing was written"]
    assert list(tmp_path.iterdir()) == []
