"""Model classes by the `architectures` name in a checkpoint's config.json."""

import importlib

from torch import nn

# architecture name -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "Qwen3ForCausalLM": ("nanovllm.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen2ForCausalLM": ("nanovllm.models.qwen2", "Qwen2ForCausalLM"),
    "LlamaForCausalLM": ("nanovllm.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("nanovllm.models.mistral", "MistralForCausalLM"),
    "Qwen3MoeForCausalLM": ("nanovllm.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("nanovllm.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "MixtralForCausalLM": ("nanovllm.models.mixtral", "MixtralForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_architecture(hf_config) -> str:
    """The first supported architecture named by the config, or a ValueError listing ours."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in _MODELS:
            return name
    raise ValueError(
        f"unsupported model architecture {names or '(none given in config.json)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )


def get_model_class(architecture: str) -> type[nn.Module]:
    module, cls = _MODELS[architecture]
    return getattr(importlib.import_module(module), cls)


def check_model_config(hf_config, max_model_len: int, quant_config=None) -> None:
    """Refuse, before any weight is loaded, a checkpoint we cannot serve exactly with this engine
    max_model_len: an unsupported architecture (the error lists ours), settings the model class
    does not implement (e.g. an unknown rope type, an MLP bias, a malformed `layer_types`), or weight
    quantization for a class that has none (`supports_quantization = False`). Each model class may
    define `check_config(hf_config, max_model_len)`."""
    architecture = resolve_architecture(hf_config)
    cls = get_model_class(architecture)
    if quant_config is not None and not getattr(cls, "supports_quantization", True):
        raise ValueError(
            f"{architecture} cannot be served with quantized weights ({quant_config.get_name()}); "
            "serve its unquantized checkpoint"
        )
    check = getattr(cls, "check_config", None)
    if check is not None:
        check(hf_config, max_model_len)


def kv_release_window(hf_config) -> int | None:
    """When every layer attends to a sliding window: the largest window (KV blocks wholly before it
    are never read again, and the block manager releases them). None when some layer sees the whole
    context (or the family has no windows)."""
    cls = get_model_class(resolve_architecture(hf_config))
    layer_windows = getattr(cls, "layer_windows", None)
    windows = layer_windows(hf_config) if layer_windows is not None else []
    if not windows or any(w is None for w in windows):
        return None
    return max(windows)
