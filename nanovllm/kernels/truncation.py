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
weighs (top-p) the tokens at or above CANDIDATES evenly spaced keys between the bounds found so far,
and narrows the bounds to one of the CANDIDATES + 1 gaps: 4 passes at most for a bf16 row with 16
candidates. A count or a mass
above a larger key is never larger (also in float arithmetic: every candidate sums the same terms in
the same order, some replaced by zeros), so the keys that pass form a prefix of the candidates.

One program owns one row. Tunables are at the top of the file.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

CANDIDATES = 16  # keys tested per pass (a power of two, as tl.arange needs)
BLOCK = 1024  # logits per loop iteration
NUM_WARPS = 8

_KEY_SHIFT = {torch.float32: 0, torch.float16: 13, torch.bfloat16: 16}
_LOG2E = 1.4426950408889634


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
def _largest_key_reaching(
    row_ptr,
    vocab,
    lo,
    hi,
    target,
    row_max,
    weight_scale,
    WEIGHTED: tl.constexpr,
    SHIFT: tl.constexpr,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The largest key t in [lo, hi] with f(t) >= target, where f(t) counts (or, WEIGHTED, sums
    exp((logit - row_max) / T) over) the tokens whose key is >= t. f(lo) >= target must hold."""
    steps = tl.arange(0, C).to(tl.int64) + 1
    lo = lo.to(tl.int64)  # fp32 keys span more than an int32 difference can hold
    hi = hi.to(tl.int64)
    while lo < hi:
        gap = (hi - lo + C) // (C + 1)  # C candidates cut [lo, hi] into C + 1 pieces, none wider
        cand = tl.minimum(lo + gap * steps, hi)  # [C], increasing, each in (lo, hi]
        cand32 = cand.to(tl.int32)
        acc = tl.zeros([C], dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < vocab
            x = tl.load(row_ptr + offs, mask=inside, other=float("-inf")).to(tl.float32)
            above = (_key(x, SHIFT)[:, None] >= cand32[None, :]) & inside[:, None]  # [BLOCK, C]
            if WEIGHTED:
                w = tl.exp2((x - row_max) * weight_scale)
                acc += tl.sum(tl.where(above, w[:, None], 0.0), axis=0)
            else:
                acc += tl.sum(above.to(tl.float32), axis=0)
        reached = acc >= target
        new_lo = tl.max(tl.where(reached, cand, lo), axis=0)
        hi = tl.min(tl.where(reached, hi, cand - 1), axis=0)
        lo = new_lo
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
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    threshold = tl.full([], float("-inf"), dtype=tl.float32)
    if temperature > 0.0 and (top_k < vocab or top_p < 1.0 or min_p > 0.0):
        # Pass 0: the row's largest value and smallest key bound both searches.
        row_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        min_key = tl.full([BLOCK], 2147483647, dtype=tl.int32)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < vocab
            x = tl.load(row_ptr + offs, mask=inside, other=float("-inf")).to(tl.float32)
            row_max = tl.maximum(row_max, x)
            min_key = tl.minimum(min_key, tl.where(inside, _key(x, SHIFT), 2147483647))
        m = tl.max(row_max, axis=0)
        lo = tl.min(min_key, axis=0)
        hi = _key(m, SHIFT)
        weight_scale = _LOG2E / temperature
        if top_k < vocab:
            lo = _largest_key_reaching(
                row_ptr, vocab, lo, hi, top_k.to(tl.float32), m, weight_scale, False, SHIFT, C, BLOCK
            )
            threshold = _value(lo, SHIFT)
        if top_p < 1.0:
            # The mass top-k keeps (lo is its threshold key, or the smallest key): one pass.
            kept_mass = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, vocab, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                inside = offs < vocab
                x = tl.load(row_ptr + offs, mask=inside, other=float("-inf")).to(tl.float32)
                w = tl.exp2((x - m) * weight_scale)
                kept_mass += tl.where(inside & (_key(x, SHIFT) >= lo), w, 0.0)
            target = top_p * tl.sum(kept_mass, axis=0)
            lo = _largest_key_reaching(row_ptr, vocab, lo, hi, target, m, weight_scale, True, SHIFT, C, BLOCK)
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
        num_warps=NUM_WARPS,
    )
    return out
