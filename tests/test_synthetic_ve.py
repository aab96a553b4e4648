"""Tests of the built-in synthetic visual-entailment task (optima.plugins.tasks.synthetic_ve)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer

from optima.errors import ConfigError
from optima.interfaces import Task
from optima.plugins.tasks.synthetic_ve import (ATTRIBUTES, COLOURS, LABELS, SHAPES, SPLITS,
                                         SyntheticVisualEntailment, _RGB)

SMALL = dict(train_size=1500, val_size=300, test_size=600)
HYPOTHESIS = re.compile(
    r"^there is a (?:(?P<attr>%s) )?(?P<colour>%s) (?P<shape>%s)(?: on the (?P<side>left|right))?\.$"
    % ("|".join(ATTRIBUTES), "|".join(COLOURS), "|".join(SHAPES)))


@pytest.fixture(scope="module")
def task() -> SyntheticVisualEntailment:
    return SyntheticVisualEntailment(seed=3, **SMALL)


def _all(task: SyntheticVisualEntailment, split: str) -> dict[str, torch.Tensor]:
    data = task._split(split)
    return {"image": data.image, "text": data.text, "label": data.label}


def test_is_a_task_with_three_outputs(task):
    assert isinstance(task, Task)
    assert task.num_outputs == 3
    assert LABELS == ("entailment", "neutral", "contradiction")


def test_shapes_and_dtypes(task):
    for split in SPLITS:
        n = SMALL[f"{split}_size"]
        d = _all(task, split)
        assert d["image"].shape == (n, 3, 32, 32) and d["image"].dtype == torch.float32
        assert d["text"].shape == (n, 16) and d["text"].dtype == torch.long
        assert d["label"].shape == (n,) and d["label"].dtype == torch.long
        assert set(d["label"].tolist()) == {0, 1, 2}
        assert torch.isfinite(d["image"]).all()


def test_other_sizes():
    t = SyntheticVisualEntailment(image_size=48, context_length=24, train_size=10, val_size=0,
                                  test_size=7, seed=1)
    b = next(t.batches("train", 4, shuffle=False, seed=0))
    assert b["image"].shape == (4, 3, 48, 48) and b["text"].shape == (4, 24)
    assert list(t.batches("val", 4, shuffle=True, seed=0)) == []
    assert sum(len(b["label"]) for b in t.batches("test", 4, shuffle=True, seed=0)) == 7


def test_images_are_normalised_with_openai_stats(task):
    img = task._split("val").image
    mean = torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    raw = img * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # Dark background, bright shapes: both ends of [0, 1] occur.
    assert raw.min() < 0.05 and raw.max() > 0.85


def test_tokens_have_sot_eot_and_decode_to_the_hypothesis(task):
    tok = SimpleTokenizer(context_length=16)
    data = task._split("train")
    text = data.text
    assert (text[:, 0] == tok.sot_token_id).all()
    is_eot = text == tok.eot_token_id
    assert (is_eot.sum(1) == 1).all()
    eot_at = is_eot.int().argmax(1)
    after = torch.arange(text.shape[1])[None, :] > eot_at[:, None]
    assert (text[after] == 0).all() and (text[~after] != 0).all()
    for i in range(0, len(text), 97):
        row = text[i][1:eot_at[i]].tolist()
        assert tok.decode(row).replace(" ", "") == data.hypotheses[i].replace(" ", "")


def test_same_seed_same_data_different_seed_different_data(task):
    again = SyntheticVisualEntailment(seed=3, **SMALL)
    other = SyntheticVisualEntailment(seed=4, **SMALL)
    for split in SPLITS:
        a, b, c = _all(task, split), _all(again, split), _all(other, split)
        for key in ("image", "text", "label"):
            assert torch.equal(a[key], b[key]), (split, key)
        assert not torch.equal(a["image"], c["image"])
        assert not torch.equal(a["label"], c["label"])
        assert not torch.equal(a["text"], c["text"])


def test_splits_differ(task):
    d = {s: _all(task, s) for s in SPLITS}
    n = SMALL["val_size"]
    for s1, s2 in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not torch.equal(d[s1]["image"][:n], d[s2]["image"][:n])
        assert not torch.equal(d[s1]["label"][:n], d[s2]["label"][:n])
    # No image is shared between splits (noise alone makes that near impossible).
    keys = {s: set(d[s]["image"].flatten(1).sum(1).tolist()) for s in SPLITS}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]


def test_labels_are_balanced(task):
    for split in SPLITS:
        label = task._split(split).label
        frac = torch.bincount(label, minlength=3).double() / len(label)
        assert (frac - 1 / 3).abs().max() < 0.02, (split, frac)


def test_hypothesis_alone_is_not_enough(task):
    """Contradictions use both the observable and the attribute templates, so the
    text alone caps accuracy at about 2/3."""
    data = task._split("train")
    contra = [h for h, y in zip(data.hypotheses, data.label.tolist()) if y == 2]
    with_attr = sum(HYPOTHESIS.match(h).group("attr") is not None for h in contra) / len(contra)
    assert 0.4 < with_attr < 0.6
    # Best text-only rule: per distinct sentence template, predict its majority label.
    by_template: dict[tuple[bool, bool], list[int]] = {}
    for h, y in zip(data.hypotheses, data.label.tolist()):
        m = HYPOTHESIS.match(h)
        by_template.setdefault((m.group("attr") is not None, m.group("side") is not None), []).append(y)
    best = sum(max(ys.count(k) for k in range(3)) for ys in by_template.values()) / len(data.label)
    assert best < 0.72


def test_hypotheses_are_true_unverifiable_or_false_as_labelled(task):
    """Checks each hypothesis string against the scene record."""
    for split in SPLITS:
        n = task.size(split)
        for i in range(n):
            hyp, label = task.describe(i, split)
            scene = task.scene(i, split)
            m = HYPOTHESIS.match(hyp)
            assert m, hyp
            assert 1 <= len(scene) <= 2
            named = (m.group("colour"), m.group("shape"))
            present = {(c, s): pos for c, s, pos in scene}
            assert len(present) == len(scene)  # two objects never share colour and shape
            if len(scene) == 2:
                assert sorted(pos for _, _, pos in scene) == ["left", "right"]
            else:
                assert scene[0][2] == "middle"
            if label == "contradiction":
                assert named not in present, (hyp, scene)
            elif label == "neutral":
                assert named in present, (hyp, scene)
                assert m.group("attr") is not None and m.group("side") is None, hyp
            else:
                assert named in present, (hyp, scene)
                assert m.group("attr") is None, hyp
                if m.group("side") is not None:
                    assert present[named] == m.group("side"), (hyp, scene)


def _classify_pixels(raw: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) images in [0, 1] -> (N, H, W) nearest colour id, -1 for background."""
    rgb = torch.from_numpy(_RGB)
    dist = ((raw[:, None] - rgb[None, :, :, None, None]) ** 2).sum(2)  # (N, 4, H, W)
    cls = dist.argmin(1)
    dark = raw.max(1).values < 0.4
    return torch.where(dark, torch.full_like(cls, -1), cls).numpy()


def test_images_show_the_scene(task):
    """Each object's colour fills its region; its fill of the bounding box tells its shape."""
    data = task._split("test")
    mean = torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    size = data.image.shape[-1]
    classes = _classify_pixels(data.image * std + mean)
    fill_range = {"square": (0.9, 1.01), "circle": (0.68, 0.9), "triangle": (0.35, 0.68)}
    for i, cls in enumerate(classes):
        scene = task.scene(i, "test")
        if len(scene) == 2:
            # A background gap at the midline: each shape stays in its half.
            assert (cls[:, size // 2 - 1:size // 2 + 1] == -1).all(), i
        for colour, shape, pos in scene:
            region = {"left": cls[:, :size // 2], "right": cls[:, size // 2:], "middle": cls}[pos]
            ids = np.unique(region[region >= 0])
            assert len(ids) == 1 and COLOURS[int(ids[0])] == colour, (i, pos, ids)
            ys, xs = np.nonzero(region == ids[0])
            h, w = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
            # Large shapes: about 40-60% of the side (a square a bit less), give or
            # take the pixel that rasterisation adds or drops.
            assert 0.36 * size - 1 <= max(h, w) <= 0.6 * size + 1, (i, h, w)
            lo, hi = fill_range[shape]
            assert lo <= len(ys) / (h * w) < hi, (i, shape, len(ys) / (h * w))


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_the_split_exactly_once(task, shuffle):
    data = _all(task, "val")
    n = len(data["label"])
    bs = 64
    batches = list(task.batches("val", bs, shuffle=shuffle, seed=11))
    assert len(batches) == math.ceil(n / bs)
    assert [len(b["label"]) for b in batches] == [bs] * (n // bs) + ([n % bs] if n % bs else [])
    for b in batches:
        assert set(b) == {"image", "text", "label", "index"}
        assert len(b["image"]) == len(b["text"]) == len(b["label"]) == len(b["index"])
    got = {k: torch.cat([b[k] for b in batches]) for k in data}
    # A per-example key from the image; all examples have distinct keys.
    w = torch.randn(3 * 32 * 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    key = data["image"].flatten(1).double() @ w
    got_key = got["image"].flatten(1).double() @ w
    assert len(set(key.tolist())) == n
    order, got_order = key.argsort(), got_key.argsort()
    assert torch.equal(key[order], got_key[got_order])
    # The text and label travel with their image.
    assert torch.equal(data["text"][order], got["text"][got_order])
    assert torch.equal(data["label"][order], got["label"][got_order])
    # `index` is each example's place in the split (what its predictions are keyed by)
    index = torch.cat([b["index"] for b in batches])
    assert sorted(index.tolist()) == list(range(n))
    assert torch.equal(data["image"][index], got["image"])
    if shuffle:
        assert not torch.equal(got["image"], data["image"])
    else:
        assert torch.equal(got["image"], data["image"])


def test_shuffle_is_seeded(task):
    def labels(seed):
        return torch.cat([b["label"] for b in task.batches("train", 100, shuffle=True, seed=seed)])
    def first_images(seed):
        return next(task.batches("train", 100, shuffle=True, seed=seed))["image"]
    assert torch.equal(labels(5), labels(5))
    assert torch.equal(first_images(5), first_images(5))
    assert not torch.equal(first_images(5), first_images(6))


def test_batches_from_is_the_shuffled_pass_from_a_batch_on(task):
    """`Task.batches_from`'s default (what a resumed run reads): the same batches
    as the shuffled pass, from batch `start` on; empty past the end."""
    full = list(task.batches("val", 64, shuffle=True, seed=5))
    tail = list(task.batches_from("val", 64, seed=5, start=2))
    assert len(tail) == len(full) - 2
    for got, want in zip(tail, full[2:]):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert list(task.batches_from("val", 64, seed=5, start=len(full) + 3)) == []


def test_unknown_split_and_bad_batch_size(task):
    with pytest.raises(ValueError, match=r"train.*val.*test"):
        next(task.batches("validation", 8, shuffle=False, seed=0))
    with pytest.raises(ValueError):
        task.describe(0, "dev")
    with pytest.raises(ValueError):
        next(task.batches("train", 0, shuffle=False, seed=0))


def test_bad_constructor_args():
    with pytest.raises(ConfigError, match=r"^synthetic_ve_task.train_size = -1 must be an integer >= 0$"):
        SyntheticVisualEntailment(train_size=-1)
    with pytest.raises(ConfigError, match="synthetic_ve_task.seed = -2"):
        SyntheticVisualEntailment(seed=-2)
    with pytest.raises(ConfigError, match=r"synthetic_ve_task.image_size = 4 must be an integer >= 8"):
        SyntheticVisualEntailment(image_size=4)
    with pytest.raises(ConfigError, match=r"synthetic_ve_task.test_size = 0 must be >= 1: every run reads"):
        SyntheticVisualEntailment(test_size=0).check_data(("train", "test"))


def test_loss_metric_summarize(task):
    batch = next(task.batches("val", 50, shuffle=False, seed=0))
    label = batch["label"]
    perfect = F.one_hot(label, 3).float() * 10
    assert task.metric(perfect, batch) == {"correct": 50.0, "count": 50.0}
    wrong = F.one_hot((label + 1) % 3, 3).float() * 10
    assert task.metric(wrong, batch) == {"correct": 0.0, "count": 50.0}
    logits = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = task.loss(logits, batch)
    assert torch.allclose(loss, F.cross_entropy(logits, label))
    loss.backward()
    assert logits.grad is not None
    assert task.loss(perfect, batch) < task.loss(wrong, batch)
    assert task.summarize({"correct": 30.0, "count": 40.0}) == {"accuracy": 0.75}
    totals = {"correct": 0.0, "count": 0.0}
    for b in task.batches("val", 64, shuffle=False, seed=0):
        for k, v in task.metric(F.one_hot(b["label"], 3).float(), b).items():
            totals[k] += v
    assert task.summarize(totals) == {"accuracy": 1.0}
    assert totals["count"] == SMALL["val_size"]


def test_describe_and_fingerprint(task):
    hyp, label = task.describe(0, "train")
    assert isinstance(hyp, str) and HYPOTHESIS.match(hyp) and label in LABELS
    assert label == LABELS[int(task._split("train").label[0])]
    fp = task.fingerprint()
    assert fp == dict(image_size=32, context_length=16, seed=3, **SMALL)
    clone = SyntheticVisualEntailment(**fp)
    assert clone.fingerprint() == fp
    assert torch.equal(clone._split("val").image, task._split("val").image)
    assert SyntheticVisualEntailment().fingerprint() == dict(
        image_size=32, context_length=16, train_size=20_000, val_size=1_000, test_size=2_000, seed=0)


def test_splits_are_lazy_and_cached():
    t = SyntheticVisualEntailment(**SMALL)
    assert not t._splits
    next(t.batches("val", 8, shuffle=False, seed=0))
    assert set(t._splits) == {"val"}
    first = t._split("val")
    next(t.batches("val", 8, shuffle=True, seed=1))
    assert t._split("val") is first


def test_default_train_split():
    t = SyntheticVisualEntailment()
    data = t._split("train")
    assert data.image.shape == (20_000, 3, 32, 32)
    frac = torch.bincount(data.label, minlength=3).double() / 20_000
    assert (frac - 1 / 3).abs().max() < 0.01
