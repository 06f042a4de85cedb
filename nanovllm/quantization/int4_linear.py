"""What AWQ and GPTQ linear layers share once their weights are in the internal 4-bit layout
(`int4_utils.py`): shape checks at build time, the parameters' loader attributes, and the matmul
(the Triton W4A16 kernel on CUDA, dequantize-then-`F.linear` elsewhere)."""

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.quantization.base_config import LinearMethodBase, set_weight_attrs
from nanovllm.quantization.int4_utils import PACK_FACTOR, dequantize_int4


def check_int4_shapes(
    layer: nn.Module,
    method: str,
    input_size_per_partition: int,
    output_partition_sizes: list[int],
    group_size: int,
) -> None:
    """vLLM's rules: this rank's input features are whole groups and whole packed words, every output
    part whole packed words. A tensor-parallel size that cuts one is a ValueError naming the layer."""
    name = getattr(layer, "prefix", "") or type(layer).__name__
    hint = (
        " (with tensor parallelism: use a smaller tensor_parallel_size)"
        if getattr(layer, "tp_size", 1) > 1
        else ""
    )
    if group_size != -1 and input_size_per_partition % group_size:
        raise ValueError(
            f"{name}: {input_size_per_partition} input features per rank are not a multiple of the "
            f"{method} group size {group_size}{hint}"
        )
    if input_size_per_partition % PACK_FACTOR:
        raise ValueError(
            f"{name}: {input_size_per_partition} input features per rank are not a multiple of the "
            f"{PACK_FACTOR} 4-bit values of a packed int32{hint}"
        )
    for size in output_partition_sizes:
        if size % PACK_FACTOR:
            raise ValueError(
                f"{name}: an output part of {size} features per rank is not a multiple of the "
                f"{PACK_FACTOR} 4-bit values of a packed int32{hint}"
            )


def int4_parameter(shape: tuple[int, ...], dtype: torch.dtype, **attrs) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(param, attrs)
    return param


def register_group_parameters(
    layer: nn.Module, groups: int, out_features: int, rows: int, group_in_dim: int | None, weight_loader
) -> None:
    """The per-group `qzeros` (int32, eight 4-bit zeros per word along the output) and `scales` (fp16)
    of AWQ and GPTQ, which lay them out alike: [groups, out / 8] and [groups, out], one group per `rows`
    input features; `group_in_dim` None keeps every group on each rank (not cut along the input)."""
    layer.register_parameter(
        "qzeros",
        int4_parameter(
            (groups, out_features // PACK_FACTOR),
            torch.int32,
            input_dim=group_in_dim,
            output_dim=1,
            shard_block=(PACK_FACTOR, rows),
            weight_loader=weight_loader,
        ),
    )
    layer.register_parameter(
        "scales",
        int4_parameter(
            (groups, out_features),
            torch.float16,
            input_dim=group_in_dim,
            output_dim=1,
            shard_block=(1, rows),
            weight_loader=weight_loader,
        ),
    )


def replace_parameter(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a loaded parameter for its repacked form (a plain parameter: loading is over)."""
    delattr(layer, name)
    layer.register_parameter(name, nn.Parameter(value.contiguous(), requires_grad=False))


class Int4LinearMethod(LinearMethodBase):
    """The matmul over a layer holding, after `process_weights_after_loading`, the internal layout:
    `qweight` [in / 8, out], `qzeros` [groups, out / 8], `scales` [groups, out], plus
    `layer.int4_zero_offset` and `layer.int4_group_size` (rows per group; -1 for one group), optional
    `layer.int4_perm` (the input features' order that makes act-order groups contiguous) and
    `layer.int4_g_idx` (each input feature's group when they could not be made contiguous)."""

    def apply(self, layer, x, bias=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [tokens, in]
        perm = getattr(layer, "int4_perm", None)
        if perm is not None:
            x2 = x2.index_select(1, perm)  # [tokens, in], act-order groups contiguous
        g_idx = getattr(layer, "int4_g_idx", None)
        if x.device.type == "cuda":
            from nanovllm.kernels.w4a16 import w4a16_matmul

            y = w4a16_matmul(
                x2.contiguous(),
                layer.qweight,
                layer.qzeros,
                layer.scales,
                layer.int4_group_size,
                layer.int4_zero_offset,
                g_idx=g_idx,
                bias=bias,
            )
        else:
            y = F.linear(x2, self.dequantized_weight(layer, x.dtype), bias)
        return y.reshape(*shape[:-1], y.shape[-1])  # [..., out]

    def dequantized_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] in `dtype`, in the order of the layer's (possibly permuted) input features."""
        g_idx = getattr(layer, "int4_g_idx", None)
        w = dequantize_int4(layer.qweight, layer.qzeros, layer.scales, layer.int4_zero_offset, g_idx)
        return w.to(dtype)
