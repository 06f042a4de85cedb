"""Qwen2 and Qwen2.5: the Llama decoder with a bias on the q, k and v projections (none on o)."""

from nanovllm.models.qwen3 import Qwen3Attention, Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model


class Qwen2Attention(Qwen3Attention):
    def __init__(self, config, **kwargs):  # quant_config, prefix
        super().__init__(config, qk_norm=False, qkv_bias=True, o_bias=False, **kwargs)


class Qwen2DecoderLayer(Qwen3DecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2Model(Qwen3Model):
    layer_cls = Qwen2DecoderLayer


class Qwen2ForCausalLM(Qwen3ForCausalLM):
    """Sliding windows as transformers' Qwen2: `layer_types` (from `use_sliding_window` and
    `max_window_layers`) says which layers attend to the last `sliding_window` tokens only."""

    model_cls = Qwen2Model
