"""Ray Data: a predictor class for `Dataset.map_batches`, so a dataset larger than memory streams
through engines that Ray Data runs as actors (one engine each; Ray Data keeps each fed with batches).

    ds = ray.data.read_parquet("s3://bucket/prompts/")          # a column "prompt"
    ds = ds.map_batches(
        LLMPredictor,
        fn_constructor_kwargs={"model": "Qwen/Qwen3-0.6B", "sampling_params": {"max_tokens": 64}},
        concurrency=4,     # engines
        num_gpus=1,        # per engine (num_cpus=... on a CPU cluster)
        batch_size=256,    # prompts per generate call
    )
    ds.write_parquet("s3://bucket/completions/")               # adds "generated_text", ...
"""

import numpy as np

from nanovllm.sampling_params import SamplingParams


class LLMPredictor:
    """Built once per Ray Data actor: an engine over `model` (other keywords are the engine's). Each
    call completes the batch's `prompt_column` and returns the batch with `output_column` (the first
    completion's text), `num_generated_tokens` and `finish_reason` added."""

    def __init__(
        self,
        model: str,
        sampling_params: SamplingParams | dict | None = None,
        prompt_column: str = "prompt",
        output_column: str = "generated_text",
        **engine_kwargs,
    ):
        from nanovllm.engine.llm_engine import LLMEngine

        if isinstance(sampling_params, dict):
            sampling_params = SamplingParams(**sampling_params)
        if engine_kwargs.get("data_parallel_size", 1) != 1:
            raise ValueError(
                "LLMPredictor runs one engine per Ray Data actor: scale with map_batches(concurrency=...), "
                "not data_parallel_size"
            )
        self.llm = LLMEngine(model, **engine_kwargs)
        self.sampling_params = sampling_params
        self.prompt_column = prompt_column
        self.output_column = output_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.prompt_column not in batch:
            raise ValueError(f"the batch has no column {self.prompt_column!r} (it has {sorted(batch)})")
        prompts = [str(p) for p in batch[self.prompt_column]]
        outputs = self.llm.generate(prompts, self.sampling_params, use_tqdm=False)
        first = [out.outputs[0] for out in outputs]
        return {
            **batch,
            self.output_column: np.array([c.text for c in first], dtype=object),
            "num_generated_tokens": np.array([len(c.token_ids) for c in first], dtype=np.int64),
            "finish_reason": np.array([c.finish_reason for c in first], dtype=object),
        }

    def __del__(self):
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.exit()
