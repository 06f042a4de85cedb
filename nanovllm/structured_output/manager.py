"""Structured outputs through xgrammar: constraints compiled to grammars, one matcher per completion,
token bitmasks for the constrained rows of a step.

xgrammar (the grammar engine vLLM and SGLang use) compiles a JSON schema, regex, choice list or EBNF
grammar against the tokenizer's vocabulary once per distinct constraint; a `GrammarMatcher` follows one
completion, filling the bitmask of the tokens allowed next and accepting each sampled token. The engine
keeps a constrained completion's tokens on the host before its next step (its sequences have
`needs_host_tokens`), because the next mask depends on the token just sampled; steps are then not
overlapped while a constrained request runs. The mask is applied to the logits on the device by the
model runner, after the logits processors and before the draw.
"""

import json

import torch

from nanovllm.sampling_params import StructuredOutputsParams


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError(
            "SamplingParams.structured_outputs needs the xgrammar package: "
            "pip install 'nano-vllm[structured]'"
        ) from None
    return xgrammar


class StructuredOutputManager:
    """Compiles constraints (cached by constraint) and fills the bitmasks of a step's constrained rows."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._compiler = None
        self._grammars: dict[tuple, object] = {}

    def _get_compiler(self):
        if self._compiler is None:  # built on first use: xgrammar is optional, and this takes a moment
            xgr = _import_xgrammar()
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None
            )
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar of `params` (compiled once per distinct constraint). An invalid schema,
        regex or grammar is a ValueError naming the problem."""
        key = params.key()
        grammar = self._grammars.get(key)
        if grammar is not None:
            return grammar
        compiler = self._get_compiler()
        kind = key[0]
        try:
            if kind == "json":
                schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
                json.loads(schema)  # xgrammar's message for malformed JSON text is terse
                grammar = compiler.compile_json_schema(
                    schema, any_whitespace=not params.disable_any_whitespace
                )
            elif kind == "json_object":  # any JSON object (xgrammar's built-in JSON grammar allows any value)
                grammar = compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=not params.disable_any_whitespace
                )
            elif kind == "regex":
                grammar = compiler.compile_regex(params.regex)
            elif kind == "choice":
                # One alternative per choice, each a quoted literal (JSON string escapes suit EBNF's).
                grammar = compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c) for c in params.choice)
                )
            else:
                grammar = compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(kind, kind)
            raise ValueError(f"SamplingParams.structured_outputs: invalid {what}: {e}") from None
        self._grammars[key] = grammar
        return grammar

    def new_matcher(self, grammar):
        return _import_xgrammar().GrammarMatcher(grammar)

    def bitmask(self, matchers: list) -> torch.Tensor:
        """[len(matchers), ceil(vocab / 32)] int32 on the host: bit t of row i set if token t is allowed
        next for matchers[i]."""
        xgr = _import_xgrammar()
        mask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(mask, i)
        return mask


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, the logits of `rows` whose token is not allowed by its bitmask row."""
    xgr = _import_xgrammar()
    index = torch.tensor(rows, device=logits.device)
    constrained = logits[index]  # [len(rows), vocab]: the mask is applied to these rows only
    xgr.apply_token_bitmask_inplace(
        constrained, bitmask.to(logits.device, non_blocking=True), vocab_size=logits.shape[-1]
    )
    logits[index] = constrained
