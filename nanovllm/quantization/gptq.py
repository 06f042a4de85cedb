"""GPTQ 4-bit weights (AutoGPTQ / GPTQModel checkpoints, e.g. Qwen's `*-GPTQ-Int4`), vLLM's
`quant_method: "gptq"`.

`quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false|true,
"sym": true|false, ...}`. Each quantized linear stores `qweight` int32 [in / 8, out] (nibble i of word r
is input row 8r + i), `qzeros` int32 [groups, out / 8] (nibble i of word c is column 8c + i),
`scales` fp16 [groups, out] and `g_idx` int32 [in], the group of each input row; W[n, k] =
(q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]. The v1 checkpoint format (the default, and every
published Int4 checkpoint) stores zero - 1; `checkpoint_format: "gptq_v2"` stores the zero itself.
With `desc_act` (act-order) the groups are formed along a permutation of the inputs, so g_idx is not
k // group_size.

The checkpoint layout is the internal one (`int4_utils.py`, zero offset 1 for v1). Act-order weights
are reordered at load so each group's rows are contiguous (the activations are permuted the same way
before the matmul); when a tensor-parallel shard holds parts of groups (row-parallel layers), the
kernel reads each row's group from g_idx instead. As in vLLM, such row-parallel act-order layers keep
the whole scales and zeros on every rank; other layers cut them at group boundaries.
"""

from typing import Any

import torch
from torch import nn

from nanovllm.quantization.awq import check_group_size
from nanovllm.quantization.base_config import QuantizationConfig
from nanovllm.quantization.int4_linear import (
    Int4LinearMethod,
    check_int4_shapes,
    int4_parameter,
    register_group_parameters,
    replace_parameter,
)
from nanovllm.quantization.int4_utils import GPTQ_V1_ZERO_OFFSET, PACK_FACTOR, group_index, permute_rows

CHECKPOINT_FORMATS = {"": GPTQ_V1_ZERO_OFFSET, "gptq": GPTQ_V1_ZERO_OFFSET, "gptq_v2": 0}


class GPTQConfig(QuantizationConfig):
    def __init__(
        self,
        weight_bits: int,
        group_size: int,
        desc_act: bool,
        sym: bool = True,
        checkpoint_format: str = "",
    ):
        super().__init__()
        if weight_bits != 4:
            raise ValueError(
                f"GPTQ checkpoints with {weight_bits!r}-bit weights are not supported (only bits: 4)"
            )
        for name, value in (("desc_act", desc_act), ("sym", sym)):
            if not isinstance(value, bool):
                raise ValueError(f"GPTQ quantization_config {name} must be true or false, got {value!r}")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"GPTQ checkpoint_format {checkpoint_format!r} is not supported (supported: 'gptq', "
                "'gptq_v2')"
            )
        self.weight_bits = weight_bits
        self.group_size = check_group_size("GPTQ", group_size)
        self.desc_act = desc_act
        self.sym = sym
        self.checkpoint_format = checkpoint_format
        self.zero_offset = CHECKPOINT_FORMATS[checkpoint_format]

    def __repr__(self) -> str:
        return (
            f"GPTQConfig(weight_bits={self.weight_bits}, group_size={self.group_size}, "
            f"desc_act={self.desc_act}, sym={self.sym}, checkpoint_format={self.checkpoint_format!r})"
        )

    @classmethod
    def get_name(cls) -> str:
        return "gptq"

    @classmethod
    def get_config_filenames(cls) -> list[str]:
        return ["quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQConfig":
        if cls.get_from_keys(config, ["lm_head"], False):
            raise ValueError("GPTQ checkpoints with a quantized lm_head (lm_head: true) are not supported")
        if cls.get_from_keys(config, ["is_marlin_format"], False):
            raise ValueError(
                "GPTQ checkpoints in the Marlin layout (is_marlin_format: true) are not supported"
            )
        if cls.get_from_keys(config, ["dynamic"], None):
            raise ValueError("GPTQ per-module overrides (quantization_config 'dynamic') are not supported")
        if cls.get_from_keys(config, ["modules_in_block_to_quantize"], None):
            raise ValueError(
                "GPTQ quantization_config modules_in_block_to_quantize (some layers left unquantized) is "
                "not supported"
            )
        fmt = cls.get_from_keys(config, ["checkpoint_format"], "") or ""
        return cls(
            weight_bits=cls.get_from_keys(config, ["bits"]),
            group_size=cls.get_from_keys(config, ["group_size"]),
            desc_act=cls.get_from_keys(config, ["desc_act"], False),
            sym=cls.get_from_keys(config, ["sym"], True),
            checkpoint_format=str(fmt).lower(),
        )

    def get_quant_method(self, layer: nn.Module, prefix: str) -> "GPTQLinearMethod":
        return GPTQLinearMethod(self)


class GPTQLinearMethod(Int4LinearMethod):
    def __init__(self, config: GPTQConfig):
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
        check_int4_shapes(layer, "GPTQ", input_size_per_partition, output_partition_sizes, group)
        out_features = sum(output_partition_sizes)
        rows = input_size if group == -1 else group
        # vLLM's rule: a row-parallel shard of act-order weights keeps every group's scales and zeros
        # (its rows may belong to any group); per-channel scales are one group, never cut.
        input_split = input_size != input_size_per_partition
        whole_groups = group == -1 or (input_split and self.config.desc_act)
        groups = input_size // rows if whole_groups else input_size_per_partition // rows
        group_in_dim = None if whole_groups else 0
        layer.register_parameter(
            "qweight",
            int4_parameter(
                (input_size_per_partition // PACK_FACTOR, out_features),
                torch.int32,
                input_dim=0,
                output_dim=1,
                shard_block=(1, PACK_FACTOR),
                weight_loader=weight_loader,
            ),
        )
        register_group_parameters(layer, groups, out_features, rows, group_in_dim, weight_loader)
        g_idx = int4_parameter((input_size_per_partition,), torch.int32, input_dim=0)
        g_idx.weight_loader = self._g_idx_loader(layer, weight_loader)
        layer.register_parameter("g_idx", g_idx)
        layer.int4_group_size = group
        layer.int4_zero_offset = self.config.zero_offset
        layer.int4_g_idx_loaded = set()

    @staticmethod
    def _g_idx_loader(layer: nn.Module, weight_loader):
        """g_idx of a fused layer comes once per part (q, k, v share their input): every part's must
        agree, since one permutation of the input serves them all."""

        def load(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
            before = param.data.clone() if layer.int4_g_idx_loaded else None
            weight_loader(param, loaded_weight)  # cut along the input like qweight
            if before is not None and not torch.equal(before, param.data):
                raise ValueError(
                    f"the fused parts of {layer.prefix or type(layer).__name__} have different g_idx "
                    "(act orders): they cannot share one matmul"
                )
            layer.int4_g_idx_loaded.add(shard_id)

        return load

    def process_weights_after_loading(self, layer):
        g_idx = layer.g_idx.data
        groups = layer.scales.shape[0]
        del layer.int4_g_idx_loaded
        delattr(layer, "g_idx")  # kept below (as int4_g_idx) only where the kernel needs it
        if not self.config.desc_act or self.config.group_size == -1:
            return  # groups are k // group_size (a g_idx saved alongside says the same)
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise ValueError(
                f"{layer.prefix or type(layer).__name__}: g_idx holds group indices outside 0..{groups - 1}"
            )
        k = g_idx.numel()
        trivial = group_index(k, self.config.group_size, g_idx.device)
        if groups * self.config.group_size == k:  # this rank holds whole groups
            if torch.equal(g_idx, trivial):
                return
            perm = torch.argsort(g_idx, stable=True)
            if torch.equal(g_idx[perm], trivial):
                # Rows sorted by group: group g is rows g * group_size.. of the permuted input.
                replace_parameter(layer, "qweight", permute_rows(layer.qweight.data, perm))
                layer.register_buffer("int4_perm", perm, persistent=False)
                return
        layer.register_buffer("int4_g_idx", g_idx.contiguous(), persistent=False)
