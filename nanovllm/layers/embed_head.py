"""Vocabulary-parallel embedding and LM head."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.parallel import all_reduce, divide, get_tp_rank, get_tp_size


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary; other ranks' tokens look up zeros and
    an all-reduce fills them in."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = divide(num_embeddings, self.tp_size, "vocabulary size")
        self.vocab_start_idx = self.num_embeddings_per_partition * self.tp_rank
        self.vocab_end_idx = self.vocab_start_idx + self.num_embeddings_per_partition
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        shard = param.data.size(0)
        src = loaded_weight.narrow(0, self.tp_rank * shard, shard)
        if param.data.shape != src.shape:
            raise ValueError(
                f"shape mismatch: parameter slice is {tuple(param.shape)}, checkpoint has {tuple(src.shape)}"
            )
        param.data.copy_(src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(x, self.weight)
        mask = (x >= self.vocab_start_idx) & (x < self.vocab_end_idx)
        local = mask * (x - self.vocab_start_idx)
        y = F.embedding(local, self.weight) * mask.unsqueeze(-1)  # [num_tokens, hidden]
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the vocabulary; with tensor parallelism each rank computes its slice and rank 0
    gathers the full rows (other ranks return None)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        logits = F.linear(x, self.weight)  # [num_rows, vocab / tp]
        if self.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
        dist.gather(logits, parts, dst=0)
        return torch.cat(parts, dim=-1) if self.tp_rank == 0 else None
