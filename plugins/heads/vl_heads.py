"""Task heads over a model's features."""
from __future__ import annotations

import torch
from open_clip.transformer import AttentionalPooler
from torch import nn

from optima.errors import ConfigError
from optima.interfaces import DistillableModel, Head, Task


class AttentionalPoolerHead(Head):
    """CoCa's classification recipe: an attentional pooler with one query over the
    multimodal decoder output `(B, L, D)`, then a linear classifier."""

    def __init__(self, feature_dim: int, num_outputs: int, heads: int = 4):
        super().__init__()
        self.pool = AttentionalPooler(feature_dim, feature_dim, n_head=heads, n_queries=1)
        self.classifier = nn.Linear(feature_dim, num_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(features)[:, 0])


def attentional_pooler_head(model: DistillableModel, task: Task, heads: int = 4) -> AttentionalPoolerHead:
    """Attentional pooler (1 query) + linear layer over `model`'s features, `task.num_outputs` classes."""
    return AttentionalPoolerHead(model.feature_dim, task.num_outputs, heads)


class PairHead(Head):
    """NLVR2's recipe (CoCa): the attentional pooler over each (image, text) pass,
    the `n` pooled vectors of an example concatenated, then a linear classifier.

    The engine runs a batch of `B` examples with `n` images each as `B * n`
    passes, example-major (`image.flatten(0, 1)`), so the features arrive as
    `(B * n, L, D)` and `(B * n, D)` reshapes to `(B, n * D)` with each example's
    passes side by side, in image order.
    """

    def __init__(self, feature_dim: int, num_outputs: int, heads: int = 4, images_per_example: int = 2):
        super().__init__()
        if images_per_example < 1:
            raise ConfigError(f"pair_head.images_per_example must be >= 1, got {images_per_example}")
        self.n = int(images_per_example)
        self.pool = AttentionalPooler(feature_dim, feature_dim, n_head=heads, n_queries=1)
        self.classifier = nn.Linear(self.n * feature_dim, num_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[0] % self.n:
            raise ConfigError(f"pair_head got {features.shape[0]} (image, text) passes, not a multiple of "
                              f"{self.n} images per example; the batch's image must be (B, {self.n}, 3, H, W)")
        pooled = self.pool(features)[:, 0]  # (B * n, D)
        return self.classifier(pooled.reshape(-1, self.n * pooled.shape[-1]))


def pair_head(model: DistillableModel, task: Task, heads: int = 4, images_per_example: int = 2) -> PairHead:
    """Attentional pooler per image, pooled outputs concatenated, linear layer (NLVR2)."""
    return PairHead(model.feature_dim, task.num_outputs, heads, images_per_example)


class CaptionHead(Head):
    """Next-token logits `(B, L, vocab)` = decoder features `(B, L, D)` @ the model's
    own `(D, vocab)` vocabulary projection.

    The projection is the model's Parameter itself (registered here too, so the
    head's state_dict shows it; `parameters()` lists it once): pretrained
    weights are used and trained with the model, and KD compares the teacher's
    and student's next-token distributions.
    """

    def __init__(self, projection: nn.Parameter):
        super().__init__()
        self.projection = projection

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.projection


def caption_head(model: DistillableModel, task: Task) -> CaptionHead:
    """Captioning head sharing `model.vocab_projection()`; `task.num_outputs` must be its vocabulary."""
    get = getattr(model, "vocab_projection", None)
    if get is None:
        raise ConfigError(f"caption_head needs a model with a vocab_projection() (e.g. coca_model); "
                          f"{type(model).__name__} has none")
    projection = get()
    if not isinstance(projection, nn.Parameter) or projection.dim() != 2:
        raise ConfigError(f"{type(model).__name__}.vocab_projection() must return a (width, vocab) Parameter, "
                          f"got {type(projection).__name__} {tuple(getattr(projection, 'shape', ()))}")
    if projection.shape[0] != model.feature_dim:
        raise ConfigError(f"vocab projection {tuple(projection.shape)} does not take the model's "
                          f"{model.feature_dim}-d features")
    if projection.shape[1] != task.num_outputs:
        raise ConfigError(f"the model's vocabulary has {projection.shape[1]} tokens but the task has "
                          f"{task.num_outputs} outputs; use the same tokenizer vocabulary")
    return CaptionHead(projection)
