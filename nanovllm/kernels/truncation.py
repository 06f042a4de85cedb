"""Triton kernel: per-row truncation thresholds for top-k, top-p and min-p, without sorting.

Every truncation rule keeps the tokens whose logit is at least some value, so one float per row says
which tokens survive: `keep = logits >= threshold`. Ties at the boundary are all kept (a token's fate
depends on its value only, never on its id).

- top-k: the k-th largest logit (counting repeats).
- top-p: within what top-k keeps, the largest logit t whose mass `sum(p_i for logit_i >= t)` reaches
  `top_p` (probabilities of the temperature-scaled distribution).
- min-p: `max + T * log(min_p)`, i.e. p_i >= min_p * p_max.
The threshold is the largest of the three (each is -inf when its rule is off).

The two searches run over order-preserving integer keys of the logits: a float's bits with the
magnitude flipped for negatives, shifted right by the bits the input dtype leaves at zero (16 for
bf16, 13 for fp16), so a bf16 row spans at most 2**16 keys. Each pass over the row counts (top-k) or
weighs (top-p) the tokens at or above CANDIDATES keys (compared as floats) and narrows the bounds to
the gap where the target is crossed. The first pass of a search tests keys at growing distances below
the row's maximum, since thresholds usually sit near the top; later passes cut the gap evenly. A count
or a mass above a larger key is never larger (in float arithmetic too: every candidate sums the same
terms in the same order, some replaced by zeros), so the candidates that reach the target are exactly
the smaller ones. For top-p the first pass also measures the mass top-k keeps.

One program owns one row and runs its passes one after another. Tunables are at the top of the file.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

# Measured on the H100 at 256 x 151,936 bf16 (benchmarks/sampler_parts.py --sweep): a row's passes run
# one after another in one program, so what pays is work per iteration and warps to hide latency.
CANDIDATES = 4  # keys tested per pass (a power of two, as tl.arange needs); 8 and 16 were slower
BLOCK = 8192  # logits per loop iteration
NUM_WARPS = 16

_KEY_SHIFT = {torch.float32: 0, torch.float16: 13, torch.bfloat16: 16}
_LOG2E = tl.constexpr(1.4426950408889634)  # a jit function reads only constexpr globals


@triton.jit
def _key(x, SHIFT: tl.constexpr):
    """Order-preserving int32 key of float32 values (-0 and +0 share one key)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> SHIFT


@triton.jit
def _value(key, SHIFT: tl.constexpr):
    """The float32 whose key is `key` (inverse of `_key` for keys of values of the input dtype)."""
    low = (1 << SHIFT) - 1
    bits = key << SHIFT
    bits = tl.where(key < 0, bits | low, bits)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _sums_above(
    row_ptr,
    vocab,
    cand_value,
    row_max,
    weight_scale,
    TOP_P: tl.constexpr,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """[C]: how many tokens (or, TOP_P, how much weight exp((logit - row_max) / T)) have a key >= each
    candidate key, compared as floats (`cand_value`: the candidates' values; -0 and +0 compare equal, as
    their keys are). Partial sums stay per lane; the one cross-lane reduction comes after the loop."""
    acc = tl.zeros([BLOCK, C], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        # Padding reads -inf: below every candidate but the smallest key, where f reaches any target.
        x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        above = x[:, None] >= cand_value[None, :]  # [BLOCK, C]; the same as comparing keys
        if TOP_P:
            acc += tl.where(above, tl.exp2((x - row_max) * weight_scale)[:, None], 0.0)
        else:
            acc += above.to(tl.float32)
    return tl.sum(acc, axis=0)


@triton.jit
def _narrow(cand, f, target, lo, hi):
    """New bounds: the largest candidate that reaches the target, and just below the smallest that
    does not (f never grows with the key, so the ones that reach are the smaller keys)."""
    reached = f >= target
    return tl.max(tl.where(reached, cand, lo), axis=0), tl.min(tl.where(reached, hi, cand - 1), axis=0)


@triton.jit
def _largest_key_reaching(
    row_ptr,
    vocab,
    lo,
    hi,
    target,
    row_max,
    weight_scale,
    TOP_P: tl.constexpr,
    SHIFT: tl.constexpr,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
    FIRST_STRIDE_BITS: tl.constexpr,
):
    """The largest key t in [lo, hi] with f(t) >= target, where f(t) counts the tokens whose key is
    >= t; with TOP_P, f sums their weights and the target is `target` times f(lo) (the kept mass).

    The first pass tests keys at growing distances below hi (0, 2**b - 1, 2**2b - 1, ... with b =
    FIRST_STRIDE_BITS) and lo itself, since thresholds usually sit near the top; later passes cut what
    is left evenly. f(lo) >= target must hold."""
    idx = tl.arange(0, C)
    lo = lo.to(tl.int64)  # fp32 keys span more than an int32 difference can hold
    hi = hi.to(tl.int64)
    distance = (tl.full([C], 1, dtype=tl.int64) << (idx * FIRST_STRIDE_BITS).to(tl.int64)) - 1
    cand = tl.where(idx == C - 1, lo, tl.maximum(hi - distance, lo))
    f = _sums_above(row_ptr, vocab, _value(cand.to(tl.int32), SHIFT), row_max, weight_scale, TOP_P, C, BLOCK)
    if TOP_P:
        target = target * tl.sum(tl.where(idx == C - 1, f, 0.0), axis=0)
    lo, hi = _narrow(cand, f, target, lo, hi)
    while lo < hi:
        gap = (hi - lo + C) // (C + 1)  # C candidates cut [lo, hi] into C + 1 pieces, none wider
        cand = tl.minimum(lo + gap * (idx + 1), hi)
        f = _sums_above(
            row_ptr, vocab, _value(cand.to(tl.int32), SHIFT), row_max, weight_scale, TOP_P, C, BLOCK
        )
        lo, hi = _narrow(cand, f, target, lo, hi)
    return lo.to(tl.int32)


@triton.jit
def _thresholds_kernel(
    logits_ptr,
    stride_row,
    temperature_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    out_ptr,
    vocab,
    SHIFT: tl.constexpr,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
    FIRST_STRIDE_BITS: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    threshold = tl.full([], float("-inf"), dtype=tl.float32)
    if temperature > 0.0 and (top_k < vocab or top_p < 1.0 or min_p > 0.0):
        # Pass 0: the row's largest and smallest values bound both searches.
        row_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        row_min = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < vocab
            x = tl.load(row_ptr + offs, mask=inside, other=float("-inf")).to(tl.float32)
            row_max = tl.maximum(row_max, x)
            row_min = tl.minimum(row_min, tl.where(inside, x, float("inf")))
        m = tl.max(row_max, axis=0)
        lo = _key(tl.min(row_min, axis=0), SHIFT)
        hi = _key(m, SHIFT)
        weight_scale = _LOG2E / temperature
        if top_k < vocab:
            lo = _largest_key_reaching(
                row_ptr,
                vocab,
                lo,
                hi,
                top_k.to(tl.float32),
                m,
                weight_scale,
                False,
                SHIFT,
                C,
                BLOCK,
                FIRST_STRIDE_BITS,
            )
            threshold = _value(lo, SHIFT)
        if top_p < 1.0:  # searched above the top-k threshold (or the smallest key): within what top-k keeps
            lo = _largest_key_reaching(
                row_ptr,
                vocab,
                lo,
                hi,
                top_p,
                m,
                weight_scale,
                True,
                SHIFT,
                C,
                BLOCK,
                FIRST_STRIDE_BITS,
            )
            threshold = _value(lo, SHIFT)
        if min_p > 0.0:
            threshold = tl.maximum(threshold, m + temperature * tl.log(min_p))
    tl.store(out_ptr + row, threshold)


def truncation_thresholds(
    logits: Tensor, temperatures: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor
) -> Tensor:
    """float32 [num_seqs]: keep the tokens whose logit is >= the row's value (-inf keeps all; greedy
    rows, temperature 0, get -inf). logits: [num_seqs, vocab] fp32/bf16/fp16 with contiguous rows;
    temperatures, top_p, min_p: float32 [num_seqs]; top_k: integer [num_seqs], >= vocab when off."""
    if logits.dtype not in _KEY_SHIFT:
        raise ValueError(
            f"truncation thresholds need float32, float16 or bfloat16 logits, got {logits.dtype}"
        )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    num_seqs, vocab = logits.shape
    out = torch.empty(num_seqs, dtype=torch.float32, device=logits.device)
    if num_seqs == 0:
        return out
    _thresholds_kernel[(num_seqs,)](
        logits,
        logits.stride(0),
        temperatures.float(),
        top_k,
        top_p.float(),
        min_p.float(),
        out,
        vocab,
        SHIFT=_KEY_SHIFT[logits.dtype],
        C=CANDIDATES,
        BLOCK=BLOCK,
        FIRST_STRIDE_BITS=-(-(32 - _KEY_SHIFT[logits.dtype]) // CANDIDATES),  # reach the whole key range
        num_warps=NUM_WARPS,
    )
    return out
