"""Hidden-state and attention taps on open_clip's real CoCa."""
import pytest
import torch
from torch import nn

from optima.plugins.models.coca import coca_model
from optima.taps import Recorder, attention_probs

from conftest import TINY_COCA


@pytest.fixture(scope="module")
def coca():
    torch.manual_seed(0)
    return coca_model(TINY_COCA).eval()


def _reference(mha, query, key, attn_mask):
    _, weights = mha(query, key, key, need_weights=True, average_attn_weights=True, attn_mask=attn_mask)
    return weights


def test_attention_probs_match_torch_on_every_coca_layer(coca, tiny_batch):
    rec = Recorder(coca.distill_modules())
    with torch.no_grad():
        coca(tiny_batch)
        for key in rec.keys():
            layer = coca.distill_modules()[["image", "text", "multimodal"].index(key[0])].layers[key[1]]
            ours = rec.attention(key)
            assert len(ours) == len(layer.attentions)
            for j, mha in enumerate(layer.attentions):
                query, k, mask, _ = rec._attn_inputs[(key, j)]
                ref = _reference(mha, query, k, mask)
                assert ours[j].shape == ref.shape
                torch.testing.assert_close(ours[j], ref, atol=1e-5, rtol=0)
                assert torch.allclose(ours[j].sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "causal_float", "per_head_3d", "bool"])
def test_attention_probs_match_torch_with_masks(mask_kind):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    q, k = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    mask = {
        "none": None,
        "causal_float": torch.full((5, 5), float("-inf")).triu(1),
        "per_head_3d": torch.randn(2 * 4, 5, 5),
        "bool": torch.ones(5, 5, dtype=torch.bool).triu(1),
    }[mask_kind]
    torch.testing.assert_close(attention_probs(mha, q, k, mask), _reference(mha, q, k, mask), atol=1e-5, rtol=0)


def test_hidden_taps_are_each_layers_output(coca, tiny_batch):
    rec = Recorder(coca.distill_modules())
    with torch.no_grad():
        features = coca(tiny_batch)
        vis = coca.coca.visual.forward_intermediates(tiny_batch["image"], intermediates_only=True,
                                                     output_fmt="NLC", output_extra_tokens=True)
        txt = coca.coca.text.forward_intermediates(tiny_batch["text"], intermediates_only=True, output_fmt="NLC",
                                                   output_extra_tokens=True)
    for i in range(4):
        torch.testing.assert_close(rec.hidden(("image", i))[:, 1:], vis["image_intermediates"][i])
        torch.testing.assert_close(rec.hidden(("image", i))[:, :1], vis["image_intermediates_prefix"][i])
        torch.testing.assert_close(rec.hidden(("text", i))[:, :-1], txt["text_intermediates"][i])
    # the decoder's last layer, normalised, is what the model returns
    torch.testing.assert_close(coca.coca.text_decoder.ln_final(rec.hidden(("multimodal", 3))), features)


def test_recorder_remove_detaches_hooks(coca, tiny_batch):
    rec = Recorder(coca.distill_modules())
    rec.remove()
    with torch.no_grad():
        coca(tiny_batch)
    assert not rec._hidden and not rec._attn_inputs
