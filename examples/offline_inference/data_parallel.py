"""Data parallelism on a Ray cluster, in the place of vLLM's examples/offline_inference/data_parallel.py:
`LLM(model, data_parallel_size=N)` runs N engine replicas as Ray actors (each with tensor_parallel_size
GPUs on one node, or CPUs where the cluster has no GPU) behind the same `generate`. Requests are spread
by their tokens, the outputs come back in prompt order, and a seeded request gives the same text
whichever replica runs it. Needs `pip install "nano-vllm[ray]"`.

    python examples/offline_inference/data_parallel.py                        # tiny model, 2 replicas
    python examples/offline_inference/data_parallel.py --model Qwen/Qwen3-0.6B --data-parallel-size 4
    RAY_ADDRESS=ray://head:10001 python examples/offline_inference/data_parallel.py --model ...

Ray joins the cluster RAY_ADDRESS names (or the one a `ray.init(address=...)` earlier in the program
joined), else starts a local instance.
"""

from nanovllm import LLM, EngineArgs, SamplingParams
from nanovllm.utils.argparse_utils import FlexibleArgumentParser
from nanovllm.utils.builtin_model import get_builtin_model


def main(args: dict) -> None:
    num_prompts = args.pop("num_prompts")
    llm = LLM(**args)
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ] * (num_prompts // 4)
    # Per-request seeds: the same completions whichever replica runs a prompt.
    sampling_params = [
        SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=i) for i in range(len(prompts))
    ]
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")
    llm.exit()  # kills the replica actors and frees their devices


if __name__ == "__main__":
    parser = FlexibleArgumentParser()
    engine_group = parser.add_argument_group("Engine arguments")
    EngineArgs.add_cli_args(engine_group)
    engine_group.set_defaults(model=None, data_parallel_size=2)  # model None: the built-in tiny model
    parser.add_argument("--num-prompts", type=int, default=8, help="a multiple of 4")
    args: dict = vars(parser.parse_args())
    args["model"] = args["model"] or get_builtin_model("tiny-qwen3")
    main(args)
