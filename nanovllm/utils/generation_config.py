"""What a checkpoint's generation_config.json says about sampling: default parameters and EOS ids.

vLLM reads the same file: its sampling fields become the defaults when a caller gives no
SamplingParams (`LLM.get_default_sampling_params()`), and every id in its `eos_token_id` (an int or a
list: Llama-3-Instruct ends turns with <|eot_id|>, which is not the tokenizer's EOS) ends generation.
"""

import json
import os

from nanovllm.sampling_params import SamplingParams

# generation_config.json key -> SamplingParams field, for the keys vLLM takes as defaults.
_SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def read_generation_config(model_dir: str) -> dict:
    """The file's contents, or {} when the checkpoint has none. A malformed file is a ValueError."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def default_sampling_params(model_dir: str) -> SamplingParams:
    """SamplingParams() with the checkpoint's generation_config.json sampling fields applied."""
    data = read_generation_config(model_dir)
    fields = {ours: data[theirs] for theirs, ours in _SAMPLING_KEYS.items() if data.get(theirs) is not None}
    if data.get("do_sample") is False:
        fields["temperature"] = 0.0  # transformers' greedy decoding
    if fields.get("top_k") == 0:
        fields["top_k"] = -1
    try:
        return SamplingParams(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"generation_config.json in {model_dir!r} has an unusable sampling value: {e}"
        ) from None


def _ids(value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def eos_token_ids(tokenizer, model_dir: str, hf_config) -> tuple[int, ...]:
    """Every id that ends generation: the tokenizer's EOS and generation_config.json's (int or list);
    the model config's when neither has one."""
    ids = _ids(getattr(tokenizer, "eos_token_id", None)) + _ids(
        read_generation_config(model_dir).get("eos_token_id")
    )
    if not ids:
        ids = _ids(getattr(hf_config, "eos_token_id", None))
    return tuple(dict.fromkeys(ids))
