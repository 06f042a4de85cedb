"""FP8 (e4m3) weights, vLLM's `quant_method: "fp8"`.

Two ways in:
- A checkpoint in the block format of Qwen's `Qwen3-*-FP8` releases (and DeepSeek-V3's):
  `quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128]}`; each quantized linear stores `weight` float8_e4m3fn [out, in] and
  `weight_scale_inv` [ceil(out / 128), ceil(in / 128)] (fp32, bf16 or fp16), and
  W[i, j] = weight[i, j] * weight_scale_inv[i // 128, j // 128] (partial last blocks included).
- `quantization="fp8"` with an unquantized checkpoint: each weight is quantized at load with one
  scale per output channel (amax / 448); activations get one dynamic scale per token.

On CUDA the GEMMs are W8A8 with fp32 accumulation (`nanovllm/kernels/fp8_gemm.py`): the block format
quantizes activations per token and block_k-wide group of input features inside its Triton kernel (any
block shape: one the FP8 dot cannot take as a K tile goes to a dequantizing kernel); the
per-channel format quantizes per token and uses `torch._scaled_mm` (or a Triton kernel where that
does not apply). On a CPU the weights are dequantized for the matmul (weight-only emulation), so the
output equals the dequantized model in the compute dtype: the tests' reference.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.quantization.base_config import (
    LinearMethodBase,
    QuantizationConfig,
    set_weight_attrs,
)

FP8_DTYPE = torch.float8_e4m3fn
# Largest finite float8_e4m3fn value.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
ACTIVATION_SCHEMES = ("dynamic", "static")


class Fp8Config(QuantizationConfig):
    """`is_checkpoint_fp8_serialized`: the checkpoint holds FP8 weights (else: quantize at load).
    `weight_block_size`: [rows, cols] of one scale block, or None for per-tensor/per-channel scales."""

    def __init__(
        self,
        is_checkpoint_fp8_serialized: bool = False,
        activation_scheme: str = "dynamic",
        ignored_layers: list[str] | None = None,
        weight_block_size: list[int] | None = None,
    ):
        super().__init__()
        if activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(
                f"quantization_config activation_scheme must be one of {ACTIVATION_SCHEMES}, "
                f"got {activation_scheme!r}"
            )
        if is_checkpoint_fp8_serialized and weight_block_size is None:
            raise ValueError(
                "FP8 checkpoints with per-tensor weight scales (no weight_block_size in "
                "quantization_config) are not supported; the block format ([128, 128]) is"
            )
        if weight_block_size is not None:
            if not is_checkpoint_fp8_serialized:
                raise ValueError("weight_block_size is only supported with FP8 checkpoints")
            if (
                not isinstance(weight_block_size, (list, tuple))
                or len(weight_block_size) != 2
                or not all(
                    isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in weight_block_size
                )
            ):
                raise ValueError(
                    f"quantization_config weight_block_size must be two positive ints [rows, cols], "
                    f"got {weight_block_size!r}"
                )
            if activation_scheme != "dynamic":
                raise ValueError(
                    "block-wise FP8 (weight_block_size) supports only activation_scheme 'dynamic', "
                    f"got {activation_scheme!r}"
                )
            weight_block_size = [int(b) for b in weight_block_size]
        elif activation_scheme != "dynamic":
            raise ValueError(
                "static FP8 activation scales are not supported (activation_scheme 'dynamic' is)"
            )
        self.is_checkpoint_fp8_serialized = is_checkpoint_fp8_serialized
        self.activation_scheme = activation_scheme
        self.ignored_layers = list(ignored_layers or [])
        self.weight_block_size = weight_block_size

    @classmethod
    def get_name(cls) -> str:
        return "fp8"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Fp8Config":
        method = str(cls.get_from_keys(config, ["quant_method"])).lower()
        fmt = config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"quantization_config fmt {fmt!r} is not supported (only 'e4m3')")
        ignored = cls.get_from_keys(config, ["ignored_layers", "modules_to_not_convert"], None)
        if ignored is not None and (
            not isinstance(ignored, list) or not all(isinstance(n, str) for n in ignored)
        ):
            raise ValueError(
                f"quantization_config ignored_layers must be a list of module names, got {ignored!r}"
            )
        return cls(
            is_checkpoint_fp8_serialized="fp8" in method,
            activation_scheme=cls.get_from_keys(config, ["activation_scheme"], "dynamic"),
            ignored_layers=ignored,
            weight_block_size=cls.get_from_keys(config, ["weight_block_size"], None),
        )

    @classmethod
    def online(cls) -> "Fp8Config":
        return cls(is_checkpoint_fp8_serialized=False)

    def get_min_capability(self) -> int:
        return 89  # FP8 tensor cores (Ada, Hopper)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        if self.is_layer_skipped(prefix, self.ignored_layers):
            return None
        return Fp8LinearMethod(self)


def check_block_shape(
    layer: nn.Module,
    input_size_per_partition: int,
    output_partition_sizes: list[int],
    block: list[int],
) -> None:
    """vLLM's rule: a tensor-parallel shard or a fused part must start on a block boundary. The input
    of a row-parallel shard must be whole blocks; so must every output part of a split or fused layer,
    except the last part of an unsplit fused layer (its partial block is the tensor's last)."""
    block_n, block_k = block
    tp = getattr(layer, "tp_size", 1)
    name = getattr(layer, "prefix", "") or type(layer).__name__
    if tp > 1 and getattr(layer, "tp_dim", None) == 1 and input_size_per_partition % block_k:
        raise ValueError(
            f"{name}: input features per tensor-parallel rank ({input_size_per_partition}) are not a "
            f"multiple of the FP8 weight block ({block_k}): a shard would cut a block; use a smaller "
            "tensor_parallel_size"
        )
    split = tp > 1 and getattr(layer, "tp_dim", None) == 0
    if split or len(output_partition_sizes) > 1:
        sizes = output_partition_sizes if split else output_partition_sizes[:-1]
        for size in sizes:
            if size % block_n:
                what = "per tensor-parallel rank" if split else "of a fused part"
                raise ValueError(
                    f"{name}: output features {what} ({size}) are not a multiple of the FP8 weight block "
                    f"({block_n}): a shard or part would cut a block"
                    + ("; use a smaller tensor_parallel_size" if split else "")
                )


def dequantize_block(
    weight: torch.Tensor, scale: torch.Tensor, block: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """W = weight * scale of its block, in fp32 and then `dtype`. weight [n, k], scale
    [ceil(n / block_n), ceil(k / block_k)]."""
    n, k = weight.shape
    block_n, block_k = block
    full = scale.float().repeat_interleave(block_n, 0)[:n].repeat_interleave(block_k, 1)[:, :k]  # [n, k]
    return (weight.float() * full).to(dtype)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8: (q [n, k] e4m3, scale [n] fp32) with W ~ q * scale[:, None]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # [n]
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


class Fp8LinearMethod(LinearMethodBase):
    def __init__(self, config: Fp8Config):
        self.config = config
        self.block = config.weight_block_size

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
        out_features = sum(output_partition_sizes)
        if not self.config.is_checkpoint_fp8_serialized:
            # Loaded in the model dtype; quantized in process_weights_after_loading.
            weight = nn.Parameter(
                torch.empty(out_features, input_size_per_partition, dtype=params_dtype), requires_grad=False
            )
            set_weight_attrs(weight, {"output_dim": 0, "input_dim": 1, "weight_loader": weight_loader})
            layer.register_parameter("weight", weight)
            return
        check_block_shape(layer, input_size_per_partition, output_partition_sizes, self.block)
        block_n, block_k = self.block
        weight = nn.Parameter(
            torch.empty(out_features, input_size_per_partition, dtype=FP8_DTYPE), requires_grad=False
        )
        set_weight_attrs(weight, {"output_dim": 0, "input_dim": 1, "weight_loader": weight_loader})
        layer.register_parameter("weight", weight)
        scale = nn.Parameter(
            torch.empty(
                -(-out_features // block_n), -(-input_size_per_partition // block_k), dtype=torch.float32
            ),
            requires_grad=False,
        )
        set_weight_attrs(
            scale,
            {
                "output_dim": 0,
                "input_dim": 1,
                "shard_block": (block_n, block_k),
                "weight_loader": weight_loader,
            },
        )
        layer.register_parameter("weight_scale_inv", scale)

    def process_weights_after_loading(self, layer):
        if self.config.is_checkpoint_fp8_serialized:
            return
        q, scale = quantize_per_channel(layer.weight.data)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def apply(self, layer, x, bias=None):
        if x.device.type != "cuda":
            return F.linear(x, self.dequantized_weight(layer, x.dtype), bias)
        from nanovllm.kernels import fp8_gemm

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [tokens, in]
        if self.block is not None:
            y = fp8_gemm.w8a8_block_matmul(x2, layer.weight, layer.weight_scale_inv, self.block)
        else:
            y = fp8_gemm.w8a8_channel_matmul(x2, layer.weight, layer.weight_scale)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])  # [..., out]

    def dequantized_weight(self, layer, dtype: torch.dtype) -> torch.Tensor:
        """The weight the FP8 values and scales stand for, `[out, in]` in `dtype`."""
        if self.block is not None:
            return dequantize_block(layer.weight, layer.weight_scale_inv, self.block, dtype)
        return (layer.weight.float() * layer.weight_scale[:, None]).to(dtype)
