"""'auto' picks flash-attn only for settings it can serve (its paged kernels need 256-token pages)."""

import torch

from nanovllm.attention import selector


def test_auto_skips_flash_attn_for_small_blocks_and_fp8_caches(monkeypatch) -> None:
    monkeypatch.setattr(selector, "flash_attn_available", lambda: True)  # as if the package imported
    cuda = torch.device("cuda", 0)
    for kwargs in (
        {"block_size": 16},
        {"block_size": 128},
        {"block_size": 256, "kv_cache_dtype": torch.float8_e4m3fn},
    ):
        backend = selector.select_backend("auto", cuda, torch.bfloat16, **kwargs)
        assert backend.name == "triton", kwargs
    # An fp32 model never gets flash-attn either.
    assert selector.select_backend("auto", cuda, torch.float32, block_size=256).name == "triton"


def test_auto_on_cpu_is_torch() -> None:
    assert selector.select_backend("auto", torch.device("cpu"), torch.float32, block_size=16).name == "torch"
