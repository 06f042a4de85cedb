"""The tests' packers against the formats' published facts, and nanovllm's unpacking and dequantize
against the packers."""

import pytest
import torch

from nanovllm.quantization.int4_utils import (
    AWQ_NIBBLES,
    AWQ_ZERO_OFFSET,
    GPTQ_V1_ZERO_OFFSET,
    awq_to_internal,
    dequantize_int4,
    pack_int4,
    permute_rows,
    unpack_int4,
)
from tests.quantization.int4_packing import act_order_g_idx, pack_awq, pack_gptq, quantize


def _u32(word: torch.Tensor) -> int:
    return int(word) & 0xFFFFFFFF


def test_known_words():
    """Columns 0..7 holding values 0..7: AWQ interleaves them (nibble i = column (0,2,4,6,1,3,5,7)[i]),
    GPTQ keeps rows in order; symmetric GPTQ zeros (8, stored as 7) are 0x77777777."""
    q = torch.arange(8).repeat(8, 1)  # [in=8, out=8], column j holds j
    qz = quantize(torch.zeros(8, 8), group_size=-1, sym=True)
    qz.q = q
    assert _u32(pack_awq(qz)["qweight"][0, 0]) == 0x75316420
    qz.q = q.t().contiguous()  # row i holds i
    packed = pack_gptq(qz)
    assert _u32(packed["qweight"][0, 0]) == 0x76543210
    assert _u32(packed["qzeros"][0, 0]) == 0x77777777
    # nanovllm's own packing, phrased the other way round (column j in nibble AWQ_NIBBLES[j])
    assert _u32(pack_int4(torch.arange(8)[None], 1, AWQ_NIBBLES)[0, 0]) == 0x75316420


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_packers_round_trip_through_nanovllm(group_size, sym):
    """Both packed forms unpack (nanovllm) to the packer's integers, and dequantize to its weights."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=gen)
    qz = quantize(w, group_size, sym, min_zero=1)
    want = qz.dequantized()
    # quantization itself is close: at most half a step per weight
    step = qz.scales.float()[qz.g_idx.long()].t()
    assert ((want - w).abs() <= step / 2 + 1e-6).float().mean() > 0.99

    awq = pack_awq(qz)
    assert awq["qweight"].shape == (256, 6) and awq["qzeros"].shape == (qz.scales.shape[0], 6)
    assert torch.equal(unpack_int4(awq["qweight"], 1, AWQ_NIBBLES), qz.q)
    qweight, qzeros = awq_to_internal(awq["qweight"], awq["qzeros"])
    assert torch.equal(dequantize_int4(qweight, qzeros, awq["scales"], AWQ_ZERO_OFFSET), want)

    gptq = pack_gptq(qz)
    assert gptq["qweight"].shape == (32, 48) and gptq["qzeros"].shape == (qz.scales.shape[0], 6)
    assert torch.equal(unpack_int4(gptq["qweight"], 0), qz.q)
    assert torch.equal(unpack_int4(gptq["qzeros"], 1) + 1, qz.zeros)
    got = dequantize_int4(gptq["qweight"], gptq["qzeros"], gptq["scales"], GPTQ_V1_ZERO_OFFSET)
    assert torch.equal(got, want)


def test_act_order_and_permuted_rows():
    """desc_act: groups along a permutation of the inputs; the g_idx dequantize and the rows sorted by
    group (what the loader does to make groups contiguous) give the same product."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=gen)
    g_idx = act_order_g_idx(128, 32, gen)
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((4,), 32))
    qz = quantize(w, 32, sym=False, g_idx=g_idx, min_zero=1)
    gptq = pack_gptq(qz)
    want = qz.dequantized()
    got = dequantize_int4(gptq["qweight"], gptq["qzeros"], gptq["scales"], 1, g_idx=gptq["g_idx"])
    assert torch.equal(got, want)
    perm = torch.argsort(g_idx, stable=True)
    permuted = dequantize_int4(permute_rows(gptq["qweight"], perm), gptq["qzeros"], gptq["scales"], 1)
    assert torch.equal(permuted, want[:, perm])


def test_gptq_v1_cannot_store_zero_zero():
    qz = quantize(torch.rand(8, 32) + 1.0, 32, sym=False)  # all positive: zero point 0
    assert int(qz.zeros.min()) == 0
    with pytest.raises(ValueError, match="zero point of 0"):
        pack_gptq(qz)
