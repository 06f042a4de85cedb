"""One request's tokens and bookkeeping as it moves through the scheduler."""

from copy import copy
from enum import Enum, auto

from nanovllm.sampling_params import SamplingParams

# Stands in for a token that was sampled on the GPU but not yet read back (overlap scheduling).
PLACEHOLDER_TOKEN = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """A prompt plus the tokens generated for it so far.

    `num_computed_tokens` counts the leading tokens whose K/V are in the cache (prefix-cache hits
    included); the scheduler advances it as prefill chunks and decode steps run. A sequence samples
    only once every token it holds is computed except the newest one.
    """

    __slots__ = (
        "seq_id",
        "status",
        "token_ids",
        "token_offset",
        "last_token",
        "num_tokens",
        "num_prompt_tokens",
        "num_computed_tokens",
        "num_cached_tokens",
        "block_table",
        "block_size",
        "max_tokens",
        "ignore_eos",
        "params",
        "finish_reason",
        "stop_reason",
        "num_pending_forks",
        "needs_host_tokens",
        "block_hashes",
    )

    def __init__(self, seq_id: int, token_ids: list[int], sampling_params: SamplingParams, block_size: int):
        self.seq_id = seq_id
        self.status = SequenceStatus.WAITING
        self.token_ids = copy(token_ids)
        self.token_offset = 0  # index of token_ids[0] in the sequence; > 0 only in a worker's copy
        self.last_token = token_ids[-1]
        self.num_tokens = len(self.token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # tokens reused from the prefix cache at the last allocation
        self.block_table: list[int] = []
        self.block_size = block_size
        self.max_tokens = sampling_params.max_tokens
        self.ignore_eos = sampling_params.ignore_eos
        self.params = sampling_params
        self.finish_reason: str | None = None  # "stop", "length" or "abort" once finished
        self.stop_reason: int | None = None  # the stop token id that ended it (not EOS)
        # SamplingParams.n > 1: completions still to fork off this one when its prompt is prefilled.
        self.num_pending_forks = 0
        # The sampler needs this sequence's tokens on the host (multi-token bad words): its next step
        # waits for its previous token to be read back instead of overlapping with it.
        self.needs_host_tokens = False
        # Prefix-cache hashes of the leading full blocks of known tokens (block i's chained to block
        # i - 1's), filled in by the block manager as it hashes them, so that a prompt waiting through
        # many scheduling passes is hashed once. Tokens of a full block never change (a placeholder's
        # block is not cached; `truncate` drops the hashes of the blocks it cuts).
        self.block_hashes: list[int] = []

    def __len__(self) -> int:
        return self.num_tokens

    # Pickling is the tensor-parallel wire format: rank 0 sends every step's batch to the workers, which
    # only build the step's inputs from it. A copy carries the tokens not yet computed (one for a decode
    # step) and the block table, so a decode step's message grows by one int per KV block, not per token. Its
    # sampling parameters, status and block hashes stay behind: workers neither sample nor schedule.
    def __getstate__(self):
        start = self.num_computed_tokens
        return (
            self.seq_id,
            self.token_ids[start:],
            start,
            self.num_tokens,
            self.num_prompt_tokens,
            self.num_computed_tokens,
            self.block_table,
            self.block_size,
        )

    def __setstate__(self, state) -> None:
        (
            self.seq_id,
            self.token_ids,
            self.token_offset,
            self.num_tokens,
            self.num_prompt_tokens,
            self.num_computed_tokens,
            self.block_table,
            self.block_size,
        ) = state
        self.last_token = self.token_ids[-1]
        self.num_cached_tokens = 0
        self.status = SequenceStatus.RUNNING
        self.params = None
        self.finish_reason = None
        self.stop_reason = None
        self.num_pending_forks = 0
        self.needs_host_tokens = False
        self.block_hashes = []

    def fork(self, seq_id: int, sampling_params: SamplingParams) -> "Sequence":
        """A new sequence holding this one's prompt (another completion of the same request); the block
        manager gives it this one's blocks."""
        if self.num_completion_tokens:
            raise ValueError(f"sequence {self.seq_id} has completion tokens: only a prompt can be forked")
        child = Sequence(seq_id, self.token_ids, sampling_params, self.block_size)
        child.needs_host_tokens = self.needs_host_tokens
        child.block_hashes = list(self.block_hashes)  # the same prompt: the same hashes
        return child

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of the sequence (also on a worker's partial copy)."""
        if start < self.token_offset:
            raise IndexError(f"tokens before position {self.token_offset} were not sent with this copy")
        return self.token_ids[start - self.token_offset : end - self.token_offset]

    def __getitem__(self, key):
        return self.token_ids[key]

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_blocks(self) -> int:
        """Blocks needed to hold every token of the sequence."""
        return (self.num_tokens + self.block_size - 1) // self.block_size

    @property
    def last_block_num_tokens(self) -> int:
        return self.num_tokens - (self.num_blocks - 1) * self.block_size

    def block(self, i: int) -> list[int]:
        """Token ids of block `i` (the last one may be partly filled)."""
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range for a sequence of {self.num_blocks} blocks")
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.last_token = token_id
        self.num_tokens += 1

    @property
    def has_pending_token(self) -> bool:
        """Whether the newest token is still being sampled (its value not read back yet)."""
        return self.token_ids[-1] == PLACEHOLDER_TOKEN

    def truncate(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` tokens (drops a token sampled after the sequence stopped)."""
        del self.token_ids[num_tokens:]
        del self.block_hashes[num_tokens // self.block_size :]
        self.num_tokens = num_tokens
        self.last_token = self.token_ids[-1]
        self.num_computed_tokens = min(self.num_computed_tokens, num_tokens)
