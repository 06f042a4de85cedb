"""Triton kernels: the sampler's draw, each row split over many programs.

A draw picks, per row, the token with the largest `logit / T - log E` (E ~ Exp(1), the exponential race
of `nanovllm.layers.sampler`) among the tokens whose logit reaches the row's threshold, or the largest
logit for a row at temperature 0. One program per row would leave most of the GPU idle while each row's
loop runs (256 rows on 132 SMs), so a row is cut into chunks of at least BLOCK logits, one program each,
chosen so a batch makes about TARGET_PROGRAMS programs. Each program writes its chunk's best score and
largest logit with their token ids; a second kernel picks each row's best chunk. Ties go to the smaller
token id, as `torch.argmax` does; unlike `torch.argmax`, a NaN is never picked (a model that produces
NaN logits is broken either way).

Without keys, each loop iteration of a program takes its BLOCK logits as four quarter-blocks of BLOCK / 4,
in column order, into accumulators of BLOCK / 4 lanes (so each lane meets its columns in increasing order
and the tie rule holds); with keys, as one block.

Noise: when the batch has keys (some row has a seed), the uniforms are the counter-based hash of
`nanovllm.layers.sampler.hashed_uniform`, bit for bit, and the score is computed as the torch draw does.
Otherwise they come from Philox (`tl.randint4x`), keyed by a 64-bit seed per row: a number drawn from
torch's CPU generator for every call, times 2**20, plus the row index, so no two rows of any two calls
share a stream (short of a 2**-40 coincidence). One Philox evaluation gives four 32-bit outputs: at
counter `offset / 4 + lane` (offset: the block's first column, a multiple of BLOCK) output q serves column
`offset + q * BLOCK / 4 + lane`, so every column of a row has its own output, for a quarter of the Philox
work of one evaluation per logit. The top 24 bits give v = 1 - u on the grid k / 2**24 (k = 1 .. 2**24,
no rounding), and the race runs in base 2: score = x * log2(e) / T - log2(-log2 v), which is
(x / T - log E) / ln 2 plus a constant for E = -ln v ~ Exp(1), so the same argmax (v = 1 gives
-log2 v = 0, raised to MIN_EXPONENTIAL as in the hashed branch). The inner log2 is the accurate one (near
v = 1, the smallest E and likeliest winners, an approximation's absolute error would swamp -log2 v); the
outer one is the hardware's lg2.approx (FAST_LOG; about 2**-22 absolute error in the score), exact log2
under the interpreter, which has no libdevice.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from nanovllm.kernels.device import interpreting

BLOCK = 1024  # logits per loop iteration of one program
NUM_WARPS = 4
TARGET_PROGRAMS = 2048  # chunks per batch to aim for: enough to fill an H100's 132 SMs several times
MAX_CHUNK = 16384

# The counter-based noise, shared with the torch draw (nanovllm.layers.sampler), which must match it bit
# for bit: the hash's odd multiplier (< 2**27, so torch's int64 products fit), the uniforms' 24-bit grid,
# and the smallest E allowed (below any non-zero E that grid gives: E = 0 would always win).
HASH_MULTIPLIER = 0x45D9F3B
UNIFORM_BITS = 24
MIN_EXPONENTIAL = 2.0**-25
_MIX = tl.constexpr(HASH_MULTIPLIER)  # a jit function reads only constexpr globals
_MIN_EXP = tl.constexpr(MIN_EXPONENTIAL)
_UNIFORM_SHIFT = tl.constexpr(32 - UNIFORM_BITS)
_UNIFORM_SCALE = tl.constexpr(2.0**-UNIFORM_BITS)
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _mix32(x):
    x = ((x >> 16) ^ x) * _MIX
    x = ((x >> 16) ^ x) * _MIX
    return (x >> 16) ^ x


@triton.jit(do_not_specialize=["seed", "num_chunks"])
def _draw_chunks_kernel(
    logits_ptr,
    stride_row,
    temps_ptr,
    keys_ptr,
    thresholds_ptr,
    seed,
    score_out,
    score_idx_out,
    max_out,
    max_idx_out,
    vocab,
    chunk,
    num_chunks,
    HAS_KEYS: tl.constexpr,
    HAS_THRESHOLDS: tl.constexpr,
    FAST_LOG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Philox: four parts of a block share each evaluation; the hashed noise takes the block whole.
    PARTS: tl.constexpr = 1 if HAS_KEYS else 4
    WIDTH: tl.constexpr = BLOCK // PARTS
    row = tl.program_id(0)
    part = tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    inv_t = 1.0 / tl.maximum(tl.load(temps_ptr + row), 1e-6)  # x * inv_t: may differ from x / T by 1 ulp
    if HAS_KEYS:
        key0 = tl.load(keys_ptr + 2 * row).to(tl.uint32)
        key1 = tl.load(keys_ptr + 2 * row + 1).to(tl.uint32)
    else:
        row_seed = seed * 1048576 + row
        scale = inv_t * _LOG2E
    if HAS_THRESHOLDS:
        threshold = tl.load(thresholds_ptr + row)
    lanes = tl.arange(0, WIDTH)
    best = tl.full([WIDTH], float("-inf"), tl.float32)
    best_idx = tl.zeros([WIDTH], tl.int32)
    top = tl.full([WIDTH], float("-inf"), tl.float32)
    top_idx = tl.zeros([WIDTH], tl.int32)
    start = part * chunk
    end = tl.minimum(start + chunk, vocab)
    for offset in range(start, end, BLOCK):
        if not HAS_KEYS:
            # offset is a multiple of BLOCK: counter offset / 4 + lane serves this block's columns
            # offset + q * WIDTH + lane, output q for part q, and no other column of the row.
            bits = tl.randint4x(row_seed, offset // 4 + lanes)
        # The parts in column order: each lane still meets its columns in increasing order.
        for q in tl.static_range(PARTS):
            cols = offset + q * WIDTH + lanes
            inside = cols < end
            x = tl.load(row_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32)
            if HAS_KEYS:
                h = _mix32(cols.to(tl.uint32) ^ key0)
                h = _mix32(h ^ key1)
                uniform = (h >> _UNIFORM_SHIFT).to(tl.float32) * _UNIFORM_SCALE
                noise = tl.maximum(-tl.log(1.0 - uniform), _MIN_EXP)
                score = x * inv_t - tl.log(noise)
            else:
                # v = 1 - u on the grid k / 2**24, k = 1 .. 2**24 (exact: no rounding of 1 - u), and
                # noise = -log2(v) = E / ln 2; the score is (x / T - log E) / ln 2 plus a constant.
                word = bits[q].to(tl.uint32, bitcast=True)  # (already uint32: a logical shift either way)
                v = (word >> _UNIFORM_SHIFT).to(tl.float32) * _UNIFORM_SCALE + _UNIFORM_SCALE
                noise = tl.maximum(-tl.log2(v), _MIN_EXP)  # accurate near v = 1 (small E: the winners)
                if FAST_LOG:  # lg2.approx: abs. error ~2**-22 for noise in [0.5, 2], 2 ulp elsewhere
                    score = x * scale - libdevice.fast_log2f(noise)
                else:  # the interpreter has no libdevice
                    score = x * scale - tl.log2(noise)
            if HAS_THRESHOLDS:
                score = tl.where(x < threshold, float("-inf"), score)
            score = tl.where(inside, score, float("-inf"))
            # Strictly greater: a lane keeps its first (smallest) token id among equal values.
            better = score > best
            best = tl.where(better, score, best)
            best_idx = tl.where(better, cols, best_idx)
            higher = x > top
            top = tl.where(higher, x, top)
            top_idx = tl.where(higher, cols, top_idx)
    big = 2147483647
    best_value = tl.max(best, axis=0)
    best_token = tl.min(tl.where(best == best_value, best_idx, big), axis=0)
    top_value = tl.max(top, axis=0)
    top_token = tl.min(tl.where(top == top_value, top_idx, big), axis=0)
    # A chunk whose values are all -inf reports token 0; the pick then takes chunk 0 only if every chunk
    # is -inf, and token 0 is what argmax gives for such a row.
    out = row * num_chunks + part
    tl.store(score_out + out, best_value)
    tl.store(score_idx_out + out, best_token)
    tl.store(max_out + out, top_value)
    tl.store(max_idx_out + out, top_token)


@triton.jit(do_not_specialize=["num_chunks"])
def _pick_chunk_kernel(
    temps_ptr,
    score_in,
    score_idx_in,
    max_in,
    max_idx_in,
    tokens_out,
    num_chunks,
    CHUNKS: tl.constexpr,
):
    row = tl.program_id(0)
    parts = tl.arange(0, CHUNKS)
    valid = parts < num_chunks
    base = row * num_chunks
    score = tl.load(score_in + base + parts, mask=valid, other=float("-inf"))
    value = tl.load(max_in + base + parts, mask=valid, other=float("-inf"))
    # Chunks are in token order: the first chunk reaching the row's best holds its smallest token id.
    big = CHUNKS
    first_best = tl.min(tl.where(valid & (score == tl.max(score, axis=0)), parts, big), axis=0)
    first_top = tl.min(tl.where(valid & (value == tl.max(value, axis=0)), parts, big), axis=0)
    first_best = tl.where(first_best == big, 0, first_best)
    first_top = tl.where(first_top == big, 0, first_top)
    sampled = tl.load(score_idx_in + base + first_best)
    greedy = tl.load(max_idx_in + base + first_top)
    temperature = tl.load(temps_ptr + row)
    tl.store(tokens_out + row, tl.where(temperature == 0.0, greedy, sampled).to(tl.int64))


def chunk_size(num_seqs: int, vocab: int) -> int:
    """Logits per program: a power of two times BLOCK, so that the batch makes about TARGET_PROGRAMS."""
    chunk = BLOCK
    while chunk < MAX_CHUNK and num_seqs * triton.cdiv(vocab, chunk * 2) >= TARGET_PROGRAMS:
        chunk *= 2
    return chunk


def draw(logits: Tensor, temperatures: Tensor, keys: Tensor | None, thresholds: Tensor | None) -> Tensor:
    """int64 [num_seqs]: one token per row (see the module docstring). logits: [num_seqs, vocab] float32,
    bfloat16 or float16 with contiguous rows; temperatures float32 [num_seqs] (0 = greedy); keys int64
    [num_seqs, 2] of 32-bit values or None; thresholds float32 [num_seqs] or None."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    num_seqs, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(num_seqs, dtype=torch.int64, device=device)
    if num_seqs == 0:
        return tokens
    chunk = chunk_size(num_seqs, vocab)
    num_chunks = triton.cdiv(vocab, chunk)
    score = torch.empty(num_seqs, num_chunks, dtype=torch.float32, device=device)
    value = torch.empty_like(score)
    score_idx = torch.empty(num_seqs, num_chunks, dtype=torch.int32, device=device)
    value_idx = torch.empty_like(score_idx)
    temperatures = temperatures.float().contiguous()
    # Philox's key for this call (unused with keys): from torch's generator, so torch.manual_seed repeats it.
    # At least 2**31, so the argument is always an int64 (the kernel is compiled once).
    seed = 2**31 if keys is not None else int(torch.randint(2**31, 2**40, (1,)).item())
    _draw_chunks_kernel[(num_seqs, num_chunks)](
        logits,
        logits.stride(0),
        temperatures,
        keys.contiguous() if keys is not None else temperatures,
        thresholds.float().contiguous() if thresholds is not None else temperatures,
        seed,
        score,
        score_idx,
        value,
        value_idx,
        vocab,
        chunk,
        num_chunks,
        HAS_KEYS=keys is not None,
        HAS_THRESHOLDS=thresholds is not None,
        FAST_LOG=logits.is_cuda and not interpreting(),  # the interpreter has no libdevice
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    _pick_chunk_kernel[(num_seqs,)](
        temperatures,
        score,
        score_idx,
        value,
        value_idx,
        tokens,
        num_chunks,
        CHUNKS=triton.next_power_of_2(triton.cdiv(vocab, BLOCK)),  # covers any batch: compiled once per vocab
        num_warps=4,
    )
    return tokens
