"""AWQ 4-bit weights (AutoAWQ's "gemm" checkpoints, e.g. Qwen's `Qwen3-*-AWQ`), vLLM's
`quant_method: "awq"`.

`quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true,
"version": "gemm", "modules_to_not_convert": [...] | null}`. Each quantized linear stores `qweight`
int32 [in, out / 8], `qzeros` int32 [in / group, out / 8] and `scales` fp16 [in / group, out]; the eight
4-bit values of a word are columns in AutoAWQ's interleaved order (`int4_utils.AWQ_NIBBLES`), and
W[n, k] = (q[k, n] - zero[k // group, n]) * scales[k // group, n].

At load the weights are repacked into the internal layout (`int4_utils.py`, zero offset 0), which the
W4A16 kernel reads. Tensor parallelism cuts qweight and qzeros along the output at packed words (eight
columns), and row-parallel layers along the input at group boundaries.
"""

from typing import Any

import torch
from torch import nn

from nanovllm.quantization.base_config import QuantizationConfig
from nanovllm.quantization.int4_linear import (
    Int4LinearMethod,
    check_int4_shapes,
    int4_parameter,
    register_group_parameters,
    replace_parameter,
)
from nanovllm.quantization.int4_utils import AWQ_ZERO_OFFSET, PACK_FACTOR, awq_to_internal

SUPPORTED_VERSIONS = ("gemm",)


def check_group_size(method: str, group_size: Any) -> int:
    """A group size is a positive multiple of 8 (whole packed words) or -1 (one group per channel)."""
    valid = isinstance(group_size, int) and not isinstance(group_size, bool)
    if not valid or not (group_size == -1 or (group_size > 0 and group_size % 8 == 0)):
        raise ValueError(
            f"{method} quantization_config group_size must be a positive multiple of 8 or -1 (per "
            f"channel), got {group_size!r}"
        )
    return group_size


class AWQConfig(QuantizationConfig):
    def __init__(self, weight_bits: int, group_size: int, zero_point: bool, modules_to_not_convert=None):
        super().__init__()
        if weight_bits != 4:
            raise ValueError(
                f"AWQ checkpoints with {weight_bits!r}-bit weights are not supported (only 4 bits)"
            )
        if zero_point is not True:
            raise ValueError(
                "AWQ checkpoints without zero points (zero_point: false) are not supported; "
                "AutoAWQ's gemm checkpoints have them"
            )
        if modules_to_not_convert is not None and (
            not isinstance(modules_to_not_convert, list)
            or not all(isinstance(m, str) for m in modules_to_not_convert)
        ):
            raise ValueError(
                "AWQ quantization_config modules_to_not_convert must be a list of module names or null, "
                f"got {modules_to_not_convert!r}"
            )
        self.weight_bits = weight_bits
        self.group_size = check_group_size("AWQ", group_size)
        self.zero_point = zero_point
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    def __repr__(self) -> str:
        return (
            f"AWQConfig(weight_bits={self.weight_bits}, group_size={self.group_size}, "
            f"zero_point={self.zero_point}, modules_to_not_convert={self.modules_to_not_convert})"
        )

    @classmethod
    def get_name(cls) -> str:
        return "awq"

    @classmethod
    def get_config_filenames(cls) -> list[str]:
        return ["quant_config.json", "quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AWQConfig":
        version = str(cls.get_from_keys(config, ["version"], "gemm")).lower()
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"AWQ version {version!r} is not supported (only {', '.join(SUPPORTED_VERSIONS)}: "
                "AutoAWQ's gemm layout)"
            )
        return cls(
            weight_bits=cls.get_from_keys(config, ["w_bit", "bits"]),
            group_size=cls.get_from_keys(config, ["q_group_size", "group_size"]),
            zero_point=cls.get_from_keys(config, ["zero_point"], True),
            modules_to_not_convert=cls.get_from_keys(config, ["modules_to_not_convert"], None),
        )

    def get_quant_method(self, layer: nn.Module, prefix: str) -> "AWQLinearMethod | None":
        if self.is_layer_skipped(prefix, self.modules_to_not_convert):
            return None
        return AWQLinearMethod(self)


class AWQLinearMethod(Int4LinearMethod):
    def __init__(self, config: AWQConfig):
        self.config = config

    def create_weights(
        self,
        layer,
        input_size_per_partition,
        output_partition_sizes,
        input_size,
        output_size,
        params_dtype,
        weight_loader,
    ):
        group = self.config.group_size
        check_int4_shapes(layer, "AWQ", input_size_per_partition, output_partition_sizes, group)
        out_features = sum(output_partition_sizes)
        rows = input_size_per_partition if group == -1 else group
        groups = input_size_per_partition // rows
        # One group per channel (-1) spans the whole input: replicated, never cut along the input.
        group_in_dim = None if group == -1 else 0
        layer.register_parameter(
            "qweight",
            int4_parameter(
                (input_size_per_partition, out_features // PACK_FACTOR),
                torch.int32,
                input_dim=0,
                output_dim=1,
                shard_block=(PACK_FACTOR, 1),
                weight_loader=weight_loader,
            ),
        )
        register_group_parameters(layer, groups, out_features, rows, group_in_dim, weight_loader)
        layer.int4_group_size = group
        layer.int4_zero_offset = AWQ_ZERO_OFFSET

    def process_weights_after_loading(self, layer):
        qweight, qzeros = awq_to_internal(layer.qweight.data, layer.qzeros.data)
        replace_parameter(layer, "qweight", qweight)  # [in / 8, out]
        replace_parameter(layer, "qzeros", qzeros)  # [groups, out / 8], in order
        replace_parameter(layer, "scales", layer.scales.data)
