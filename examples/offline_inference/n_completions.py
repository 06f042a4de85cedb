"""Mirrors vLLM's examples/offline_inference/tpu.py, its `SamplingParams(temperature=0, top_p=1.0, n=N,
max_tokens=16)`: N completions per prompt (the prompt is prefilled once and shared), read from
`output.outputs`, under tpu.py's small step limits (max_num_batched_tokens=64, max_num_seqs=4). Greedy,
so the N completions of a prompt are identical.

A vLLM user changes only `from vllm import ...` to `from nanovllm import ...`.

    python examples/offline_inference/n_completions.py [--model MODEL] [--n 3]

MODEL defaults to a tiny random-weight Qwen3 built into ~/.cache/nano-vllm/ on first use (its text is
gibberish); any local model directory or a cached hub id such as Qwen/Qwen3-0.6B works.
"""

import argparse

from nanovllm import LLM, SamplingParams
from nanovllm.utils.builtin_model import get_builtin_model

prompts = [
    "A robot may not injure a human being",
    "It is only with the heart that one can see rightly;",
    "The greatest glory in living lies not in never falling,",
]


def main(model: str, n: int) -> None:
    # Greedy, as in tpu.py: every one of the n completions is the argmax continuation.
    sampling_params = SamplingParams(temperature=0, top_p=1.0, n=n, max_tokens=16)
    llm = LLM(model=model, max_num_batched_tokens=64, max_num_seqs=4)
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        print(f"Prompt: {output.prompt!r}")
        for completion in output.outputs:
            print(
                f"  completion {completion.index}: {len(completion.token_ids)} tokens, "
                f"Generated text: {completion.text!r}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or hub id")
    parser.add_argument("--n", type=int, default=3, help="completions per prompt")
    args = parser.parse_args()
    main(args.model or get_builtin_model("tiny-qwen3"), args.n)
