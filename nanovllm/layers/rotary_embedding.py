"""Rotary position embedding (the "rotate half" / NeoX layout used by Qwen and Llama checkpoints)."""

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


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        positions = torch.arange(max_position, dtype=torch.float)
        freqs = torch.outer(positions, inv_freq)  # [max_position, head_dim // 2]
        # [max_position, 2, head_dim // 2]: cos then sin, kept in float32
        self.register_buffer("cos_sin_cache", torch.stack([freqs.cos(), freqs.sin()], dim=1), persistent=False)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(positions, query, key, self.cos_sin_cache)


def get_rope(head_dim: int, max_position: int, params: dict) -> RotaryEmbedding:
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: 'default')")
    return RotaryEmbedding(head_dim, max_position, float(params["rope_theta"]))
