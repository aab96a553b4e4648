"""The synthetic world and its four tasks: determinism, images against the scene
record, every label / answer / statement / caption checked against the scene by
an independent reading of the text, and each task through a tiny CoCa."""
from __future__ import annotations

import collections
import re

import numpy as np
import pytest
import torch

from optima.plugins.tasks.synthetic_world.tasks import (ANSWERS, WorldCaptions, WorldEntailment, WorldNlvr2,
                                                        WorldVqa)
from optima.plugins.tasks.synthetic_world.world import (ATTRIBUTES, COLOURS, NUMBERS, RGB, SHAPES, SIZES, VOCAB_SIZE,
                                                        VOCABULARY, World, WorldTokenizer, to_pixels)
from optima.plugins.tasks.vqa import normalize_answer

SMALL = dict(train_size=600, val_size=50, test_size=300)
TASKS = (WorldEntailment, WorldVqa, WorldNlvr2, WorldCaptions)
OBJ = r"(?:(?P<{p}z>small|large) )?(?P<{p}c>{c}) (?P<{p}s>{s})".format
REL = r"(?P<rel>left of|right of|above|below)"


def obj(p=""):
    return OBJ(p=p, c="|".join(COLOURS), s="|".join(SHAPES))


def find(scene, colour, shape):
    """The scene's object of that colour and shape (scenes name each pair once), or None."""
    hits = [o for o in scene if o[1] == colour and o[2] == shape]
    assert len(hits) <= 1
    return hits[0] if hits else None


def relation(rel, a, b):
    """Independent reading of a relation between two (size, colour, shape, row, col) objects."""
    return {"left of": a[4] < b[4], "right of": a[4] > b[4], "above": a[3] < b[3], "below": a[3] > b[3]}[rel]


# -- the world ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", TASKS)
def test_same_seed_same_data_other_seed_other_data(cls):
    a, b, c = cls(seed=3, **SMALL), cls(seed=3, **SMALL), cls(seed=4, **SMALL)
    a._split("train")  # a and b are generated separately, not served from the cache
    from optima.plugins.tasks.synthetic_world import tasks

    tasks._CACHE.clear()
    for split in ("train", "test"):
        da, db, dc = a._generate(split), b._split(split), c._split(split)
        assert np.array_equal(da.images, db.images) and torch.equal(da.text, db.text) and da.texts == db.texts
        assert torch.equal(da.target, db.target)
        assert not np.array_equal(da.images, dc.images) and da.texts != dc.texts
    assert not np.array_equal(a._split("train").images[:50], a._split("val").images[:50])


def test_an_example_depends_on_its_index_not_on_the_split_size():
    small, large = WorldEntailment(seed=1, train_size=300), WorldEntailment(seed=1, train_size=700)
    s, l = small._split("train"), large._split("train")
    assert np.array_equal(s.images, l.images[:300]) and s.texts == l.texts[:300]


def test_scenes_follow_the_world_bindings():
    world = World(image_size=48, grid=4, min_objects=3, max_objects=6, distractors=2, noise=0.0)
    scenes = world.sample(np.random.default_rng(0), 500)
    count = scenes.count
    assert count.min() == 3 and count.max() == 6
    for i in range(500):
        objs = scenes.objects(i)
        assert len({(o[0], o[1]) for o in objs}) == len(objs)  # colour/shape pairs are unique
        assert len({(o[3], o[4]) for o in objs}) == len(objs)  # one object per cell
        assert all(0 <= o[3] < 4 and 0 <= o[4] < 4 for o in objs)
    images = world.render(np.random.default_rng(1), scenes)
    assert images.shape == (500, 3, 48, 48) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="max_objects"):
        World(grid=2, max_objects=5)


def test_each_object_is_drawn_in_its_colour_at_its_cell():
    task = WorldEntailment(seed=2, **SMALL)
    data = task._split("train")
    grid, size = task.world.grid, task.world.image_size
    for i in range(200):
        img = data.images[i].astype(np.float32) / 255
        for z, colour, shape, row, col in task.scene(i):
            y, x = int((row + 0.5) * size / grid), int((col + 0.5) * size / grid)
            around = img[:, y - 1:y + 2, x - 1:x + 2].reshape(3, -1).T  # the 3x3 pixels at the cell's centre
            # within colour jitter (0.05) + pixel noise (0.1) of the object's colour
            assert (np.abs(around - RGB[COLOURS.index(colour)]).max(1) <= 0.16).any(), (i, colour, shape, around)
    pixels = to_pixels(data.images[:2])
    assert pixels.dtype == torch.float32 and pixels.shape == (2, 3, 32, 32) and pixels.min() < -1 < 1 < pixels.max()


def test_tokenizer_round_trips_and_rejects_unknown_words():
    tok = WorldTokenizer(context_length=8)
    ids = tok(["a small red circle left of a"])
    assert ids.shape == (1, 8) and ids[0, 0] == tok.sot_token_id and ids[0, -1] == tok.eot_token_id
    assert tok.decode(ids[0]) == "a small red circle left of"  # truncated, end-of-text kept
    assert tok.decode(tok(["yes"])[0]) == "yes" and int((tok(["yes"])[0] != 0).sum()) == 3
    with pytest.raises(ValueError, match="'zebra'"):
        tok(["a zebra"])
    assert len(VOCABULARY) <= VOCAB_SIZE == tok.vocab_size


def test_vqa_answers_are_normalised_answers():
    assert all(normalize_answer(a) == a for a in ANSWERS)


# -- texts against the scene record ---------------------------------------------------


def _ve_truth(hyp, scene, max_objects):
    """'entailment' / 'neutral' / 'contradiction' of a hypothesis, read independently."""
    if m := re.fullmatch(rf"the {obj()} is (?P<attr>{'|'.join(ATTRIBUTES)})", hyp):
        return "neutral" if find(scene, m["c"], m["s"]) else "contradiction"
    if m := re.fullmatch(rf"there is a {obj()}", hyp):
        o = find(scene, m["c"], m["s"])
        return "entailment" if o and o[0] == m["z"] else "contradiction"
    if m := re.fullmatch(rf"there are (?P<k>\w+) (?P<c>\w+) objects", hyp):
        return "entailment" if NUMBERS.index(m["k"]) == sum(o[1] == m["c"] for o in scene) else "contradiction"
    m = re.fullmatch(rf"the {obj('a')} is {REL} the {obj('b')}", hyp)
    assert m, hyp
    a, b = find(scene, m["ac"], m["as"]), find(scene, m["bc"], m["bs"])
    assert a and b
    return "entailment" if relation(m["rel"], a, b) else "contradiction"


def test_ve_labels_match_the_scene_and_are_balanced():
    task = WorldEntailment(seed=5, **SMALL)
    data = task._split("train")
    labels = ("entailment", "neutral", "contradiction")
    kinds = collections.Counter()
    for i, hyp in enumerate(data.texts):
        assert _ve_truth(hyp, task.scene(i), task.world.max_objects) == labels[int(data.target[i])], hyp
        kinds[hyp.split()[1]] += 1
    frac = torch.bincount(data.target, minlength=3).double() / len(data.target)
    assert (frac - 1 / 3).abs().max() < 0.02
    assert len(kinds) >= 3  # presence, counts, relations, attributes all occur


def test_ve_hypothesis_alone_gives_about_two_thirds():
    task = WorldEntailment(seed=6, train_size=3000)
    data = task._split("train")
    template = [("attr" if h.split()[-1] in ATTRIBUTES else "obs") for h in data.texts]
    by = collections.defaultdict(list)
    for t, y in zip(template, data.target.tolist()):
        by[t].append(y)
    best = sum(max(ys.count(k) for k in range(3)) for ys in by.values()) / len(template)
    assert best < 0.72


def _vqa_answer(q, scene):
    if m := re.fullmatch(r"what colour is the (\w+)", q):
        (o,) = [o for o in scene if o[2] == m[1]]
        return o[1]
    if m := re.fullmatch(r"what shape is the (\w+) object", q):
        (o,) = [o for o in scene if o[1] == m[1]]
        return o[2]
    if m := re.fullmatch(r"how many (\w+) objects are there", q):
        return str(sum(o[1] == m[1] for o in scene))
    if m := re.fullmatch(r"how many (\w+)s are there", q):
        return str(sum(o[2] == m[1] for o in scene))
    if m := re.fullmatch(rf"is there a {obj()}", q):
        return "yes" if find(scene, m["c"], m["s"]) else "no"
    if m := re.fullmatch(rf"what size is the {obj()}", q):
        return find(scene, m["c"], m["s"])[0]
    m = re.fullmatch(rf"is the {obj('a')} {REL} the {obj('b')}", q)
    assert m, q
    return "yes" if relation(m["rel"], find(scene, m["ac"], m["as"]), find(scene, m["bc"], m["bs"])) else "no"


def _official_score(matches, n):
    """VQA accuracy: min(1, matches among the other n - 1 annotators / 3), averaged over who is left out."""
    return float(np.mean([min(1.0, (matches - (k < matches)) / 3) for k in range(n)]))


def test_vqa_answers_match_the_scene_and_soft_scores_are_the_official_ones():
    task = WorldVqa(seed=7, annotator_accuracy=0.8, **SMALL)
    data = task._split("train")
    kinds = collections.Counter()
    for i, q in enumerate(data.texts):
        truth = _vqa_answer(q, task.scene(i))
        assert truth == task.answer(i), q
        kinds[q.split()[0] + q.split()[1]] += 1
        scores = data.target[i]
        assert scores[ANSWERS.index(truth)] > 0
        # soft scores take values of k matching annotators out of 10 only
        assert all(any(abs(s - _official_score(k, 10)) < 1e-6 for k in range(1, 11)) for s in scores[scores > 0])
    assert len(kinds) >= 6
    yes, no = sum(task.answer(i) == "yes" for i in range(600)), sum(task.answer(i) == "no" for i in range(600))
    assert 0.6 < yes / no < 1.6
    # a perfect predictor scores the mean soft score of the true answers
    logits = torch.nn.functional.one_hot(torch.from_numpy(data.extra["answer"]), len(ANSWERS)).float()
    sums = task.metric(logits, {"target": data.target})
    expected = float(data.target[torch.arange(600), torch.from_numpy(data.extra["answer"])].mean())
    assert task.summarize(sums)["accuracy"] == pytest.approx(expected)
    assert expected > 0.99  # 8 of 10 annotators right on average: the true answer nearly always has 4+ votes
    partial = data.target[(data.target > 0) & (data.target < 1)]
    assert len(partial) > 100  # wrong answers get partial credit, as in VQA v2


def _statement_truth(text, left, right):
    if m := re.fullmatch(rf"both images contain a {obj()}", text):
        return bool(find(left, m["c"], m["s"])) and bool(find(right, m["c"], m["s"]))
    if m := re.fullmatch(rf"exactly one image contains a {obj()}", text):
        return bool(find(left, m["c"], m["s"])) != bool(find(right, m["c"], m["s"]))
    if m := re.fullmatch(r"the left image has (more|fewer) (\w+) objects than the right image", text):
        k_l, k_r = (sum(o[1] == m[2] for o in s) for s in (left, right))
        return k_l > k_r if m[1] == "more" else k_l < k_r
    if m := re.fullmatch(r"there are (\w+) (\w+)s in total", text):
        return NUMBERS.index(m[1]) == sum(o[2] == m[2] for o in left + right)
    m = re.fullmatch(rf"in the (?P<side>left|right) image the {obj('a')} is {REL} the {obj('b')}", text)
    assert m, text
    scene = left if m["side"] == "left" else right
    return relation(m["rel"], find(scene, m["ac"], m["as"]), find(scene, m["bc"], m["bs"]))


def test_nlvr2_statements_match_the_image_pair_and_are_balanced():
    task = WorldNlvr2(seed=8, **SMALL)
    data = task._split("train")
    assert data.images.shape == (600, 2, 3, 32, 32)
    for i, text in enumerate(data.texts):
        assert _statement_truth(text, task.scene(i, image=0), task.scene(i, image=1)) == bool(data.target[i]), text
    assert abs(float(data.target.float().mean()) - 0.5) < 0.05


def _caption_is_true(cap, scene):
    if m := re.fullmatch(rf"(\w+) objects with a {obj()}", cap):
        o = find(scene, m["c"], m["s"])
        return NUMBERS.index(m[1]) == len(scene) and o is not None and o[0] == m["z"]
    if m := re.fullmatch(rf"a {obj('a')} {REL} a {obj('b')}", cap):
        a, b = find(scene, m["ac"], m["as"]), find(scene, m["bc"], m["bs"])
        return a[0] == m["az"] and b[0] == m["bz"] and relation(m["rel"], a, b)
    parts = cap.split(" and ")
    assert all(re.fullmatch(rf"a {obj()}", p) for p in parts), cap
    return all((o := find(scene, p.split()[2], p.split()[3])) and o[0] == p.split()[1] for p in parts)


def test_captions_are_true_of_the_scene_and_batches_pick_one():
    task = WorldCaptions(seed=9, **SMALL)
    data = task._split("train")
    for i, refs in enumerate(data.texts):
        assert len(refs) == 5
        for cap in refs:
            assert _caption_is_true(cap, task.scene(i)), (cap, task.scene(i))
    batch = next(task.batches("train", 16, shuffle=True, seed=1))
    assert batch["text"].shape == batch["labels"].shape == (16, 15)
    for row in range(16):
        tokens = torch.cat([batch["text"][row, :1], batch["labels"][row]])
        assert task.tokenizer.decode(tokens) in batch["references"][row]
    assert torch.equal(next(task.batches("train", 16, shuffle=True, seed=1))["text"], batch["text"])


# -- each task through a tiny CoCa ----------------------------------------------------------


def _tiny_coca():
    from conftest import TINY_COCA

    from optima.plugins.models.coca import coca_model

    arch = {**TINY_COCA, "text_cfg": {**TINY_COCA["text_cfg"], "vocab_size": VOCAB_SIZE, "context_length": 16},
            "multimodal_cfg": {**TINY_COCA["multimodal_cfg"], "vocab_size": VOCAB_SIZE, "context_length": 16}}
    return coca_model(arch, layers=(1, 1, 1))


@pytest.mark.parametrize("cls,head", [(WorldEntailment, "attentional_pooler_head"), (WorldVqa, "attentional_pooler_head"),
                                      (WorldNlvr2, "pair_head"), (WorldCaptions, "caption_head")])
def test_each_task_trains_and_evaluates_with_coca(cls, head):
    from optima.engine import Finetuner, Network, evaluate
    from optima.plugins.heads import vl_heads

    torch.manual_seed(0)
    task = cls(seed=0, train_size=64, val_size=0, test_size=24)
    model = _tiny_coca()
    net = Network(model, getattr(vl_heads, head)(model, task))
    params = list({id(p): p for p in net.parameters()}.values())  # the caption head shares the model's projection
    opt = torch.optim.AdamW(params, lr=1e-3)
    tuner = Finetuner(net, task, steps=6, batch_size=16, optimizer=opt, seed=0, device=torch.device("cpu"),
                      scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    losses = [tuner.train_step() for _ in range(6)]
    assert all(np.isfinite(losses))
    metrics = evaluate(net, task, "test", 8, torch.device("cpu"))
    key = "cider" if cls is WorldCaptions else "accuracy"
    assert np.isfinite(metrics[key]) and metrics[key] >= 0
