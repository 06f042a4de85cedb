"""Triton GPU kernels: KV-cache store and paged attention (prefill and split-K decode)."""

from nanovllm.kernels.kv_store import store_kvcache
from nanovllm.kernels.paged_attention import decode_attention, prefill_attention

__all__ = ["decode_attention", "prefill_attention", "store_kvcache"]
