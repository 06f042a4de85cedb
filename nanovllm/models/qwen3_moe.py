"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, and in the sparse
layers a mixture of SwiGLU experts with top-k routing instead of the dense MLP.

A layer is sparse unless listed in `mlp_only_layers` or off the `decoder_sparse_step` rhythm (layer i is
sparse when (i + 1) % decoder_sparse_step == 0); the others keep a dense MLP of `intermediate_size`.
Routing renormalises the top-k weights when `norm_topk_prob`. The MoE blocks here are also Qwen2-MoE's
and Mixtral's (qwen2_moe.py, mixtral.py)."""

from torch import Tensor, nn

from nanovllm.layers.embed_head import VocabParallelEmbedding
from nanovllm.layers.fused_moe import FusedMoE, expert_checkpoint_target
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import ReplicatedLinear
from nanovllm.models.qwen3 import Qwen3Attention, Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3MLP, Qwen3Model


def num_experts(config) -> int:
    """Hub checkpoints name it `num_experts`; some transformers versions save `num_local_experts`."""
    n = getattr(config, "num_experts", None)
    return int(n if n is not None else getattr(config, "num_local_experts", 0) or 0)


def is_sparse_layer(config, layer_idx: int) -> bool:
    """Whether layer `layer_idx` holds experts (transformers' rule for Qwen2-MoE and Qwen3-MoE)."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    only_mlp = getattr(config, "mlp_only_layers", None) or []
    return layer_idx not in only_mlp and num_experts(config) > 0 and (layer_idx + 1) % step == 0


def check_moe_config(config, expert_width: int) -> None:
    """Refuse MoE settings we would serve wrongly, before anything is built."""
    e, k = num_experts(config), getattr(config, "num_experts_per_tok", None)
    if e < 1:
        raise ValueError(f"an MoE checkpoint needs num_experts >= 1, got {e}")
    if not isinstance(k, int) or not 1 <= k <= e:
        raise ValueError(f"num_experts_per_tok must be in 1..num_experts ({e}), got {k!r}")
    if not isinstance(expert_width, int) or expert_width < 1:
        raise ValueError(f"the expert intermediate size must be a positive int, got {expert_width!r}")


class Qwen3MoeSparseMoeBlock(nn.Module):
    """The router (`gate`, [E, H]) and the experts; output all-reduced under tensor parallelism unless
    `reduce_results=False` (then the caller reduces)."""

    def __init__(self, config, expert_width: int, renormalize: bool, reduce_results: bool = True):
        super().__init__()
        e = num_experts(config)
        self.gate = ReplicatedLinear(config.hidden_size, e, bias=False)
        self.experts = FusedMoE(
            e, config.num_experts_per_tok, config.hidden_size, expert_width, renormalize, reduce_results
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.experts(x, self.gate(x))  # [num_tokens, hidden]


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    """Qwen3's decoder layer (its forward) with an MoE block in the sparse layers."""

    attention_cls = Qwen3Attention

    def __init__(self, config, layer_idx: int):
        nn.Module.__init__(self)
        self.self_attn = self.attention_cls(config)
        self.mlp = self.make_moe(config) if is_sparse_layer(config, layer_idx) else Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def make_moe(self, config) -> nn.Module:
        return Qwen3MoeSparseMoeBlock(
            config, config.moe_intermediate_size, bool(getattr(config, "norm_topk_prob", False))
        )


class Qwen3MoeModel(Qwen3Model):
    """Qwen3's model (its forward); each layer is told its index, which decides sparse or dense."""

    layer_cls = Qwen3MoeDecoderLayer

    def __init__(self, config, quant_config=None, prefix: str = "model"):
        if quant_config is not None:
            raise ValueError("quantized mixture-of-experts checkpoints are not supported")
        nn.Module.__init__(self)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([self.layer_cls(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    model_cls = Qwen3MoeModel
    sliding_window_rule = "all"  # transformers' Qwen3-MoE windows every layer when the window is on
    supports_quantization = False  # the fused experts take unquantized stacked weights only
    # Checkpoint names of one expert's projections (their order: gate, up, down).
    expert_names = ("gate_proj", "up_proj", "down_proj")
    # The MoE block's name in checkpoints, and ours.
    moe_prefixes: tuple[str, ...] = ("mlp",)

    @classmethod
    def expert_width(cls, config) -> int:
        return config.moe_intermediate_size

    @classmethod
    def check_config(cls, config, max_model_len: int) -> None:
        super().check_config(config, max_model_len)
        check_moe_config(config, cls.expert_width(config))

    def map_checkpoint_name(self, name: str) -> tuple[str, object] | None:
        """The loader's hook: experts' and router tensors to our stacked parameters (see
        `expert_checkpoint_target`); None sends other names through `packed_modules_mapping`."""
        gate, up, down = self.expert_names
        return expert_checkpoint_target(name, gate, up, down, self.moe_prefixes)
