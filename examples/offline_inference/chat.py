"""Mirrors vLLM's examples/offline_inference/basic/chat.py: LLM.chat with one conversation, with a batch
of conversations, and with a chat template given explicitly (--chat-template-path).

A vLLM user changes only `from vllm...` to `from nanovllm...`.

    python examples/offline_inference/chat.py [--model MODEL] [--max-tokens 32] \
        [--chat-template-path template.jinja]

MODEL defaults to a tiny random-weight Qwen3 built into ~/.cache/nano-vllm/ on first use (its text is
gibberish); any local model directory or a cached hub id such as Qwen/Qwen3-0.6B works.
"""

from argparse import Namespace

from nanovllm import LLM, EngineArgs, SamplingParams
from nanovllm.utils.argparse_utils import FlexibleArgumentParser
from nanovllm.utils.builtin_model import get_builtin_model

SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k")


def print_outputs(outputs) -> None:
    for output in outputs:
        print(f"Prompt: {output.prompt!r}")
        print(f"Generated text: {output.outputs[0].text!r}")
    print("-" * 80)


def main(args: Namespace) -> None:
    chat_template_path = args.chat_template_path
    del args.chat_template_path
    sampling_params = SamplingParams(**{name: getattr(args, name) for name in SAMPLING_FLAGS})
    for name in SAMPLING_FLAGS:
        delattr(args, name)

    llm = LLM(**vars(args))
    print("=" * 80)

    # One conversation: system prompt, an earlier exchange, and the new user turn.
    conversation = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I assist you today?"},
        {"role": "user", "content": "Write an essay about the importance of higher education."},
    ]
    outputs = llm.chat(conversation, sampling_params, use_tqdm=False)
    print_outputs(outputs)

    # A list of conversations is answered as one batch (the progress bar shows it).
    conversations = [conversation for _ in range(10)]
    outputs = llm.chat(conversations, sampling_params, use_tqdm=True)
    print_outputs(outputs)

    # A chat template may be given; without one the tokenizer's own is used.
    if chat_template_path:
        with open(chat_template_path) as f:
            chat_template = f.read()
        outputs = llm.chat(conversations, sampling_params, use_tqdm=False, chat_template=chat_template)
        print_outputs(outputs)


if __name__ == "__main__":
    parser = FlexibleArgumentParser()
    parser = EngineArgs.add_cli_args(parser)
    defaults = SamplingParams()
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--chat-template-path", type=str, default=None)
    parser.set_defaults(model=None)  # None: the built-in tiny model
    args = parser.parse_args()
    args.model = args.model or get_builtin_model("tiny-qwen3")
    main(args)
