"""Four tasks on the synthetic world, with the batch formats, losses and metrics
of the real ones (whose code they call):

| task (gin) | like | batch | metric |
|---|---|---|---|
| `world_ve_task` | SNLI-VE | `image`, `text` (hypothesis), `label` (entailment / neutral / contradiction) | accuracy |
| `world_vqa_task` | VQA v2 | `image`, `text` (question), `target` (soft scores of 10 simulated annotators), `question_id` | VQA accuracy |
| `world_nlvr2_task` | NLVR2 | `image` (B, 2, 3, H, W), `text` (statement), `label` (false / true) | accuracy |
| `world_captions_task` | COCO captions | `image`, `text` / `labels` (a reference, shifted), `image_id`, `references` (5) | CIDEr-D |

Every text is generated from the scene record, so labels, answers and captions
are true of the image by construction (tests check them against the record).
A split is generated on first use and kept in memory (also across task objects
of one process: `_CACHE`), images as uint8; batches are normalised as they are
made.

Texts by task:

- VE: entailment = a true statement about an object's presence (with its size),
  a relation between two objects (left of / right of / above / below) or the
  count of a colour; contradiction = the same templates made false (an absent
  object or the wrong size, the reversed relation, a wrong count) or an
  unobservable attribute of an absent object (closed world); neutral = an
  unobservable attribute (heavy, wooden, ...) of a present object. The text
  alone gives at most about 2/3.
- VQA: what colour is the <shape> / what shape is the <colour> object (when it
  is unique), how many <colour> objects / <shape>s, is the <A> <relation> the
  <B>, is there a <A>, what size is the <A>. Each of 10 annotators answers
  right with probability `annotator_accuracy`, otherwise a wrong answer of the
  same kind; soft scores are the official VQA accuracy of each answer
  (`vqa.vqa_score`).
- NLVR2: both images / exactly one image contain a <A>; the left image has
  more / fewer <colour> objects than the right; there are <k> <shape>s in
  total; in the left / right image the <A> is <relation> the <B>. Labels are
  balanced by drawing statements until one has the wanted truth value.
- Captions: 5 references per image, each a relation between two objects
  ("a small red circle left of a large blue square"), a list of up to three
  objects, or the object count with one object.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from optima.interfaces import Batch, Task
from optima.plugins.tasks.coco_captions import CaptioningTask
from optima.plugins.tasks.nlvr2 import pair_accuracy_sums, pair_loss
from optima.plugins.tasks.snli_ve import LABELS as VE_LABELS
from optima.plugins.tasks.snli_ve import accuracy_sums, summarize_accuracy
from optima.plugins.tasks.synthetic_world.world import (
    ATTRIBUTES, BLOCK, COLOURS, NUMBERS, RELATIONS, REVERSE, SHAPES, SIZES, Scenes, World, WorldTokenizer,
    block_rng, holds, object_name, stream_key, to_pixels, true_relations)
from optima.plugins.tasks.vqa import soft_score_loss, soft_score_sums, summarize_soft_scores, vqa_score

SPLITS = ("train", "val", "test")
ENTAILMENT, NEUTRAL, CONTRADICTION = (VE_LABELS.index(n) for n in ("entailment", "neutral", "contradiction"))
#: VQA answers (class index = position): every answer the questions can have.
ANSWERS = COLOURS + SHAPES + SIZES + ("yes", "no") + tuple(str(i) for i in range(10))
_DRAWS = 32  # uniforms drawn per example for its text choices


class _Draws:
    """An example's pre-drawn uniforms, used in order (text choices are made in a
    Python loop; drawing them vectorised up front keeps generation fast)."""

    def __init__(self, row: np.ndarray):
        self.row, self.i = row, 0

    def uniform(self) -> float:
        v = self.row[self.i]  # an IndexError here means _DRAWS is too small
        self.i += 1
        return float(v)

    def index(self, n: int) -> int:
        return min(int(self.uniform() * n), n - 1)

    def choice(self, seq: Sequence):
        return seq[self.index(len(seq))]

    def below(self, p: float) -> bool:
        return self.uniform() < p

    def pair(self, n: int) -> tuple[int, int]:
        """Two distinct indices below n."""
        a = self.index(n)
        return a, (a + 1 + self.index(n - 1)) % n

    def permutation(self, n: int) -> list[int]:
        keys = [self.uniform() for _ in range(n)]
        return sorted(range(n), key=keys.__getitem__)


@dataclass
class _Split:
    """One generated split: uint8 images, token ids, the texts and targets, the scenes."""

    images: np.ndarray      # (N, 3, H, W) or (N, 2, 3, H, W) uint8
    text: torch.Tensor      # (N, L) int64
    texts: list            # the strings (captions: a list of references per image)
    target: torch.Tensor    # labels (N,) or soft scores (N, answers); captions: image ids
    scenes: tuple           # one `Scenes` per image of an example
    extra: dict = field(default_factory=dict)


#: Generated splits of this process, by (task, fingerprint, split), oldest first.
_CACHE: "collections.OrderedDict[str, _Split]" = collections.OrderedDict()
_CACHE_SPLITS = 12  # a sweep process keeps every split of its task; bounded so memory is too


class WorldTask(Task):
    """A task on the synthetic world (see the module doc): world bindings,
    split sizes, a seed, cached generation and shuffled batches."""

    name = "world_task"
    stream = "world"
    images_per_example = 1

    def __init__(self, *, image_size: int = 32, grid: int = 3, min_objects: int = 2, max_objects: int = 4,
                 distractors: int = 1, noise: float = 0.1, context_length: int = 16, train_size: int = 10_000,
                 val_size: int = 500, test_size: int = 2_000, seed: int = 0):
        self.world = World(image_size=image_size, grid=grid, min_objects=min_objects, max_objects=max_objects,
                           distractors=distractors, noise=noise)
        for split, n in (("train", train_size), ("val", val_size), ("test", test_size)):
            if n < 0:
                raise ValueError(f"{self.name}.{split}_size must be >= 0, got {n}")
        if seed < 0:
            raise ValueError(f"{self.name}.seed must be >= 0, got {seed}")
        self.tokenizer = WorldTokenizer(context_length)
        self.context_length = int(context_length)
        self.sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}
        self.seed = int(seed)

    # -- generation ----------------------------------------------------------

    def _generate_block(self, rng: np.random.Generator, m: int) -> dict[str, Any]:
        """`m` examples: {"scenes": tuple of Scenes, "texts": list, "target": array, "extra": {...}}."""
        raise NotImplementedError

    def _split(self, split: str) -> _Split:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        key = json.dumps([self.name, self.fingerprint(), split], sort_keys=True)
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        data = self._generate(split)
        _CACHE[key] = data
        while len(_CACHE) > _CACHE_SPLITS:
            _CACHE.popitem(last=False)
        return data

    def _generate(self, split: str) -> _Split:
        n = self.sizes[split]
        key = stream_key(self.seed, self.stream, split)
        blocks = []
        # whole blocks, cut to n at the end, so that example i does not depend on n
        # (one empty block when n = 0: the arrays keep their shapes)
        for b in range(-(-n // BLOCK) or 1):
            rng = block_rng(key, b)
            out = self._generate_block(rng, BLOCK if n else 0)
            out["images"] = np.stack([self.world.render(rng, s) for s in out["scenes"]], axis=1)
            blocks.append(out)
        images = np.concatenate([b["images"] for b in blocks])[:n]
        if self.images_per_example == 1:
            images = images[:, 0]
        texts = [t for b in blocks for t in b["texts"]][:n]
        scenes = tuple(Scenes.concat([b["scenes"][j] for b in blocks]).take(np.arange(n))
                       for j in range(self.images_per_example))
        extra = {k: np.concatenate([b["extra"][k] for b in blocks])[:n] for k in blocks[0].get("extra", {})}
        target = torch.from_numpy(np.concatenate([b["target"] for b in blocks])[:n])
        return _Split(images, self._tokenize(texts), texts, target, scenes, extra)

    def _tokenize(self, texts: list) -> torch.Tensor:
        cache: dict[str, torch.Tensor] = {}
        rows = []
        for t in texts:
            if t not in cache:
                cache[t] = self.tokenizer([t])[0]
            rows.append(cache[t])
        return torch.stack(rows) if rows else torch.zeros(0, self.context_length, dtype=torch.long)

    # -- Task ----------------------------------------------------------------

    def batches(self, split: str, batch_size: int, *, shuffle: bool, seed: int) -> Iterator[Batch]:
        data = self._split(split)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(data.texts)
        g = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        n_batches = -(-n // batch_size)
        # one seed per batch drawn up front (as `VLTask`): batch k is the same however it is reached
        batch_seeds = torch.randint(0, 2 ** 62, (n_batches,), generator=g).tolist()
        for k in range(n_batches):
            idx = order[k * batch_size:(k + 1) * batch_size]
            yield self._collate(data, idx, split, torch.Generator().manual_seed(batch_seeds[k]))

    def _collate(self, data: _Split, idx: torch.Tensor, split: str, generator: torch.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def size(self, split: str) -> int:
        return self.sizes[split]

    def fingerprint(self) -> dict[str, Any]:
        """Everything the data depends on: equal fingerprints give identical batches."""
        return {"task": self.name, **self.world.config(), "context_length": self.context_length,
                **{f"{s}_size": n for s, n in self.sizes.items()}, "seed": self.seed, **self._task_config()}

    def _task_config(self) -> dict[str, Any]:
        return {}

    def scene(self, index: int, split: str = "train", image: int = 0) -> list[tuple[str, str, str, int, int]]:
        """The objects of one example's image (`image` of a pair) by name: (size, colour, shape, row, col)."""
        return self._split(split).scenes[image].describe(index)

    def _pixels(self, data: _Split, idx: torch.Tensor) -> torch.Tensor:
        return to_pixels(data.images[idx.numpy()])


# -- visual entailment --------------------------------------------------------------


class WorldEntailment(WorldTask):
    """Synthetic visual entailment (SNLI-VE's format): image + hypothesis -> entailment / neutral / contradiction."""

    name = "world_ve_task"
    stream = "ve"
    num_outputs = len(VE_LABELS)

    def _generate_block(self, rng, m):
        scenes = self.world.sample(rng, m)
        label = rng.permutation(np.arange(m) % 3)
        u = rng.random((m, _DRAWS))
        texts = [entailment_hypothesis(scenes.objects(i), int(label[i]), _Draws(u[i]), self.world.max_objects)
                 for i in range(m)]
        return {"scenes": (scenes,), "texts": texts, "target": label.astype(np.int64)}

    def _collate(self, data, idx, split, generator):
        return {"image": self._pixels(data, idx), "text": data.text[idx], "label": data.target[idx],
                "pair_id": idx.clone()}

    def loss(self, logits, batch):
        return F.cross_entropy(logits, batch["label"])

    #: SNLI-VE's predictions format, `[{"pairID": "17", "label": "entailment"}]`; the pairID is the
    #: example's index in its split (SNLI-VE's pairIDs are strings too)
    predictions_file = "snli_ve_predictions.json"

    def predictions(self, logits, batch):
        return [{"pairID": str(i), "label": VE_LABELS[k]}
                for i, k in zip(batch["pair_id"].tolist(), logits.argmax(-1).tolist())]

    def metric(self, logits, batch):
        return accuracy_sums(logits, batch["label"])

    def summarize(self, totals):
        return summarize_accuracy(totals)


def _count_colour(objs, colour: int) -> int:
    return sum(o[0] == colour for o in objs)


def _absent_pairs(objs) -> list[tuple[int, int]]:
    present = {(o[0], o[1]) for o in objs}
    return [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES)) if (c, s) not in present]


def _some_colour(objs, d: _Draws) -> int:
    """A colour of the scene half of the time, any colour otherwise."""
    return d.choice(objs)[0] if d.below(0.5) else d.index(len(COLOURS))


def entailment_hypothesis(objs: list, label: int, d: _Draws, max_objects: int) -> str:
    """A hypothesis about the scene `objs` (`Scenes.objects`) with the given label."""
    if label == NEUTRAL:
        c, s = d.choice(objs)[:2]
        return f"the {object_name(c, s)} is {d.choice(ATTRIBUTES)}"
    kinds = ["presence", "count"] + (["relation"] if len(objs) >= 2 else [])
    if label == CONTRADICTION:
        kinds.append("attribute")
    kind = d.choice(kinds)
    true = label == ENTAILMENT
    if kind == "presence":
        if true:
            c, s, z = d.choice(objs)[:3]
        elif d.below(0.5):  # an absent object
            (c, s), z = d.choice(_absent_pairs(objs)), d.index(len(SIZES))
        else:  # a present object with the wrong size
            c, s, z = d.choice(objs)[:3]
            z = 1 - z
        return f"there is a {object_name(c, s, z)}"
    if kind == "count":
        colour = _some_colour(objs, d)
        k = _count_colour(objs, colour)
        if not true:
            k = d.choice([j for j in range(max_objects + 1) if j != k])
        return f"there are {NUMBERS[k]} {COLOURS[colour]} objects"
    if kind == "relation":
        i, j = d.pair(len(objs))
        a, b = objs[i], objs[j]
        rel = d.choice(true_relations(a, b))
        return f"the {object_name(*a[:2])} is {rel if true else REVERSE[rel]} the {object_name(*b[:2])}"
    c, s = d.choice(_absent_pairs(objs))  # attribute of an absent object: false in a closed world
    return f"the {object_name(c, s)} is {d.choice(ATTRIBUTES)}"


# -- VQA ------------------------------------------------------------------------------


class WorldVqa(WorldTask):
    """Synthetic VQA (VQA v2's format): image + question -> one of `ANSWERS`, soft-scored
    from `annotators` simulated annotators."""

    name = "world_vqa_task"
    stream = "vqa"
    answers = ANSWERS
    num_outputs = len(ANSWERS)

    def __init__(self, *, annotators: int = 10, annotator_accuracy: float = 0.9, **world):
        if annotators < 1:
            raise ValueError(f"world_vqa_task.annotators must be >= 1, got {annotators}")
        if not 0 <= annotator_accuracy <= 1:
            raise ValueError(f"world_vqa_task.annotator_accuracy must be in [0, 1], got {annotator_accuracy}")
        self.annotators, self.annotator_accuracy = int(annotators), float(annotator_accuracy)
        super().__init__(**world)

    def _task_config(self):
        return {"annotators": self.annotators, "annotator_accuracy": self.annotator_accuracy}

    def _generate_block(self, rng, m):
        scenes = self.world.sample(rng, m)
        u = rng.random((m, _DRAWS + self.annotators))
        index = {a: i for i, a in enumerate(ANSWERS)}
        texts, answers, target = [], [], np.zeros((m, len(ANSWERS)), np.float32)
        humans, kinds = np.empty((m, self.annotators), dtype=object), np.empty(m, dtype=object)
        for i in range(m):
            d = _Draws(u[i])
            question, answer, kind = vqa_question(scenes.objects(i), d)
            human = [answer if d.below(self.annotator_accuracy) else d.choice(_wrong_answers(answer, kind))
                     for _ in range(self.annotators)]
            # the answers are already normalised (`normalize_answer(a) == a`, tested): count them
            for a, matches in collections.Counter(human).items():
                target[i, index[a]] = vqa_score(matches, len(human))
            texts.append(question)
            answers.append(index[answer])
            humans[i], kinds[i] = human, kind
        # the annotators' answers and the answer kind: what VQA v2's annotation files hold (synth.py)
        return {"scenes": (scenes,), "texts": texts, "target": target,
                "extra": {"answer": np.array(answers, dtype=np.int64), "human": humans, "kind": kinds}}

    def _collate(self, data, idx, split, generator):
        return {"image": self._pixels(data, idx), "text": data.text[idx], "target": data.target[idx],
                "question_id": idx.clone()}

    #: VQA v2's results format, `[{"question_id": 17, "answer": "2"}]`; the question_id is the
    #: question's index in its split
    predictions_file = "vqa_results.json"

    def predictions(self, logits, batch):
        return [{"question_id": int(q), "answer": ANSWERS[k]}
                for q, k in zip(batch["question_id"].tolist(), logits.argmax(-1).tolist())]

    def answer(self, index: int, split: str = "train") -> str:
        """The true answer of one question (what the annotators were asked to give)."""
        return ANSWERS[int(self._split(split).extra["answer"][index])]

    def loss(self, logits, batch):
        return soft_score_loss(logits, batch["target"])

    def metric(self, logits, batch):
        return soft_score_sums(logits, batch["target"])

    def summarize(self, totals):
        return summarize_soft_scores(totals)


_ANSWER_KINDS = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "yesno": ("yes", "no"),
                 "count": tuple(str(i) for i in range(10))}


def _wrong_answers(answer: str, kind: str) -> list[str]:
    if kind == "count":  # annotators miscount by one
        k = int(answer)
        return [str(j) for j in (k - 1, k + 1) if 0 <= j <= 9]
    return [a for a in _ANSWER_KINDS[kind] if a != answer]


def vqa_question(objs: list, d: _Draws) -> tuple[str, str, str]:
    """(question, true answer, answer kind) about the scene `objs`."""
    shape_counts = collections.Counter(o[1] for o in objs)
    colour_counts = collections.Counter(o[0] for o in objs)
    unique_shapes = [s for s, k in shape_counts.items() if k == 1]
    unique_colours = [c for c, k in colour_counts.items() if k == 1]
    kinds = ["count_colour", "count_shape", "exists", "size"] + (["relation"] if len(objs) >= 2 else []) \
        + (["colour_of"] if unique_shapes else []) + (["shape_of"] if unique_colours else [])
    kind = d.choice(sorted(kinds))
    if kind == "colour_of":
        s = d.choice(sorted(unique_shapes))
        c = next(o[0] for o in objs if o[1] == s)
        return f"what colour is the {SHAPES[s]}", COLOURS[c], "colour"
    if kind == "shape_of":
        c = d.choice(sorted(unique_colours))
        s = next(o[1] for o in objs if o[0] == c)
        return f"what shape is the {COLOURS[c]} object", SHAPES[s], "shape"
    if kind == "count_colour":
        c = _some_colour(objs, d)
        return f"how many {COLOURS[c]} objects are there", str(colour_counts.get(c, 0)), "count"
    if kind == "count_shape":
        s = d.choice(objs)[1] if d.below(0.5) else d.index(len(SHAPES))
        return f"how many {SHAPES[s]}s are there", str(shape_counts.get(s, 0)), "count"
    if kind == "exists":
        if d.below(0.5):
            c, s = d.choice(objs)[:2]
            return f"is there a {object_name(c, s)}", "yes", "yesno"
        c, s = d.choice(_absent_pairs(objs))
        return f"is there a {object_name(c, s)}", "no", "yesno"
    if kind == "size":
        c, s, z = d.choice(objs)[:3]
        return f"what size is the {object_name(c, s)}", SIZES[z], "size"
    i, j = d.pair(len(objs))
    a, b = objs[i], objs[j]
    yes = true_relations(a, b)
    no = [r for r in RELATIONS if r not in yes]
    rel = d.choice(yes) if d.below(0.5) else d.choice(no)
    return (f"is the {object_name(*a[:2])} {rel} the {object_name(*b[:2])}",
            "yes" if holds(rel, a, b) else "no", "yesno")


# -- NLVR2 ------------------------------------------------------------------------------


class WorldNlvr2(WorldTask):
    """Synthetic NLVR2 (its format): a statement about a pair of images -> false / true."""

    name = "world_nlvr2_task"
    stream = "nlvr2"
    images_per_example = 2
    num_outputs = 2

    def _generate_block(self, rng, m):
        left, right = self.world.sample(rng, m), self.world.sample(rng, m)
        wanted = rng.permutation(np.arange(m) % 2)
        u = rng.random((m, 12, _DRAWS))
        texts, label = [], np.zeros(m, np.int64)
        for i in range(m):
            pair = (left.objects(i), right.objects(i))
            for attempt in range(u.shape[1]):  # balance: the first statement with the wanted truth value
                text, truth = pair_statement(pair, _Draws(u[i, attempt]), self.world.max_objects)
                if truth == bool(wanted[i]):
                    break
            texts.append(text)
            label[i] = truth
        return {"scenes": (left, right), "texts": texts, "target": label}

    def _collate(self, data, idx, split, generator):
        return {"image": self._pixels(data, idx), "text": data.text[idx], "label": data.target[idx],
                "identifier": idx.clone()}

    def loss(self, logits, batch):
        return pair_loss(logits, batch)

    #: NLVR2's predictions format, the input of its metrics.py: CSV lines `identifier,True|False`;
    #: the identifier is the example's index in its split
    predictions_file = "nlvr2_predictions.csv"

    def predictions(self, logits, batch):
        return [{"identifier": str(i), "prediction": "True" if k == 1 else "False"}
                for i, k in zip(batch["identifier"].tolist(), logits.argmax(-1).tolist())]

    def metric(self, logits, batch):
        return pair_accuracy_sums(logits, batch)

    def summarize(self, totals):
        return summarize_accuracy(totals)


def _has(objs, c: int, s: int) -> bool:
    return any(o[0] == c and o[1] == s for o in objs)


def pair_statement(pair: tuple[list, list], d: _Draws, max_objects: int) -> tuple[str, bool]:
    """(statement, truth) about two scenes (left, right)."""
    kind = d.choice(("both", "exactly_one", "more", "total", "relation"))
    both_objs = pair[0] + pair[1]
    if kind in ("both", "exactly_one"):
        c, s = d.choice(both_objs)[:2] if d.below(0.75) else (d.index(len(COLOURS)), d.index(len(SHAPES)))
        n = _has(pair[0], c, s) + _has(pair[1], c, s)
        if kind == "both":
            return f"both images contain a {object_name(c, s)}", n == 2
        return f"exactly one image contains a {object_name(c, s)}", n == 1
    if kind == "more":
        c = d.choice(both_objs)[0]
        more = d.below(0.5)
        k_left, k_right = _count_colour(pair[0], c), _count_colour(pair[1], c)
        word = "more" if more else "fewer"
        truth = k_left > k_right if more else k_left < k_right
        return f"the left image has {word} {COLOURS[c]} objects than the right image", truth
    if kind == "total":
        s = d.choice(both_objs)[1]
        k = sum(o[1] == s for o in both_objs)
        said = k if d.below(0.5) else d.choice([j for j in range(min(9, 2 * max_objects) + 1) if j != k])
        return f"there are {NUMBERS[said]} {SHAPES[s]}s in total", said == k
    sides = [k for k in (0, 1) if len(pair[k]) >= 2]
    if not sides:  # one-object scenes (min_objects = 1): no relation to state
        c, s = pair[0][0][:2]
        return f"both images contain a {object_name(c, s)}", _has(pair[1], c, s)
    side = d.choice(sides)
    objs = pair[side]
    i, j = d.pair(len(objs))
    a, b = objs[i], objs[j]
    rel = d.choice(tuple(RELATIONS))
    return (f"in the {('left', 'right')[side]} image the {object_name(*a[:2])} is {rel} the {object_name(*b[:2])}",
            holds(rel, a, b))


# -- captions ----------------------------------------------------------------------------


class WorldCaptions(CaptioningTask, WorldTask):
    """Synthetic captioning (COCO captions' format): image -> caption, CIDEr-D against
    `references` references per image; greedy decoding (`CaptioningTask`)."""

    name = "world_captions_task"
    stream = "captions"

    def __init__(self, *, references: int = 5, max_caption_length: int | None = None, **world):
        if references < 1:
            raise ValueError(f"world_captions_task.references must be >= 1, got {references}")
        self.references = int(references)
        super().__init__(**world)
        self.max_caption_length = self.context_length - 1 if max_caption_length is None else int(max_caption_length)
        if not 1 <= self.max_caption_length <= self.context_length - 1:
            raise ValueError(f"world_captions_task.max_caption_length must be in 1..context_length - 1 = "
                             f"{self.context_length - 1}, got {self.max_caption_length}")
        self.num_outputs = self.tokenizer.vocab_size

    def _task_config(self):
        return {"references": self.references, "max_caption_length": self.max_caption_length}

    def _generate_block(self, rng, m):
        scenes = self.world.sample(rng, m)
        u = rng.random((m, self.references, _DRAWS))
        texts = [[caption(scenes.objects(i), _Draws(u[i, r])) for r in range(self.references)] for i in range(m)]
        return {"scenes": (scenes,), "texts": texts, "target": np.zeros(m, np.int64)}

    def _tokenize(self, texts):
        # every reference of every image, (N, references, L): a batch picks one per image
        flat = [t for refs in texts for t in refs]
        tokens = super()._tokenize(flat)
        return tokens.view(len(texts), self.references, self.context_length)

    def _collate(self, data, idx, split, generator):
        pick = torch.randint(self.references, (len(idx),), generator=generator)
        tokens = data.text[idx, pick]
        return {"image": self._pixels(data, idx), "text": tokens[:, :-1], "labels": tokens[:, 1:],
                "image_id": idx.clone(), "references": [list(data.texts[i]) for i in idx.tolist()]}


def caption(objs: list, d: _Draws) -> str:
    """One reference caption of the scene `objs`."""
    kinds = ["list", "count"] + (["relation", "relation"] if len(objs) >= 2 else [])
    kind = d.choice(kinds)
    if kind == "relation":
        i, j = d.pair(len(objs))
        a, b = objs[i], objs[j]
        return f"a {object_name(*a[:3])} {d.choice(true_relations(a, b))} a {object_name(*b[:3])}"
    if kind == "count":
        c, s, z = d.choice(objs)[:3]
        return f"{NUMBERS[len(objs)]} objects with a {object_name(c, s, z)}"
    order = d.permutation(len(objs))[:3]
    return " and ".join(f"a {object_name(*objs[k][:3])}" for k in order)


__all__ = ["WorldTask", "WorldEntailment", "WorldVqa", "WorldNlvr2", "WorldCaptions", "ANSWERS",
           "entailment_hypothesis", "vqa_question", "pair_statement", "caption"]
