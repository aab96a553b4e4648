import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# A CoCa small enough for unit tests, with open_clip's real classes.
TINY_COCA = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 4, "head_width": 8,
                   "attentional_pool": True, "attn_pooler_queries": 8, "attn_pooler_heads": 4, "output_tokens": True},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 4,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 4,
                       "attn_pooler_heads": 4},
}


# tests/gin/tiny_ve.gin (the pipeline without pretraining) at test sizes.
TINY = [
    "synthetic_ve_task.train_size = 256", "synthetic_ve_task.test_size = 64", "synthetic_ve_task.val_size = 0",
    "teacher_training.steps = 4", "teacher_training.warmup_steps = 0", "teacher_training.batch_size = 16",
    "distillation.rounds = 4", "distillation.steps_per_round = 2", "distillation.batch_size = 16",
    "distillation.warmup_steps = 0", "optima_policy.warmup_rounds = 7",
]


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 49000, (3, 12), generator=g)
    text[:, 0] = 49406
    text[0, 5:] = 0  # padding, so the text tower's pad mask is exercised
    return {"image": torch.randn(3, 3, 32, 32, generator=g), "text": text, "label": torch.tensor([0, 1, 2])}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path_factory.getbasetemp() / "optima-cache"))
    monkeypatch.chdir(ROOT)
    # tiny models: one thread avoids spin-waiting between threads on a shared 2-core machine
    torch.set_num_threads(1)
