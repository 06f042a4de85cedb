from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.selector import select_backend

__all__ = ["AttentionBackend", "select_backend"]
