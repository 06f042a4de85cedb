"""Linear layers that know how to shard themselves over a tensor-parallel group.

A layer's parameters and matmul come from its quantization method (`nanovllm/quantization`;
`UnquantizedLinearMethod` by default: one `weight` [out, in] and `F.linear`). Each parameter carries
`weight_loader(param, loaded_weight[, shard_id])`, the layer's, which copies this rank's slice of a
checkpoint tensor into it, so the loader never needs to know about sharding or formats. The layer
knows which features of each fused part (q/k/v, gate/up) this rank holds; a parameter's `output_dim`
and `input_dim` attributes say which of its dimensions run along those features, and `shard_block`
that it holds one entry per block of features (block scales, packed integers).
"""

import torch
from torch import nn

from nanovllm.quantization.base_config import (
    LinearMethodBase,
    QuantizationConfig,
    UnquantizedLinearMethod,
    set_weight_attrs,
)
from nanovllm.utils.parallel import all_reduce, divide, get_tp_rank, get_tp_size


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(
            f"shape mismatch: parameter slice is {tuple(dst.shape)}, checkpoint has {tuple(src.shape)}"
        )
    dst.copy_(src)


def _narrow_pair(
    dst: torch.Tensor,
    src: torch.Tensor,
    dim: int,
    dst_offset: int,
    src_offset: int,
    size: int,
    full: int,
    block: int,
    what: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Narrow `dst` (this rank's parameter) and `src` (the checkpoint tensor of `full` features along
    `dim`) to `size` features starting at their offsets. With `block` > 1 both hold one entry per
    `block` features: offsets must fall on block boundaries and a size may end in a partial block only
    at the end of the checkpoint tensor."""
    if block > 1:
        if src_offset % block or dst_offset % block or (size % block and src_offset + size != full):
            raise ValueError(
                f"this layer's tensor-parallel shard or fused part of {what} (features {src_offset}.."
                f"{src_offset + size} of {full}, placed at {dst_offset}) cuts a quantization block of "
                f"{block}: use a tensor_parallel_size that splits {what} on block boundaries"
            )
        dst_offset, src_offset, size = dst_offset // block, src_offset // block, -(-size // block)
    return dst.narrow(dim, dst_offset, size), src.narrow(dim, src_offset, size)


class LinearBase(nn.Module):
    """y = x W^T (+ b). `tp_dim` is the weight dimension split across ranks (0: output features,
    1: input features, None: replicated). `input_size`/`output_size` are this rank's."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        tp_dim: int | None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        output_partition_sizes: list[int] | None = None,
    ):
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.input_size_per_partition = input_size
        self.output_size_per_partition = output_size
        self.output_partition_sizes = output_partition_sizes or [output_size]
        self.input_size = input_size * self.tp_size if tp_dim == 1 else input_size
        self.output_size = output_size * self.tp_size if tp_dim == 0 else output_size
        self.prefix = prefix
        method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        self.quant_method: LinearMethodBase = method or UnquantizedLinearMethod()
        self.quant_method.create_weights(
            self,
            self.input_size_per_partition,
            self.output_partition_sizes,
            self.input_size,
            self.output_size,
            torch.get_default_dtype(),
            self.weight_loader,
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    # ---- which features of a checkpoint tensor this rank holds --------------------------------

    def output_shard(self, shard_id) -> tuple[int, int, int, int]:
        """(offset in this rank's output features, size, offset in the checkpoint tensor, the checkpoint
        tensor's output features) of part `shard_id` (None: the unfused layer)."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no fused part {shard_id!r}")
        n = self.output_size_per_partition
        if self.tp_dim == 0:
            return 0, n, self.tp_rank * n, self.output_size
        return 0, n, 0, n

    def input_shard(self) -> tuple[int, int, int]:
        """(offset in the checkpoint tensor, size, the checkpoint tensor's input features)."""
        n = self.input_size_per_partition
        if self.tp_dim == 1:
            return self.tp_rank * n, n, self.input_size
        return 0, n, n

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None) -> None:
        """Copy this rank's slice of `loaded_weight` (a whole checkpoint tensor, or fused part
        `loaded_shard_id` of it) into `param`, along the parameter's `output_dim` and `input_dim`."""
        if param.dtype != loaded_weight.dtype and (
            _is_float8(param.dtype) or _is_float8(loaded_weight.dtype)
        ):
            raise ValueError(
                f"dtype mismatch: parameter is {param.dtype}, checkpoint has {loaded_weight.dtype} (the "
                "checkpoint's weights are not in the format its quantization_config names)"
            )
        dst, src = param.data, loaded_weight
        block_out, block_in = getattr(param, "shard_block", None) or (1, 1)
        out_dim = getattr(param, "output_dim", None)
        in_dim = getattr(param, "input_dim", None)
        if out_dim is None and loaded_shard_id is not None:
            raise ValueError(
                f"parameter without an output dimension cannot take fused part {loaded_shard_id!r}"
            )
        # The whole checkpoint tensor's shape: this rank's parameter, with the sharded dimensions whole.
        want = list(param.shape)
        if out_dim is not None:
            out = self.output_shard(loaded_shard_id)
            want[out_dim] = -(-out[3] // block_out)
        if in_dim is not None:
            inp = self.input_shard()
            want[in_dim] = -(-inp[2] // block_in)
        if tuple(src.shape) != tuple(want):
            raise ValueError(
                f"shape mismatch: parameter takes {tuple(want)}, checkpoint has {tuple(src.shape)}"
            )
        if out_dim is not None:
            dst_off, size, src_off, full = out
            dst, src = _narrow_pair(
                dst, src, out_dim, dst_off, src_off, size, full, block_out, "output features"
            )
        if in_dim is not None:
            src_off, size, full = inp
            dst, src = _narrow_pair(dst, src, in_dim, 0, src_off, size, full, block_in, "input features")
        _copy_checked(dst, src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


def _is_float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


class ReplicatedLinear(LinearBase):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__(input_size, output_size, bias, None, quant_config, prefix)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        output_sizes: list[int] | None = None,
    ):
        tp_size = get_tp_size()
        per_rank = [divide(s, tp_size, "output features") for s in output_sizes or [output_size]]
        super().__init__(
            input_size,
            divide(output_size, tp_size, "output features"),
            bias,
            0,
            quant_config,
            prefix,
            per_rank,
        )


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one matmul (e.g. gate and up)."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, quant_config, prefix, output_sizes)

    def output_shard(self, shard_id) -> tuple[int, int, int, int]:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"{type(self).__name__} has no fused part {shard_id!r}")
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        return offset, size, self.tp_rank * size, self.output_sizes[shard_id]


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul, heads split across ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        tp_size = get_tp_size()
        self.num_heads = divide(total_num_heads, tp_size, "attention heads")
        self.num_kv_heads = divide(total_num_kv_heads, tp_size, "key/value heads")
        sizes = [total_num_heads * head_size, total_num_kv_heads * head_size, total_num_kv_heads * head_size]
        super().__init__(hidden_size, sum(sizes), bias, quant_config, prefix, sizes)

    def output_shard(self, shard_id) -> tuple[int, int, int, int]:
        q_size = self.num_heads * self.head_size
        kv_size = self.num_kv_heads * self.head_size
        parts = {
            "q": (0, q_size, self.total_num_heads),
            "k": (q_size, kv_size, self.total_num_kv_heads),
            "v": (q_size + kv_size, kv_size, self.total_num_kv_heads),
        }
        if shard_id not in parts:
            raise ValueError(f"{type(self).__name__} has no fused part {shard_id!r}")
        offset, size, total_heads = parts[shard_id]
        return offset, size, self.tp_rank * size, total_heads * self.head_size


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        tp_size = get_tp_size()
        super().__init__(
            divide(input_size, tp_size, "input features"), output_size, bias, 1, quant_config, prefix
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, on rank 0, so the all-reduce does not count it tp_size times.
        y = self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)
        # This layer's own size decides: a process group another engine started is not ours.
        return all_reduce(y) if self.tp_size > 1 else y

    def forward_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`norm(self(x), residual)` for an RMSNorm `norm`: the normalised sum and the new residual
        stream. Unsharded, the quant method may do it in fewer launches (the skinny GEMM's split-K
        reduction adds and normalises at small decode batches); otherwise the two steps."""
        if self.tp_size == 1:
            fused = self.quant_method.apply_add_rms_norm(self, x, self.bias, residual, norm)
            if fused is not None:
                return fused
        return norm(self(x), residual)

    def forward_gated_add_rms_norm(
        self, gate_up: torch.Tensor, residual: torch.Tensor, norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`norm(self(silu(gate) * up), residual)` for a SwiGLU block's gate/up output [..., 2K] in
        the quant method's fused launches, or None where it has none (the caller then runs the
        activation and `forward_add_rms_norm`)."""
        if self.tp_size != 1:
            return None
        return self.quant_method.apply_add_rms_norm(self, gate_up, self.bias, residual, norm, gated=True)
