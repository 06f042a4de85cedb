"""Our Qwen3 against transformers' Qwen3ForCausalLM with the same weights."""

import pytest
import torch

from nanovllm import LLM
from nanovllm.utils.context import AttentionMetadata
from tests.conftest import load_hf_model, random_prompts


def our_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """Logits at every position of one prompt, through the engine's loaded model (no KV cache)."""
    n = len(prompt)
    meta = AttentionMetadata(
        is_prefill=True,
        slot_mapping=torch.full((n,), -1),
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, n], dtype=torch.int32),
        max_seqlen_q=n,
        max_seqlen_k=n,
        seqlens_q=[n],
        seqlens_k=[n],
    )
    model = llm.model_runner.model
    with torch.inference_mode(), llm.model_runner.forward_context.set(meta):
        hidden = model(torch.tensor(prompt), torch.arange(n))
        return model.compute_logits(hidden)


@pytest.mark.parametrize("fixture", ["qwen3_tied", "qwen3_untied"])
def test_logits_match_transformers(request, fixture):
    path = request.getfixturevalue(fixture)
    llm = LLM(path, num_kvcache_blocks=8, kvcache_block_size=16)
    hf = load_hf_model(path)
    for prompt in random_prompts(3, [1, 7, 45]):
        ours = our_logits(llm, prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    llm.exit()


def test_tied_model_shares_embedding(qwen3_tied, qwen3_untied):
    tied = LLM(qwen3_tied, num_kvcache_blocks=4, kvcache_block_size=16).model_runner.model
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = LLM(qwen3_untied, num_kvcache_blocks=4, kvcache_block_size=16).model_runner.model
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)
