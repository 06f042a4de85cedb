"""Runs the model: builds per-step inputs, owns the KV cache, the sampler and the CUDA graphs."""

import gc
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import xxhash

from nanovllm.attention import select_backend
from nanovllm.config import Config
from nanovllm.engine.cuda_graph import graph_batch_sizes
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.kernels.paged_attention import default_num_splits
from nanovllm.layers.attention import Attention
from nanovllm.layers.logits_processor import LogitsProcessors
from nanovllm.layers.rotary_embedding import RotaryEmbedding, rope_lengths
from nanovllm.layers.sampler import Sampler, SamplingTensors
from nanovllm.models.registry import get_model_class, resolve_architecture
from nanovllm.structured_output.manager import apply_token_bitmask
from nanovllm.utils.compile import enable_compilation
from nanovllm.utils.context import AttentionMetadata, ForwardContext
from nanovllm.utils.loader import load_weights
from nanovllm.utils.parallel import get_tp_rank, get_tp_size

logger = logging.getLogger(__name__)

# Most live sequences with penalties, biases or masks at once (each holds ~9 bytes per vocabulary
# entry on the device while it lives: 1.4 MB at 151,936 tokens).
MAX_PROCESSED_SEQS = 1 << 16

# Prefill block tables are padded with -1 to a multiple of this many columns. Triton specializes an integer
# argument on being 1 and on being divisible by 16, and the table's row stride (its width) is an argument
# of the paged prefill kernel: unpadded, widths 1, 2-15 and multiples of 16 would be three compiled
# variants, each compiled by the first step that meets it (seconds on a cold Triton cache, inside a timed
# run). Padded, every width is one variant, which start-up compiles (`_warmup_cache_reads`).
PREFILL_TABLE_COLUMNS = 16


@dataclass(slots=True)
class TokenLogprobs:
    """One row's log-probabilities at one position: the chosen token's (sampled, or the prompt's next
    token) with its rank in the distribution (1 = most likely), and the `len(top_ids)` most likely."""

    token: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


class StepResult:
    """Sampled tokens (and asked-for log-probabilities) of a launched step, read back on demand. On
    CUDA they are copied into pinned host memory without blocking and an event marks their arrival."""

    def __init__(self, device_tensors: dict[str, torch.Tensor], on_cuda: bool, prompt_logprobs=None):
        self._event = None
        if on_cuda:
            host = {
                k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in device_tensors.items()
            }
            for k, v in device_tensors.items():
                host[k].copy_(v, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._tensors = host
        else:
            self._tensors = device_tensors
        # {row of batch.seqs: [TokenLogprobs per prompt position]}; small and rare: read back eagerly
        self._prompt_logprobs = prompt_logprobs or {}

    def _wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def tolist(self) -> list[int]:
        self._wait()
        return self._tensors["tokens"].tolist()

    def logprobs(self) -> list[TokenLogprobs] | None:
        """Per row: the sampled token's log-probability and rank and the top N, or None if no row asked
        for log-probabilities."""
        self._wait()
        if "sampled_logprobs" not in self._tensors:
            return None
        return _token_logprobs(
            self._tensors["tokens"],
            self._tensors["sampled_logprobs"],
            self._tensors["sampled_ranks"],
            self._tensors["top_ids"],
            self._tensors["top_logprobs"],
        )

    def prompt_logprobs(self) -> dict[int, list[TokenLogprobs]]:
        return self._prompt_logprobs


def _token_logprobs(tokens, logprobs, ranks, top_ids, top_logprobs) -> list[TokenLogprobs]:
    return [
        TokenLogprobs(t, lp, r, ids, lps)
        for t, lp, r, ids, lps in zip(
            tokens.tolist(), logprobs.tolist(), ranks.tolist(), top_ids.tolist(), top_logprobs.tolist()
        )
    ]


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, num_top: int) -> dict[str, torch.Tensor]:
    """Log-probabilities of `tokens` [rows] under `logits` [rows, vocab], their ranks (1 = most likely;
    ties share the better rank) and the `num_top` most likely tokens of each row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [rows, vocab]
    chosen = logprobs.gather(1, tokens.unsqueeze(1))  # [rows, 1]
    out = {
        "sampled_logprobs": chosen.squeeze(1),
        "sampled_ranks": (logprobs > chosen).sum(dim=-1) + 1,
    }
    out["top_logprobs"], out["top_ids"] = logprobs.topk(num_top, dim=-1)
    return out


def _readable(table: list[int]) -> list[int]:
    """A block table whose released leading entries (sliding window, -1) name block 0 instead: no
    kernel reads them, but every entry before a table's end is then a valid block id for any reader."""
    return [max(b, 0) for b in table] if table and table[0] < 0 else table


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelRunner:
    def __init__(self, config: Config):
        self.config = config
        self.block_size = config.kvcache_block_size
        # Tensor parallelism: the process group (if any) is set up before the runner is built.
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        # The KV cache's element type: the compute dtype, or e4m3 for kv_cache_dtype 'fp8' / 'fp8_e4m3'.
        self.kv_cache_dtype = torch.float8_e4m3fn if config.kv_cache_dtype.startswith("fp8") else self.dtype
        self.backend = select_backend(
            config.attention_backend, self.device, self.dtype, self.kv_cache_dtype, self.block_size
        )
        self.backend.check_block_size(self.block_size)
        self.backend.check_dtype(self.dtype)
        self.backend.check_kv_cache_dtype(self.kv_cache_dtype, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        hf_config = config.hf_config
        model_cls = get_model_class(resolve_architecture(hf_config))
        quant_config = config.quant_config
        with torch.device(self.device), _default_dtype(self.dtype):
            if quant_config is None:
                self.model = model_cls(hf_config)
            else:
                # Fused layers are skipped or quantized by their checkpoint parts' names.
                quant_config.packed_modules_mapping = dict(getattr(model_cls, "packed_modules_mapping", {}))
                self.model = model_cls(hf_config, quant_config=quant_config)
        load_weights(self.model, config)
        self.model.eval()
        use_compile = config.torch_compile if config.torch_compile is not None else self.device.type == "cuda"
        if use_compile:
            enable_compilation()
        self.vocab_size = hf_config.vocab_size
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        # Dynamic / longrope: prefill steps give each token the sequence length of its frequencies.
        self.rope_needs_lengths = any(
            isinstance(m, RotaryEmbedding) and m.length_dependent for m in self.model.modules()
        )
        self.forward_context = ForwardContext()  # this runner's own: engines never share step metadata
        for layer in self.attention_layers:
            layer.backend = self.backend
            layer.forward_context = self.forward_context
        self.sampler = Sampler()
        self.stop_ids = frozenset(config.eos_token_ids)  # min_tokens keeps these from being sampled
        # State for every live sequence that has penalties, biases or masks, preempted ones included.
        self.logits_processors = LogitsProcessors(self.vocab_size, self.device, MAX_PROCESSED_SEQS)
        self.max_num_blocks_per_seq = (config.max_model_len + self.block_size - 1) // self.block_size
        self.graph_batch_sizes = graph_batch_sizes(config.max_num_seqs)  # also decode's split-K buckets
        self.kv_cache = torch.tensor([])
        self.graph_runner = None
        self._prev_tokens = torch.empty(0, dtype=torch.int64, device=self.device)
        self._prev_rows: dict[int, int] = {}
        if self.device.type == "cuda":
            self._warmup()
        self._allocate_kv_cache()
        if self.device.type == "cuda":
            self._warmup_cache_reads()
        if self.device.type == "cuda" and not config.enforce_eager:
            if self.backend.supports_cuda_graphs:
                from nanovllm.engine.cuda_graph import CUDAGraphRunner

                self.graph_runner = CUDAGraphRunner(
                    self.model,
                    config.max_num_seqs,
                    self.max_num_blocks_per_seq,
                    hf_config.hidden_size,
                    self.dtype,
                    self.device,
                    self.decode_num_splits,
                    self.forward_context,
                )
            else:
                logger.info(
                    "attention backend %r cannot be captured in CUDA graphs: decoding eagerly",
                    self.backend.name,
                )

    # ---- start-up ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _warmup(self) -> None:
        """Run the largest prefill batch once, so the KV-cache sizing sees the peak activation memory."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg = self.config
        seq_len = min(cfg.max_model_len, cfg.max_num_batched_tokens)
        num_seqs = max(1, min(cfg.max_num_batched_tokens // seq_len, cfg.max_num_seqs))
        from nanovllm.sampling_params import SamplingParams

        seqs = [Sequence(-1, [0] * seq_len, SamplingParams(), self.block_size) for _ in range(num_seqs)]
        self.run(ScheduledBatch("prefill", seqs, [seq_len] * num_seqs))
        # The largest decode batch computes logits and samples for max_num_seqs rows at once.
        hidden = torch.zeros(
            cfg.max_num_seqs, self.config.hf_config.hidden_size, dtype=self.dtype, device=self.device
        )
        logits = self.model.compute_logits(hidden)  # None on tensor-parallel workers
        if logits is not None:
            self.sampler.warm_up(logits)
        torch.cuda.synchronize()
        # Return the activations' memory to the driver: the cache sizing counts the peak separately, so
        # memory still held in PyTorch's cache would be counted twice, as used and as peak.
        del hidden, logits
        torch.cuda.empty_cache()

    @torch.inference_mode()
    def _warmup_cache_reads(self) -> None:
        """Run one prefill step through the KV cache, so that the kernel variants only such a step uses
        are compiled at start-up, not by the first step that needs them: `_warmup` runs before the cache
        exists, so its prefill neither stores K/V (the cache-storing q/k-norm + rope) nor reads them back
        (the paged prefill attention, which every prefill with an FP8 cache and every chunk after a
        cached prefix runs). One sequence of two tokens in block 0, the first taken as cached; the
        block is zeroed again afterwards."""
        if self.config.max_model_len < 2 or self.kv_cache.numel() == 0:
            return
        from nanovllm.sampling_params import SamplingParams

        seq = Sequence(-1, [0, 0], SamplingParams(), self.block_size)
        seq.block_table = [0]
        seq.num_computed_tokens = 1
        self.run(ScheduledBatch("prefill", [seq], [1]))
        cache = self.kv_cache.view(torch.uint8) if self.kv_cache.element_size() == 1 else self.kv_cache
        cache[:, :, 0].zero_()

    def _bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        elem = self.kv_cache_dtype.itemsize  # FP8: one byte, so twice the blocks of bf16 in one budget
        return 2 * len(self.attention_layers) * self.block_size * layer.num_kv_heads * layer.head_dim * elem

    def _allocate_kv_cache(self) -> None:
        cfg = self.config
        block_bytes = self._bytes_per_block()
        if cfg.num_kvcache_blocks == -1:
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                used = total - free
                stats = torch.cuda.memory_stats(self.device)
                peak = stats["allocated_bytes.all.peak"]
                current = stats["allocated_bytes.all.current"]
                budget = int(total * cfg.gpu_memory_utilization) - used - peak + current
                num_blocks = budget // block_bytes
                if self.tp_size > 1:  # every rank must hold the same number of blocks
                    agreed = torch.tensor([num_blocks], dtype=torch.int64, device=self.device)
                    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
                    num_blocks = int(agreed.item())
                if num_blocks < 1:
                    raise ValueError(
                        f"no GPU memory left for the KV cache: the budget is {budget / 2**30:.2f} GiB "
                        f"after the model and activations (gpu_memory_utilization="
                        f"{cfg.gpu_memory_utilization}); one block needs {block_bytes / 2**20:.1f} MiB"
                    )
            else:
                # No useful free-memory figure on a CPU: spend a fixed budget, but never more than
                # max_num_seqs full-length sequences could use.
                enough = cfg.max_num_seqs * self.max_num_blocks_per_seq
                num_blocks = max(1, min(cfg.cpu_kvcache_bytes // block_bytes, enough))
            cfg.num_kvcache_blocks = int(num_blocks)
        layer = self.attention_layers[0]
        # [K/V, layers, blocks, block_size, kv_heads, head_dim]. Zeroed: attention may load slots past a
        # sequence's end (masked out), and uninitialised memory can hold NaNs, which a mask does not undo.
        self.kv_cache = torch.zeros(
            2,
            len(self.attention_layers),
            cfg.num_kvcache_blocks,
            self.block_size,
            layer.num_kv_heads,
            layer.head_dim,
            # FP8: allocated and copied as bytes (zero bytes are 0.0 in e4m3; not every op has FP8 kernels)
            dtype=torch.uint8 if self.kv_cache_dtype.itemsize == 1 else self.kv_cache_dtype,
            device=self.device,
        ).view(self.kv_cache_dtype)
        for i, attn in enumerate(self.attention_layers):
            attn.k_cache = self.kv_cache[0, i]
            attn.v_cache = self.kv_cache[1, i]
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB)",
            cfg.num_kvcache_blocks,
            self.block_size,
            self.kv_cache.numel() * self.kv_cache.element_size() / 2**30,
        )

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """This rank's parameter shapes by name (with tensor parallelism: its shards)."""
        return {name: tuple(p.shape) for name, p in self.model.named_parameters()}

    def exit(self) -> None:
        """Free the CUDA graphs, the KV cache and the weights."""
        self.graph_runner = None
        for attn in self.attention_layers:
            attn.k_cache = attn.v_cache = torch.tensor([])
        self.kv_cache = torch.tensor([])
        self.attention_layers = []
        self.model = None
        self._prev_tokens = torch.empty(0, dtype=torch.int64)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # ---- per-step inputs ---------------------------------------------------------------------

    def _to_device(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.tensor(data, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)
        return torch.tensor(data, dtype=dtype)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slots of token positions [start, end) of `seq`."""
        if not seq.block_table:  # warm-up before the cache exists
            return [-1] * (end - start)
        bs = self.block_size
        slots: list[int] = []
        for i in range(start // bs, (end - 1) // bs + 1):
            base = seq.block_table[i] * bs
            slots.extend(range(base + max(start, i * bs) - i * bs, base + min(end, (i + 1) * bs) - i * bs))
        return slots

    def block_tables_tensor(self, seqs: list[Sequence], width: int | None = None) -> torch.Tensor:
        """Block tables padded with -1 to `width` columns (default: the longest table)."""
        width = width or max(len(seq.block_table) for seq in seqs)
        tables = [_readable(seq.block_table) + [-1] * (width - len(seq.block_table)) for seq in seqs]
        return self._to_device(tables, torch.int32)

    def prepare_prefill(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        cu_q, cu_k = [0], [0]
        seqlens_q, seqlens_k = [], []
        lengths: list[int] = []
        has_prefix = False
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids.extend(seq.token_slice(start, end))
            positions.extend(range(start, end))
            if self.rope_needs_lengths:
                lengths.extend(rope_lengths(start, end, seq.num_prompt_tokens))
            slot_mapping.extend(self._slots(seq, start, end))
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + end)
            seqlens_q.append(n)
            seqlens_k.append(end)
            has_prefix |= start > 0
        reads_cache = has_prefix or self._prefill_reads_cache()  # K/V from the paged cache
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=self._to_device(slot_mapping, torch.int64),
            cu_seqlens_q=self._to_device(cu_q, torch.int32),
            cu_seqlens_k=self._to_device(cu_k, torch.int32),
            max_seqlen_q=max(seqlens_q),
            max_seqlen_k=max(seqlens_k),
            block_tables=self._prefill_block_tables(batch.seqs) if reads_cache else None,
            seqlens_q=seqlens_q,
            seqlens_k=seqlens_k,
            rope_lengths=self._to_device(lengths, torch.int64) if self.rope_needs_lengths else None,
        )
        return self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64), meta

    def _prefill_block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """The block tables of a prefill step, -1 padded to a multiple of PREFILL_TABLE_COLUMNS columns."""
        width = max(len(seq.block_table) for seq in seqs)
        return self.block_tables_tensor(seqs, -(-width // PREFILL_TABLE_COLUMNS) * PREFILL_TABLE_COLUMNS)

    def _prefill_reads_cache(self) -> bool:
        """An FP8 cache is read back in every prefill (not only with a cached prefix), so a prompt's
        attention sees the same quantized K/V whether or not its prefix was cached, as decode does."""
        return self.kv_cache_dtype != self.dtype and self.kv_cache.numel() > 0

    def prepare_decode(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        seqs = batch.seqs
        positions = [seq.num_tokens - 1 for seq in seqs]
        context_lens = [seq.num_tokens for seq in seqs]
        slot_mapping = [seq.block_table[-1] * self.block_size + seq.last_block_num_tokens - 1 for seq in seqs]
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=self._to_device(slot_mapping, torch.int64),
            context_lens=self._to_device(context_lens, torch.int32),
            # Full width, as in the CUDA graphs: flash-attn places its split-K boundaries by the table
            # width, so eager and graph decoding then sum in the same order.
            block_tables=self.block_tables_tensor(seqs, self.max_num_blocks_per_seq),
            max_seqlen_k=max(context_lens),
            seqlens_q=[1] * len(seqs),
            seqlens_k=context_lens,
            num_splits=self.decode_num_splits(len(seqs)),
        )
        return self._decode_input_ids(seqs), self._to_device(positions, torch.int64), meta

    def decode_num_splits(self, batch_size: int) -> int:
        """Split-K factor for a decode batch, the same whether or not it runs in a CUDA graph: chosen
        for the graph bucket the batch falls in and the full block-table width."""
        bucket = next((s for s in self.graph_batch_sizes if s >= batch_size), batch_size)
        layer = self.attention_layers[0]
        return default_num_splits(
            self.device, bucket, layer.num_kv_heads, self.max_num_blocks_per_seq, self.block_size
        )

    def _decode_input_ids(self, seqs: list[Sequence]) -> torch.Tensor:
        """Each sequence's newest token. A token still being sampled by the previous step (overlap
        scheduling) is taken from that step's output on the device, never read back to the host."""
        if not any(seq.has_pending_token for seq in seqs):
            return self._to_device([seq.last_token for seq in seqs], torch.int64)
        rows = self._prev_rows
        if all(seq.has_pending_token for seq in seqs):
            return self._prev_tokens[self._to_device([rows[seq.seq_id] for seq in seqs], torch.int64)]
        host = self._to_device([seq.last_token for seq in seqs], torch.int64)
        pending = self._to_device([seq.has_pending_token for seq in seqs], torch.bool)
        src = self._to_device([rows.get(seq.seq_id, 0) for seq in seqs], torch.int64)
        return torch.where(pending, self._prev_tokens[src], host)

    # ---- running -----------------------------------------------------------------------------

    @torch.inference_mode()
    def run_model(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, prompt_rows=()
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits at each sequence's last new token `[num_seqs, vocab]` and, for the prefill rows in
        `prompt_rows`, at every new token of theirs `[their new tokens, vocab]` (else None). On a
        tensor-parallel worker both are None (the logits gather on rank 0)."""
        if (
            not meta.is_prefill
            and self.graph_runner is not None
            and self.graph_runner.can_run(input_ids.numel())
        ):
            hidden = self.graph_runner.replay(input_ids, positions, meta)
        else:
            with self.forward_context.set(meta):
                hidden = self.model(input_ids, positions)  # [num_tokens, hidden]
        prompt_logits = None
        if meta.is_prefill:
            if prompt_rows:
                cu = meta.cu_seqlens_q.tolist()
                index = [i for r in prompt_rows for i in range(cu[r], cu[r + 1])]
                prompt_logits = self.model.compute_logits(hidden[self._to_device(index, torch.int64)])
            hidden = hidden[meta.cu_seqlens_q[1:].long() - 1]  # [num_seqs, hidden]
        return self.model.compute_logits(hidden), prompt_logits

    def sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        """Per-row sampling settings; seeds and truncation only when some row uses them."""
        params = [seq.params for seq in seqs]
        st = SamplingTensors(
            self._to_device([p.temperature for p in params], torch.float32),
            all_greedy=all(p.temperature == 0 for p in params),
        )
        if any(p.seed is not None for p in params):
            keys = []
            for seq, p in zip(seqs, params):
                if p.seed is None:
                    key = random.getrandbits(64)
                else:  # depends only on the seed and which completion token is being drawn
                    key = xxhash.xxh64_intdigest(f"{p.seed}:{seq.num_completion_tokens}".encode())
                keys.append([key & 0xFFFFFFFF, key >> 32])
            st.keys = self._to_device(keys, torch.int64)
        if any(p.needs_truncation for p in params):
            st.top_k = self._to_device(
                [p.top_k if p.top_k > 0 else self.vocab_size for p in params], torch.int64
            )
            st.top_p = self._to_device([p.top_p for p in params], torch.float32)
            st.min_p = self._to_device([p.min_p for p in params], torch.float32)
        return st

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, token_bitmask=None) -> StepResult | None:
        """Start one scheduled step; its sampled tokens (one per row of `batch.rows`) come from the
        result. Tensor-parallel workers run the same step (their logits gather on rank 0), receive rank
        0's tokens for their next decode inputs, and return None. `token_bitmask` (rank 0): the
        `TokenBitmask` of the rows whose completion follows a grammar (structured outputs)."""
        prepare = self.prepare_prefill if batch.is_prefill else self.prepare_decode
        input_ids, positions, meta = prepare(batch)
        rows = batch.rows
        if self.tp_rank == 0:
            if token_bitmask is not None:  # its copy to the device overlaps the forward below
                token_bitmask = token_bitmask.to(self.device)
            sampling = self.sampling_tensors(rows)
            adjust = self.logits_processors.prepare(rows, self.stop_ids)
            logits, prompt_logits = self.run_model(input_ids, positions, meta, batch.prompt_logprob_rows)
            if batch.forks:  # a fork samples from its parent's logits
                logits = logits[self._to_device(batch.logit_rows, torch.int64)]
            raw_logits = logits
            if adjust is not None:
                logits = self.logits_processors.apply(logits, adjust)
            if token_bitmask is not None:
                if logits is raw_logits and any(seq.params.logprobs is not None for seq in rows):
                    logits = logits.clone()  # the mask works in place; logprobs read the raw logits
                apply_token_bitmask(logits, token_bitmask)
            tokens = self.sampler(logits, sampling)
            if adjust is not None:
                self.logits_processors.record(adjust, tokens)
        else:
            self.run_model(input_ids, positions, meta, batch.prompt_logprob_rows)
            tokens = torch.empty(len(rows), dtype=torch.int64, device=self.device)
        self._copy_blocks(batch.block_copies)
        if self.tp_size > 1:
            dist.broadcast(tokens, src=0)
            if self.tp_rank > 0:
                self._remember_tokens(batch, tokens)
                return None
        out = {"tokens": tokens}
        wanted = [seq.params.logprobs for seq in rows if seq.params.logprobs is not None]
        if wanted:
            out |= logprobs_of(raw_logits, tokens, min(max(wanted), raw_logits.shape[-1]))
        prompt = self._prompt_logprobs(batch, prompt_logits) if prompt_logits is not None else None
        result = StepResult(out, self.device.type == "cuda", prompt)
        self._remember_tokens(batch, tokens)  # last: a step that raised above must not be remembered
        return result

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks (every layer, K and V): a fork's own copy of its parent's last block."""
        if copies:
            src = self._to_device([s for s, _ in copies], torch.int64)
            dst = self._to_device([d for _, d in copies], torch.int64)
            cache = self.kv_cache.view(torch.uint8) if self.kv_cache.element_size() == 1 else self.kv_cache
            cache[:, :, dst] = cache[:, :, src]  # [2, layers, copies, block, heads, dim]

    def _prompt_logprobs(self, batch: ScheduledBatch, logits: torch.Tensor) -> dict[int, list[TokenLogprobs]]:
        """Log-probabilities of each prompt token given the ones before it, for the new tokens of the rows
        that asked: the logits at position p score the prompt's token p + 1 (the last prompt position
        scores the first completion token: not a prompt log-probability)."""
        result: dict[int, list[TokenLogprobs]] = {}
        offset = 0
        for r in batch.prompt_logprob_rows:
            seq, n = batch.seqs[r], batch.num_new_tokens[r]
            start = seq.num_computed_tokens
            end = min(start + n, seq.num_prompt_tokens - 1)  # positions whose next token is in the prompt
            count = max(0, end - start)
            if count:
                targets = self._to_device(seq.token_slice(start + 1, end + 1), torch.int64)
                num_top = min(seq.params.prompt_logprobs, logits.shape[-1])
                lp = logprobs_of(logits[offset : offset + count], targets, num_top)
                result[r] = _token_logprobs(
                    targets, lp["sampled_logprobs"], lp["sampled_ranks"], lp["top_ids"], lp["top_logprobs"]
                )
            else:
                result[r] = []
            offset += n
        return result

    def release_sequences(self, seq_ids) -> None:
        """Forget the per-sequence sampling state of finished or aborted sequences."""
        self.logits_processors.release(seq_ids)

    def _remember_tokens(self, batch: ScheduledBatch, tokens: torch.Tensor) -> None:
        """Keep the sampled tokens on the device: the next decode step reads those the host has not
        seen yet (overlap scheduling) from here."""
        self._prev_tokens = tokens
        self._prev_rows = {seq.seq_id: i for i, seq in enumerate(batch.rows)}

    def run(self, batch: ScheduledBatch) -> list[int] | None:
        """Run one scheduled step and return one sampled token per sequence (None on a worker)."""
        result = self.launch(batch)
        return None if result is None else result.tolist()
