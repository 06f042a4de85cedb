"""Linear layers that know how to shard themselves over a tensor-parallel group.

Each parameter carries a `weight_loader(param, loaded_weight[, shard_id])` that copies this rank's
slice of a checkpoint tensor into it, so the loader never needs to know about sharding.
"""

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.parallel import all_reduce, divide, get_tp_rank, get_tp_size


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(
            f"shape mismatch: parameter slice is {tuple(dst.shape)}, checkpoint has {tuple(src.shape)}"
        )
    dst.copy_(src)


class LinearBase(nn.Module):
    """y = x W^T (+ b). `tp_dim` is the weight dimension split across ranks (None: replicated)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None):
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, tp_dim=None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        _copy_checked(param.data, loaded_weight)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp_size = get_tp_size()
        super().__init__(input_size, divide(output_size, tp_size, "output features"), bias, tp_dim=0)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        shard = param.data.size(self.tp_dim)
        _copy_checked(param.data, loaded_weight.narrow(self.tp_dim, self.tp_rank * shard, shard))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one matmul (e.g. gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id: int) -> None:
        offset = sum(self.output_sizes[:loaded_shard_id]) // self.tp_size
        size = self.output_sizes[loaded_shard_id] // self.tp_size
        dst = param.data.narrow(self.tp_dim, offset, size)
        src = loaded_weight.chunk(self.tp_size, self.tp_dim)[self.tp_rank]
        _copy_checked(dst, src)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul, heads split across ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
    ):
        tp_size = get_tp_size()
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.num_heads = divide(total_num_heads, tp_size, "attention heads")
        self.num_kv_heads = divide(total_num_kv_heads, tp_size, "key/value heads")
        output_size = (total_num_heads + 2 * total_num_kv_heads) * head_size
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id: str) -> None:
        q_size = self.num_heads * self.head_size
        kv_size = self.num_kv_heads * self.head_size
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[
            loaded_shard_id
        ]
        dst = param.data.narrow(self.tp_dim, offset, size)
        src = loaded_weight.chunk(self.tp_size, self.tp_dim)[self.tp_rank]
        _copy_checked(dst, src)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp_size = get_tp_size()
        super().__init__(divide(input_size, tp_size, "input features"), output_size, bias, tp_dim=1)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if param.dim() == 1:  # bias: not sharded
            _copy_checked(param.data, loaded_weight)
            return
        shard = param.data.size(self.tp_dim)
        _copy_checked(param.data, loaded_weight.narrow(self.tp_dim, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, on rank 0, so the all-reduce does not count it tp_size times.
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        # This layer's own size decides: a process group another engine started is not ours.
        return all_reduce(y) if self.tp_size > 1 else y
