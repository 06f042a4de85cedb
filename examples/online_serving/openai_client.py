"""Call a running nano-vllm server with the official openai client, as vLLM's
examples/online_serving/openai_{completion,chat_completion}_client.py do:

    nanovllm serve Qwen/Qwen3-0.6B --port 8000 &        # or any model directory
    python examples/online_serving/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]

It lists the served models, asks for a completion, then streams a chat answer. Needs `pip install openai`.
"""

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if it has one")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print(f"model: {model}")

    completion = client.completions.create(
        model=model, prompt="Hello, my name is", max_tokens=args.max_tokens, temperature=0
    )
    print(f"completion: {completion.choices[0].text!r} ({completion.usage.completion_tokens} tokens)")

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is paged attention?"}],
        max_tokens=args.max_tokens,
        temperature=0.6,
        seed=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    print("chat: ", end="", flush=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage is not None:
            usage = chunk.usage
            print(f"\n(usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens)")


if __name__ == "__main__":
    main()
