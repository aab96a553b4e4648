"""A synthetic video task, generated in code from a seed: questions about clips
of a moving shape that changes colour.

Each example is a short clip of one shape moving in a straight line (left,
right, up or down) that changes colour halfway through, and one of three
questions, a third each:

- "what colour is it at first?"    -> red / green / blue / yellow
- "what colour is it at the end?"  -> red / green / blue / yellow
- "what shape is it?"              -> circle / square / triangle

The answer is one of those 7 words. Both colours are always in the clip, so the
first two questions need the order of the frames: the temporal module, not
just the image encoder. The question alone narrows the answer to its group
(chance within it). Small models from scratch learn it in a few hundred steps.
(The direction of motion is not asked: the tiny CPU-sized models did not learn
it within a demo's budget, while the order of colours they learn quickly.)

- Shapes span 30-40% of the side and move `speed` pixels per frame, always fully
  inside the frame; dark background; normalised with open_clip's OpenAI mean
  and std.
- Frames are drawn when a batch is asked for (a split holds only the scene
  records), so memory stays small; the same seed gives the same tensors.
- Batches: `video` `(B, F, 3, H, W)`, `text`, `label`, and `image`: the first
  frame, a view of `video`, because OPTIMA's `Network` reads `batch["image"]`
  to recognise multi-image batches.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer

from optima.interfaces import Batch, Task

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
ANSWERS = COLOURS + SHAPES
QUESTIONS = ("what colour is it at first?", "what colour is it at the end?", "what shape is it?")
FIRST, LAST, SHAPE = 0, 1, 2  # question kinds
_STEP = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.float32)  # (dx, dy); y grows downwards
_RGB = np.array([[0.90, 0.12, 0.12], [0.12, 0.80, 0.20], [0.15, 0.30, 0.95], [0.95, 0.88, 0.12]],
                dtype=np.float32)
SPLITS = ("train", "val", "test")


class SyntheticMovingShapes(Task):
    """Moving shapes: clip + question (first colour, last colour or shape) -> one of 7 answers."""

    num_outputs = len(ANSWERS)

    def __init__(self, *, frames: int = 4, image_size: int = 32, speed: float = 3.0, context_length: int = 16,
                 train_size: int = 6_000, val_size: int = 500, test_size: int = 1_000, seed: int = 0) -> None:
        if frames < 2:
            raise ValueError(f"a motion needs frames >= 2, got {frames}")
        travel = (frames - 1) * speed
        if image_size < 8 or travel > 0.4 * image_size:
            raise ValueError(f"the path ((frames - 1) * speed = {travel} px) must stay within 40% of "
                             f"image_size ({image_size})")
        if context_length < 2 or min(train_size, val_size, test_size) < 0 or seed < 0:
            raise ValueError("need context_length >= 2 and non-negative split sizes and seed")
        self.frames, self.image_size, self.speed = int(frames), int(image_size), float(speed)
        self.context_length = int(context_length)
        self.sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}
        self.seed = int(seed)
        self._splits: dict[str, dict] = {}

    # -- Task ---------------------------------------------------------------

    def batches(self, split: str, batch_size: int, *, shuffle: bool, seed: int) -> Iterator[Batch]:
        rec = self.split(split)
        n = rec["label"].shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            video = self.render(split, idx.numpy())
            yield {"video": video, "image": video[:, 0], "text": rec["text"][idx], "label": rec["label"][idx]}

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits, batch["label"])

    def metric(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        return {"correct": float((logits.argmax(-1) == batch["label"]).sum()), "count": float(batch["label"].numel())}

    def summarize(self, totals: Mapping[str, float]) -> dict[str, float]:
        count = float(totals.get("count", 0.0))
        return {"accuracy": float(totals["correct"]) / count if count else float("nan")}

    def fingerprint(self) -> dict:
        """Equal fingerprints give identical data (keys OPTIMA's teacher cache)."""
        return {"task": "moving_shapes_colour_order", "frames": self.frames, "image_size": self.image_size,
                "speed": self.speed, "context_length": self.context_length, **self.sizes, "seed": self.seed}

    # -- generation -----------------------------------------------------------

    def split(self, split: str) -> dict:
        """The scene records of a split (numpy arrays) plus `text` and `label` tensors."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if split not in self._splits:
            self._splits[split] = self._generate(split)
        return self._splits[split]

    def questions(self, split: str) -> list[tuple[str, str]]:
        """(question, answer) of each example, for inspection."""
        rec = self.split(split)
        return [(QUESTIONS[q], ANSWERS[a]) for q, a in zip(rec["question"], rec["label"].tolist())]

    def _generate(self, split: str) -> dict:
        n, size = self.sizes[split], float(self.image_size)
        rng = np.random.default_rng([self.seed, SPLITS.index(split), 0x7D])
        colour = rng.integers(0, len(COLOURS), n)  # first half of the clip
        colour_after = (colour + rng.integers(1, len(COLOURS), n)) % len(COLOURS)  # always another one
        shape = rng.integers(0, len(SHAPES), n)
        direction = rng.integers(0, len(DIRECTIONS), n)
        question = rng.permutation(np.arange(n) % len(QUESTIONS))
        answer = np.select([question == FIRST, question == LAST], [colour, colour_after], len(COLOURS) + shape)
        half = (rng.uniform(0.15, 0.20, n) * size).astype(np.float32)
        # The path's centre: uniform over where the whole path stays inside.
        travel = (self.frames - 1) * self.speed
        room = size / 2 - half - travel / 2  # how far the centre may move off the middle
        centre = (size / 2 + rng.uniform(-1, 1, (n, 2)) * room[:, None]).astype(np.float32)
        return {"label": torch.from_numpy(answer.astype(np.int64)), "question": question,
                "text": _tokenize([QUESTIONS[q] for q in question], self.context_length),
                "colour": colour, "colour_after": colour_after, "shape": shape, "direction": direction,
                "half": half, "centre": centre,
                "rgb": (_RGB[np.stack([colour, colour_after], 1)]
                        + rng.uniform(-0.05, 0.05, (n, 2, 3))).astype(np.float32),  # (n, 2, 3)
                "background": rng.uniform(0.0, 0.12, n).astype(np.float32)}

    def render(self, split: str, idx: np.ndarray) -> torch.Tensor:
        """Clips of examples `idx`: normalised `(len(idx), frames, 3, H, W)` float32."""
        rec = self.split(split)
        size, frames = self.image_size, self.frames
        offsets = (np.arange(frames, dtype=np.float32) - (frames - 1) / 2) * self.speed  # (F,)
        pos = rec["centre"][idx, None, :] + offsets[None, :, None] * _STEP[rec["direction"][idx]][:, None, :]
        coords = np.arange(size, dtype=np.float32) + 0.5
        dx = coords[None, None, None, :] - pos[:, :, 0, None, None]  # (b, F, 1, W)
        dy = coords[None, None, :, None] - pos[:, :, 1, None, None]  # (b, F, H, 1)
        h = rec["half"][idx][:, None, None, None]
        t = (dy + h) / (2 * h)  # triangle: apex up, widening to h at the base
        shape = rec["shape"][idx][:, None, None, None]
        mask = np.where(shape == 0, dx * dx + dy * dy <= h * h,
                        np.where(shape == 1, (np.abs(dx) <= 0.9 * h) & (np.abs(dy) <= 0.9 * h),
                                 (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)))  # (b, F, H, W)
        after = (np.arange(frames) >= frames // 2).astype(np.int64)  # which colour each frame shows
        rgb = rec["rgb"][idx][:, after]  # (b, F, 3)
        img = np.where(mask[:, :, None], rgb[:, :, :, None, None], rec["background"][idx][:, None, None, None, None])
        mean = np.array(OPENAI_DATASET_MEAN, dtype=np.float32)[:, None, None]
        std = np.array(OPENAI_DATASET_STD, dtype=np.float32)[:, None, None]
        return torch.from_numpy(((img - mean) / std).astype(np.float32))


@lru_cache(maxsize=None)
def _tokenizer(context_length: int) -> SimpleTokenizer:
    return SimpleTokenizer(context_length=context_length)


def _tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    if not texts:
        return torch.zeros(0, context_length, dtype=torch.long)
    unique = sorted(set(texts))  # 3 distinct questions: tokenise each once
    rows = dict(zip(unique, _tokenizer(context_length)(unique)))
    return torch.stack([rows[t] for t in texts]).long()
