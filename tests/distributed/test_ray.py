"""Data-parallel replicas on Ray (`LLM(model, data_parallel_size=2)`), on a local Ray instance with a few
CPUs started once for this module: outputs equal one engine's per prompt and in order, requests spread by
tokens, a replica killed mid-call loses and duplicates nothing, bad input is refused before dispatch,
exit() leaves no actor; the Ray Data recipe and the data-parallel example run on the tiny model."""

import os
import runpy
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra (in the test extra) is not installed")

from nanovllm import LLM, RequestOutput, SamplingParams  # noqa: E402
from nanovllm.distributed.balance import assign, request_cost  # noqa: E402
from nanovllm.distributed.data_parallel import DataParallelLLM  # noqa: E402
from nanovllm.distributed.dispatcher import Dispatch, Replica  # noqa: E402
from nanovllm.sampling_params import StructuredOutputsParams  # noqa: E402

from ..conftest import random_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
# Ray's logical CPUs: two replicas of one CPU each, and room for a third engine (the Ray Data example).
NUM_CPUS = 4
# CPU replicas (and a CPU plain engine) also where the machine has a GPU.
ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=96, max_model_len=512, device="cpu")
SEED = 1234


@pytest.fixture(scope="module")
def ray_instance():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def plain(qwen3_tied):
    llm = LLM(qwen3_tied, seed=SEED, **ENGINE)
    yield llm
    llm.exit()


@pytest.fixture(scope="module")
def dp(ray_instance, qwen3_tied):
    llm = LLM(qwen3_tied, data_parallel_size=2, seed=SEED, **ENGINE)
    yield llm
    llm.exit()


def process_ends(pid: int, timeout_s: float = 20.0) -> bool:
    """Whether process `pid` is gone (or a zombie) within `timeout_s` (a killed actor exits shortly after)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


def eventually(check, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def replica_names() -> list[str]:
    """The live replica actors on the cluster, every job's (each has a namespace of its own)."""
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
    return sorted(name for name in names if name.startswith("nanovllm-replica-"))


def requests_run(llm) -> list[int]:
    return [ray.get(actor.info.remote())["requests_run"] for actor in llm.replica_actors]


def assert_same(outs: list[RequestOutput], refs: list[RequestOutput]) -> None:
    """Per prompt and in order: the same prompt, tokens, text, finish and (to rounding: another batch)
    log-probabilities as one engine's."""
    assert len(outs) == len(refs)
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert isinstance(out, RequestOutput) and out.finished and out.index == i
        assert (out.prompt, out.prompt_token_ids) == (ref.prompt, ref.prompt_token_ids)
        assert len(out.outputs) == len(ref.outputs)
        for a, b in zip(out.outputs, ref.outputs):
            assert (a.index, a.token_ids, a.text, a.finish_reason, a.stop_reason) == (
                b.index,
                b.token_ids,
                b.text,
                b.finish_reason,
                b.stop_reason,
            ), f"prompt {i}"
            assert (a.logprobs is None) == (b.logprobs is None)
            if a.logprobs is not None:
                assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
                for x, y in zip(a.logprobs, b.logprobs):
                    assert list(x) == list(y)
                    assert [v.logprob for v in x.values()] == pytest.approx(
                        [v.logprob for v in y.values()], abs=1e-4
                    )


def joined(pieces: list[dict]) -> dict[tuple[int, int], tuple[list[int], str, str]]:
    """Stream pieces joined per (prompt, completion): tokens, text, finish reason; each finishes once."""
    acc: dict[tuple[int, int], list] = {}
    for p in pieces:
        entry = acc.setdefault((p["index"], p["completion"]), [[], "", None])
        assert entry[2] is None, f"a piece after the last of {p['index'], p['completion']}"
        entry[0] += p["token_ids"]
        entry[1] += p["text"]
        if p["finished"]:
            entry[2] = p["finish_reason"]
    return {k: (v[0], v[1], v[2]) for k, v in acc.items()}


def expected_pieces(refs: list[RequestOutput]) -> dict[tuple[int, int], tuple[list[int], str, str]]:
    return {
        (i, c.index): (c.token_ids, c.text, c.finish_reason) for i, r in enumerate(refs) for c in r.outputs
    }


# ---- balance ---------------------------------------------------------------------------------------


def test_assign_balances_tokens_not_counts():
    # One request as heavy as the other four together: it runs alone, not round-robin.
    assert assign([400, 100, 100, 100, 100], [0, 0]) == [[0], [1, 2, 3, 4]]
    # Load already carried counts; ties go to the lower replica; shares come back in request order.
    assert assign([5, 5, 5], [10, 0]) == [[2], [0, 1]]
    assert assign([3, 3], [0, 0]) == [[0], [1]]
    # Heaviest first, each to the lightest replica: loads end at 10, 9, 9.
    assert assign([7, 1, 6, 2, 5, 3, 4], [0, 0, 0]) == [[0, 1, 3], [2, 5], [4, 6]]
    with pytest.raises(ValueError, match="no replica"):
        assign([1], [])


def test_request_cost_counts_prompt_and_completions():
    assert request_cost(10, SamplingParams(max_tokens=20), 512) == 30
    assert request_cost(10, SamplingParams(max_tokens=20, n=3), 512) == 70
    assert request_cost(500, SamplingParams(max_tokens=64), 512) == 512  # max_model_len ends it first


def test_a_rerun_that_diverges_is_a_clear_error_naming_both_replicas():
    """A stream's rerun after a lost replica is checked against what was already streamed (no Ray
    needed: the dispatch's bookkeeping alone). Equal: only what is new comes out; different (on a GPU
    another batch can change the numerics): an error saying so, naming the request and replicas."""
    lost = Replica(1, None, {"pid": 11, "node_ip": "10.0.0.2"})
    rerun_on = Replica(0, None, {"pid": 10, "node_ip": "10.0.0.1"})
    dispatch = Dispatch(
        None, [rerun_on, lost], [None, None], [1, 1], ["cmpl-a", "cmpl-b"], "stream", iter([]), 1.0
    )

    def piece(tokens, text, finished=False):
        return {"completion": 0, "token_ids": tokens, "text": text, "finished": finished}

    for pos in (0, 1):
        assert dispatch._new_part(pos, piece([5, 6, 7], "abc"), lost)["token_ids"] == [5, 6, 7]
        dispatch.sent[(pos, 0)].rerun_after(lost.name)
    # The same tokens again: held back until past what was streamed, then only the new ones.
    assert dispatch._new_part(0, piece([5, 6], "ab"), rerun_on) is None
    out = dispatch._new_part(0, piece([7, 8], "cd", finished=True), rerun_on)
    assert out["token_ids"] == [8] and out["text"] == "d" and out["request_id"] == "cmpl-a"
    # Other tokens: the error names the request, both replicas and where the rerun turned off.
    with pytest.raises(RuntimeError) as e:
        dispatch._new_part(1, piece([5, 9], "aX"), rerun_on)
    message = str(e.value)
    assert "'cmpl-b'" in message and "token 1 is 9 in the rerun, 6 as streamed" in message
    assert f"run again on {rerun_on.name} after {lost.name} was lost" in message
    assert "batch" in message and "internal error" not in message


# ---- generate ------------------------------------------------------------------------------------


def test_outputs_equal_one_engine_in_prompt_order(dp, plain):
    assert isinstance(dp, DataParallelLLM) and len(replica_names()) == 2
    prompts = random_prompts(10, [5, 40, 9, 70, 17, 3], vocab=400, seed=3)
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, seed=7, logprobs=2),
        SamplingParams(temperature=1.0, max_tokens=8, seed=3),
        SamplingParams(temperature=0.7, n=2, max_tokens=6, seed=11),
        SamplingParams(temperature=0.0, max_tokens=9, stop_token_ids=[prompts[4][0]], repetition_penalty=1.3),
    ] * 2
    outs = dp.generate(prompts, params, use_tqdm=False)
    assert_same(outs, plain.generate(prompts, params, use_tqdm=False))
    assert len({o.request_id for o in outs}) == len(outs)
    assert all(n > 0 for n in requests_run(dp))  # both replicas took part


def test_text_prompts_and_chat_equal_one_engine(dp, plain):
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = ["Hello, my name is", {"prompt": "Grüße aus München!"}, {"prompt_token_ids": [5, 6, 7]}]
    assert_same(dp.generate(prompts, greedy, use_tqdm=False), plain.generate(prompts, greedy, use_tqdm=False))
    chats = [[{"role": "user", "content": "What is paged attention?"}], [{"role": "user", "content": "你好"}]]
    assert_same(dp.chat(chats, greedy, use_tqdm=False), plain.chat(chats, greedy, use_tqdm=False))
    assert dp.get_default_sampling_params() == plain.get_default_sampling_params()


def test_requests_spread_by_tokens(dp):
    before = requests_run(dp)
    long_one = random_prompts(1, [200], vocab=400, seed=5)
    short = random_prompts(4, [10], vocab=400, seed=6)
    params = [SamplingParams(temperature=0.0, max_tokens=200)] + [
        SamplingParams(temperature=0.0, max_tokens=40)
    ] * 4
    dp.generate(long_one + short, params, use_tqdm=False)
    # 400 tokens against 4 x 50: one replica runs the long request alone (round-robin would give 3 and 2).
    assert sorted(a - b for a, b in zip(requests_run(dp), before)) == [1, 4]


def test_bad_input_is_refused_before_dispatch(dp, plain):
    before = requests_run(dp)
    good = SamplingParams(temperature=0.0, max_tokens=4)
    bad_calls = [
        (ValueError, "empty", lambda: dp.generate(["fine", []], good, use_tqdm=False)),
        (
            ValueError,
            "outside the vocabulary",
            lambda: dp.generate([[1, 2], [3, 10**6]], good, use_tqdm=False),
        ),
        (ValueError, "max_model_len", lambda: dp.generate(["ok", [1] * 600], good, use_tqdm=False)),
        (
            ValueError,
            "KV blocks",
            lambda: dp.generate(["ok"], SamplingParams(n=100, max_tokens=5), use_tqdm=False),
        ),
        (ValueError, "sampling params for", lambda: dp.generate(["a", "b"], [good], use_tqdm=False)),
        (TypeError, "SamplingParams", lambda: dp.generate(["a"], {"max_tokens": 3}, use_tqdm=False)),
        (TypeError, "token ids must be ints", lambda: dp.generate([[1, 2.5]], good, use_tqdm=False)),
        (ValueError, "logit_bias", lambda: dp.generate(["a"], SamplingParams(logit_bias={10**6: 1.0}))),
        (
            ValueError,
            "regex",
            lambda: dp.generate(["a"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="("))),
        ),
        (ValueError, "empty", lambda: list(dp.stream(["a", ""], good))),
    ]
    for kind, words, call in bad_calls:
        with pytest.raises(kind, match=words):
            call()
    assert requests_run(dp) == before  # nothing reached a replica
    outs = dp.generate(["Hello", "world"], good, use_tqdm=False)  # still serving
    assert_same(outs, plain.generate(["Hello", "world"], good, use_tqdm=False))


def test_engine_arguments_are_checked_before_ray(qwen3_tied):
    with pytest.raises(ValueError, match="data_parallel_size must be >= 1"):
        LLM(qwen3_tied, data_parallel_size=0)
    with pytest.raises(TypeError, match="data_parallel_size must be an int"):
        LLM(qwen3_tied, data_parallel_size="2")
    with pytest.raises(TypeError, match="unknown engine argument"):
        LLM(qwen3_tied, data_parallel_size=2, no_such_option=1)
    with pytest.raises(ValueError, match="names one GPU"):
        LLM(qwen3_tied, data_parallel_size=2, device="cuda:1")


def test_replicas_that_do_not_fit_are_refused_at_once(dp, qwen3_tied):
    t = time.monotonic()
    with pytest.raises(ValueError, match=r"can hold only 4 such replicas"):
        LLM(qwen3_tied, data_parallel_size=NUM_CPUS + 1, **ENGINE)
    assert time.monotonic() - t < 10
    assert len(replica_names()) == 2


def test_ray_address_names_the_cluster(ray_instance, qwen3_tied):
    """A program with RAY_ADDRESS set runs its replicas on that cluster (this module's instance), not on a
    local instance of its own."""
    import subprocess

    address = ray.get_runtime_context().gcs_address
    script = (
        "import ray\n"
        "from nanovllm import LLM, SamplingParams\n"
        f"llm = LLM({qwen3_tied!r}, data_parallel_size=2, **{ENGINE!r})\n"
        "print('address', ray.get_runtime_context().gcs_address)\n"
        "names = [n['name'] for n in ray.util.list_named_actors(all_namespaces=True)]\n"
        "print('replicas', sum(n.startswith('nanovllm-replica-') for n in names))\n"
        "out = llm.generate(['Hello'], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)\n"
        "print('tokens', len(out[0].outputs[0].token_ids))\n"
        "llm.exit()\n"
    )
    env = dict(os.environ, RAY_ADDRESS=address, TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert lines["address"] == address
    assert lines["replicas"] == "4"  # this module's two and the program's two, on one cluster
    assert lines["tokens"] == "4"
    assert eventually(lambda: len(replica_names()) == 2)  # its exit() removed its two


# ---- stream --------------------------------------------------------------------------------------


def test_stream_pieces_join_to_one_engines_outputs(dp, plain):
    prompts = random_prompts(6, [4, 30, 11], vocab=400, seed=8)
    params = [SamplingParams(temperature=0.8, max_tokens=9, seed=i, n=1 + i % 2) for i in range(6)]
    pieces = list(dp.stream(prompts, params))
    assert joined(pieces) == expected_pieces(plain.generate(prompts, params, use_tqdm=False))
    ids = {p["index"]: p["request_id"] for p in pieces}
    assert len(set(ids.values())) == 6 and all(p["request_id"] == ids[p["index"]] for p in pieces)


def test_stream_closed_early_and_abort(dp, plain):
    before = sum(requests_run(dp))
    it = dp.stream(random_prompts(4, [8], vocab=400, seed=9), SamplingParams(temperature=0.0, max_tokens=300))
    first = next(it)
    it.close()  # aborts what is left on the replicas
    assert first["index"] in range(4)
    # abort_request by the id a piece carries: that request comes back aborted, the others finish.
    prompts = random_prompts(3, [8], vocab=400, seed=10)
    it = dp.stream(prompts, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    victim = None
    pieces = []
    for piece in it:
        pieces.append(piece)
        if victim is None:
            victim = piece
            dp.abort_request(piece["request_id"])
    done = joined(pieces)
    assert done[(victim["index"], 0)][2] == "abort"
    assert [done[(i, 0)][2] for i in range(3) if i != victim["index"]] == ["length", "length"]
    assert sum(requests_run(dp)) == before + 7
    good = SamplingParams(temperature=0.0, max_tokens=5)
    assert_same(dp.generate(["again"], good, use_tqdm=False), plain.generate(["again"], good, use_tqdm=False))


# ---- losing a replica, exit ----------------------------------------------------------------------


def reseed(llm) -> None:
    """Unseeded requests draw their seeds from the engine seed in order: restart a plain engine's draws,
    to match a new data-parallel LLM's."""
    llm._seed_rng.seed(SEED)


def test_killed_replica_reruns_elsewhere_then_fails_clearly_and_exit_frees_all(
    ray_instance, qwen3_tied, plain
):
    others = set(replica_names())
    llm = LLM(qwen3_tied, data_parallel_size=2, seed=SEED, **ENGINE)
    mine = set(replica_names()) - others
    assert len(mine) == 2
    pids = [r.info["pid"] for r in llm.replicas]
    prompts = random_prompts(8, [6, 25], vocab=400, seed=12)
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 0.8, max_tokens=40, ignore_eos=True) for i in range(8)
    ]
    reseed(plain)  # unseeded requests (temperature 0.8) draw the same seeds as this new LLM's
    refs = plain.generate(prompts, params, use_tqdm=False)

    # generate: kill replica 1 once it runs its share; its unfinished requests run on replica 0.
    victim = llm.replicas[1]
    result: list = []
    thread = threading.Thread(target=lambda: result.append(llm.generate(prompts, params, use_tqdm=False)))
    thread.start()
    deadline = time.monotonic() + 30
    while not any(r is victim for r, _ in list(llm._placed.values())) and time.monotonic() < deadline:
        time.sleep(0.001)
    ray.kill(victim.actor)
    thread.join(60)
    assert not thread.is_alive() and result, "generate did not return"
    assert_same(result[0], refs)
    assert victim.lost is not None and "killed" in victim.lost
    assert len(llm.replica_actors) == 1

    # stream: kill the last replica mid-stream: a clear error naming it, no hang, then a refusal.
    it = llm.stream(prompts, params)
    next(it)
    ray.kill(llm.replicas[0].actor)
    t = time.monotonic()
    with pytest.raises(
        RuntimeError, match=r"replica 0 \(pid \d+ on node .*\) was lost .* no replica is left"
    ):
        list(it)
    assert time.monotonic() - t < 30
    with pytest.raises(RuntimeError, match="every replica of this LLM has been lost"):
        llm.generate(prompts, params, use_tqdm=False)
    llm.exit()
    llm.exit()  # idempotent
    assert mine.isdisjoint(replica_names())
    assert all(process_ends(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="exited"):
        llm.generate(["a"], use_tqdm=False)


def test_stream_rerun_continues_where_it_stopped(ray_instance, qwen3_tied, plain):
    others = set(replica_names())
    llm = LLM(qwen3_tied, data_parallel_size=2, seed=SEED, **ENGINE)
    mine = set(replica_names()) - others
    prompts = random_prompts(6, [7, 20], vocab=400, seed=13)
    params = [
        SamplingParams(temperature=0.9, max_tokens=48, ignore_eos=True, seed=100 + i, n=1 + i % 2)
        for i in range(6)
    ]
    refs = plain.generate(prompts, params, use_tqdm=False)
    pieces = []
    for piece in llm.stream(prompts, params):
        pieces.append(piece)
        if len(pieces) == 4:
            ray.kill(llm.replicas[1].actor)
    assert llm.replicas[1].lost is not None  # it was lost with requests unfinished
    assert joined(pieces) == expected_pieces(refs)  # nothing lost, nothing twice
    pids = [r.info["pid"] for r in llm.replicas]
    llm.exit()
    assert mine.isdisjoint(replica_names())
    assert all(process_ends(pid) for pid in pids)
    # Only the module's two replicas hold CPUs once the placement groups are gone (removal is asynchronous).
    assert eventually(lambda: ray.available_resources().get("CPU", 0) == NUM_CPUS - 2)


# ---- examples ------------------------------------------------------------------------------------


def run_script(path: Path, args: list[str], capsys) -> str:
    argv = sys.argv
    sys.argv = [str(path), *args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = argv
    return capsys.readouterr().out


def test_data_parallel_example(ray_instance, qwen3_tied, capsys):
    out = run_script(
        ROOT / "examples" / "offline_inference" / "data_parallel.py",
        ["--model", qwen3_tied, "--max-model-len", "512", "--num-kvcache-blocks", "64", "--device", "cpu"],
        capsys,
    )
    lines = [line for line in out.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == 8 and lines[0].startswith("Prompt: 'Hello, my name is', Generated text: ")


def test_ray_data_example(ray_instance, qwen3_tied, plain, capsys):
    out = run_script(
        ROOT / "examples" / "ray_data_inference.py",
        [
            "--model",
            qwen3_tied,
            "--num-rows",
            "8",
            "--concurrency",
            "2",
            "--batch-size",
            "3",
            "--max-tokens",
            "6",
        ],
        capsys,
    )
    rows = [line for line in out.splitlines() if line.startswith("Prompt: ")]
    assert len(rows) == 8
    from nanovllm.distributed.ray_data import LLMPredictor  # noqa: F401 (what the example maps with)

    prompts = sorted({line.split("'")[1] for line in rows})
    refs = plain.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    expected = {f"Prompt: {p!r}, Generated text: {r.outputs[0].text!r}" for p, r in zip(prompts, refs)}
    assert set(rows) == expected
