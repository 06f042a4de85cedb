"""AWQ and GPTQ on an NVIDIA GPU: the Triton W4A16 kernel inside the engine (prefill tiles, split-K
decode in CUDA graphs) against transformers holding the dequantized weights."""

import copy

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import hf_greedy, random_prompts
from tests.quantization.int4_checkpoints import build

pytestmark = pytest.mark.cuda

ENGINE = dict(device="cuda", max_model_len=512, max_num_seqs=8, num_kvcache_blocks=64, kvcache_block_size=16)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# A 150-token prompt takes the tiled prefill path (more than 64 rows); decode batches take split-K.
PROMPTS = random_prompts(4, [5, 17, 40, 150], vocab=400, seed=13)
CASES = [
    ("awq", "Qwen3ForCausalLM", 32, {}),
    ("awq", "LlamaForCausalLM", 128, {}),
    ("gptq", "Qwen3ForCausalLM", 64, {"desc_act": True}),
    ("gptq", "LlamaForCausalLM", -1, {"sym": True}),
]


def _prompt_logprobs(llm: LLM, prompt: list[int]) -> torch.Tensor:
    lp = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return torch.tensor([next(iter(d.values())).logprob for d in lp[0].prompt_logprobs[1:]])


def _reference_logprobs(reference, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = reference(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]


@pytest.mark.parametrize("method,arch,group_size,quant", CASES)
def test_fp32_kernel_equals_dequantized_transformers(tmp_path, method, arch, group_size, quant):
    path, reference = build(tmp_path, method, arch, group_size, seed=1, **quant)
    llm = LLM(path, dtype="float32", **ENGINE)
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        for prompt, out in zip(PROMPTS, outs):
            assert out["token_ids"] == hf_greedy(reference, prompt, GREEDY.max_tokens)
        torch.testing.assert_close(
            _prompt_logprobs(llm, PROMPTS[3]),
            _reference_logprobs(reference, PROMPTS[3]),
            atol=2e-3,
            rtol=2e-3,
        )
    finally:
        llm.exit()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("method,arch,group_size,quant", CASES[::2])
def test_half_precision_close_to_dequantized_transformers(tmp_path, method, arch, group_size, quant, dtype):
    """16-bit activations (as served): prompt log-probabilities within 16-bit rounding of the fp32
    reference, and CUDA-graph decode equal to eager decode.

    "16-bit rounding" is measured, not guessed: the same dequantized model in transformers, cast to
    `dtype`, strays from its fp32 self by `rounding` (mean absolute log-probability difference); ours may
    stray by twice that, and at least 0.05. On the H200, bf16 gave 0.084-0.091 against a flat 0.05 bound
    that fp16 met, while transformers' own bf16 copy strays by 0.083 (AWQ case) and 0.094 (GPTQ case) on a
CPU: bf16 keeps 8 bits of mantissa to fp16's 11 (fp16: 0.017 and 0.019, so its bound stays 0.05)."""
    path, reference = build(tmp_path, method, arch, group_size, seed=2, **quant)
    ref = _reference_logprobs(reference, PROMPTS[3])
    rounded = copy.deepcopy(reference).to(getattr(torch, dtype))
    rounding = (_reference_logprobs(rounded, PROMPTS[3]) - ref).abs().mean().item()
    del rounded
    graphs = LLM(path, dtype=dtype, **ENGINE)
    try:
        ours = _prompt_logprobs(graphs, PROMPTS[3])
        error = (ours - ref).abs().mean().item()
        assert error < max(0.05, 2 * rounding), (error, rounding, (ours - ref).abs().max())
        with_graphs = [o["token_ids"] for o in graphs.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        graphs.exit()
    eager = LLM(path, dtype=dtype, enforce_eager=True, **ENGINE)
    try:
        assert [o["token_ids"] for o in eager.generate(PROMPTS, GREEDY, use_tqdm=False)] == with_graphs
    finally:
        eager.exit()
