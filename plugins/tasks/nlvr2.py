"""NLVR2 (Suhr et al. 2019): is a sentence true of a pair of images? 2 classes.

Files (the official release):

- `<data_dir>/train.json`, `dev.json`, `test1.json`: JSON lines (one object
  per line, despite the extension); read are `identifier` (e.g.
  "dev-850-0-0": split, set, pair and sentence numbers), `sentence`, `label`
  ("True" / "False") and, on train, `directory` (the image sub-folder, 0-99);
- images: `<image_dir>/` + the `image_pattern` binding, default
  `"{split}/{directory}/{stem}-img{i}.png"`, where `split` is the file's stem
  (train, dev, test1), `directory` the record's `directory` field ("" when
  absent: the dev and test1 images are not in sub-folders; the empty segment
  collapses), `stem` the identifier without its last part ("dev-850-0") and
  `i` 0 or 1; `identifier` is also available. This is the layout of the
  official image archives (`images/train/<d>/...`, `dev/...`, `test1/...`)
  gathered under one folder; `image_dir` defaults to `<data_dir>/images`.

Splits: train -> train.json, val -> dev.json, test -> test1.json.
Batch: `image` (B, 2, 3, H, W): both images of each example (the engine runs
them as 2B (image, text) pairs), `text` (B, context_length), `label` (B,) int64
(1 = True), `identifier` a list of B identifiers. Use `pair_head`, which
concatenates the two pooled outputs.
Loss: cross-entropy. Metric: accuracy over examples (image pairs).
Predictions (`nlvr2_predictions.csv`): the official evaluation script's input,
one line `identifier,True|False` per example.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from optima.errors import ConfigError
from optima.plugins.tasks.snli_ve import accuracy_sums, summarize_accuracy
from optima.plugins.tasks.vl_data import Record, VLTask, field_of, read_jsonl

IMAGES_PER_EXAMPLE = 2
_LABELS = {"true": 1, "false": 0}


class Nlvr2(VLTask):
    """NLVR2: (left image, right image, sentence) -> False / True."""

    name = "nlvr2_task"
    dataset = "NLVR2"
    sources = ("NLVR2 annotations: nlvr2/data/{train,dev,test1}.json of https://github.com/lil-lab/nlvr "
               "into data_dir; images: the NLVR2 image release (https://lil.nlp.cornell.edu/nlvr/, on "
               "request), as <image_dir>/{train/<directory>,dev,test1}/<identifier without its last "
               "part>-img{0,1}.png (image_dir default: data_dir/images)")
    num_outputs = 2

    def __init__(self, *, data_dir: str, image_dir: str | None = None, image_size: int = 224,
                 context_length: int = 76, train_file: str = "train.json", val_file: str = "dev.json",
                 test_file: str = "test1.json", image_pattern: str = "{split}/{directory}/{stem}-img{i}.png",
                 augment: bool = True, load_threads: int = 8, strict: bool = False):
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.image_pattern = image_pattern
        try:
            image_pattern.format(split="s", directory="d", stem="s-1-0", identifier="s-1-0-0", i=0)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"nlvr2_task.image_pattern={image_pattern!r} may only use {{split}}, {{directory}}, "
                              f"{{stem}}, {{identifier}} and {{i}}: {e!r}") from None
        super().__init__(data_dir=data_dir, image_dir=image_dir, image_size=image_size,
                         context_length=context_length, augment=augment, load_threads=load_threads,
                         strict=strict)

    def default_image_dir(self) -> str:
        return os.path.join(self.data_dir, "images")

    def annotation_files(self, split: str) -> list[tuple[str, str]]:
        return [(os.path.join(self.data_dir, self.files[split]), f"{self.name}.data_dir")]

    def image_folders(self) -> list[str]:
        # the folder of each split's images, up to the first per-record field
        out = []
        for file in self.files.values():
            head = self.image_pattern.split("{directory}")[0].split("{stem}")[0].split("{identifier}")[0]
            out.append(os.path.normpath(os.path.join(self.image_dir, head.format(split=_stem(file)))))
        return out

    def config(self) -> dict[str, Any]:
        return {**super().config(), "files": dict(self.files), "image_pattern": self.image_pattern}

    def image_paths(self, identifier: str, split_name: str, directory: str = "") -> tuple[str, str]:
        """The two image files of an example (`split_name`: the file stem, e.g. "dev")."""
        stem = identifier.rsplit("-", 1)[0]
        return tuple(os.path.normpath(os.path.join(self.image_dir, self.image_pattern.format(
            split=split_name, directory=directory, stem=stem, identifier=identifier, i=i)))
            for i in range(IMAGES_PER_EXAMPLE))

    def _parse(self, split: str) -> list[Record]:
        (path, binding), = self.annotation_files(split)
        split_name = _stem(self.files[split])
        records = []
        for n, row in enumerate(read_jsonl(path, binding), 1):
            where = f"line {n}"
            identifier = str(field_of(row, "identifier", path, where))
            raw = str(field_of(row, "label", path, where)).strip().lower()
            if raw not in _LABELS:
                raise ConfigError(f"{path}: {where} has label {row['label']!r}; expected \"True\" or \"False\"")
            directory = str(row.get("directory", "") or "")
            records.append(Record(self.image_paths(identifier, split_name, directory),
                                  str(field_of(row, "sentence", path, where)), _LABELS[raw],
                                  {"identifier": identifier}))
        return records

    def _collate(self, records: Sequence[Record], images: torch.Tensor, split: str,
                 generator: torch.Generator) -> dict[str, Any]:
        return {"image": images.view(len(records), IMAGES_PER_EXAMPLE, *images.shape[1:]),
                "text": self.tokenizer([r.text for r in records]),
                "label": torch.tensor([r.target for r in records], dtype=torch.long),
                "identifier": [r.meta["identifier"] for r in records]}

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return pair_loss(logits, batch)

    def metric(self, logits: torch.Tensor, batch) -> dict[str, float]:
        return pair_accuracy_sums(logits, batch)

    def summarize(self, totals: Mapping[str, float]) -> dict[str, float]:
        return summarize_accuracy(totals)

    #: the official evaluation script's input (nlvr2/eval/metrics.py): CSV lines `identifier,True|False`
    predictions_file = "nlvr2_predictions.csv"

    def predictions(self, logits: torch.Tensor, batch) -> list[dict]:
        _check_pairs(logits, batch)
        return [{"identifier": i, "prediction": "True" if k == 1 else "False"}
                for i, k in zip(batch["identifier"], logits.argmax(-1).tolist())]


def pair_loss(logits: torch.Tensor, batch) -> torch.Tensor:
    """Cross-entropy of one prediction per image pair."""
    _check_pairs(logits, batch)
    return F.cross_entropy(logits, batch["label"])


def pair_accuracy_sums(logits: torch.Tensor, batch) -> dict[str, float]:
    _check_pairs(logits, batch)
    return accuracy_sums(logits, batch["label"])


def _stem(file: str) -> str:
    return os.path.splitext(os.path.basename(file))[0]


def _check_pairs(logits: torch.Tensor, batch) -> None:
    if logits.shape[0] != batch["label"].shape[0]:
        raise ConfigError(f"nlvr2 needs one prediction per image pair, got {logits.shape[0]} rows for "
                          f"{batch['label'].shape[0]} examples; use experiment.head = @pair_head")
