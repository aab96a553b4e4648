"""A procedurally generated world of coloured shapes: scenes, images, a closed
vocabulary and its tokenizer. The four tasks (`tasks.py`) and the pretraining
caption corpus all draw from it.

A scene holds `min_objects..max_objects` objects on a `grid x grid` layout of
cells (one object per cell, so "left of" and "above" are always decidable
from the cells). Each object has a colour (6), a shape (4) and a size (2); no
two objects of a scene share both colour and shape, so "the red circle" names
one object. `distractors` grey specks (never named by any text) sit in empty
cells. Images are `image_size` px squares: a dark background, the objects,
uniform pixel noise of amplitude `noise`.

Difficulty is set by bindings: `image_size` (pixels per cell), `grid`,
`min_objects`/`max_objects`, `distractors` and `noise`.

Determinism: example `i` of a stream depends only on the stream's key (the
task, its seed, the split) and on `i`: examples are drawn in blocks of
`BLOCK` with one `numpy.random.Generator` per block (seeded by the key and the
block number), vectorised inside the block, so a larger split starts with the
examples of a smaller one and generation stays fast (about 20k scenes/s).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
# relation word(s) -> (axis: 0 column / 1 row, sign): A rel B holds when sign * (A - B) > 0
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
REVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
#: Properties a picture cannot show: statements about them are neither true nor false.
ATTRIBUTES = ("heavy", "wooden", "metal", "soft", "fragile", "expensive")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# RGB in [0, 1], far apart so that a patch tells them apart after noise.
RGB = np.array([[0.90, 0.12, 0.12],   # red
                [0.12, 0.80, 0.20],   # green
                [0.15, 0.30, 0.95],   # blue
                [0.95, 0.88, 0.12],   # yellow
                [0.65, 0.20, 0.85],   # purple
                [0.95, 0.95, 0.95]],  # white
               dtype=np.float32)
DISTRACTOR_GREY = 0.45
BLOCK = 256  # examples per generator block

# -- vocabulary -----------------------------------------------------------------

PAD, SOT, EOT = "<pad>", "<sot>", "<eot>"
_WORDS = sorted(set(
    COLOURS + SHAPES + tuple(s + "s" for s in SHAPES) + SIZES + ATTRIBUTES + NUMBERS
    + tuple(str(i) for i in range(10))
    + tuple(w for r in RELATIONS for w in r.split())
    + ("a", "an", "and", "are", "both", "colour", "contain", "contains", "exactly", "fewer", "has", "how", "image",
       "images", "in", "is", "many", "more", "no", "number", "object", "objects", "of", "one", "only", "shape",
       "size", "than", "the", "there", "total", "what", "with", "yes", "left", "right")))
#: Token id -> word; 0 is padding (CoCa's pad id), 1 start- and 2 end-of-text.
VOCABULARY = (PAD, SOT, EOT, *_WORDS)
#: The model's vocabulary size (`vocab_size` in the gin CoCa configs): the words
#: above with room to grow, so adding a word does not change every model.
VOCAB_SIZE = 128
assert len(VOCABULARY) <= VOCAB_SIZE


class WorldTokenizer:
    """Word-level tokenizer of the world's closed vocabulary, with the interface of
    `optima.plugins.tasks.vl_data.Tokenizer` (open_clip's BPE tokenizer): start-of-text,
    words, end-of-text, zero padding, truncated to `context_length` (the last kept
    token is then end-of-text). A 128-token vocabulary instead of BPE's 49,408 keeps
    the captioning projection, and so CPU runs, small."""

    def __init__(self, context_length: int):
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (start, a word, end), got {context_length}")
        self.context_length = int(context_length)
        self.index = {w: i for i, w in enumerate(VOCABULARY)}
        self.pad_token_id, self.sot_token_id, self.eot_token_id = 0, 1, 2
        self.vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"word {e.args[0]!r} of {text!r} is not in the world's vocabulary") from None

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """`(N, context_length)` int64 token ids."""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text)][:self.context_length - 1] + [self.eot_token_id]
            out[row, :len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids, without start/end-of-text and padding (stops at end-of-text)."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eot_token_id:
                break
            if i not in (self.sot_token_id, self.pad_token_id) and 0 <= i < len(VOCABULARY):
                words.append(VOCABULARY[i])
        return " ".join(words)


# -- scenes -----------------------------------------------------------------------


@dataclass
class Scenes:
    """`n` scenes as arrays; object slots `(n, max_objects)`, -1 where a slot is empty."""

    colour: np.ndarray
    shape: np.ndarray
    size: np.ndarray
    row: np.ndarray
    col: np.ndarray

    def __len__(self) -> int:
        return self.colour.shape[0]

    @property
    def count(self) -> np.ndarray:
        return (self.colour >= 0).sum(1)

    def objects(self, i: int) -> list[tuple[int, int, int, int, int]]:
        """The objects of scene `i` as (colour, shape, size, row, col) ids."""
        return [tuple(int(a[i, k]) for a in (self.colour, self.shape, self.size, self.row, self.col))
                for k in range(self.colour.shape[1]) if self.colour[i, k] >= 0]

    def describe(self, i: int) -> list[tuple[str, str, str, int, int]]:
        """The objects of scene `i` by name: (size, colour, shape, row, col)."""
        return [(SIZES[z], COLOURS[c], SHAPES[s], r, q) for c, s, z, r, q in self.objects(i)]

    def take(self, index: np.ndarray) -> "Scenes":
        return Scenes(*(a[index] for a in (self.colour, self.shape, self.size, self.row, self.col)))

    @staticmethod
    def concat(parts: Sequence["Scenes"]) -> "Scenes":
        return Scenes(*(np.concatenate([getattr(p, k) for p in parts])
                        for k in ("colour", "shape", "size", "row", "col")))


def object_name(colour: int, shape: int, size: int | None = None) -> str:
    """'red circle', or 'small red circle' with a size."""
    words = ([SIZES[size]] if size is not None else []) + [COLOURS[colour], SHAPES[shape]]
    return " ".join(words)


def holds(relation: str, a: tuple, b: tuple) -> bool:
    """Whether object `a` is `relation` object `b` (objects as `Scenes.objects` tuples)."""
    axis, sign = RELATIONS[relation]
    pos_a, pos_b = (a[4], a[3]), (b[4], b[3])  # (col, row)
    return sign * (pos_a[axis] - pos_b[axis]) > 0


def true_relations(a: tuple, b: tuple) -> list[str]:
    return [r for r in RELATIONS if holds(r, a, b)]


class World:
    """The world's parameters, scene sampling and rendering (see the module doc)."""

    def __init__(self, *, image_size: int = 32, grid: int = 3, min_objects: int = 2, max_objects: int = 4,
                 distractors: int = 1, noise: float = 0.1):
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        if grid < 2:
            raise ValueError(f"grid must be at least 2 (relations need two cells), got {grid}")
        if not 1 <= min_objects <= max_objects <= grid * grid:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= grid * grid = {grid * grid}, "
                             f"got {min_objects}, {max_objects}")
        if max_objects > len(COLOURS) * len(SHAPES):
            raise ValueError(f"max_objects must be at most {len(COLOURS) * len(SHAPES)} (distinct colour/shape pairs)")
        if not 0 <= distractors <= grid * grid - max_objects:
            raise ValueError(f"distractors must be in 0..grid * grid - max_objects = {grid * grid - max_objects}, "
                             f"got {distractors}")
        if not 0 <= noise <= 1:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        self.image_size, self.grid = int(image_size), int(grid)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.distractors, self.noise = int(distractors), float(noise)

    def config(self) -> dict:
        return {"image_size": self.image_size, "grid": self.grid, "min_objects": self.min_objects,
                "max_objects": self.max_objects, "distractors": self.distractors, "noise": self.noise}

    # -- sampling -------------------------------------------------------------

    def sample(self, rng: np.random.Generator, n: int) -> Scenes:
        """`n` scenes: object count, distinct (colour, shape) pairs, distinct cells."""
        k, cells, pairs = self.max_objects, self.grid * self.grid, len(COLOURS) * len(SHAPES)
        count = rng.integers(self.min_objects, self.max_objects + 1, n)
        # distinct draws without replacement, vectorised: the order of random keys
        pair = np.argsort(rng.random((n, pairs)), axis=1)[:, :k]
        cell = np.argsort(rng.random((n, cells)), axis=1)[:, :k]
        size = rng.integers(0, len(SIZES), (n, k))
        empty = np.arange(k)[None, :] >= count[:, None]

        def masked(a):
            return np.where(empty, -1, a).astype(np.int64)

        return Scenes(colour=masked(pair // len(SHAPES)), shape=masked(pair % len(SHAPES)), size=masked(size),
                      row=masked(cell // self.grid), col=masked(cell % self.grid))

    def render(self, rng: np.random.Generator, scenes: Scenes) -> np.ndarray:
        """`(n, 3, image_size, image_size)` uint8 images of `scenes`."""
        n, k = scenes.colour.shape
        s, g = float(self.image_size), self.grid
        cell = s / g
        coords = np.arange(self.image_size, dtype=np.float32) + 0.5
        present = scenes.colour >= 0
        # Objects: large 70-84% of a cell across, small 44-54%; centres jitter by up to 8% of a cell.
        half = np.where(scenes.size == 1, rng.uniform(0.35, 0.42, (n, k)), rng.uniform(0.22, 0.27, (n, k))) * cell
        cx = (np.maximum(scenes.col, 0) + 0.5 + rng.uniform(-0.08, 0.08, (n, k))) * cell
        cy = (np.maximum(scenes.row, 0) + 0.5 + rng.uniform(-0.08, 0.08, (n, k))) * cell
        rgb = RGB[np.maximum(scenes.colour, 0)] + rng.uniform(-0.05, 0.05, (n, k, 3)).astype(np.float32)
        # Distractors: small grey squares in cells no object uses (never named by any text).
        used = np.zeros((n, g * g), dtype=bool)
        np.put_along_axis(used, np.where(present, scenes.row * g + scenes.col, 0), present, axis=1)
        free_order = np.argsort(np.where(used, 2.0, rng.random((n, g * g))), axis=1)[:, :self.distractors]
        d_half = np.full((n, self.distractors), 0.15 * cell)
        d_cx = (free_order % g + 0.5 + rng.uniform(-0.2, 0.2, free_order.shape)) * cell
        d_cy = (free_order // g + 0.5 + rng.uniform(-0.2, 0.2, free_order.shape)) * cell

        img = np.broadcast_to(rng.uniform(0.0, 0.15, (n, 1, 1, 1)).astype(np.float32),
                              (n, 3, self.image_size, self.image_size)).copy()
        for j in range(self.distractors):
            mask = _shape_mask(np.ones(n, dtype=np.int64), d_cx[:, j], d_cy[:, j], d_half[:, j], coords)
            img = np.where(mask[:, None], np.float32(DISTRACTOR_GREY), img)
        for j in range(k):
            mask = _shape_mask(np.maximum(scenes.shape[:, j], 0), cx[:, j], cy[:, j], half[:, j], coords)
            mask &= present[:, j, None, None]
            img = np.where(mask[:, None], rgb[:, j, :, None, None], img)
        img += (rng.random(img.shape, dtype=np.float32) - 0.5) * (2 * self.noise)
        return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _shape_mask(kind: np.ndarray, cx: np.ndarray, cy: np.ndarray, half: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """(n, H, W) masks of n shapes (SHAPES ids) of half-size `half` centred at (cx, cy), in pixels."""
    dx = coords[None, None, :] - cx[:, None, None]
    dy = coords[None, :, None] - cy[:, None, None]
    h = half[:, None, None]
    circle = dx * dx + dy * dy <= h * h
    square = (np.abs(dx) <= 0.9 * h) & (np.abs(dy) <= 0.9 * h)  # about the circle's area
    t = (dy + h) / (2 * h)  # apex up, base down (y grows downwards)
    triangle = (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)
    diamond = np.abs(dx) + np.abs(dy) <= 1.2 * h
    k = kind[:, None, None]
    return np.select([k == 0, k == 1, k == 2], [circle, square, triangle], diamond)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 images -> float32 normalised with open_clip's OpenAI mean/std (what CoCa expects)."""
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float32)[:, None, None]
    return (torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0 - mean) / std


def block_rng(key: Sequence[int], block: int) -> np.random.Generator:
    return np.random.default_rng([*key, block])


def stream_key(seed: int, stream: str, split: str) -> tuple[int, ...]:
    """Integer seed sequence of one stream: the seed, the stream's name, the split."""
    return (int(seed), *(ord(c) for c in stream), 0, *(ord(c) for c in split))


__all__ = ["World", "Scenes", "WorldTokenizer", "VOCABULARY", "VOCAB_SIZE", "COLOURS", "SHAPES", "SIZES",
           "RELATIONS", "REVERSE", "ATTRIBUTES", "NUMBERS", "object_name", "holds", "true_relations", "to_pixels",
           "block_rng", "stream_key"]
