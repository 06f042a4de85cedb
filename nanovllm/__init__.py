"""nano-vllm: a small, fast offline LLM inference engine."""

from nanovllm.engine.arg_utils import EngineArgs
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.inputs import TextPrompt, TokensPrompt
from nanovllm.llm import LLM
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "EngineArgs",
    "LLMEngine",
    "TextPrompt",
    "TokensPrompt",
]
