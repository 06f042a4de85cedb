"""Helpers shared by the engine, the layers and scripts. Only the light ones are re-exported here:
the layers import submodules of this package (context, parallel, compile), so importing it must stay
cheap and must not import the engine."""

from nanovllm.utils.argparse_utils import FlexibleArgumentParser

__all__ = ["FlexibleArgumentParser"]
