"""SNLI-VE (visual entailment; Xie et al. 2019): a Flickr30k image as premise, a
sentence as hypothesis, 3 classes.

Files (the official release):

- `<data_dir>/snli_ve_train.jsonl`, `snli_ve_dev.jsonl`, `snli_ve_test.jsonl`:
  one JSON object per line; read are `Flikr30kID` (sic: the official key, e.g.
  "2248275918.jpg"), `sentence2` (the hypothesis) and `gold_label`
  ("entailment", "neutral" or "contradiction"; "-", no annotator consensus, is
  skipped as in SNLI, the official SNLI-VE files hold none);
- images `<image_dir>/<Flikr30kID>` (the Flickr30k jpgs; ".jpg" is appended to
  an ID without extension). `image_dir` defaults to `<data_dir>/flickr30k_images`.

Splits: train -> train file, val -> dev file, test -> test file.
Batch: `image` (B, 3, H, W) float32, `text` (B, context_length) int64,
`label` (B,) int64 in LABELS order, `pair_id` a list of B `pairID`s (the line
number when a row has none). Loss: cross-entropy. Metric: accuracy.
Predictions (`snli_ve_predictions.json`): `[{"pairID", "label"}]`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from optima.errors import ConfigError
from optima.plugins.tasks.vl_data import Record, VLTask, field_of, read_jsonl

LABELS = ("entailment", "neutral", "contradiction")
NO_CONSENSUS = "-"


class SnliVe(VLTask):
    """SNLI-VE: (Flickr30k image, hypothesis) -> entailment / neutral / contradiction."""

    name = "snli_ve_task"
    dataset = "SNLI-VE"
    sources = ("SNLI-VE annotations: snli_ve_{train,dev,test}.jsonl, made by the scripts of "
               "https://github.com/necla-ml/SNLI-VE from SNLI 1.0 and Flickr30k, into data_dir; images: "
               "Flickr30k (https://shannon.cs.illinois.edu/DenotationGraph/, on request), the jpgs as "
               "<image_dir>/<Flickr30k id>.jpg (image_dir default: data_dir/flickr30k_images)")
    num_outputs = len(LABELS)

    def __init__(self, *, data_dir: str, image_dir: str | None = None, image_size: int = 224,
                 context_length: int = 76, train_file: str = "snli_ve_train.jsonl",
                 val_file: str = "snli_ve_dev.jsonl", test_file: str = "snli_ve_test.jsonl",
                 augment: bool = True, load_threads: int = 8, strict: bool = False):
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        super().__init__(data_dir=data_dir, image_dir=image_dir, image_size=image_size,
                         context_length=context_length, augment=augment, load_threads=load_threads,
                         strict=strict)

    def default_image_dir(self) -> str:
        return os.path.join(self.data_dir, "flickr30k_images")

    def annotation_files(self, split: str) -> list[tuple[str, str]]:
        return [(os.path.join(self.data_dir, self.files[split]), f"{self.name}.data_dir")]

    def image_folders(self) -> list[str]:
        return [self.image_dir]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "files": dict(self.files)}

    def _parse(self, split: str) -> list[Record]:
        (path, binding), = self.annotation_files(split)
        records = []
        for i, row in enumerate(read_jsonl(path, binding), 1):
            where = f"line {i}"
            gold = field_of(row, "gold_label", path, where)
            if gold == NO_CONSENSUS:
                continue
            if gold not in LABELS:
                raise ConfigError(f"{path}: {where} has gold_label {gold!r}; expected one of {', '.join(LABELS)}")
            image = str(field_of(row, "Flikr30kID", path, where))
            if not os.path.splitext(image)[1]:
                image += ".jpg"
            records.append(Record((os.path.join(self.image_dir, image),),
                                  str(field_of(row, "sentence2", path, where)), LABELS.index(gold),
                                  {"pair_id": str(row.get("pairID", f"{split}-{i}"))}))
        return records

    def _collate(self, records: Sequence[Record], images: torch.Tensor, split: str,
                 generator: torch.Generator) -> dict[str, Any]:
        return {"image": images,
                "text": self.tokenizer([r.text for r in records]),
                "label": torch.tensor([r.target for r in records], dtype=torch.long),
                "pair_id": [r.meta["pair_id"] for r in records]}

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return F.cross_entropy(logits, batch["label"])

    def metric(self, logits: torch.Tensor, batch) -> dict[str, float]:
        return accuracy_sums(logits, batch["label"])

    def summarize(self, totals: Mapping[str, float]) -> dict[str, float]:
        return summarize_accuracy(totals)

    #: `[{"pairID": "...", "label": "entailment"}, ...]`: SNLI-VE has no results
    #: server; the official files' `pairID` identifies each example
    predictions_file = "snli_ve_predictions.json"

    def predictions(self, logits: torch.Tensor, batch) -> list[dict]:
        return [{"pairID": pid, "label": LABELS[k]} for pid, k in zip(batch["pair_id"], logits.argmax(-1).tolist())]


def accuracy_sums(logits: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    return {"correct": float((logits.argmax(-1) == label).sum().item()), "count": float(label.numel())}


def summarize_accuracy(totals: Mapping[str, float]) -> dict[str, float]:
    count = float(totals.get("count", 0.0))
    return {"accuracy": float(totals["correct"]) / count if count > 0 else float("nan")}
