"""FP8: checkpoints in Qwen's block format (written by the test's own packer), online FP8 weights and
the FP8 KV cache, through the real loader and engine, against transformers with the dequantized
weights (greedy tokens equal, logits close) or the unquantized engine (within tolerance)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.quantization import get_quantization_config
from nanovllm.quantization.fp8 import FP8_MAX, Fp8Config, dequantize_block
from tests.conftest import hf_greedy, load_hf_model, random_prompts, write_hf_checkpoint

WEIGHTS = "model.safetensors"
# Linear layers the format quantizes (embeddings, norms and the LM head stay as they are).
LINEAR_SUFFIXES = tuple(
    f".{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
)
# hidden 160 = one whole block and a partial one of 32; q/k/v parts of 256 and the MLP's 384 and 256
# are whole blocks, so tensor parallelism over 2 ranks splits them on block boundaries (128 each).
FP8_SHAPES = dict(
    hidden_size=160,
    intermediate_size=256,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=128,
    vocab_size=400,
)
ENGINE = dict(max_model_len=256, max_num_batched_tokens=512, max_num_seqs=8, num_kvcache_blocks=32)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def quantize_block(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype):
    """The format's quantizer: one scale per block (its amax / 448), stored in `scale_dtype`."""
    n, k = w.shape
    bn, bk = block
    rows, cols = -(-n // bn), -(-k // bk)
    padded = torch.zeros(rows * bn, cols * bk)
    padded[:n, :k] = w.float()
    blocks = padded.view(rows, bn, cols, bk)  # [row block, row, column block, column]
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12).to(scale_dtype)  # [rows, cols]
    full = scale.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    q = (w.float() / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def pack_fp8_checkpoint(
    src: str, dst: str, block=(128, 128), scale_dtype=torch.float32, config_extra=None
) -> str:
    """Copy the checkpoint in `src` to `dst` in the FP8 block format."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name != WEIGHTS:
            with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
                g.write(f.read())
    out = {}
    for name, t in load_file(os.path.join(src, WEIGHTS)).items():
        if name.endswith(LINEAR_SUFFIXES):
            out[name], out[name + "_scale_inv"] = quantize_block(t, block, scale_dtype)
        else:
            out[name] = t.to(torch.bfloat16)
    save_file(out, os.path.join(dst, WEIGHTS))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        **(config_extra or {}),
    }
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def dequantized_reference(fp8_dir: str, src_dir: str, block=(128, 128)):
    """transformers' model of `src_dir` with every weight as the FP8 checkpoint stands for it."""
    model = load_hf_model(src_dir)
    tensors = load_file(os.path.join(fp8_dir, WEIGHTS))
    state = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if name + "_scale_inv" in tensors:
            state[name] = dequantize_block(t, tensors[name + "_scale_inv"], list(block), torch.float32)
        else:
            state[name] = t.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> str:
    return write_hf_checkpoint(tmp_path_factory.mktemp("fp8_src"), seed=3, **FP8_SHAPES)


@pytest.fixture(scope="module")
def fp8_dir(bf16_dir, tmp_path_factory) -> str:
    return pack_fp8_checkpoint(bf16_dir, str(tmp_path_factory.mktemp("fp8_block")))


@pytest.fixture(scope="module")
def fp8_reference(fp8_dir, bf16_dir):
    return dequantized_reference(fp8_dir, bf16_dir)


PROMPTS = random_prompts(3, [5, 17, 40], vocab=400, seed=7)


def test_block_checkpoint_greedy_equals_dequantized_transformers(fp8_dir, fp8_reference):
    llm = LLM(fp8_dir, **ENGINE)
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        for prompt, out in zip(PROMPTS, outs):
            assert out["token_ids"] == hf_greedy(fp8_reference, prompt, GREEDY.max_tokens)
        # Logits close: the prompt log-probabilities against transformers' log-softmax.
        prompt = PROMPTS[2]
        lp = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        ours = torch.tensor([next(iter(d.values())).logprob for d in lp[0].prompt_logprobs[1:]])
        with torch.no_grad():
            logits = fp8_reference(torch.tensor([prompt])).logits[0].float()
        ref = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-3)
    finally:
        llm.exit()


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_scales_stored_in_16_bits(bf16_dir, tmp_path, scale_dtype):
    fp8 = pack_fp8_checkpoint(bf16_dir, str(tmp_path / "ckpt"), scale_dtype=scale_dtype)
    ref = dequantized_reference(fp8, bf16_dir)
    llm = LLM(fp8, **ENGINE)
    try:
        out = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]
        assert out["token_ids"] == hf_greedy(ref, PROMPTS[0], GREEDY.max_tokens)
    finally:
        llm.exit()


def test_smaller_block_and_ignored_layers(bf16_dir, tmp_path):
    """A 64 x 32 block (several blocks per tensor, a partial one along hidden 160 -> 5 x 32 whole) and a
    layer the config leaves unquantized (stored in bf16, loaded as such)."""
    block = (64, 32)
    ignored = "model.layers.1.mlp.down_proj"
    fp8 = pack_fp8_checkpoint(
        bf16_dir, str(tmp_path / "ckpt"), block=block, config_extra={"ignored_layers": [ignored]}
    )
    tensors = load_file(os.path.join(fp8, WEIGHTS))
    src = load_file(os.path.join(bf16_dir, WEIGHTS))
    del tensors[ignored + ".weight_scale_inv"]
    tensors[ignored + ".weight"] = src[ignored + ".weight"].to(torch.bfloat16)
    save_file(tensors, os.path.join(fp8, WEIGHTS))
    ref = dequantized_reference(fp8, bf16_dir, block=block)
    llm = LLM(fp8, **ENGINE)
    try:
        layer = llm.model_runner.model.model.layers[1].mlp.down_proj
        assert layer.weight.dtype == torch.float32 and not hasattr(layer, "weight_scale_inv")
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        for prompt, out in zip(PROMPTS, outs):
            assert out["token_ids"] == hf_greedy(ref, prompt, GREEDY.max_tokens)
    finally:
        llm.exit()


def test_tensor_parallel_equals_single_rank(fp8_dir, fp8_reference):
    llm = LLM(fp8_dir, **ENGINE, tensor_parallel_size=2, tp_timeout_s=30.0, tp_shm_bytes=1 << 16)
    try:
        shapes = llm.model_runner.param_shapes()
        # rank 0's halves: q/k/v 128 rows each, gate/up 128 each; scales one 128-row block per part
        assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (384, 160)
        assert shapes["model.layers.0.self_attn.qkv_proj.weight_scale_inv"] == (3, 2)
        assert shapes["model.layers.0.mlp.down_proj.weight_scale_inv"] == (2, 1)
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        for prompt, out in zip(PROMPTS, outs):
            assert out["token_ids"] == hf_greedy(fp8_reference, prompt, GREEDY.max_tokens)
    finally:
        llm.exit()


def test_tensor_parallel_shard_cutting_a_block_is_refused(tmp_path):
    src = write_hf_checkpoint(tmp_path / "src", seed=4, **{**FP8_SHAPES, "intermediate_size": 384})
    fp8 = pack_fp8_checkpoint(src, str(tmp_path / "fp8"))
    with pytest.raises(ValueError, match=r"gate_up_proj.*\(192\).*FP8 weight block \(128\)"):
        LLM(fp8, **ENGINE, tensor_parallel_size=2, tp_timeout_s=30.0, tp_shm_bytes=1 << 16)
    # one rank serves it: the MLP's 384 rows are three whole blocks
    llm = LLM(fp8, **ENGINE)
    llm.exit()


def test_fused_part_off_block_boundary_is_refused(tmp_path):
    # k and v of 64 rows: the fused qkv's v part would start inside a 128-row block
    shapes = {**FP8_SHAPES, "head_dim": 64, "num_key_value_heads": 1}
    src = write_hf_checkpoint(tmp_path / "src", seed=5, **shapes)
    fp8 = pack_fp8_checkpoint(src, str(tmp_path / "fp8"))
    with pytest.raises(ValueError, match=r"qkv_proj: output features of a fused part \(64\)"):
        LLM(fp8, **ENGINE)


@pytest.mark.parametrize("case", ["missing_scale", "scale_shape", "weight_dtype"])
def test_bad_tensors_are_named(fp8_dir, tmp_path, case):
    bad = pack_fp8_checkpoint(fp8_dir.replace("fp8_block", "fp8_src"), str(tmp_path / "ckpt"))
    tensors = load_file(os.path.join(bad, WEIGHTS))
    name = "model.layers.1.self_attn.k_proj.weight"
    if case == "missing_scale":
        del tensors[name + "_scale_inv"]
        match = r"weight_scale_inv.*not filled.*k_proj\.weight_scale_inv"
    elif case == "scale_shape":
        tensors[name + "_scale_inv"] = torch.ones(2, 3)
        match = r"k_proj\.weight_scale_inv.*shape mismatch.*takes \(2, 2\).*has \(2, 3\)"
    else:
        tensors[name] = tensors[name].float()
        match = r"k_proj\.weight.*dtype mismatch.*float8_e4m3fn.*float32"
    save_file(tensors, os.path.join(bad, WEIGHTS))
    with pytest.raises(ValueError, match=match):
        LLM(bad, **ENGINE)


def test_fp8_tensor_in_an_unquantized_checkpoint_is_refused(bf16_dir, tmp_path):
    bad = pack_fp8_checkpoint(bf16_dir, str(tmp_path / "ckpt"))
    with open(os.path.join(bad, "config.json")) as f:
        config = json.load(f)
    del config["quantization_config"]
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(
        ValueError, match=r"'model\.layers\.\d\.\w+\.\w+_proj\.weight'.*float8_e4m3fn.*quantization method"
    ):
        LLM(bad, **ENGINE)


class _Cfg:
    def __init__(self, qc=None):
        if qc is not None:
            self.quantization_config = qc


BLOCK_QC = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


@pytest.mark.parametrize(
    "qc, arg, match",
    [
        (BLOCK_QC, "int8x", r"quantization='int8x' does not match.*'fp8'"),
        (None, "int8x", r"unknown quantization method 'int8x'"),
        ({"quant_method": "bitnet"}, None, r"quant_method 'bitnet', which is not supported"),
        ({"fmt": "e4m3"}, None, r"no 'quant_method'"),
        ({**BLOCK_QC, "fmt": "e5m2"}, None, r"fmt 'e5m2'"),
        ({**BLOCK_QC, "weight_block_size": [128]}, None, r"weight_block_size must be two positive ints"),
        ({**BLOCK_QC, "weight_block_size": [0, 128]}, None, r"weight_block_size must be two positive ints"),
        ({**BLOCK_QC, "activation_scheme": "static"}, None, r"only activation_scheme 'dynamic'"),
        ({**BLOCK_QC, "activation_scheme": "sometimes"}, None, r"activation_scheme must be one of"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, None, r"per-tensor weight scales"),
        ({**BLOCK_QC, "ignored_layers": "lm_head"}, None, r"ignored_layers must be a list"),
    ],
)
def test_bad_quantization_configs(qc, arg, match):
    with pytest.raises(ValueError, match=match):
        get_quantization_config(_Cfg(qc), arg)


def test_quantization_config_resolution():
    assert get_quantization_config(_Cfg(), None) is None
    online = get_quantization_config(_Cfg(), "fp8")
    assert isinstance(online, Fp8Config) and not online.is_checkpoint_fp8_serialized
    block = get_quantization_config(_Cfg(BLOCK_QC), "FP8")  # the checkpoint's own name, any case
    assert block.is_checkpoint_fp8_serialized and block.weight_block_size == [128, 128]
    with pytest.raises(TypeError, match="quantization must be None or a method name"):
        get_quantization_config(_Cfg(), 8)


def test_engine_arguments_are_checked(fp8_dir):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \('auto', 'fp8', 'fp8_e4m3'\)"):
        LLM(fp8_dir, **ENGINE, kv_cache_dtype="fp8_e5m2")
    with pytest.raises(ValueError, match="does not match"):
        LLM(fp8_dir, **ENGINE, quantization="int8x")
    llm = LLM(fp8_dir, **ENGINE, load_format="dummy")  # random FP8 weights and scales: runs
    try:
        assert len(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]["token_ids"]) == GREEDY.max_tokens
    finally:
        llm.exit()


def per_channel_dequantized(w: torch.Tensor) -> torch.Tensor:
    """The test's own per-output-channel e4m3 quantizer (amax / 448 per row), dequantized."""
    scale = w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def prompt_logprobs(llm, prompt: list[int]) -> torch.Tensor:
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return torch.tensor([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]])


def prompt_top1(llm, prompt: list[int]) -> list[int]:
    """The most likely next token at each prompt position (teacher-forced greedy)."""
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    return [next(t for t, lp in d.items() if lp.rank == 1) for d in out.prompt_logprobs[1:]]


def test_online_fp8_equals_per_channel_dequantized_transformers(bf16_dir):
    ref = load_hf_model(bf16_dir)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(LINEAR_SUFFIXES):
                p.copy_(per_channel_dequantized(p))
    llm = LLM(bf16_dir, **ENGINE, quantization="fp8")
    try:
        layer = llm.model_runner.model.model.layers[0].self_attn.qkv_proj
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (768,)
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        for prompt, out in zip(PROMPTS, outs):
            assert out["token_ids"] == hf_greedy(ref, prompt, GREEDY.max_tokens)
    finally:
        llm.exit()


def test_online_fp8_close_to_unquantized(bf16_dir):
    """FP8 weights move each weight by up to 1/16 of its row's scale. On this peaky tiny model a random
    prompt's tokens sit deep in the tail (log-probabilities near -20), where FP8 moves them by about 3%
    (bound: 8% on average); the greedy first tokens mostly agree."""
    prompts = random_prompts(4, [12, 30], vocab=400, seed=11)
    results = {}
    for quantization in (None, "fp8"):
        llm = LLM(bf16_dir, **ENGINE, quantization=quantization)
        try:
            tokens = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
            results[quantization] = tokens, prompt_logprobs(llm, prompts[1])
        finally:
            llm.exit()
    (base_tokens, base_lp), (fp8_tokens, fp8_lp) = results[None], results["fp8"]
    rel = ((fp8_lp - base_lp).abs().mean() / base_lp.abs().mean()).item()
    assert rel < 0.08, rel
    first = [a[0] == b[0] for a, b in zip(base_tokens, fp8_tokens)]
    assert sum(first) >= 3, (base_tokens, fp8_tokens)


# ---- FP8 KV cache ---------------------------------------------------------------------------------


def test_fp8_kv_cache_close_to_full_precision_and_four_times_the_blocks(bf16_dir):
    """The torch backend on CPU stores e4m3 K/V (scale 1.0) and attends over them dequantized. Against
    the fp32 cache: 4x the blocks for one byte budget, prompt log-probabilities within 5% on average
    (they sit near -20 on this peaky model), most top-1 tokens equal."""
    prompts = random_prompts(4, [12, 30], vocab=400, seed=13)
    budget = dict(max_model_len=256, max_num_batched_tokens=512, max_num_seqs=8, cpu_kvcache_bytes=1 << 20)
    results = {}
    for kv in ("auto", "fp8"):
        llm = LLM(bf16_dir, **budget, kv_cache_dtype=kv, kvcache_block_size=16)
        try:
            runner = llm.model_runner
            assert runner.kv_cache.dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.float32)
            blocks = runner.config.num_kvcache_blocks
            tokens = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
            top1 = [t for p in prompts for t in prompt_top1(llm, p)]
            results[kv] = blocks, tokens, prompt_logprobs(llm, prompts[1]), top1
        finally:
            llm.exit()
    (b_full, t_full, lp_full, top_full), (b_fp8, t_fp8, lp_fp8, top_fp8) = results["auto"], results["fp8"]
    assert b_fp8 == 4 * b_full, (b_fp8, b_full)
    rel = ((lp_fp8 - lp_full).abs().mean() / lp_full.abs().mean()).item()
    assert rel < 0.05, rel
    # Teacher-forced top-1 over 84 positions (measured 0.86: e4m3 keeps 3 mantissa bits); free-running
    # greedy drifts once a token flips on this chaotic random model, so only half of it must agree.
    top1_agree = sum(a == b for a, b in zip(top_full, top_fp8)) / len(top_full)
    assert top1_agree >= 0.75, top1_agree
    agree = sum(a == b for x, y in zip(t_full, t_fp8) for a, b in zip(x, y))
    assert agree >= 0.5 * sum(len(x) for x in t_full), (t_full, t_fp8)


def test_fp8_kv_cache_same_with_and_without_a_cached_prefix(bf16_dir):
    """Prefill reads the quantized cache back even without a cached prefix, so a prompt whose prefix
    blocks are hits gives the same tokens as one computed from scratch."""
    base = random_prompts(1, [40], vocab=400, seed=17)[0]
    prompts = [base + [5, 6, 7], base + [9, 10]]
    cold = []
    for p in prompts:  # each in a fresh engine: no prefix hit
        llm = LLM(bf16_dir, **ENGINE, kv_cache_dtype="fp8", kvcache_block_size=16)
        try:
            cold.append(llm.generate([p], GREEDY, use_tqdm=False)[0]["token_ids"])
        finally:
            llm.exit()
    llm = LLM(bf16_dir, **ENGINE, kv_cache_dtype="fp8", kvcache_block_size=16)
    try:
        warm = [llm.generate([p], GREEDY, use_tqdm=False)[0]["token_ids"] for p in prompts]  # 2nd: hits
    finally:
        llm.exit()
    assert warm == cold


def test_fp8_kv_cache_with_fp8_weights_and_tensor_parallel(fp8_dir, fp8_reference):
    outs = {}
    for tp in (1, 2):
        llm = LLM(
            fp8_dir,
            **ENGINE,
            kv_cache_dtype="fp8_e4m3",
            tensor_parallel_size=tp,
            tp_timeout_s=30.0,
            tp_shm_bytes=1 << 16,
        )
        try:
            outs[tp] = [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        finally:
            llm.exit()
    assert outs[1] == outs[2]
    ref = [hf_greedy(fp8_reference, p, GREEDY.max_tokens) for p in PROMPTS]
    agree = sum(a == b for x, y in zip(ref, outs[1]) for a, b in zip(x, y))
    assert agree >= 0.6 * sum(len(x) for x in ref), (ref, outs[1])


def test_kv_scales_from_the_checkpoint(bf16_dir, tmp_path):
    """`self_attn.k_scale` / `self_attn.v_proj.v_scale` tensors set the layers' FP8 cache scales (vLLM's
    names); the cache then holds K / k_scale, and the output stays close to the scale-1.0 run."""
    ckpt = pack_fp8_checkpoint(bf16_dir, str(tmp_path / "ckpt"))
    tensors = load_file(os.path.join(ckpt, WEIGHTS))
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    tensors["model.layers.0.self_attn.v_proj.v_scale"] = torch.tensor([0.25])
    save_file(tensors, os.path.join(ckpt, WEIGHTS))
    llm = LLM(ckpt, **ENGINE, kv_cache_dtype="fp8", kvcache_block_size=16)
    try:
        layers = llm.model_runner.model.model.layers
        assert (layers[0].self_attn.attn.k_scale, layers[0].self_attn.attn.v_scale) == (0.5, 0.25)
        assert (layers[1].self_attn.attn.k_scale, layers[1].self_attn.attn.v_scale) == (1.0, 1.0)
        prompt = PROMPTS[2]
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        top1 = prompt_top1(llm, prompt)
    finally:
        llm.exit()
    ref = LLM(ckpt, **ENGINE, kvcache_block_size=16)  # a full-precision cache: the scales are unused
    try:
        ref_top1 = prompt_top1(ref, prompt)
    finally:
        ref.exit()
    assert out[0]["token_ids"]
    assert sum(a == b for a, b in zip(top1, ref_top1)) >= 0.75 * len(top1)
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(-1.0)
    save_file(tensors, os.path.join(ckpt, WEIGHTS))
    with pytest.raises(ValueError, match=r"self_attn\.k_scale.*positive and finite"):
        LLM(ckpt, **ENGINE, kv_cache_dtype="fp8")


# ---- on the GPU: W8A8 kernels in the engine, CUDA graphs, the FP8 cache in the Triton kernels -----------

GPU = dict(ENGINE, dtype="bfloat16", attention_backend="triton")


def _top1_agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


@pytest.mark.cuda
@pytest.mark.parametrize("block", [(128, 128), (16, 16), (32, 16)])
def test_gpu_block_checkpoint_close_to_dequantized_reference(
    bf16_dir, fp8_dir, fp8_reference, tmp_path, block
):
    """W8A8 on the GPU quantizes activations too (per token and block_k group, 3 mantissa bits) and
    runs in bf16: not bit-equal to the dequantized fp32 reference. Blocks narrower than the FP8 dot's
    K minimum (16 < 32) take the dequantizing kernel.

    The bound, measured on the CPU with transformers and this model (137 teacher-forced positions of
    prompt seeds 19, 1-4): the dequantized model with its linear inputs quantized per token and
    128-group agrees with the reference on 0.84-0.87 of positions in fp32 and 0.82-0.91 in bf16
    (0.83-0.88 for 16-wide groups), bf16 without activation quantization on 0.97-0.99; the GPU gave
    0.883 at [128, 128]. This chaotic tiny model turns one flipped e4m3 rounding into a different
    argmax, so ~0.85 is what FP8 activations cost here, not a kernel error. Scales taken from other
    blocks (flipped) give 0.29-0.37. The bound 0.7 sits between the two."""
    if block == (128, 128):
        ckpt, reference = fp8_dir, fp8_reference
    else:
        ckpt = pack_fp8_checkpoint(bf16_dir, str(tmp_path / "ckpt"), block=block)
        reference = dequantized_reference(ckpt, bf16_dir, block=block)
    prompts = random_prompts(3, [40, 60], vocab=400, seed=19)
    llm = LLM(ckpt, **GPU)
    try:
        ours = [t for p in prompts for t in prompt_top1(llm, p)]
    finally:
        llm.exit()
    ref = []
    with torch.no_grad():
        for p in prompts:
            ref += reference(torch.tensor([p])).logits[0, :-1].argmax(-1).tolist()
    assert _top1_agreement(ref, ours) >= 0.7


@pytest.mark.cuda
@pytest.mark.parametrize("options", [dict(quantization="fp8"), dict(kv_cache_dtype="fp8")])
def test_gpu_fp8_close_to_bf16(bf16_dir, options):
    prompts = random_prompts(3, [40, 60], vocab=400, seed=23)
    tops = {}
    for tag, extra in (("bf16", {}), ("fp8", options)):
        llm = LLM(bf16_dir, **GPU, **extra)
        try:
            tops[tag] = [t for p in prompts for t in prompt_top1(llm, p)]
            # decode through the CUDA graphs: runs and returns every token
            out = llm.generate(prompts, GREEDY, use_tqdm=False)
            assert all(len(o["token_ids"]) == GREEDY.max_tokens for o in out)
        finally:
            llm.exit()
    assert _top1_agreement(tops["bf16"], tops["fp8"]) >= 0.6


@pytest.mark.cuda
def test_gpu_fp8_kv_cache_doubles_the_blocks(bf16_dir):
    blocks = {}
    for kv in ("auto", "fp8"):
        llm = LLM(
            bf16_dir, **{**GPU, "num_kvcache_blocks": -1, "gpu_memory_utilization": 0.5}, kv_cache_dtype=kv
        )
        try:
            blocks[kv] = llm.model_runner.config.num_kvcache_blocks
        finally:
            llm.exit()
    assert 1.9 <= blocks["fp8"] / blocks["auto"] <= 2.1, blocks


@pytest.mark.cuda
def test_gpu_flash_attn_refuses_fp8_kv_cache(bf16_dir):
    pytest.importorskip("flash_attn", reason="flash-attn is optional; its refusal is tested where it imports")
    kwargs = {**GPU, "attention_backend": "flash-attn", "kvcache_block_size": 256}
    with pytest.raises(ValueError, match=r"flash-attn' cannot read a torch.float8_e4m3fn KV cache"):
        LLM(bf16_dir, **kwargs, kv_cache_dtype="fp8")
    llm = LLM(bf16_dir, **{**kwargs, "attention_backend": "auto"}, kv_cache_dtype="fp8")
    try:
        assert llm.model_runner.backend.name == "triton"
    finally:
        llm.exit()


@pytest.mark.cuda
def test_gpu_qwen3_0_6b_shapes_fp8_logits_close_to_bf16():
    """Qwen3-0.6B shapes (random weights): FP8 weights (block format via online per-channel here) keep
    the logits close to bf16 over a few prompts (KL bound; bench_fp8.py accuracy measures more)."""
    from nanovllm.utils.builtin_model import get_builtin_model

    path = get_builtin_model("qwen3-0.6b-random")
    prompts = random_prompts(2, [200, 300], vocab=150000, seed=29)
    logits = {}
    for tag, extra in (("bf16", {}), ("fp8", {"quantization": "fp8", "kv_cache_dtype": "fp8"})):
        llm = LLM(path, max_model_len=1024, enforce_eager=True, **extra)
        captured = []
        model = llm.model_runner.model
        original = model.compute_logits
        model.compute_logits = lambda h, original=original, captured=captured: (
            captured.append(original(h)) or captured[-1]
        )
        try:
            llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
        finally:
            del model.compute_logits
            llm.exit()
        logits[tag] = torch.cat([c.float().cpu() for c in captured if c.shape[0] > len(prompts)])
    p = torch.log_softmax(logits["bf16"], -1)
    q = torch.log_softmax(logits["fp8"], -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl < 0.05, kl


def test_fp8_kv_cache_forks_copy_their_blocks(bf16_dir):
    """n=2 forks copy the parent's partly filled last block (a byte copy of the FP8 cache): both greedy
    completions equal the single completion."""
    llm = LLM(bf16_dir, **ENGINE, kv_cache_dtype="fp8", kvcache_block_size=16)
    try:
        prompt = PROMPTS[1]  # 17 tokens: the last block is partly filled
        single = llm.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"]
        forked = llm.generate(
            [prompt], SamplingParams(n=2, temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
        )
        assert [c.token_ids for c in forked[0].outputs] == [single, single]
    finally:
        llm.exit()
