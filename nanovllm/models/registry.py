"""Model classes by the `architectures` name in a checkpoint's config.json."""

import importlib

from torch import nn

# architecture name -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "Qwen3ForCausalLM": ("nanovllm.models.qwen3", "Qwen3ForCausalLM"),
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
