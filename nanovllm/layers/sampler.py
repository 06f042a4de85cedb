"""Batched sampling on the device: temperature, top-k, top-p, min-p, per-request seeds, greedy rows.

A draw is the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks token i with probability
p_i. Without seeds E comes from torch's generator; when a row has a seed, every row's E is derived
from a counter-based hash of (row key, token id), and a seeded row's key depends only on its seed and
the index of the token being sampled, so its draws do not depend on the rest of the batch.
"""

from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.utils.compile import compilable

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # odd multiplier of a well-known 32-bit integer hash; < 2**27, so products fit in int64


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling settings on the device. `keys` is None unless some row has a seed;
    `top_k`, `top_p`, `min_p` are None unless some row truncates."""

    temperatures: torch.Tensor  # [num_seqs] float32, 0 = greedy
    keys: torch.Tensor | None = None  # [num_seqs, 2] int64, 32-bit values
    top_k: torch.Tensor | None = None  # [num_seqs] int64, vocab size when off
    top_p: torch.Tensor | None = None  # [num_seqs] float32, 1 when off
    min_p: torch.Tensor | None = None  # [num_seqs] float32, 0 when off


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def hashed_exponential(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise `[num_seqs, vocab]` as a pure function of each row's key and the token id."""
    token = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    x = _mix32(token[None, :] ^ keys[:, :1])  # [num_seqs, vocab]
    x = _mix32(x ^ keys[:, 1:])
    uniform = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(uniform)


def truncate_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every token outside top-k, outside the top-p nucleus or below min-p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [num_seqs, vocab]
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop |= probs < min_p[:, None] * probs[:, :1]  # probs[:, 0] is the largest
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _draw(scaled: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    probs = torch.softmax(scaled, dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise.clamp(min=1e-10)).argmax(dim=-1)


@compilable
def sample(logits: torch.Tensor, temperatures: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    # logits: [num_seqs, vocab]; temperatures: [num_seqs]; noise: [num_seqs, vocab] or None
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    sampled = _draw(logits / temperatures.clamp(min=1e-6).unsqueeze(1), noise)
    return torch.where(temperatures == 0, greedy, sampled)


@compilable
def sample_truncated(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    noise: torch.Tensor | None,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """`sample` with top-k, top-p and min-p applied to the temperature-scaled distribution."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    scaled = truncate_logits(logits / temperatures.clamp(min=1e-6).unsqueeze(1), top_k, top_p, min_p)
    return torch.where(temperatures == 0, greedy, _draw(scaled, noise))


class Sampler(nn.Module):
    """One token per row: argmax where the temperature is 0, otherwise a draw from
    softmax(truncate(logits / T))."""

    def forward(self, logits: torch.Tensor, params: SamplingTensors | torch.Tensor) -> torch.Tensor:
        if isinstance(params, torch.Tensor):  # temperatures only
            params = SamplingTensors(params)
        noise = None if params.keys is None else hashed_exponential(params.keys, logits.shape[-1])
        if params.top_k is None:
            return sample(logits, params.temperatures, noise)
        return sample_truncated(logits, params.temperatures, noise, params.top_k, params.top_p, params.min_p)
