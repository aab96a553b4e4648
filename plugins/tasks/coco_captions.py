"""COCO captions on the Karpathy split: captioning with CoCa's captioning loss,
greedy decoding and CIDEr-D.

Files:

- `<data_dir>/dataset_coco.json` (Karpathy's split file): `images`, a list of
  {filepath ("train2014"/"val2014"), filename, split ("train", "restval",
  "val", "test"), sentences: [{raw, tokens, ...}], cocoid};
- images `<image_dir>/<filepath>/<filename>` (`image_dir` defaults to `data_dir`).

Splits: train -> Karpathy train + restval (113,287 images), val -> val (5,000),
test -> test (5,000).

Batch: `image` (B, 3, H, W); `text` (B, context_length - 1) = caption tokens
[:, :-1] (teacher forcing input, starting with start-of-text); `labels`
(B, context_length - 1) = tokens[:, 1:] (next tokens, ending with
end-of-text; 0 = padding, ignored); `image_id` (B,) the COCO id; `references`
a list of B lists of reference captions (lowercased, punctuation stripped).
The caption of each image is drawn anew for every `batches` seed (on train,
one per image per epoch), deterministically from that seed; the references are
all of the image's captions.

`num_outputs` is the tokenizer's vocabulary (49,408): use `caption_head`,
which projects the decoder features with the model's own vocabulary projection.
Loss: cross-entropy over the next tokens, padding ignored (CoCa's captioning
loss; as in open_clip, the pad id 0 is also the id of "!", which is therefore
never a target). `evaluate` decodes greedily and returns `{"cider": ...}`,
CIDEr-D from pycocoevalcap (coco-caption's implementation; 1.0 = 100 in
papers' tables) with the document frequencies of the evaluated split, so it is
only meaningful over a whole split, not one batch. Captions are tokenised by
lowercasing and stripping punctuation (`simple_tokenize`) instead of
coco-caption's PTBTokenizer, which needs Java. Predictions
(`captions_results.json`): COCO's results format, `[{"image_id", "caption"}]`,
the greedy captions as decoded.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from optima.errors import ConfigError
from optima.interfaces import Batch
from optima.plugins.tasks.vl_data import PAD_ID, Record, VLTask, field_of, read_json, simple_tokenize

#: Greedy decoding stops after this many tokens (end-of-text included) unless bound otherwise;
#: Karpathy-split captions are about 10 words, BPE rarely makes them longer than 25 tokens.
DEFAULT_MAX_CAPTION_LENGTH = 30
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


class CaptioningTask:
    """What every captioning task shares (mixed into a `Task` that sets `tokenizer`,
    with the interface of `vl_data.Tokenizer`, and `max_caption_length`): CoCa's
    captioning loss over the next tokens, padding ignored; KD over the caption's
    tokens (`logit_mask`); teacher-forced token accuracy as the batch metric; and
    `evaluate` by greedy decoding and CIDEr-D against each image's references
    (batch keys `image`, `text`, `labels`, `references`)."""

    tokenizer: Any
    max_caption_length: int

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        labels = batch["labels"]
        _check_token_logits(logits, labels)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=PAD_ID)

    def logit_mask(self, batch) -> torch.Tensor:
        """KD compares the caption's tokens, not its padding."""
        return batch["labels"] != PAD_ID

    def metric(self, logits: torch.Tensor, batch) -> dict[str, float]:
        """Teacher-forced next-token accuracy over non-padding positions."""
        labels = batch["labels"]
        _check_token_logits(logits, labels)
        keep = labels != PAD_ID
        correct = ((logits.argmax(-1) == labels) & keep).sum()
        return {"token_correct": float(correct.item()), "token_count": float(keep.sum().item())}

    def summarize(self, totals: Mapping[str, float]) -> dict[str, float]:
        out = {}
        if "token_count" in totals:
            c = float(totals["token_count"])
            out["token_accuracy"] = float(totals["token_correct"]) / c if c > 0 else float("nan")
        return out

    #: COCO's captioning results format: `[{"image_id": 1, "caption": "a dog."}, ...]`
    predictions_file = "captions_results.json"

    @torch.no_grad()
    def evaluate(self, network: nn.Module, batches: Iterable[Batch],
                 predictions: list[dict] | None = None) -> dict[str, float]:
        """Greedy decoding of every image, then CIDEr-D against all its references;
        the decoded captions go to `predictions` when given."""
        candidates, references = {}, {}
        for batch in batches:
            for seq, refs, image_id in zip(self.generate(network, batch["image"]), batch["references"],
                                           batch["image_id"].tolist()):
                key = len(candidates)
                caption = self.tokenizer.decode(seq)
                candidates[key] = [simple_tokenize(caption)]
                references[key] = list(refs)
                if predictions is not None:
                    predictions.append({"image_id": int(image_id), "caption": caption})
        return {"cider": cider(references, candidates)}

    @torch.no_grad()
    def generate(self, network: nn.Module, image: torch.Tensor, max_length: int | None = None) -> list[list[int]]:
        """Greedy decoding: token ids per image, without start/end-of-text.

        `network` maps {"image", "text"} to next-token logits `(B, t, vocab)`;
        each step feeds the whole prefix (no key/value cache: `network` is only
        known as batch -> logits), so a caption of n tokens costs n forwards.
        Finished captions are padded with 0 while the others go on.
        """
        max_length = self.max_caption_length if max_length is None else int(max_length)
        b = image.shape[0]
        tok = self.tokenizer
        text = torch.full((b, 1), tok.sot_token_id, dtype=torch.long, device=image.device)
        done = torch.zeros(b, dtype=torch.bool, device=image.device)
        for _ in range(max_length):
            logits = network({"image": image, "text": text})
            if logits.dim() != 3:
                raise ConfigError(f"greedy decoding needs next-token logits (B, L, vocab), got "
                                  f"{tuple(logits.shape)}; use experiment.head = @caption_head")
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            text = torch.cat([text, nxt[:, None]], dim=1)
            done |= nxt == tok.eot_token_id
            if bool(done.all()):
                break
        out = []
        for row in text[:, 1:].tolist():
            seq = []
            for t in row:
                if t in (tok.eot_token_id, PAD_ID):
                    break
                seq.append(t)
            out.append(seq)
        return out


class CocoCaptions(CaptioningTask, VLTask):
    """COCO captioning (Karpathy split): image -> caption."""

    name = "coco_captions_task"
    dataset = "the Karpathy COCO split (dataset_coco.json) and the COCO 2014 images"
    sources = ("Karpathy's COCO split: dataset_coco.json from "
               "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip into data_dir; "
               "images: COCO 2014 (https://cocodataset.org/#download), train2014/ and val2014/ unpacked in "
               "image_dir (default data_dir)")

    def __init__(self, *, data_dir: str, image_dir: str | None = None, image_size: int = 224,
                 context_length: int = 76, annotation_file: str = "dataset_coco.json",
                 max_caption_length: int | None = None, augment: bool = True, load_threads: int = 8,
                 strict: bool = False):
        if context_length < 3:
            raise ConfigError(f"coco_captions_task.context_length must be >= 3, got {context_length}")
        if max_caption_length is None:
            max_caption_length = min(DEFAULT_MAX_CAPTION_LENGTH, context_length - 1)
        if not 1 <= max_caption_length <= context_length - 1:
            # the decoder input at the last step is start-of-text + max_caption_length - 1 tokens,
            # at most as long as the training input (context_length - 1 tokens)
            raise ConfigError(f"coco_captions_task.max_caption_length must be in 1..context_length - 1 = "
                              f"{context_length - 1}, got {max_caption_length}")
        self.annotation_file = annotation_file
        self.max_caption_length = int(max_caption_length)
        super().__init__(data_dir=data_dir, image_dir=image_dir, image_size=image_size,
                         context_length=context_length, augment=augment, load_threads=load_threads,
                         strict=strict)
        self.num_outputs = self.tokenizer.vocab_size
        self._images: list[dict] | None = None

    # -- files ---------------------------------------------------------------

    def annotation_files(self, split: str) -> list[tuple[str, str]]:
        return [(os.path.join(self.data_dir, self.annotation_file), f"{self.name}.data_dir")]

    def image_folders(self) -> list[str]:
        return [os.path.join(self.image_dir, d) for d in ("train2014", "val2014")]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "annotation_file": self.annotation_file,
                "max_caption_length": self.max_caption_length}

    def _parse(self, split: str) -> list[Record]:
        (path, binding), = self.annotation_files(split)
        if self._images is None:  # one file for all splits: read it once
            self._images = field_of(read_json(path, binding), "images", path, "the file")
        records = []
        for n, im in enumerate(self._images):
            if field_of(im, "split", path, f"image {n}") not in KARPATHY_SPLITS[split]:
                continue
            where = f"image {n}"
            raw = tuple(str(field_of(s, "raw", path, f"a sentence of {where}")).strip()
                        for s in field_of(im, "sentences", path, where))
            if not raw:
                raise ConfigError(f"{path}: {where} has no sentences")
            file = os.path.join(self.image_dir, str(field_of(im, "filepath", path, where)),
                                str(field_of(im, "filename", path, where)))
            image_id = int(im.get("cocoid", im.get("imgid", n)))
            records.append(Record((file,), raw[0], raw, {"image_id": image_id,
                                                         "references": [simple_tokenize(r) for r in raw]}))
        if all(s in self._records or s == split for s in KARPATHY_SPLITS):
            self._images = None  # every split parsed: drop the raw json
        return records

    def _collate(self, records: Sequence[Record], images: torch.Tensor, split: str,
                 generator: torch.Generator) -> dict[str, Any]:
        # one caption per image, drawn from the batch's generator (seeded from the epoch's seed)
        picks = [r.target[int(torch.randint(len(r.target), (1,), generator=generator))] for r in records]
        tokens = self.tokenizer(picks)
        return {"image": images,
                "text": tokens[:, :-1], "labels": tokens[:, 1:],
                "image_id": torch.tensor([r.meta["image_id"] for r in records], dtype=torch.long),
                "references": [list(r.meta["references"]) for r in records]}


def cider(references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, Sequence[str]]) -> float:
    """Corpus CIDEr-D (pycocoevalcap) of one candidate per key against its references,
    all already tokenised (space separated). NaN for an empty corpus."""
    from pycocoevalcap.cider.cider import Cider

    if not candidates:
        return float("nan")
    if references.keys() != candidates.keys():
        raise ValueError("references and candidates must have the same keys")
    score, _ = Cider().compute_score({k: list(v) for k, v in references.items()},
                                     {k: list(v) for k, v in candidates.items()})
    return float(score)


def _check_token_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ConfigError(f"captioning needs next-token logits (B, L, vocab) matching labels "
                          f"{tuple(labels.shape)}, got {tuple(logits.shape)}; use experiment.head = @caption_head")
