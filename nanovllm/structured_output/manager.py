"""Structured outputs through xgrammar: constraints compiled to grammars, one matcher per completion,
token bitmasks for the constrained rows of a step.

xgrammar (the grammar engine vLLM and SGLang use) compiles a JSON schema, regex, choice list or EBNF
grammar against the tokenizer's vocabulary once per distinct constraint; a `GrammarMatcher` follows one
completion, filling the bitmask of the tokens allowed next and accepting each sampled token. The engine
keeps a constrained completion's tokens on the host before its next step (its sequences have
`needs_host_tokens`), because the next mask depends on the token just sampled: such a row sits out the
step launched while its token is in flight, and the others keep overlapping. The rows' bitmasks are
filled on the host while the GPU runs the step before (into pinned memory on a GPU, so the copy to the
device is asynchronous), and applied to the logits on the device by the model runner, after the logits
processors and before the draw, in place by one kernel (nanovllm/kernels/token_bitmask.py).
"""

import json
import threading

import torch

from nanovllm.kernels.token_bitmask import apply_token_bitmask_torch, apply_token_bitmask_triton
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
    """Compiles constraints (cached by constraint) and fills the bitmasks of a step's constrained rows.
    `compile` may run in any thread (the async engine compiles in a worker thread, so a large schema
    stalls no step; xgrammar's compiler takes several threads at once)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...], pin_memory: bool = False):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.pin_memory = pin_memory  # host tensors in pinned memory (a CUDA engine's asynchronous copies)
        self._compiler = None
        self._compiler_lock = threading.Lock()  # one compiler, however many threads ask for it first
        self._batch_matcher = None  # xgrammar's multi-threaded bitmask fill, built on first use
        self._grammars: dict[tuple, object] = {}

    def _get_compiler(self):
        with self._compiler_lock:
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

    def bitmask(self, matchers: list, rows: list[int]) -> "TokenBitmask":
        """The bitmasks of a step's constrained rows, on the host: bitmask row i (bit t set if token t is
        allowed next for matchers[i]) masks logits row rows[i].

        Both tensors are new each step. In pinned memory (a CUDA engine) they are copied to the device
        asynchronously, and torch's caching host allocator records the copy's stream on them: a freed
        block is handed out again only after its copy has completed, so the next step's fill (overlap
        scheduling launches it before this one is read back) never writes into a buffer still in flight.
        """
        xgr = _import_xgrammar()
        words = (self.vocab_size + 31) // 32
        mask = torch.empty(len(matchers), words, dtype=torch.int32, pin_memory=self.pin_memory)
        if self._batch_matcher is None:
            self._batch_matcher = xgr.BatchGrammarMatcher()  # threads: half the host's cores
        self._batch_matcher.batch_fill_next_token_bitmask(matchers, mask)  # writes every word of each row
        index = torch.tensor(rows, dtype=torch.int32)
        return TokenBitmask(index.pin_memory() if self.pin_memory else index, mask)


class TokenBitmask:
    """The bitmasks of one step's constrained rows: `bitmask` [n, ceil(vocab / 32)] int32, row i for logits
    row `rows[i]` ([n] int32, no repeats); on the host until `to(device)`. `ready`: on a CUDA device, the
    event its copy recorded (None once the tensors are usable on the current stream)."""

    __slots__ = ("rows", "bitmask", "ready")

    def __init__(self, rows: torch.Tensor, bitmask: torch.Tensor, ready=None):
        self.rows = rows
        self.bitmask = bitmask
        self.ready = ready

    def __len__(self) -> int:
        return self.rows.shape[0]

    def to(self, device: torch.device) -> "TokenBitmask":
        """On `device`, without blocking the host. On a GPU the copy runs on a side stream (one of torch's
        pooled streams), so it overlaps the work already queued on the current stream (the step before,
        and this step's forward when called before it); `apply_token_bitmask` waits for it on the device."""
        if self.bitmask.device == device:
            return self
        if device.type != "cuda":
            return TokenBitmask(self.rows.to(device), self.bitmask.to(device))
        side = torch.cuda.Stream(device)
        with torch.cuda.stream(side):  # allocated from the side stream's pool, written there
            rows = self.rows.to(device, non_blocking=True)
            bitmask = self.bitmask.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
        return TokenBitmask(rows, bitmask, ready)


def apply_token_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> None:
    """Set to -inf, in place, the logits of the rows of `mask` whose token its bitmask does not allow
    (ids past the bitmask's vocabulary included). One kernel on a GPU, no gather or scatter copies."""
    mask = mask.to(logits.device)
    if logits.device.type == "cuda":
        if mask.ready is not None:  # the copy's stream: wait for it here, keep its memory until used here
            stream = torch.cuda.current_stream(logits.device)
            stream.wait_event(mask.ready)
            mask.rows.record_stream(stream)
            mask.bitmask.record_stream(stream)
        apply_token_bitmask_triton(logits, mask.rows, mask.bitmask)
    else:
        apply_token_bitmask_torch(logits, mask.rows, mask.bitmask)
