"""Task heads on a tiny CoCa: shapes, wiring, and that each learns its task's
batches (real pipeline on tiny files of the official formats)."""
from __future__ import annotations

import pytest
import torch

from optima.engine import BatchStream, Distiller, Network
from optima.errors import ConfigError
from optima.interfaces import DistillableModel
from optima.plugins.models.coca import coca_model
from optima.plugins.tasks.coco_captions import CocoCaptions
from optima.plugins.heads.vl_heads import CaptionHead, PairHead, attentional_pooler_head, caption_head, pair_head
from optima.plugins.tasks.nlvr2 import Nlvr2
from optima.plugins.tasks.snli_ve import SnliVe
from optima.plugins.tasks.vqa import Vqa

from conftest import TINY_COCA
from real_format_data import make_coco, make_nlvr2, make_snli_ve, make_vqa

SMALL = dict(image_size=32, context_length=12, augment=False, load_threads=0)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny matrices gain nothing from a second thread, and on a busy machine
    its spin-waiting makes these tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(seed=0, layers=None):
    torch.manual_seed(seed)
    return coca_model(TINY_COCA, layers=layers)


def _train(network, task, batch, steps, lr=2e-3):
    """Loss before, and after `steps` Adam steps on one batch."""
    opt = torch.optim.Adam(network.parameters(), lr=lr)
    network.train()
    losses = []
    for _ in range(steps):
        loss = task.loss(network(batch).float(), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = task.loss(network(batch).float(), batch).item()
    return losses[0], final


def test_snli_ve_attentional_pooler_head_learns(tmp_path):
    task = SnliVe(data_dir=str(make_snli_ve(tmp_path / "s")), **SMALL)
    batch = next(task.batches("train", 8, shuffle=False, seed=0))
    model = _tiny()
    net = Network(model, attentional_pooler_head(model, task))
    assert net(batch).shape == (4, 3)
    first, last = _train(net, task, batch, 12)
    assert last < 0.5 * first
    metrics = task.summarize(task.metric(net(batch), batch))
    assert metrics == {"accuracy": 1.0}


def test_vqa_soft_score_head_learns(tmp_path):
    task = Vqa(data_dir=str(make_vqa(tmp_path / "v")), num_answers=3, **SMALL)
    batch = next(task.batches("train", 8, shuffle=False, seed=0))
    model = _tiny(1)
    net = Network(model, attentional_pooler_head(model, task))
    assert net(batch).shape == (4, 3)
    first, last = _train(net, task, batch, 12)
    assert last < 0.5 * first
    assert task.summarize(task.metric(net(batch), batch))["accuracy"] == pytest.approx(1.0)


def test_pair_head_pools_each_pass_and_concatenates():
    torch.manual_seed(0)
    head = PairHead(feature_dim=8, num_outputs=2, heads=2)
    feats = torch.randn(6, 5, 8)  # 3 examples x 2 images, example-major
    out = head(feats)
    assert out.shape == (3, 2)
    pooled = head.pool(feats)[:, 0]
    expected = head.classifier(torch.cat([pooled[2], pooled[3]]))  # example 1: passes 2 and 3
    assert torch.allclose(out[1], expected, atol=1e-6)
    swapped = head(feats.view(3, 2, 5, 8).flip(1).reshape(6, 5, 8))
    assert not torch.allclose(out, swapped)  # left/right order matters
    with pytest.raises(ConfigError, match="not a multiple of 2"):
        head(torch.randn(5, 5, 8))
    with pytest.raises(ConfigError, match="images_per_example"):
        PairHead(8, 2, images_per_example=0)


def test_nlvr2_pair_head_learns(tmp_path):
    task = Nlvr2(data_dir=str(make_nlvr2(tmp_path / "n")), **SMALL)
    batch = next(task.batches("train", 8, shuffle=False, seed=0))
    assert batch["image"].shape == (3, 2, 3, 32, 32)
    model = _tiny(2)
    head = pair_head(model, task)
    assert isinstance(head, PairHead) and head.classifier.in_features == 2 * model.feature_dim
    net = Network(model, head)
    assert net(batch).shape == (3, 2)
    first, last = _train(net, task, batch, 12)
    assert last < 0.5 * first
    # the wrong head (one prediction per pass) is named in the error
    wrong = Network(model, attentional_pooler_head(model, task))
    with pytest.raises(ConfigError, match="pair_head"):
        task.loss(wrong(batch), batch)


def test_caption_head_shares_the_models_projection(tmp_path):
    task = CocoCaptions(data_dir=str(make_coco(tmp_path / "c")), **SMALL)
    model = _tiny(3)
    head = caption_head(model, task)
    assert isinstance(head, CaptionHead) and head.projection is model.vocab_projection()
    net = Network(model, head)
    params = list(net.parameters())
    assert sum(p is model.vocab_projection() for p in params) == 1  # listed once
    batch = next(task.batches("train", 8, shuffle=False, seed=0))
    feats = model(batch)
    logits = net(batch)
    assert logits.shape == (3, 11, 49408)
    assert torch.allclose(logits, feats @ model.coca.text_decoder.text_projection, atol=1e-5)
    # the same as open_clip's own decoder output (its vocabulary logits)
    image_embs, token_embs = model.encode_image(batch["image"]), model.encode_text(batch["text"])
    assert torch.allclose(logits, model.coca.text_decoder(image_embs, token_embs), atol=1e-4)


def test_a_parameter_shared_by_model_and_head_lands_in_one_optimizer_group(tmp_path):
    """The caption head uses the model's vocabulary projection: the stages' optimizer
    groups (pretrained, new) hold it once, in the model's group, and torch accepts them."""
    from optima.experiment import param_groups
    from optima.plugins.losses.optima_loss import optima_loss

    task = CocoCaptions(data_dir=str(make_coco(tmp_path / "c")), **SMALL)
    model = _tiny(3, layers=(1, 1, 1))
    head = caption_head(model, task)
    objective = optima_loss(model.distill_modules(), model.distill_modules())
    groups = param_groups([model], [head, objective, head], 1e-3)  # the head twice: still once
    opt = torch.optim.AdamW(groups, lr=1e-5)  # raised "appear in more than one parameter group"
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed})
    wanted = {id(p) for m in (model, head, objective) for p in m.parameters()}
    assert {id(p) for p in listed} == wanted
    projection = model.vocab_projection()
    assert any(p is projection for p in opt.param_groups[0]["params"])  # the model's weight, the model's lr
    assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[0]["lr"] == 1e-5


def test_caption_head_errors():
    class NoVocab(DistillableModel):
        feature_dim = 8

        def distill_modules(self):
            return ()

        def forward(self, batch):
            return torch.zeros(1, 1, 8)

    class Task:
        num_outputs = 49408

    with pytest.raises(ConfigError, match="caption_head needs a model with a vocab_projection.*NoVocab"):
        caption_head(NoVocab(), Task())
    Task.num_outputs = 1000
    with pytest.raises(ConfigError, match="vocabulary has 49408 tokens but the task has 1000 outputs"):
        caption_head(_tiny(), Task())


def test_caption_head_learns_and_greedy_decoding_recovers_captions(tmp_path):
    task = CocoCaptions(data_dir=str(make_coco(tmp_path / "c")), **SMALL)
    # the test split: 2 images; train on their first captions only
    batch = next(task.batches("test", 8, shuffle=False, seed=0))
    tok = task.tokenizer
    first_refs = [refs[0] for refs in batch["references"]]
    tokens = tok(first_refs)
    batch = {**batch, "text": tokens[:, :-1], "labels": tokens[:, 1:]}
    model = _tiny(4, layers=(1, 1, 1))
    net = Network(model, caption_head(model, task))
    before = net.state_dict()["model.coca.text_decoder.text_projection"].clone()
    net.eval()
    untrained = task.generate(net, batch["image"])
    assert len(untrained) == 2 and all(isinstance(t, int) for s in untrained for t in s)
    assert all(len(s) <= task.max_caption_length for s in untrained)
    first, last = _train(net, task, batch, 25, lr=5e-3)
    assert last < 0.2 * first
    assert not torch.equal(model.vocab_projection().detach(), before)  # the shared projection trained
    net.eval()
    decoded = [tok.decode(s) for s in task.generate(net, batch["image"])]
    assert [d.replace(" .", ".") for d in decoded] == [r for r in first_refs]  # "a grey square", "a black box"
    # CIDEr over the split: the trained network's captions score above the untrained one's
    batches = list(task.batches("test", 2, shuffle=False, seed=0))
    trained_cider = task.evaluate(net, batches)["cider"]
    fresh = _tiny(4, layers=(1, 1, 1))
    untrained_net = Network(fresh, caption_head(fresh, task)).eval()
    assert trained_cider > task.evaluate(untrained_net, batches)["cider"]
    assert trained_cider > 1.0


@pytest.mark.parametrize("which", ["captions", "nlvr2"])
def test_one_distillation_round_with_the_new_heads(tmp_path, which):
    """KD over next-token distributions (captions) and over pair logits (NLVR2) runs
    through the engine's Distiller with the recorder on every layer."""
    from optima.arms import ArmSpace
    from optima.plugins.losses.optima_loss import optima_loss
    from optima.plugins.policies.paper import FixedPolicy
    from optima.plugins.rewards.loss_decrement import combined_reward

    if which == "captions":
        task, head = CocoCaptions(data_dir=str(make_coco(tmp_path / "c")), **SMALL), caption_head
    else:
        task, head = Nlvr2(data_dir=str(make_nlvr2(tmp_path / "n")), **SMALL), pair_head
    t_model, s_model = _tiny(5, layers=(2, 2, 2)), _tiny(6, layers=(1, 1, 1))
    teacher, student = Network(t_model, head(t_model, task)), Network(s_model, head(s_model, task))
    loss = optima_loss(s_model.distill_modules(), t_model.distill_modules())
    arms = ArmSpace(s_model.module_names())
    masks = []  # what the loss is told about padding
    forward = loss.forward
    loss.forward = lambda s, t, *rest: masks.append((s.mask, t.mask)) or forward(s, t, *rest)
    opt = torch.optim.Adam(list(student.parameters()) + list(loss.parameters()), lr=1e-3)
    distiller = Distiller(teacher=teacher, student=student, task=task, loss=loss, arms=arms,
                          policy=FixedPolicy(len(arms)), reward=combined_reward(), optimizer=opt,
                          scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                          stream=BatchStream(task, "train", 2, 0, torch.device("cpu")), steps_per_round=2,
                          rounds=2, device=torch.device("cpu"))
    results = distiller.run()
    distiller.close()
    assert len(results) == 2 and results[1].reward is not None and 0.0 <= results[1].reward <= 1.0
    for term in ("task", "kd", "hidden", "attn"):
        assert all(torch.isfinite(torch.tensor(r.losses[term])) and r.losses[term] > 0 for r in results)
    assert len(masks) == 4
    if which == "captions":  # KD compares caption tokens only
        assert all(s is t and s.dtype == torch.bool and s.shape[1] == 11 and not s.all() for s, t in masks)
        assert [len(s) for s, _ in masks] == [2, 1, 2, 1]  # 3 training captions in batches of 2
    else:
        assert all(s is None and t is None for s, t in masks)
