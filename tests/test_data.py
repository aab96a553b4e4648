"""The input pipeline (optima.data): batches made by DataLoader worker processes
are the same, in the same order, for any number of workers; a resumed stream
starts at its batch without opening the images of earlier ones; a task with
only `batches` still works, in the training process; shards of a batch are its
rows."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from optima.data import BatchStream, default_workers, eval_batches
from optima.interfaces import shard_rows, slice_rows
from optima.plugins.tasks import vl_data
from optima.plugins.tasks.snli_ve import LABELS, SnliVe
from optima.plugins.tasks.synthetic_ve import SyntheticVisualEntailment

N = 12  # examples, each with its own image; batches of 2: 6 per epoch


def make_snli(root: Path, n: int = N) -> Path:
    images = root / "flickr30k_images"
    images.mkdir(parents=True)
    rows = []
    for k in range(n):
        im = Image.new("RGB", (48, 36), (20 * k % 256, 255 - 20 * k % 256, 90))
        for x in range(k * 3 % 40, k * 3 % 40 + 6):
            for y in range(36):
                im.putpixel((x, y), (255, 255, 255))
        im.save(images / f"{k}.jpg", quality=90)
        rows.append({"Flikr30kID": f"{k}.jpg", "sentence2": f"Sentence number {k}.", "gold_label": LABELS[k % 3]})
    for name in ("snli_ve_train.jsonl", "snli_ve_dev.jsonl", "snli_ve_test.jsonl"):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def task(tmp_path):
    return SnliVe(data_dir=str(make_snli(tmp_path / "snli")), image_size=32, context_length=12, augment=True,
                  load_threads=2)


def _take(stream: BatchStream, n: int) -> list[dict]:
    out = [next(stream) for _ in range(n)]
    stream.close()
    return out


def _equal(u, v) -> bool:
    return torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v  # tensors, or lists of ids


def _cat(parts: list):
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [x for p in parts for x in p]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_batches_are_the_same_for_any_number_of_workers(task):
    """15 batches (2.5 epochs, random crops on): 0, 1 and 2 workers give equal tensors."""
    runs = {w: _take(BatchStream(task, "train", 2, 5, torch.device("cpu"), workers=w), 15) for w in (0, 1, 2)}
    assert _same(runs[0], runs[1]) and _same(runs[0], runs[2])
    # and they are the task's own passes, epoch e shuffled with seed + e
    own = [b for e in range(3) for b in task.batches("train", 2, shuffle=True, seed=5 + e)][:15]
    assert _same(runs[0], own)
    assert not torch.equal(runs[0][0]["image"], runs[0][6]["image"])  # epochs differ


def test_images_travel_as_uint8_and_are_open_clips_transforms_bit_for_bit(task):
    """Workers send uint8 pixels (`packed_shard`); unpacked, a batch's images are
    exactly what open_clip's whole transforms (ToTensor and Normalize per image
    included) give for the same random crops, on the train and the test split."""
    import open_clip

    packed = task.batch_source("train", 5, shuffle=True, seed=2).packed_shard(1, 0, 1)
    assert packed["image"].dtype == torch.uint8 and packed["image"].shape == (5, 3, 32, 32)
    for split, k, train in (("train", 1, True), ("test", 0, False)):
        source = task.batch_source(split, 5, shuffle=train, seed=2)
        transform = open_clip.image_transform(32, is_train=train, mean=vl_data.OPENAI_DATASET_MEAN,
                                              std=vl_data.OPENAI_DATASET_STD)
        pil = [vl_data._open_rgb(task.records(split)[i].images[0]) for i in source.order[5 * k:5 * k + 5].tolist()]
        batch_generator = torch.Generator().manual_seed(int(source.seeds[k]))
        with torch.random.fork_rng(devices=[]):  # the crops' seed, drawn as `transform_images` draws it
            torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=batch_generator)))
            expected = torch.stack([transform(im) for im in pil])
        got = source.batch(k)["image"]
        assert got.dtype == torch.float32 and torch.equal(got, expected), split


def test_a_resumed_stream_starts_at_its_batch_without_opening_earlier_images(tmp_path, monkeypatch):
    """A stream restored at epoch 1, batch 3, with 2 workers: its batches are the
    uninterrupted stream's from there, and no worker opened an image of batches
    0-2 of that epoch (each example has its own image, so the sets are disjoint;
    12 batches an epoch, so the workers' prefetching stays inside epoch 1)."""
    task = SnliVe(data_dir=str(make_snli(tmp_path / "snli", n=24)), image_size=32, context_length=12, augment=True,
                  load_threads=2)
    full = _take(BatchStream(task, "train", 2, 5, torch.device("cpu")), 12 + 5)
    log = tmp_path / "opened.txt"

    def logged(path, real=vl_data._open_rgb):
        with open(log, "a") as f:  # the workers are other processes: they report through a file
            f.write(path + "\n")
        return real(path)

    monkeypatch.setattr(vl_data, "_open_rgb", logged)
    stream = BatchStream(task, "train", 2, 5, torch.device("cpu"), workers=2, prefetch=1)
    stream.load_state_dict({"epoch": 1, "position": 3})
    resumed = _take(stream, 2)
    assert _same(resumed, full[15:17])
    assert stream.state_dict() == {"epoch": 1, "position": 5, "skipped_records": []}

    records = task.records("train")
    source = task.batch_source("train", 2, shuffle=True, seed=6)  # epoch 1
    def images(k):
        return {records[i].images[0] for i in source.order[2 * k:2 * k + 2].tolist()}
    opened = set(log.read_text().split())
    assert images(3) | images(4) <= opened
    assert not opened & (images(0) | images(1) | images(2))


def test_a_task_with_only_batches_is_read_in_the_training_process():
    """The synthetic task has no `batch_source`: workers are not used, batches are
    the task's own, and a resumed stream goes on where it was."""
    task = SyntheticVisualEntailment(image_size=16, context_length=8, train_size=10, val_size=0, test_size=4)
    assert task.batch_source("train", 4, shuffle=True, seed=0) is None
    stream = BatchStream(task, "train", 4, 1, torch.device("cpu"), workers=2)
    got = _take(stream, 5)
    own = [*task.batches("train", 4, shuffle=True, seed=1), *task.batches("train", 4, shuffle=True, seed=2)][:5]
    assert _same(got, own)
    resumed = BatchStream(task, "train", 4, 1, torch.device("cpu"), workers=2)
    resumed.load_state_dict({"epoch": 1, "position": 1})
    assert _same(_take(resumed, 1), own[4:5])


def test_evaluation_batches_with_workers_are_the_unshuffled_pass(task):
    own = list(task.batches("test", 5, shuffle=False, seed=0))
    assert _same(list(eval_batches(task, "test", 5, torch.device("cpu"), workers=2)), own)


def test_shards_are_the_rows_of_the_batch(tmp_path):
    """Without random choices (no augmentation), the shards of a batch over 3
    processes, in rank order, are the whole batch; a source's default `shard`
    slices the whole batch the same way."""
    task = SnliVe(data_dir=str(make_snli(tmp_path / "snli", n=7)), image_size=32, context_length=12,
                  augment=False, load_threads=0)
    source = task.batch_source("train", 5, shuffle=True, seed=3)
    for k in range(len(source)):
        whole = source.batch(k)
        shards = [source.shard(k, r, 3) for r in range(3)]
        assert _same([{key: _cat([s[key] for s in shards]) for key in whole}], [whole])
        assert _same([slice_rows(whole, r, 3) for r in range(3)], shards)
    assert [shard_rows(5, r, 3) for r in range(3)] == [slice(0, 1), slice(1, 3), slice(3, 5)]


def test_default_workers_leave_a_cpu_to_the_training_process(monkeypatch):
    monkeypatch.setattr("optima.data.available_cpus", lambda: 16)
    assert default_workers() == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes on the node share its CPUs
    assert default_workers() == 1
    monkeypatch.setattr("optima.data.available_cpus", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers() == 0


def test_damaged_images_met_by_workers_reach_the_stream(tmp_path):
    """A damaged file read in a worker process: its record is left out and the
    reason arrives with the batch, so the stream warns and counts it (what the
    run's summary lists)."""
    task = SnliVe(data_dir=str(make_snli(tmp_path / "snli", n=6)), image_size=32, context_length=12, augment=True,
                  load_threads=0)
    (tmp_path / "snli" / "flickr30k_images" / "4.jpg").write_bytes(b"not a jpeg")
    warnings = []
    stream = BatchStream(task, "train", 3, 0, torch.device("cpu"), workers=2, warn=warnings.append)
    rows = sum(next(stream)["label"].shape[0] for _ in range(2))  # one epoch
    stream.close()
    assert rows == 5
    assert list(stream.skipped_records) == [r[len("optima: warning: "):] for r in warnings]
    assert len(warnings) == 1 and "4.jpg is not a readable image" in warnings[0]


# -- worker processes that die ------------------------------------------------------

def _children(pid: int) -> list[int]:
    """Live (not zombie) child processes of `pid`, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(ppid) == pid and state != "Z":
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


WORKERS_THEN_SLEEP = r"""
import sys, time, torch
sys.path.insert(0, "tests")
from test_data import _children
from optima.data import BatchStream
from optima.plugins.tasks.snli_ve import SnliVe
task = SnliVe(data_dir=sys.argv[1], image_size=32, context_length=12, augment=True, load_threads=0)
stream = BatchStream(task, "train", 2, 5, torch.device("cpu"), workers=2)
next(stream)
import os
print(" ".join(map(str, _children(os.getpid()))), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux only: workers die with their parent through prctl(PR_SET_PDEATHSIG), and the test finds them in /proc")
def test_workers_die_with_their_parent_at_once(tmp_path):
    """Real processes: the process that made the workers is SIGKILLed (as a
    preemption or the OOM killer would); a second later no worker is alive.
    (torch's own watchdog in a worker notices a dead parent only within 5 s.)"""
    import signal
    import subprocess
    import sys
    import time

    data = make_snli(tmp_path / "snli")
    parent = subprocess.Popen([sys.executable, "-c", WORKERS_THEN_SLEEP, str(data)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers), workers
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 1.0
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in workers if _alive(p)] == []
    finally:
        parent.kill()
        for p in workers if "workers" in locals() else ():
            if _alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux only: workers die with their parent through prctl(PR_SET_PDEATHSIG), and the test finds them in /proc")
def test_a_dead_worker_stops_the_run_in_one_line_with_the_resume_command(tmp_path, monkeypatch):
    """A DataLoader worker SIGKILLed mid-distillation (SNLI-VE, 2 workers): one
    line saying so, the resume command, exit 1; no traceback."""
    import signal
    import sys
    import time

    from typer.testing import CliRunner

    import optima.experiment as experiment_module
    from optima.cli.main import app
    from optima.cli.run import command_line

    sys.path.insert(0, str(Path(__file__).parent))
    from real_format_data import PAPER_TASKS, tiny_paper_bindings

    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))
    config, _, make = PAPER_TASKS["snlive"]
    bindings = [*tiny_paper_bindings("snlive", make(tmp_path / "data")), "experiment.data_workers = 2"]
    killed = []

    def kill_a_worker(where, n):
        if (where, n) == ("step", 1):
            killed.append(_children(os.getpid())[0])
            os.kill(killed[0], signal.SIGKILL)
            time.sleep(0.5)  # torch's SIGCHLD handler raises its error

    monkeypatch.setattr(experiment_module, "fault_point", kill_a_worker)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", config, "--run-dir", str(run), *(a for b in bindings for a in ("-b", b))])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output and killed, result.output
    resume = command_line(config, bindings, "--resume", str(run))
    assert (result.exit_code, lines[-1]) == (1, f"optima: error: a data loader worker process (pid {killed[0]}) is "
                                                f"killed by signal: Killed, so the run stopped; its checkpoints are "
                                                f"intact; resume with: {resume}")
