"""Mistral: the Llama architecture with an optional sliding attention window."""

from nanovllm.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Served as Llama. Sliding-window attention is not implemented: a checkpoint whose
    `sliding_window` is set and smaller than the engine's max_model_len is refused with a ValueError
    by `check_config` (called through `nanovllm.models.registry.check_model_config`); with
    `sliding_window: null`, or a window at least max_model_len long, every token sees the whole
    context in both implementations, so the outputs are the same."""
