"""Batch inference over a dataset with Ray Data: `map_batches` with nano-vllm's `LLMPredictor`, one engine
per Ray Data actor. Rows stream through the engines, so the dataset may be larger than memory.

    python examples/ray_data_inference.py                       # tiny random model, 2 CPU engines
    python examples/ray_data_inference.py --model ~/huggingface/Qwen3-0.6B --num-gpus 1 --concurrency 2
    python examples/ray_data_inference.py --input prompts.parquet --output out/   # a "prompt" column

Without --input it builds a small dataset in memory; without --output it prints each row. Ray joins the
cluster RAY_ADDRESS names, else starts a local instance.
"""

import argparse

import ray

from nanovllm.distributed.ray_data import LLMPredictor
from nanovllm.utils.builtin_model import get_builtin_model

PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="model directory or hub id (default: the tiny built-in)"
    )
    parser.add_argument("--input", default=None, help="a Parquet file or folder with a 'prompt' column")
    parser.add_argument("--output", default=None, help="write the results as Parquet into this folder")
    parser.add_argument("--num-rows", type=int, default=16, help="rows of the in-memory dataset")
    parser.add_argument("--concurrency", type=int, default=2, help="engines (Ray Data actors)")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per engine (0: CPU engines)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    args = parser.parse_args()

    if args.num_cpus is not None and not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus)
    model = args.model or get_builtin_model("tiny-qwen3")
    if args.input is not None:
        ds = ray.data.read_parquet(args.input)
    else:
        ds = ray.data.from_items([{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(args.num_rows)])

    engine = {"device": "cuda" if args.num_gpus else "cpu", "max_model_len": 1024}
    ds = ds.map_batches(
        LLMPredictor,
        fn_constructor_kwargs={
            "model": model,
            "sampling_params": {"temperature": args.temperature, "max_tokens": args.max_tokens},
            **engine,
        },
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        num_gpus=args.num_gpus,
        num_cpus=0 if args.num_gpus else 1,
    )
    if args.output is not None:
        ds.write_parquet(args.output)
        print(f"Wrote {args.output}")
        return
    for row in ds.iter_rows():
        print(f"Prompt: {row['prompt']!r}, Generated text: {row['generated_text']!r}")


if __name__ == "__main__":
    main()
