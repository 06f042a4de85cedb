"""Rotary position embedding (the "rotate half" / NeoX layout used by Qwen and Llama checkpoints).

Rope scalings follow transformers' `modeling_rope_utils.py` (the test reference):
- static ones (`default`, `linear`, `llama3`, `yarn`) give one frequency set for every position, so a
  model keeps one table of cos/sin by position, with yarn's attention factor folded into it;
- `dynamic` (NTK) and `longrope` choose their frequencies by the length of the sequence at the step
  that computes a token. transformers recomputes them at each forward from the largest position it
  sees: a prompt of P tokens is rotated with the frequencies for length P, each later token at
  position p with those for length p + 1. We give each token exactly that length, max(P, p + 1),
  however the prompt is chunked or recomputed (see `rope_lengths`), and compute its cos/sin on the fly.
"""

import math
import weakref

import torch
from torch import nn

from nanovllm.utils.compile import compilable


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, 1, head_dim // 2]
    x1, x2 = x.float().chunk(2, dim=-1)  # 2 x [num_tokens, num_heads, head_dim // 2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@compilable
def apply_rotary(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos_sin = cos_sin_cache[positions]  # [num_tokens, 2, head_dim // 2]
    cos = cos_sin[:, 0].unsqueeze(1)  # [num_tokens, 1, head_dim // 2]
    sin = cos_sin[:, 1].unsqueeze(1)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


@compilable
def apply_rotary_by_length(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate by per-token frequencies `inv_freq` [num_tokens, head_dim // 2] (length-dependent ropes)."""
    freqs = positions.float()[:, None] * inv_freq  # [num_tokens, head_dim // 2]
    cos = (freqs.cos() * scaling).unsqueeze(1)  # [num_tokens, 1, head_dim // 2]
    sin = (freqs.sin() * scaling).unsqueeze(1)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def rope_parameters(hf_config) -> dict:
    """The checkpoint's rope settings as one dict, for transformers 4 (`rope_theta`, `rope_scaling`)
    and 5 (`rope_parameters`) configs alike. `max_position_embeddings` of the config is added (the
    dynamic and longrope scalings, and yarn without a factor, measure against it)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling:
        params = {**scaling, **params}
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos is not None:
        params.setdefault("max_position_embeddings", int(max_pos))
    return params


# rope_type -> what it needs besides rope_theta; anything else is refused by name.
SUPPORTED_ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
    "dynamic": ("factor", "max_position_embeddings"),
    "longrope": ("long_factor", "short_factor", "original_max_position_embeddings"),
}
# Scalings whose frequencies depend on the sequence's length when a token is computed.
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")


def check_rope_parameters(params: dict, head_dim: int | None = None) -> None:
    """Raise ValueError for rope settings we would not reproduce exactly."""
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported (supported: "
            f"{', '.join(repr(t) for t in SUPPORTED_ROPE_TYPES)})"
        )
    missing = [k for k in SUPPORTED_ROPE_TYPES[rope_type] if params.get(k) is None]
    if rope_type == "yarn" and params.get("factor") is None and params.get("max_position_embeddings") is None:
        missing.append("factor")
    if missing:
        raise ValueError(f"rope type {rope_type!r} needs {', '.join(missing)} in the rope settings")
    partial = params.get("partial_rotary_factor", 1.0)
    if partial is not None and float(partial) != 1.0:
        raise ValueError(
            f"partial_rotary_factor {partial} is not supported (only 1.0: rotate the whole head)"
        )
    if rope_type == "longrope" and head_dim is not None:
        for name in ("long_factor", "short_factor"):
            if len(params[name]) != head_dim // 2:
                raise ValueError(
                    f"rope type 'longrope': {name} has {len(params[name])} entries, the head needs "
                    f"head_dim / 2 = {head_dim // 2}"
                )


def _yarn_factor(params: dict) -> float:
    factor = params.get("factor")
    if factor is None:  # as transformers: the ratio of the extended to the original length
        return params["max_position_embeddings"] / params["original_max_position_embeddings"]
    return float(factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(params: dict) -> float:
    """The factor yarn and longrope multiply cos and sin by (attention logits scale by its square)."""
    rope_type = params.get("rope_type", "default")
    explicit = params.get("attention_factor")
    if rope_type == "yarn":
        if explicit is not None:
            return float(explicit)
        factor = _yarn_factor(params)
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        return _yarn_mscale(factor)
    if rope_type == "longrope":
        if explicit is not None:
            return float(explicit)
        orig = params["original_max_position_embeddings"]
        factor = params.get("factor")
        if factor is None:
            factor = params["max_position_embeddings"] / orig
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return 1.0


def _exponents(head_dim: int) -> torch.Tensor:
    return torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # [head_dim // 2]


def _yarn_inv_freq(head_dim: int, params: dict) -> torch.Tensor:
    """Each frequency blended between the original (extrapolation) and the original / factor
    (interpolation) by a linear ramp over the dimensions between the correction dims of beta_fast and
    beta_slow, measured against original_max_position_embeddings."""
    base = float(params["rope_theta"])
    factor = _yarn_factor(params)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1
    orig = params["original_max_position_embeddings"]

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = base ** _exponents(head_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # share of the original (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep


def rope_inv_freq(head_dim: int, params: dict) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32 for a static rope type (for dynamic: those at or
    below max_position_embeddings; for longrope: the short factors)."""
    check_rope_parameters(params, head_dim)
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
    elif rope_type == "yarn":
        inv_freq = _yarn_inv_freq(head_dim, params)
    elif rope_type == "longrope":
        inv_freq = _longrope_inv_freq(head_dim, params, long=False)
    return inv_freq


def _longrope_inv_freq(head_dim: int, params: dict, long: bool) -> torch.Tensor:
    ext = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float32)
    return 1.0 / (ext * float(params["rope_theta"]) ** _exponents(head_dim))


def rope_is_length_dependent(hf_config) -> bool:
    """Whether the checkpoint's rope frequencies depend on the sequence length (dynamic, longrope)."""
    return rope_parameters(hf_config).get("rope_type", "default") in LENGTH_DEPENDENT_ROPE_TYPES


def rope_max_position(hf_config) -> int:
    """The longest context the checkpoint's positions are meant for, as vLLM derives it: linear and
    dynamic scalings stretch max_position_embeddings by `factor`, yarn stretches
    original_max_position_embeddings by it; llama3 and longrope checkpoints already give the extended
    length."""
    params = rope_parameters(hf_config)
    max_pos = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
    rope_type = params.get("rope_type", "default")
    if rope_type in ("linear", "dynamic") and params.get("factor"):
        return int(max_pos * float(params["factor"]))
    if rope_type == "yarn" and params.get("original_max_position_embeddings"):
        if params.get("factor") is None:
            return max_pos
        return int(params["original_max_position_embeddings"] * float(params["factor"]))
    return max_pos


def rope_lengths(start: int, end: int, num_prompt_tokens: int) -> list[int]:
    """The sequence length whose frequencies a length-dependent rope uses for the tokens at positions
    [start, end) of one sequence: the prompt length for prompt tokens (transformers rotates a whole
    prompt with the frequencies of its length), p + 1 for a later token at position p (it was computed
    alone, in one decode step). Chunking or recomputing a sequence does not change them."""
    cut = min(max(start, num_prompt_tokens), end)
    return [num_prompt_tokens] * (cut - start) + list(range(cut + 1, end + 1))


class RotaryEmbedding(nn.Module):
    """One model's rope: a cos/sin table by position for static scalings, or, for the
    length-dependent ones, cos/sin computed per token from the length each token was computed at
    (`lengths`: the step's `AttentionMetadata.rope_lengths`; None means p + 1, as in decode)."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        inv_freq: torch.Tensor | None = None,
        params: dict | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.params = dict(params) if params is not None else {"rope_theta": base}
        self.rope_type = self.params.get("rope_type", "default")
        self.length_dependent = self.rope_type in LENGTH_DEPENDENT_ROPE_TYPES
        self.scaling = attention_factor(self.params)
        if inv_freq is None:
            inv_freq = rope_inv_freq(head_dim, self.params)
        inv_freq = inv_freq.to(torch.float)
        if self.length_dependent:
            self.register_buffer("exponents", _exponents(head_dim).to(inv_freq.device), persistent=False)
            if self.rope_type == "longrope":
                short = _longrope_inv_freq(head_dim, self.params, long=False)
                long = _longrope_inv_freq(head_dim, self.params, long=True)
                # [2, head_dim // 2]: row 0 for lengths within the original context, row 1 beyond it
                self.register_buffer(
                    "longrope_inv_freq", torch.stack([short, long]).to(inv_freq.device), persistent=False
                )
            self.cos_sin_cache = None
            return
        positions = torch.arange(max_position, dtype=torch.float, device=inv_freq.device)
        freqs = torch.outer(positions, inv_freq)  # [max_position, head_dim // 2]
        # [max_position, 2, head_dim // 2]: cos then sin (times the attention factor), kept in float32
        self.register_buffer(
            "cos_sin_cache",
            torch.stack([freqs.cos() * self.scaling, freqs.sin() * self.scaling], dim=1),
            persistent=False,
        )

    def inv_freq_for_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Per-token inverse frequencies `[num_tokens, head_dim // 2]` of a length-dependent rope, in
        the float32 operations transformers uses."""
        p = self.params
        if self.rope_type == "dynamic":
            max_pos = p["max_position_embeddings"]
            factor = float(p["factor"])
            length = torch.clamp(lengths, min=max_pos)  # [num_tokens] int64
            dim = self.head_dim
            base = p["rope_theta"] * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            return 1.0 / (base.float()[:, None] ** self.exponents[None, :])
        # longrope: the long factors once the length passes the original context
        long = (lengths > p["original_max_position_embeddings"]).long()  # [num_tokens]
        return self.longrope_inv_freq[long]

    def forward(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.length_dependent:
            return apply_rotary(positions, query, key, self.cos_sin_cache)
        if lengths is None:  # decode: every token is computed alone, at length p + 1
            lengths = positions + 1
        return apply_rotary_by_length(positions, query, key, self.inv_freq_for_lengths(lengths), self.scaling)


# Every attention layer of a model asks for the same table: share one while any layer holds it (a
# Llama 3.1 table is 64 MiB, times 32 layers otherwise). Weak values: it is freed with the model.
_ROPE_CACHE: "weakref.WeakValueDictionary[tuple, RotaryEmbedding]" = weakref.WeakValueDictionary()


def get_rope(head_dim: int, max_position: int, params: dict) -> RotaryEmbedding:
    """The rotary embedding for these settings, with a table of `max_position` positions (see
    SUPPORTED_ROPE_TYPES; others raise ValueError)."""
    check_rope_parameters(params, head_dim)
    device = torch.get_default_device()
    key = (head_dim, max_position, device, tuple(sorted((k, repr(v)) for k, v in params.items())))
    rope = _ROPE_CACHE.get(key)
    if rope is None:
        inv_freq = rope_inv_freq(head_dim, params).to(device)
        rope = RotaryEmbedding(head_dim, max_position, float(params["rope_theta"]), inv_freq, params)
        _ROPE_CACHE[key] = rope
    return rope
