"""Load safetensors checkpoints into a model through each parameter's `weight_loader`."""

import os
from glob import glob

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from nanovllm.utils.parallel import get_tp_size

# Checkpoint tensors that are recomputed rather than loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"shape mismatch: parameter is {tuple(param.shape)}, checkpoint has {tuple(loaded_weight.shape)}"
        )
    param.data.copy_(loaded_weight)


def _target(model: nn.Module, name: str) -> tuple[str, object]:
    """Map a checkpoint tensor name to (parameter name, shard id or None)."""
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


def load_model(model: nn.Module, path: str) -> None:
    """Fill every parameter of `model` from the `*.safetensors` files in `path`.

    Raises ValueError naming the first checkpoint tensor the model does not have, a shape that does
    not match, or a parameter that no tensor filled. Pickle-based checkpoints are never read.
    """
    files = sorted(glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {path!r}")
    params = dict(model.named_parameters())
    tied = getattr(model, "tie_word_embeddings", False)
    # Each fused parameter expects one load per shard id; plain parameters one load.
    expected: dict[str, set] = {name: set() for name in params}
    seen: dict[str, set] = {name: set() for name in params}
    for fused, shard in getattr(model, "packed_modules_mapping", {}).values():
        for name in params:
            if f".{fused}." in name:
                expected[name].add(shard)
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
