"""Batched sampling on the device: temperature, top-k, top-p, min-p, per-request seeds, greedy rows.

A draw is the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks token i with probability
p_i (the Gumbel-max trick in another form). Without seeds the uniforms behind E come from torch's
generator; when a row has a seed, every row's uniforms come from a counter-based hash of (row key,
token id), and a seeded row's key depends only on its seed and the index of the token being sampled,
so its draws do not depend on the rest of the batch.

Two paths:
- `sample` (temperature only, the common case): one fused pass over the logits once compiled; the
  softmax is never materialised because argmax(p / E) = argmax(logits / T - log E).
- `sample_truncated` (some row uses top-k, top-p or min-p): one stable sort of the logits, then the
  truncation and the draw in sorted order. The prefix sum runs eagerly: Inductor (torch 2.11) fails to
  generate code for a scan over a dynamically sized vocabulary on CUDA.
"""

from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.utils.compile import compilable

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # odd multiplier of a well-known 32-bit integer hash; < 2**27, so products fit in int64
_MIN_EXP = 2.0**-25  # below the smallest non-zero E a 24-bit uniform gives: E = 0 would always win


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling settings on the device. `keys` is None unless some row has a seed;
    `top_k`, `top_p`, `min_p` are None unless some row truncates. `all_greedy` (known on the host)
    skips the random draw entirely."""

    temperatures: torch.Tensor  # [num_seqs] float32, 0 = greedy
    keys: torch.Tensor | None = None  # [num_seqs, 2] int64, 32-bit values
    top_k: torch.Tensor | None = None  # [num_seqs] int64, vocab size when off
    top_p: torch.Tensor | None = None  # [num_seqs] float32, 1 when off
    min_p: torch.Tensor | None = None  # [num_seqs] float32, 0 when off
    all_greedy: bool = False


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def hashed_uniform(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) on a 2**-24 grid, a pure function of each row's key and the token id.
    keys: [num_seqs, 2]; token_ids: [vocab] (the same ids for every row) or [num_seqs, vocab]."""
    x = _mix32(token_ids ^ keys[:, :1])  # [num_seqs, vocab]
    x = _mix32(x ^ keys[:, 1:])
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))  # exact: 24-bit integers times 2**-24


def exponential(uniform: torch.Tensor) -> torch.Tensor:
    """Exp(1) from uniforms in [0, 1): -log(1 - u), never exactly 0."""
    return (-torch.log1p(-uniform)).clamp(min=_MIN_EXP)


def _noise(like: torch.Tensor, keys: torch.Tensor | None, token_ids: torch.Tensor) -> torch.Tensor:
    uniform = torch.rand_like(like) if keys is None else hashed_uniform(keys, token_ids)
    return exponential(uniform)


@compilable
def sample(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
    # logits: [num_seqs, vocab]; temperatures: [num_seqs]; keys: [num_seqs, 2] or None
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    token_ids = torch.arange(logits.shape[-1], device=logits.device)
    noise = _noise(logits, keys, token_ids)
    sampled = (logits / temperatures.clamp(min=1e-6).unsqueeze(1) - noise.log()).argmax(dim=-1)
    return torch.where(temperatures == 0, greedy, sampled)


@compilable
def _sorted_probs(
    sorted_logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor
) -> torch.Tensor:
    """Softmax of the temperature-scaled, top-k-truncated logits, in descending order."""
    scaled = sorted_logits.float() / temperatures.clamp(min=1e-6).unsqueeze(1)
    ranks = torch.arange(scaled.shape[-1], device=scaled.device)
    return scaled.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf")).softmax(dim=-1)


def _kept(
    probs: torch.Tensor, cumulative: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Which sorted tokens survive top-p and min-p (top-k already gave the others probability 0)."""
    mass_before = cumulative - probs  # probability of the more likely tokens
    top_p_drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    min_p_drop = probs < min_p[:, None] * probs[:, :1]  # probs[:, 0] is the largest
    return (probs > 0) & ~top_p_drop & ~min_p_drop


@compilable
def _draw_sorted(
    probs: torch.Tensor,
    cumulative: torch.Tensor,
    order: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    keys: torch.Tensor | None,
) -> torch.Tensor:
    """Position (in sorted order) of the token drawn from the truncated, renormalised distribution."""
    keep = _kept(probs, cumulative, top_p, min_p)
    return (probs.masked_fill(~keep, 0.0) / _noise(probs, keys, order)).argmax(dim=-1)


def _sort(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Stable, so ties keep token-id order whatever else is in the batch (seeded rows stay reproducible).
    return logits.sort(dim=-1, descending=True, stable=True)


def sample_truncated(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    keys: torch.Tensor | None,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """`sample` with top-k, top-p and min-p applied to the temperature-scaled distribution.
    Sorting the raw logits gives the order of the scaled ones (T > 0 keeps order; T = 0 rows take
    the first token, the argmax)."""
    sorted_logits, order = _sort(logits)  # [num_seqs, vocab] each
    probs = _sorted_probs(sorted_logits, temperatures, top_k)
    pick = _draw_sorted(probs, probs.cumsum(dim=-1), order, top_p, min_p, keys)
    sampled = order.gather(1, pick.unsqueeze(1)).squeeze(1)
    return torch.where(temperatures == 0, order[:, 0], sampled)


def truncate_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """The logits with every token outside top-k, outside the top-p nucleus or below min-p set to
    -inf (the sampler's rule at temperature 1, spelled out for tests and callers)."""
    sorted_logits, order = _sort(logits)
    probs = _sorted_probs(sorted_logits, torch.ones(logits.shape[0], device=logits.device), top_k)
    keep = _kept(probs, probs.cumsum(dim=-1), top_p, min_p)
    kept_sorted = sorted_logits.masked_fill(~keep, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, kept_sorted)


class Sampler(nn.Module):
    """One token per row: argmax where the temperature is 0, otherwise a draw from
    softmax(truncate(logits / T))."""

    def forward(self, logits: torch.Tensor, params: SamplingTensors | torch.Tensor) -> torch.Tensor:
        if isinstance(params, torch.Tensor):  # temperatures only
            params = SamplingTensors(params)
        if params.all_greedy:
            return logits.argmax(dim=-1)
        if params.top_k is None:
            return sample(logits, params.temperatures, params.keys)
        return sample_truncated(
            logits, params.temperatures, params.keys, params.top_k, params.top_p, params.min_p
        )
