"""Generate two chat completions, as the original nano-vllm example does.

python example.py                 # ~/huggingface/Qwen3-0.6B/ if present, else a built-in tiny model
python example.py /path/to/model  # any supported model directory
"""

import os
import sys

from nanovllm import LLM, SamplingParams
from nanovllm.utils.builtin_model import get_builtin_model


def main() -> None:
    if len(sys.argv) > 1:
        path = os.path.expanduser(sys.argv[1])
        print(f"Using model {path}")
    elif os.path.isdir(os.path.expanduser("~/huggingface/Qwen3-0.6B/")):
        path = os.path.expanduser("~/huggingface/Qwen3-0.6B/")
        print(f"Using model {path}")
    else:
        path = get_builtin_model("tiny-qwen3")
        print(
            f"No model given and ~/huggingface/Qwen3-0.6B/ not found: using the built-in tiny random-weight "
            f"Qwen3 at {path} (its text is gibberish)"
        )
    llm = LLM(path, enforce_eager=True, tensor_parallel_size=1)
    tokenizer = llm.tokenizer
    sampling_params = SamplingParams(temperature=0.6, max_tokens=256)
    prompts = ["introduce yourself", "list all prime numbers within 100"]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    outputs = llm.generate(prompts, sampling_params)
    for prompt, output in zip(prompts, outputs):
        print("\n")
        print(f"Prompt: {prompt!r}")
        print(f"Completion: {output['text']!r}")
    llm.exit()


if __name__ == "__main__":
    main()
