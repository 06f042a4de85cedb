"""Rotary position embedding (the "rotate half" / NeoX layout used by Qwen and Llama checkpoints)."""

import math
import weakref

import torch
from torch import nn

from nanovllm.utils.compile import compilable


@compilable
def apply_rotary(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos_sin = cos_sin_cache[positions]  # [num_tokens, 2, head_dim // 2]
    cos = cos_sin[:, 0].unsqueeze(1)  # [num_tokens, 1, head_dim // 2]
    sin = cos_sin[:, 1].unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, num_heads, head_dim]
        x1, x2 = x.float().chunk(2, dim=-1)  # 2 x [num_tokens, num_heads, head_dim // 2]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(query), rotate(key)


def rope_parameters(hf_config) -> dict:
    """The checkpoint's rope settings as one dict, for transformers 4 (`rope_theta`, `rope_scaling`)
    and 5 (`rope_parameters`) configs alike."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling:
        params = {**scaling, **params}
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


# rope_type -> what it needs besides rope_theta; anything else is refused by name.
SUPPORTED_ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_parameters(params: dict) -> None:
    """Raise ValueError for rope settings we would not reproduce exactly."""
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported (supported: "
            f"{', '.join(repr(t) for t in SUPPORTED_ROPE_TYPES)})"
        )
    missing = [k for k in SUPPORTED_ROPE_TYPES[rope_type] if params.get(k) is None]
    if missing:
        raise ValueError(f"rope type {rope_type!r} needs {', '.join(missing)} in the rope settings")
    partial = params.get("partial_rotary_factor", 1.0)
    if partial is not None and float(partial) != 1.0:
        raise ValueError(
            f"partial_rotary_factor {partial} is not supported (only 1.0: rotate the whole head)"
        )


def rope_inv_freq(head_dim: int, params: dict) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, rescaled as the rope type says."""
    check_rope_parameters(params)
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    rope_type = params.get("rope_type", "default")
    if rope_type == "linear":
        # Positions divided by `factor`, which is the same as dividing the frequencies.
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        # Llama 3.1: wavelengths longer than the original context / low_freq_factor are stretched by
        # `factor`, those shorter than original context / high_freq_factor are kept, and the band in
        # between is interpolated smoothly.
        factor = float(params["factor"])
        low = float(params["low_freq_factor"])
        high = float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        stretched = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * stretched / factor + smooth * stretched
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, stretched)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, inv_freq: torch.Tensor | None = None):
        super().__init__()
        self.head_dim = head_dim
        if inv_freq is None:
            inv_freq = rope_inv_freq(head_dim, {"rope_theta": base})
        inv_freq = inv_freq.to(torch.float)
        positions = torch.arange(max_position, dtype=torch.float, device=inv_freq.device)
        freqs = torch.outer(positions, inv_freq)  # [max_position, head_dim // 2]
        # [max_position, 2, head_dim // 2]: cos then sin, kept in float32
        self.register_buffer(
            "cos_sin_cache", torch.stack([freqs.cos(), freqs.sin()], dim=1), persistent=False
        )

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(positions, query, key, self.cos_sin_cache)


# Every attention layer of a model asks for the same table: share one while any layer holds it (a
# Llama 3.1 table is 64 MiB, times 32 layers otherwise). Weak values: it is freed with the model.
_ROPE_CACHE: "weakref.WeakValueDictionary[tuple, RotaryEmbedding]" = weakref.WeakValueDictionary()


def get_rope(head_dim: int, max_position: int, params: dict) -> RotaryEmbedding:
    """The rotary embedding for these settings (see SUPPORTED_ROPE_TYPES; others raise ValueError)."""
    check_rope_parameters(params)
    device = torch.get_default_device()
    key = (head_dim, max_position, device, tuple(sorted((k, repr(v)) for k, v in params.items())))
    rope = _ROPE_CACHE.get(key)
    if rope is None:
        inv_freq = rope_inv_freq(head_dim, params).to(device)
        rope = RotaryEmbedding(head_dim, max_position, float(params["rope_theta"]), inv_freq)
        _ROPE_CACHE[key] = rope
    return rope
