"""The one interface every attention implementation provides, and the start-up choice among them."""

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from nanovllm.utils.context import AttentionMetadata


class AttentionBackend(ABC):
    """Stores new K/V into the paged cache and computes attention for prefill and decode steps.

    Caches are `[num_blocks, block_size, num_kv_heads, head_dim]` per layer. Implementations must
    not synchronise with the host in `store_kv` and `decode` when `supports_cuda_graphs` is True.
    """

    name: ClassVar[str]
    supports_cuda_graphs: ClassVar[bool] = False

    def check_block_size(self, block_size: int) -> None:
        """Raise ValueError if this backend cannot use caches of `block_size` tokens per block."""

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Raise ValueError if this backend cannot compute in `dtype`."""

    @abstractmethod
    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
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
    ) -> torch.Tensor:
        """Causal attention of the new tokens over their sequence's prefix and themselves.

        Without `meta.block_tables` the keys are exactly the new k, v; with it they are read
        from the cache. Returns `[num_tokens, num_heads, head_dim]`.
        """

    @abstractmethod
    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """One query per sequence over its `meta.context_lens` cached tokens; `[batch, heads, dim]`."""


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def select_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """Pick the backend once: 'auto' is flash-attn when it imports on CUDA (and the dtype is 16-bit),
    else Triton on CUDA, else PyTorch."""
    if name == "auto":
        if device.type == "cuda":
            half = dtype in (torch.float16, torch.bfloat16)
            name = "flash-attn" if half and flash_attn_available() else "triton"
        else:
            name = "torch"
    if name == "torch":
        from nanovllm.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if device.type != "cuda":
        raise ValueError(
            f"attention_backend={name!r} needs a CUDA device; on {device.type} use 'torch' or 'auto'"
        )
    if name == "triton":
        from nanovllm.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "flash-attn":
        if not flash_attn_available():
            raise ValueError(
                "attention_backend='flash-attn' was asked for but the flash_attn package does not "
                "import; install it (pip install 'nano-vllm[flash-attn]') or use 'triton'"
            )
        from nanovllm.attention.flash_attn_backend import FlashAttnBackend

        return FlashAttnBackend()
    raise ValueError(f"unknown attention backend {name!r}")
