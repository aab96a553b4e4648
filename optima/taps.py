"""Read hidden states and attention probabilities of a model's layers.

The forward pass stays on the fast path (`need_weights=False`, fused SDPA). A
pre-hook on each `nn.MultiheadAttention` keeps references to its normalised
inputs and mask, which the autograd graph holds anyway; head-averaged
probabilities are computed from them only for the layers a loss asks for.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from optima.interfaces import Module

LayerKey = tuple[str, int]  # (module name, 0-based layer index)


def attention_probs(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                    attn_mask: torch.Tensor | None = None,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Head-averaged softmax(QK^T / sqrt(d_head) + mask) of a batch-first MHA:
    `(B, L, S)`, what `mha(..., need_weights=True, average_attn_weights=True)` returns."""
    if not mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    d, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q = b_k = None
    if mha.in_proj_bias is not None:
        b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    B, L, S = query.shape[0], query.shape[1], key.shape[1]
    q = F.linear(query, w_q, b_q).view(B, L, h, d // h).transpose(1, 2)  # B h L dh
    k = F.linear(key, w_k, b_k).view(B, S, h, d // h).transpose(1, 2)  # B h S dh
    scores = (q * (d // h) ** -0.5) @ k.transpose(-1, -2)  # B h L S
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
        # a 3-D mask is (B*h, L, S), one per head; a 2-D one (L, S) broadcasts
        scores = scores + (attn_mask.view(B, h, L, S) if attn_mask.dim() == 3 else attn_mask).to(scores.dtype)
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        else:
            scores = scores + key_padding_mask[:, None, None, :].to(scores.dtype)
    return scores.softmax(-1).mean(1)


class Recorder:
    """Hooks on every layer of `modules`; after a forward, `hidden(key)` and
    `attention(key)` read layer `key = (module, index)`.

    Attention probabilities are computed on demand (with gradients if the caller
    has them enabled) and cached per forward; `clear()` drops the references.

    `always=False`: record only the forwards run inside `with recorder.recording():`,
    which starts from nothing. The distillation loop records so: under
    torch.compile the hooks are traced into the graph, which guards on what they
    touch; a recorder that kept an earlier forward's tensors (an evaluation pass,
    another loop's recorder on the same network) would make the next compiled
    forward a new graph, recompiled (the GPU benchmark's compiled steps, run
    beside such recorders, turned NaN at that step; on the CPU they recompile
    there but stay finite).
    """

    def __init__(self, modules: Sequence[Module], *, always: bool = True):
        self.always, self.on = always, always
        self.modules = {m.name: m for m in modules}
        self._hidden: dict[LayerKey, torch.Tensor] = {}
        self._attn_inputs: dict[tuple[LayerKey, int], tuple] = {}
        self._attn_cache: dict[tuple[LayerKey, bool], list[torch.Tensor]] = {}
        self._handles = []
        for m in modules:
            for i, layer in enumerate(m.layers):
                self._handles.append(layer.block.register_forward_hook(self._keep_hidden((m.name, i))))
                for j, mha in enumerate(layer.attentions):
                    self._handles.append(mha.register_forward_pre_hook(
                        self._keep_attn_inputs(((m.name, i), j)), with_kwargs=True))

    @contextlib.contextmanager
    def recording(self) -> Iterator["Recorder"]:
        """Record the forwards run inside, starting from nothing (`clear()`)."""
        self.clear()
        self.on = True
        try:
            yield self
        finally:
            self.on = self.always

    def _keep_hidden(self, key: LayerKey):
        def hook(_module, _args, output):
            if self.on:
                self._hidden[key] = output[0] if isinstance(output, tuple) else output
        return hook

    def _keep_attn_inputs(self, key):
        def hook(_module, args, kwargs):
            if not self.on:
                return
            names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
            bound = dict(zip(names, args)) | kwargs
            self._attn_inputs[key] = (bound["query"], bound["key"], bound.get("attn_mask"),
                                      bound.get("key_padding_mask"))
        return hook

    def keys(self) -> list[LayerKey]:
        return [(name, i) for name, m in self.modules.items() for i in range(len(m))]

    def hidden(self, key: LayerKey) -> torch.Tensor:
        """The layer's output `(B, seq, width)`."""
        return self._hidden[key]

    def attention(self, key: LayerKey) -> list[torch.Tensor]:
        """Head-averaged attention probabilities of each attention in the layer."""
        cache_key = (key, torch.is_grad_enabled())
        if cache_key not in self._attn_cache:
            layer = self.modules[key[0]].layers[key[1]]
            self._attn_cache[cache_key] = [
                attention_probs(mha, *self._attn_inputs[(key, j)]) for j, mha in enumerate(layer.attentions)]
        return self._attn_cache[cache_key]

    def clear(self) -> None:
        self._hidden.clear()
        self._attn_inputs.clear()
        self._attn_cache.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()
