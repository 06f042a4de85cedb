"""Our Triton kernels: KV store, paged prefill (with a cached prefix) and split-K paged decode."""

from nanovllm.attention.backend import AttentionBackend
from nanovllm.kernels.kv_store import store_kvcache
from nanovllm.kernels.paged_attention import decode_attention, prefill_attention
from nanovllm.utils.context import AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True
    accepts_fused_kv_store = True

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

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
        if meta.block_tables is not None:  # some sequence has a cached prefix: keys come from the cache
            k, v = k_cache, v_cache
        return prefill_attention(
            q,
            k,
            v,
            meta.cu_seqlens_q,
            meta.cu_seqlens_k,
            meta.max_seqlen_q,
            meta.max_seqlen_k,
            scale,
            block_tables=meta.block_tables,
            sliding_window=sliding_window,
            k_scale=k_scale,
            v_scale=v_scale,
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
        return decode_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            scale,
            num_splits=meta.num_splits,
            sliding_window=sliding_window,
            k_scale=k_scale,
            v_scale=v_scale,
        )
