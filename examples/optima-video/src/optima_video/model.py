"""CoCa for video with a fourth module, `video`: every frame goes through CoCa's
image encoder, then a temporal transformer attends across frames, one sequence
per image token (a factorised space-time encoder, as in ViViT):

    video (B, F, 3, H, W) -> image encoder per frame -> tokens (B, F, N, w)
      -> + frame positions, one sequence over time per token: (B*N, F, w_t)
      -> `video` transformer blocks -> LN, linear -> decoder memory (B, F*N, w)

The multimodal decoder cross-attends to those time-aware tokens. The temporal
blocks are open_clip `ResidualAttentionBlock`s (batch-first
`nn.MultiheadAttention`), so OPTIMA distils their hidden states and attention
maps like CoCa's; the arms are every non-empty subset of (image, text,
multimodal, video): 15.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from open_clip.transformer import LayerNorm, Transformer
from torch import nn

from optima.errors import ConfigError
from optima.interfaces import Batch, Layer, Module
from optima.plugins.models.coca import CoCaExtension, CoCaModel, coca_model

MODULES = ("image", "text", "multimodal", "video")


class TemporalEncoder(nn.Module):
    """Per-frame tokens `(B, F, N, dim)` -> tokens mixed across frames `(B, F*N, dim)`."""

    def __init__(self, dim: int, width: int, layers: int, heads: int, max_frames: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"video_coca_model.temporal_width ({width}) must be divisible by "
                              f"temporal_heads ({heads})")
        self.max_frames = max_frames
        self.proj_in = nn.Linear(dim, width)
        self.ln_pre = LayerNorm(width)
        # Unit-scale frame embeddings on layer-normed tokens: the same image token
        # differs little from frame to frame, so the frame order must stand out
        # (with ViT's usual 0.02 the tiny demo models never learned the order).
        self.positional = nn.Parameter(torch.randn(max_frames, width))
        self.transformer = Transformer(width, layers, heads, batch_first=True)
        self.ln_post = LayerNorm(width)
        self.proj_out = nn.Linear(width, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, F, N, _ = tokens.shape
        if F > self.max_frames:
            raise ConfigError(f"{F} frames exceed video_coca_model.max_frames={self.max_frames}")
        x = self.ln_pre(self.proj_in(tokens)) + self.positional[:F, None, :]  # (B, F, N, w_t)
        x = x.transpose(1, 2).reshape(B * N, F, -1)  # one sequence over time per token
        x = self.ln_post(self.transformer(x))  # (B*N, F, w_t)
        x = x.reshape(B, N, F, -1).transpose(1, 2).reshape(B, F * N, -1)  # (B, F*N, w_t)
        return self.proj_out(x)


class VideoCoCaModel(CoCaExtension):
    """CoCa (image, text, multimodal) plus a temporal `video` module. Reads
    `batch["video"]` `(B, F, 3, H, W)` and `batch["text"]`; `forward` returns
    the multimodal decoder's token features `(B, L, width)`."""

    def __init__(self, coca: CoCaModel, temporal: TemporalEncoder):
        super().__init__(coca)
        self.temporal = temporal
        self._video = Module("video", tuple(Layer(b, (b.attn,)) for b in temporal.transformer.resblocks))

    def new_modules(self) -> Sequence[Module]:
        return (self._video,)

    def forward(self, batch: Batch) -> torch.Tensor:
        video = batch["video"]
        B, F = video.shape[:2]
        frame_tokens = self.coca.encode_image(video.flatten(0, 1))  # (B*F, N, w)
        memory = self.temporal(frame_tokens.unflatten(0, (B, F)))  # (B, F*N, w)
        return self.coca.decode(memory, self.coca.encode_text(batch["text"]))


def video_coca_model(arch: str | Mapping[str, Any] = "coca_ViT-B-32", layers: Sequence[int] | None = None,
                     overrides: Mapping[str, Any] | None = None, pretrained: str | None = None,
                     temporal_width: int | None = None, temporal_heads: int = 4,
                     max_frames: int = 32) -> VideoCoCaModel:
    """CoCa with a temporal video module: image, text, multimodal and video layers.

    `arch`, `overrides`, `pretrained`: as `coca_model` (the video module always
    starts from random weights). `layers`: (image, text, multimodal, video)
    layer counts; `None` keeps the CoCa architecture's and gives video 2.
    `temporal_width`: the temporal transformer's width (default: the decoder's).
    """
    if layers is not None and len(layers) != len(MODULES):
        raise ConfigError(f"video_coca_model.layers needs {len(MODULES)} counts ({', '.join(MODULES)}), "
                          f"got {list(layers)}")
    coca = coca_model(arch, overrides=overrides, layers=None if layers is None else tuple(layers[:3]),
                      pretrained=pretrained)
    dim = coca.memory_width
    temporal = TemporalEncoder(dim, temporal_width or dim, 2 if layers is None else int(layers[3]),
                               temporal_heads, max_frames)
    return VideoCoCaModel(coca, temporal)
