"""Qwen3-MoE, Qwen2-MoE and Mixtral against transformers' own models with the same random weights: logits
and greedy tokens (several prompts in one batch, with preemption and prefix-cache hits), norm_topk_prob on
and off, dense layers by mlp_only_layers and decoder_sparse_step, the shared expert; the stacked tensors
transformers 5 holds load as the per-expert ones do; tensor parallelism (gloo) equals transformers; the
refusals; the MoE-aware bench floor and the dummy-weight 30B-A3B built-in."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import save_file

from nanovllm import LLM, SamplingParams
from nanovllm.layers.fused_moe import FusedMoE
from nanovllm.models.qwen3 import Qwen3MLP
from nanovllm.models.registry import check_model_config
from tests.conftest import TINY, generate_spied, hf_greedy, load_hf_model, random_prompts, write_hf_checkpoint
from tests.models.test_qwen3 import our_logits

MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
# name -> (architecture, overrides of conftest.TINY); TINY has 2 layers, hidden 64, intermediate 128.
FAMILIES = {
    # layer 0 sparse, layer 1 dense (mlp_only_layers); top-k renormalised
    "qwen3_moe_norm": ("Qwen3MoeForCausalLM", dict(MOE, norm_topk_prob=True, mlp_only_layers=[1])),
    # decoder_sparse_step 2: layer 0 dense, layer 1 sparse; top-k weights as the softmax gave them; top-3
    "qwen3_moe_plain": (
        "Qwen3MoeForCausalLM",
        dict(
            MOE, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=2, tie_word_embeddings=False
        ),
    ),
    # shared expert with its sigmoid gate, bias on q/k/v
    "qwen2_moe": ("Qwen2MoeForCausalLM", dict(MOE, shared_expert_intermediate_size=48)),
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)),
}
# Sparse layers of each family (the others are dense MLPs).
SPARSE = {"qwen3_moe_norm": [0], "qwen3_moe_plain": [1], "qwen2_moe": [0, 1], "mixtral": [0, 1]}
GREEDY_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
# Five prompts, two sharing a 32-token prefix (two full blocks of 16): in a cache of 10 blocks for up to
# four sequences at once, decoding preempts some and the second of the pair hits the prefix cache.
_BASE = random_prompts(4, [40, 23, 35, 9], seed=5)
PROMPTS = _BASE + [_BASE[0][:32] + [7, 8, 9]]
ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=10, max_num_seqs=4, max_model_len=256)


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    name = request.param
    arch, overrides = FAMILIES[name]
    path = write_hf_checkpoint(tmp_path_factory.mktemp(name), arch=arch, seed=11, **overrides)
    return name, path, load_hf_model(path)


def assert_greedy_matches(llm: LLM, hf) -> None:
    """PROMPTS in one batch, greedy: the tokens transformers' model gives."""
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, GREEDY_TOKENS) for p in PROMPTS]


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_logits_and_batched_greedy_match_transformers(family, monkeypatch):
    name, path, hf = family
    llm = LLM(path, **ENGINE)
    try:
        model = llm.model_runner.model
        assert type(model).__name__ == hf.config.architectures[0]
        for i, layer in enumerate(model.model.layers):
            kind = type(layer.mlp.experts) if i in SPARSE[name] else type(layer.mlp)
            assert kind is (FusedMoE if i in SPARSE[name] else Qwen3MLP), (i, type(layer.mlp))
        for prompt in PROMPTS[:3]:
            with torch.no_grad():
                ref = hf(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(our_logits(llm, prompt), ref, rtol=1e-4, atol=1e-4)
        tokens, preempted, cached = generate_spied(llm, PROMPTS, GREEDY, monkeypatch)
        assert preempted, "the cache was meant to be too small: no preemption happened"
        assert max(cached) >= 32, "the shared prefix was meant to hit the cache"
        assert tokens == [hf_greedy(hf, p, GREEDY_TOKENS) for p in PROMPTS]
        llm.block_manager.check_integrity()
    finally:
        llm.exit()


def stacked_checkpoint(path: str, hf, out_dir) -> str:
    """The checkpoint as transformers 5 holds it in memory (`experts.gate_up_proj` [E, 2I, H] and
    `experts.down_proj` [E, H, I]; Mixtral's block as `mlp`), written beside the same config."""
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(path):
        if not f.endswith(".safetensors"):
            os.symlink(os.path.join(path, f), os.path.join(out_dir, f))
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    assert any(k.endswith("experts.gate_up_proj") for k in state), sorted(state)[:8]
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return str(out_dir)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"], indirect=True)
def test_transformers_5_stacked_expert_tensors_load(family, tmp_path):
    _, path, hf = family
    stacked = stacked_checkpoint(path, hf, tmp_path / "stacked")
    llm = LLM(stacked, num_kvcache_blocks=8, kvcache_block_size=16)
    ref_llm = LLM(path, num_kvcache_blocks=8, kvcache_block_size=16)
    try:
        ours = dict(llm.model_runner.model.named_parameters())
        ref = dict(ref_llm.model_runner.model.named_parameters())
        assert ours.keys() == ref.keys()
        for k in ours:
            assert torch.equal(ours[k], ref[k]), k
        prompt = PROMPTS[1]
        with torch.no_grad():
            logits = hf(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(our_logits(llm, prompt), logits, rtol=1e-4, atol=1e-4)
    finally:
        llm.exit()
        ref_llm.exit()


@pytest.mark.parametrize("family", ["qwen3_moe_norm"], indirect=True)
def test_missing_or_misshapen_expert_tensor_is_named(family, tmp_path):
    from safetensors import safe_open

    _, path, _ = family
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    broken = tmp_path / "broken"
    os.makedirs(broken)
    for f in os.listdir(path):
        if not f.endswith(".safetensors"):
            os.symlink(os.path.join(path, f), broken / f)
    missing = dict(tensors)
    del missing["model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file(missing, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"experts\.w13_weight.*\(5, 'w3'\)"):
        LLM(str(broken), num_kvcache_blocks=4, kvcache_block_size=16)
    wrong = dict(tensors)
    wrong["model.layers.0.mlp.experts.2.down_proj.weight"] = torch.zeros(64, 31)
    save_file(wrong, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"experts\.2\.down_proj.*\(64, 32\).*\(64, 31\)"):
        LLM(str(broken), num_kvcache_blocks=4, kvcache_block_size=16)
    extra = dict(tensors)
    extra["model.layers.0.mlp.experts.8.gate_proj.weight"] = torch.zeros(32, 64)  # only 8 experts
    save_file(extra, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="expert 8 does not exist"):
        LLM(str(broken), num_kvcache_blocks=4, kvcache_block_size=16)


@pytest.mark.parametrize("family", ["qwen3_moe_norm"], indirect=True)
def test_quantized_weights_are_refused_before_anything_loads(family, monkeypatch):
    from nanovllm.engine import model_runner

    _, path, _ = family

    def never(*args, **kwargs):
        raise AssertionError("the model was built and its weights loaded")

    monkeypatch.setattr(model_runner, "load_weights", never)
    with pytest.raises(ValueError, match="cannot be served with quantized weights \\(fp8\\)"):
        LLM(path, quantization="fp8", num_kvcache_blocks=4, kvcache_block_size=16)


@pytest.mark.parametrize("family", ["qwen2_moe"], indirect=True)
def test_tensor_parallel_greedy_matches_transformers(family):
    """Two ranks on CPU (gloo): every expert's intermediate slice per rank, the shared expert's partial
    sum added before the block's one all-reduce, the dense-free Qwen2-MoE layers."""
    _, path, hf = family
    llm = LLM(path, **ENGINE, tensor_parallel_size=2, tp_timeout_s=30.0)
    try:
        assert_greedy_matches(llm, hf)
    finally:
        llm.exit()


def test_fused_moe_holds_each_ranks_slice():
    """The weight loader's tensor-parallel slicing, checked on one process by pretending to be rank 1
    of 2: gate and up rows of the rank's half of the expert width, down's matching columns."""
    layer = FusedMoE(3, 2, 4, 6, renormalize=True)
    layer.tp_rank, layer.tp_size, layer.local_intermediate = 1, 2, 3
    layer.w13_weight.data = torch.empty(3, 6, 4)
    layer.w2_weight.data = torch.empty(3, 4, 3)
    gate, up, down = torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)
    layer.weight_loader(layer.w13_weight, gate, (1, "w1"))
    layer.weight_loader(layer.w13_weight, up, (1, "w3"))
    layer.weight_loader(layer.w2_weight, down, (1, "w2"))
    assert torch.equal(layer.w13_weight[1], torch.cat([gate[3:], up[3:]]))
    assert torch.equal(layer.w2_weight[1], down[:, 3:])
    stacked = torch.randn(3, 12, 4)  # transformers 5's gate_up_proj: gate rows 0..5, up rows 6..11
    layer.weight_loader(layer.w13_weight, stacked)
    assert torch.equal(layer.w13_weight.data, torch.cat([stacked[:, 3:6], stacked[:, 9:12]], dim=1))


def tiny_config(arch: str, **overrides):
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**TINY, **overrides})
    config.architectures = [arch]
    return config


def test_bad_moe_configs_are_refused_by_name():
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be in 1\.\.num_experts \(4\), got 5"):
        check_model_config(
            tiny_config("Qwen3MoeForCausalLM", **{**MOE, "num_experts": 4, "num_experts_per_tok": 5}), 256
        )
    with pytest.raises(ValueError, match="hidden_act"):
        check_model_config(tiny_config("MixtralForCausalLM", hidden_act="gelu"), 256)
    config = SimpleNamespace(**tiny_config("Qwen2MoeForCausalLM", **MOE).to_dict())
    config.shared_expert_intermediate_size = 0
    with pytest.raises(ValueError, match="shared_expert_intermediate_size"):
        check_model_config(config, 256)
    # Qwen2-MoE writes sliding_window 0 when the window is off: not a window
    check_model_config(tiny_config("Qwen2MoeForCausalLM", **MOE, sliding_window=0), 256)


def test_bench_floor_counts_the_experts_a_batch_activates():
    import bench

    config = tiny_config("Qwen3MoeForCausalLM", **MOE, mlp_only_layers=[1])
    moe = bench.moe_shape(config, elem_size=2)
    assert (moe.num_experts, moe.top_k, moe.sparse_layers) == (8, 2, 1)
    assert moe.expert_bytes == 3 * 64 * 32 * 2 and bench.moe_shape(tiny_config("Qwen3ForCausalLM"), 2) is None
    assert moe.active_experts(1) == pytest.approx(2.0)  # one token: its top-2
    assert moe.active_experts(2) == pytest.approx(8 * (1 - 0.75**2))
    assert moe.active_experts(1000) == pytest.approx(8.0)
    # Two requests: decode steps 1-2 at batch 2, step 3 at batch 1.
    wl = bench.Workload(prompts=[[1] * 5, [2] * 3], max_tokens=[4, 3])
    total = 10_000
    parts = bench.decode_bytes(wl, total, kv_token_bytes=0, moe=moe)
    experts = moe.expert_bytes * 8
    dense = total - experts
    expected = 2 * (dense + experts * (1 - 0.75**2)) + (dense + experts * 2 / 8)
    assert parts["weights"] == int(expected)
    assert bench.decode_bytes(wl, total, 0)["weights"] == 3 * total


def test_qwen3_30b_a3b_builtin_is_written_without_weights(tmp_path, monkeypatch):
    from nanovllm.config import Config
    from nanovllm.utils import builtin_model

    monkeypatch.setenv(builtin_model.CACHE_ENV, str(tmp_path))
    path = builtin_model.get_builtin_model("qwen3-30b-a3b-random")
    assert not any(f.endswith(".safetensors") for f in os.listdir(path))
    assert builtin_model.builtin_load_format(path) == "dummy"
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    config = Config(path, load_format="dummy")
    hf = config.hf_config
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_experts, hf.num_experts_per_tok) == (
        48,
        2048,
        128,
        8,
    )
    assert (hf.moe_intermediate_size, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (
        768,
        32,
        4,
        128,
    )
    with torch.device("meta"):
        params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf).parameters())
    assert 30.0e9 < params < 31.0e9  # about 61 GB in bf16
    assert builtin_model.get_builtin_model("qwen3-30b-a3b-random") == path  # built once


# ---- on the GPU ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_fp32_greedy_on_gpu_matches_transformers(family):
    _, path, hf = family
    llm = LLM(path, device="cuda", dtype="float32", attention_backend="triton", **ENGINE)
    try:
        assert_greedy_matches(llm, hf)
    finally:
        llm.exit()


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["qwen3_moe_norm", "qwen2_moe", "mixtral"], indirect=True)
def test_bf16_cuda_graphs_equal_eager(family):
    _, path, _ = family
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    prompts = random_prompts(12, [5, 17, 40], seed=9)
    results = []
    for eager in (True, False):
        llm = LLM(
            path,
            device="cuda",
            dtype="bfloat16",
            attention_backend="triton",
            enforce_eager=eager,
            **ENGINE,
        )
        try:
            assert (llm.model_runner.graph_runner is None) == eager
            results.append([o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)])
        finally:
            llm.exit()
    assert results[0] == results[1]
