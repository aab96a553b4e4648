import math

import pytest
import torch

from optima.arms import ArmSpace
from optima.errors import ConfigError
from optima.interfaces import Capture
from optima.plugins.models.coca import coca_model
from optima.align import layer_map
from optima.plugins.losses.optima_loss import kd_loss, optima_loss

from conftest import TINY_COCA


def test_default_arm_space_is_every_nonempty_subset():
    arms = ArmSpace(["image", "text", "multimodal"])
    assert len(arms) == 7
    assert arms.labels() == ["image", "text", "multimodal", "image+text", "image+multimodal",
                             "text+multimodal", "image+text+multimodal"]
    assert len(ArmSpace(["a", "b", "c", "d"])) == 15


def test_explicit_arms_are_canonicalised_and_checked():
    arms = ArmSpace(["image", "text", "multimodal"], [["multimodal", "image"], "text"])
    assert arms.arms == (("image", "multimodal"), ("text",))
    assert arms.index(["multimodal", "image"]) == 0
    with pytest.raises(ConfigError, match="unknown module.*'audio'.*valid modules: image, text, multimodal"):
        ArmSpace(["image", "text", "multimodal"], [["audio"]])
    with pytest.raises(ConfigError, match="listed twice"):
        ArmSpace(["image"], [["image"], ["image"]])


@pytest.mark.parametrize("n_student, n_teacher, expected", [
    (2, 12, [5, 11]),          # r = 6: g(1)=6, g(2)=12 (1-based)
    (4, 12, [2, 5, 8, 11]),    # r = 3
    (6, 24, [3, 7, 11, 15, 19, 23]),
    (4, 4, [0, 1, 2, 3]),      # same depth: one to one
    (5, 12, [1, 3, 5, 7, 9]),  # r = 12 // 5 = 2, rounded down
])
def test_layer_map(n_student, n_teacher, expected):
    assert layer_map(n_student, n_teacher) == expected


def test_layer_map_rejects_deeper_student():
    with pytest.raises(ConfigError, match="1..2 layers"):
        layer_map(3, 2)


def test_kd_loss_is_kl_teacher_to_student():
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    p_t = t.softmax(-1)
    expected = (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t), expected, atol=1e-6)
    assert kd_loss(t, t).abs() < 1e-6


def test_kd_loss_at_a_temperature_is_scaled_by_its_square():
    """At t = 2 the teacher's logits (0, 2 ln 3) soften to p_T = (1/4, 3/4) and the
    student's (0, 0) to p_S = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2), times
    t^2 = 4 (Hinton et al.: the soft gradients keep their size) = 3 ln 3 - 4 ln 2."""
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 2 * math.log(3)]])
    expected = 3 * math.log(3) - 4 * math.log(2)  # 0.5232481...
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    # the loss the pipeline builds passes its temperature on (no layer term needed here)
    model = coca_model(TINY_COCA, layers=(1, 1, 1))
    loss = optima_loss(model.distill_modules(), model.distill_modules(), temperature=2.0)
    out = loss(Capture(s, None), Capture(t, None), torch.tensor(0.0), frozenset(), frozenset())
    assert out.full["kd"].item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_over_token_logits_skips_masked_positions():
    """(B, L, V) logits: summed over positions, averaged over the batch; with a
    mask, the masked-out positions (padding) neither count nor matter."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    p_t = t.softmax(-1)
    per_position = (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1)  # (2, 4)
    assert torch.allclose(kd_loss(s, t), per_position.sum() / 2, atol=1e-6)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert torch.allclose(kd_loss(s, t, mask=mask), per_position[mask].sum() / 2, atol=1e-6)
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = 50.0, -50.0  # whatever the padding's logits
    assert torch.equal(kd_loss(s2, t2, mask=mask), kd_loss(s, t, mask=mask))


def _captures(student, teacher, batch):
    from optima.engine import Network
    from optima.interfaces import Capture
    from optima.plugins.heads.vl_heads import AttentionalPoolerHead
    from optima.taps import Recorder

    out = []
    for model in (student, teacher):
        rec = Recorder(model.distill_modules())
        net = Network(model, AttentionalPoolerHead(model.feature_dim, 3))
        out.append(Capture(net(batch), rec))
    return out


def test_only_the_arm_layers_get_gradients(tiny_batch):
    torch.manual_seed(0)
    teacher, student = coca_model(TINY_COCA), coca_model(TINY_COCA, layers=(2, 2, 2))
    loss = optima_loss(student.distill_modules(), teacher.distill_modules())
    s_cap, t_cap = _captures(student, teacher, tiny_batch)
    arm = frozenset({("image", 0), ("image", 1)})
    out = loss(s_cap, t_cap, torch.zeros(()), arm, frozenset({"kd", "hidden", "attn"}))
    out.objective.backward()
    assert loss.proj["image_0"].weight.grad is not None
    assert loss.proj["text_0"].weight.grad is None and loss.proj["multimodal_1"].weight.grad is None
    # the full-model values cover every layer, whatever the arm
    all_layers = frozenset(loss.pairs)
    s_cap, t_cap = _captures(student, teacher, tiny_batch)
    with torch.no_grad():
        full = loss(s_cap, t_cap, torch.zeros(()), all_layers, frozenset({"kd", "hidden", "attn"})).full
    assert float(out.full["hidden"]) == pytest.approx(float(full["hidden"]), rel=1e-5)
    assert float(out.full["attn"]) == pytest.approx(float(full["attn"]), rel=1e-5)
    assert set(full) == {"task", "kd", "hidden", "attn"}


def test_layer_losses_match_a_hand_computation(tiny_batch):
    torch.manual_seed(1)
    teacher, student = coca_model(TINY_COCA), coca_model(TINY_COCA, layers=(2, 2, 2))
    loss = optima_loss(student.distill_modules(), teacher.distill_modules(), kd_weight=0.0, hidden_weight=2.0,
                       attn_weight=0.0)
    s_cap, t_cap = _captures(student, teacher, tiny_batch)
    key = ("text", 1)
    out = loss(s_cap, t_cap, torch.zeros(()), frozenset({key}), frozenset())
    # teacher text layer g(2) = 2 * (4 // 2) = 4, index 3
    expected = 2.0 * torch.nn.functional.mse_loss(loss.proj["text_1"](s_cap.recorder.hidden(key)),
                                                  t_cap.recorder.hidden(("text", 3)))
    assert torch.allclose(out.objective, expected, atol=1e-6)


def test_attention_loss_matches_a_hand_computation(tiny_batch):
    """A multimodal layer has two attentions (self, cross): the term sums their
    MSEs, weighted by attn_weight; kd and hidden weighted 0 leave it alone."""
    torch.manual_seed(1)
    teacher, student = coca_model(TINY_COCA), coca_model(TINY_COCA, layers=(2, 2, 2))
    loss = optima_loss(student.distill_modules(), teacher.distill_modules(), kd_weight=0.0, hidden_weight=0.0,
                       attn_weight=3.0)
    s_cap, t_cap = _captures(student, teacher, tiny_batch)
    key = ("multimodal", 1)
    out = loss(s_cap, t_cap, torch.zeros(()), frozenset({key}), frozenset())
    s_att, t_att = s_cap.recorder.attention(key), t_cap.recorder.attention(("multimodal", 3))  # g(2) = 4
    assert len(s_att) == len(t_att) == 2
    expected = 3.0 * sum(torch.nn.functional.mse_loss(a, b) for a, b in zip(s_att, t_att))
    assert torch.allclose(out.objective, expected, atol=1e-7)


def test_negative_loss_weight_is_a_config_error():
    teacher = coca_model(TINY_COCA)
    with pytest.raises(ConfigError, match="optima_loss.attn_weight must be >= 0"):
        optima_loss(teacher.distill_modules(), teacher.distill_modules(), attn_weight=-1.0)
