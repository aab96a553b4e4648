"""The synthetic world written out in the real data sets' official file layouts
and formats (`optima data synth`), so that the paper's configs
(`gin/{snlive,vqa,nlvr2,coco}_*.gin`) run with their real loaders and decoders
(`plugins/tasks/{snli_ve,vqa,nlvr2,coco_captions}.py`) before anything is
downloaded: bind the task's `data_dir` to the folder written here.

| task | layout written (as the official release) |
|---|---|
| `snlive` | `snli_ve_{train,dev,test}.jsonl`, `flickr30k_images/<id>.jpg` |
| `vqa` | `v2_OpenEnded_mscoco_{train2014,val2014}_questions.json`, `v2_mscoco_{...}_annotations.json`, `{split}/COCO_{split}_<id:012d>.jpg` |
| `nlvr2` | `train.json`, `dev.json`, `test1.json` (JSON lines), `images/train/<dir>/<stem>-img{0,1}.png`, `images/{dev,test1}/...` |
| `coco` | `dataset_coco.json` (Karpathy's split file: train, restval, val, test), `{train2014,val2014}/COCO_..._<id:012d>.jpg` |

The examples are the world tasks' (`tasks.py`: `world_ve_task`, `world_vqa_task`,
`world_nlvr2_task`, `world_captions_task` with the same seed and image size):
the same scenes, texts and labels, drawn block by block with their generators;
the images are drawn again from each block's generator after the texts, in
chunks of `RENDER_CHUNK` scenes so that 224 px images of a large split need
little memory (so their noise differs from the world task's in-memory images).
JPEGs at quality 90 (PNG for NLVR2, as its file names say), square images of
`image_size` px. The same arguments give the same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from optima.errors import ConfigError
from optima.plugins.tasks.synthetic_world import tasks as world
from optima.plugins.tasks.synthetic_world.world import BLOCK, block_rng, object_name, stream_key

#: Task names (the prefixes of the paper's gin files) -> (what the folder holds, the task's gin configurable).
TASKS = {
    "snlive": ("SNLI-VE", "snli_ve_task"),
    "vqa": ("VQA v2", "vqa_task"),
    "nlvr2": ("NLVR2", "nlvr2_task"),
    "coco": ("COCO captions, Karpathy split", "coco_captions_task"),
}
RENDER_CHUNK = 32  # scenes rendered at a time: (32, 3, 224, 224) float32 masks are ~20 MB each
JPEG_QUALITY = 90
RECORD = "optima_synth.json"  # what made the folder (not an official file; the loaders do not read it)


def synthesize(task: str, out: str | os.PathLike, size: int, image_size: int = 224, seed: int = 0,
               eval_size: int | None = None, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write `task`'s files into the new (or empty) folder `out`: `size` training
    examples, `eval_size` (default `max(1, size // 5)`) in each evaluation split.
    Returns what was written (also saved as `out/optima_synth.json`). The files
    are made in a temporary folder beside `out` and moved into place at the end,
    so a failure leaves `out` as it was."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    eval_size = max(1, size // 5) if eval_size is None else eval_size
    for name, value, least in (("--size", size, 1), ("--eval-size", eval_size, 1), ("--image-size", image_size, 8),
                               ("--seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; give a new or empty folder (nothing there is overwritten)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.synth-", dir=out.parent))
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e}); give a folder you can write") from None
    try:
        writer = _WRITERS[task](work, image_size, seed, on_progress or (lambda _: None))
        counts = writer.write({"train": size, "val": eval_size, "test": eval_size})
        record = {"task": task, "dataset": TASKS[task][0], "examples": counts, "image_size": image_size,
                  "seed": seed, "world": writer.world_config, "configurable": TASKS[task][1]}
        (work / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above): the finished folder takes its place
        os.replace(work, out)
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a folder made read-only meanwhile: one line, nothing left behind
            raise ConfigError(f"--out {out}: writing the data set failed ({e.strerror or e}); nothing was "
                              "written") from None
        raise
    return record


# -- writing ---------------------------------------------------------------------------


def _save_image(pixels: np.ndarray, path: Path) -> None:
    """A `(3, H, W)` uint8 image as JPEG (or PNG, by `path`'s extension)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")
    if path.suffix == ".png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=JPEG_QUALITY)


def _json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, sort_keys=True) + "\n")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


class _Writer:
    """One task's files: `examples(split, n)` yields the world task's examples
    (texts, targets, extras, rendered images) block by block; subclasses write
    them in the official layout."""

    world_task: type[world.WorldTask]

    def __init__(self, root: Path, image_size: int, seed: int, progress: Callable[[str], None]):
        self.root, self.seed, self.progress = root, seed, progress
        # the world task's defaults but the image size; sizes are given per split in `examples`
        self.task = self.world_task(image_size=image_size, seed=seed, train_size=0, val_size=0, test_size=0)
        self.world_config = self.task.world.config()

    def examples(self, split: str, n: int) -> Iterator[tuple[int, Any, Any, dict, list[np.ndarray], list[list]]]:
        """`(index, text, target, extra, images, objects)` of the split's first `n`
        examples; per image of the example, `images` a `(3, H, W)` uint8 array and
        `objects` its scene's objects (`Scenes.objects`)."""
        key = stream_key(self.seed, self.task.stream, split)
        done = 0
        for b in range(-(-n // BLOCK)):
            rng = block_rng(key, b)
            block = self.task._generate_block(rng, BLOCK)
            m = min(BLOCK, n - done)
            for start in range(0, m, RENDER_CHUNK):
                rows = np.arange(start, min(m, start + RENDER_CHUNK))
                images = [self.task.world.render(rng, scenes.take(rows)) for scenes in block["scenes"]]
                for j, i in enumerate(rows.tolist()):
                    extra = {k: v[i] for k, v in block.get("extra", {}).items()}
                    yield (done + i, block["texts"][i], block["target"][i], extra, [im[j] for im in images],
                           [scenes.objects(i) for scenes in block["scenes"]])
            done += m
            self.progress(f"{split}: {done}/{n} examples")

    def write(self, sizes: dict[str, int]) -> dict[str, int]:
        raise NotImplementedError


class _SnliVe(_Writer):
    """SNLI-VE: one Flickr30k-style image per hypothesis; `sentence1` (the
    premise caption SNLI-VE keeps from SNLI) is a caption of the scene."""

    world_task = world.WorldEntailment
    FILES = {"train": "snli_ve_train.jsonl", "val": "snli_ve_dev.jsonl", "test": "snli_ve_test.jsonl"}
    FIRST_ID = {"train": 1_000_000_000, "val": 2_000_000_000, "test": 3_000_000_000}  # distinct across splits

    def write(self, sizes):
        from optima.plugins.tasks.snli_ve import LABELS

        for split, n in sizes.items():
            rows = []
            for i, text, label, _, (image,), objects in self.examples(split, n):
                flickr = f"{self.FIRST_ID[split] + i}.jpg"
                _save_image(image, self.root / "flickr30k_images" / flickr)
                gold = LABELS[int(label)]
                rows.append({"Flikr30kID": flickr, "captionID": f"{flickr}#0", "pairID": f"{flickr}#0r1{gold[0]}",
                             "gold_label": gold, "annotator_labels": [gold], "sentence2": text,
                             "sentence1": " and ".join(f"a {object_name(*o[:3])}" for o in objects[0][:3])})
            _jsonl(self.root / self.FILES[split], rows)
        return {self.FILES[s].removeprefix("snli_ve_").removesuffix(".jsonl"): n for s, n in sizes.items()}


class _Vqa(_Writer):
    """VQA v2: one question per COCO-style image, the 10 simulated annotators'
    answers; train -> train2014, val and test -> val2014 (as `vqa_task` reads
    them: the official test answers are not public), so val2014 holds
    `eval_size` questions."""

    world_task = world.WorldVqa
    ANSWER_TYPES = {"yesno": "yes/no", "count": "number"}

    def write(self, sizes):
        import collections

        written = {}
        for split, name, first_id in (("train", "train2014", 1), ("val", "val2014", 1_000_000)):
            questions, annotations = [], []
            for i, text, _, extra, (image,), _ in self.examples(split, sizes[split]):
                image_id = first_id + i
                question_id = image_id * 1000  # COCO's: the image id and a question number
                _save_image(image, self.root / name / f"COCO_{name}_{image_id:012d}.jpg")
                human = [str(a) for a in extra["human"]]
                questions.append({"image_id": image_id, "question": text + "?", "question_id": question_id})
                annotations.append({
                    "question_id": question_id, "image_id": image_id,
                    "question_type": " ".join(text.split()[:2]),
                    "answer_type": self.ANSWER_TYPES.get(extra["kind"], "other"),
                    "multiple_choice_answer": collections.Counter(human).most_common(1)[0][0],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                for k, a in enumerate(human)]})
            info = {"description": "the OPTIMA synthetic world in VQA v2's format", "version": "2.0"}
            _json(self.root / f"v2_OpenEnded_mscoco_{name}_questions.json",
                  {"info": info, "license": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                   "data_subtype": name, "questions": questions})
            _json(self.root / f"v2_mscoco_{name}_annotations.json",
                  {"info": info, "license": {}, "data_subtype": name, "annotations": annotations})
            written[name] = len(questions)
        return written


class _Nlvr2(_Writer):
    """NLVR2: one sentence per image pair; train images in 100 sub-folders
    (`directory`), dev and test1 in one folder each, PNG as the official names."""

    world_task = world.WorldNlvr2
    FILES = {"train": "train", "val": "dev", "test": "test1"}

    def write(self, sizes):
        for split, n in sizes.items():
            name, rows = self.FILES[split], []
            for i, text, label, _, images, _ in self.examples(split, n):
                stem = f"{name}-{i}-0"
                row = {"identifier": f"{stem}-0", "sentence": text, "label": "True" if int(label) else "False"}
                folder = self.root / "images" / name
                if split == "train":
                    row["directory"] = str(i % 100)
                    folder = folder / row["directory"]
                for k, image in enumerate(images):
                    _save_image(image, folder / f"{stem}-img{k}.png")
                rows.append(row)
            _jsonl(self.root / f"{name}.json", rows)
        return {self.FILES[s]: n for s, n in sizes.items()}


class _Coco(_Writer):
    """COCO captions, Karpathy split: the world's 5 references per image; the
    last eighth of the training images are Karpathy's `restval` (val2014
    images trained on), val and test are val2014 images."""

    world_task = world.WorldCaptions

    def write(self, sizes):
        from optima.plugins.tasks.vl_data import simple_tokenize

        images, sentence_id = [], 0
        restval_from = sizes["train"] - sizes["train"] // 8
        for split, first_id in (("train", 1), ("val", 1_000_000), ("test", 2_000_000)):
            for i, refs, _, _, (image,), _ in self.examples(split, sizes[split]):
                karpathy = "restval" if split == "train" and i >= restval_from else split
                folder = "train2014" if karpathy == "train" else "val2014"
                cocoid = first_id + i
                filename = f"COCO_{folder}_{cocoid:012d}.jpg"
                _save_image(image, self.root / folder / filename)
                sentences = []
                for ref in refs:
                    raw = ref[0].upper() + ref[1:] + "."
                    sentences.append({"raw": raw, "tokens": simple_tokenize(raw).split(), "imgid": len(images),
                                      "sentid": sentence_id})
                    sentence_id += 1
                images.append({"filepath": folder, "filename": filename, "split": karpathy, "cocoid": cocoid,
                               "imgid": len(images), "sentids": [s["sentid"] for s in sentences],
                               "sentences": sentences})
        _json(self.root / "dataset_coco.json", {"dataset": "coco", "images": images})
        return {k: sum(im["split"] == k for im in images) for k in ("train", "restval", "val", "test")}


_WRITERS: dict[str, type[_Writer]] = {"snlive": _SnliVe, "vqa": _Vqa, "nlvr2": _Nlvr2, "coco": _Coco}

__all__ = ["TASKS", "synthesize"]
