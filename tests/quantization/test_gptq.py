"""GPTQ (v1, and v2 zeros) checkpoints written by the tests' packer, through the real loader and
engine, against transformers holding the dequantized weights: symmetric and asymmetric, act-order on
and off, several group sizes, tensor parallelism; malformed tensors and unsupported configs refused."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM
from nanovllm.quantization import get_quantization_config
from tests.quantization.int4_checkpoints import ENGINE, TP, build, check_against_reference, greedy_token_ids


@pytest.mark.parametrize(
    "arch,group_size,desc_act,sym",
    [
        ("Qwen3ForCausalLM", 32, False, True),
        ("LlamaForCausalLM", 64, True, False),
        ("Qwen3ForCausalLM", 128, True, True),
        ("LlamaForCausalLM", -1, False, False),
    ],
)
def test_greedy_equals_dequantized_transformers(tmp_path, arch, group_size, desc_act, sym):
    path, reference = build(tmp_path, "gptq", arch, group_size, seed=1, desc_act=desc_act, sym=sym)
    llm = LLM(path, **ENGINE)
    try:
        layers = llm.model_runner.model.model.layers
        down = layers[0].mlp.down_proj
        assert type(down.quant_method).__name__ == "GPTQLinearMethod"
        # act-order rows are sorted into contiguous groups at load (down_proj: 256 inputs, 2+ groups)
        assert (getattr(down, "int4_perm", None) is not None) == (desc_act and group_size != -1)
        check_against_reference(llm, reference)
    finally:
        llm.exit()


def test_symmetric_zeros_are_0x77777777(tmp_path):
    path, _ = build(tmp_path, "gptq", "Qwen3ForCausalLM", 32, seed=2, sym=True)
    qzeros = load_file(os.path.join(path, "model.safetensors"))["model.layers.0.self_attn.q_proj.qzeros"]
    assert bool((qzeros == 0x77777777).all())


def test_v2_checkpoint_format(tmp_path):
    """checkpoint_format gptq_v2 stores the zero point itself (v1 stores zero - 1)."""
    path, reference = build(tmp_path, "gptq", "Qwen3ForCausalLM", 64, seed=3, desc_act=True)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    for name in [n for n in tensors if n.endswith(".qzeros")]:
        words = tensors[name].long() & 0xFFFFFFFF
        nibbles = [((words >> (4 * i)) & 0xF) + 1 for i in range(8)]  # v1 stores zero - 1 (zero <= 15)
        assert all(int(n.max()) <= 15 for n in nibbles)
        word = sum(n << (4 * i) for i, n in enumerate(nibbles))
        tensors[name] = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    save_file(tensors, file, metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    llm = LLM(path, **ENGINE)
    try:
        check_against_reference(llm, reference)
    finally:
        llm.exit()


def test_tensor_parallel_act_order_equals_single(tmp_path):
    """TP=2 with act-order: row-parallel shards (o_proj, down_proj) hold parts of many groups, keep the
    whole scales and zeros (vLLM's rule) and read each row's group from g_idx; column-parallel shards
    are sorted into contiguous groups. Tokens equal TP=1's."""
    path, reference = build(tmp_path, "gptq", "LlamaForCausalLM", 32, seed=4, desc_act=True)
    want = greedy_token_ids(path)
    assert greedy_token_ids(path, **TP) == want


def test_row_parallel_act_order_layout():
    """What a rank of a row-parallel act-order layer holds, built directly (the TP test above checks
    the numbers): whole-model scales and zeros, this rank's g_idx, no permutation."""
    from nanovllm.layers.linear import RowParallelLinear
    from nanovllm.quantization.gptq import GPTQConfig
    from nanovllm.utils import parallel

    cfg = GPTQConfig(weight_bits=4, group_size=32, desc_act=True)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(parallel, "get_tp_size", lambda: 2)
        m.setattr(parallel, "get_tp_rank", lambda: 1)
        import nanovllm.layers.linear as linear

        m.setattr(linear, "get_tp_size", lambda: 2)
        m.setattr(linear, "get_tp_rank", lambda: 1)
        layer = RowParallelLinear(128, 16, quant_config=cfg, prefix="o_proj")
    assert tuple(layer.qweight.shape) == (8, 16)  # 64 input rows of this rank, packed
    assert tuple(layer.scales.shape) == (4, 16) and tuple(layer.qzeros.shape) == (4, 2)  # all 4 groups
    g_idx = torch.randperm(128, generator=torch.Generator().manual_seed(0)).int() // 32
    layer.g_idx.weight_loader(layer.g_idx, g_idx)
    assert torch.equal(layer.g_idx.data, g_idx[64:])
    layer.scales.data.fill_(1.0)
    layer.quant_method.process_weights_after_loading(layer)
    assert torch.equal(layer.int4_g_idx, g_idx[64:]) and getattr(layer, "int4_perm", None) is None


def test_fused_parts_with_different_act_orders_are_refused(tmp_path):
    path, _ = build(tmp_path, "gptq", "Qwen3ForCausalLM", 32, seed=5, desc_act=True)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    name = "model.layers.1.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"layers.1.self_attn.[qkv]_proj.g_idx.*qkv_proj have different g_idx"
    ):
        LLM(path, **ENGINE)


@pytest.mark.parametrize("suffix,cut", [("qweight", 0), ("scales", 1), ("g_idx", 0)])
def test_misshaped_tensor_is_refused_by_name(tmp_path, suffix, cut):
    path, _ = build(tmp_path, "gptq", "LlamaForCausalLM", 32, seed=6)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    name = f"model.layers.0.mlp.down_proj.{suffix}"
    tensors[name] = tensors[name].narrow(cut, 0, tensors[name].shape[cut] - 1).contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}.*shape mismatch"):
        LLM(path, **ENGINE)


def _config(**fields):
    base = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    return type("HF", (), {"quantization_config": {**base, **fields}})()


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"bits": 8}, "8-bit weights are not supported"),
        ({"bits": 3}, "3-bit weights are not supported"),
        ({"desc_act": "yes"}, "desc_act must be true or false"),
        ({"group_size": -2}, "group_size must be a positive multiple of 8 or -1"),
        ({"group_size": 100}, "group_size must be a positive multiple of 8 or -1"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
        ({"is_marlin_format": True}, "Marlin layout"),
        ({"lm_head": True}, "quantized lm_head"),
        ({"dynamic": {"+:.*": {"bits": 8}}}, "'dynamic'"),
    ],
)
def test_unsupported_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        get_quantization_config(_config(**fields), None)


def test_quantization_argument_must_match(tmp_path):
    path, _ = build(tmp_path, "gptq", "Qwen3ForCausalLM", 32, seed=7)
    with pytest.raises(ValueError, match="quant_method is 'gptq'"):
        LLM(path, quantization="awq", **ENGINE)
    llm = LLM(path, quantization="gptq", **ENGINE)  # the same name is accepted
    llm.exit()
