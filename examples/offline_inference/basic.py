"""Mirrors vLLM's examples/offline_inference/basic/basic.py: a handful of prompts, one LLM.generate call.

A vLLM user changes only `from vllm import ...` to `from nanovllm import ...`.

    python examples/offline_inference/basic.py [--model MODEL]

MODEL defaults to a tiny random-weight Qwen3 built into ~/.cache/nano-vllm/ on first use (its text is
gibberish); any local model directory or a cached hub id such as Qwen/Qwen3-0.6B works.
"""

import argparse

from nanovllm import LLM, SamplingParams
from nanovllm.utils.builtin_model import get_builtin_model

prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
# Nucleus sampling at a moderate temperature.
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)


def main(model: str) -> None:
    llm = LLM(model=model)
    # One RequestOutput per prompt, in prompt order.
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or hub id")
    args = parser.parse_args()
    main(args.model or get_builtin_model("tiny-qwen3"))
