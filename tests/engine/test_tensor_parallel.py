"""Tensor parallelism on CPU (gloo): worker processes, shared-memory calls, failures and clean-up."""

import json
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.shared_memory import SharedMemory
from types import SimpleNamespace

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import PLACEHOLDER_TOKEN, Sequence
from nanovllm.engine.tp import SHM_PREFIX, TensorParallelRunner, check_tp_config
from tests.conftest import TINY, generate_spied, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# A small cache (6 blocks of 16 tokens for up to 4 sequences of up to 64 tokens) forces preemption.
ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=10, max_model_len=256, dtype="float32")
TP = dict(tensor_parallel_size=2, tp_timeout_s=20.0, tp_shm_bytes=64 << 10)


def _prompts() -> list[list[int]]:
    # Two prompts share a 32-token prefix (two full blocks): the later one hits the prefix cache.
    base = random_prompts(4, [40, 23, 35, 9], seed=3)
    return base + [base[0][:32] + [7, 8, 9]]


def _our_shm() -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(SHM_PREFIX)]


class TestSharedEngine:
    @pytest.fixture(scope="class")
    @classmethod
    def engines(cls, qwen3_tied):
        """TP=1 reference tokens (computed first: no other engine may start while a TP one lives), and
        one TP=2 engine shared by the tests of this class."""
        with pytest.MonkeyPatch.context() as mp:
            ref = LLM(qwen3_tied, **ENGINE)
            reference = generate_spied(ref, _prompts(), GREEDY, mp)
            ref.exit()
        llm = LLM(qwen3_tied, **ENGINE, **TP)
        yield llm, reference
        llm.exit()

    def test_greedy_tokens_match_tp1(self, engines, monkeypatch):
        llm, (ref_tokens, ref_preempted, ref_cached) = engines
        tokens, preempted, cached = generate_spied(llm, _prompts(), GREEDY, monkeypatch)
        assert ref_preempted and preempted, "the cache was meant to be too small: no preemption happened"
        assert max(cached) >= 32 and max(ref_cached) >= 32, "the shared prefix was meant to hit the cache"
        assert tokens == ref_tokens
        llm.block_manager.check_integrity()

    def test_each_rank_holds_its_shard(self, engines):
        llm, _ = engines
        rank0, rank1 = llm.model_runner.call("param_shapes")
        assert rank0 == rank1
        h, heads, kv, d, inter, vocab = (
            TINY[k]
            for k in (
                "hidden_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "intermediate_size",
                "vocab_size",
            )
        )
        layer = "model.layers.0."
        assert rank1["model.embed_tokens.weight"] == (vocab // 2, h)
        assert rank1[layer + "self_attn.qkv_proj.weight"] == ((heads + 2 * kv) * d // 2, h)
        assert rank1[layer + "self_attn.o_proj.weight"] == (h, heads * d // 2)
        assert rank1[layer + "mlp.gate_up_proj.weight"] == (2 * inter // 2, h)
        assert rank1[layer + "mlp.down_proj.weight"] == (h, inter // 2)
        assert rank1[layer + "input_layernorm.weight"] == (h,)  # replicated

    def test_call_too_big_for_shared_memory(self, engines):
        llm, _ = engines
        with pytest.raises(ValueError, match=r"65536 \(tp_shm_bytes\)"):
            llm.model_runner.call("param_shapes", b"x" * (100 << 10))
        assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"]  # still usable

    def test_one_live_tp_engine_per_process(self, engines, qwen3_tied):
        for tp in (2, 1):
            with pytest.raises(RuntimeError, match="exit"):
                LLM(qwen3_tied, **{**ENGINE, **TP, "tensor_parallel_size": tp})


def test_wire_copy_of_a_sequence_carries_only_uncomputed_tokens():
    """Rank 0 pickles each step's sequences for the workers: a copy must rebuild the step's inputs,
    and a decode step's message holds the block table but no token list."""
    seq = Sequence(7, list(range(100, 150)), SamplingParams(), 16)
    seq.block_table = [3, 1, 4, 1]
    seq.num_computed_tokens = 32  # a prefill chunk from token 32 on
    copy = pickle.loads(pickle.dumps(seq))
    assert copy.token_slice(32, 50) == seq.token_slice(32, 50) == list(range(132, 150))
    assert len(copy.token_ids) == 18
    assert (copy.seq_id, copy.num_tokens, copy.block_table) == (7, 50, [3, 1, 4, 1])
    assert copy.last_block_num_tokens == seq.last_block_num_tokens == 2
    with pytest.raises(IndexError, match="position 32"):
        copy.token_slice(0, 40)

    for length in (100, 5000):
        seq = Sequence(1, [1000 + i for i in range(length)], SamplingParams(), 16)
        seq.append_token(PLACEHOLDER_TOKEN)  # overlap scheduling: the newest token is still on the GPU
        seq.block_table = list(range(1000, 1000 + seq.num_blocks))
        seq.num_computed_tokens = length
        data = pickle.dumps(seq)
        copy = pickle.loads(data)
        assert copy.token_ids == [PLACEHOLDER_TOKEN] and copy.has_pending_token
        assert (copy.num_tokens, copy.last_block_num_tokens) == (length + 1, seq.last_block_num_tokens)
        assert copy.block_table == seq.block_table
        # The block table and a few counters: 3 bytes for each of the 5,000 tokens would be 15 KB more.
        assert len(data) < len(pickle.dumps(seq.block_table)) + 120, len(data)


def test_a_reply_read_while_checking_on_workers_is_kept():
    """A wait checks on the workers each time the reply queue is briefly empty; a reply that arrives
    just then is read by that check and must count, not be dropped (the wait would then time out)."""
    import queue

    runner = TensorParallelRunner.__new__(TensorParallelRunner)  # only the failure-detection state
    runner._queue, runner._failure, runner.processes = queue.Queue(), None, []
    runner._queue.put(("result", 1, "payload of rank 1"))
    replies: dict[int, object] = {}
    runner._check_workers(replies=replies, kind="result")
    assert replies == {1: "payload of rank 1"}
    runner._queue.put(("error", 2, "Traceback ..."))
    with pytest.raises(RuntimeError, match="rank 2 failed"):
        runner._check_workers(replies=replies, kind="result")


def test_engines_one_after_another_leave_nothing(qwen3_tied):
    before = set(_our_shm())
    results = []
    for _ in range(2):
        llm = LLM(qwen3_tied, **ENGINE, **TP)
        assert llm.model_runner._shm.name.startswith(SHM_PREFIX)
        results.append(llm.generate([[5, 6, 7, 8]], GREEDY, use_tqdm=False)[0]["token_ids"])
        llm.exit()
        llm.exit()  # idempotent
    assert results[0] == results[1]
    assert set(_our_shm()) <= before
    assert multiprocessing.active_children() == []


def test_killed_worker_raises_naming_rank(qwen3_tied):
    llm = LLM(qwen3_tied, **ENGINE, **TP)
    worker = llm.model_runner.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1"):
        llm.generate(_prompts(), GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 60
    with pytest.raises(RuntimeError, match="rank 1"):  # and again, without hanging
        llm.generate([[1, 2]], GREEDY, use_tqdm=False)
    llm.exit()
    assert llm.model_runner._shm.name not in _our_shm()
    assert multiprocessing.active_children() == []
    # A new engine can start afterwards.
    again = LLM(qwen3_tied, **ENGINE, tensor_parallel_size=1)
    again.exit()


def test_heads_not_divisible(qwen3_tied):
    with pytest.raises(
        ValueError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(3\)"
    ):
        LLM(qwen3_tied, **ENGINE, tensor_parallel_size=3)
    assert multiprocessing.active_children() == []


def test_check_tp_config():
    cfg = SimpleNamespace(num_attention_heads=24, num_key_value_heads=8, vocab_size=300, intermediate_size=96)
    with pytest.raises(
        ValueError, match=r"num_key_value_heads \(8\) is not divisible by tensor_parallel_size \(3\)"
    ):
        check_tp_config(cfg, 3)
    with pytest.raises(
        ValueError, match=r"vocab_size \(300\) is not divisible by tensor_parallel_size \(8\)"
    ):
        check_tp_config(SimpleNamespace(**{**vars(cfg), "num_attention_heads": 8}), 8)
    check_tp_config(cfg, 4, "cuda", 4)
    with pytest.raises(ValueError, match="needs one GPU per rank, but this machine has 2"):
        check_tp_config(cfg, 4, "cuda", 2)


def test_shm_size_validated(qwen3_tied):
    with pytest.raises(ValueError, match="tp_shm_bytes must be >= 65536"):
        LLM(qwen3_tied, **ENGINE, tensor_parallel_size=2, tp_shm_bytes=1 << 10)


_TWO_AT_ONCE = """
import json, os, sys, time
from nanovllm import LLM, SamplingParams
path, me, other = sys.argv[1], sys.argv[2], sys.argv[3]
llm = LLM(path, kvcache_block_size=16, num_kvcache_blocks=10, max_model_len=256, dtype="float32",
          tensor_parallel_size=2, tp_timeout_s=20.0, tp_shm_bytes=65536)
open(me, "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(other):  # both engines are alive from here on
    assert time.monotonic() < deadline, "the other engine never came up"
    time.sleep(0.05)
out = llm.generate([[5, 6, 7, 8], [9, 10]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                   use_tqdm=False)
print(json.dumps([o["token_ids"] for o in out]))
llm.exit()
"""


def test_two_engines_alive_at_once_in_two_processes(qwen3_tied, tmp_path):
    """What the original's fixed rendezvous port (2333) and shared-memory name ("nanovllm") break: two
    programs with a tensor-parallel engine each, alive at the same time, while something else holds
    that port and a segment of that name."""
    before = set(_our_shm())
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        squatter.bind(("127.0.0.1", 2333))
        squatter.listen()
    except OSError:
        pass  # already in use by someone else: just as good
    shm = SharedMemory(name="nanovllm", create=True, size=4096)
    try:
        flags = [str(tmp_path / "a"), str(tmp_path / "b")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _TWO_AT_ONCE, qwen3_tied, flags[i], flags[1 - i]],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for i in (0, 1)
        ]
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        shm.close()
        shm.unlink()
        squatter.close()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    tokens = [out.strip().splitlines()[-1] for out, _ in outs]
    assert tokens[0] == tokens[1]  # same model, same greedy requests
    ref = LLM(qwen3_tied, **ENGINE)
    expected = ref.generate(
        [[5, 6, 7, 8], [9, 10]],
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        use_tqdm=False,
    )
    ref.exit()
    assert json.loads(tokens[0]) == [o["token_ids"] for o in expected]
    assert set(_our_shm()) <= before


# A tensor-parallel engine whose rank 0 gets SIGINT in the middle of a forward pass (between two of its
# collectives), sent to the whole process group as a terminal's Ctrl-C is: the generate raises
# KeyboardInterrupt, the step in flight completes on every rank, and the same engine then generates
# exactly as before. argv: model dir, which forward call of rank 0's second layer gets the signal.
_INTERRUPTED = """
import json, os, signal, sys
from nanovllm import LLM, SamplingParams
path, at = sys.argv[1], int(sys.argv[2])
llm = LLM(path, kvcache_block_size=16, num_kvcache_blocks=10, max_model_len=256, dtype="float32",
          tensor_parallel_size=2, tp_timeout_s=20.0, tp_shm_bytes=64 << 10)
layer = llm.model_runner.runner.model.model.layers[1]
forward, calls = layer.forward, [0]
def interrupted_forward(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os.killpg(os.getpgrp(), signal.SIGINT)  # rank 0 and its workers, as Ctrl-C in a terminal
    return forward(*args, **kwargs)
layer.forward = interrupted_forward
params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 60))]
try:
    llm.generate(prompts, params, use_tqdm=False)
    interrupted = False
except KeyboardInterrupt:
    interrupted = True
bm = llm.block_manager
bm.check_integrity()
idle = llm.is_finished() and bm.num_free_blocks == bm.num_blocks
after = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
llm.exit()
print(json.dumps({"interrupted": interrupted, "idle": idle, "calls": calls[0], "tokens": after}))
"""


@pytest.mark.parametrize("at", [1, 3, 6])
def test_interrupt_during_a_tensor_parallel_step_leaves_the_engine_usable(qwen3_tied, at):
    ref = LLM(qwen3_tied, **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [
        o["token_ids"]
        for o in ref.generate(
            [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 60))], params, use_tqdm=False
        )
    ]
    ref.exit()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED, qwen3_tied, str(at)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        start_new_session=True,  # its own process group: the signal reaches it and its workers only
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["interrupted"], "the SIGINT did not reach the generate call"
    assert result["idle"], "blocks or requests were left behind by the interrupted generate"
    assert result["tokens"] == expected
