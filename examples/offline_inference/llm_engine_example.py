"""Mirrors vLLM's examples/offline_inference/llm_engine_example.py: drive an LLMEngine by hand, adding
one request per step (named by a string id) and printing each RequestOutput once it is finished.

A vLLM user changes only `from vllm...` to `from nanovllm...`.

    python examples/offline_inference/llm_engine_example.py [--model MODEL] [--max-model-len 1024]

MODEL defaults to a tiny random-weight Qwen3 built into ~/.cache/nano-vllm/ on first use (its text is
gibberish); any local model directory or a cached hub id such as Qwen/Qwen3-0.6B works.
"""

import argparse

from nanovllm import EngineArgs, LLMEngine, RequestOutput, SamplingParams
from nanovllm.utils import FlexibleArgumentParser
from nanovllm.utils.builtin_model import get_builtin_model


def create_test_prompts() -> list[tuple[str, SamplingParams]]:
    """Three prompts, each with its own sampling parameters."""
    return [
        # Greedy, with the log-probability of every sampled and every prompt token.
        (
            "A robot may not injure a human being",
            SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=1),
        ),
        # Top-k sampling with a presence penalty.
        ("To be or not to be,", SamplingParams(temperature=0.8, top_k=5, presence_penalty=0.2)),
        # Two completions of one prompt.
        (
            "What is the meaning of life?",
            SamplingParams(n=2, temperature=0.8, top_p=0.95, frequency_penalty=0.1),
        ),
    ]


def process_requests(engine: LLMEngine, test_prompts: list[tuple[str, SamplingParams]]) -> None:
    """Add the prompts one step apart and step until every request has finished."""
    request_id = 0
    while test_prompts or engine.has_unfinished_requests():
        if test_prompts:
            prompt, sampling_params = test_prompts.pop(0)
            engine.add_request(str(request_id), prompt, sampling_params)
            request_id += 1

        request_outputs: list[RequestOutput] = engine.step()
        for request_output in request_outputs:
            if request_output.finished:
                print(request_output)


def initialize_engine(args: argparse.Namespace) -> LLMEngine:
    engine_args = EngineArgs.from_cli_args(args)
    return LLMEngine.from_engine_args(engine_args)


def main(args: argparse.Namespace) -> None:
    engine = initialize_engine(args)
    process_requests(engine, create_test_prompts())


if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="Demo on using the LLMEngine class directly")
    parser = EngineArgs.add_cli_args(parser)
    parser.set_defaults(model=None)  # None: the built-in tiny model
    args = parser.parse_args()
    args.model = args.model or get_builtin_model("tiny-qwen3")
    main(args)
