"""VQA v2 (Goyal et al. 2017): answer classification over a fixed answer vocabulary
with soft scores, as CoCa fine-tunes it.

Files (the official release), `{split}` being e.g. "train2014":

- `<data_dir>/v2_OpenEnded_mscoco_{split}_questions.json`: `questions`, a list
  of {image_id, question, question_id};
- `<data_dir>/v2_mscoco_{split}_annotations.json`: `annotations`, a list of
  {question_id, answers: 10 x {answer, ...}, multiple_choice_answer, ...};
- images `<image_dir>/{split}/COCO_{split}_{image_id:012d}.jpg` (the
  `image_pattern` binding; `image_dir` defaults to `data_dir`).

Splits: train -> train2014; val and test -> val2014. The official test-dev /
test-std questions have no public answers (scores come from the evaluation
server), so "test" is val2014 here, like "val"; bind `vqa_task.val_split` /
`test_split` to another split name (with its files) to change that.

Answers are normalised as the official evaluation does (`normalize_answer`:
lowercase, punctuation, number words -> digits, articles, common contractions).
Answer vocabulary: the `num_answers` (3,129) most frequent normalised
`multiple_choice_answer`s of the train annotations (ties by answer text), or a
JSON list of `num_answers` answers given as `answer_vocab`. `num_outputs` is
`num_answers` without reading anything. Soft score of a candidate answer: the
official VQA accuracy, `min(1, #matching humans / 3)` averaged over the 10
leave-one-annotator-out subsets of 9 (`vqa_score`: 1, 2, 3, >=4 matching
humans of 10 give 0.3, 0.6, 0.9, 1.0; the leave-one-out average is what the
official evaluation script computes and what BUTD-style soft targets use).

Batch: `image` (B, 3, H, W), `text` (B, context_length) question tokens,
`target` (B, num_answers) float32 soft scores, `question_id` (B,) int64.
Loss: binary cross-entropy with logits on the soft scores, averaged over batch
and answers and multiplied by the number of answers (= summed over answers,
averaged over the batch; the convention of BUTD / ViLT / VLMo VQA code).
Metric: VQA accuracy of the argmax answer, i.e. its soft score. Answers outside
the vocabulary cannot be predicted, so they only lower the attainable score,
as in the official evaluation.
Predictions (`vqa_results.json`): the evaluation server's results format,
`[{"question_id", "answer"}]`.
"""
from __future__ import annotations

import collections
import os
import re
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from optima.errors import ConfigError
from optima.plugins.tasks.vl_data import Record, VLTask, field_of, read_json

# -- the official answer normalisation (VQA evaluation script, abridged) ---

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "hes": "he's", "im": "i'm", "ive": "i've", "isnt": "isn't", "itll": "it'll", "lets": "let's",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
    "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wheres": "where's", "wont": "won't",
    "wouldnt": "wouldn't", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # (sic) as in the official script
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    """The official VQA answer processing: punctuation, then digits/articles/contractions."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_score(matches: int, num_humans: int = 10) -> float:
    """Official VQA accuracy of an answer given by `matches` of `num_humans` annotators:
    the mean over the leave-one-out subsets of `min(1, matches among the rest / 3)`."""
    if num_humans <= 0 or matches <= 0:
        return 0.0
    if num_humans == 1:
        return min(1.0, matches / 3)
    held_out_matching = matches * min(1.0, (matches - 1) / 3)
    held_out_other = (num_humans - matches) * min(1.0, matches / 3)
    return (held_out_matching + held_out_other) / num_humans


def soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """Normalised answer -> official VQA accuracy, from one question's human answers."""
    counts = collections.Counter(normalize_answer(a) for a in answers)
    return {a: vqa_score(c, len(answers)) for a, c in counts.items()}


class Vqa(VLTask):
    """VQA v2: (COCO image, question) -> one of `num_answers` answers, soft-scored."""

    name = "vqa_task"
    dataset = "VQA v2"
    sources = ("VQA v2 (https://visualqa.org/download.html): v2_OpenEnded_mscoco_{train2014,val2014}"
               "_questions.json and v2_mscoco_{train2014,val2014}_annotations.json into data_dir; images: "
               "COCO 2014 (https://cocodataset.org/#download), train2014/ and val2014/ unpacked in image_dir "
               "(default data_dir) as {split}/COCO_{split}_{image_id:012d}.jpg")

    def __init__(self, *, data_dir: str, image_dir: str | None = None, image_size: int = 224,
                 context_length: int = 76, num_answers: int = 3129, answer_vocab: str | None = None,
                 train_split: str = "train2014", val_split: str = "val2014", test_split: str = "val2014",
                 question_file: str = "v2_OpenEnded_mscoco_{split}_questions.json",
                 annotation_file: str = "v2_mscoco_{split}_annotations.json",
                 image_pattern: str = "{split}/COCO_{split}_{image_id:012d}.jpg",
                 augment: bool = True, load_threads: int = 8, strict: bool = False):
        if num_answers < 1:
            raise ConfigError(f"vqa_task.num_answers must be >= 1, got {num_answers}")
        self.num_answers = int(num_answers)
        self.answer_vocab = answer_vocab
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.question_file, self.annotation_file, self.image_pattern = question_file, annotation_file, image_pattern
        try:
            image_pattern.format(split="x", image_id=1)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"vqa_task.image_pattern={image_pattern!r} is not a valid pattern over "
                              f"{{split}} and {{image_id}}: {e!r}") from None
        super().__init__(data_dir=data_dir, image_dir=image_dir, image_size=image_size,
                         context_length=context_length, augment=augment, load_threads=load_threads,
                         strict=strict)
        self._answers: tuple[str, ...] | None = None

    # -- files --------------------------------------------------------------

    def annotation_files(self, split: str) -> list[tuple[str, str]]:
        name = self.splits[split]
        files = [(os.path.join(self.data_dir, self.question_file.format(split=name)), f"{self.name}.data_dir"),
                 (os.path.join(self.data_dir, self.annotation_file.format(split=name)), f"{self.name}.data_dir")]
        if split == "train" and self.answer_vocab:
            files.append((self.answer_vocab, f"{self.name}.answer_vocab"))
        return files

    def image_folders(self) -> list[str]:
        folders = {os.path.dirname(os.path.join(self.image_dir, self.image_pattern.format(split=s, image_id=0)))
                   for s in self.splits.values()}
        return sorted(folders)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "num_answers": self.num_answers, "answer_vocab": self.answer_vocab,
                "splits": dict(self.splits), "question_file": self.question_file,
                "annotation_file": self.annotation_file, "image_pattern": self.image_pattern}

    # -- answers -------------------------------------------------------------

    @property
    def answers(self) -> tuple[str, ...]:
        """The answer vocabulary (index = class). Built from the train annotations
        on first use (or read from `answer_vocab`)."""
        if self._answers is None:
            if self.answer_vocab:
                self.require(self.answer_vocab, f"{self.name}.answer_vocab")
                vocab = read_json(self.answer_vocab, f"{self.name}.answer_vocab")
                if not isinstance(vocab, list) or not all(isinstance(a, str) for a in vocab):
                    raise ConfigError(f"vqa_task.answer_vocab: {self.answer_vocab} must be a JSON list of answers")
                answers = tuple(normalize_answer(a) for a in vocab)
                if len(set(answers)) != len(answers):
                    raise ConfigError(f"vqa_task.answer_vocab: {self.answer_vocab} has answers that are "
                                      f"equal after normalisation")
                if len(answers) != self.num_answers:
                    raise ConfigError(f"vqa_task.answer_vocab: {self.answer_vocab} has {len(answers)} answers but "
                                      f"vqa_task.num_answers = {self.num_answers}; set vqa_task.num_answers = "
                                      f"{len(answers)}")
                self._set_answers(answers)
            else:
                self.records("train")  # parsing train builds the vocabulary (one read of the big file)
        return self._answers

    def _set_answers(self, answers: Sequence[str]) -> None:
        self._answers = tuple(answers)

    @property
    def num_outputs(self) -> int:  # type: ignore[override]
        """`num_answers`, known without reading any file (a dry run builds the head
        with no data). A train set with fewer distinct answers (tiny test data)
        leaves the last classes unused: they never get a positive target."""
        return self.num_answers

    # -- parsing -------------------------------------------------------------

    def _annotations(self, split: str) -> dict[int, dict]:
        _, (path, binding) = self.annotation_files(split)[:2]
        self.require(path, binding)
        data = read_json(path, binding)
        anns = field_of(data, "annotations", path, "the file")
        return {int(field_of(a, "question_id", path, "an annotation")): a for a in anns}

    def _parse(self, split: str) -> list[Record]:
        (q_path, _), (a_path, _) = self.annotation_files(split)[:2]
        annotations = self._annotations(split)
        if self._answers is None and not self.answer_vocab and split == "train":
            self._set_answers(answer_vocabulary(annotations.values(), self.num_answers, a_path))  # read once
        index = {a: i for i, a in enumerate(self.answers)}  # from train, or read from answer_vocab
        questions = field_of(read_json(q_path, f"{self.name}.data_dir"), "questions", q_path, "the file")
        name = self.splits[split]
        records = []
        for q in questions:
            qid = int(field_of(q, "question_id", q_path, "a question"))
            ann = annotations.get(qid)
            if ann is None:
                raise ConfigError(f"{a_path} has no annotation for question_id {qid} of {q_path}")
            human = [str(field_of(a, "answer", a_path, f"an answer of question {qid}"))
                     for a in field_of(ann, "answers", a_path, f"question {qid}")]
            target = tuple(sorted((index[a], s) for a, s in soft_scores(human).items() if a in index and s > 0))
            image_id = int(field_of(q, "image_id", q_path, f"question {qid}"))
            path = os.path.join(self.image_dir, self.image_pattern.format(split=name, image_id=image_id))
            records.append(Record((path,), str(field_of(q, "question", q_path, f"question {qid}")), target,
                                  {"question_id": qid}))
        return records

    def _collate(self, records: Sequence[Record], images: torch.Tensor, split: str,
                 generator: torch.Generator) -> dict[str, Any]:
        target = torch.zeros(len(records), self.num_answers)
        for row, r in enumerate(records):
            for cls, score in r.target:
                target[row, cls] = score
        return {"image": images,
                "text": self.tokenizer([r.text for r in records]),
                "target": target,
                "question_id": torch.tensor([r.meta["question_id"] for r in records], dtype=torch.long)}

    # -- Task ----------------------------------------------------------------

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return soft_score_loss(logits, batch["target"])

    def metric(self, logits: torch.Tensor, batch) -> dict[str, float]:
        return soft_score_sums(logits, batch["target"])

    def summarize(self, totals: Mapping[str, float]) -> dict[str, float]:
        return summarize_soft_scores(totals)

    #: the evaluation server's results format: `[{"question_id": 1, "answer": "yes"}, ...]`
    predictions_file = "vqa_results.json"

    def predictions(self, logits: torch.Tensor, batch) -> list[dict]:
        """The argmax answer (the metric's); a class beyond the vocabulary (a train
        set with fewer distinct answers than `num_answers`) is the empty answer."""
        answers = self.answers
        return [{"question_id": int(q), "answer": answers[k] if k < len(answers) else ""}
                for q, k in zip(batch["question_id"].tolist(), logits.argmax(-1).tolist())]


def soft_score_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on soft scores `(B, num_answers)`, summed over answers, mean over the batch."""
    # mean over (batch, answers) x answers = sum over answers, mean over batch
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype)) * target.shape[1]


def soft_score_sums(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Sum of the soft score of each argmax answer (VQA accuracy), and the count."""
    score = target.gather(1, logits.argmax(-1, keepdim=True)).sum()
    return {"score": float(score.item()), "count": float(target.shape[0])}


def summarize_soft_scores(totals: Mapping[str, float]) -> dict[str, float]:
    count = float(totals.get("count", 0.0))
    return {"accuracy": float(totals["score"]) / count if count > 0 else float("nan")}


def answer_vocabulary(annotations, num_answers: int, path: str = "annotations") -> tuple[str, ...]:
    """The `num_answers` most frequent normalised `multiple_choice_answer`s (ties by text)."""
    counts = collections.Counter(
        normalize_answer(str(field_of(a, "multiple_choice_answer", path, "an annotation"))) for a in annotations)
    counts.pop("", None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(a for a, _ in ranked[:num_answers])


__all__ = ["Vqa", "normalize_answer", "vqa_score", "soft_scores", "answer_vocabulary", "soft_score_loss",
           "soft_score_sums", "summarize_soft_scores"]
