"""Plain PyTorch attention over the paged cache: the CPU path and the reference for the kernels."""

import torch
import torch.nn.functional as F

from nanovllm.attention.backend import AttentionBackend
from nanovllm.utils.context import AttentionMetadata

# Query rows per attention call in prefill: the mask and scores are [rows, keys], so a long prompt never
# builds a [num_tokens, num_tokens] mask (at 16K new tokens over a 128K context that would be 2 GiB).
PREFILL_QUERY_TILE = 1024
FP8_MAX = 448.0  # largest finite float8_e4m3fn value: stores saturate there, as the Triton kernel


def dequantized(cache: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cached K or V in the compute dtype: an FP8 cache's values times its scale, others as stored."""
    if cache.dtype == dtype:
        return cache
    return (cache.float() * scale).to(dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Cached tokens [start, end) of one sequence: `[end - start, num_kv_heads, head_dim]`. Only the
    blocks holding them are read (earlier entries of the table may be -1, freed)."""
    block_size = cache.shape[1]
    first, last = start // block_size, (end + block_size - 1) // block_size
    pages = cache[block_table[first:last].long()]  # [blocks, block_size, kv_heads, head_dim]
    offset = start - first * block_size
    return pages.flatten(0, 1)[offset : offset + end - start]  # [end - start, kv_heads, head_dim]


def _attend(q, keys, values, q_pos, k_pos, window, scale):
    """q [len_q, heads, dim] at positions q_pos over keys [len_k, kv_heads, dim] at positions k_pos."""
    mask = k_pos[None, :] <= q_pos[:, None]  # [len_q, len_k]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1),  # [heads, len_q, head_dim]
        keys.transpose(0, 1),  # [kv_heads, len_k, head_dim]
        values.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return o.transpose(0, 1)  # [len_q, heads, head_dim]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    supports_cuda_graphs = False  # store_kv selects valid slots with a host-synchronising mask

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        valid = slot_mapping >= 0
        slots = slot_mapping[valid].long()
        k, v = k[valid], v[valid]
        if k_cache.dtype != k.dtype:  # FP8: value / scale, saturated
            k = (k.float() / k_scale).clamp(-FP8_MAX, FP8_MAX).to(k_cache.dtype)
            v = (v.float() / v_scale).clamp(-FP8_MAX, FP8_MAX).to(v_cache.dtype)
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k  # cache as [num_slots, kv_heads, head_dim]
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v

    def prefill(
        self,
        q,
        k,
        v,
        k_cache,
        v_cache,
        meta: AttentionMetadata,
        scale,
        sliding_window=None,
        k_scale=1.0,
        v_scale=1.0,
    ):
        out = torch.empty_like(q)
        q_start = k_start = 0
        for i, (len_q, len_k) in enumerate(zip(meta.seqlens_q, meta.seqlens_k)):
            # Query j sits at position len_k - len_q + j; tiles of queries keep the masks small.
            for t0 in range(0, len_q, PREFILL_QUERY_TILE):
                t1 = min(t0 + PREFILL_QUERY_TILE, len_q)
                first_pos, end_pos = len_k - len_q + t0, len_k - len_q + t1  # queries [first, end)
                lo = 0 if sliding_window is None else max(0, first_pos - sliding_window + 1)
                if meta.block_tables is None:
                    keys, values = k[k_start + lo : k_start + end_pos], v[k_start + lo : k_start + end_pos]
                else:
                    keys = dequantized(
                        gather_kv(k_cache, meta.block_tables[i], lo, end_pos), k_scale, q.dtype
                    )
                    values = dequantized(
                        gather_kv(v_cache, meta.block_tables[i], lo, end_pos), v_scale, q.dtype
                    )
                q_pos = torch.arange(first_pos, end_pos, device=q.device)
                k_pos = torch.arange(lo, end_pos, device=q.device)
                rows = slice(q_start + t0, q_start + t1)
                out[rows] = _attend(q[rows], keys, values, q_pos, k_pos, sliding_window, scale)
            q_start += len_q
            k_start += len_k
        return out

    def decode(
        self,
        q,
        k_cache,
        v_cache,
        meta: AttentionMetadata,
        scale,
        sliding_window=None,
        k_scale=1.0,
        v_scale=1.0,
    ):
        batch, max_blocks = meta.block_tables.shape
        block_size = k_cache.shape[1]
        first = 0
        if sliding_window is not None and meta.seqlens_k:
            # Only blocks inside some sequence's window are gathered (earlier entries may be freed, -1).
            first = max(0, (min(meta.seqlens_k) - sliding_window) // block_size)
        tables = meta.block_tables[:, first:].clamp(min=0).long()  # -1 entries read block 0, masked below
        keys = k_cache[tables].flatten(1, 2)  # [batch, gathered blocks * block_size, kv_heads, head_dim]
        values = v_cache[tables].flatten(1, 2)
        keys, values = dequantized(keys, k_scale, q.dtype), dequantized(values, v_scale, q.dtype)
        positions = torch.arange(first * block_size, max_blocks * block_size, device=q.device)
        mask = positions[None, :] < meta.context_lens[:, None]  # [batch, gathered tokens]
        if sliding_window is not None:
            mask &= positions[None, :] >= meta.context_lens[:, None] - sliding_window
        # Slots past the context are masked, but 0 * NaN is NaN: clear whatever they hold.
        keys = keys.masked_fill(~mask[:, :, None, None], 0)
        values = values.masked_fill(~mask[:, :, None, None], 0)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [batch, heads, 1, head_dim]
            keys.transpose(1, 2),  # [batch, kv_heads, gathered tokens, head_dim]
            values.transpose(1, 2),
            attn_mask=mask[:, None, None, :],  # [batch, 1, 1, gathered tokens]
            scale=scale,
            enable_gqa=True,
        )
        return o.squeeze(2)  # [batch, heads, head_dim]
