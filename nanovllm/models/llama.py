"""Llama 2 and 3: the Qwen3 decoder without q/k norm; `attention_bias` puts a bias on q, k, v and o.

`head_dim` may differ from hidden_size / num_attention_heads; rope scaling "llama3" (Llama 3.1+) and
"linear" are supported; `mlp_bias=True` is refused. Tied and untied embeddings both load.
"""

from nanovllm.models.qwen3 import Qwen3Attention, Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model


class LlamaAttention(Qwen3Attention):
    def __init__(self, config, **kwargs):  # quant_config, prefix
        super().__init__(config, qk_norm=False, **kwargs)


class LlamaDecoderLayer(Qwen3DecoderLayer):
    attention_cls = LlamaAttention


class LlamaModel(Qwen3Model):
    layer_cls = LlamaDecoderLayer


class LlamaForCausalLM(Qwen3ForCausalLM):
    model_cls = LlamaModel
    sliding_window_rule = "none"  # transformers' Llama has no window, whatever config.json says
