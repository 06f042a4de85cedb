"""The offline engine: tokenizes requests, schedules steps and runs them on the model."""

import atexit
import itertools
from collections.abc import Sequence as SequenceABC
from time import perf_counter

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm.config import make_config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.models.registry import resolve_architecture
from nanovllm.sampling_params import SamplingParams

Prompt = str | list[int]


class LLMEngine:
    def __init__(self, model: str, **kwargs):
        config = make_config(model, kwargs)
        resolve_architecture(config.hf_config)  # refuse unsupported models before loading anything
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, use_fast=True)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = getattr(config.hf_config, "eos_token_id", None)
            if isinstance(eos, list):
                eos = eos[0] if eos else None
        config.eos = -1 if eos is None else eos
        self.vocab_size = config.hf_config.vocab_size
        self._exited = False
        self.model_runner = ModelRunner(config)
        self.block_manager = BlockManager(config.num_kvcache_blocks, config.kvcache_block_size)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, eos,
                                   self.block_manager, config.max_model_len)
        self._inflight = None  # (LaunchedBatch, StepResult) of a step not yet read back
        self._seq_ids = itertools.count()
        self._seqs: dict[int, Sequence] = {}
        atexit.register(self.exit)

    # ---- lifecycle ---------------------------------------------------------------------------

    def exit(self) -> None:
        """Release the model, the KV cache and any worker; safe to call more than once."""
        if self._exited:
            return
        self._exited = True
        atexit.unregister(self.exit)
        self._inflight = None
        self.model_runner.exit()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.exit()

    def _check_alive(self) -> None:
        if self._exited:
            raise RuntimeError("this engine has exited; create a new LLM to generate again")

    # ---- requests ----------------------------------------------------------------------------

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, SequenceABC) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            token_ids = list(prompt)
        else:
            raise TypeError(f"a prompt must be a string or a list of token ids (ints), got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if len(token_ids) > self.config.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, more than max_model_len="
                             f"{self.config.max_model_len}")
        return token_ids

    def _make_sequence(self, prompt: Prompt, sampling_params: SamplingParams) -> Sequence:
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        token_ids = self._tokenize(prompt)
        bs = self.config.kvcache_block_size
        longest = min(len(token_ids) + sampling_params.max_tokens, self.config.max_model_len)
        needed = (longest + bs - 1) // bs
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"a request of {len(token_ids)} prompt tokens and max_tokens={sampling_params.max_tokens} can "
                f"need {needed} KV blocks of {bs} tokens, but the cache has only {self.block_manager.num_blocks}"
            )
        return Sequence(next(self._seq_ids), token_ids, sampling_params, bs)

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams) -> int:
        """Queue one request; returns its sequence id."""
        self._check_alive()
        seq = self._make_sequence(prompt, sampling_params)
        self._seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def abort_request(self, seq_id: int) -> None:
        """Drop a queued or running request and free its KV blocks."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise ValueError(f"no unfinished request with id {seq_id}")
        self.scheduler.abort(seq)

    # ---- stepping ----------------------------------------------------------------------------

    def step(self) -> tuple[list[tuple[int, list[int]]], int]:
        """Run one step. Returns the requests that finished in it as (seq_id, completion token ids),
        and the tokens processed: positive for a prefill step, minus the batch size for decode.

        With overlap scheduling the step is launched on the GPU and the previous step's tokens are
        read back while it runs, so a request can be reported one call after its last step.
        """
        self._check_alive()
        finished = []
        batch = self.scheduler.try_schedule()
        if batch is None and self._inflight is not None:
            # Nothing can start until the step in flight is read back (it may free blocks).
            finished += self._finalize_inflight()
            batch = self.scheduler.try_schedule()
        if batch is None:
            if self.scheduler.is_finished():
                return self._outputs(finished), 0
            raise RuntimeError("scheduler has no sequence to run although requests are pending")
        result = self.model_runner.launch(batch)
        launched = self.scheduler.on_launched(batch)
        finished += self._finalize_inflight()
        self._inflight = (launched, result)
        if not self.config.overlap_scheduling or not self.scheduler.has_unlaunched_work():
            finished += self._finalize_inflight()
        num_tokens = batch.num_tokens if batch.is_prefill else -len(batch.seqs)
        return self._outputs(finished), num_tokens

    def _finalize_inflight(self) -> list[Sequence]:
        if self._inflight is None:
            return []
        launched, result = self._inflight
        self._inflight = None
        return self.scheduler.finalize(launched, result.tolist())

    def _outputs(self, finished: list[Sequence]) -> list[tuple[int, list[int]]]:
        outputs = []
        for seq in finished:
            self._seqs.pop(seq.seq_id, None)
            outputs.append((seq.seq_id, seq.completion_token_ids))
        return outputs

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and self._inflight is None

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[dict]:
        """Complete every prompt; returns `{"text", "token_ids"}` per prompt, in prompt order."""
        self._check_alive()
        if isinstance(prompts, str) or not isinstance(prompts, SequenceABC):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        if isinstance(sampling_params, SequenceABC):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        # Validate every request before queueing any, so a bad one leaves nothing behind.
        seqs = [self._make_sequence(p, sp) for p, sp in zip(prompts, params)]
        order = {}
        for i, seq in enumerate(seqs):
            order[seq.seq_id] = i
            self._seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        results: list[list[int] | None] = [None] * len(seqs)
        pbar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            remaining = len(seqs)
            while remaining:
                t = perf_counter()
                finished, num_tokens = self.step()
                dt = perf_counter() - t
                if num_tokens > 0:
                    prefill_tps = num_tokens / dt
                else:
                    decode_tps = -num_tokens / dt
                pbar.set_postfix(Prefill=f"{int(prefill_tps)}tok/s", Decode=f"{int(decode_tps)}tok/s")
                for seq_id, token_ids in finished:
                    if seq_id in order:
                        results[order[seq_id]] = token_ids
                        remaining -= 1
                        pbar.update(1)
        except BaseException:
            self._inflight = None  # its tokens belong to requests aborted below
            for seq in seqs:
                if seq.seq_id in self._seqs:
                    self.abort_request(seq.seq_id)
            raise
        finally:
            pbar.close()
        return [{"text": self.tokenizer.decode(ids), "token_ids": ids} for ids in results]
