"""The interface between a quantization format and the linear layers (vLLM's names).

A format is a `QuantizationConfig` subclass, registered by its `quant_method` name in
`nanovllm/quantization/__init__.py`:

- `get_name()`: the `quant_method` string of the checkpoint's `quantization_config` ("fp8", "awq").
- `from_config(d)`: build from that dict (config.json's `quantization_config`, or the JSON of one of
  `get_config_filenames()` in the model directory); raise ValueError naming a bad or missing field.
- `online()`: the config for `quantization=<name>` with an unquantized checkpoint (quantize at load);
  the default refuses with a ValueError (a format that needs pre-quantized weights).
- `get_quant_method(layer, prefix)`: a `LinearMethodBase` for this linear layer, or None for the
  unquantized default. `prefix` is the layer's module path ("model.layers.0.self_attn.qkv_proj");
  `is_layer_skipped(prefix)` applies the config's list of unconverted modules, fused layers included
  (through `packed_modules_mapping`, set from the model class before it is built).

A `LinearMethodBase` owns the layer's parameters and its matmul:

- `create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
  params_dtype, weight_loader)`: register the parameters on `layer` (`layer.register_parameter`), for
  THIS rank's partition. `output_partition_sizes` lists the fused parts' output sizes on this rank (one
  entry for an unfused layer: [q, k, v] for QKV, [gate, up] for gate/up). Give every parameter
  `weight_loader=weight_loader` (the layer's) and the attributes the layer's loader shards by (see
  `set_weight_attrs`):
    `output_dim` / `input_dim`: which tensor dimension runs along the layer's output / input features
      (None or absent: not sharded along that axis; a parameter with neither is copied whole);
    `shard_block` = (rows, cols): the parameter holds one entry per block of (rows output x cols input)
      features, e.g. a block-wise scale (`(128, 128)`) or a packed int4 tensor (`(1, 8)` for eight
      4-bit values per int32 along the input); the layer then converts feature offsets into entries,
      and refuses (ValueError) an offset or size that cuts a block, except a partial last block;
    `packed_dim`-like layouts are expressed with `shard_block` and the right `output_dim`/`input_dim`
      (a transposed [in, out] tensor has input_dim=0, output_dim=1).
  The layer's `weight_loader(param, tensor[, shard_id])` then narrows each checkpoint tensor to this
  rank's slice and copies it into the fused part `shard_id` (by offsets it computes), so a method does
  not re-implement tensor parallelism. A method may wrap the layer's loader for special tensors.
- `process_weights_after_loading(layer)`: once every tensor is loaded (also after dummy weights):
  repack, transpose, quantize online, precompute; may replace parameters.
- `apply(layer, x, bias)`: y = x W^T + bias for x [..., input_size_per_partition], in x's dtype.
  Row-parallel layers pass bias only on rank 0 and all-reduce the result themselves.

`UnquantizedLinearMethod` is the default: one `weight` [sum(output_partition_sizes), input] in the
model dtype and `F.linear`, except for a few rows on a GPU through a layer whose input is at least as wide as
its output, where the split-K `kernels/skinny_gemm.py` reads the weight faster than cuBLAS.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import skinny_gemm as skinny_kernels
from nanovllm.kernels.skinny_gemm import prefers_skinny, skinny_gemm, skinny_gemm_add_rms_norm


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    """Attach loader attributes (output_dim, input_dim, shard_block, weight_loader) to a parameter."""
    for key, value in attrs.items():
        if hasattr(param, key) and key != "weight_loader":
            raise AssertionError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)


class QuantizeMethodBase(ABC):
    """A layer's weights and computation under one quantization format."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, *args, **kwargs) -> None:
        """Register the layer's parameters."""

    @abstractmethod
    def apply(self, layer: nn.Module, *args, **kwargs) -> torch.Tensor:
        """The layer's forward computation with its (quantized) parameters."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once after every parameter is filled; the default keeps them as loaded."""


class LinearMethodBase(QuantizeMethodBase):
    """Parameters and matmul of one linear layer (see the module docstring)."""

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        weight_loader: Callable,
    ) -> None: ...

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...

    def apply_add_rms_norm(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        residual: torch.Tensor,
        norm,
        gated: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`norm(apply(layer, x, bias), residual)` (an RMSNorm with a residual: the normalised sum and
        the sum) in fewer launches than the two steps, or None where this method has no such path (the
        caller then runs both). gated: x is a SwiGLU block's gate/up output [..., 2K], and the product
        is of silu(gate) * up (the caller's activation folded in too). The default has no such path."""
        return None


class UnquantizedLinearMethod(LinearMethodBase):
    """The model dtype's `weight` [out, in] and a plain `F.linear`."""

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
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"output_dim": 0, "input_dim": 1, "weight_loader": weight_loader})
        layer.register_parameter("weight", weight)
        # Where apply_add_rms_norm's skinny GEMM runs in one launch, its programs count themselves done
        # here (the kernel leaves it zero); the layer's own, so no two launches share one.
        layer.register_buffer("skinny_counter", torch.zeros(1, dtype=torch.int32), persistent=False)

    def apply(self, layer, x, bias=None):
        weight = layer.weight
        if prefers_skinny(x, weight):  # a small decode batch through o_proj / down_proj on a GPU
            out = skinny_gemm(x.reshape(-1, x.shape[-1]), weight, bias)
            return out.view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight, bias)

    def apply_add_rms_norm(self, layer, x, bias, residual, norm, gated=False):
        # Where the skinny GEMM runs, its split-K reduction also adds the residual and normalises (and,
        # gated, where the engine asks for it, its loads apply the activation).
        weight = layer.weight
        if gated and not skinny_kernels.ENGINE_FUSE_SILU_MUL:
            return None
        if x.dim() != 2 or not prefers_skinny(x, weight) or norm.weight.dtype != x.dtype:
            return None
        if residual.dtype != x.dtype or residual.stride(-1) != 1:
            return None
        counter = layer.skinny_counter if skinny_kernels.ENGINE_ONE_LAUNCH_ADD_NORM else None
        return skinny_gemm_add_rms_norm(
            x, weight, bias, residual, norm.weight, norm.eps, gated=gated, counter=counter
        )


class QuantizationConfig(ABC):
    """One quantization format's settings (see the module docstring)."""

    def __init__(self) -> None:
        # checkpoint module name -> (fused module name, shard id): the model class's mapping
        self.packed_modules_mapping: dict[str, tuple[str, Any]] = {}

    @classmethod
    @abstractmethod
    def get_name(cls) -> str:
        """The `quant_method` name of this format."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantizationConfig":
        """Build from a checkpoint's quantization_config dict."""

    @classmethod
    def get_config_filenames(cls) -> list[str]:
        """Files in the model directory that may hold the config when config.json has none."""
        return []

    @classmethod
    def online(cls) -> "QuantizationConfig":
        """The config for quantizing an unquantized checkpoint at load (`quantization=<name>`)."""
        raise ValueError(
            f"quantization={cls.get_name()!r} needs a checkpoint quantized in that format (config.json "
            f"has no quantization_config, and {cls.get_name()!r} cannot quantize weights at load)"
        )

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """The method for `layer` (module path `prefix`), or None for the unquantized default."""

    def get_min_capability(self) -> int:
        """Least CUDA compute capability (major * 10 + minor) its GPU kernels need."""
        return 0

    @staticmethod
    def get_from_keys(config: dict[str, Any], keys: list[str], default: Any = ...) -> Any:
        """The value of the first of `keys` present in `config`; ValueError naming them when none is and
        no default is given."""
        for key in keys:
            if key in config:
                return config[key]
        if default is ...:
            raise ValueError(f"quantization_config has none of the fields {keys}")
        return default

    def is_layer_skipped(self, prefix: str, ignored: list[str]) -> bool:
        """Whether the module at `prefix` stays unquantized because `ignored` names it (a fused layer:
        all its checkpoint parts, which must agree)."""
        if not ignored:
            return False
        parent, _, name = prefix.rpartition(".")
        parts = [ckpt for ckpt, (fused, _) in self.packed_modules_mapping.items() if fused == name]
        names = [f"{parent}.{p}" if parent else p for p in parts] or [prefix]
        skipped = [any(_matches(n, pattern) for pattern in ignored) for n in names]
        if any(skipped) and not all(skipped):
            raise ValueError(
                f"the checkpoint leaves some but not all parts of the fused layer {prefix!r} unquantized "
                f"({', '.join(n for n, s in zip(names, skipped) if s)}): they must agree"
            )
        return skipped[0]


def _matches(name: str, pattern: str) -> bool:
    """A module name matches an ignore entry that names it, or a module path it ends with or lies in."""
    return name == pattern or name.endswith("." + pattern) or name.startswith(pattern + ".")
