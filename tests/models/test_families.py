"""Llama, Qwen2 and Mistral against transformers' own models with the same random weights, and the
registry's refusals (unsupported architecture, rope type, MLP bias). Sliding windows and the long-context
rope scalings are tested in test_long_context.py."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from nanovllm import LLM
from nanovllm.layers.rotary_embedding import RotaryEmbedding, get_rope, rope_inv_freq, rope_parameters
from nanovllm.models.registry import (
    check_model_config,
    get_model_class,
    resolve_architecture,
    supported_architectures,
)
from tests.conftest import (
    TINY,
    assert_greedy_matches_hf,
    load_hf_model,
    random_prompts,
    write_hf_checkpoint,
)
from tests.models.test_qwen3 import our_logits

LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)
LINEAR_ROPE = dict(rope_type="linear", rope_theta=10000.0, factor=2.0)

# name -> (architecture, overrides of conftest.TINY, randomize the projection biases)
FAMILIES = {
    # head_dim 32 != hidden_size / heads (16); Llama 3.1 rope scaling that matters below position 64
    "llama3_tied": ("LlamaForCausalLM", dict(head_dim=32, rope_parameters=LLAMA3_ROPE), False),
    # untied LM head, attention_bias on q/k/v/o, linear rope scaling, no GQA
    "llama_untied": (
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=False, attention_bias=True, num_key_value_heads=4, rope_parameters=LINEAR_ROPE
        ),
        True,
    ),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=False), True),
    "mistral": ("MistralForCausalLM", dict(sliding_window=None), False),
}
PROMPTS = random_prompts(3, [1, 11, 70], seed=3)
GREEDY_TOKENS = 10


def randomize_biases(path: str, seed: int) -> list[str]:
    """transformers initialises biases to zero: give every bias tensor random values (the reference
    model then loads the same file). Returns the names of the bias tensors."""
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    g = torch.Generator().manual_seed(seed)
    names = sorted(k for k in tensors if k.endswith(".bias"))
    for k in names:
        tensors[k] = torch.randn(tensors[k].shape, generator=g) * 0.5
    save_file(tensors, file, metadata=metadata)
    return names


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    """(path, transformers model, bias tensor names) for one entry of FAMILIES."""
    name = request.param
    arch, overrides, biases = FAMILIES[name]
    path = write_hf_checkpoint(tmp_path_factory.mktemp(name), arch=arch, seed=7, **overrides)
    bias_names = randomize_biases(path, seed=7) if biases else []
    return path, load_hf_model(path), bias_names


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_logits_and_greedy_match_transformers(family):
    path, hf, _ = family
    llm = LLM(path, num_kvcache_blocks=16, kvcache_block_size=16)
    try:
        assert type(llm.model_runner.model).__name__ == hf.config.architectures[0]
        for prompt in PROMPTS:
            ours = our_logits(llm, prompt)
            with torch.no_grad():
                ref = hf(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        assert_greedy_matches_hf(llm, hf, PROMPTS, GREEDY_TOKENS)
    finally:
        llm.exit()


@pytest.mark.parametrize("family", ["llama_untied", "qwen2"], indirect=True)
def test_tensor_parallel_greedy_matches_transformers(family):
    """Two ranks on CPU (gloo): biases of column- and row-parallel layers (o_proj's bias added once,
    not per rank) and an untied, vocabulary-parallel LM head."""
    path, hf, _ = family
    llm = LLM(path, num_kvcache_blocks=16, kvcache_block_size=16, tensor_parallel_size=2, tp_timeout_s=30.0)
    try:
        assert_greedy_matches_hf(llm, hf, PROMPTS, GREEDY_TOKENS)
    finally:
        llm.exit()


@pytest.mark.parametrize("family", ["qwen2"], indirect=True)
def test_qwen2_biases_are_loaded(family):
    path, _, bias_names = family
    assert len(bias_names) == 3 * TINY["num_hidden_layers"]  # q, k, v per layer; o_proj has none
    assert all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj") for n in bias_names)
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(n).abs().min() > 0 for n in bias_names)
    llm = LLM(path, num_kvcache_blocks=4, kvcache_block_size=16)
    attn = llm.model_runner.model.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.qkv_proj.bias.abs().min() > 0
    assert attn.o_proj.bias is None and not hasattr(attn, "q_norm")
    llm.exit()


@pytest.mark.parametrize("family", ["llama3_tied", "llama_untied"], indirect=True)
def test_llama_embeddings_tied_or_not(family):
    path, hf, _ = family
    llm = LLM(path, num_kvcache_blocks=4, kvcache_block_size=16)
    model = llm.model_runner.model
    if hf.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        assert model.model.layers[0].self_attn.o_proj.bias.abs().min() > 0  # attention_bias=True
    llm.exit()


@pytest.mark.parametrize("family", ["llama3_tied"], indirect=True)
def test_llama3_rope_scaling_matters(family):
    """Our llama3 frequencies equal transformers', differ from unscaled ones, and with the unscaled
    table the logits would not match: the comparison above does test the scaling."""
    path, hf, _ = family
    head_dim = 32
    ours = rope_inv_freq(head_dim, LLAMA3_ROPE)
    ref, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    plain = rope_inv_freq(head_dim, {"rope_theta": LLAMA3_ROPE["rope_theta"]})
    changed = ~torch.isclose(ours, plain)
    assert changed.sum() >= head_dim // 4 and not changed[0]  # low frequencies stretched, highest kept

    llm = LLM(path, num_kvcache_blocks=4, kvcache_block_size=16)
    model = llm.model_runner.model
    ropes = {id(layer.self_attn.rotary_emb): layer.self_attn.rotary_emb for layer in model.model.layers}
    assert len(ropes) == 1  # one table shared by every layer
    rope = next(iter(ropes.values()))
    prompt = PROMPTS[1]
    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt])).logits[0]
    scaled = rope.cos_sin_cache
    try:
        rope.cos_sin_cache = RotaryEmbedding(
            head_dim, scaled.shape[0], LLAMA3_ROPE["rope_theta"]
        ).cos_sin_cache
        assert (our_logits(llm, prompt) - ref_logits).abs().max() > 1e-2
    finally:
        rope.cos_sin_cache = scaled
    llm.exit()


def test_linear_rope_matches_transformers():
    config = transformers.LlamaConfig(**{**TINY, "rope_parameters": LINEAR_ROPE})
    ref, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["linear"](config, "cpu")
    torch.testing.assert_close(rope_inv_freq(16, rope_parameters(config)), ref, rtol=1e-6, atol=0)


def test_rope_parameters_from_transformers_4_fields():
    """A transformers 4 style config (rope_theta + rope_scaling) gives the same settings."""
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
    old = SimpleNamespace(rope_theta=500000.0, rope_scaling={"type": "llama3", **scaling})
    params = rope_parameters(old)
    assert params["rope_type"] == "llama3" and params["rope_theta"] == 500000.0
    torch.testing.assert_close(
        rope_inv_freq(16, params), rope_inv_freq(16, {**LLAMA3_ROPE, "rope_theta": 500000.0})
    )


def tiny_config(arch: str, **overrides):
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**TINY, **overrides})
    config.architectures = [arch]
    return config


def test_unsupported_rope_type_is_refused_by_name():
    config = SimpleNamespace(
        **TINY,
        hidden_act="silu",
        architectures=["LlamaForCausalLM"],
        rope_parameters=dict(rope_type="proportional", rope_theta=1e4, factor=2.0),
    )
    with pytest.raises(ValueError, match="rope type 'proportional' is not supported.*'llama3'.*'yarn'"):
        check_model_config(config, 256)
    with pytest.raises(ValueError, match="'proportional'"):
        get_rope(16, 64, rope_parameters(config))
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        get_rope(
            16,
            64,
            {
                "rope_type": "llama3",
                "rope_theta": 1e4,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
        )


def test_llama_mlp_bias_is_refused():
    config = tiny_config("LlamaForCausalLM", mlp_bias=True)
    with pytest.raises(ValueError, match="mlp_bias"):
        check_model_config(config, 256)
    with pytest.raises(ValueError, match="mlp_bias"):
        get_model_class("LlamaForCausalLM")(config)


def test_unsupported_architecture_lists_all_supported(tmp_path):
    assert set(supported_architectures()) >= {
        "Qwen3ForCausalLM",
        "Qwen2ForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
    }
    config = SimpleNamespace(architectures=["GPT2LMHeadModel"])
    for refuse in (resolve_architecture, lambda c: check_model_config(c, 256)):
        with pytest.raises(ValueError) as err:
            refuse(config)
        assert "GPT2LMHeadModel" in str(err.value)
        assert all(name in str(err.value) for name in supported_architectures())
    # through the engine: a real checkpoint directory whose config names another architecture
    path = write_hf_checkpoint(tmp_path / "m", arch="LlamaForCausalLM")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError) as err:
        LLM(path)
    assert all(name in str(err.value) for name in supported_architectures())


def test_model_files_are_one_per_family():
    """Each family resolves to its own class through the one registry."""
    for arch in ("Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"):
        assert get_model_class(resolve_architecture(SimpleNamespace(architectures=[arch]))).__name__ == arch


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_fp32_greedy_on_gpu_matches_transformers(family, backend):
    path, hf, _ = family
    llm = LLM(
        path,
        device="cuda",
        dtype="float32",
        attention_backend=backend,
        num_kvcache_blocks=32,
        kvcache_block_size=16,
    )
    try:
        assert_greedy_matches_hf(llm, hf, PROMPTS, GREEDY_TOKENS)
    finally:
        llm.exit()
