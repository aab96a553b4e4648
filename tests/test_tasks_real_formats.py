"""The real tasks (SNLI-VE, VQA v2, NLVR2, COCO Karpathy) on tiny files of the
official formats, written here: parsing, labels, soft scores, batches, errors."""
from __future__ import annotations

import json

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from optima.errors import ConfigError
from optima.interfaces import Task
from optima.plugins.tasks.coco_captions import CocoCaptions, cider
from optima.plugins.tasks.nlvr2 import Nlvr2
from optima.plugins.tasks.snli_ve import LABELS, SnliVe
from optima.plugins.tasks import vl_data
from optima.plugins.tasks.vl_data import Tokenizer, simple_tokenize
from optima.plugins.tasks.vqa import Vqa, answer_vocabulary, normalize_answer, soft_scores, vqa_score

from real_format_data import write_jsonl, make_coco, make_nlvr2, make_snli_ve, make_vqa

SMALL = dict(image_size=32, context_length=12, load_threads=2)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is as fast, and does not spin on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def snli_dir(tmp_path):
    return make_snli_ve(tmp_path / "snli")


@pytest.fixture
def vqa_dir(tmp_path):
    return make_vqa(tmp_path / "vqa")


@pytest.fixture
def nlvr2_dir(tmp_path):
    return make_nlvr2(tmp_path / "nlvr2")


@pytest.fixture
def coco_dir(tmp_path):
    return make_coco(tmp_path / "coco")


def _all(task, split, batch_size=2, shuffle=False, seed=0):
    return list(task.batches(split, batch_size, shuffle=shuffle, seed=seed))


# -- shared pieces -----------------------------------------------------------------


def test_tokenizer_is_open_clips_and_round_trips():
    tok = Tokenizer(12)
    ids = tok(["A dog runs."])
    assert torch.equal(ids, SimpleTokenizer(context_length=12)(["A dog runs."]).long())
    assert ids[0, 0] == tok.sot_token_id == 49406 and tok.eot_token_id == 49407 and tok.vocab_size == 49408
    assert tok.decode(ids[0].tolist()) == "a dog runs ."
    assert tok.decode([tok.sot_token_id, 320, tok.eot_token_id, 1929]) == "a"  # stops at end of text
    assert tok([]).shape == (0, 12)


def test_simple_tokenize_for_cider():
    assert simple_tokenize("A man, riding a HORSE!  ") == "a man riding a horse"
    assert simple_tokenize("it's a dog-sled") == "it s a dog sled"


# -- SNLI-VE -----------------------------------------------------------------------


def test_snli_ve_records_and_labels(snli_dir):
    task = SnliVe(data_dir=str(snli_dir), **SMALL)
    assert isinstance(task, Task) and task.num_outputs == 3
    recs = task.records("train")
    assert [r.text for r in recs] == ["A red wall.", "A man sleeps.", "Nothing is blue.", "A yellow wall."]
    assert [LABELS[r.target] for r in recs] == ["entailment", "neutral", "contradiction", "entailment"]
    assert recs[0].images == (str(snli_dir / "flickr30k_images" / "1000.jpg"),)
    assert recs[3].images == (str(snli_dir / "flickr30k_images" / "1003.jpg"),)  # ".jpg" appended
    assert task.size("val") == 2 and task.size("test") == 1
    b, = _all(task, "test")
    assert b["label"].tolist() == [2]


def test_snli_ve_batches(snli_dir):
    task = SnliVe(data_dir=str(snli_dir), **SMALL)
    batches = _all(task, "train", batch_size=3)
    assert [len(b["label"]) for b in batches] == [3, 1]  # last partial batch included
    b = batches[0]
    assert b["image"].shape == (3, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["text"].shape == (3, 12) and b["text"].dtype == torch.long
    assert torch.equal(b["text"], Tokenizer(12)(["A red wall.", "A man sleeps.", "Nothing is blue."]))
    assert b["label"].tolist() == [0, 1, 2]
    # shuffled: every example once, order set by the seed
    texts = lambda bs: [tuple(t) for b in bs for t in b["text"].tolist()]  # noqa: E731
    s0, s0b = (_all(task, "train", 3, True, 0) for _ in range(2))
    assert sorted(texts(s0)) == sorted(texts(batches))
    assert texts(s0) == texts(s0b)
    orders = {tuple(texts(_all(task, "train", 3, True, seed))) for seed in range(6)}
    assert len(orders) > 2


def test_resumed_order_skips_batches_without_reading_their_images(snli_dir, monkeypatch):
    """`batches_from(start=k)` (a resumed run's data) is the shuffled pass from batch
    k on, augmentation included, and opens only the images it yields."""
    task = SnliVe(data_dir=str(snli_dir), **SMALL)
    full = list(task.batches("train", 1, shuffle=True, seed=7))
    opened = []
    monkeypatch.setattr(vl_data, "_open_rgb", lambda p, real=vl_data._open_rgb: opened.append(p) or real(p))
    tail = list(task.batches_from("train", 1, seed=7, start=3))
    assert len(full) == 4 and len(tail) == 1 and len(opened) == 1
    for key in ("image", "text", "label"):
        assert torch.equal(tail[0][key], full[3][key])
    assert list(task.batches_from("train", 1, seed=7, start=4)) == []


def test_image_augmentation_is_seeded_and_train_only(snli_dir):
    task = SnliVe(data_dir=str(snli_dir), **SMALL)
    a, b, c = (next(task.batches("train", 4, shuffle=False, seed=s))["image"] for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # another random crop
    v1, v2 = (next(task.batches("val", 4, shuffle=False, seed=s))["image"] for s in (1, 2))
    assert torch.equal(v1, v2)  # eval: resize + centre crop
    plain = SnliVe(data_dir=str(snli_dir), augment=False, **SMALL)
    t1, t2 = (next(plain.batches("train", 4, shuffle=False, seed=s))["image"] for s in (1, 2))
    assert torch.equal(t1, t2)
    # a flat-colour region normalises to open_clip's (c - mean) / std
    red = (torch.tensor([220, 30, 30]) / 255 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / \
        torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(v1[0, :, 16, 28], red, atol=0.1)


def test_snli_ve_missing_files(tmp_path, snli_dir):
    task = SnliVe(data_dir=str(tmp_path / "nowhere"), **SMALL)
    with pytest.raises(ConfigError) as e:
        next(task.batches("train", 2, shuffle=False, seed=0))
    msg = str(e.value)
    assert f"snli_ve_task.data_dir={tmp_path / 'nowhere'}: missing {tmp_path / 'nowhere' / 'snli_ve_train.jsonl'}" in msg
    assert "download SNLI-VE and set snli_ve_task.data_dir" in msg
    assert task.missing_paths() == [str(tmp_path / "nowhere" / f) for f in
                                    ("snli_ve_train.jsonl", "snli_ve_dev.jsonl", "snli_ve_test.jsonl",
                                     "flickr30k_images")]
    assert SnliVe(data_dir=str(snli_dir), **SMALL).missing_paths() == []
    (snli_dir / "flickr30k_images" / "1001.jpg").unlink()
    task = SnliVe(data_dir=str(snli_dir), **SMALL)
    assert task.missing_paths() == []  # images themselves are not listed (that would need parsing)
    with pytest.raises(ConfigError, match=r"snli_ve_task.image_dir=.*missing .*1001.jpg.*set snli_ve_task.image_dir"):
        _all(task, "train")


def test_bad_label_is_a_config_error(snli_dir):
    write_jsonl(snli_dir / "snli_ve_dev.jsonl", [{"Flikr30kID": "1000.jpg", "sentence2": "x", "gold_label": "maybe"}])
    with pytest.raises(ConfigError, match="snli_ve_dev.jsonl: line 1 has gold_label 'maybe'"):
        SnliVe(data_dir=str(snli_dir), **SMALL).records("val")
    write_jsonl(snli_dir / "snli_ve_test.jsonl", [{"Flickr30kID": "1000.jpg", "sentence2": "x", "gold_label": "neutral"}])
    with pytest.raises(ConfigError, match="has no 'Flikr30kID' field"):
        SnliVe(data_dir=str(snli_dir), **SMALL).records("test")


def test_fingerprint_follows_content_and_arguments(snli_dir):
    f1 = SnliVe(data_dir=str(snli_dir), **SMALL).fingerprint()
    assert f1 == SnliVe(data_dir=str(snli_dir), **SMALL).fingerprint()
    assert f1 != SnliVe(data_dir=str(snli_dir), **{**SMALL, "image_size": 48}).fingerprint()
    json.dumps(f1)  # goes into the teacher cache key
    write_jsonl(snli_dir / "snli_ve_test.jsonl", [{"Flikr30kID": "1000.jpg", "sentence2": "y", "gold_label": "neutral"}])
    assert SnliVe(data_dir=str(snli_dir), **SMALL).fingerprint() != f1


def test_unknown_split_and_bad_batch_size(snli_dir):
    task = SnliVe(data_dir=str(snli_dir), **SMALL)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        task.records("dev")
    with pytest.raises(ValueError, match="batch_size"):
        next(task.batches("train", 0, shuffle=False, seed=0))


# -- VQA ---------------------------------------------------------------------------


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_score_is_the_official_leave_one_out_accuracy(matches, expected):
    # brute force: the official script holds out each of the 10 humans in turn
    humans = ["x"] * matches + ["y"] * (10 - matches)
    brute = sum(min(1.0, sum(h == "x" for j, h in enumerate(humans) if j != i) / 3) for i in range(10)) / 10
    assert vqa_score(matches) == pytest.approx(expected) == pytest.approx(brute)
    # without leave-one-out, min(1, n/3) would give 1/3, 2/3, 1 for 1, 2, 3 humans
    assert vqa_score(1, num_humans=1) == pytest.approx(1 / 3)


def test_vqa_answer_normalisation():
    assert normalize_answer("Red.") == "red"
    assert normalize_answer("Two") == "2"
    assert normalize_answer("the dog") == "dog"
    assert normalize_answer("A Wall") == "wall"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("yes!") == "yes"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("t-shirt") == "t shirt"
    assert normalize_answer("3.5") == "3.5"
    assert soft_scores(["one", "1", "One", "2"] + ["no"] * 6) == pytest.approx({"1": 0.9, "2": 0.3, "no": 1.0})


def test_vqa_vocab_records_and_soft_targets(vqa_dir):
    task = Vqa(data_dir=str(vqa_dir), num_answers=3, **SMALL)
    # multiple_choice_answer counts (normalised): red 2, 1 1, yes 1 -> ties by text
    assert task.answers == ("red", "1", "yes") and task.num_outputs == 3
    big = Vqa(data_dir=str(vqa_dir), num_answers=5, **SMALL)
    assert big.answers == ("red", "1", "yes") and big.num_outputs == 5  # classes 3, 4 unused
    assert next(big.batches("train", 4, shuffle=False, seed=0))["target"][:, 3:].abs().sum() == 0
    recs = task.records("train")
    assert [r.meta["question_id"] for r in recs] == [90, 91, 120, 121]
    assert recs[0].images == (str(vqa_dir / "train2014" / "COCO_train2014_000000000009.jpg"),)
    # q90: red x3 + "Red." x2 = 5 humans -> 1.0 (pink, orange, dark red are not in the vocabulary)
    assert dict(recs[0].target) == pytest.approx({0: 1.0})
    assert dict(recs[1].target) == pytest.approx({1: 1.0})  # "1" x4 + "one" x4
    assert dict(recs[2].target) == pytest.approx({2: 1.0})  # 9 x yes
    assert dict(recs[3].target) == pytest.approx({0: 1.0})  # 6 x red; zebra is out of vocabulary
    b, = _all(task, "val", batch_size=4)
    assert b["image"].shape == (2, 3, 32, 32) and b["text"].shape == (2, 12)
    assert b["question_id"].tolist() == [70, 71]
    # val q70: yes 8 of 10 -> 1.0; no 2 of 10 -> 0.6 (not in the 3-answer vocabulary); q71: giraffe: none
    assert torch.allclose(b["target"], torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))


def test_vqa_loss_and_metric(vqa_dir):
    task = Vqa(data_dir=str(vqa_dir), num_answers=3, **SMALL)
    target = torch.tensor([[0.0, 0.6, 1.0], [0.3, 0.0, 0.0]])
    batch = {"target": target}
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 0.0]])  # argmax: answer 1 (0.6), answer 0 (0.3)
    assert task.metric(logits, batch) == {"score": pytest.approx(0.9), "count": 2.0}
    assert task.summarize({"score": 0.9, "count": 2.0}) == {"accuracy": pytest.approx(0.45)}
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    assert task.loss(logits, batch).item() == pytest.approx(bce.sum(1).mean().item(), rel=1e-6)


def test_vqa_answer_vocab_file_and_test_is_val(vqa_dir):
    vocab = vqa_dir / "answers.json"
    vocab.write_text(json.dumps(["yes", "No", "giraffe", "1"]))
    task = Vqa(data_dir=str(vqa_dir), answer_vocab=str(vocab), num_answers=4, **SMALL)
    assert task.answers == ("yes", "no", "giraffe", "1") and task.num_outputs == 4
    with pytest.raises(ConfigError, match="has 4 answers but vqa_task.num_answers = 3129; set vqa_task.num_answers = 4"):
        Vqa(data_dir=str(vqa_dir), answer_vocab=str(vocab), **SMALL).answers
    b, = _all(task, "test", batch_size=4)  # test = val2014 (official test answers are not public)
    assert b["question_id"].tolist() == [70, 71]
    assert torch.allclose(b["target"], torch.tensor([[1.0, 0.6, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    assert answer_vocabulary([{"multiple_choice_answer": a} for a in ["b", "a", "b", "the c", "c"]], 2) == ("b", "c")


def test_vqa_missing_paths(tmp_path, vqa_dir):
    task = Vqa(data_dir=str(tmp_path / "v"), **SMALL)
    assert task.missing_paths() == [str(tmp_path / "v" / f) for f in (
        "v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json",
        "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
        "train2014", "val2014")]
    with pytest.raises(ConfigError, match=r"vqa_task.data_dir=.*missing .*v2_OpenEnded_mscoco_val2014_questions.json"):
        task.records("test")
    assert Vqa(data_dir=str(vqa_dir), **SMALL).missing_paths() == []
    with pytest.raises(ConfigError, match="vqa_task.answer_vocab=.*missing .*nope.json"):
        Vqa(data_dir=str(vqa_dir), answer_vocab=str(vqa_dir / "nope.json"), **SMALL).records("val")
    # the head's size is known without any file (dry runs build heads with no data)
    assert Vqa(data_dir=str(tmp_path / "v"), **SMALL).num_outputs == 3129


# -- NLVR2 -------------------------------------------------------------------------


def test_nlvr2_records_and_image_paths(nlvr2_dir):
    task = Nlvr2(data_dir=str(nlvr2_dir), **SMALL)
    assert task.num_outputs == 2
    recs = task.records("train")
    assert [r.target for r in recs] == [1, 0, 1]
    img = nlvr2_dir / "images"
    assert recs[0].images == (str(img / "train/3/train-10-0-img0.png"), str(img / "train/3/train-10-0-img1.png"))
    assert recs[1].images == recs[0].images  # two sentences about the same pair
    assert task.records("val")[0].images == (str(img / "dev/dev-850-0-img0.png"), str(img / "dev/dev-850-0-img1.png"))
    assert task.records("test")[0].images[1] == str(img / "test1/test1-5-2-img1.png")
    assert [r.target for r in task.records("val")] == [0, 1]


def test_nlvr2_pair_batches(nlvr2_dir):
    task = Nlvr2(data_dir=str(nlvr2_dir), **SMALL)
    batches = _all(task, "train", batch_size=2)
    assert [b["image"].shape for b in batches] == [(2, 2, 3, 32, 32), (1, 2, 3, 32, 32)]
    assert batches[0]["text"].shape == (2, 12) and batches[0]["label"].tolist() == [1, 0]
    b = _all(task, "val", batch_size=2)[0]
    assert not torch.equal(b["image"][0, 0], b["image"][0, 1])  # img0 and img1 differ
    images, why = task.read_record(task.records("val")[0])
    assert why is None and len(images) == 2
    single = vl_data.normalize_images(task.transform_images(images[1:], False, torch.Generator()))
    assert torch.equal(b["image"][0, 1], single[0])  # slot 1 holds img1


def test_nlvr2_custom_pattern_and_errors(tmp_path, nlvr2_dir):
    task = Nlvr2(data_dir=str(nlvr2_dir), image_dir=str(tmp_path / "flat"), image_pattern="{identifier}_{i}.jpg",
                 **SMALL)
    assert task.records("val")[1].images == (str(tmp_path / "flat" / "dev-850-0-1_0.jpg"),
                                             str(tmp_path / "flat" / "dev-850-0-1_1.jpg"))
    with pytest.raises(ConfigError, match="nlvr2_task.image_pattern"):
        Nlvr2(data_dir=str(nlvr2_dir), image_pattern="{split}/{pair}.png")
    missing = Nlvr2(data_dir=str(tmp_path / "n"), **SMALL).missing_paths()
    assert missing == [str(tmp_path / "n" / f) for f in ("train.json", "dev.json", "test1.json", "images/train",
                                                         "images/dev", "images/test1")]
    with pytest.raises(ConfigError, match=r"nlvr2_task.data_dir=.*missing .*dev.json.*set nlvr2_task.data_dir"):
        Nlvr2(data_dir=str(tmp_path / "n"), **SMALL).records("val")
    write_jsonl(nlvr2_dir / "dev.json", [{"identifier": "dev-1-0-0", "sentence": "x", "label": "maybe"}])
    with pytest.raises(ConfigError, match="label 'maybe'"):
        Nlvr2(data_dir=str(nlvr2_dir), **SMALL).records("val")
    # logits per pass instead of per pair: the wrong head
    with pytest.raises(ConfigError, match="pair_head"):
        task.loss(torch.zeros(4, 2), {"label": torch.zeros(2, dtype=torch.long)})


# -- COCO captions -----------------------------------------------------------------


def test_coco_karpathy_splits_and_references(coco_dir):
    task = CocoCaptions(data_dir=str(coco_dir), **SMALL)
    assert task.num_outputs == 49408
    train = task.records("train")
    assert [r.meta["image_id"] for r in train] == [1, 2, 3]  # train + restval
    assert train[1].images == (str(coco_dir / "val2014" / "COCO_val2014_000000000002.jpg"),)
    assert [r.meta["image_id"] for r in task.records("val")] == [4]
    assert [r.meta["image_id"] for r in task.records("test")] == [5, 6]
    assert task.records("test")[0].meta["references"] == ["a grey square", "a gray block", "something grey"]
    assert task.missing_paths() == []


def test_coco_batches_teacher_forcing(coco_dir):
    task = CocoCaptions(data_dir=str(coco_dir), **SMALL)
    b, = _all(task, "test", batch_size=4)
    tok = Tokenizer(12)
    assert b["image"].shape == (2, 3, 32, 32)
    assert b["text"].shape == b["labels"].shape == (2, 11)
    assert b["image_id"].tolist() == [5, 6]
    mask = task.logit_mask(b)  # what KD compares: the caption's tokens, not padding
    assert torch.equal(mask, b["labels"] != 0) and mask.any() and not mask.all()
    assert b["references"] == [["a grey square", "a gray block", "something grey"], ["a black box", "darkness"]]
    assert (b["text"][:, 0] == tok.sot_token_id).all()
    assert torch.equal(b["text"][:, 1:], b["labels"][:, :-1])  # shifted by one
    caption = tok.decode(torch.cat([b["text"][0, :1], b["labels"][0]]).tolist())
    assert simple_tokenize(caption) in b["references"][0]
    assert (b["labels"] == tok.eot_token_id).sum(1).tolist() == [1, 1]


def test_coco_one_random_caption_per_image_per_epoch(coco_dir):
    task = CocoCaptions(data_dir=str(coco_dir), **SMALL)
    tok = Tokenizer(12)

    def captions(seed):
        out = {}
        for b in task.batches("train", 2, shuffle=True, seed=seed):
            for i, iid in enumerate(b["image_id"].tolist()):
                out[iid] = simple_tokenize(tok.decode(b["text"][i].tolist()))
        return out

    assert captions(3) == captions(3)
    assert set(captions(3)) == {1, 2, 3}  # one caption per image per epoch
    seen = {iid: set() for iid in (1, 2, 3)}
    for seed in range(12):
        for iid, c in captions(seed).items():
            seen[iid].add(c)
    refs = {r.meta["image_id"]: set(r.meta["references"]) for r in task.records("train")}
    assert all(seen[i] <= refs[i] for i in seen)
    assert all(len(seen[i]) >= 2 for i in seen)  # different epochs pick different captions


def test_coco_loss_ignores_padding_and_metric(coco_dir):
    task = CocoCaptions(data_dir=str(coco_dir), **SMALL)
    labels = torch.tensor([[5, 7, 0, 0]])
    logits = torch.full((1, 4, 10), -10.0)
    logits[0, 0, 5] = logits[0, 1, 3] = 10.0  # first right, second wrong
    logits[0, 2:, 1] = 10.0  # padding positions: wrong but ignored
    batch = {"labels": labels}
    expected = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, :2])
    assert task.loss(logits, batch).item() == pytest.approx(expected.item())
    assert task.metric(logits, batch) == {"token_correct": 1.0, "token_count": 2.0}
    assert task.summarize({"token_correct": 1.0, "token_count": 2.0}) == {"token_accuracy": 0.5}
    with pytest.raises(ConfigError, match="caption_head"):
        task.loss(torch.zeros(1, 10), batch)


def test_coco_errors(tmp_path):
    task = CocoCaptions(data_dir=str(tmp_path / "c"), **SMALL)
    assert task.missing_paths() == [str(tmp_path / "c" / f) for f in ("dataset_coco.json", "train2014", "val2014")]
    with pytest.raises(ConfigError, match=r"coco_captions_task.data_dir=.*missing .*dataset_coco.json"):
        task.records("train")
    with pytest.raises(ConfigError, match="max_caption_length"):
        CocoCaptions(data_dir=str(tmp_path), context_length=12, max_caption_length=12)


def test_cider_orders_candidates():
    refs = {0: ["a red wall", "a wall painted red"], 1: ["a blue sky", "the sky is blue"],
            2: ["a green field of grass", "green grass"], 3: ["a black box", "a dark box"]}
    same = cider(refs, {k: [v[0]] for k, v in refs.items()})
    close = cider(refs, {0: ["a red wall"], 1: ["a blue sky"], 2: ["a green field"], 3: ["a box"]})
    wrong = cider(refs, {0: ["a blue sky"], 1: ["green grass"], 2: ["a red wall"], 3: ["the sky"]})
    empty = cider(refs, {k: [""] for k in refs})
    assert same > close > wrong >= 0 and empty == 0
    assert same > 2.0  # exact matches of distinctive captions (CIDEr-D: x10 scale, 1.0 = "100")


def test_greedy_decoding_with_a_scripted_network(coco_dir):
    task = CocoCaptions(data_dir=str(coco_dir), max_caption_length=6, **SMALL)
    tok = task.tokenizer
    script = {0: [320, 736, 2569, tok.eot_token_id], 1: [320, 1449, 1929, 2862, 3306, 269, 999]}
    seen_lengths = []

    def network(batch):  # next token of example b at step t = script[b][t]; image[:, 0, 0, 0] holds b
        text = batch["text"]
        seen_lengths.append(text.shape[1])
        assert (text[:, 0] == tok.sot_token_id).all()
        logits = torch.zeros(text.shape[0], text.shape[1], 49408)
        for row, b in enumerate(batch["image"][:, 0, 0, 0].long().tolist()):
            step = text.shape[1] - 1
            logits[row, -1, script[b][step] if step < len(script[b]) else 1929] = 1.0  # junk after the end
        return logits

    image = torch.zeros(2, 3, 32, 32)
    image[1] = 1.0
    out = task.generate(network, image)
    assert out == [[320, 736, 2569], [320, 1449, 1929, 2862, 3306, 269]]  # 2nd stops at max_caption_length
    assert seen_lengths == [1, 2, 3, 4, 5, 6]
    assert task.generate(network, image[:1]) == [[320, 736, 2569]]  # stops at end of text
    assert seen_lengths[6:] == [1, 2, 3, 4]
    assert tok.decode(out[0]) == "a red wall"


def test_evaluate_scores_generated_captions(coco_dir):
    task = CocoCaptions(data_dir=str(coco_dir), **SMALL)
    tok = task.tokenizer
    captions = {5: "a grey square", 6: "a black box"}

    def oracle(batch):  # says the first reference of each image, whichever image it is
        text = batch["text"]
        logits = torch.zeros(text.shape[0], text.shape[1], 49408)
        for row, key in enumerate(batch["image"].flatten(1)[:, 0].tolist()):
            ids = tok([captions[int(key)]])[0]
            logits[row, -1, ids[text.shape[1]]] = 1.0
        return logits

    batches = []
    for b in task.batches("test", 1, shuffle=False, seed=0):
        b["image"] = torch.full_like(b["image"], float(b["image_id"][0]))  # tag each image with its id
        batches.append(b)
    good = task.evaluate(oracle, batches)["cider"]
    captions = {5: "a black box", 6: "a grey square"}
    bad = task.evaluate(oracle, batches)["cider"]
    assert set(task.evaluate(oracle, batches)) == {"cider"}
    assert good > 1.0 > bad


def test_registered_under_their_gin_names():
    from optima import registry

    reg = registry.load(external=False)
    assert not reg.failures
    for name, cls in (("snli_ve_task", SnliVe), ("vqa_task", Vqa), ("nlvr2_task", Nlvr2),
                      ("coco_captions_task", CocoCaptions)):
        assert reg.components[name].factory is cls
    assert {"attentional_pooler_head", "pair_head", "caption_head"} <= set(reg.components)


def test_gin_builds_a_task(snli_dir):
    import gin

    from optima import config

    config.setup(external_plugins=False)
    try:
        config.parse([], ["experiment.task = @snli_ve_task", f"snli_ve_task.data_dir = '{snli_dir}'",
                          "snli_ve_task.image_size = 32", "snli_ve_task.context_length = 12"])
        task = gin.query_parameter("experiment.task").scoped_configurable_fn()
        assert isinstance(task, SnliVe) and task.size("train") == 4 and task.image_size == 32
        with pytest.raises(ConfigError, match="'vqa_task' has no parameter 'num_answer'"):
            config.parse([], ["vqa_task.num_answer = 10"])
    finally:
        gin.clear_config()
