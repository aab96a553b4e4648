"""`optima export` and `optima eval` on a finished tiny run: the export
loads in plain open_clip (a subprocess that cannot import optima) and gives the
run's outputs, eval of the export reproduces the run's test metric, the model
card says what it must, and bad arguments are one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from optima import predictions
from optima.cli.main import app
from optima.export import load_head, load_network_weights, parse_run_config, read_run

# tests/gin/tiny_ve.gin at its smallest: this module needs a finished run, not a good one.
TINY_RUN = [
    "synthetic_ve_task.train_size = 128", "synthetic_ve_task.test_size = 48", "synthetic_ve_task.val_size = 24",
    "teacher_training.steps = 3", "teacher_training.warmup_steps = 0", "teacher_training.batch_size = 16",
    "distillation.rounds = 3", "distillation.steps_per_round = 1", "distillation.batch_size = 16",
    "distillation.warmup_steps = 0", "optima_policy.warmup_rounds = 7", "experiment.eval_batch_size = 16",
]

# Plain open_clip: any import of optima fails, so the export cannot lean on our code.
PLAIN_OPEN_CLIP = r'''
import importlib.abc, sys

class NoOptima(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "optima" or name.startswith("optima."):
            raise ImportError("optima must not be imported here")

sys.meta_path.insert(0, NoOptima())
import open_clip, torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)
export_dir, name, inputs, outputs = sys.argv[1:5]
open_clip.add_model_config(export_dir)
model = open_clip.create_model(name, pretrained=export_dir + "/open_clip_model.safetensors").eval()
local = open_clip.create_model("local-dir:" + export_dir).eval()
x = load_file(inputs)
with torch.no_grad():
    out = model(x["image"], x["text"], output_labels=False)
    out_local = local(x["image"], x["text"], output_labels=False)
save_file({"image_features": out["image_features"], "text_features": out["text_features"],
           "logits": out["logits"].contiguous(), "local_logits": out_local["logits"].contiguous(),
           "layers": torch.tensor([len(model.visual.transformer.resblocks), len(model.text.transformer.resblocks),
                                   len(model.text_decoder.resblocks)])}, outputs)
print(type(model).__name__)
'''

runner = CliRunner()


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _one_line(output: str) -> str:
    lines = [l for l in output.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run and its export (made once for the module)."""
    root = tmp_path_factory.mktemp("export")
    run_dir, out = root / "run", root / "exported"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTIMA_CACHE", str(root / "cache"))
        args = ["run", "tests/gin/tiny_ve.gin", "--run-dir", run_dir]
        for b in TINY_RUN:
            args += ["-b", b]
        code, output = _cli(*args)
        assert code == 0, output
        code, output = _cli("export", run_dir, "--out", out)
        assert code == 0, output
    return run_dir, out


def _run_student(run_dir):
    spec = parse_run_config(read_run(run_dir))
    task = spec.task()
    network = spec.network("student", task, torch.device("cpu"))
    load_network_weights(network, str(run_dir / "student.safetensors"))
    return network.eval(), task


def test_export_loads_in_plain_open_clip_and_gives_the_runs_outputs(finished_run, tmp_path):
    run_dir, out = finished_run
    record = json.loads((out / "export.json").read_text())
    name = record["model"]["model_name"]
    assert record["stage"] == "student" and (out / f"{name}.json").is_file()
    config = json.loads((out / f"{name}.json").read_text())
    assert config["custom_text"] is True  # what makes open_clip build a CoCa
    assert [config[c]["layers"] for c in ("vision_cfg", "text_cfg", "multimodal_cfg")] == [2, 2, 2]

    network, task = _run_student(run_dir)
    batch = next(iter(task.batches("test", 8, shuffle=False, seed=0)))
    save_file({"image": batch["image"].contiguous(), "text": batch["text"].contiguous()}, tmp_path / "in.safetensors")
    done = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, out, name, tmp_path / "in.safetensors",
                           tmp_path / "out.safetensors"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "CoCa"
    plain = load_file(tmp_path / "out.safetensors")
    assert plain["layers"].tolist() == [2, 2, 2]

    with torch.no_grad():
        expected = network.model.coca(batch["image"], batch["text"], output_labels=False)
        features = network.model(batch)  # what the head reads: the decoder's tokens before the vocabulary
        run_logits = network(batch)
    for key in ("image_features", "text_features", "logits"):
        torch.testing.assert_close(plain[key], expected[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain["local_logits"], expected["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features @ network.model.vocab_projection(), plain["logits"], rtol=1e-5, atol=1e-5)

    # the head over open_clip's model, through the documented loader, gives the run's task logits
    import open_clip
    from optima.plugins.models.coca import CoCaModel

    open_clip.add_model_config(str(out))
    coca = open_clip.create_model(name, pretrained=str(out / "open_clip_model.safetensors")).eval()
    model = CoCaModel(coca)
    head = load_head(str(out / "head.safetensors"), model)
    with torch.no_grad():
        torch.testing.assert_close(head(model(batch)), run_logits, rtol=1e-5, atol=1e-6)


def test_eval_of_the_export_reproduces_the_runs_test_metric_and_predictions(finished_run, tmp_path):
    run_dir, out = finished_run
    run_metrics = json.loads((run_dir / "metrics.json").read_text())
    code, output = _cli("eval", run_dir / "config.gin", "--checkpoint", out, "--out", tmp_path / "e")
    assert code == 0, output
    result = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert result["stage"] == "student" and result["split"] == "test"
    assert result["metrics"] == run_metrics["metrics"]["student"]

    # the predictions: one per test example, the same as the run wrote, and they give the metric
    records = predictions.read(str(tmp_path / "e" / "synthetic_ve_predictions.json"))
    assert records == predictions.read(str(run_dir / run_metrics["predictions"]["student"]))
    _, task = _run_student(run_dir)
    labels = task._split("test").label.tolist()
    assert sorted(r["index"] for r in records) == list(range(len(labels)))
    from optima.plugins.tasks.synthetic_ve import LABELS
    correct = sum(LABELS.index(r["label"]) == labels[r["index"]] for r in records)
    assert correct / len(labels) == pytest.approx(result["metrics"]["accuracy"])

    # the run's teacher (its cached weights, found through the run) and the student's own file, on val
    code, output = _cli("eval", run_dir / "config.gin", "--checkpoint", run_dir, "--stage", "teacher",
                        "--out", tmp_path / "t")
    assert code == 0, output
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["metrics"] == run_metrics["metrics"]["teacher"]
    code, output = _cli("eval", run_dir / "config.gin", "--checkpoint", run_dir / "student.safetensors",
                        "--split", "val", "--out", tmp_path / "v")
    assert code == 0, output
    val = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert val["stage"] == "student" and val["split"] == "val" and 0.0 <= val["metrics"]["accuracy"] <= 1.0


def test_model_card(finished_run):
    run_dir, out = finished_run
    card = (out / "MODEL_CARD.md").read_text()
    summary = json.loads((run_dir / "metrics.json").read_text())
    from optima.model_card import cpu_name

    assert cpu_name() in card and "torch thread(s)" in card
    for module in ("image", "text", "multimodal"):
        assert f"| `{module}` layers (count x width: params) | 4 x 64: " in card
    assert "FLOPs per example (one forward) |" in card and "CPU latency per example (batch 1): median (min) |" in card
    for net in ("teacher", "student"):
        assert f"{summary['metrics'][net]['accuracy']:.4f}" in card
    plays = summary["stages"]["student"]["plays"]
    for k, label in enumerate(summary["stages"]["student"]["arms"]):
        assert f"| {label} | {plays.count(k)} | {plays.count(k) / len(plays):.1%} |" in card
    assert "experiment.seed = 0" in card
    assert (run_dir / "operative_config.gin").read_text().strip() in card
    measured = json.loads((out / "export.json").read_text())["card"]["networks"]
    # a decoder layer is a self- and a cross-attention block (the latter with a norm of its keys and
    # values, 2 x 64 parameters): both are counted, as twice an image layer plus that norm, per layer
    modules = measured["student"]["modules"]
    assert modules["multimodal"]["params"] == 2 * modules["image"]["params"] + 2 * (2 * 64)
    assert measured["teacher"]["flops"] > measured["student"]["flops"] > 0


def test_bad_arguments_are_one_line(finished_run, tmp_path):
    run_dir, out = finished_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.gin").write_text((run_dir / "config.gin").read_text())
    code, output = _cli("export", unfinished, "--out", tmp_path / "x")
    assert code == 2 and "has not finished" in _one_line(output) and not (tmp_path / "x").exists()
    code, output = _cli("export", run_dir, "--stage", "tiny6", "--out", tmp_path / "x")
    assert code == 2 and "no stage 'tiny6'" in _one_line(output) and "teacher, student" in output
    code, output = _cli("export", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert code == 2 and "no such run directory" in _one_line(output)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, output = _cli("export", run_dir, "--out", busy)
    assert code == 2 and "not empty" in _one_line(output) and (busy / "keep.txt").read_text() == "mine"

    config = run_dir / "config.gin"
    code, output = _cli("eval", config, "--checkpoint", out, "--split", "train", "--out", tmp_path / "e")
    assert code == 2 and "--split 'train'" in _one_line(output)
    code, output = _cli("eval", config, "--checkpoint", tmp_path / "nope.safetensors", "--out", tmp_path / "e")
    assert code == 2 and "no such file or folder" in _one_line(output)
    code, output = _cli("eval", config, "--checkpoint", out, "--stage", "tiny6", "--out", tmp_path / "e")
    assert code == 2 and "tiny6" in _one_line(output)
    # the student's export is not a teacher (4/4/4 layers): refused, naming the file
    code, output = _cli("eval", config, "--checkpoint", out, "--stage", "teacher", "--out", tmp_path / "e")
    assert code == 2 and "does not fit" in _one_line(output)
    odd = tmp_path / "weights.safetensors"
    odd.write_bytes((run_dir / "student.safetensors").read_bytes())
    code, output = _cli("eval", config, "--checkpoint", odd, "--out", tmp_path / "e")
    assert code == 2 and "pass --stage" in _one_line(output)
    assert not (tmp_path / "e").exists()


FULL = "no space left on device (the disk is full)"


def _full_disk_at_the_weights(monkeypatch):
    """safetensors' own error, after half a file, at the export's open_clip weights."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if str(filename).endswith("open_clip_model.safetensors"):
            open(filename, "wb").write(b"half a file")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _full_disk_at_the_card(monkeypatch):
    """A plain OSError at the model card (after the weights and head are written)."""
    import errno

    from optima import checkpoint

    real = checkpoint.write_atomic

    def write_atomic(path, write):
        if str(path).endswith("MODEL_CARD.md"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(checkpoint, "write_atomic", write_atomic)


def _read_only_file_system(monkeypatch):
    """mkdir of --out fails with EROFS (tests run as root: permissions would not stop it)."""
    import errno
    import os

    real = os.makedirs

    def makedirs(path, *args, **kwargs):
        if "read-only" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)


@pytest.mark.parametrize("fault, out, why", [
    (_full_disk_at_the_weights, "new", FULL + "; nothing was left there"),
    (_full_disk_at_the_card, "empty", FULL + "; nothing was left there"),
    (_read_only_file_system, "read-only", "Read-only file system"),
], ids=["full-disk-weights", "full-disk-card", "read-only"])
def test_a_write_the_disk_refuses_is_one_line_and_leaves_nothing(finished_run, tmp_path, monkeypatch, fault, out,
                                                                 why):
    run_dir, _ = finished_run
    target = tmp_path / out / "export"
    if out == "empty":
        target.mkdir(parents=True)
    fault(monkeypatch)
    code, output = _cli("export", run_dir, "--out", target, *(["--no-card"] if out == "new" else []))
    lines = [l for l in output.splitlines() if l.strip()]
    assert "Traceback" not in output and [l for l in lines if "error" in l] == lines[-1:], output
    assert (code, lines[-1]) == (1, f"optima: error: could not write the export to {target}: {why}")
    assert list(target.iterdir()) == [] if out == "empty" else not target.exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_predictions_file_formats(tmp_path):
    rows = [{"identifier": "dev-1-0-0", "prediction": "True"}, {"identifier": "dev-1-0-1", "prediction": "False"}]
    predictions.write(rows, str(tmp_path / "p.csv"))
    assert (tmp_path / "p.csv").read_text() == "dev-1-0-0,True\ndev-1-0-1,False\n"
    predictions.write(rows, str(tmp_path / "p.json"))
    assert predictions.read(str(tmp_path / "p.json")) == rows
    with pytest.raises(Exception, match="unknown format"):
        predictions.write(rows, str(tmp_path / "p.txt"))
