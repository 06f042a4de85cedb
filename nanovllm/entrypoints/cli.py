"""The `nanovllm` console script, as vLLM's `vllm`:

    nanovllm serve MODEL [--host HOST] [--port PORT] [server and engine flags]

`nanovllm serve --help` lists every flag (the server's and one per engine option).
"""

import sys

from nanovllm.utils.argparse_utils import FlexibleArgumentParser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = FlexibleArgumentParser(prog="nanovllm", description="nano-vllm command line")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="Start the OpenAI-compatible HTTP server",
        description="Serve MODEL over an OpenAI-compatible HTTP API (pip install 'nano-vllm[serve]').",
    )
    serve.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="Model directory or hub repo id (the same as --model).",
    )
    if argv[:1] != ["serve"]:
        parser.parse_args(argv)  # prints usage or the unknown command's error
        return
    from nanovllm.entrypoints.openai.api_server import make_arg_parser, run_server

    make_arg_parser(serve)
    args = parser.parse_args(argv)
    if args.model_tag is not None:
        args.model = args.model_tag
    run_server(args)


if __name__ == "__main__":
    main()
