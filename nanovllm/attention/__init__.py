from nanovllm.attention.backend import AttentionBackend, select_backend

__all__ = ["AttentionBackend", "select_backend"]
