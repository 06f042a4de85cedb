from nanovllm.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """The user-facing engine: `LLM(model, **config).generate(prompts, sampling_params)`, as vLLM's
    `LLM`. `model` is a local model directory or a hub id found in the local Hugging Face cache.

    With `data_parallel_size=N > 1` it is a `nanovllm.distributed.data_parallel.DataParallelLLM`: N
    engine replicas as Ray actors behind the same `generate`, `stream` and `chat` (needs the `ray` extra).
    """

    def __new__(cls, *args, **kwargs):
        if kwargs.get("data_parallel_size", 1) != 1:
            # Imported here: Ray and the replica machinery load only when replicas are asked for.
            from nanovllm.distributed.data_parallel import DataParallelLLM

            return DataParallelLLM(*args, **kwargs)
        return super().__new__(cls)
