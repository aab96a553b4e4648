"""A synthetic audio-visual task, generated in code from a seed: questions about
a picture and a sound.

Each example is an image of one coloured shape, a short tone, and one of three
questions, a third each:

- "what colour is the shape?"   -> red / green / blue / yellow
- "what shape is it?"           -> circle / square / triangle
- "how high is the sound?"      -> low / middle / high

The answer is one of those 10 words. The question alone narrows the answer to
its group (chance within it); the image answers two questions, the audio the
third: the task needs text, image and audio, so every module of `audio_coca`
matters, and small models from scratch learn it in a few hundred steps because
each answer is read off one property of the input.

- Images: one shape spanning 45-60% of the side near the centre, on a dark
  background, plus noise; normalised with open_clip's OpenAI mean and std.
- Audio: a sine tone at one of three pitches (300, 700, 1500 Hz, far apart on
  the mel scale; +-4% jitter), random phase and loudness, plus white noise.
- Text: open_clip's tokenizer.

The same seed gives the same tensors; splits draw from independent streams.
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
PITCHES = ("low", "middle", "high")
PITCH_HZ = (300.0, 700.0, 1500.0)
ANSWERS = COLOURS + SHAPES + PITCHES
QUESTIONS = ("what colour is the shape?", "what shape is it?", "how high is the sound?")
COLOUR, SHAPE, PITCH = 0, 1, 2  # question kinds
_RGB = np.array([[0.90, 0.12, 0.12], [0.12, 0.80, 0.20], [0.15, 0.30, 0.95], [0.95, 0.88, 0.12]],
                dtype=np.float32)
SPLITS = ("train", "val", "test")


class SyntheticAudioVisual(Task):
    """Audio-visual questions: image + tone + question (colour, shape or pitch) -> one of 10 answers."""

    num_outputs = len(ANSWERS)

    def __init__(self, *, image_size: int = 32, context_length: int = 16, sample_rate: int = 16_000,
                 duration: float = 0.25, train_size: int = 6_000, val_size: int = 500, test_size: int = 1_000,
                 seed: int = 0) -> None:
        if image_size < 8 or context_length < 2:
            raise ValueError(f"need image_size >= 8 and context_length >= 2, got {image_size}, {context_length}")
        if sample_rate < 2 * max(PITCH_HZ) * 1.05:
            raise ValueError(f"sample_rate {sample_rate} Hz cannot carry a {max(PITCH_HZ)} Hz tone; use >= 3_200")
        if min(train_size, val_size, test_size) < 0 or seed < 0:
            raise ValueError("split sizes and seed must be >= 0")
        self.image_size, self.context_length = int(image_size), int(context_length)
        self.sample_rate, self.duration = int(sample_rate), float(duration)
        self.sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}
        self.seed = int(seed)
        self._splits: dict[str, dict[str, torch.Tensor]] = {}

    # -- Task ---------------------------------------------------------------

    def batches(self, split: str, batch_size: int, *, shuffle: bool, seed: int) -> Iterator[Batch]:
        data = self.split(split)
        n = data["label"].shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield {k: data[k][idx] for k in ("image", "audio", "text", "label")}

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits, batch["label"])

    def metric(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        return {"correct": float((logits.argmax(-1) == batch["label"]).sum()), "count": float(batch["label"].numel())}

    def summarize(self, totals: Mapping[str, float]) -> dict[str, float]:
        count = float(totals.get("count", 0.0))
        return {"accuracy": float(totals["correct"]) / count if count else float("nan")}

    def fingerprint(self) -> dict:
        """Equal fingerprints give identical data (keys OPTIMA's teacher cache)."""
        return {"task": "synthetic_av_qa", "image_size": self.image_size, "context_length": self.context_length,
                "sample_rate": self.sample_rate, "duration": self.duration, **self.sizes, "seed": self.seed}

    # -- generation -----------------------------------------------------------

    def split(self, split: str) -> dict[str, torch.Tensor]:
        """All tensors of a split (image, audio, text, label) and the scene record
        (colour, shape, pitch, question: integer tensors)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if split not in self._splits:
            self._splits[split] = self._generate(split)
        return self._splits[split]

    def questions(self, split: str) -> list[tuple[str, str]]:
        """(question, answer) of each example, for inspection."""
        data = self.split(split)
        return [(QUESTIONS[q], ANSWERS[a]) for q, a in zip(data["question"].tolist(), data["label"].tolist())]

    def _generate(self, split: str) -> dict[str, torch.Tensor]:
        n = self.sizes[split]
        rng = np.random.default_rng([self.seed, SPLITS.index(split), 0xA0])
        colour = rng.integers(0, len(COLOURS), n)
        shape = rng.integers(0, len(SHAPES), n)
        pitch = rng.integers(0, len(PITCHES), n)
        question = rng.permutation(np.arange(n) % len(QUESTIONS))
        answer = np.select([question == COLOUR, question == SHAPE],
                           [colour, len(COLOURS) + shape], len(COLOURS) + len(SHAPES) + pitch)
        record = {"colour": colour, "shape": shape, "pitch": pitch, "question": question}
        return {"image": _draw(rng, colour, shape, self.image_size),
                "audio": _tones(rng, pitch, self.sample_rate, int(self.sample_rate * self.duration)),
                "text": _tokenize([QUESTIONS[q] for q in question], self.context_length),
                "label": torch.from_numpy(answer.astype(np.int64)),
                **{k: torch.from_numpy(v.astype(np.int64)) for k, v in record.items()}}


def _draw(rng: np.random.Generator, colour: np.ndarray, shape: np.ndarray, size: int) -> torch.Tensor:
    """One shape per image: normalised `(n, 3, size, size)` float32."""
    n = colour.shape[0]
    half = rng.uniform(0.225, 0.30, n) * size
    cx, cy = (size / 2 + rng.uniform(-0.06, 0.06, (2, n)) * size)
    xs = np.arange(size, dtype=np.float32) + 0.5
    dx = xs[None, None, :] - cx[:, None, None]
    dy = xs[None, :, None] - cy[:, None, None]
    h = half[:, None, None]
    t = (dy + h) / (2 * h)  # triangle: apex up, widening to h at the base
    masks = np.stack([dx * dx + dy * dy <= h * h,
                      (np.abs(dx) <= 0.9 * h) & (np.abs(dy) <= 0.9 * h),
                      (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)])[shape, np.arange(n)]
    rgb = _RGB[colour] + rng.uniform(-0.05, 0.05, (n, 3)).astype(np.float32)
    background = rng.uniform(0.0, 0.12, n).astype(np.float32)
    img = np.where(masks[:, None], rgb[:, :, None, None], background[:, None, None, None])
    img = np.clip(img + (rng.random(img.shape, dtype=np.float32) - 0.5) * 0.1, 0.0, 1.0)
    mean = np.array(OPENAI_DATASET_MEAN, dtype=np.float32)[None, :, None, None]
    std = np.array(OPENAI_DATASET_STD, dtype=np.float32)[None, :, None, None]
    return torch.from_numpy(((img - mean) / std).astype(np.float32))


def _tones(rng: np.random.Generator, pitch: np.ndarray, sample_rate: int, samples: int) -> torch.Tensor:
    """Sine tones `(n, samples)` float32 at `PITCH_HZ[pitch]` +-4%, random phase and
    loudness, plus white noise."""
    n = pitch.shape[0]
    hz = (np.asarray(PITCH_HZ)[pitch] * rng.uniform(0.96, 1.04, n)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    amplitude = rng.uniform(0.3, 1.0, n).astype(np.float32)
    t = np.arange(samples, dtype=np.float32) / np.float32(sample_rate)
    wave = amplitude[:, None] * np.sin(np.float32(2 * np.pi) * hz[:, None] * t[None, :] + phase[:, None])
    wave += rng.standard_normal(wave.shape, dtype=np.float32) * np.float32(0.05)
    return torch.from_numpy(wave)


@lru_cache(maxsize=None)
def _tokenizer(context_length: int) -> SimpleTokenizer:
    return SimpleTokenizer(context_length=context_length)


def _tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    if not texts:
        return torch.zeros(0, context_length, dtype=torch.long)
    unique = sorted(set(texts))  # 3 distinct questions: tokenise each once
    rows = dict(zip(unique, _tokenizer(context_length)(unique)))
    return torch.stack([rows[t] for t in texts]).long()
