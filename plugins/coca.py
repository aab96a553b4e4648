"""CoCa (open_clip's real `CoCa` class) as a `DistillableModel` with three modules:

- `image`: `visual.transformer.resblocks` (ViT blocks over class token + patches),
- `text`: `text.transformer.resblocks` (the unimodal text decoder, with CoCa's
  appended class token),
- `multimodal`: the decoder's layers, each a causal self-attention block
  (`text_decoder.resblocks[i]`) followed by a cross-attention block
  (`text_decoder.cross_attn[i]`); the layer's hidden state is the cross block's
  output and both attentions are matched.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from optima.errors import ConfigError
from optima.interfaces import Batch, DistillableModel, Layer, Module

MODULES = ("image", "text", "multimodal")


def _merge(base: dict, overrides: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


def coca_config(arch: str | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                layers: Sequence[int] | None = None) -> dict:
    """An open_clip CoCa config: a registered name (`coca_ViT-B-32`) or a dict with
    `embed_dim`, `vision_cfg`, `text_cfg`, `multimodal_cfg`; then `overrides`
    (nested) and `layers` = (image, text, multimodal) layer counts."""
    import open_clip

    if isinstance(arch, str):
        cfg = open_clip.get_model_config(arch)
        if cfg is None or "multimodal_cfg" not in cfg:
            known = [n for n in open_clip.list_models() if n.startswith("coca")]
            raise ConfigError(f"unknown CoCa architecture {arch!r}; open_clip has: {', '.join(known)}")
    else:
        cfg = dict(arch)
    cfg = _merge(cfg, overrides or {})
    if layers is not None:
        if len(layers) != 3:
            raise ConfigError(f"coca_model.layers needs 3 counts (image, text, multimodal), got {list(layers)}")
        for part, n in zip(("vision_cfg", "text_cfg", "multimodal_cfg"), layers):
            cfg[part]["layers"] = int(n)
    cfg.pop("custom_text", None)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg") if k not in cfg]
    if missing:
        raise ConfigError(f"CoCa architecture dict lacks {missing}")
    return cfg


class CoCaModel(DistillableModel):
    """Wraps an `open_clip.coca_model.CoCa`; `forward` returns the multimodal
    decoder's normalised token features `(B, L, width)`.

    The decoder loop is spelled out (as in open_clip's `MultimodalTransformer`)
    to stop before the vocabulary projection, which classification does not use.
    """

    def __init__(self, coca: nn.Module):
        super().__init__()
        self.coca = coca
        self.feature_dim = coca.text_decoder.ln_final.normalized_shape[0]
        dec = coca.text_decoder
        self._modules_spec = (
            Module("image", tuple(Layer(b, (b.attn,)) for b in coca.visual.transformer.resblocks)),
            Module("text", tuple(Layer(b, (b.attn,)) for b in coca.text.transformer.resblocks)),
            Module("multimodal", tuple(Layer(x, (s.attn, x.attn)) for s, x in zip(dec.resblocks, dec.cross_attn))),
        )

    def distill_modules(self) -> Sequence[Module]:
        return self._modules_spec

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens for the decoder `(B, N, w)` and text tokens `(B, L, w)`."""
        _, image_embs = self.coca._encode_image(batch["image"])
        _, token_embs = self.coca._encode_text(batch["text"])
        return image_embs, token_embs

    def decode(self, image_embs: torch.Tensor, token_embs: torch.Tensor) -> torch.Tensor:
        dec = self.coca.text_decoder
        x, n = token_embs, token_embs.shape[1]
        for self_block, cross_block in zip(dec.resblocks, dec.cross_attn):
            x = self_block(x, attn_mask=dec.attn_mask[:n, :n])
            x = cross_block(x, k_x=image_embs, v_x=image_embs)
        return dec.ln_final(x)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.decode(*self.encode(batch))

    def vocab_projection(self) -> nn.Parameter:
        """The decoder's `(width, vocab)` output projection (for captioning heads)."""
        return self.coca.text_decoder.text_projection


def coca_model(arch: str | Mapping[str, Any] = "coca_ViT-B-32", overrides: Mapping[str, Any] | None = None,
               layers: Sequence[int] | None = None, pretrained: str | None = None,
               device: str | torch.device | None = None) -> CoCaModel:
    """Build a CoCa by open_clip name or architecture dict.

    `pretrained`: a local checkpoint file (open_clip or plain state dict), or an
    open_clip pretrained tag for a named architecture (fetched by open_clip from
    its hub; never used in tests). `None` keeps open_clip's random initialisation.
    """
    from open_clip.coca_model import CoCa

    cfg = coca_config(arch, overrides, layers)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        coca = CoCa(**cfg)
    # open_clip leaves the decoder's vocabulary projection as torch.empty (its
    # init_parameters is never called): garbage memory, which would also make the
    # teacher cache key non-deterministic.
    dec = coca.text_decoder
    torch.nn.init.normal_(dec.text_projection, std=dec.width ** -0.5)
    if pretrained:
        _load_pretrained(coca, arch, pretrained)
    return CoCaModel(coca)


def _load_pretrained(coca: nn.Module, arch, pretrained: str) -> None:
    import open_clip

    if os.path.isfile(pretrained):
        try:
            open_clip.load_checkpoint(coca, pretrained, strict=True)
        except RuntimeError as e:  # state-dict mismatch
            first = str(e).strip().splitlines()
            raise ConfigError(f"checkpoint {pretrained} does not fit this CoCa architecture: "
                              f"{' '.join(first[:3])[:300]}") from None
        return
    if isinstance(arch, str) and pretrained in open_clip.list_pretrained_tags_by_model(arch):
        ref = open_clip.create_model(arch, pretrained=pretrained)
        coca.load_state_dict(ref.state_dict())
        return
    raise ConfigError(f"coca_model.pretrained={pretrained!r} is neither an existing file nor a pretrained "
                      f"tag of {arch!r}; give a local checkpoint path")
