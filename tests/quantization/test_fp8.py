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
        if name.endswith(LINEAR_SUFFIXES):
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
