"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (bias on q/k/v unless `qkv_bias` is
false), and in the sparse layers the routed experts plus a shared expert that every token passes
through, scaled by sigmoid(shared_expert_gate(x)).

Under tensor parallelism the routed experts and the shared expert both leave partial sums, added before
the block's one all-reduce."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from nanovllm.models.qwen3 import Qwen3Attention
from nanovllm.models.qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
    Qwen3MoeSparseMoeBlock,
)
from nanovllm.utils.parallel import all_reduce, get_tp_size


class Qwen2MoeAttention(Qwen3Attention):
    def __init__(self, config):
        super().__init__(
            config, qk_norm=False, qkv_bias=bool(getattr(config, "qkv_bias", True)), o_bias=False
        )


class _PartialRowParallelLinear(RowParallelLinear):
    """A row-parallel projection whose partial sums the caller all-reduces (with others)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class Qwen2MoeSharedExpert(nn.Module):
    """The shared expert's SwiGLU MLP (`gate_proj`/`up_proj` fused, `down_proj`), unreduced."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [width] * 2)
        self.down_proj = _PartialRowParallelLinear(width, hidden_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Qwen2MoeSparseMoeBlock(Qwen3MoeSparseMoeBlock):
    def __init__(self, config):
        super().__init__(
            config,
            config.moe_intermediate_size,
            bool(getattr(config, "norm_topk_prob", False)),
            reduce_results=False,
        )
        self.tp_size = get_tp_size()
        self.shared_expert = Qwen2MoeSharedExpert(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.experts(x, self.gate(x))  # [num_tokens, hidden], this rank's part
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return all_reduce(out) if self.tp_size > 1 else out


class Qwen2MoeDecoderLayer(Qwen3MoeDecoderLayer):
    attention_cls = Qwen2MoeAttention

    def make_moe(self, config) -> nn.Module:
        return Qwen2MoeSparseMoeBlock(config)


class Qwen2MoeModel(Qwen3MoeModel):
    layer_cls = Qwen2MoeDecoderLayer


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    """Qwen2-MoE writes `sliding_window: 0` when the window is off; 0 is not a window."""

    model_cls = Qwen2MoeModel
    sliding_window_rule = "layer_types"

    @classmethod
    def check_config(cls, config, max_model_len: int) -> None:
        super().check_config(config, max_model_len)
        width = getattr(config, "shared_expert_intermediate_size", None)
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"shared_expert_intermediate_size must be a positive int, got {width!r}")
