"""The one interface every attention implementation provides (the choice among them: `selector.py`)."""

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from nanovllm.utils.context import AttentionMetadata


class AttentionBackend(ABC):
    """Stores new K/V into the paged cache and computes attention for prefill and decode steps.

    Caches are `[num_blocks, block_size, num_kv_heads, head_dim]` per layer. Implementations must
    not synchronise with the host in `store_kv` and `decode` when `supports_cuda_graphs` is True.
    An FP8 (float8_e4m3fn) cache holds K / k_scale and V / v_scale (per layer; 1.0 unless the checkpoint
    gives scales): `store_kv` quantizes, `prefill` and `decode` read it back dequantized.
    """

    name: ClassVar[str]
    supports_cuda_graphs: ClassVar[bool] = False
    # True where the cache is the layout `kernels/kv_store.py` writes without host synchronisation, so
    # that a model's fused q/k-norm + rope kernel may store K/V itself in place of `store_kv`.
    accepts_fused_kv_store: ClassVar[bool] = False

    def check_block_size(self, block_size: int) -> None:
        """Raise ValueError if this backend cannot use caches of `block_size` tokens per block."""

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Raise ValueError if this backend cannot compute in `dtype`."""

    def check_kv_cache_dtype(self, kv_cache_dtype: torch.dtype, dtype: torch.dtype) -> None:
        """Raise ValueError if this backend cannot use a `kv_cache_dtype` cache beside `dtype` compute."""

    @abstractmethod
    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        """Write k, v `[num_tokens, num_kv_heads, head_dim]` into the cache; slot -1 is skipped."""

    @abstractmethod
    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        """Causal attention of the new tokens over their sequence's prefix and themselves.

        Without `meta.block_tables` the keys are exactly the new k, v; with it they are read
        from the cache. With `sliding_window` W a query at position i sees only keys i - W < j <= i
        (transformers' count: W keys, its own included); block-table entries of blocks wholly before
        every query's window may be -1 and must not be read. Returns `[num_tokens, num_heads, head_dim]`.
        """

    @abstractmethod
    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        """One query per sequence over its `meta.context_lens` cached tokens (the last
        `sliding_window` of them if set; entries of blocks wholly before that may be -1);
        `[batch, heads, dim]`."""
