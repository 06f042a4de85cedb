"""Plain PyTorch attention over the paged cache: the CPU path and the reference for the kernels."""

import torch
import torch.nn.functional as F

from nanovllm.attention.backend import AttentionBackend
from nanovllm.utils.context import AttentionMetadata


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` cached tokens of one sequence: `[num_tokens, num_kv_heads, head_dim]`."""
    block_size = cache.shape[1]
    num_blocks = (num_tokens + block_size - 1) // block_size
    pages = cache[block_table[:num_blocks].long()]  # [num_blocks, block_size, kv_heads, head_dim]
    return pages.flatten(0, 1)[:num_tokens]  # [num_tokens, kv_heads, head_dim]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    supports_cuda_graphs = False  # store_kv selects valid slots with a host-synchronising mask

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        valid = slot_mapping >= 0
        slots = slot_mapping[valid].long()
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k[valid]  # cache as [num_slots, kv_heads, head_dim]
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid]

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale):
        out = torch.empty_like(q)
        q_start = k_start = 0
        for i, (len_q, len_k) in enumerate(zip(meta.seqlens_q, meta.seqlens_k)):
            if meta.block_tables is None:
                keys, values = k[k_start : k_start + len_k], v[k_start : k_start + len_k]
            else:
                keys = gather_kv(k_cache, meta.block_tables[i], len_k)
                values = gather_kv(v_cache, meta.block_tables[i], len_k)
            # Query j sits at position len_k - len_q + j and sees keys up to that position.
            q_pos = torch.arange(len_k - len_q, len_k, device=q.device)
            mask = torch.arange(len_k, device=q.device)[None, :] <= q_pos[:, None]  # [len_q, len_k]
            o = F.scaled_dot_product_attention(
                q[q_start : q_start + len_q].transpose(0, 1),  # [heads, len_q, head_dim]
                keys.transpose(0, 1),  # [kv_heads, len_k, head_dim]
                values.transpose(0, 1),
                attn_mask=mask,
                scale=scale,
                enable_gqa=True,
            )
            out[q_start : q_start + len_q] = o.transpose(0, 1)  # [len_q, heads, head_dim]
            q_start += len_q
            k_start += len_k
        return out

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale):
        batch, max_blocks = meta.block_tables.shape
        block_size = k_cache.shape[1]
        tables = meta.block_tables.clamp(min=0).long()  # -1 padding reads block 0, masked below
        keys = k_cache[tables].flatten(1, 2)  # [batch, max_blocks * block_size, kv_heads, head_dim]
        values = v_cache[tables].flatten(1, 2)
        positions = torch.arange(max_blocks * block_size, device=q.device)
        mask = positions[None, :] < meta.context_lens[:, None]  # [batch, max_len]
        # Slots past the context are masked, but 0 * NaN is NaN: clear whatever they hold.
        keys = keys.masked_fill(~mask[:, :, None, None], 0)
        values = values.masked_fill(~mask[:, :, None, None], 0)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [batch, heads, 1, head_dim]
            keys.transpose(1, 2),  # [batch, kv_heads, max_len, head_dim]
            values.transpose(1, 2),
            attn_mask=mask[:, None, None, :],  # [batch, 1, 1, max_len]
            scale=scale,
            enable_gqa=True,
        )
        return o.squeeze(2)  # [batch, heads, head_dim]
