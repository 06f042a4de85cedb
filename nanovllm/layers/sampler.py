"""Batched sampling on the device: temperature, top-k, top-p, min-p, per-request seeds, greedy rows.

A draw is the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks token i with probability
p_i (the Gumbel-max trick in another form). Without seeds the uniforms behind E come from torch's
generator; when a row has a seed, every row's uniforms come from a counter-based hash of (row key,
token id), and a seeded row's key depends only on its seed and the index of the token being sampled,
so its draws do not depend on the rest of the batch.

The draw, `sample`, is one pass over the logits; the softmax is never materialised because
argmax(p / E) = argmax(logits / T - log E). On CUDA it is a Triton kernel that splits each row over many
programs (`nanovllm.kernels.draw`); elsewhere `reference_sample` computes the same with torch ops.
Top-k, top-p and min-p all keep the tokens whose logit reaches a per-row threshold (ties at the boundary
kept), so when some row truncates the draw only masks the tokens below its threshold. The thresholds
come from a Triton kernel on CUDA (a multi-way search, no sort: `nanovllm.kernels.truncation`) and from
a sort elsewhere (`reference_thresholds`, the same rule). A row that does not truncate gets the
threshold -inf and draws exactly what it would draw in a batch where no row truncates.
"""

from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.kernels.draw import HASH_MULTIPLIER, MIN_EXPONENTIAL, UNIFORM_BITS
from nanovllm.kernels.draw import draw as kernel_draw
from nanovllm.kernels.truncation import truncation_thresholds as kernel_thresholds

_MASK32 = 0xFFFFFFFF
_LOG2E = 1.4426950408889634


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
    x = (((x >> 16) ^ x) * HASH_MULTIPLIER) & _MASK32
    x = (((x >> 16) ^ x) * HASH_MULTIPLIER) & _MASK32
    return (x >> 16) ^ x


def hashed_uniform(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) on a 2**-24 grid, a pure function of each row's key and the token id.
    keys: [num_seqs, 2]; token_ids: [vocab] (the same ids for every row) or [num_seqs, vocab]."""
    x = _mix32(token_ids ^ keys[:, :1])  # [num_seqs, vocab]
    x = _mix32(x ^ keys[:, 1:])
    # Exact: 24-bit integers times 2**-24.
    return (x >> (32 - UNIFORM_BITS)).to(torch.float32) * (1.0 / (1 << UNIFORM_BITS))


def exponential(uniform: torch.Tensor) -> torch.Tensor:
    """Exp(1) from uniforms in [0, 1): -log(1 - u), never exactly 0."""
    return (-torch.log1p(-uniform)).clamp(min=MIN_EXPONENTIAL)


def _noise(like: torch.Tensor, keys: torch.Tensor | None, token_ids: torch.Tensor) -> torch.Tensor:
    uniform = torch.rand_like(like) if keys is None else hashed_uniform(keys, token_ids)
    return exponential(uniform)


def reference_thresholds(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """The truncation rule of `nanovllm.kernels.truncation` computed with a sort (CPU path and test
    reference): float32 [num_seqs], keep the tokens whose logit is >= the row's value."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64 (tests)
    vocab = x.shape[-1]
    ordered = x.sort(dim=-1, descending=True).values
    row_max = ordered[:, 0]
    none = torch.full_like(row_max, float("-inf"))
    kth = ordered.gather(1, (top_k.clamp(1, vocab) - 1).long().unsqueeze(1)).squeeze(1)
    by_k = torch.where(top_k < vocab, kth, none)
    temperatures = temperatures.to(x.dtype)
    scale = _LOG2E / temperatures.clamp(min=1e-6)
    weights = torch.exp2((ordered - row_max[:, None]) * scale[:, None]).masked_fill(
        ordered < by_k[:, None], 0
    )
    mass = weights.cumsum(dim=-1)  # mass[j]: the kept tokens ranked 0..j
    first = (mass < top_p[:, None] * mass[:, -1:]).sum(dim=-1).clamp(max=vocab - 1)  # first j reaching p
    by_p = torch.where(top_p < 1, ordered.gather(1, first.unsqueeze(1)).squeeze(1), none)
    by_min_p = torch.where(min_p > 0, row_max + temperatures * min_p.log(), none)
    threshold = torch.maximum(torch.maximum(by_k, by_p), by_min_p)
    return torch.where(temperatures > 0, threshold, none).float()


def truncation_thresholds(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Per-row logit thresholds for top-k, top-p and min-p: the Triton kernel on CUDA (no sort),
    the sort-based reference elsewhere."""
    if logits.is_cuda:
        return kernel_thresholds(logits, temperatures, top_k, top_p, min_p)
    return reference_thresholds(logits, temperatures, top_k, top_p, min_p)


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    keys: torch.Tensor | None,
    thresholds: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row: argmax of logits / T - log E over the tokens whose logit reaches the row's
    threshold; argmax of the logits where T = 0. logits: [num_seqs, vocab]; temperatures: [num_seqs];
    keys: [num_seqs, 2] or None (then torch's generator); thresholds: [num_seqs] or None."""
    if logits.is_cuda:
        return kernel_draw(logits, temperatures, keys, thresholds)
    return reference_sample(logits, temperatures, keys, thresholds)


def reference_sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    keys: torch.Tensor | None,
    thresholds: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sample` in torch ops: the CPU path and the kernel's reference in tests. With keys the kernel uses
    the same uniforms; it takes log(1 - u) for log1p(-u) and multiplies by 1/T where this divides by T,
    which may differ in the last bit, and it never picks a NaN logit (torch.argmax does)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    token_ids = torch.arange(logits.shape[-1], device=logits.device)
    noise = _noise(logits, keys, token_ids)
    scores = logits / temperatures.clamp(min=1e-6).unsqueeze(1) - noise.log()
    if thresholds is not None:
        scores = scores.masked_fill(logits < thresholds.unsqueeze(1), float("-inf"))
    return torch.where(temperatures == 0, greedy, scores.argmax(dim=-1))


def truncate_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """The logits with every token outside top-k, outside the top-p nucleus or below min-p set to
    -inf (the sampler's rule at temperature 1, spelled out for tests and callers)."""
    ones = torch.ones(logits.shape[0], device=logits.device)
    thresholds = truncation_thresholds(logits, ones, top_k, top_p, min_p)
    return logits.masked_fill(logits < thresholds.unsqueeze(1), float("-inf"))


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
        # top_k = 1 is greedy, also where logits tie at the top (ties at a threshold are kept).
        temperatures = params.temperatures.masked_fill(params.top_k == 1, 0.0)
        thresholds = truncation_thresholds(logits, temperatures, params.top_k, params.top_p, params.min_p)
        return sample(logits, temperatures, params.keys, thresholds)

    def warm_up(self, logits: torch.Tensor) -> None:
        """Run every path once on `logits` (the largest batch), so that each kernel variant is compiled
        (and its memory counted) before serving: greedy; the draw with and without seeds and with and
        without truncation."""
        n = logits.shape[0]
        ones = torch.ones(n, device=logits.device)
        keys = torch.zeros(n, 2, dtype=torch.int64, device=logits.device)
        truncating = dict(
            top_k=torch.full((n,), logits.shape[-1], device=logits.device),
            top_p=torch.full((n,), 0.9, device=logits.device),
            min_p=torch.zeros(n, device=logits.device),
        )
        self(logits, SamplingTensors(ones, all_greedy=True))
        for seeded in (False, True):
            self(logits, SamplingTensors(ones, keys=keys if seeded else None))
            self(logits, SamplingTensors(ones, keys=keys if seeded else None, **truncating))
