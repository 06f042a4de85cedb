"""The attention layer: writes the step's new K/V into the paged cache, then attends through the
backend chosen at start-up (flash-attn, Triton or plain PyTorch)."""

import torch
from torch import nn

from nanovllm.utils.context import ForwardContext


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        # Bound by the model runner once the cache exists: [num_blocks, block_size, kv_heads, head_dim]
        self.k_cache = self.v_cache = torch.tensor([])
        self.backend = None
        self.forward_context: ForwardContext | None = None  # the owning runner's, bound at start-up

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        if self.backend is None or self.forward_context is None:
            raise RuntimeError("attention layer has no backend: the model runner binds one at start-up")
        meta = self.forward_context.get()
        has_cache = self.k_cache.numel() > 0
        if has_cache:
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.is_prefill:
            o = self.backend.prefill(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        else:
            o = self.backend.decode(q, self.k_cache, self.v_cache, meta, self.scale)
        return o.reshape(q.shape[0], self.num_heads * self.head_dim)  # [num_tokens, num_heads * head_dim]
