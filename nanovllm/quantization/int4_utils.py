"""4-bit weights: nibble packing, the layout our W4A16 kernels read, and the plain-PyTorch dequantize.

Both AWQ and GPTQ checkpoints are converted at load into one internal layout, the GPTQ one with the
true zero point kept as an offset (so GPTQ needs no conversion and AWQ one repack):

- `qweight` int32 [in / 8, out]: nibble i (bits 4i..4i+3) of word (r, n) is q[8r + i, n];
- `qzeros`  int32 [groups, out / 8]: nibble j of word (g, c) is the stored zero of column 8c + j, and the
  zero point is that value plus `zero_offset` (1 for GPTQ v1 checkpoints, which store zero - 1; 0 for
  AWQ);
- `scales`  [groups, out] in the checkpoint's float dtype (fp16 for both formats);
- W[n, k] = (q[k, n] - zero[g(k), n]) * scales[g(k), n], with g(k) = k // group_size, or `g_idx[k]` for
  GPTQ act-order weights whose groups could not be made contiguous.

Values are unsigned 4-bit integers 0..15 in every case.
"""

import torch
from torch import Tensor

PACK_FACTOR = 8  # 4-bit values per int32 word
NIBBLE_MASK = 0xF

# AutoAWQ's "gemm" order: column j of each group of 8 output columns sits in nibble AWQ_NIBBLES[j]
# (equivalently, nibble i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i]).
AWQ_NIBBLES = (0, 4, 1, 5, 2, 6, 3, 7)

# The zero-point offsets of the internal layout, by checkpoint format.
GPTQ_V1_ZERO_OFFSET = 1
AWQ_ZERO_OFFSET = 0


def _shifts(nibbles: tuple[int, ...] | None, device: torch.device) -> Tensor:
    """Bit shift of value j of each group of 8: 4 * its nibble index (nibble j when None)."""
    nibbles = nibbles if nibbles is not None else tuple(range(PACK_FACTOR))
    return torch.tensor([4 * i for i in nibbles], dtype=torch.int32, device=device)


def unpack_int4(packed: Tensor, dim: int, nibbles: tuple[int, ...] | None = None) -> Tensor:
    """int32 words -> int32 values 0..15, `dim` 8 times longer. Value j of each word's 8 sits in nibble
    `nibbles[j]` (nibble j when None)."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed 4-bit weights must be int32, got {packed.dtype}")
    dim = dim % packed.dim()
    shifts = _shifts(nibbles, packed.device)
    moved = packed.movedim(dim, -1)  # [..., words]
    values = (moved.unsqueeze(-1) >> shifts) & NIBBLE_MASK  # [..., words, 8]
    values = values.flatten(-2)  # [..., words * 8]
    return values.movedim(-1, dim).contiguous()


def pack_int4(values: Tensor, dim: int, nibbles: tuple[int, ...] | None = None) -> Tensor:
    """Inverse of `unpack_int4`: integer values 0..15 -> int32 words along `dim` (a multiple of 8)."""
    dim = dim % values.dim()
    if values.shape[dim] % PACK_FACTOR:
        raise ValueError(f"cannot pack {values.shape[dim]} values along dim {dim}: not a multiple of 8")
    shifts = _shifts(nibbles, values.device)
    moved = values.movedim(dim, -1).to(torch.int32) & NIBBLE_MASK  # [..., n]
    moved = moved.unflatten(-1, (-1, PACK_FACTOR))  # [..., n / 8, 8]
    # Distinct shifts never overlap, so the sum is the bitwise or; int32 wraps the top nibble's sign bit.
    words = (moved << shifts).sum(-1, dtype=torch.int32)  # [..., n / 8]
    return words.movedim(-1, dim).contiguous()


def group_index(in_features: int, group_size: int, device: torch.device | None = None) -> Tensor:
    """g(k) = k // group_size for every input feature (group_size -1: one group)."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device, dtype=torch.int32) // size


def dequantize_int4(
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    zero_offset: int,
    g_idx: Tensor | None = None,
) -> Tensor:
    """W [out, in] in float32 from the internal layout (module docstring). Without `g_idx`, consecutive
    groups of in / groups input features share a scale row."""
    q = unpack_int4(qweight, 0)  # [in, out]
    zeros = unpack_int4(qzeros, 1) + zero_offset  # [groups, out]
    in_features, groups = q.shape[0], scales.shape[0]
    if g_idx is None:
        g_idx = torch.arange(in_features, device=q.device) // (in_features // groups)
    g = g_idx.long()
    w = (q - zeros[g]).float() * scales.float()[g]  # [in, out]
    return w.t()


def awq_to_internal(qweight: Tensor, qzeros: Tensor) -> tuple[Tensor, Tensor]:
    """AWQ qweight [in, out / 8] and qzeros [groups, out / 8] (interleaved along out) -> the internal
    qweight [in / 8, out] and qzeros [groups, out / 8] (in order). Zero offset 0."""
    q = unpack_int4(qweight, 1, AWQ_NIBBLES)  # [in, out]
    z = unpack_int4(qzeros, 1, AWQ_NIBBLES)  # [groups, out]
    return pack_int4(q, 0), pack_int4(z, 1)


def permute_rows(qweight: Tensor, perm: Tensor) -> Tensor:
    """The internal qweight of the input features taken in the order `perm` (act-order: groups made
    contiguous, with the activations permuted the same way)."""
    q = unpack_int4(qweight, 0)  # [in, out]
    return pack_int4(q.index_select(0, perm.long()), 0)
