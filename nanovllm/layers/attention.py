"""The attention layer: writes the step's new K/V into the paged cache, then attends through the
backend chosen at start-up (flash-attn, Triton or plain PyTorch)."""

import torch
from torch import nn

from nanovllm.utils.context import AttentionMetadata, ForwardContext


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
        # Keys this layer sees: the last `sliding_window` positions up to the query's own (None: all).
        # Set by the model from the checkpoint's per-layer windows.
        self.sliding_window: int | None = None
        # Per-tensor scales of an FP8 KV cache (the cache holds K / k_scale): 1.0 unless the checkpoint
        # gives `k_scale` / `v_scale` (set by the loader), as in vLLM.
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.forward_context: ForwardContext | None = None  # the owning runner's, bound at start-up

    def step_metadata(self) -> AttentionMetadata:
        """The current step's metadata (RuntimeError outside a forward pass)."""
        if self.forward_context is None:
            raise RuntimeError("attention layer has no backend: the model runner binds one at start-up")
        return self.forward_context.get()

    def fused_store_target(self) -> dict | None:
        """Where a fused kernel may write this step's K/V itself (as `kernels/qk_norm_rope.py` does, with
        these keyword arguments; then call forward with `kv_stored=True`), or None: the backend stores
        them (no cache yet, or a backend with a cache of its own)."""
        if self.backend is None or not self.backend.accepts_fused_kv_store or self.k_cache.numel() == 0:
            return None
        return dict(
            k_cache=self.k_cache,
            v_cache=self.v_cache,
            slot_mapping=self.step_metadata().slot_mapping,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_stored: bool = False
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        # kv_stored: the caller's fused kernel already wrote k and v into the cache (fused_store_target).
        if self.backend is None or self.forward_context is None:
            raise RuntimeError("attention layer has no backend: the model runner binds one at start-up")
        meta = self.step_metadata()
        window = self.sliding_window
        has_cache = self.k_cache.numel() > 0
        if has_cache and not kv_stored:
            self.backend.store_kv(
                k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale
            )
        kv_scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        if meta.is_prefill:
            o = self.backend.prefill(
                q, k, v, self.k_cache, self.v_cache, meta, self.scale, window, **kv_scales
            )
        else:
            o = self.backend.decode(q, self.k_cache, self.v_cache, meta, self.scale, window, **kv_scales)
        return o.reshape(q.shape[0], self.num_heads * self.head_dim)  # [num_tokens, num_heads * head_dim]
