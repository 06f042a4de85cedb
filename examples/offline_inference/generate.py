"""Mirrors vLLM's examples/offline_inference/basic/generate.py: every engine argument is a command-line
flag (EngineArgs.add_cli_args), the sampling flags adjust the model's default sampling parameters, and
`LLM(**vars(args))` builds the engine.

A vLLM user changes only `from vllm...` to `from nanovllm...`.

    python examples/offline_inference/generate.py [--model MODEL] [--max-model-len 1024] \
        [--max-tokens 32] [--temperature 0.7] [--top-p 0.9] [--top-k 20]

MODEL defaults to a tiny random-weight Qwen3 built into ~/.cache/nano-vllm/ on first use (its text is
gibberish); any local model directory or a cached hub id such as Qwen/Qwen3-0.6B works.
"""

from nanovllm import LLM, EngineArgs
from nanovllm.utils.argparse_utils import FlexibleArgumentParser
from nanovllm.utils.builtin_model import get_builtin_model


def main(args: dict) -> None:
    # The sampling flags are not engine arguments: take them out before building the LLM.
    overrides = {name: args.pop(name) for name in ("max_tokens", "temperature", "top_p", "top_k")}

    llm = LLM(**args)

    # Start from the model's own defaults (its generation_config.json) and apply what was given.
    sampling_params = llm.get_default_sampling_params()
    for name, value in overrides.items():
        if value is not None:
            setattr(sampling_params, name, value)

    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")


if __name__ == "__main__":
    parser = FlexibleArgumentParser()
    engine_group = parser.add_argument_group("Engine arguments")
    EngineArgs.add_cli_args(engine_group)
    engine_group.set_defaults(model=None)  # None: the built-in tiny model
    sampling_group = parser.add_argument_group("Sampling parameters")
    sampling_group.add_argument("--max-tokens", type=int)
    sampling_group.add_argument("--temperature", type=float)
    sampling_group.add_argument("--top-p", type=float)
    sampling_group.add_argument("--top-k", type=int)
    args: dict = vars(parser.parse_args())
    args["model"] = args["model"] or get_builtin_model("tiny-qwen3")
    main(args)
