"""The start-up choice of attention backend. It lives apart from the interface its backends import, so
that choosing one imports only the chosen implementation."""

import torch

from nanovllm.attention.backend import AttentionBackend
from nanovllm.config import FLASH_ATTN_BLOCK_SIZE_MULTIPLE


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def select_backend(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    kv_cache_dtype: torch.dtype | None = None,
    block_size: int | None = None,
) -> AttentionBackend:
    """Pick the backend once: 'auto' is flash-attn when it imports on CUDA and can serve the settings
    (a 16-bit dtype, the KV cache in it, blocks a multiple of its page size), else Triton on CUDA, else
    PyTorch. An explicit name is taken as asked (its backend refuses settings it cannot serve)."""
    if name == "auto":
        if device.type == "cuda":
            half = dtype in (torch.float16, torch.bfloat16) and kv_cache_dtype in (None, dtype)
            paged = block_size is None or block_size % FLASH_ATTN_BLOCK_SIZE_MULTIPLE == 0
            name = "flash-attn" if half and paged and flash_attn_available() else "triton"
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
