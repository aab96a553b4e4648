"""Predictions in the official formats (`Task.predictions_file`), round trip:
evaluate on tiny files of each data set's format, write the task's predictions
file, read it back as the official tools would, score it against the data set's
own annotation file, and get the task's metric again."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from optima import predictions
from optima.engine import Network, evaluate
from optima.plugins.heads.vl_heads import pair_head
from optima.plugins.models.coca import coca_model
from optima.plugins.tasks.coco_captions import CocoCaptions, cider
from optima.plugins.tasks.nlvr2 import Nlvr2
from optima.plugins.tasks.snli_ve import SnliVe
from optima.plugins.tasks.vl_data import simple_tokenize
from optima.plugins.tasks.vqa import Vqa, normalize_answer, soft_scores

from conftest import TINY_COCA
from real_format_data import make_coco, make_nlvr2, make_snli_ve, make_vqa

SMALL = dict(image_size=32, context_length=12, augment=False, load_threads=0)
CPU = torch.device("cpu")


class Scripted(nn.Module):
    """A network whose logits are written by a function of the batch."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, batch):
        return self.fn(batch)


def _right_then_wrong(label: torch.Tensor, classes: int) -> torch.Tensor:
    """Logits right on even rows, wrong (the next class) on odd ones."""
    rows = torch.arange(label.shape[0])
    pick = torch.where(rows % 2 == 0, label, (label + 1) % classes)
    return torch.nn.functional.one_hot(pick, classes).float()


def _evaluate(network, task, split, tmp_path, batch_size=2):
    records = []
    metrics = evaluate(network, task, split, batch_size, CPU, predictions=records)
    path = predictions.write(records, str(tmp_path / task.predictions_file))
    return metrics, path


def test_vqa_results_file_scores_as_the_official_evaluation(tmp_path):
    root = make_vqa(tmp_path / "vqa")
    task = Vqa(data_dir=str(root), num_answers=6, **SMALL)  # 3 answers in the train vocabulary, 3 unused classes

    def logits(batch):  # even rows: the best-scored answer; odd rows: an unused class (the empty answer)
        best = batch["target"].argmax(-1)
        pick = torch.where(torch.arange(len(best)) % 2 == 0, best, torch.full_like(best, 5))
        return torch.nn.functional.one_hot(pick, 6).float()

    for split in ("train", "val"):
        metrics, path = _evaluate(Scripted(logits), task, split, tmp_path)
        assert task.predictions_file == "vqa_results.json" and path.endswith("vqa_results.json")
        results = json.loads(open(path).read())
        # the server's format: a list of {question_id, answer}, one per question
        assert all(set(r) == {"question_id", "answer"} and isinstance(r["question_id"], int)
                   and isinstance(r["answer"], str) for r in results)
        name = {"train": "train2014", "val": "val2014"}[split]
        questions = json.loads((root / f"v2_OpenEnded_mscoco_{name}_questions.json").read_text())["questions"]
        assert sorted(r["question_id"] for r in results) == sorted(q["question_id"] for q in questions)
        # scored as the official evaluation does, from the official annotation file
        annotations = {a["question_id"]: a for a in
                       json.loads((root / f"v2_mscoco_{name}_annotations.json").read_text())["annotations"]}
        scores = [soft_scores([h["answer"] for h in annotations[r["question_id"]]["answers"]])
                  .get(normalize_answer(r["answer"]), 0.0) for r in results]
        assert sum(scores) / len(scores) == pytest.approx(metrics["accuracy"])
    assert {r["answer"] for r in results} <= set(task.answers) | {""}
    assert metrics["accuracy"] > 0  # the right answers count: question 70's "yes" is in the vocabulary


def test_coco_captions_results_file_gives_the_cider(tmp_path):
    root = make_coco(tmp_path / "coco")
    task = CocoCaptions(data_dir=str(root), **SMALL)
    tok = task.tokenizer
    captions = {5: "a grey square", 6: "a black box."}

    def oracle(batch):  # says its caption for the image whose id the image's pixels hold
        text = batch["text"]
        out = torch.zeros(text.shape[0], text.shape[1], tok.vocab_size)
        for row, key in enumerate(batch["image"].flatten(1)[:, 0].tolist()):
            out[row, -1, tok([captions[int(key)]])[0][text.shape[1]]] = 1.0
        return out

    class Tagged(CocoCaptions):  # each image's pixels hold its COCO id (once unpacked: uint8 cannot)
        def unpack(self, batch):
            batch = super().unpack(batch)
            batch["image"] = batch["image_id"].float()[:, None, None, None].expand_as(batch["image"]).clone()
            return batch

    task = Tagged(data_dir=str(root), **SMALL)
    metrics, path = _evaluate(Scripted(oracle), task, "test", tmp_path)
    assert path.endswith("captions_results.json")
    results = json.loads(open(path).read())
    assert sorted(results, key=lambda r: r["image_id"]) == [{"image_id": 5, "caption": "a grey square"},
                                                            {"image_id": 6, "caption": "a black box ."}]
    # CIDEr-D of the results file against the Karpathy file's references is the task's metric
    karpathy = json.loads((root / "dataset_coco.json").read_text())["images"]
    refs = {im["cocoid"]: [simple_tokenize(s["raw"]) for s in im["sentences"]] for im in karpathy}
    score = cider({r["image_id"]: refs[r["image_id"]] for r in results},
                  {r["image_id"]: [simple_tokenize(r["caption"])] for r in results})
    assert score == pytest.approx(metrics["cider"]) and score > 1.0


def test_snli_ve_predictions_by_pair_id(tmp_path):
    root = make_snli_ve(tmp_path / "snli")
    task = SnliVe(data_dir=str(root), **SMALL)
    metrics, path = _evaluate(Scripted(lambda b: _right_then_wrong(b["label"], 3)), task, "train", tmp_path)
    results = predictions.read(path)
    rows = [json.loads(l) for l in (root / "snli_ve_train.jsonl").read_text().splitlines()]
    gold = {r["pairID"]: r["gold_label"] for r in rows if r["gold_label"] != "-"}
    assert [r["pairID"] for r in results] == list(gold)  # the consensus rows, in file order
    correct = sum(r["label"] == gold[r["pairID"]] for r in results)
    assert correct / len(results) == pytest.approx(metrics["accuracy"]) == 0.5


@pytest.mark.parametrize("real_network", [False, True])
def test_nlvr2_predictions_file_is_the_official_scripts_input(tmp_path, real_network):
    root = make_nlvr2(tmp_path / "nlvr2")
    task = Nlvr2(data_dir=str(root), **SMALL)
    if real_network:  # the whole path: image pairs through CoCa and the pair head
        torch.manual_seed(0)
        model = coca_model(TINY_COCA, layers=(1, 1, 1))
        network = Network(model, pair_head(model, task))
    else:
        network = Scripted(lambda b: _right_then_wrong(b["label"], 2))
    metrics, path = _evaluate(network, task, "train", tmp_path)
    assert path.endswith(".csv")
    # read as nlvr2/eval/metrics.py does: "identifier,prediction" per line, labels compared lowercased
    predicted = dict(line.strip().split(",") for line in open(path) if line)
    examples = [json.loads(l) for l in (root / "train.json").read_text().splitlines() if l]
    assert set(predicted) == {e["identifier"] for e in examples}
    assert set(predicted.values()) <= {"True", "False"}
    correct = sum(predicted[e["identifier"]].lower() == e["label"].lower() for e in examples)
    assert correct / len(examples) == pytest.approx(metrics["accuracy"])
    if not real_network:
        assert metrics["accuracy"] == pytest.approx(2 / 3)


def test_synthetic_predictions_by_index(tmp_path):
    from optima.plugins.tasks.synthetic_ve import LABELS, SyntheticVisualEntailment

    task = SyntheticVisualEntailment(train_size=0, val_size=0, test_size=10)
    metrics, path = _evaluate(Scripted(lambda b: _right_then_wrong(b["label"], 3)), task, "test", tmp_path, 4)
    results = predictions.read(path)
    labels = task._split("test").label.tolist()
    assert [r["index"] for r in results] == list(range(10))
    assert sum(LABELS.index(r["label"]) == labels[r["index"]] for r in results) / 10 == metrics["accuracy"]


def test_a_task_without_a_predictions_file_evaluates_as_before():
    from optima.interfaces import Task

    class Plain(Task):
        num_outputs = 2

        def batches(self, split, batch_size, *, shuffle, seed):
            yield {"x": torch.tensor([0, 1]), "label": torch.tensor([0, 1])}

        def loss(self, logits, batch):
            return logits.sum()

        def metric(self, logits, batch):
            return {"correct": float((logits.argmax(-1) == batch["label"]).sum()), "count": 2.0}

        def summarize(self, totals):
            return {"accuracy": totals["correct"] / totals["count"]}

        def evaluate(self, network, batches):  # an override from before predictions existed
            return super().evaluate(network, batches)

    records = []
    metrics = evaluate(Scripted(lambda b: torch.eye(2)), Plain(), "test", 2, CPU, predictions=records)
    assert metrics == {"accuracy": 1.0} and records == []


def test_the_synthetic_world_tasks_write_their_real_counterparts_formats(tmp_path):
    """world_ve/vqa/nlvr2_task (the synthetic protocol) write SNLI-VE's, VQA v2's and
    NLVR2's predictions files, one record per test example, as their metric scored them."""
    import re

    from optima.plugins.tasks.snli_ve import LABELS
    from optima.plugins.tasks.synthetic_world.tasks import ANSWERS, WorldEntailment, WorldNlvr2, WorldVqa

    sizes = dict(train_size=0, val_size=0, test_size=10)
    ve, vqa, nlvr2 = WorldEntailment(**sizes), WorldVqa(**sizes), WorldNlvr2(**sizes)
    assert (ve.predictions_file, vqa.predictions_file, nlvr2.predictions_file) == (
        "snli_ve_predictions.json", "vqa_results.json", "nlvr2_predictions.csv")

    metrics, path = _evaluate(Scripted(lambda b: _right_then_wrong(b["label"], 3)), ve, "test", tmp_path, 4)
    results = predictions.read(path)
    assert [set(r) for r in results] == [{"pairID", "label"}] * 10
    labels = ve._split("test").target.tolist()
    assert sorted(int(r["pairID"]) for r in results) == list(range(10))
    assert sum(r["label"] == LABELS[labels[int(r["pairID"])]] for r in results) / 10 == metrics["accuracy"]

    metrics, path = _evaluate(Scripted(lambda b: b["target"]), vqa, "test", tmp_path, 4)  # the best-scored answer
    results = predictions.read(path)
    assert [set(r) for r in results] == [{"question_id", "answer"}] * 10
    target = vqa._split("test").target
    assert sorted(r["question_id"] for r in results) == list(range(10))
    score = sum(float(target[r["question_id"], ANSWERS.index(r["answer"])]) for r in results) / 10
    assert score == pytest.approx(metrics["accuracy"])

    metrics, path = _evaluate(Scripted(lambda b: _right_then_wrong(b["label"], 2)), nlvr2, "test", tmp_path, 4)
    lines = (tmp_path / "nlvr2_predictions.csv").read_text().splitlines()
    assert len(lines) == 10 and all(re.fullmatch(r"\d+,(True|False)", line) for line in lines)
    truth = nlvr2._split("test").target.tolist()
    right = sum((p == "True") == bool(truth[int(i)]) for i, p in (line.split(",") for line in lines))
    assert right / 10 == metrics["accuracy"]
