"""Decode through captured CUDA graphs: one graph per batch size, replayed with padded inputs.

The runner knows nothing of any attention backend: it fills static input buffers, builds the
`AttentionMetadata` views on them, and lets the model (and so the backend) run once under capture.
"""

from collections.abc import Callable

import torch

from nanovllm.utils.context import AttentionMetadata, ForwardContext

# Batches up to this size decode through graphs; larger ones run eagerly.
MAX_GRAPH_BATCH_SIZE = 512
# Small batch sizes captured individually, then every GRAPH_BATCH_STEP up to the limit.
SMALL_GRAPH_BATCH_SIZES = (1, 2, 4, 8)
GRAPH_BATCH_STEP = 16


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 16 up to min(max_num_seqs, 512), and that limit."""
    limit = min(max_num_seqs, MAX_GRAPH_BATCH_SIZE)
    sizes = [s for s in SMALL_GRAPH_BATCH_SIZES if s <= limit]
    sizes += list(range(GRAPH_BATCH_STEP, limit + 1, GRAPH_BATCH_STEP))
    if sizes[-1] != limit:
        sizes.append(limit)
    return sorted(set(sizes))


class CUDAGraphRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        max_num_seqs: int,
        max_num_blocks_per_seq: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        num_splits: Callable[[int], int],
        forward_context: ForwardContext,
    ):
        self.model = model
        self.forward_context = forward_context
        self.num_splits = num_splits
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        max_bs = self.batch_sizes[-1]
        self.max_batch_size = max_bs
        with torch.device(device):
            self.input_ids = torch.zeros(max_bs, dtype=torch.int64)
            self.positions = torch.zeros(max_bs, dtype=torch.int64)
            self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64)
            self.context_lens = torch.zeros(max_bs, dtype=torch.int32)
            self.block_tables = torch.full((max_bs, max_num_blocks_per_seq), -1, dtype=torch.int32)
            self.outputs = torch.zeros(max_bs, hidden_size, dtype=dtype)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            is_prefill=False,
            slot_mapping=self.slot_mapping[:bs],
            context_lens=self.context_lens[:bs],
            block_tables=self.block_tables[:bs],
            num_splits=self.num_splits(bs),
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.batch_sizes):  # largest first, so smaller graphs reuse its memory pool
            graph = torch.cuda.CUDAGraph()
            with self.forward_context.set(self._metadata(bs)):
                self.outputs[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])  # warm-up
                with torch.cuda.graph(graph, pool):
                    self.outputs[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])
            if pool is None:
                pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.max_batch_size

    def replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states `[batch, hidden]` of one decode step."""
        bs = input_ids.numel()
        graph_bs = next(s for s in self.batch_sizes if s >= bs)
        width = meta.block_tables.shape[1]
        self.input_ids[:bs] = input_ids
        self.positions[:bs] = positions
        self.slot_mapping[:bs] = meta.slot_mapping
        self.context_lens[:bs] = meta.context_lens
        self.block_tables[:bs, :width] = meta.block_tables
        if graph_bs > bs:  # padding rows: no cache write, nothing to attend
            self.slot_mapping[bs:graph_bs] = -1
            self.context_lens[bs:graph_bs] = 0
        self.graphs[graph_bs].replay()
        return self.outputs[:bs]
