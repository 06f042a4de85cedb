"""Qwen3: grouped-query attention with per-head RMSNorm on q and k, rotary positions, SwiGLU MLP.

The classes here are also the shared base of the Llama-like families (llama.py, qwen2.py,
mistral.py), which subclass them to switch the q/k norm off and choose the projection biases."""

import torch
from torch import nn

from nanovllm.kernels.qk_norm_rope import qk_norm_rope
from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary_embedding import (
    check_rope_parameters,
    get_rope,
    rope_max_position,
    rope_parameters,
)
from nanovllm.quantization.base_config import QuantizationConfig
from nanovllm.utils.parallel import get_tp_size


def check_mlp_config(config) -> None:
    """Refuse MLP settings the SwiGLU block does not implement."""
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (supported: 'silu')")
    if getattr(config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported (MLP projections without bias only)")


# How transformers' modeling of a family applies `config.sliding_window` to its layers.
WINDOW_RULES = ("layer_types", "all", "none")
LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_sliding_windows(config, rule: str = "layer_types") -> list[int | None]:
    """The attention window of each layer (None: the whole context), as transformers counts it: a
    query at position i sees keys i - W < j <= i. `rule` is the family's: "layer_types" (Qwen2/Qwen3:
    the `layer_types` list, or for transformers 4 configs the layers from `max_window_layers` on),
    "all" (Mistral, Mixtral, Qwen3-MoE: every layer) or "none" (Llama ignores the field). A window
    of None or 0 (Qwen2-MoE writes 0 when it is off), or `use_sliding_window: false`, is no window."""
    if rule not in WINDOW_RULES:
        raise ValueError(f"unknown sliding-window rule {rule!r} (one of {WINDOW_RULES})")
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if rule == "none" or not window or getattr(config, "use_sliding_window", True) is False:
        return [None] * num_layers
    window = int(window)
    if window < 1:
        raise ValueError(f"sliding_window must be a positive number of tokens, got {window}")
    if rule == "all":
        return [window] * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if len(layer_types) != num_layers or any(t not in LAYER_TYPES for t in layer_types):
            raise ValueError(
                f"layer_types must list one of {LAYER_TYPES} for each of the {num_layers} layers, "
                f"got {layer_types}"
            )
        return [window if t == "sliding_attention" else None for t in layer_types]
    first = getattr(config, "max_window_layers", None)  # transformers 4 Qwen configs
    if first is None:
        return [window] * num_layers
    return [window if i >= first else None for i in range(num_layers)]


class Qwen3Attention(nn.Module):
    """Also the attention of the Llama-like families: `qk_norm` off, and the projections' biases
    (`qkv_bias`, `o_bias`) default to the config's `attention_bias`."""

    def __init__(
        self,
        config,
        qk_norm: bool = True,
        qkv_bias: bool | None = None,
        o_bias: bool | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        tp_size = get_tp_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.total_num_heads
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = self.total_num_kv_heads // tp_size
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            self.total_num_heads,
            self.total_num_kv_heads,
            bias=bias if qkv_bias is None else qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim,
            config.hidden_size,
            bias=bias if o_bias is None else o_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        # The table covers every position the engine may use (rope scaling extends the context).
        self.rotary_emb = get_rope(self.head_dim, rope_max_position(config), rope_parameters(config))
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads)
        self.qk_norm = qk_norm
        # On CUDA one kernel does q/k-norm and rope (a table lookup, power-of-two heads); else the ops.
        head_ok = self.head_dim >= 16 and self.head_dim & (self.head_dim - 1) == 0
        self.fused_qk_norm_rope = head_ok and not self.rotary_emb.length_dependent
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        norm: RMSNorm | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The attention block's output; with `norm` and `residual`, `norm(output, residual)` instead
        (the normalised sum and the new residual: o_proj may fuse them)."""
        qkv = self.qkv_proj(hidden_states)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        store = None
        if qkv.is_cuda and self.fused_qk_norm_rope:
            # One kernel for q/k-norm and rope, in place in qkv (q and k stay views of it), which also
            # writes K and V into the paged cache where the backend allows it.
            qk_weights = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else ()
            store = self.attn.fused_store_target()
            qk_norm_rope(
                qkv, positions, self.rotary_emb.cos_sin_cache, self.num_heads, self.num_kv_heads,
                self.head_dim, *qk_weights, **(store or {}),
            )
        else:
            q, k = self._norm_and_rotate(positions, q, k)
        o = self.attn(q, k, v, kv_stored=store is not None)  # [num_tokens, num_heads * head_dim]
        if norm is not None:
            return self.o_proj.forward_add_rms_norm(o, residual, norm)
        return self.o_proj(o)

    def _norm_and_rotate(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The unfused path (CPU, and rope tables that depend on the sequence length)."""
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        if self.rotary_emb.length_dependent:  # dynamic / longrope: each token's length from the step
            q, k = self.rotary_emb(positions, q, k, self.attn.step_metadata().rope_lengths)
        else:
            q, k = self.rotary_emb(positions, q, k)
        return q, k


class Qwen3MLP(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        check_mlp_config(config)
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(
        self, x: torch.Tensor, norm: RMSNorm | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The MLP's output; with `norm` and `residual`, `norm(output, residual)` (down_proj may fuse it,
        and the activation with it)."""
        gate_up = self.gate_up_proj(x)
        if norm is not None:
            fused = self.down_proj.forward_gated_add_rms_norm(gate_up, residual, norm)
            if fused is not None:
                return fused
            return self.down_proj.forward_add_rms_norm(self.act_fn(gate_up), residual, norm)
        return self.down_proj(self.act_fn(gate_up))


class Qwen3DecoderLayer(nn.Module):
    attention_cls = Qwen3Attention

    def __init__(self, config, quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        self.self_attn = self.attention_cls(config, quant_config=quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = Qwen3MLP(config, quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor, next_norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: this layer's input already normalised by its `input_layernorm` (the model, or
        the layer before, applied it); residual: the stream that norm was taken of. Returns this
        layer's output normalised by `next_norm` (the next layer's input_layernorm, or the model's
        final norm) and the new residual stream. Each norm comes with the projection before it, so
        that o_proj and down_proj can fuse the residual add and the norm into their own last launch."""
        hidden_states, residual = self.self_attn(
            positions, hidden_states, self.post_attention_layernorm, residual
        )
        if isinstance(self.mlp, Qwen3MLP):
            return self.mlp(hidden_states, next_norm, residual)
        return next_norm(self.mlp(hidden_states), residual)  # a mixture-of-experts block


class Qwen3Model(nn.Module):
    layer_cls = Qwen3DecoderLayer

    def __init__(self, config, quant_config: QuantizationConfig | None = None, prefix: str = "model"):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [
                self.layer_cls(config, quant_config=quant_config, prefix=f"{prefix}.layers.{i}")
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        residual = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        hidden_states = self.layers[0].input_layernorm(residual)
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for layer, next_norm in zip(self.layers, next_norms):
            hidden_states, residual = layer(positions, hidden_states, residual, next_norm)
        return hidden_states


class Qwen3ForCausalLM(nn.Module):
    # checkpoint name -> (fused parameter name, shard id passed to its weight_loader)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    model_cls = Qwen3Model

    # How this family's transformers modeling applies `sliding_window` (see layer_sliding_windows).
    sliding_window_rule = "layer_types"

    @classmethod
    def layer_windows(cls, config) -> list[int | None]:
        """Each layer's attention window (None: whole context)."""
        return layer_sliding_windows(config, cls.sliding_window_rule)

    @classmethod
    def check_config(cls, config, max_model_len: int) -> None:
        """Refuse, before anything is built or loaded, a checkpoint this class cannot serve exactly."""
        check_mlp_config(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        check_rope_parameters(rope_parameters(config), head_dim)
        cls.layer_windows(config)  # a malformed layer_types or window raises here

    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        # Quantized linear layers (embeddings, LM head and norms stay unquantized, as in vLLM).
        self.model = self.model_cls(config, quant_config=quant_config, prefix="model")
        for layer, window in zip(self.model.layers, self.layer_windows(config)):
            for module in layer.modules():
                if isinstance(module, Attention):
                    module.sliding_window = window
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden_states)
