"""Shared pieces of the real vision-language tasks (SNLI-VE, VQA v2, NLVR2, COCO captions).

- Images are read with PIL and go through open_clip's own transforms
  (`open_clip.image_transform`, OpenAI mean/std): on the train split, when
  `augment` is on, its random-resized-crop (scale 0.9-1.0); otherwise resize +
  centre crop. The random crop draws from torch's global generator, which is
  seeded per batch (from the `batches` seed) inside `torch.random.fork_rng`, so a
  given seed always gives the same tensors and the caller's generator is left
  alone. Batches are made by `torch.utils.data.DataLoader` worker processes
  (`VLTask.batch_source`, see `optima.data`); in the training process itself
  (no workers) files are decoded in a small thread pool (`load_threads`). The
  transforms run in order in the process that makes the batch, which keeps
  them deterministic.
- The transforms' PIL stages (resize, crop) run where the batch is made and
  give uint8 pixels; their last two stages, ToTensor and Normalize, run on the
  whole batch where it is used (`normalize_images`, bit for bit the same
  values), on the device that trains: a batch crosses from a worker process
  through shared memory, pinning and the host-to-device copy as a quarter of
  float32's bytes (`VLPass.packed_shard`, `VLPass.unpack`).
- Text goes through open_clip's bundled BPE tokenizer (`SimpleTokenizer`: the
  vocabulary ships inside the package, nothing is fetched): start-of-text,
  tokens, end-of-text, zero padding, truncated to `context_length` (the last
  kept token is then end-of-text).
- A task parses its annotation files once per split into an in-memory list of
  `Record`s (paths and strings only, small); images are loaded lazily, per
  batch. A pass (`VLPass`) shuffles with a `torch.Generator`, draws one seed
  per batch up front and includes the last partial batch; so batch k can be
  made alone, by any worker, and `batches_from` (a resumed run) starts at a
  given batch without reading the images of those before it.
- A missing file raises `optima.errors.ConfigError` naming the path and the gin
  binding to set; `missing_paths()` lists the expected-but-absent files and
  folders without raising and without parsing anything. An annotation file that
  is not UTF-8 or not JSON is a `ConfigError` naming the file and line.
- A damaged image (not an image, truncated) must not end a run hours in:
  `read_record`, called per record by whatever makes the batch, leaves the
  record out and the batch lists why under `skipped_records` (the engine warns
  once per file and counts them in the run's summary). With `<task>.strict =
  True` it is a `ConfigError` naming the file instead.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer

from optima.errors import ConfigError
from optima.interfaces import SKIPPED_RECORDS, Batch, BatchSource, Task, shard_rows

SPLITS = ("train", "val", "test")
PAD_ID = 0  # open_clip's tokenizer pads with 0 (CoCa's `pad_id`)


# -- text -----------------------------------------------------------------


class Tokenizer:
    """open_clip's `SimpleTokenizer` (bundled BPE, 49,408 tokens), offline."""

    def __init__(self, context_length: int):
        if context_length < 2:
            raise ConfigError(f"context_length must be at least 2 (start and end of text), got {context_length}")
        self.context_length = int(context_length)
        self._tok = SimpleTokenizer(context_length=self.context_length)
        self.sot_token_id = int(self._tok.sot_token_id)
        self.eot_token_id = int(self._tok.eot_token_id)
        self.pad_token_id = PAD_ID
        self.vocab_size = len(self._tok.encoder)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """`(N, context_length)` int64 token ids."""
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return self._tok(list(texts)).long()

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids, without start/end-of-text and padding (stops at end-of-text)."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eot_token_id:
                break
            if i not in (self.sot_token_id, self.pad_token_id):
                out.append(i)
        return self._tok.decode(out).strip()


_NON_WORD = re.compile(r"[^\w\s]|_")


def simple_tokenize(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: the tokenisation used for
    CIDEr here, in place of coco-caption's Java PTB tokenizer (which also splits
    off punctuation; on lowercased COCO captions the two differ only in rare
    cases such as "1/2" or hyphenated words)."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


# -- images ---------------------------------------------------------------


def image_transforms(image_size: int):
    """open_clip's (train, eval) transforms with the OpenAI mean/std CoCa uses,
    each without its last two stages, ToTensor and Normalize: those are
    `normalize_images`, done on whole batches where they are used."""
    import open_clip
    from torchvision.transforms import Compose, Normalize, ToTensor

    out = []
    for is_train in (True, False):
        transform = open_clip.image_transform(image_size, is_train=is_train, mean=OPENAI_DATASET_MEAN,
                                              std=OPENAI_DATASET_STD)
        *pil_stages, to_tensor, normalize = transform.transforms
        if not (isinstance(to_tensor, ToTensor) and isinstance(normalize, Normalize)
                and tuple(normalize.mean) == tuple(OPENAI_DATASET_MEAN)
                and tuple(normalize.std) == tuple(OPENAI_DATASET_STD)):
            raise RuntimeError(f"open_clip's image transform no longer ends in ToTensor, Normalize (OpenAI "
                               f"mean/std), which vl_data.normalize_images stands for: {transform}")
        out.append(Compose(pil_stages))
    return tuple(out)


def normalize_images(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels `(..., 3, H, W)` -> float32 normalised with the OpenAI mean/std,
    on the tensor's device: open_clip's ToTensor and Normalize, the same
    operations in the same order (the same values on the CPU), on a whole batch."""
    mean, std = _mean_std(pixels.device)
    return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The OpenAI mean and std as `(3, 1, 1)` tensors on `device`, made once (a
    tensor made from a list on a GPU is a blocking copy)."""
    return tuple(torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(device)
                 for v in (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))


def _open_rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")  # convert() reads the pixels, so the file can close


def _chw(image) -> torch.Tensor:
    """An RGB PIL image as a `(3, H, W)` uint8 tensor (a view of a copy of its pixels)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


#: What PIL raises for a file it cannot decode (not an image, truncated, corrupt).
def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _decode_problem(e: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL knows"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# -- records and files ----------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One example: its image files, its text, its target (task specific) and extras."""

    images: tuple[str, ...]
    text: str
    target: Any = None
    meta: Mapping[str, Any] = field(default_factory=dict)


def _file_digest(path: str) -> str:
    """Size + hash of the first and last MiB: cheap on 300 MB annotation files and
    changes whenever the content is replaced by another release."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return f"{size}:{h.hexdigest()}"


def _is_blank(path: str) -> bool:
    """Empty or whitespace only (reads at most 4 KiB)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    return not head.strip() and os.path.getsize(path) <= len(head)


class VLTask(Task):
    """Base of the real tasks: lazy parsing, batching, image loading, file checks.

    A subclass sets `name` (its gin configurable, e.g. `snli_ve_task`) and
    `dataset` (a name for error messages), and implements `annotation_files`,
    `image_folders`, `_parse` and `_collate`.
    """

    name: str = "vl_task"
    dataset: str = "the data set"
    #: where the official files come from and how to lay them out (printed by `--dry-run`)
    sources: str = ""

    def __init__(self, *, data_dir: str, image_dir: str | None, image_size: int, context_length: int,
                 augment: bool, load_threads: int, strict: bool = False):
        if not data_dir:
            raise ConfigError(f"{self.name}.data_dir must be set (the folder holding the {self.dataset} files)")
        if image_size < 8:
            raise ConfigError(f"{self.name}.image_size must be at least 8, got {image_size}")
        if load_threads < 0:
            raise ConfigError(f"{self.name}.load_threads must be >= 0, got {load_threads}")
        self.data_dir = os.fspath(data_dir)
        self.image_dir = os.fspath(image_dir) if image_dir else self.default_image_dir()
        self.image_size = int(image_size)
        self.context_length = int(context_length)
        self.augment = bool(augment)
        self.load_threads = int(load_threads)
        self.strict = bool(strict)  # not in `config()`: it changes no result, only whether a bad file stops the run
        self.tokenizer = Tokenizer(self.context_length)
        self._records: dict[str, list[Record]] = {}
        self._transforms = None
        self._pool: ThreadPoolExecutor | None = None

    # -- to implement ------------------------------------------------------

    def default_image_dir(self) -> str:
        return self.data_dir

    @abc.abstractmethod
    def annotation_files(self, split: str) -> list[tuple[str, str]]:
        """`(path, binding)` of the files `split` is read from."""

    @abc.abstractmethod
    def image_folders(self) -> list[str]:
        """Folders the images are expected in (checked by `missing_paths`)."""

    @abc.abstractmethod
    def _parse(self, split: str) -> list[Record]:
        """Read `split`'s annotation files (they exist) into records."""

    @abc.abstractmethod
    def _collate(self, records: Sequence[Record], images: torch.Tensor, split: str,
                 generator: torch.Generator) -> dict[str, Any]:
        """One batch from `records` and `images`, their image files in order, already
        transformed `(N, 3, H, W)`; random choices (a caption) come from
        `generator`, which is seeded per batch."""

    # -- Task --------------------------------------------------------------

    def batch_source(self, split: str, batch_size: int, *, shuffle: bool, seed: int) -> "VLPass":
        return VLPass(self, split, batch_size, shuffle, seed)

    def batches(self, split: str, batch_size: int, *, shuffle: bool, seed: int) -> Iterator[Batch]:
        source = self.batch_source(split, batch_size, shuffle=shuffle, seed=seed)
        return (source.batch(k) for k in range(len(source)))

    def batches_from(self, split: str, batch_size: int, *, seed: int, start: int) -> Iterator[Batch]:
        # a resumed run skips the batches it saw without reading their images
        source = self.batch_source(split, batch_size, shuffle=True, seed=seed)
        return (source.batch(k) for k in range(start, len(source)))

    def make_batch(self, records: Sequence[Record], split: str, generator: torch.Generator) -> Batch:
        """The batch of `records`, packed (its `image` uint8 pixels, see `unpack`):
        each record's images read (`read_record`), a record with an unreadable image
        left out and its reason listed under `batch["skipped_records"]`, then
        `_collate`. Every record may be left out: the batch then has no rows."""
        # in a DataLoader worker the workers are the parallelism: read in order
        if self.load_threads > 1 and len(records) > 1 and get_worker_info() is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.load_threads, thread_name_prefix=f"{self.name}-images")
            read = list(self._pool.map(self.read_record, records))
        else:
            read = [self.read_record(r) for r in records]
        kept = [r for r, (_, why) in zip(records, read) if why is None]
        pil = [im for images, why in read if why is None for im in images]
        batch = self._collate(kept, self.transform_images(pil, split == "train", generator), split, generator)
        skipped = [why for _, why in read if why is not None]
        if skipped:
            batch[SKIPPED_RECORDS] = skipped
        return batch

    def unpack(self, batch: Batch) -> Batch:
        """A packed batch (`make_batch`), on any device, with its images normalised."""
        return {**batch, "image": normalize_images(batch["image"])}

    def read_record(self, record: Record) -> tuple[list, str | None]:
        """`(images, None)`: the record's images decoded (RGB PIL images); or `([],
        reason)` when one is not a readable image (random bytes, a text file, a
        truncated JPEG): the record is to be skipped, `reason` names the file. With
        `strict`, that is a `ConfigError` instead. A missing file is always a
        `ConfigError` (most likely `image_dir` is wrong)."""
        images = []
        for path in record.images:
            self.require(path, f"{self.name}.image_dir")
            try:
                images.append(_open_rgb(path))
            except _decode_errors() as e:
                reason = f"{path} is not a readable image ({_decode_problem(e)})"
                if self.strict:
                    raise ConfigError(f"{reason}; replace or remove it ({self.name}.strict = True; unbound, such "
                                      "a record is skipped with a warning)") from None
                return [], f"{reason}; its record is skipped ({self.name}.strict = True stops instead)"
        return images, None

    # -- helpers -----------------------------------------------------------

    def records(self, split: str) -> list[Record]:
        """The parsed records of `split` (parsed once, then cached)."""
        self._check_split(split)
        if split not in self._records:
            for path, binding in self.annotation_files(split):
                self.require(path, binding)
            records = self._parse(split)
            if not records:
                files = ", ".join(p for p, _ in self.annotation_files(split))
                raise ConfigError(f"{self.name}: the {split} split has no examples in {files}; "
                                  f"is this the complete official file?")
            self._records[split] = records
        return self._records[split]

    def check_data(self, splits: Sequence[str]) -> None:
        """The annotation files of `splits` exist and are not empty (nothing is parsed)."""
        for split in splits:
            self._check_split(split)
            for path, binding in self.annotation_files(split):
                self.require(path, binding)
                if os.path.isfile(path) and _is_blank(path):
                    raise ConfigError(f"{binding}: {path} is empty; the {split} split needs its examples "
                                      f"(download {self.dataset} again)")

    def size(self, split: str) -> int:
        return len(self.records(split))

    def missing_paths(self, splits: Sequence[str] = SPLITS) -> list[str]:
        """Expected files and folders that do not exist, in a stable order. Never
        raises for a missing file and parses nothing."""
        expected: list[str] = []
        for split in splits:
            self._check_split(split)
            expected += [p for p, _ in self.annotation_files(split)]
        expected += self.image_folders()
        seen: set[str] = set()
        out = []
        for p in expected:
            if p not in seen:
                seen.add(p)
                if not os.path.exists(p):
                    out.append(p)
        return out

    def fingerprint(self) -> dict[str, Any]:
        """Constructor arguments and a digest of each annotation file: equal
        fingerprints give identical batches (images are not hashed: too many)."""
        files = {}
        for split in SPLITS:
            for path, _ in self.annotation_files(split):
                files[os.path.abspath(path)] = _file_digest(path) if os.path.isfile(path) else None
        return {"task": self.name, **self.config(), "files": files}

    def config(self) -> dict[str, Any]:
        return {"data_dir": os.path.abspath(self.data_dir), "image_dir": os.path.abspath(self.image_dir),
                "image_size": self.image_size, "context_length": self.context_length, "augment": self.augment}

    def require(self, path: str, binding: str) -> None:
        """Raise a `ConfigError` naming `path` and the binding to fix if `path` is absent."""
        if not os.path.exists(path):
            value = getattr(self, binding.rsplit(".", 1)[-1], None)
            raise ConfigError(f"{binding}={value}: missing {path}; download {self.dataset} and set {binding}")

    def transform_images(self, pil: Sequence[Any], train: bool, generator: torch.Generator) -> torch.Tensor:
        """Decoded images -> `(N, 3, image_size, image_size)` uint8 pixels (the
        transforms' PIL stages; `normalize_images` does the rest); on the train
        split with `augment`, a random crop seeded from `generator`."""
        if self._transforms is None:
            self._transforms = image_transforms(self.image_size)
        out = torch.empty(len(pil), 3, self.image_size, self.image_size, dtype=torch.uint8)
        if not pil:
            return out
        if get_worker_info() is not None:  # made in shared memory, where it must go to reach the training process
            out.share_memory_()
        if train and self.augment:
            transform = self._transforms[0]
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for i, im in enumerate(pil):
                    out[i] = _chw(transform(im))
            return out
        for i, im in enumerate(pil):
            out[i] = _chw(self._transforms[1](im))
        return out

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None  # thread pools do not pickle
        return state


class VLPass(BatchSource):
    """One pass over a split of a `VLTask` (see `Task.batch_source`): the order and
    one seed per batch are drawn up front from `seed`, so batch `k` is the same
    whether or not batches `0..k-1` were made, in whatever process makes it.

    A shard (`shard(k, rank, world)`, a process's rows in a run of several) reads
    only its rows' images; its random choices (crops, a caption) come from the
    batch's seed and the rank, so they differ from the same rows of the whole
    batch (which a run of one process makes), while the examples are the same.
    """

    def __init__(self, task: VLTask, split: str, batch_size: int, shuffle: bool, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task, self.split, self.batch_size = task, split, int(batch_size)
        n = len(task.records(split))
        g = torch.Generator().manual_seed(int(seed))
        self.order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        n_batches = (n + batch_size - 1) // batch_size
        self.seeds = torch.randint(0, 2 ** 62, (n_batches,), generator=g)

    def __len__(self) -> int:
        return len(self.seeds)

    def _records(self, k: int) -> list[Record]:
        records = self.task.records(self.split)
        return [records[i] for i in self.order[k * self.batch_size:(k + 1) * self.batch_size].tolist()]

    def batch(self, k: int) -> Batch:
        return self.unpack(self.packed_shard(k, 0, 1))

    def shard(self, k: int, rank: int, world: int) -> Batch:
        return self.unpack(self.packed_shard(k, rank, world))

    def packed_shard(self, k: int, rank: int, world: int) -> Batch:
        records, seed = self._records(k), int(self.seeds[k])
        if world > 1:
            records, seed = records[shard_rows(len(records), rank, world)], seed + rank
        return self.task.make_batch(records, self.split, torch.Generator().manual_seed(seed))

    def unpack(self, batch: Batch) -> Batch:
        return self.task.unpack(batch)


# -- json -----------------------------------------------------------------


def _read_text(path: str, binding: str) -> str:
    """The file as UTF-8 text; a `ConfigError` naming the file and line otherwise."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{binding}: {path} line {line} is not UTF-8 text (byte {data[e.start]:#04x}); "
                          "is this the official file, complete and undamaged?") from None


def read_json(path: str, binding: str) -> Any:
    try:
        return json.loads(_read_text(path, binding))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{binding}: {path} line {e.lineno} is not valid JSON ({e.msg})") from None


def read_jsonl(path: str, binding: str) -> list[dict]:
    """One JSON object per non-empty line."""
    out = []
    for lineno, line in enumerate(_read_text(path, binding).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{binding}: {path} line {lineno} is not valid JSON ({e})") from None
    return out


def field_of(row: Mapping, key: str, path: str, where: str) -> Any:
    """`row[key]`, or a ConfigError naming the file and the record."""
    try:
        return row[key]
    except (KeyError, TypeError):
        raise ConfigError(f"{path}: {where} has no {key!r} field; is this the official file?") from None
