"""Mirrors vLLM's examples/offline_inference/reproducibility.py: with `LLM(seed=...)` sampled (not
greedy) outputs are the same on every run of the script.

A vLLM user changes only `from vllm import ...` to `from nanovllm import ...`. (vLLM's script also sets
VLLM_ENABLE_V1_MULTIPROCESSING=0 so that the engine runs in this process; nano-vllm always does, and the
variable means nothing to it.)

    python examples/offline_inference/reproducibility.py [--model MODEL]   # run it twice and compare

MODEL defaults to a tiny random-weight Qwen3 built into ~/.cache/nano-vllm/ on first use (its text is
gibberish); any local model directory or a cached hub id such as Qwen/Qwen3-0.6B works.
"""

import argparse
import os
import random

from nanovllm import LLM, SamplingParams
from nanovllm.utils.builtin_model import get_builtin_model

# What vLLM's script sets; harmless here.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

SEED = 42

prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)


def main(model: str) -> None:
    llm = LLM(model=model, seed=SEED)
    outputs = llm.generate(prompts, sampling_params)
    print("-" * 50)
    for output in outputs:
        print(f"Prompt: {output.prompt!r}\nGenerated text: {output.outputs[0].text!r}")
        print("-" * 50)

    # vLLM's script ends by drawing from Python's global random module: when the engine runs in the
    # script's process, vLLM has seeded that generator too, so this number repeats across runs.
    print(random.randint(0, 100))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or hub id")
    args = parser.parse_args()
    main(args.model or get_builtin_model("tiny-qwen3"))
