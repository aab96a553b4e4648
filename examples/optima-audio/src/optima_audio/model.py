"""CoCa with a fourth module, `audio`: log-mel frames (computed with torch) through
a small transformer, whose tokens join the image tokens in the memory that the
multimodal decoder cross-attends to.

    wave (B, S) -> log-mel (B, T, n_mels) -> linear + positions (B, T, w_a)
      -> `audio` transformer blocks (B, T, w_a) -> LN, linear (B, T, w_dec)
    decoder memory = [image tokens (B, N, w_dec); audio tokens (B, T, w_dec)]

The audio blocks are open_clip `ResidualAttentionBlock`s (batch-first
`nn.MultiheadAttention`), so OPTIMA's recorder reads their hidden states and
attention maps exactly as it reads CoCa's, and the arms are every non-empty
subset of (image, text, multimodal, audio): 15.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from open_clip.transformer import LayerNorm, Transformer
from torch import nn

from optima.errors import ConfigError
from optima.interfaces import Batch, Layer, Module
from optima.plugins.models.coca import CoCaExtension, CoCaModel, coca_model

MODULES = ("image", "text", "multimodal", "audio")


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """HTK mel scale."""
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Triangular filters `(n_freqs, n_mels)` on the HTK mel scale, peak 1, over
    the `n_freqs` STFT bins from 0 to `sample_rate / 2`."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ConfigError(f"mel band [{f_min}, {f_max}] Hz must lie in [0, {sample_rate / 2}] (sample_rate / 2)")
    freqs = torch.linspace(0.0, sample_rate / 2, n_freqs)
    edges = mel_to_hz(torch.linspace(hz_to_mel(torch.tensor(f_min)), hz_to_mel(torch.tensor(f_max)), n_mels + 2))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # (n_mels,) each
    rising = (freqs[:, None] - lower) / (centre - lower)
    falling = (upper - freqs[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


class LogMel(nn.Module):
    """Waveforms `(B, S)` -> log-mel frames `(B, 1 + S // hop_length, n_mels)`
    (Hann-windowed power STFT, centred frames)."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        # Non-persistent: derived from the arguments, so not part of checkpoints.
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("filters", mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave.float(), self.n_fft, self.hop_length, window=self.window, center=True,
                          return_complex=True).abs().pow(2)  # (B, n_freqs, T)
        return torch.log(spec.transpose(1, 2) @ self.filters + 1e-6)  # (B, T, n_mels)


class AudioEncoder(nn.Module):
    """Log-mel frames, normalised per clip, through `layers` transformer blocks."""

    def __init__(self, out_dim: int, width: int, layers: int, heads: int, *, sample_rate: int, n_fft: int,
                 hop_length: int, n_mels: int, max_frames: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"audio_coca_model.audio_width ({width}) must be divisible by audio_heads ({heads})")
        self.max_frames = max_frames
        self.mel = LogMel(sample_rate, n_fft, hop_length, n_mels)
        self.embed = nn.Linear(n_mels, width)
        self.positional = nn.Parameter(torch.randn(max_frames, width) * 0.02)
        self.transformer = Transformer(width, layers, heads, batch_first=True)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.mel(wave)  # (B, T, n_mels)
        if x.shape[1] > self.max_frames:
            raise ConfigError(f"{x.shape[1]} audio frames exceed audio_coca_model.max_frames={self.max_frames}; "
                              f"raise it or the hop_length")
        # loudness varies from clip to clip: normalise each clip's spectrogram
        x = (x - x.mean(dim=(1, 2), keepdim=True)) / (x.std(dim=(1, 2), keepdim=True) + 1e-5)
        x = self.embed(x) + self.positional[: x.shape[1]]  # (B, T, width)
        return self.proj(self.ln_post(self.transformer(x)))  # (B, T, out_dim)


class AudioCoCaModel(CoCaExtension):
    """CoCa (image, text, multimodal) plus an `audio` module; `forward` returns the
    multimodal decoder's token features `(B, L, width)`, as `CoCaModel` does."""

    def __init__(self, coca: CoCaModel, audio: AudioEncoder):
        super().__init__(coca)
        self.audio = audio
        self._audio = Module("audio", tuple(Layer(b, (b.attn,)) for b in audio.transformer.resblocks))

    def new_modules(self) -> Sequence[Module]:
        return (self._audio,)

    def forward(self, batch: Batch) -> torch.Tensor:
        memory = torch.cat([self.coca.encode_image(batch["image"]), self.audio(batch["audio"])], dim=1)  # (B, N + T, w)
        return self.coca.decode(memory, self.coca.encode_text(batch["text"]))


def audio_coca_model(arch: str | Mapping[str, Any] = "coca_ViT-B-32", layers: Sequence[int] | None = None,
                     overrides: Mapping[str, Any] | None = None, pretrained: str | None = None,
                     audio_width: int | None = None, audio_heads: int = 4, sample_rate: int = 16_000,
                     n_fft: int = 400, hop_length: int = 160, n_mels: int = 64,
                     max_frames: int = 256) -> AudioCoCaModel:
    """CoCa with an audio module: image, text, multimodal and audio layers.

    `arch`, `overrides`, `pretrained`: as `coca_model` (the audio module always
    starts from random weights). `layers`: (image, text, multimodal, audio)
    layer counts; `None` keeps the CoCa architecture's and gives audio 2.
    `audio_width`: the audio transformer's width (default: the decoder's).
    `sample_rate` must be the task's; `n_fft`, `hop_length` (samples) and `n_mels`
    set the log-mel frames (defaults: 25 ms windows, 10 ms hops at 16 kHz).
    """
    if layers is not None and len(layers) != len(MODULES):
        raise ConfigError(f"audio_coca_model.layers needs {len(MODULES)} counts ({', '.join(MODULES)}), "
                          f"got {list(layers)}")
    coca = coca_model(arch, overrides=overrides, layers=None if layers is None else tuple(layers[:3]),
                      pretrained=pretrained)
    width = coca.memory_width
    audio = AudioEncoder(width, audio_width or width, 2 if layers is None else int(layers[3]), audio_heads,
                         sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
                         max_frames=max_frames)
    return AudioCoCaModel(coca, audio)
