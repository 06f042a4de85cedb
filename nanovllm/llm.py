from nanovllm.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """The user-facing engine: `LLM(model_dir, **config).generate(prompts, sampling_params)`."""
