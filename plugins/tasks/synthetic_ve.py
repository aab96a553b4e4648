"""A built-in synthetic visual-entailment task, in the spirit of SNLI-VE.

Each example is an image (the premise) and a one-sentence hypothesis; the label
says whether the image entails the hypothesis, contradicts it, or neither.
Everything is generated procedurally from a seed: nothing is downloaded, and the
same seed always gives the same tensors, so that a quickstart, the tests and a
cached teacher all see exactly the same data.

The world is small and closed, so that labels are certain and a tiny transformer
trained from scratch for a few thousand steps can learn it:

- A scene holds one or two large shapes (circle, square, triangle) in one of four
  well separated colours (red, green, blue, yellow) on a dark background. One
  shape sits in the middle; two sit in the left and right halves and differ in
  colour or shape (or both). Shapes span 40-60% of the image side, so that each
  covers several 8x8 patches of a 32 px image. The image shows every object of
  the scene (closed world).
- Hypotheses come from three templates, always about one colour/shape pair:

  - "there is a {colour} {shape}."                  (presence)
  - "there is a {colour} {shape} on the {side}."    (position; two-object scenes)
  - "there is a {attribute} {colour} {shape}."      (unobservable attribute,
                                                     e.g. heavy, wooden)

- Labels, one third each:

  - entailment: presence or position of an object that is in the scene;
  - neutral: an unobservable attribute of an object that is in the scene (the
    object exists, but whether it is heavy cannot be seen);
  - contradiction: any template about a colour/shape pair that is NOT in the
    scene (closed world: such an object does not exist, so the existential
    statement is false). Half of the contradictions use the attribute template.

Because contradictions share both the observable and the attribute templates,
the hypothesis alone gives at most 2/3 accuracy (observable -> entailment,
attribute -> neutral); going beyond that needs the image, i.e. checking that the
named colour/shape pair is present. Absent pairs are drawn uniformly, so many
share the colour or the shape of a present object and colour/shape binding
matters.

Images are normalised with open_clip's OpenAI mean/std and hypotheses are
tokenised with open_clip's own tokenizer, so the batches look like those of a
real CoCa pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer

from optima.errors import ConfigError
from optima.interfaces import Batch, Task

LABELS = ("entailment", "neutral", "contradiction")
ENTAILMENT, NEUTRAL, CONTRADICTION = 0, 1, 2

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
#: Properties that a picture cannot show: a statement about them is neutral.
ATTRIBUTES = ("heavy", "wooden", "metal", "soft", "fragile", "valuable")

# Templates, indexed by the `template` field of a split's record.
PRESENCE, POSITION, ATTRIBUTE = 0, 1, 2

# RGB in [0, 1], far apart so that an 8x8 patch tells them apart after noise.
_RGB = np.array([[0.90, 0.12, 0.12],   # red
                 [0.12, 0.80, 0.20],   # green
                 [0.15, 0.30, 0.95],   # blue
                 [0.95, 0.88, 0.12]],  # yellow
                dtype=np.float32)

SPLITS = ("train", "val", "test")
_CHUNK = 2048  # scenes drawn at once: bounds the (n, H, W) mask memory


@dataclass(frozen=True)
class _Split:
    """One generated split: the tensors plus the record they were drawn from."""

    image: torch.Tensor        # (N, 3, H, W) float32, normalised
    text: torch.Tensor         # (N, L) int64
    label: torch.Tensor        # (N,) int64
    hypotheses: tuple[str, ...]
    # Scene record: (N, 2) colour, shape and position ids; -1 pads one-object
    # scenes. Position: 0 left, 1 right, 2 middle.
    colour: np.ndarray
    shape: np.ndarray
    position: np.ndarray
    # What the hypothesis names: (N,) colour, shape, template; side is -1
    # unless the template is POSITION; attribute is -1 unless ATTRIBUTE.
    h_colour: np.ndarray
    h_shape: np.ndarray
    h_template: np.ndarray
    h_side: np.ndarray
    h_attribute: np.ndarray


class SyntheticVisualEntailment(Task):
    """Procedural visual entailment: image + hypothesis -> entailment/neutral/contradiction."""

    num_outputs = len(LABELS)

    def __init__(self, *, image_size: int = 32, context_length: int = 16,
                 train_size: int = 20_000, val_size: int = 1_000,
                 test_size: int = 2_000, seed: int = 0) -> None:
        def check(name: str, value, minimum: int, why: str = "") -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"synthetic_ve_task.{name} = {value!r} must be an integer >= {minimum}{why}")

        check("image_size", image_size, 8, " (shapes are drawn at least 8 px wide)")
        check("context_length", context_length, 2, " (start and end of text)")
        for name, n in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            check(name, n, 0)
        check("seed", seed, 0, " (numpy seeds are non-negative)")
        self.image_size = int(image_size)
        self.context_length = int(context_length)
        self.sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}
        self.seed = int(seed)
        self._splits: dict[str, _Split] = {}
        self._tokenizer: SimpleTokenizer | None = None
        self._token_cache: dict[str, torch.Tensor] = {}

    # -- Task -------------------------------------------------------------

    def batches(self, split: str, batch_size: int, *, shuffle: bool, seed: int) -> Iterator[Batch]:
        data = self._split(split)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = data.label.shape[0]
        if shuffle:
            g = torch.Generator().manual_seed(int(seed))
            order = torch.randperm(n, generator=g)
        else:
            order = None
        for start in range(0, n, batch_size):
            if order is None:
                sl = slice(start, start + batch_size)
                yield {"image": data.image[sl], "text": data.text[sl], "label": data.label[sl],
                       "index": torch.arange(n)[sl]}
            else:
                idx = order[start:start + batch_size]
                yield {"image": data.image[idx], "text": data.text[idx], "label": data.label[idx], "index": idx}

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits, batch["label"])

    def metric(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        label = batch["label"]
        correct = (logits.argmax(dim=-1) == label).sum().item()
        return {"correct": float(correct), "count": float(label.numel())}

    def summarize(self, totals: Mapping[str, float]) -> dict[str, float]:
        count = float(totals.get("count", 0.0))
        if count <= 0:
            return {"accuracy": float("nan")}
        return {"accuracy": float(totals["correct"]) / count}

    def check_data(self, splits: Sequence[str]) -> None:
        for split in splits:
            if self.size(split) < 1:
                raise ConfigError(f"synthetic_ve_task.{split}_size = {self.sizes[split]} must be >= 1: "
                                  f"every run reads the {split} split")

    #: `[{"index": i, "label": "entailment"}, ...]`: the example's index in its split
    predictions_file = "synthetic_ve_predictions.json"

    def predictions(self, logits: torch.Tensor, batch: Batch) -> list[dict]:
        return [{"index": int(i), "label": LABELS[int(k)]}
                for i, k in zip(batch["index"].tolist(), logits.argmax(dim=-1).tolist())]

    # -- helpers ----------------------------------------------------------

    def size(self, split: str) -> int:
        """Number of examples in `split` (without generating it)."""
        self._check_split(split)
        return self.sizes[split]

    def describe(self, index: int, split: str = "train") -> tuple[str, str]:
        """(hypothesis, label name) of one example, for debugging."""
        data = self._split(split)
        return data.hypotheses[index], LABELS[int(data.label[index])]

    def scene(self, index: int, split: str = "train") -> tuple[tuple[str, str, str], ...]:
        """The objects of one example's image as (colour, shape, position) names."""
        data = self._split(split)
        names = ("left", "right", "middle")
        return tuple((COLOURS[c], SHAPES[s], names[p])
                     for c, s, p in zip(data.colour[index], data.shape[index], data.position[index])
                     if c >= 0)

    def fingerprint(self) -> dict[str, int]:
        """The constructor arguments: equal fingerprints give identical data."""
        return {"image_size": self.image_size, "context_length": self.context_length,
                "train_size": self.sizes["train"], "val_size": self.sizes["val"],
                "test_size": self.sizes["test"], "seed": self.seed}

    # -- generation -------------------------------------------------------

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")

    def _split(self, split: str) -> _Split:
        self._check_split(split)
        if split not in self._splits:
            self._splits[split] = self._generate(split)
        return self._splits[split]

    def _generate(self, split: str) -> _Split:
        n = self.sizes[split]
        # One independent stream per (seed, split): splits differ, seeds differ.
        rng = np.random.default_rng([self.seed, SPLITS.index(split), 0x5E])
        rec = _sample_scenes(rng, n)
        image = _draw(rng, rec, self.image_size)
        hyps = tuple(_hypothesis(*row) for row in zip(
            rec["h_colour"], rec["h_shape"], rec["h_template"], rec["h_side"], rec["h_attribute"]))
        return _Split(image=image, text=self._tokenize(hyps),
                      label=torch.from_numpy(rec["label"]).long(), hypotheses=hyps, **{
                          k: rec[k] for k in ("colour", "shape", "position", "h_colour", "h_shape",
                                              "h_template", "h_side", "h_attribute")})

    def _tokenize(self, texts: tuple[str, ...]) -> torch.Tensor:
        # The grammar yields a few hundred distinct sentences: tokenise each once.
        if self._tokenizer is None:
            self._tokenizer = SimpleTokenizer(context_length=self.context_length)
        new = sorted(set(texts) - self._token_cache.keys())
        if new:
            for t, row in zip(new, self._tokenizer(new)):
                self._token_cache[t] = row
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return torch.stack([self._token_cache[t] for t in texts]).long()


def _hypothesis(colour: int, shape: int, template: int, side: int, attribute: int) -> str:
    obj = f"{COLOURS[colour]} {SHAPES[shape]}"
    if template == PRESENCE:
        return f"there is a {obj}."
    if template == POSITION:
        return f"there is a {obj} on the {SIDES[side]}."
    return f"there is a {ATTRIBUTES[attribute]} {obj}."


def _sample_scenes(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Scenes and hypotheses as integer arrays (see `_Split`); vectorised over n."""
    n_pairs = len(COLOURS) * len(SHAPES)
    two = rng.random(n) < 0.5
    # Two distinct colour/shape pairs per scene; the second is dropped for one-object scenes.
    first = rng.integers(0, n_pairs, n)
    second = (first + rng.integers(1, n_pairs, n)) % n_pairs
    pair = np.stack([first, np.where(two, second, -1)], axis=1)
    colour = np.where(pair >= 0, pair // len(SHAPES), -1)
    shape = np.where(pair >= 0, pair % len(SHAPES), -1)
    position = np.where(two[:, None], np.array([[0, 1]]), np.array([[2, -1]]))

    # Exactly balanced labels (up to n mod 3), in random order.
    label = rng.permutation(np.arange(n) % 3)

    # Present pair (for entailment/neutral): one of the scene's objects, at its slot.
    slot = np.where(two, rng.integers(0, 2, n), 0)
    present = pair[np.arange(n), slot]
    # Absent pair (for contradiction): uniform among the pairs not in the scene.
    # Draw a rank among the free pairs, then skip over the taken ones in order.
    n_free = n_pairs - np.where(two, 2, 1)
    absent = np.floor(rng.random(n) * n_free).astype(np.int64)
    lo = np.where(two, np.minimum(first, second), first)
    hi = np.where(two, np.maximum(first, second), n_pairs)  # n_pairs: never reached
    absent += absent >= lo
    absent += absent >= hi
    named = np.where(label == CONTRADICTION, absent, present)

    # Templates: entailment = presence or (two objects) position; neutral =
    # attribute; contradiction = half attribute, half observable like entailment.
    observable = np.where(two & (rng.random(n) < 0.5), POSITION, PRESENCE)
    contra_attr = rng.random(n) < 0.5
    template = np.select([label == ENTAILMENT, label == NEUTRAL, contra_attr],
                         [observable, ATTRIBUTE, ATTRIBUTE], observable)
    # Side: the true slot for entailment; any side for an absent object.
    side = np.where(label == ENTAILMENT, slot, rng.integers(0, 2, n))
    side = np.where(template == POSITION, side, -1)
    attribute = np.where(template == ATTRIBUTE, rng.integers(0, len(ATTRIBUTES), n), -1)
    return {"label": label.astype(np.int64), "colour": colour, "shape": shape,
            "position": position, "h_colour": named // len(SHAPES), "h_shape": named % len(SHAPES),
            "h_template": template, "h_side": side, "h_attribute": attribute}


def _shape_mask(kind: np.ndarray, cx: np.ndarray, cy: np.ndarray, half: np.ndarray,
                xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(n, H, W) masks of n shapes of half-size `half` centred at (cx, cy), in pixels."""
    dx = xs[None, None, :] - cx[:, None, None]
    dy = ys[None, :, None] - cy[:, None, None]
    h = half[:, None, None]
    circle = dx * dx + dy * dy <= h * h
    # Side 1.8*half: about the circle's area, so size alone does not give the shape away.
    square = (np.abs(dx) <= 0.9 * h) & (np.abs(dy) <= 0.9 * h)
    # Apex up, base down (y grows downwards); half-width grows linearly to h at the base.
    t = (dy + h) / (2 * h)
    triangle = (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)
    k = kind[:, None, None]
    return np.where(k == 0, circle, np.where(k == 1, square, triangle))


def _draw(rng: np.random.Generator, rec: Mapping[str, np.ndarray], size: int) -> torch.Tensor:
    """Renders the scenes of `rec` into normalised (n, 3, size, size) float32 images."""
    n = rec["label"].shape[0]
    s = float(size)
    coords = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    two = rec["colour"][:, 1] >= 0

    # Geometry, all in pixels. One object: 45-60% of the side, near the centre.
    # Two: 40-45% each, near the centre of its half and at least 4% of the
    # side away from the midline, so that the halves never share a shape.
    half = np.where(two[:, None], rng.uniform(0.20, 0.225, (n, 2)), rng.uniform(0.225, 0.30, (n, 2))) * s
    room_y = s / 2 - half  # how far the centre may move and stay inside the image
    cy = s / 2 + rng.uniform(-1, 1, (n, 2)) * np.minimum(room_y, 0.08 * s)
    room_x = np.where(two[:, None], np.minimum(0.23 * s - half, 0.03 * s), 0.06 * s)
    jx = rng.uniform(-1, 1, (n, 2)) * room_x
    cx = np.where(two[:, None], np.array([[0.25, 0.75]]) * s, s / 2) + jx
    half, cx, cy = (a.astype(np.float32) for a in (half, cx, cy))
    background = rng.uniform(0.0, 0.12, n).astype(np.float32)
    jitter = rng.uniform(-0.05, 0.05, (n, 2, 3)).astype(np.float32)
    mean = np.array(OPENAI_DATASET_MEAN, dtype=np.float32)[None, :, None, None]
    std = np.array(OPENAI_DATASET_STD, dtype=np.float32)[None, :, None, None]

    colour = np.maximum(rec["colour"], 0)  # pad -> 0; its mask is emptied below
    rgb = (_RGB[colour] + jitter)[:, :, :, None, None]  # (n, 2, 3, 1, 1)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        sl = slice(lo, hi)
        masks = [_shape_mask(np.maximum(rec["shape"][sl, k], 0), cx[sl, k], cy[sl, k], half[sl, k],
                             coords, coords) & (rec["colour"][sl, k] >= 0)[:, None, None]
                 for k in range(2)]
        # The two shapes never overlap, so the order of painting does not matter.
        img = np.where(masks[0][:, None], rgb[sl, 0],
                       np.where(masks[1][:, None], rgb[sl, 1], background[sl, None, None, None]))
        # Uniform noise (sd ~0.03): about 3x cheaper to draw than Gaussian.
        img += (rng.random(img.shape, dtype=np.float32) - 0.5) * 0.1
        np.clip(img, 0.0, 1.0, out=img)
        out[sl] = (img - mean) / std
    return torch.from_numpy(out)
