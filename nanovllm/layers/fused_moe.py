"""The mixture-of-experts layer: routing, stacked expert weights, and the experts' SwiGLU MLPs.

Routing (transformers' and vLLM's): softmax over all experts in fp32, the top_k most likely, renormalised
to sum to 1 when `renormalize` (Qwen's `norm_topk_prob`; Mixtral always). Each chosen expert e computes
down_e(silu(gate_e(x)) * up_e(x)), and the token's output is the routing-weighted sum.

Weights are stacked over experts: `w13_weight` [E, 2I, H] (gate rows, then up rows) and `w2_weight`
[E, H, I]. With tensor parallelism every rank holds every expert's slice of the intermediate dimension
(gate/up split by output rows, down by input columns), so the ranks' outputs are partial sums: one
all-reduce per layer (`reduce_results=False` leaves it to the caller, e.g. to add a shared expert first).

On CUDA the experts run in the Triton kernels of `nanovllm.kernels.fused_moe`; elsewhere in
`fused_moe_reference`, a plain PyTorch loop over experts that is also the kernels' test reference.
"""

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanovllm.utils.parallel import all_reduce, divide, get_tp_rank, get_tp_size

# Shard ids of the per-expert checkpoint tensors (vLLM's names): gate, down, up.
GATE, DOWN, UP = "w1", "w2", "w3"


def route(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """(weights fp32 [T, top_k], expert ids int64 [T, top_k]) from router logits [T, E]."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, top_k] each
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe_reference(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
    """The experts in plain PyTorch, one expert at a time (reads which experts got tokens on the host)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    inter = w2.shape[2]
    for e in topk_ids.unique().tolist():
        token, slot = torch.where(topk_ids == e)  # [n] each
        h = F.linear(x[token], w13[e])  # [n, 2I]
        act = F.silu(h[:, :inter]) * h[:, inter:]  # [n, I]
        y = F.linear(act, w2[e])  # [n, H]
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


class FusedMoE(nn.Module):
    """`num_experts` SwiGLU experts of width `intermediate_size` with top-k routing; `forward(x,
    router_logits)` -> [T, hidden_size]."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        reduce_results: bool = True,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..num_experts ({num_experts}), got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.renormalize = renormalize
        self.reduce_results = reduce_results
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.local_intermediate = divide(intermediate_size, self.tp_size, "expert intermediate size")
        i = self.local_intermediate
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * i, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, i), requires_grad=False)
        for param, parts in ((self.w13_weight, (GATE, UP)), (self.w2_weight, (DOWN,))):
            param.weight_loader = self.weight_loader
            # The loads that fill the parameter piece by piece (the loader checks all arrived); one load
            # of the whole stacked tensor (shard id None) fills it too.
            param.shard_ids = frozenset((e, p) for e in range(num_experts) for p in parts)

    # ---- loading ------------------------------------------------------------------------------------------

    def _rank_slice(self, t: Tensor, dim: int) -> Tensor:
        return t.narrow(dim, self.tp_rank * self.local_intermediate, self.local_intermediate)

    def weight_loader(
        self, param: nn.Parameter, loaded: Tensor, shard_id: tuple[int, str] | None = None
    ) -> None:
        """Copy this rank's slice of a checkpoint tensor: one expert's `gate`/`up` [I, H] or `down`
        [H, I] (shard id (expert, "w1"/"w3"/"w2")), or a whole stacked tensor as transformers 5 holds it
        (`experts.gate_up_proj` [E, 2I, H], gate rows first; `experts.down_proj` [E, H, I])."""
        full_i, hidden, i = self.intermediate_size, self.hidden_size, self.local_intermediate
        is_w13 = param is self.w13_weight
        if shard_id is None:
            want = (self.num_experts, 2 * full_i, hidden) if is_w13 else (self.num_experts, hidden, full_i)
            _check_shape(loaded, want)
            if is_w13:
                param.data[:, :i].copy_(self._rank_slice(loaded[:, :full_i], 1))
                param.data[:, i:].copy_(self._rank_slice(loaded[:, full_i:], 1))
            else:
                param.data.copy_(self._rank_slice(loaded, 2))
            return
        expert, part = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} does not exist (the config has {self.num_experts} experts)")
        if part == DOWN:
            _check_shape(loaded, (hidden, full_i))
            param.data[expert].copy_(self._rank_slice(loaded, 1))
        else:
            _check_shape(loaded, (full_i, hidden))
            rows = slice(0, i) if part == GATE else slice(i, 2 * i)
            param.data[expert, rows].copy_(self._rank_slice(loaded, 0))

    # ---- forward ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, router_logits: Tensor) -> Tensor:
        weights, ids = route(router_logits, self.top_k, self.renormalize)  # [T, top_k] each
        if x.is_cuda:
            from nanovllm.kernels.fused_moe import fused_experts

            out = fused_experts(x, self.w13_weight, self.w2_weight, weights, ids)
        else:
            out = fused_moe_reference(x, self.w13_weight, self.w2_weight, weights, ids)
        if self.reduce_results and self.tp_size > 1:
            out = all_reduce(out)
        return out  # [T, H]


def _check_shape(t: Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(
            f"shape mismatch: expected {tuple(want)} (all ranks), checkpoint has {tuple(t.shape)}"
        )


def expert_checkpoint_target(
    name: str, gate: str, up: str, down: str, prefixes: tuple[str, ...] = ("mlp",), module: str = "mlp"
) -> tuple[str, tuple[int, str] | None] | None:
    """Map a checkpoint name of an MoE block's experts or router to (our parameter name, shard id), or
    None when it is not one. Per-expert names `<prefix>.experts.N.<gate|up|down>.weight` (the Hub's; the
    checkpoint's projection names are `gate`, `up`, `down`) fill one expert's slice; transformers 5's
    stacked `<prefix>.experts.gate_up_proj` / `.down_proj` fill a whole parameter. `prefixes` are the
    block's names in checkpoints (Mixtral: `block_sparse_moe`, and `mlp` as transformers 5 holds it);
    `module` is ours."""
    alternatives = "|".join(map(re.escape, prefixes))
    m = re.match(rf"^(.*)\.(?:{alternatives})\.(experts\..*|gate\.weight)$", name)
    if m is None:
        return None
    head, rest = m.group(1), m.group(2)
    base = f"{head}.{module}"
    if rest == "gate.weight":
        return f"{base}.gate.weight", None
    if rest == "experts.gate_up_proj":
        return f"{base}.experts.w13_weight", None
    if rest == "experts.down_proj":
        return f"{base}.experts.w2_weight", None
    parts = {gate: GATE, up: UP, down: DOWN}
    m = re.match(rf"^experts\.(\d+)\.({'|'.join(map(re.escape, parts))})\.weight$", rest)
    if m is None:
        return None
    part = parts[m.group(2)]
    param = "w2_weight" if part == DOWN else "w13_weight"
    return f"{base}.experts.{param}", (int(m.group(1)), part)
