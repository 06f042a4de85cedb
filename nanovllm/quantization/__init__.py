"""Quantization formats by vLLM's `quantization=` name, and the choice of one for a checkpoint.

The semantics are vLLM's: a checkpoint whose config.json has a `quantization_config` is served in the
format its `quant_method` names; `quantization=` may repeat that name (anything else is a ValueError);
`quantization=<name>` with an unquantized checkpoint quantizes at load where the format can
(`QuantizationConfig.online()`), else it is refused.
"""

import importlib
import json
import os
from typing import Any

from nanovllm.quantization.base_config import (
    LinearMethodBase,
    QuantizationConfig,
    QuantizeMethodBase,
    UnquantizedLinearMethod,
)

# quant_method name -> (module, class); modules import on first use.
_METHODS: dict[str, tuple[str, str]] = {
    "awq": ("nanovllm.quantization.awq", "AWQConfig"),
    "fp8": ("nanovllm.quantization.fp8", "Fp8Config"),
    "gptq": ("nanovllm.quantization.gptq", "GPTQConfig"),
}

__all__ = [
    "LinearMethodBase",
    "QuantizationConfig",
    "QuantizeMethodBase",
    "UnquantizedLinearMethod",
    "QUANTIZATION_METHODS",
    "get_quantization_config",
    "get_quantization_config_class",
]

QUANTIZATION_METHODS: tuple[str, ...] = tuple(sorted(_METHODS))


def get_quantization_config_class(name: str) -> type[QuantizationConfig]:
    if not isinstance(name, str) or name.lower() not in _METHODS:
        raise ValueError(
            f"unknown quantization method {name!r}; supported: {', '.join(QUANTIZATION_METHODS)}"
        )
    module, cls = _METHODS[name.lower()]
    return getattr(importlib.import_module(module), cls)


def _checkpoint_quantization_config(hf_config, model_dir: str | None) -> dict[str, Any] | None:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    if "quant_method" not in qc:
        where = f" in {os.path.join(model_dir, 'config.json')}" if model_dir else ""
        raise ValueError(f"the checkpoint's quantization_config{where} has no 'quant_method' field")
    return dict(qc)


def _config_file(cls: type[QuantizationConfig], model_dir: str | None) -> dict[str, Any] | None:
    """The format's own config file in the model directory (e.g. quantize_config.json), if any."""
    for name in cls.get_config_filenames() if model_dir else ():
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    return json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read quantization config {path!r}: {e}") from None
    return None


def get_quantization_config(
    hf_config, quantization: str | None, model_dir: str | None = None
) -> QuantizationConfig | None:
    """The quantization config to build the model with, or None for an unquantized model.

    `hf_config`: the checkpoint's config; `quantization`: the engine's `quantization=` argument (None:
    whatever the checkpoint says); `model_dir`: where to look for a format's own config file."""
    if quantization is not None and not isinstance(quantization, str):
        raise TypeError(f"quantization must be None or a method name, got {type(quantization).__name__}")
    ckpt = _checkpoint_quantization_config(hf_config, model_dir)
    if ckpt is not None:
        method = str(ckpt["quant_method"]).lower()
        if quantization is not None and quantization.lower() != method:
            raise ValueError(
                f"quantization={quantization!r} does not match the checkpoint's quantization_config, "
                f"whose quant_method is {method!r}; pass quantization={method!r} or leave it unset"
            )
        if method not in _METHODS:
            raise ValueError(
                f"the checkpoint is quantized with quant_method {method!r}, which is not supported "
                f"(supported: {', '.join(QUANTIZATION_METHODS)})"
            )
        return get_quantization_config_class(method).from_config(ckpt)
    if quantization is None:
        return None
    cls = get_quantization_config_class(quantization)
    from_file = _config_file(cls, model_dir)
    if from_file is not None:
        return cls.from_config(from_file)
    return cls.online()
