"""Tiny data sets in the official file formats of the real tasks (SNLI-VE, VQA v2,
NLVR2, COCO Karpathy), written by the tests that need them: task parsing
(test_tasks_real_formats.py), heads (test_heads.py) and the shipped paper
configs end to end (test_paper_tasks.py)."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from optima.plugins.tasks.vl_data import simple_tokenize


COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 30), (200, 200, 200), (20, 20, 20)]


def write_image(path: Path, k: int, size=(40, 30)) -> None:
    """A small image with a colour and a bar that depend on k (non-square: resize + crop run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, COLOURS[k % len(COLOURS)])
    for x in range(k % 5 * 6, k % 5 * 6 + 8):
        for y in range(size[1]):
            im.putpixel((x, y), (255 - 40 * (k % 6), 128, 40 * (k % 6)))
    im.save(path, quality=95)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -- tiny data sets of the official formats -------------------------------------


def make_snli_ve(root: Path) -> Path:
    imgs = root / "flickr30k_images"
    for k in range(4):
        write_image(imgs / f"{1000 + k}.jpg", k)
    train = [
        {"Flikr30kID": "1000.jpg", "sentence2": "A red wall.", "gold_label": "entailment", "pairID": "1"},
        {"Flikr30kID": "1001.jpg", "sentence2": "A man sleeps.", "gold_label": "neutral", "pairID": "2"},
        {"Flikr30kID": "1002.jpg", "sentence2": "Nothing is blue.", "gold_label": "contradiction", "pairID": "3"},
        {"Flikr30kID": "1003.jpg", "sentence2": "Unclear.", "gold_label": "-", "pairID": "4"},  # skipped
        {"Flikr30kID": "1003", "sentence2": "A yellow wall.", "gold_label": "entailment", "pairID": "5"},
    ]
    write_jsonl(root / "snli_ve_train.jsonl", train)
    write_jsonl(root / "snli_ve_dev.jsonl", train[:2])
    write_jsonl(root / "snli_ve_test.jsonl", train[2:3])
    return root


def _answers(*pairs):
    """10 human answers from (answer, count) pairs."""
    out = [a for a, n in pairs for _ in range(n)]
    assert len(out) == 10
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(out)]


def make_vqa(root: Path) -> Path:
    root.mkdir(parents=True)
    train_q = [
        {"image_id": 9, "question": "What color is the wall?", "question_id": 90},
        {"image_id": 9, "question": "How many bars?", "question_id": 91},
        {"image_id": 12, "question": "Is it sunny?", "question_id": 120},
        {"image_id": 12, "question": "What is it?", "question_id": 121},
    ]
    train_a = [
        {"question_id": 90, "image_id": 9, "multiple_choice_answer": "red",
         "answers": _answers(("red", 3), ("Red.", 2), ("pink", 2), ("orange", 1), ("dark red", 2))},
        {"question_id": 91, "image_id": 9, "multiple_choice_answer": "one",
         "answers": _answers(("1", 4), ("one", 4), ("2", 2))},
        {"question_id": 120, "image_id": 12, "multiple_choice_answer": "yes",
         "answers": _answers(("yes", 9), ("no", 1))},
        {"question_id": 121, "image_id": 12, "multiple_choice_answer": "red",
         "answers": _answers(("a wall", 1), ("zebra", 3), ("red", 6))},
    ]
    val_q = [{"image_id": 7, "question": "Is it raining?", "question_id": 70},
             {"image_id": 7, "question": "What animal?", "question_id": 71}]
    val_a = [{"question_id": 70, "image_id": 7, "multiple_choice_answer": "no",
              "answers": _answers(("no", 2), ("yes", 8))},
             {"question_id": 71, "image_id": 7, "multiple_choice_answer": "giraffe",
              "answers": _answers(("giraffe", 10))}]
    for split, qs, anns in (("train2014", train_q, train_a), ("val2014", val_q, val_a)):
        (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(
            {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split,
             "questions": qs}))
        (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps(
            {"info": {}, "data_subtype": split, "annotations": anns}))
        for k, image_id in enumerate(sorted({q["image_id"] for q in qs})):
            write_image(root / split / f"COCO_{split}_{image_id:012d}.jpg", image_id)
    return root


def make_nlvr2(root: Path) -> Path:
    train = [
        {"identifier": "train-10-0-0", "directory": "3", "sentence": "Both images show red.", "label": "True"},
        {"identifier": "train-10-0-1", "directory": "3", "sentence": "One image is blue.", "label": "False"},
        {"identifier": "train-11-1-0", "directory": "7", "sentence": "There are two walls.", "label": "True"},
    ]
    dev = [{"identifier": "dev-850-0-0", "sentence": "The left image is green.", "label": "False"},
           {"identifier": "dev-850-0-1", "sentence": "Both images have a bar.", "label": "True"}]
    test = [{"identifier": "test1-5-2-0", "sentence": "A dog.", "label": "False"}]
    write_jsonl(root / "train.json", train)
    write_jsonl(root / "dev.json", dev)
    write_jsonl(root / "test1.json", test)
    paths = {"images/train/3/train-10-0", "images/train/7/train-11-1", "images/dev/dev-850-0",
             "images/test1/test1-5-2"}
    for k, stem in enumerate(sorted(paths)):
        for i in range(2):
            write_image(root / f"{stem}-img{i}.png", 2 * k + i)
    return root


def make_coco(root: Path) -> Path:
    root.mkdir(parents=True)
    def image(n, split, filepath, caps):
        return {"filepath": filepath, "filename": f"COCO_{filepath}_{n:012d}.jpg", "split": split,
                "cocoid": n, "imgid": n, "sentids": [],
                "sentences": [{"raw": c, "tokens": simple_tokenize(c).split(), "imgid": n} for c in caps]}

    images = [
        image(1, "train", "train2014", ["A red wall.", "A wall painted red.", "Red paint on a wall."]),
        image(2, "restval", "val2014", ["A green field.", "Green grass, nothing else."]),
        image(3, "train", "train2014", ["A blue sky.", "The sky is blue."]),
        image(4, "val", "val2014", ["A yellow wall.", "Yellow paint."]),
        image(5, "test", "val2014", ["A grey square.", "A gray block.", "Something grey."]),
        image(6, "test", "val2014", ["A black box.", "Darkness."]),
    ]
    (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    for k, im in enumerate(images):
        write_image(root / im["filepath"] / im["filename"], k)
    return root


# -- the shipped paper configs, shrunk to run in seconds ---------------------------

#: task -> (its shipped experiment file, the task's gin configurable, the data maker)
PAPER_TASKS = {
    "snlive": ("gin/snlive_tiny12.gin", "snli_ve_task", make_snli_ve),
    "vqa": ("gin/vqa_tiny12.gin", "vqa_task", make_vqa),
    "nlvr2": ("gin/nlvr2_tiny12.gin", "nlvr2_task", make_nlvr2),
    "coco": ("gin/coco_tiny12.gin", "coco_captions_task", make_coco),
}


def tiny_coca_macro() -> str:
    """`TINY_COCA = {...}` from gin/common/tiny_coca.gin, as one -b binding."""
    text = (Path(__file__).resolve().parent.parent / "gin" / "common" / "tiny_coca.gin").read_text()
    return " ".join(line.split("#")[0].strip() for line in text.splitlines() if not line.startswith("#"))


def tiny_paper_bindings(task: str, data_dir: Path) -> list[str]:
    """Bindings that run a shipped `gin/<task>_tiny12.gin` on the files `data_dir`
    holds: tiny random CoCas instead of the checkpoints, a few steps on the CPU.
    Everything else (task, head, policy, reward, loss, optimizers) stays as shipped."""
    configurable = PAPER_TASKS[task][1]
    return [
        tiny_coca_macro(),
        "teacher/coca_model.arch = %TINY_COCA", "teacher/coca_model.pretrained = None",
        "teacher/coca_model.layers = (2, 2, 2)",
        "tiny12/coca_model.arch = %TINY_COCA", "tiny12/coca_model.init_from = None",
        "tiny12/coca_model.layers = (1, 1, 1)",
        f"{configurable}.data_dir = '{data_dir}'", f"{configurable}.image_size = 32",
        f"{configurable}.context_length = 16", f"{configurable}.load_threads = 0",
        "experiment.device = 'cpu'", "experiment.eval_batch_size = 4",
        "teacher_training.steps = 2", "teacher_training.batch_size = 2", "teacher_training.warmup_steps = 0",
        "teacher_training.amp = False",
        "distillation.rounds = 2", "distillation.steps_per_round = 1", "distillation.batch_size = 2",
        "distillation.warmup_steps = 0", "distillation.amp = False",
    ]
