"""Mistral: the Llama architecture with an optional sliding attention window."""

from nanovllm.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Served as Llama, with transformers' Mistral window: when `sliding_window` is set, every layer
    attends to the last `sliding_window` tokens (the query's own included); `layer_types` in a Mistral
    config is ignored, as transformers' Mistral model ignores it."""

    sliding_window_rule = "all"
