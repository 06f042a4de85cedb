"""The start-up choice of attention backend. It lives apart from the interface its backends import, so
that choosing one imports only the chosen implementation."""

import torch

from nanovllm.attention.backend import AttentionBackend


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def select_backend(
    name: str, device: torch.device, dtype: torch.dtype, kv_cache_dtype: torch.dtype | None = None
) -> AttentionBackend:
    """Pick the backend once: 'auto' is flash-attn when it imports on CUDA (and the dtype is 16-bit and
    the KV cache in it), else Triton on CUDA, else PyTorch."""
    if name == "auto":
        if device.type == "cuda":
            half = dtype in (torch.float16, torch.bfloat16) and kv_cache_dtype in (None, dtype)
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
