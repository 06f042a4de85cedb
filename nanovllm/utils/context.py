"""Per-step attention metadata, visible to the attention layers for the length of one forward pass."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """What the attention layers need to know about the tokens of one step.

    Prefill: the new tokens of each sequence are packed back to back; sequence i owns queries
    `cu_seqlens_q[i]:cu_seqlens_q[i+1]` and attends its first `cu_seqlens_k[i+1] - cu_seqlens_k[i]`
    cached tokens (a cached prefix plus the new ones). `block_tables` is set only when some
    sequence has a cached prefix (K/V then come from the paged cache).
    Decode: one query per sequence; `context_lens[i]` tokens of sequence i (the new one included)
    are read through `block_tables[i]`, which is padded with -1.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token, -1 for none
    cu_seqlens_q: torch.Tensor | None = None  # [num_seqs + 1] int32
    cu_seqlens_k: torch.Tensor | None = None  # [num_seqs + 1] int32
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    context_lens: torch.Tensor | None = None  # [num_seqs] int32
    block_tables: torch.Tensor | None = None  # [num_seqs, max_num_blocks] int32, -1 padded
    # Decode: how many parts each context is split into (split-K). Fixed per batch-size bucket, so
    # eager and CUDA-graph decoding sum in the same order and give identical results.
    num_splits: int | None = None
    # Host copies of the sequence lengths, for backends that loop over sequences on the CPU.
    seqlens_q: list[int] = field(default_factory=list)
    seqlens_k: list[int] = field(default_factory=list)
    # Prefill with a length-dependent rope (dynamic, longrope): [num_tokens] int64, the sequence length
    # whose frequencies rotate each new token (None in decode: p + 1 for the token at position p).
    rope_lengths: torch.Tensor | None = None


class ForwardContext:
    """One engine's current-step metadata, set for the length of one forward pass.

    Each model runner owns one and binds it to its attention layers, so two engines in one process (in
    two threads, say) never see each other's steps: there is no process-wide "current step".
    """

    __slots__ = ("_metadata",)

    def __init__(self) -> None:
        self._metadata: AttentionMetadata | None = None

    @contextmanager
    def set(self, metadata: AttentionMetadata) -> Iterator[AttentionMetadata]:
        """Make `metadata` the current step's metadata inside the `with` block, then restore."""
        previous, self._metadata = self._metadata, metadata
        try:
            yield metadata
        finally:
            self._metadata = previous

    def get(self) -> AttentionMetadata:
        if self._metadata is None:
            raise RuntimeError("attention ran outside ForwardContext.set(): no step metadata is set")
        return self._metadata
