"""The tests' own 4-bit quantizer and packers for AWQ ("gemm") and GPTQ (v1) checkpoints.

Written apart from nanovllm's unpacking (different code, the formats' facts phrased the other way
round), so a bit-order mistake on either side shows up as a mismatch:

- AWQ: qweight int32 [in, out / 8], qzeros int32 [groups, out / 8], scales fp16 [groups, out]; nibble i
  of a word holds column AWQ_ORDER[i] of its group of 8 (AutoAWQ's pack order, vLLM's `awq_pack`);
  W = (q - zero) * scale, zeros stored as they are.
- GPTQ v1: qweight int32 [in / 8, out], nibble i of word r is row 8r + i; qzeros int32
  [groups, out / 8], nibble i of word c is column 8c + i and stores zero - 1; scales fp16
  [groups, out]; g_idx int32 [in]; W = (q - zero) * scale[g_idx].
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
MAXQ = 15


@dataclass
class Quantized:
    """One linear layer in 4 bits: q [in, out] 0..15, zeros [groups, out], scales fp16 [groups, out],
    g_idx [in] (the group of each input feature)."""

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        """W [out, in] float32, straight from the integers."""
        g = self.g_idx.long()
        return ((self.q - self.zeros[g]).float() * self.scales[g].float()).t().contiguous()


def act_order_g_idx(in_features: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """A GPTQ act-order g_idx: groups formed along a random order of the input features."""
    order = torch.randperm(in_features, generator=gen)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // group_size).to(torch.int32)
    return g_idx


def quantize(
    weight: torch.Tensor, group_size: int, sym: bool, g_idx: torch.Tensor | None = None, min_zero: int = 0
) -> Quantized:
    """Round-to-nearest 4-bit quantization of W [out, in] per group of input features. Asymmetric:
    scale = (max - min) / 15, zero = round(-min / scale) kept in [min_zero, 15]; symmetric: zero 8,
    scale = 2 max|w| / 15 (GPTQ's). Scales are rounded to fp16 before q is computed."""
    w = weight.detach().float().t()  # [in, out]
    in_features, out_features = w.shape
    size = in_features if group_size == -1 else group_size
    if g_idx is None:
        g_idx = (torch.arange(in_features) // size).to(torch.int32)
    groups = int(g_idx.max()) + 1
    scales = torch.empty(groups, out_features)
    zeros = torch.empty(groups, out_features, dtype=torch.int64)
    for g in range(groups):
        rows = w[g_idx == g]
        lo = rows.min(0).values.clamp(max=0)
        hi = rows.max(0).values.clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            scale = (2 * hi / MAXQ).clamp(min=1e-4)
            zero = torch.full_like(scale, 8, dtype=torch.int64)
        else:
            scale = ((hi - lo) / MAXQ).clamp(min=1e-4)
            zero = torch.round(-lo / scale).long().clamp(min_zero, MAXQ)
        scales[g] = scale.half().float()
        zeros[g] = zero
    gl = g_idx.long()
    q = torch.clamp(torch.round(w / scales[gl]) + zeros[gl], 0, MAXQ).long()
    return Quantized(q=q, zeros=zeros, scales=scales.half(), g_idx=g_idx)


def _words(nibbles: list[torch.Tensor]) -> torch.Tensor:
    """Eight int64 tensors of values 0..15 -> int32 words, nibble i from nibbles[i]."""
    word = torch.zeros_like(nibbles[0], dtype=torch.int64)
    for i, v in enumerate(nibbles):
        word |= (v.long() & 0xF) << (4 * i)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # uint32 bits as int32


def pack_awq(qz: Quantized) -> dict[str, torch.Tensor]:
    """AutoAWQ "gemm" tensors (contiguous groups only: AWQ has no g_idx)."""

    def along_columns(v: torch.Tensor) -> torch.Tensor:  # [r, out] -> [r, out / 8]
        blocks = v.reshape(v.shape[0], -1, 8)  # [r, out / 8, 8]
        return _words([blocks[:, :, AWQ_ORDER[i]] for i in range(8)])

    return {"qweight": along_columns(qz.q), "qzeros": along_columns(qz.zeros), "scales": qz.scales}


def pack_gptq(qz: Quantized) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors: zeros stored minus one (every zero must be at least 1)."""
    if int(qz.zeros.min()) < 1:
        raise ValueError("GPTQ v1 cannot store a zero point of 0")
    rows = qz.q.reshape(-1, 8, qz.q.shape[1])  # [in / 8, 8, out]
    zeros = (qz.zeros - 1).reshape(qz.zeros.shape[0], -1, 8)  # [groups, out / 8, 8]
    return {
        "qweight": _words([rows[:, i, :] for i in range(8)]),
        "qzeros": _words([zeros[:, :, i] for i in range(8)]),
        "scales": qz.scales,
        "g_idx": qz.g_idx.clone(),
    }


# Linear layers of a decoder layer, grouped by the input they share (GPTQ's act order is a property of
# the input's Hessian, so projections of one input share their g_idx).
_SHARED_INPUT = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "o_in",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "down_in",
}


def quantize_checkpoint(
    model_dir: str,
    method: str,
    group_size: int,
    sym: bool = False,
    desc_act: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """Rewrite a transformers checkpoint in `model_dir` (one model.safetensors) as an AWQ or GPTQ
    checkpoint: every decoder-layer projection packed, everything else cast to `dtype`, config.json
    given its quantization_config. Returns the state dict transformers should load as the reference
    (the projections dequantized, in float32)."""
    path = os.path.join(model_dir, "model.safetensors")
    state = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    shared_g_idx: dict[tuple[str, str], torch.Tensor] = {}
    for name, tensor in state.items():
        proj = next((p for p in _SHARED_INPUT if name.endswith(f".{p}.weight")), None)
        if proj is None:
            out[name] = tensor.to(dtype)
            reference[name] = tensor.to(dtype).float()
            continue
        prefix = name[: -len(".weight")]
        g_idx = None
        if desc_act and group_size != -1:
            key = (prefix.rsplit(".", 2)[0], _SHARED_INPUT[proj])
            if key not in shared_g_idx:
                shared_g_idx[key] = act_order_g_idx(tensor.shape[1], group_size, gen)
            g_idx = shared_g_idx[key]
        qz = quantize(tensor, group_size, sym, g_idx, min_zero=1 if method == "gptq" else 0)
        packed = pack_awq(qz) if method == "awq" else pack_gptq(qz)
        for suffix, t in packed.items():
            out[f"{prefix}.{suffix}"] = t.contiguous()
        reference[name] = qz.dequantized()
    os.remove(path)
    save_file(out, path, metadata={"format": "pt"})
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    if method == "awq":
        config["quantization_config"] = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }
    else:
        config["quantization_config"] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "desc_act": desc_act,
            "sym": sym,
            "damp_percent": 0.01,
            "true_sequential": True,
            "static_groups": False,
            "checkpoint_format": "gptq",
        }
    for key in ("dtype", "torch_dtype"):  # transformers 5 writes "dtype", older ones "torch_dtype"
        if key in config:
            config[key] = str(dtype).removeprefix("torch.")
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return reference
