"""Task heads over a model's features."""
from __future__ import annotations

import torch
from open_clip.transformer import AttentionalPooler
from torch import nn

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
