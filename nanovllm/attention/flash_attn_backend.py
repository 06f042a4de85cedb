"""flash-attn's paged kernels (the original nano-vllm's calls); the KV store is our Triton kernel."""

import torch
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from nanovllm.attention.backend import AttentionBackend
from nanovllm.config import FLASH_ATTN_BLOCK_SIZE_MULTIPLE
from nanovllm.kernels.kv_store import store_kvcache
from nanovllm.utils.context import AttentionMetadata


def _window_size(sliding_window: int | None) -> tuple[int, int]:
    """flash-attn's (left, right) window: W keys including the query's own is (W - 1, 0); -1 is none."""
    return (-1, -1) if sliding_window is None else (sliding_window - 1, 0)


class FlashAttnBackend(AttentionBackend):
    name = "flash-attn"
    supports_cuda_graphs = True
    accepts_fused_kv_store = True

    def check_dtype(self, dtype) -> None:
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"attention_backend='flash-attn' runs in float16 or bfloat16, not {dtype}; "
                f"pass dtype='bfloat16' or use attention_backend='triton'"
            )

    def check_kv_cache_dtype(self, kv_cache_dtype, dtype) -> None:
        if kv_cache_dtype != dtype:
            raise ValueError(
                f"attention_backend='flash-attn' cannot read a {kv_cache_dtype} KV cache (the flash-attn 2 "
                "kernels take the compute dtype only); use attention_backend='triton' (or 'auto', which "
                "picks it for kv_cache_dtype='fp8')"
            )

    def check_block_size(self, block_size: int) -> None:
        if block_size % FLASH_ATTN_BLOCK_SIZE_MULTIPLE:
            raise ValueError(
                f"attention_backend='flash-attn' needs kvcache_block_size to be a multiple of "
                f"{FLASH_ATTN_BLOCK_SIZE_MULTIPLE}, got {block_size}"
            )

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        store_kvcache(k, v, k_cache, v_cache, slot_mapping)  # a compute-dtype cache: no scales

    def prefill(
        self,
        q,
        k,
        v,
        k_cache,
        v_cache,
        meta: AttentionMetadata,
        scale,
        sliding_window=None,
        k_scale=1.0,
        v_scale=1.0,
    ):
        if meta.block_tables is not None:
            k, v = k_cache, v_cache
        return flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q=meta.cu_seqlens_q,
            cu_seqlens_k=meta.cu_seqlens_k,
            max_seqlen_q=meta.max_seqlen_q,
            max_seqlen_k=meta.max_seqlen_k,
            softmax_scale=scale,
            causal=True,
            window_size=_window_size(sliding_window),
            block_table=meta.block_tables,
        )

    def decode(
        self,
        q,
        k_cache,
        v_cache,
        meta: AttentionMetadata,
        scale,
        sliding_window=None,
        k_scale=1.0,
        v_scale=1.0,
    ):
        o = flash_attn_with_kvcache(
            q.unsqueeze(1),  # [batch, 1, num_heads, head_dim]
            k_cache,
            v_cache,
            cache_seqlens=meta.context_lens,
            block_table=meta.block_tables,
            softmax_scale=scale,
            causal=True,
            window_size=_window_size(sliding_window),
            num_splits=meta.num_splits or 1,
        )
        return o.squeeze(1)  # [batch, num_heads, head_dim]
