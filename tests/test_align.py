"""Token alignment of a teacher with another patch grid (optima.align) and the
loss that uses it on real CoCas of different width, depth and patch size."""
import copy

import pytest
import torch
import torch.nn.functional as F

from optima.align import (align_attention, align_axis, align_hidden, check_pair, token_layouts,
                          window_matrix)
from optima.errors import ConfigError
from optima.interfaces import Capture
from optima.plugins.models.coca import coca_model
from optima.plugins.losses.optima_loss import optima_loss
from optima.taps import Recorder

from conftest import TINY_COCA

CLS_4x4 = {"prefix": 1, "grid": (4, 4)}
CLS_2x2 = {"prefix": 1, "grid": (2, 2)}


def _layout(g, prefix=1):
    return {"prefix": prefix, "grid": (g, g) if isinstance(g, int) else g}


def _softmax_rows(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(b, n, n, generator=g)).softmax(-1)


def test_hidden_pooling_is_block_means_and_keeps_the_class_token():
    h = torch.randn(2, 1 + 16, 5)
    out = align_hidden(h, CLS_4x4, CLS_2x2)
    assert out.shape == (2, 1 + 4, 5)
    torch.testing.assert_close(out[:, 0], h[:, 0])  # class token untouched
    grid = h[:, 1:].reshape(2, 4, 4, 5)
    for i in range(2):
        for j in range(2):
            block = grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((1, 2))
            torch.testing.assert_close(out[:, 1 + 2 * i + j], block)


@pytest.mark.parametrize("t_grid, s_grid", [((16, 16), (7, 7)), ((8, 8), (4, 4)), ((5, 3), (2, 2)), ((3, 3), (5, 5))])
def test_hidden_pooling_is_adaptive_avg_pool2d(t_grid, s_grid):
    (th, tw), (sh, sw) = t_grid, s_grid
    h = torch.randn(3, 1 + th * tw, 6, dtype=torch.float64)
    out = align_hidden(h, _layout(t_grid), _layout(s_grid))
    ref = F.adaptive_avg_pool2d(h[:, 1:].transpose(1, 2).reshape(3, 6, th, tw), (sh, sw)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[:, 1:], ref)
    torch.testing.assert_close(out[:, :1], h[:, :1])


def test_same_grid_is_the_identity_and_no_grid_is_one_to_one():
    h = torch.randn(2, 17, 4)
    assert align_hidden(h, CLS_4x4, CLS_4x4) is h
    assert align_hidden(h, None, None) is h
    assert align_attention(_softmax_rows(2, 9), None, None).shape == (2, 9, 9)


def test_attention_queries_are_averaged_and_keys_summed():
    a = _softmax_rows(2, 17)
    out = align_attention(a, CLS_4x4, CLS_2x2)
    assert out.shape == (2, 5, 5)
    # cls -> cls untouched; cls -> patch cells: the mass of each 2x2 block of keys
    torch.testing.assert_close(out[:, 0, 0], a[:, 0, 0])
    keys = a[:, 0, 1:].reshape(2, 2, 2, 2, 2)  # (B, cell row, row in cell, cell col, col in cell)
    torch.testing.assert_close(out[:, 0, 1:], keys.sum((2, 4)).reshape(2, 4))
    # patch queries -> cls: the mean over the cell's queries
    queries = a[:, 1:, 0].reshape(2, 2, 2, 2, 2)
    torch.testing.assert_close(out[:, 1:, 0], queries.mean((2, 4)).reshape(2, 4))
    # patch cell -> patch cell: mean over the query block of the sum over the key block
    block = a[:, 1:, 1:].reshape(2, 4, 4, 4, 4)[:, 0:2, 0:2, 2:4, 0:2]  # query cell (0, 0), key cell (1, 0)
    torch.testing.assert_close(out[:, 1, 1 + 2], block.sum((3, 4)).mean((1, 2)))


@pytest.mark.parametrize("t_grid, s_grid", [((4, 4), (2, 2)), ((16, 16), (7, 7)), ((8, 8), (3, 3)),
                                            ((5, 3), (2, 2)), ((2, 2), (3, 3)), ((7, 7), (7, 7))])
def test_attention_rows_still_sum_to_one(t_grid, s_grid):
    n = 1 + t_grid[0] * t_grid[1]
    a = _softmax_rows(3, n, seed=1).double()
    out = align_attention(a, _layout(t_grid), _layout(s_grid))
    assert out.shape == (3, 1 + s_grid[0] * s_grid[1], 1 + s_grid[0] * s_grid[1])
    torch.testing.assert_close(out.sum(-1), torch.ones(out.shape[:-1], dtype=out.dtype))
    assert (out >= 0).all()
    # the class token's share of every row is exactly its pooled query mass
    torch.testing.assert_close(out[:, 0, 0], a[:, 0, 0])


def test_window_matrices():
    # 16 -> 7: adaptive windows overlap by one patch; mean rows and sum columns are normalised
    mean, total = window_matrix(16, 7, "mean", torch.float64), window_matrix(16, 7, "sum", torch.float64)
    torch.testing.assert_close(mean.sum(1), torch.ones(7, dtype=torch.float64))
    torch.testing.assert_close(total.sum(0), torch.ones(16, dtype=torch.float64))
    assert (mean > 0).sum(1).tolist() == [3, 3, 3, 4, 3, 3, 3]
    # divisible: plain block sum
    torch.testing.assert_close(window_matrix(4, 2, "sum"), torch.tensor([[1., 1, 0, 0], [0, 0, 1, 1]]))


def test_alignment_keeps_gradients_and_dtype_promotes():
    h = torch.randn(1, 17, 3, requires_grad=True)
    align_hidden(h, CLS_4x4, CLS_2x2).sum().backward()
    assert h.grad is not None
    assert align_hidden(h.detach().half(), CLS_4x4, CLS_2x2).dtype == torch.float32


def test_layout_errors():
    with pytest.raises(ConfigError, match="module 'image'.*both need a patch grid, or neither"):
        check_pair("image", CLS_4x4, None)
    with pytest.raises(ConfigError, match="prefix"):
        check_pair("image", CLS_4x4, {"prefix": 0, "grid": (2, 2)})
    with pytest.raises(ConfigError, match="unknown keys"):
        check_pair("image", {"grid": (2, 2), "patch": 4}, CLS_2x2)
    with pytest.raises(ConfigError, match=r"grid must be \(rows, cols\)"):
        check_pair("image", {"grid": (2, 0)}, CLS_2x2)
    with pytest.raises(ConfigError, match="teacher queries=8 but student queries=4.*one to one.*the hint"):
        check_pair("mm", {"must_match": {"queries": 8}, "hint": "the hint"}, {"must_match": {"queries": 4}})
    assert check_pair("text", None, None) == (None, None)
    with pytest.raises(ConfigError, match=r"layer x\[0\].*has 10 tokens.*1 prefix \+ 4x4 patches = 17"):
        align_axis(torch.randn(1, 10, 2), 1, CLS_4x4, CLS_2x2, where="layer x[0]")


# --- real CoCas: teacher patch 4 (8x8 grid), width 48, 4/4/4 layers; student patch 8 (4x4), width 32, 2/2/2 ---

def _teacher_arch(**vision):
    arch = copy.deepcopy(TINY_COCA)
    arch["embed_dim"] = 48
    arch["vision_cfg"].update({"patch_size": 4, "width": 48, "head_width": 12, **vision})
    arch["text_cfg"]["width"] = arch["multimodal_cfg"]["width"] = 48
    return arch


def _captures(student, teacher, batch):
    """Student forward with grad, teacher without (as in the engine); logits from the
    mean feature, so no task head is involved."""
    out = []
    for model, grad in ((student, True), (teacher, False)):
        rec = Recorder(model.distill_modules())
        with torch.set_grad_enabled(grad):
            logits = model(batch).mean(1)[:, :3]
        out.append(Capture(logits, rec))
    return out


@pytest.fixture(scope="module")
def mismatched():
    torch.manual_seed(0)
    return coca_model(_teacher_arch()), coca_model(TINY_COCA, layers=(2, 2, 2))


def test_coca_token_layouts(mismatched):
    teacher, student = mismatched
    assert teacher.token_layout("image") == {"prefix": 1, "grid": (8, 8)}
    assert student.token_layout("image") == {"prefix": 1, "grid": (4, 4)}
    assert student.token_layout("text") is None
    assert student.token_layout("multimodal")["must_match"] == {"vision_cfg.attn_pooler_queries": 8}
    assert set(token_layouts(student)) == {"image", "text", "multimodal"}
    with pytest.raises(ConfigError, match="no module 'audio'"):
        student.token_layout("audio")


def test_loss_across_patch_size_width_and_depth(mismatched, tiny_batch):
    teacher, student = mismatched
    loss = optima_loss(student.distill_modules(), teacher.distill_modules(),
                       student_layouts=token_layouts(student), teacher_layouts=token_layouts(teacher), kd_weight=0.0)
    s_cap, t_cap = _captures(student, teacher, tiny_batch)
    assert t_cap.recorder.hidden(("image", 0)).shape == (3, 1 + 64, 48)
    assert s_cap.recorder.hidden(("image", 0)).shape == (3, 1 + 16, 32)
    arm = frozenset({("image", 0)})
    out = loss(s_cap, t_cap, torch.zeros(()), arm, frozenset({"kd", "hidden", "attn"}))
    assert all(torch.isfinite(torch.as_tensor(v)) for v in out.full.values())
    assert out.full["hidden"] > 0 and out.full["attn"] > 0
    student.zero_grad(set_to_none=True)
    out.objective.backward()
    # gradients flow into the arm's layer (and what feeds it), nowhere else
    grads = {name for name, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("coca.visual.transformer.resblocks.0.") for n in grads)
    assert not any(n.startswith(("coca.visual.transformer.resblocks.1.", "coca.text.", "coca.text_decoder."))
                   for n in grads)
    assert loss.proj["image_0"].weight.grad is not None
    assert all(p.grad is None for name, p in loss.proj.named_parameters() if not name.startswith("image_0."))
    assert all(p.grad is None for p in teacher.parameters())
    # the image hidden loss is the MSE to the teacher's pooled grid (layer map: student 0 -> teacher 1)
    h_t = t_cap.recorder.hidden(("image", 1))
    pooled = torch.cat([h_t[:, :1], F.adaptive_avg_pool2d(
        h_t[:, 1:].transpose(1, 2).reshape(3, 48, 8, 8), (4, 4)).flatten(2).transpose(1, 2)], 1)
    s_cap, t_cap = _captures(student, teacher, tiny_batch)
    with torch.no_grad():
        hidden_only = optima_loss(student.distill_modules(), teacher.distill_modules(), kd_weight=0.0,
                                  attn_weight=0.0, student_layouts=token_layouts(student),
                                  teacher_layouts=token_layouts(teacher))
        hidden_only.proj.load_state_dict(loss.proj.state_dict())
        value = hidden_only(s_cap, t_cap, torch.zeros(()), arm, frozenset()).objective
        expected = F.mse_loss(loss.proj["image_0"](s_cap.recorder.hidden(("image", 0))), pooled)
    torch.testing.assert_close(value, expected)


def test_every_layer_of_the_mismatched_pair_aligns(mismatched, tiny_batch):
    teacher, student = mismatched
    loss = optima_loss(student.distill_modules(), teacher.distill_modules(),
                       student_layouts=token_layouts(student), teacher_layouts=token_layouts(teacher))
    s_cap, t_cap = _captures(student, teacher, tiny_batch)
    with torch.no_grad():
        full = loss(s_cap, t_cap, torch.zeros(()), frozenset(loss.pairs), frozenset({"kd", "hidden", "attn"})).full
    assert set(full) == {"task", "kd", "hidden", "attn"}
    assert all(v == v and abs(v) < float("inf") for v in full.values())


def test_without_layouts_another_patch_size_is_a_config_error_naming_the_layer(mismatched, tiny_batch):
    teacher, student = mismatched
    loss = optima_loss(student.distill_modules(), teacher.distill_modules())
    s_cap, t_cap = _captures(student, teacher, tiny_batch)
    with pytest.raises(ConfigError, match=r"layer image\[0\] hidden state: teacher tensor \(3, 65, 48\) does not "
                                          r"match the student's \(3, 17, 48\)"):
        loss(s_cap, t_cap, torch.zeros(()), frozenset({("image", 0)}), frozenset())


def test_a_layout_that_does_not_fit_the_tensors_names_the_layer(mismatched, tiny_batch):
    teacher, student = mismatched
    wrong = dict(token_layouts(teacher), image={"prefix": 1, "grid": (7, 7)})
    loss = optima_loss(student.distill_modules(), teacher.distill_modules(),
                       student_layouts=token_layouts(student), teacher_layouts=wrong)
    s_cap, t_cap = _captures(student, teacher, tiny_batch)
    with pytest.raises(ConfigError, match=r"layer image\[1\] hidden state: the teacher's token axis has 65 tokens"):
        loss(s_cap, t_cap, torch.zeros(()), frozenset({("image", 1)}), frozenset())


def test_different_pooler_queries_are_refused_when_the_loss_is_built(mismatched):
    _, student = mismatched
    teacher = coca_model(_teacher_arch(attn_pooler_queries=16), layers=(2, 2, 2))
    with pytest.raises(ConfigError, match="module 'multimodal': teacher vision_cfg.attn_pooler_queries=16 but "
                                          "student vision_cfg.attn_pooler_queries=8.*attentional pooler"):
        optima_loss(student.distill_modules(), teacher.distill_modules(),
                    student_layouts=token_layouts(student), teacher_layouts=token_layouts(teacher))
