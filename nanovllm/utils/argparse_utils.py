"""An ArgumentParser that takes `--max_num_seqs` for `--max-num-seqs`, as vLLM's does."""

import argparse
import sys
from collections.abc import Sequence


class FlexibleArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that accepts underscores in long option names: `--max_num_seqs 8` and
    `--max_num_seqs=8` mean `--max-num-seqs 8`. Only the option name is rewritten, never a value, and
    an option registered with underscores keeps working as registered. Everything after a bare `--` is
    left alone (positional arguments)."""

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # parse_args() goes through here too.
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._dashed(args), namespace)

    def _dashed(self, args: list[str]) -> list[str]:
        out: list[str] = []
        for i, arg in enumerate(args):
            if arg == "--":
                return out + args[i:]
            if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
                name, eq, value = arg.partition("=")
                if name not in self._option_string_actions:
                    arg = name.replace("_", "-") + eq + value
            out.append(arg)
        return out
