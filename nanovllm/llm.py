from nanovllm.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """The user-facing engine: `LLM(model, **config).generate(prompts, sampling_params)`, as vLLM's
    `LLM`. `model` is a local model directory or a hub id found in the local Hugging Face cache."""
