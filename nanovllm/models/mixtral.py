"""Mixtral (8x7B, 8x22B): Llama's attention, and in every layer a mixture of `num_local_experts` SwiGLU
experts of width `intermediate_size`, top-k routing always renormalised.

Checkpoints name the block `block_sparse_moe` and an expert's projections `w1` (gate), `w3` (up) and
`w2` (down); transformers 5 holds the block as `mlp` with stacked experts. Ours is `mlp`. A sliding
window (`sliding_window`) applies to every layer, as for Mistral: the block manager releases a
sequence's blocks once they fall behind it."""

from torch import nn

from nanovllm.models.llama import LlamaAttention
from nanovllm.models.qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
    Qwen3MoeSparseMoeBlock,
)


class MixtralDecoderLayer(Qwen3MoeDecoderLayer):
    attention_cls = LlamaAttention

    def make_moe(self, config) -> nn.Module:
        return Qwen3MoeSparseMoeBlock(config, config.intermediate_size, renormalize=True)


class MixtralModel(Qwen3MoeModel):
    layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(Qwen3MoeForCausalLM):
    model_cls = MixtralModel
    sliding_window_rule = "all"
    expert_names = ("w1", "w3", "w2")
    moe_prefixes = ("block_sparse_moe", "mlp")

    @classmethod
    def expert_width(cls, config) -> int:
        return config.intermediate_size
