"""Bad input, as a user meets it through `optima run`: one table per class, each
row the exact line the CLI prints and its exit code. Errors are one line, exit 2,
and leave no run directory; damaged images are skipped with a warning naming the
file (counted in metrics.json) unless `<task>.strict = True`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optima.cli.main import app

from real_format_data import PAPER_TASKS, tiny_paper_bindings, write_jsonl

#: per task: the train annotation file, the test annotation file and an image of the train split
FILES = {
    "snlive": ("snli_ve_train.jsonl", "snli_ve_test.jsonl", "flickr30k_images/1000.jpg"),
    "vqa": ("v2_mscoco_train2014_annotations.json", "v2_OpenEnded_mscoco_val2014_questions.json",
            "train2014/COCO_train2014_000000000009.jpg"),
    "nlvr2": ("train.json", "test1.json", "images/train/3/train-10-0-img0.png"),
    "coco": ("dataset_coco.json", "dataset_coco.json", "train2014/COCO_train2014_000000000001.jpg"),
}
DATA_BINDING = {task: f"{PAPER_TASKS[task][1]}.data_dir" for task in PAPER_TASKS}


def run_cli(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, ["run", *args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def run_task(task: str, data: Path, run_dir: Path, *bindings: str) -> tuple[int, list[str]]:
    args = [PAPER_TASKS[task][0], "--run-dir", str(run_dir)]
    for b in [*tiny_paper_bindings(task, data), *bindings]:
        args += ["-b", b]
    return run_cli(*args)


def assert_refused(code: int, lines: list[str], expected: str, run_dir: Path) -> None:
    assert (code, lines) == (2, [f"optima: error: {expected}"])
    assert not run_dir.exists()  # refused before the run began: the same command can simply run again


# -- empty data --------------------------------------------------------------------


def _no_test_examples(task: str, data: Path) -> None:
    if task == "snlive":  # lines without annotator consensus only: no example
        write_jsonl(data / FILES[task][1], [{"Flikr30kID": "1000.jpg", "sentence2": "x", "gold_label": "-"}])
    elif task == "vqa":
        (data / FILES[task][1]).write_text(json.dumps({"questions": []}))
    elif task == "nlvr2":
        (data / FILES[task][1]).write_text("\n")
    else:  # no image of the Karpathy test split
        coco = json.loads((data / "dataset_coco.json").read_text())
        coco["images"] = [im for im in coco["images"] if im["split"] != "test"]
        (data / "dataset_coco.json").write_text(json.dumps(coco))


EMPTY = [
    # (task, what is empty, expected line: {data} is the data folder)
    ("snlive", "train", "snli_ve_task.data_dir: {data}/snli_ve_train.jsonl is empty; the train split needs its "
                        "examples (download SNLI-VE again)"),
    ("vqa", "train", "vqa_task.data_dir: {data}/v2_mscoco_train2014_annotations.json is empty; the train split "
                     "needs its examples (download VQA v2 again)"),
    ("nlvr2", "train", "nlvr2_task.data_dir: {data}/train.json is empty; the train split needs its examples "
                       "(download NLVR2 again)"),
    ("coco", "train", "coco_captions_task.data_dir: {data}/dataset_coco.json is empty; the train split needs its "
                      "examples (download the Karpathy COCO split (dataset_coco.json) and the COCO 2014 images again)"),
    ("snlive", "test", "snli_ve_task: the test split has no examples in {data}/snli_ve_test.jsonl; is this the "
                       "complete official file?"),
    ("vqa", "test", "vqa_task: the test split has no examples in {data}/v2_OpenEnded_mscoco_val2014_questions.json, "
                    "{data}/v2_mscoco_val2014_annotations.json; is this the complete official file?"),
    ("nlvr2", "test", "nlvr2_task.data_dir: {data}/test1.json is empty; the test split needs its examples "
                      "(download NLVR2 again)"),
    ("coco", "test", "coco_captions_task: the test split has no examples in {data}/dataset_coco.json; is this the "
                     "complete official file?"),
]


@pytest.mark.parametrize("task, split, expected", EMPTY, ids=[f"{t}-{s}" for t, s, _ in EMPTY])
def test_empty_data_is_refused_before_the_run(task, split, expected, tmp_path):
    data = PAPER_TASKS[task][2](tmp_path / "data")
    if split == "train":
        (data / FILES[task][0]).write_text("")
    else:
        _no_test_examples(task, data)
    code, lines = run_task(task, data, tmp_path / "run")
    assert_refused(code, lines, expected.format(data=data), tmp_path / "run")


SYNTHETIC_EMPTY = [
    ("synthetic_ve_task.train_size = 0", "synthetic_ve_task.train_size = 0 must be >= 1: every run reads the train split"),
    ("synthetic_ve_task.test_size = 0", "synthetic_ve_task.test_size = 0 must be >= 1: every run reads the test split"),
]


@pytest.mark.parametrize("binding, expected", SYNTHETIC_EMPTY)
def test_empty_synthetic_splits_are_refused(binding, expected, tmp_path):
    code, lines = run_cli("tests/gin/tiny_ve.gin", "--run-dir", str(tmp_path / "run"), "-b", binding)
    assert_refused(code, lines, expected, tmp_path / "run")


# -- damaged data ------------------------------------------------------------------


def damage(path: Path, kind: str) -> None:
    if kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 2)
    elif kind == "a text file":
        path.write_text("this is not an image\n")
    else:  # a truncated image: the header is there, the pixels end early
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 4])


DAMAGED = [
    # (task, damage, what PIL says)
    ("snlive", "random bytes", "not an image format PIL knows"),
    ("vqa", "a text file", "not an image format PIL knows"),
    ("nlvr2", "truncated", "image file is truncated"),
    ("coco", "truncated", "Truncated File Read"),
]


@pytest.mark.parametrize("task, kind, problem", DAMAGED, ids=[t for t, _, _ in DAMAGED])
def test_a_damaged_image_is_skipped_with_a_warning_and_counted(task, kind, problem, tmp_path):
    data = PAPER_TASKS[task][2](tmp_path / "data")
    damage(data / FILES[task][2], kind)
    code, lines = run_task(task, data, tmp_path / "run")
    configurable = PAPER_TASKS[task][1]
    reason = (f"{data / FILES[task][2]} is not a readable image ({problem}); its record is skipped "
              f"({configurable}.strict = True stops instead)")
    assert code == 0, "\n".join(lines)
    # once, however often it is read
    assert [line for line in lines if line.startswith("optima: warning")] == [f"optima: warning: {reason}"]
    assert "1 damaged file(s): their records were skipped (named in the warnings above and in metrics.json)" in lines
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["skipped_records"] == [reason]


@pytest.mark.parametrize("task, kind, problem", DAMAGED, ids=[t for t, _, _ in DAMAGED])
def test_a_damaged_image_stops_a_strict_run(task, kind, problem, tmp_path):
    data = PAPER_TASKS[task][2](tmp_path / "data")
    damage(data / FILES[task][2], kind)
    configurable = PAPER_TASKS[task][1]
    code, lines = run_task(task, data, tmp_path / "run", f"{configurable}.strict = True")
    assert_refused(code, lines, f"{data / FILES[task][2]} is not a readable image ({problem}); replace or remove "
                                f"it ({configurable}.strict = True; unbound, such a record is skipped with a warning)",
                   tmp_path / "run")


@pytest.mark.parametrize("task", sorted(PAPER_TASKS))
def test_an_annotation_file_that_is_not_utf8_names_file_and_line(task, tmp_path):
    data = PAPER_TASKS[task][2](tmp_path / "data")
    path = data / FILES[task][0]
    text = path.read_bytes()
    cut = text.index(b"\n") + 3 if b"\n" in text.rstrip() else 20  # on line 2 of JSON lines, line 1 of JSON
    path.write_bytes(text[:cut] + b"\xe9" + text[cut:])  # latin-1 "e-acute"
    line = 2 if b"\n" in text.rstrip() else 1
    code, lines = run_task(task, data, tmp_path / "run")
    assert_refused(code, lines, f"{DATA_BINDING[task]}: {path} line {line} is not UTF-8 text (byte 0xe9); is this "
                                "the official file, complete and undamaged?", tmp_path / "run")


def test_a_stream_over_no_usable_examples_is_an_error_not_a_hang():
    """The engine's guard, for any task: a pass without a single row (an empty
    split, or every record damaged) stops instead of looping for ever."""
    import torch

    from optima.engine import BatchStream
    from optima.errors import ConfigError
    from optima.interfaces import SKIPPED_RECORDS
    from optima.plugins.tasks.synthetic_ve import SyntheticVisualEntailment

    class AllDamaged(SyntheticVisualEntailment):
        def batches(self, split, batch_size, *, shuffle, seed):
            for batch in super().batches(split, batch_size, shuffle=shuffle, seed=seed):
                yield {k: v[:0] for k, v in batch.items()} | {SKIPPED_RECORDS: ["x.jpg is damaged"]}

    warnings = []
    stream = BatchStream(AllDamaged(train_size=4, test_size=1), "train", 2, 0, torch.device("cpu"),
                         warn=warnings.append)
    with pytest.raises(ConfigError, match=r"^the train split of AllDamaged has no usable examples \(all 1 "
                                          r"unreadable; the first: x.jpg is damaged\)$"):
        next(stream)
    assert warnings == ["optima: warning: x.jpg is damaged"]
    empty = BatchStream(SyntheticVisualEntailment(train_size=0), "train", 2, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match="has no usable examples$"):
        next(empty)


def test_metrics_json_is_always_valid_json(tmp_path):
    """NaN and inf have no JSON spelling: metrics.json writes them as null."""
    import math

    from optima.checkpoint import write_json_atomic

    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"metrics": {"teacher": {"accuracy": math.nan}}, "r": [math.inf, 0.5, (-math.inf,)]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"metrics": {"teacher": {"accuracy": None}}, "r": [None, 0.5, [None]]}


# -- a full disk -------------------------------------------------------------------

QUICK = [  # tests/gin/tiny_ve.gin, tiny: a teacher checkpoint at step 1, distillation checkpoints at rounds 1 and 2
    "synthetic_ve_task.train_size = 32", "synthetic_ve_task.test_size = 8", "synthetic_ve_task.val_size = 0",
    "teacher_training.steps = 2", "teacher_training.warmup_steps = 0", "teacher_training.batch_size = 8",
    "teacher_training.checkpoint_every = 1", "distillation.rounds = 2", "distillation.steps_per_round = 1",
    "distillation.batch_size = 8", "distillation.warmup_steps = 0", "distillation.checkpoint_every = 1",
    "optima_policy.warmup_rounds = 7",
]
ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' words
FULL = "no space left on device (the disk is full)"

FULL_DISK = [
    # (the write that finds the disk full: a regex over the written path; the line after "optima: error: ",
    #  {run} and {cache} standing for the run and cache folders, [0-9a-f]{16} for a stage key)
    ("teacher checkpoint", r"/checkpoints/teacher/\.step-000000001\.tmp/tensors",
     "could not write checkpoint {run}/checkpoints/teacher/step-000000001: " + FULL + "; no earlier checkpoint exists"),
    ("teacher cache", r"/cache/\.teacher-[0-9a-f]{16}\.safetensors\.tmp$",
     "could not write {cache}/teacher-[0-9a-f]{16}.safetensors: " + FULL),
    ("first distillation checkpoint", r"/checkpoints/student/\.step-000000001\.tmp/tensors",
     "could not write checkpoint {run}/checkpoints/student/step-000000001: " + FULL + "; no earlier checkpoint exists"),
    ("second distillation checkpoint", r"/checkpoints/student/\.step-000000002\.tmp/tensors",
     "could not write checkpoint {run}/checkpoints/student/step-000000002: " + FULL + "; the previous checkpoint "
     "{run}/checkpoints/student/step-000000001 is intact"),
    ("student stage cache", r"/cache/\.student-[0-9a-f]{16}\.safetensors\.tmp$",
     "could not write {cache}/student-[0-9a-f]{16}.safetensors: " + FULL),
    ("the run's student weights", r"/run/\.student\.safetensors\.tmp$",
     "could not write {run}/student.safetensors: " + FULL),
    ("checkpoint state (JSON)", r"/checkpoints/student/\.step-000000002\.tmp/state\.json$",
     "could not write checkpoint {run}/checkpoints/student/step-000000002: " + FULL + "; the previous checkpoint "
     "{run}/checkpoints/student/step-000000001 is intact"),
]


@pytest.mark.parametrize("what, where, expected", FULL_DISK, ids=[w for w, _, _ in FULL_DISK])
def test_a_full_disk_stops_cleanly_with_the_resume_command(what, where, expected, tmp_path, monkeypatch):
    """ENOSPC injected at one write (safetensors' own error for tensors, an OSError
    for JSON): one line saying so and naming the path, the resume command, exit 1,
    no temporary file left, earlier checkpoints intact; the resumed run finishes."""
    import errno
    import re

    import safetensors.torch
    from safetensors import SafetensorError

    from optima import checkpoint
    from optima.checkpoint import CheckpointManager
    from optima.cli.run import command_line

    run, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv("OPTIMA_CACHE", str(cache))
    hits = []
    real_save, real_text = safetensors.torch.save_file, checkpoint._write_text

    def save_file(tensors, filename, metadata=None):
        if re.search(where, str(filename)):
            hits.append(filename)
            Path(filename).write_bytes(b"half a file")  # what a full disk leaves
            raise SafetensorError(ENOSPC_TEXT)
        return real_save(tensors, filename, metadata)

    def write_text(path, text):
        if re.search(where, str(path)):
            hits.append(path)
            Path(path).write_text(text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_text(path, text)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(checkpoint, "_write_text", write_text)
    bindings = [a for b in QUICK for a in ("-b", b)]
    code, lines = run_cli("tests/gin/tiny_ve.gin", "--run-dir", str(run), *bindings)
    assert len(hits) == 1, lines
    resume = command_line("tests/gin/tiny_ve.gin", QUICK, "--resume", str(run))
    pattern = re.escape(f"optima: error: {expected}; resume with: {resume}").replace(
        re.escape("{run}"), re.escape(str(run))).replace(re.escape("{cache}"), re.escape(str(cache))).replace(
        re.escape("[0-9a-f]{16}"), "[0-9a-f]{16}")
    assert code == 1
    assert [line for line in lines if line.startswith("optima: error")] == [lines[-1]]
    assert re.fullmatch(pattern, lines[-1]), lines[-1]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    for step in sorted(run.glob("checkpoints/*/step-*")):
        CheckpointManager.load(step)  # intact: sizes and checksums match
    if what == "second distillation checkpoint":  # the resume command finishes the run
        monkeypatch.setattr(safetensors.torch, "save_file", real_save)
        code, lines = run_cli("tests/gin/tiny_ve.gin", *bindings, "--resume", str(run))
        assert code == 0, lines
        assert json.loads((run / "metrics.json").read_text())["stages"]["student"]["resumed_from_step"] == 1


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # no thread's traceback
def test_a_full_disk_at_a_tensorboard_write_stops_cleanly_with_the_resume_command(tmp_path, monkeypatch):
    """The disk fills right after the student's first checkpoint and the first
    write to fail is an event file's (TensorBoard writes them in a thread, which
    keeps the error for a later call): one line naming the log folder, the resume
    command, exit 1; after freeing space the resume finishes and TensorBoard
    shows every student step once."""
    import errno

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.tensorflow_stub.io.gfile import LocalFileSystem

    from optima.cli.run import command_line

    run, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv("OPTIMA_CACHE", str(cache))
    real = LocalFileSystem._write
    failed = []

    def write(fs, filename, content, mode):
        full = (run / "checkpoints" / "student" / "step-000000001").exists()
        if full and b"/tensorboard/student/" in bytes(filename):
            failed.append(filename)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fs, filename, content, mode)

    bindings = [a for b in QUICK for a in ("-b", b)]
    with monkeypatch.context() as patch:
        patch.setattr(LocalFileSystem, "_write", write)
        code, lines = run_cli("tests/gin/tiny_ve.gin", "--run-dir", str(run), *bindings)
    assert failed, lines
    resume = command_line("tests/gin/tiny_ve.gin", QUICK, "--resume", str(run))
    assert (code, [line for line in lines if line.startswith("optima: error")]) == (1, [
        f"optima: error: could not write the TensorBoard log {run}/tensorboard: {FULL}; the checkpoints are "
        f"intact; resume with: {resume}"]), lines
    assert lines[-1].startswith("optima: error")

    code, lines = run_cli("tests/gin/tiny_ve.gin", *bindings, "--resume", str(run))
    assert code == 0, lines
    events = EventAccumulator(str(run / "tensorboard" / "student"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total/task")] == [1, 2]


def test_a_round_log_append_the_os_refuses_is_one_line_and_cut_off(tmp_path):
    """Not injected: a file size limit (EFBIG) stops the append of a round's line;
    the error is one line naming the log and the half-written line is removed."""
    import resource
    import signal

    from optima.checkpoint import CheckpointWriteError
    from optima.engine import RoundResult
    from optima.interfaces import RoundLosses
    from optima.reporting import RoundLog, read_round_log

    log = RoundLog(tmp_path)
    log.on_arms("student", ["image", "text"])
    log.on_stage("student", 4, "step")
    result = RoundResult(round=1, step=2, arm=0, arm_label="image", reward=None,
                         losses=RoundLosses({"task": 0.5, "kd": 0.25}, {"image": {"hidden": 1.0}}, ("image",)))
    log.on_round("student", result)
    before = log.path("student").read_bytes()
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 20, hard))
    try:
        with pytest.raises(CheckpointWriteError) as e:
            log.on_round("student", result)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert str(e.value) == f"could not write {log.path('student')}: File too large"
    assert log.path("student").read_bytes() == before
    assert len(read_round_log(log.path("student"))[1]) == 1


def test_a_write_the_os_refuses_inside_safetensors_is_understood(tmp_path):
    """Not injected: the OS refuses the write (a file size limit, EFBIG) inside
    safetensors' Rust code, and its error is read as the file system's."""
    import resource
    import signal

    import torch

    from optima.checkpoint import CheckpointManager, CheckpointWriteError

    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save({"w": torch.zeros(4)}, step=1)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(CheckpointWriteError) as e:
            manager.save({"w": torch.zeros(100_000)}, step=2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert str(e.value) == (f"could not write checkpoint {tmp_path}/ckpt/step-000000002: File too large; "
                            f"the previous checkpoint {tmp_path}/ckpt/step-000000001 is intact")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-000000001"]


# -- bad bindings ------------------------------------------------------------------

BAD_BINDINGS = [
    # (binding, the line after "optima: error: ")
    ("distillation.rounds = (5", "binding 'distillation.rounds = (5': gin cannot parse it: EOF in multi-line "
                                 "statement (a bracket or a quote is not closed?)"),
    ("distillation.reward = @kd_reward", "distillation.reward = @kd_reward: bind it called, @kd_reward(): a reward "
                                         "is built once, from its bindings"),
    ("student/distillation.reward = @kd_reward", "student/distillation.reward = @kd_reward: bind it called, "
                                                 "@kd_reward(): a reward is built once, from its bindings"),
    ("distillation.policy = @optima_policy()", "distillation.policy = @optima_policy(): bind it uncalled, "
                                               "@optima_policy: the engine builds a policy with the number of arms "
                                               "and a seed"),
    ("distillation.loss = @optima_loss()", "distillation.loss = @optima_loss(): bind it uncalled, @optima_loss: the "
                                           "engine builds a loss over the student's and teacher's modules"),
    ("experiment.teacher = @teacher/coca_model()", "experiment.teacher = @teacher/coca_model(): bind it uncalled, "
                                                   "@teacher/coca_model: the engine builds each model in its stage's "
                                                   "scope"),
    ("experiment.task = @synthetic_ve_task()", "experiment.task = @synthetic_ve_task(): bind it uncalled, "
                                               "@synthetic_ve_task: the engine builds the task once per run"),
    ("experiment.head = @attentional_pooler_head()", "experiment.head = @attentional_pooler_head(): bind it "
                                                     "uncalled, @attentional_pooler_head: the engine builds a head "
                                                     "over each model and the task"),
    ("distillation.optimizer = @student/torch.optim.AdamW()", "distillation.optimizer = "
     "@student/torch.optim.AdamW(): bind it uncalled, @student/torch.optim.AdamW: the engine builds an optimizer "
     "over the parameters to train"),
    ("distillation.policy = @kd_reward()", "distillation.policy = @kd_reward() must name a policy (@<name>_policy); "
                                           "kd_reward is a reward"),
    ("distillation.reward = 5", "distillation.reward = 5 must name a reward, e.g. @<name>_reward()"),
    ("synthetic_ve_task.image_size = 4", "synthetic_ve_task.image_size = 4 must be an integer >= 8 (shapes are "
                                         "drawn at least 8 px wide)"),
    ("synthetic_ve_task.train_size = -5", "synthetic_ve_task.train_size = -5 must be an integer >= 0"),
    ("student/torch.optim.AdamW.lr = 'fast'", "student/torch.optim.AdamW.lr = 'fast' must be a number > 0"),
    ("student/torch.optim.AdamW.lr = 0.0", "student/torch.optim.AdamW.lr = 0.0 must be a number > 0"),
    ("distillation.arms = []", "distillation.arms = []: no arm is listed; list at least one (a list of module "
                               "names), or leave it unbound for every non-empty subset of the modules"),
    ("student/coca_model.arch = 'coca_ViT-Q-99'", "coca_model.arch = 'coca_ViT-Q-99' is not a CoCa architecture "
                                                  "open_clip knows: coca_base, coca_roberta-ViT-B-32, coca_ViT-B-32, "
                                                  "coca_ViT-L-14, or an architecture dict"),
]


@pytest.mark.parametrize("binding, expected", BAD_BINDINGS, ids=[b for b, _ in BAD_BINDINGS])
def test_a_bad_binding_is_one_line_before_any_work(binding, expected, tmp_path):
    code, lines = run_cli("tests/gin/tiny_ve.gin", "--run-dir", str(tmp_path / "run"), "-b", binding)
    assert_refused(code, lines, expected, tmp_path / "run")


def test_the_component_check_passes_every_shipped_config():
    """No false alarm: every gin file in the repository binds its components right."""
    from optima import config
    from optima.validation import check_component_bindings

    config.setup(external_plugins=False)
    for path in sorted(Path("gin").rglob("*.gin")):
        config.parse([str(path)])
        check_component_bindings()


# -- bad paths on the command line -------------------------------------------------


def _binary(tmp_path: Path) -> list[str]:
    (tmp_path / "model.gin").write_bytes(b"distillation.rounds = 1\n\x89PNG\r\n\x1a\n\x00\xff")
    return [str(tmp_path / "model.gin")]


def _run_dir_is_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "taken").write_text("notes")
    return ["tests/gin/tiny_ve.gin", "--run-dir", str(tmp_path / "taken")]


def _run_dir_under_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "taken").write_text("notes")
    return ["tests/gin/tiny_ve.gin", "--run-dir", str(tmp_path / "taken" / "runs" / "r1")]


def _run_dir_read_only(tmp_path: Path, monkeypatch) -> list[str]:
    """A read-only file system (tests run as root, so permissions would not stop a
    write and no read-only mount is at hand): mkdir there fails with EROFS."""
    import errno

    real = os.makedirs

    def makedirs(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)
    return ["tests/gin/tiny_ve.gin", "--run-dir", str(tmp_path / "ro" / "run")]


SECRET = "root:$6$SECRETHASH:19000:0:99999:7:::\n"  # the first line of an /etc/shadow


def _includes_a_text_file(tmp_path: Path) -> list[str]:
    (tmp_path / "shadow").write_text(SECRET)
    (tmp_path / "model.gin").write_text(f"include '{tmp_path}/shadow'\n")
    return [str(tmp_path / "model.gin")]


def _includes_a_binary_file(tmp_path: Path) -> list[str]:
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (tmp_path / "model.gin").write_text(f"include '{tmp_path}/image.png'\n")
    return [str(tmp_path / "model.gin")]


def _given_a_text_file(tmp_path: Path) -> list[str]:
    (tmp_path / "shadow").write_text(SECRET)
    return [str(tmp_path / "shadow")]


BAD_PATHS = [
    (_includes_a_text_file, "{tmp}/shadow:1: not a gin file (gin cannot parse it); it is included from "
                            "{tmp}/model.gin: include .gin files only"),
    (_includes_a_binary_file, "{tmp}/image.png: not a gin file (not UTF-8 text); it is included from "
                              "{tmp}/model.gin:1: include .gin files only"),
    (_given_a_text_file, "{tmp}/shadow:1: not a gin file (gin cannot parse it); pass the experiment's .gin file"),
    (_binary, "{tmp}/model.gin:2: not a gin file (not UTF-8 text: byte 0x89); pass the experiment's .gin file"),
    (_run_dir_is_a_file, "--run-dir {tmp}/taken: it is a file, not a directory; pass a directory that can be "
                         "written"),
    (_run_dir_under_a_file, "--run-dir {tmp}/taken/runs/r1: {tmp}/taken is a file, not a directory; pass a "
                            "directory that can be written"),
    (_run_dir_read_only, "--run-dir {tmp}/ro/run: Read-only file system; pass a directory that can be written"),
]


@pytest.mark.parametrize("make, expected", BAD_PATHS, ids=[m.__name__.strip("_") for m, _ in BAD_PATHS])
def test_a_bad_path_is_one_line(make, expected, tmp_path, monkeypatch):
    args = make(tmp_path, monkeypatch) if make is _run_dir_read_only else make(tmp_path)
    code, lines = run_cli(*args)
    assert (code, lines) == (2, [f"optima: error: {expected.format(tmp=tmp_path)}"])
    if make is _run_dir_is_a_file:
        assert (tmp_path / "taken").read_text() == "notes"  # untouched
    assert "SECRET" not in lines[0]  # nothing of a file that is not gin is quoted


# -- messages ----------------------------------------------------------------------

#: `{name}` placeholders that messages print on purpose: the documented fields of
#: the image-path patterns (`nlvr2_task.image_pattern`, `vqa_task.image_pattern`).
PATTERN_FIELDS = {"split", "directory", "stem", "identifier", "i", "image_id"}


def test_no_message_prints_a_placeholder_for_want_of_an_f_prefix(tmp_path):
    """A string piece without its `f` prints `{value!r}` literally: the variants
    file's bindings message did. Every string of a `raise` or a warning in the
    code is scanned for `{name}` pieces that are not f-string fields."""
    import ast
    import re

    from optima.errors import ConfigError
    from optima.sweep import load_variants_file

    path = tmp_path / "variants.toml"
    path.write_text("[x]\nbindings = 'a.b = 1'\n")
    with pytest.raises(ConfigError) as e:
        load_variants_file(str(path))
    assert str(e.value).endswith("got 'a.b = 1'"), str(e.value)

    field = re.compile(r"\{([A-Za-z_]\w*)(?:![rsa])?(?::[^{}]*)?\}")
    found = []
    for root in ("optima", "cli", "plugins"):
        for source in sorted(Path(root).rglob("*.py")):
            for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
                message = isinstance(node, ast.Raise) or (
                    isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                    in ("warning", "warn"))
                for sub in ast.walk(node) if message else ():
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        found += [f"{source}:{sub.lineno}: {{{name}}}" for name in field.findall(sub.value)
                                  if name not in PATTERN_FIELDS]
    assert found == []
