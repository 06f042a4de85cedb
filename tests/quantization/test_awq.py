"""AWQ ("gemm") checkpoints written by the tests' packer, through the real loader and engine, against
transformers holding the dequantized weights; malformed tensors and unsupported configs refused."""

import json
import os

import pytest
from safetensors.torch import load_file, save_file

from nanovllm import LLM
from nanovllm.quantization import get_quantization_config
from nanovllm.quantization.awq import AWQConfig
from tests.quantization.int4_checkpoints import ENGINE, TP, build, check_against_reference, greedy_token_ids


@pytest.mark.parametrize(
    "arch,group_size",
    [("Qwen3ForCausalLM", 32), ("LlamaForCausalLM", 128), ("Qwen3ForCausalLM", -1)],
)
def test_greedy_equals_dequantized_transformers(tmp_path, arch, group_size):
    path, reference = build(tmp_path, "awq", arch, group_size, seed=1)
    llm = LLM(path, **ENGINE)
    try:
        layer = llm.model_runner.model.model.layers[0].mlp.gate_up_proj
        assert type(layer.quant_method).__name__ == "AWQLinearMethod"
        check_against_reference(llm, reference)
    finally:
        llm.exit()


def test_tensor_parallel_equals_single(tmp_path):
    """TP=2 cuts qweight/qzeros at packed words along the output and row-parallel layers at group
    boundaries (group 32: o_proj holds 2 groups per rank); its tokens equal TP=1's."""
    path, reference = build(tmp_path, "awq", "Qwen3ForCausalLM", 32, seed=2)
    want = greedy_token_ids(path)
    assert greedy_token_ids(path, **TP) == want


def test_tensor_parallel_cutting_a_group_is_refused(tmp_path):
    """Group 128 over o_proj's 128 input features: each of 2 ranks would hold half a group."""
    path, _ = build(tmp_path, "awq", "Qwen3ForCausalLM", 128, seed=3)
    with pytest.raises(ValueError, match=r"o_proj.*not a multiple of the AWQ group size 128"):
        LLM(path, **ENGINE, **TP)


def _rewrite(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("suffix", ["qweight", "scales", "qzeros"])
def test_misshaped_tensor_is_refused_by_name(tmp_path, suffix):
    path, _ = build(tmp_path, "awq", "Qwen3ForCausalLM", 32, seed=4)
    name = f"model.layers.1.self_attn.o_proj.{suffix}"

    def cut(tensors):
        tensors[name] = tensors[name][:, :-1].contiguous()

    _rewrite(path, cut)
    with pytest.raises(ValueError, match=rf"{name}.*shape mismatch"):
        LLM(path, **ENGINE)


def _config(**fields):
    base = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    return type("HF", (), {"quantization_config": {**base, **fields}})()


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"bits": 8}, "8-bit weights are not supported"),
        ({"version": "gemv"}, "version 'gemv' is not supported"),
        ({"version": "exllama"}, "version 'exllama' is not supported"),
        ({"zero_point": False}, "without zero points"),
        ({"group_size": 0}, "group_size must be a positive multiple of 8 or -1"),
        ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert must be a list"),
    ],
)
def test_unsupported_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        get_quantization_config(_config(**fields), None)


def test_config_fields_and_skipped_modules(tmp_path):
    """AutoAWQ's field names (w_bit, q_group_size, upper-case version) read like transformers'; a
    module in modules_to_not_convert stays unquantized and loads its float weight."""
    cfg = get_quantization_config(_config(version="GEMM"), None)
    assert isinstance(cfg, AWQConfig) and cfg.group_size == 128
    auto_awq = {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM"}
    assert AWQConfig.from_config(auto_awq).group_size == 64

    path, reference = build(tmp_path, "awq", "LlamaForCausalLM", 32, seed=5)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    for key in [k for k in tensors if ".layers.0.mlp.down_proj." in k]:
        del tensors[key]
    tensors["model.layers.0.mlp.down_proj.weight"] = (
        reference.model.layers[0].mlp.down_proj.weight.detach().half()
    )
    save_file(tensors, file, metadata={"format": "pt"})
    reference.model.layers[0].mlp.down_proj.weight.data = tensors[
        "model.layers.0.mlp.down_proj.weight"
    ].float()
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"]["modules_to_not_convert"] = ["model.layers.0.mlp.down_proj"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    llm = LLM(path, **ENGINE)
    try:
        layers = llm.model_runner.model.model.layers
        assert type(layers[0].mlp.down_proj.quant_method).__name__ == "UnquantizedLinearMethod"
        assert type(layers[1].mlp.down_proj.quant_method).__name__ == "AWQLinearMethod"
        check_against_reference(llm, reference)
    finally:
        llm.exit()
