"""Tiny AWQ / GPTQ checkpoints for the end-to-end tests: a transformers model saved by transformers,
packed by the tests' packer, and transformers' model holding the dequantized weights as the
reference."""

import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import hf_greedy, random_prompts, write_hf_checkpoint
from tests.quantization.int4_packing import quantize_checkpoint

# hidden 128 and intermediate 256: groups of 32, 64 and 128 all divide them, and 4 heads of 32 give
# the attention output 128 input features (2 groups of 32 per rank at tensor_parallel_size 2).
INT4_SHAPES = dict(
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=400,
)
ENGINE = dict(max_model_len=256, max_num_batched_tokens=512, max_num_seqs=8, num_kvcache_blocks=32)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = random_prompts(3, [5, 17, 40], vocab=400, seed=11)
# Two ranks, a short timeout and a small shared-memory ring: enough for these tiny models.
TP = dict(tensor_parallel_size=2, tp_timeout_s=30.0, tp_shm_bytes=64 << 10)


def build(tmp_path, method: str, arch: str, group_size: int, seed: int = 0, **quant):
    """(checkpoint dir, reference transformers model) for one format and architecture."""
    path = write_hf_checkpoint(tmp_path, arch=arch, seed=seed, **INT4_SHAPES)
    state = quantize_checkpoint(path, method, group_size, seed=seed, **quant)
    return path, reference_model(path, arch, state)


def reference_model(path: str, arch: str, state: dict[str, torch.Tensor]):
    """transformers' model of the checkpoint's architecture (its config minus the quantization
    section) holding `state`."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    config.quantization_config = None
    del config.quantization_config
    model = getattr(transformers, arch)(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def greedy_token_ids(path: str, **engine_args) -> list[list[int]]:
    """PROMPTS' greedy tokens from an engine over `path` (ENGINE plus `engine_args`), exited after."""
    llm = LLM(path, **ENGINE, **engine_args)
    try:
        return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.exit()


def check_against_reference(llm: LLM, reference) -> None:
    """Greedy tokens equal transformers'; prompt log-probabilities close to its log-softmax."""
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out["token_ids"] == hf_greedy(reference, prompt, GREEDY.max_tokens)
    prompt = PROMPTS[2]
    lp = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    ours = torch.tensor([next(iter(d.values())).logprob for d in lp[0].prompt_logprobs[1:]])
    with torch.no_grad():
        logits = reference(torch.tensor([prompt])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-3)
