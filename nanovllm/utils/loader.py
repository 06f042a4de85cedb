"""Fill a model's parameters: from safetensors checkpoints through each parameter's `weight_loader`,
or with random values (`load_format="dummy"`)."""

from __future__ import annotations

import json
import os
from glob import glob
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from nanovllm.utils.parallel import get_tp_size

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from nanovllm.config import Config

# Checkpoint tensors that are recomputed rather than loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"shape mismatch: parameter is {tuple(param.shape)}, checkpoint has {tuple(loaded_weight.shape)}"
        )
    param.data.copy_(loaded_weight)


def _target(model: nn.Module, name: str) -> tuple[str, object]:
    """Map a checkpoint tensor name to (parameter name, shard id or None): the model's own
    `map_checkpoint_name(name)` first where it has one (e.g. per-expert tensors into stacked expert
    parameters), then its `packed_modules_mapping`."""
    mapper = getattr(model, "map_checkpoint_name", None)
    target = mapper(name) if mapper is not None else None
    if target is not None:
        return target
    mapping = getattr(model, "packed_modules_mapping", {})
    for ckpt_part, (fused_part, shard_id) in mapping.items():
        if f".{ckpt_part}." in name:
            return name.replace(f".{ckpt_part}.", f".{fused_part}."), shard_id
    return name, None


def _check_whole_shape(ckpt_name: str, param: nn.Parameter, tensor: torch.Tensor) -> None:
    """A checkpoint tensor that fills a whole parameter must have its shape, or, for a parameter split
    over the tensor-parallel ranks, that shape with one dimension tp_size times larger. The layers'
    loaders slice the tensor with `narrow`, which would silently drop the surplus of a larger one."""
    want, got, tp = tuple(param.shape), tuple(tensor.shape), get_tp_size()
    if got == want:
        return
    if tp > 1 and len(got) == len(want):
        diff = [d for d in range(len(got)) if got[d] != want[d]]
        if len(diff) == 1 and got[diff[0]] == want[diff[0]] * tp:
            return
    per_rank = f" per rank (tensor-parallel size {tp})" if tp > 1 else ""
    raise ValueError(
        f"cannot load checkpoint tensor {ckpt_name!r}: shape mismatch: parameter is {want}{per_rank}, "
        f"checkpoint has {got}"
    )


def _is_quantized(path: str, hf_config: PretrainedConfig | None) -> bool:
    """Whether the checkpoint declares a quantization_config (read from `path/config.json` when
    `hf_config` is not given)."""
    if hf_config is not None:
        return getattr(hf_config, "quantization_config", None) is not None
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("quantization_config") is not None
    except (OSError, ValueError):
        return False


def _check_dtype(ckpt_name: str, file: str, param: nn.Parameter, tensor: torch.Tensor) -> None:
    """An integer or boolean tensor for a floating parameter would be cast silently by `copy_` into
    nonsense weights; only a quantized checkpoint has such tensors, and we cannot dequantize."""
    if param.dtype.is_floating_point and not tensor.dtype.is_floating_point:
        raise ValueError(
            f"checkpoint tensor {ckpt_name!r} in {os.path.basename(file)} has dtype {tensor.dtype}, not a "
            f"floating-point dtype, for a {param.dtype} parameter, and the checkpoint's config.json has no "
            "quantization_config: it would be cast into meaningless weights, so it is refused"
        )


def _check_float8(ckpt_name: str, file: str, param: nn.Parameter, tensor: torch.Tensor) -> None:
    """An FP8 tensor for a parameter the model does not hold in FP8 would be cast without its scale."""
    if tensor.dtype.is_floating_point and tensor.dtype.itemsize == 1 and param.dtype != tensor.dtype:
        raise ValueError(
            f"checkpoint tensor {ckpt_name!r} in {os.path.basename(file)} has dtype {tensor.dtype} for a "
            f"{param.dtype} parameter: an FP8 tensor needs its quantization method (the layer is not "
            "quantized, or the checkpoint's quantization_config does not say so)"
        )


# Per-tensor FP8 KV-cache scales (vLLM's names): `<layer>.self_attn[.k_proj|.v_proj|.attn].k_scale`
# and `.v_scale`.
_KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")


def _load_kv_scale(model: nn.Module, ckpt_name: str, tensor: torch.Tensor) -> None:
    """Set the attention layer's `k_scale` / `v_scale` (the FP8 KV cache holds K / k_scale)."""
    base, _, kind = ckpt_name.rpartition(".")
    for suffix in (".k_proj", ".v_proj", ".attn"):
        base = base.removesuffix(suffix)
    attn = dict(model.named_modules()).get(base + ".attn")
    if attn is None or not hasattr(attn, kind):
        raise ValueError(
            f"checkpoint tensor {ckpt_name!r} is a KV-cache scale but {base!r} has no attention layer"
        )
    if tensor.numel() != 1:
        raise ValueError(
            f"checkpoint tensor {ckpt_name!r}: a KV-cache scale is one number, got {tuple(tensor.shape)}"
        )
    value = float(tensor.float().item())
    if not (value > 0 and value < float("inf")):
        raise ValueError(
            f"checkpoint tensor {ckpt_name!r}: a KV-cache scale must be positive and finite, got {value}"
        )
    setattr(attn, kind, value)


def process_weights_after_loading(model: nn.Module) -> None:
    """Let each layer's quantization method repack, quantize or precompute once weights are in."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def load_model(model: nn.Module, path: str, hf_config: PretrainedConfig | None = None) -> None:
    """Fill every parameter of `model` from the `*.safetensors` files in `path`.

    Raises ValueError naming the first checkpoint tensor the model does not have, a shape that does
    not match, a non-floating tensor for a floating parameter in an unquantized checkpoint, or a
    parameter that no tensor filled. Pickle-based checkpoints are never read. `hf_config` is the
    checkpoint's config (read from `path/config.json` when None).
    """
    files = sorted(glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {path!r}")
    quantized = _is_quantized(path, hf_config)
    params = dict(model.named_parameters())
    tied = getattr(model, "tie_word_embeddings", False)
    # Each fused parameter expects one load per shard id; plain parameters one load.
    expected: dict[str, set] = {name: set() for name in params}
    seen: dict[str, set] = {name: set() for name in params}
    for fused, shard in getattr(model, "packed_modules_mapping", {}).values():
        for name in params:
            if f".{fused}." in name:
                expected[name].add(shard)
    # A parameter may list the shard ids that fill it piece by piece (stacked experts); one load of the
    # whole tensor fills it too.
    for name, param in params.items():
        expected[name].update(getattr(param, "shard_ids", ()))
    for file in files:
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except SafetensorError as e:
            raise ValueError(
                f"{os.path.basename(file)} in {path!r} is not a valid safetensors file: {e}"
            ) from None
        with handle as f:
            for ckpt_name in f.keys():
                if ckpt_name.endswith(_IGNORED_SUFFIXES) or (tied and ckpt_name == "lm_head.weight"):
                    continue
                if ckpt_name.endswith(_KV_SCALE_SUFFIXES):
                    _load_kv_scale(model, ckpt_name, f.get_tensor(ckpt_name))
                    continue
                name, shard_id = _target(model, ckpt_name)
                param = params.get(name)
                if param is None:
                    raise ValueError(
                        f"checkpoint tensor {ckpt_name!r} in {os.path.basename(file)} has no "
                        f"matching model parameter (is this the right architecture?)"
                    )
                key = shard_id if shard_id is not None else "whole"
                if key in seen[name]:
                    raise ValueError(f"checkpoint tensor {ckpt_name!r} appears more than once")
                seen[name].add(key)
                loader = getattr(param, "weight_loader", default_weight_loader)
                tensor = f.get_tensor(ckpt_name)
                if not quantized:
                    _check_dtype(ckpt_name, file, param, tensor)
                _check_float8(ckpt_name, file, param, tensor)
                if shard_id is None:
                    _check_whole_shape(ckpt_name, param, tensor)
                try:
                    if shard_id is None:
                        loader(param, tensor)
                    else:
                        loader(param, tensor, shard_id)
                except (ValueError, RuntimeError) as e:
                    raise ValueError(f"cannot load checkpoint tensor {ckpt_name!r}: {e}") from None
    for name in params:
        want = expected[name] or {"whole"}
        if seen[name] == {"whole"} and hasattr(params[name], "shard_ids"):
            continue
        if seen[name] != want and hasattr(params[name], "shard_ids"):
            lacking = sorted(want - seen[name], key=repr)
            raise ValueError(
                f"model parameter {name!r} was not filled by the checkpoint (missing shard(s) "
                f"{', '.join(map(repr, lacking[:4]))}{', ...' if len(lacking) > 4 else ''}"
                f"{' beside a whole tensor' if 'whole' in seen[name] else ''})"
            )
        if seen[name] != want:
            # Name what the checkpoint lacks: for a fused parameter, the tensors of its missing shards.
            missing = (
                [name]
                if want == {"whole"}
                else [
                    name.replace(f".{fused}.", f".{part}.")
                    for part, (fused, shard) in getattr(model, "packed_modules_mapping", {}).items()
                    if f".{fused}." in name and shard in want - seen[name]
                ]
            )
            raise ValueError(
                f"model parameter {name!r} was not filled by the checkpoint (missing tensor(s): "
                f"{', '.join(map(repr, missing))})"
            )


# Parameters whose name ends so are norm scales: filled with ones, as a freshly built model has them.
_NORM_SUFFIX = "norm.weight"
# Quantization scales of random weights: the init std (the quantized values are standard normal).
_SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")


@torch.no_grad()
def load_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill every parameter with random values on its own device, reading no file: `*norm.weight`
    ones, biases zeros, everything else normal(0, std). The same seed gives the same weights; under
    tensor parallelism each rank fills its own shard (so the shards are not slices of one matrix)."""
    seed %= 1 << 64  # torch.Generator takes a 64-bit seed; any Python int maps onto one
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith(_NORM_SUFFIX):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        elif name.endswith(_SCALE_SUFFIXES):
            param.fill_(std)  # quantized values below are N(0, 1): weights come out N(0, std)
        else:
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            if param.dtype.is_floating_point and param.dtype.itemsize > 1:
                param.normal_(0.0, std, generator=gen)
            else:  # FP8 and integer (packed) tensors: no normal_ of their own
                values = torch.empty(param.shape, device=param.device).normal_(0.0, 1.0, generator=gen)
                param.copy_(values if param.dtype.is_floating_point else values.round().clamp(-7, 7))


def load_weights(model: nn.Module, config: Config) -> None:
    """Fill `model` as `config.load_format` says: random weights for "dummy" (seeded by `config.seed`,
    0 when None; std from the checkpoint's `initializer_range`), else the model directory's safetensors."""
    if config.load_format == "dummy":
        std = getattr(config.hf_config, "initializer_range", None) or 0.02
        load_dummy_weights(model, seed=config.seed if config.seed is not None else 0, std=float(std))
    else:
        load_model(model, config.model, hf_config=config.hf_config)
    process_weights_after_loading(model)
