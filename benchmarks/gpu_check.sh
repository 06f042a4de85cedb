#!/usr/bin/env bash
# Everything to check and time on the lent GPU in one call; prints a short table last.
#   bash benchmarks/gpu_check.sh [tests | tests-engine tests-models] [kernels] [bench] [bench-extra] [baseline] [peers]
#                                [tp-tests] [tp-small] [tp-8b] [structured] [serve] [moe | moe-tests moe-kernel moe-bench]
#                                [int4 | int4-tests int4-bench] [int4-8b] [long] [long-vllm]   (default: tests kernels bench)
#                                [tests-shards] [latency] [vllm-stage] [vllm-peers] [moe-vllm] [fp8-vllm]
#                                [fp8 | fp8-tests fp8-bench] [fp8-sweep] [gemm] [structured-mask] [int4-gemm] [compile-log]
#                                [tune-prefill] [tune-attention] [profile-fp8] [quant-8b] [gemv-sweep] [int4-mid]
#                                [profile-b1] [skinny-ab]
# `tests-shards` runs the whole GPU suite as six pytest processes at once (SHARDS="engine models" picks some),
# each verbose (a test per line, so a run that TEST_TIMEOUT cuts still names what passed) and bounded by
# TEST_TIMEOUT seconds (default 500).
# vLLM (a peer, never a dependency) comes from ../shared/vllm-bundle in up to three calls on a warm machine:
# carry its parts as .vb1/ (chunk.aa), .vb2/ (chunk.ab, SHA256SUMS, install.sh) and .vbmoe/
# (optional_moe_C.tar.xz), one or two per call, each call starting with `vllm-stage`, which keeps what
# came in /root/vllm_bundle, installs vLLM once every chunk is there and adds the MoE kernels when they come.
# `vllm-peers` then times vLLM on the reference workload and single stream; `moe-vllm` on the 30B-A3B shapes.
# `long`: the long-context GPU tests and bench_long_context.py (128K prompt, 16 x 32K, decode kernel at 32K/128K,
# a sliding-window model's blocks vs length); `long-vllm` the same requests through vLLM (bundle installed).
# `int4` runs the AWQ/GPTQ GPU tests and bench_w4a16.py --sweep (a few minutes each); `int4-8b` times batch-1 decode
# steps of Qwen3-8B shapes in bf16 and AWQ (builds the 16 GB bf16 checkpoint first) and bench.py on both.
# `moe` runs the MoE GPU tests, the fused MoE layer alone (bench_moe.py --sweep) and bench.py on the
# Qwen3-30B-A3B shape (random weights drawn on the GPU, nothing written to disk; about 61 GB of GPU memory).
# `structured` needs xgrammar (and pydantic, apache-tvm-ffi) on the GPU machine: carry them as wheels.
# The tp-* parts need 2 or more GPUs: tp-small and tp-8b time bench.py at tensor_parallel_size 1, 2 (and 4
# where there are 4 GPUs) on Qwen3-0.6B and Qwen3-8B shapes, the collectives alone (bench_allreduce.py)
# and decode steps (profile_step.py). tp-8b first builds the 16 GB random checkpoint (about a minute).
# `baseline` runs bench.py and the single-stream latency of an older commit in the same call, for a
# same-card comparison (run `bench` or `latency` beside it for this commit's figures): export it
# here first with `mkdir -p .baseline && git archive REV | tar -x -C .baseline` and carry `.baseline`.
# Results go to $OUT (the device tool's output folder) or benchmarks/results/latest; with more than 8 files there
# (all the device tool brings back) they are packed into $OUT/results.tar.gz beside summary.txt.
# flash-attn is picked up from .fa/ when that folder exists (a test tool, never a dependency).
set -uo pipefail
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.fa:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NANOVLLM_CACHE=${NANOVLLM_CACHE:-/tmp/nanovllm-cache}
parts=${*:-tests kernels bench}
# moe, int4 and fp8 each stand for their parts (in this run, so that the summary and the packing of $OUT stay one)
parts=$(echo " $parts " | sed -E 's/ moe / moe-tests moe-kernel moe-bench /; s/ int4 / int4-tests int4-bench /;
  s/ fp8 / fp8-tests fp8-bench /')
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
summary=()
carried_wheels() {  # xgrammar, jsonschema and their needs, carried as wheels in .whl/ (the machine lacks them)
  # Build .whl here (43 MB; it covers the structured-output, token-bitmask and server tests; openai 3.57+ needs httpx2):
  #   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
  #     xgrammar apache-tvm-ffi jsonschema jsonschema-specifications referencing rpds-py attrs pydantic \
  #     pydantic-core typing-inspection annotated-types fastapi starlette uvicorn h11 anyio sniffio click \
  #     openai httpx httpcore distro jiter httpx2 httpcore2 truststore idna certifi
  # --no-deps into a folder of its own: pip would otherwise look for torch in .whl and give up. The folder
  # goes after the machine's own packages (a .pth file in its site-packages; PYTHONPATH would come first and
  # let a carried wheel shadow an installed one), on PYTHONPATH's end only where that is not writable.
  if [ -d .whl ] && ! python3 -c "import xgrammar, jsonschema" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
    purelib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo /tmp/site 2>/dev/null > "$purelib/nanovllm_carried_wheels.pth" || export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
}
vllm_env() {  # run a command with the bundle's vLLM importable (and kept off the network)
  PYTHONPATH="/root/vllm_site:$PYTHONPATH" VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 "$@"
}
for part in $parts; do
  case $part in
    tests)  # the whole GPU suite takes over 6 minutes: tests-engine and tests-models split it in two
      python3 -m pytest -q -m cuda tests 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25
      summary+=("tests: $(tail -1 "$OUT/pytest_cuda.log")") ;;
    tests-engine)
      python3 -m pytest -q -m cuda tests --ignore=tests/models 2>&1 | tee "$OUT/pytest_cuda_engine.log" | tail -25
      summary+=("tests (all but tests/models): $(tail -1 "$OUT/pytest_cuda_engine.log")") ;;
    tests-models)
      python3 -m pytest -q -m cuda tests/models 2>&1 | tee "$OUT/pytest_cuda_models.log" | tail -25
      summary+=("tests/models: $(tail -1 "$OUT/pytest_cuda_models.log")") ;;
    tests-shards)
      carried_wheels
      t=${TEST_TIMEOUT:-500}
      # SIGINT first: pytest then prints its summary and the tests' finally blocks free their engines
      pt=(timeout -s INT -k 30 "$t" python3 -m pytest -v --durations=12 --continue-on-collection-errors -m cuda)
      # one test sizes the KV cache from the whole GPU's free memory: it runs alone, after the shards
      alone=tests/engine/test_gpu.py::test_kv_cache_sized_from_gpu_memory
      # tests/kernels alone outlasted the others by minutes: its slowest files (the 8B-shaped W4A16 and MoE
      # kernels, the windowed kernels) are a shard of their own
      slow=(tests/kernels/test_w4a16.py tests/kernels/test_fused_moe.py tests/kernels/test_window_kernels.py)
      shards=${SHARDS:-kernels_slow kernels quant engine models rest}  # SHARDS="engine models": those only
      declare -A args=(
        [kernels_slow]="${slow[*]}"
        [kernels]="tests/kernels ${slow[*]/#/--ignore=}"
        [quant]="tests/quantization tests/layers tests/structured_output"
        [engine]="tests/engine --deselect $alone"  # engine and models were one shard of about 400 s
        [models]="tests/models"
        [rest]="tests --ignore=tests/kernels --ignore=tests/quantization --ignore=tests/layers
                --ignore=tests/structured_output --ignore=tests/engine --ignore=tests/models"
      )
      for shard in $shards; do
        # shellcheck disable=SC2086  # each shard's arguments are words
        "${pt[@]}" ${args[$shard]} > "$OUT/pytest_shard_$shard.log" 2>&1 &
      done
      wait
      "${pt[@]}" "$alone" > "$OUT/pytest_shard_alone.log" 2>&1
      for shard in $shards alone; do
        log="$OUT/pytest_shard_$shard.log"
        grep -E "(FAILED|ERROR)( |$)" "$log" | grep "::" | head -20
        summary+=("tests $shard: $(grep -c ' PASSED' "$log") passed, $(grep -c ' FAILED' "$log") failed, \
$(grep -c ' ERROR' "$log") errors, $(grep -c ' SKIPPED' "$log") skipped; last: $(tail -1 "$log")")
      done ;;
    gemm)  # small-batch GEMMs: the skinny kernel against cuBLAS
      python3 benchmarks/bench_gemm.py --json "$OUT/gemm.json" 2>&1 | tee "$OUT/gemm.log" | tail -40
      summary+=("gemm: see gemm.log") ;;
    structured-mask)  # the mask kernel's GPU tests and its cost alone (no workload runs)
      carried_wheels
      python3 -m pytest -q -m cuda tests/kernels/test_token_bitmask.py 2>&1 | tee "$OUT/pytest_mask.log" | tail -3
      summary+=("mask tests: $(tail -1 "$OUT/pytest_mask.log")")
      python3 benchmarks/bench_structured.py --mask-only --json "$OUT/structured_mask.json" 2>&1 | grep -v Warn \
        | tee "$OUT/structured_mask.log" | tail -3
      summary+=("structured: $(grep -E '^mask 256' "$OUT/structured_mask.log")") ;;
    compile-log)  # Triton compiles after start-up, by phase (first in a call on a fresh machine: a cold cache)
      python3 benchmarks/compile_log.py 2>&1 | grep -vi warn | tee "$OUT/compile_log.log" \
        | grep -E "^(phase|compile \[(ref|every|the))"
      summary+=("compiles: $(grep -E '^phase' "$OUT/compile_log.log" | paste -sd';')") ;;
    latency)  # single stream, Qwen3-0.6B shapes: prompt 256, 512 tokens
      python3 benchmarks/bench_latency.py --model qwen3-0.6b-random --prompt-len 256 --output-len 512 \
        --json "$OUT/latency.json" 2>&1 | tee "$OUT/latency.log" | tail -4
      summary+=("latency: $(grep "^Latency" "$OUT/latency.log")") ;;
    vllm-stage)
      mkdir -p /root/vllm_bundle
      for d in .vb1 .vb2 .vbmoe; do [ -d $d ] && cp $d/* /root/vllm_bundle/; done
      ls /root/vllm_bundle
      if [ ! -d /root/vllm_site/vllm ] && [ -f /root/vllm_bundle/chunk.aa ] && [ -f /root/vllm_bundle/chunk.ab ]; then
        bash /root/vllm_bundle/install.sh 2>&1 | tail -4
      fi
      if [ -d /root/vllm_site/vllm ] && [ -f /root/vllm_bundle/optional_moe_C.tar.xz ] \
          && ! ls /root/vllm_site/vllm/_moe_C* >/dev/null 2>&1; then
        tar -xJf /root/vllm_bundle/optional_moe_C.tar.xz -C /root/vllm_site && ls /root/vllm_site/vllm/_moe_C*
      fi
      summary+=("vllm: $([ -d /root/vllm_site/vllm ] && echo installed || echo 'not installed yet')") ;;
    vllm-peers)  # vLLM on the reference workload and single stream (after vllm-stage installed it)
      vllm_env python3 bench.py --engine vllm --json "$OUT/bench_vllm.json" 2>&1 | tee "$OUT/bench_vllm.log" \
        | grep -E "^(Floor|Total)"
      summary+=("bench vllm: $(grep -E '^(Total|Floor)' "$OUT/bench_vllm.log" | paste -sd';')")
      vllm_env python3 benchmarks/bench_latency.py --engine vllm --model qwen3-0.6b-random --prompt-len 256 \
        --output-len 512 --json "$OUT/latency_vllm.json" 2>&1 | tee "$OUT/latency_vllm.log" | grep "^Latency"
      summary+=("latency vllm: $(grep "^Latency" "$OUT/latency_vllm.log")") ;;
    moe-vllm)  # vLLM on the Qwen3-30B-A3B shapes (dummy weights; needs the bundle's MoE kernels, .vbmoe)
      vllm_env python3 bench.py --engine vllm --model qwen3-30b-a3b-random --json "$OUT/bench_moe_vllm.json" \
        2>&1 | tee "$OUT/bench_moe_vllm.log" | grep -E "^(Mixture|Floor|Total)"
      summary+=("bench vllm qwen3-30b-a3b-random: $(grep -E '^(Total|Floor)' "$OUT/bench_moe_vllm.log" | paste -sd';')") ;;
    kernels)
      python3 benchmarks/bench_attention.py --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | tail -30
      python3 benchmarks/bench_sampler.py 2>&1 | tee "$OUT/sampler.log" | tail -6
      python3 benchmarks/sampler_parts.py 2>&1 | grep -v Warning | tee "$OUT/sampler_parts.log"
      summary+=("kernels: see attention.log and sampler.log") ;;
    bench)
      for backend in triton flash-attn; do
        python3 bench.py --attention-backend $backend --json "$OUT/bench_$backend.json" 2>&1 \
          | tee "$OUT/bench_$backend.log" | grep -v "Generating" | tail -12
        summary+=("bench $backend: $(grep '^Total:' "$OUT/bench_$backend.log" | tail -1)")
      done ;;
    bench-extra)
      for opts in "--enforce-eager" "--no-overlap" "--shared-prefix 512"; do
        name=$(echo "$opts" | tr -d ' -')
        python3 bench.py --attention-backend triton $opts --json "$OUT/bench_$name.json" 2>&1 \
          | tee "$OUT/bench_$name.log" | grep -E "^(Total|Floor)"
        summary+=("bench triton $opts: $(grep '^Total:' "$OUT/bench_$name.log" | tail -1)")
      done
      python3 benchmarks/profile_step.py --attention-backend triton 2>&1 | tail -7
      python3 benchmarks/profile_step.py --attention-backend triton --no-overlap 2>&1 | tail -7 ;;
    baseline)
      if [ -f .baseline/bench.py ]; then
        PYTHONPATH="$PWD/.fa:$PWD/.baseline" python3 .baseline/bench.py --attention-backend triton \
          --json "$OUT/bench_baseline.json" 2>&1 | tee "$OUT/bench_baseline.log" | grep -E "^(Total|Floor)"
        summary+=("bench baseline (.baseline): $(grep '^Total:' "$OUT/bench_baseline.log" | tail -1)")
        PYTHONPATH="$PWD/.fa:$PWD/.baseline" python3 .baseline/benchmarks/bench_latency.py --model qwen3-0.6b-random \
          --prompt-len 256 --output-len 512 --json "$OUT/latency_baseline.json" 2>&1 | tee "$OUT/latency_baseline.log" \
          | grep "^Latency"
        summary+=("latency baseline (.baseline): $(grep "^Latency" "$OUT/latency_baseline.log")")
      else
        summary+=("baseline: no .baseline/bench.py (see the header of this script)")
      fi ;;
    tp-tests)
      python3 -m pytest -q -m cuda tests/engine/test_tp_gpu.py "tests/engine/test_gpu.py::test_kv_cache_sized_from_gpu_memory" \
        2>&1 | tee "$OUT/pytest_tp.log" | tail -15
      summary+=("tp tests: $(tail -1 "$OUT/pytest_tp.log")") ;;
    tp-small|tp-8b)
      model=$([ "$part" = tp-8b ] && echo qwen3-8b-random || echo qwen3-0.6b-random)
      gpus=$(nvidia-smi -L | wc -l)
      python3 benchmarks/bench_allreduce.py --model $model -tp "$gpus" --json "$OUT/allreduce_$part.json" 2>&1 \
        | tee "$OUT/allreduce_$part.log"
      for tp in 1 2 4; do
        [ "$tp" -le "$gpus" ] || continue
        python3 bench.py --model $model --attention-backend triton -tp $tp --json "$OUT/bench_${part}_tp$tp.json" \
          2>&1 | tee "$OUT/bench_${part}_tp$tp.log" | grep -E "^(Decode|Floor|GPU|Total)"
        summary+=("bench $model tp=$tp: $(grep '^Total:' "$OUT/bench_${part}_tp$tp.log" | tail -1)")
        python3 benchmarks/profile_step.py --model $model --attention-backend triton -tp $tp --steps 30 \
          2>&1 | tail -6 | tee "$OUT/profile_${part}_tp$tp.log"
        summary+=("decode step $model tp=$tp: $(grep -E '^(step wall|forward)' "$OUT/profile_${part}_tp$tp.log" | tr -s ' ' | paste -sd';')")
      done ;;
    structured)  # the mask kernel's GPU tests, its cost, and 10% JSON-constrained requests beside the plain workload
      carried_wheels
      python3 -m pytest -q -m cuda tests/kernels/test_token_bitmask.py tests/structured_output 2>&1 \
        | tee "$OUT/pytest_structured.log" | tail -5
      summary+=("structured tests: $(tail -1 "$OUT/pytest_structured.log")")
      python3 benchmarks/bench_structured.py --json "$OUT/structured.json" 2>&1 | grep -v Warn \
        | tee "$OUT/structured.log" | tail -16
      summary+=("structured: $(grep -E '^mask 256|^ +mixed:|^mixed - alone' "$OUT/structured.log" | paste -sd';')") ;;
    serve)  # OpenAI server: bench_serving.py at concurrency 1/16/64/256, nano-vllm then vllm serve (bundle)
      bash benchmarks/bench_serving_gpu.sh "$OUT" 2>&1 | tee "$OUT/serve.log" | grep -vE "^(TPOT|ITL|TTFT)"
      summary+=("serve: $(grep -cE '^(nano-vllm|vllm) ' "$OUT/serve.log") runs; see serving.jsonl, serve.log") ;;
    moe-tests)
      python3 -m pytest -q -m cuda tests/models/test_moe.py tests/kernels/test_fused_moe.py 2>&1 \
        | tee "$OUT/pytest_moe.log" | tail -15
      summary+=("moe tests: $(tail -1 "$OUT/pytest_moe.log")") ;;
    moe-kernel)
      python3 benchmarks/bench_moe.py --sweep --json "$OUT/moe_kernel.json" 2>&1 | tee "$OUT/moe_kernel.log" | tail -40
      summary+=("moe kernel: $(grep '^summary:' "$OUT/moe_kernel.log")") ;;
    moe-bench)
      python3 bench.py --model qwen3-30b-a3b-random --attention-backend triton --json "$OUT/bench_moe.json" 2>&1 \
        | tee "$OUT/bench_moe.log" | grep -E "^(Decode|Mixture|Floor|GPU|Total|Breakdown|  )"
      summary+=("bench qwen3-30b-a3b-random: $(grep -E '^(Total|Floor)' "$OUT/bench_moe.log" | paste -sd';')") ;;
    int4-tests)  # the W4A16 kernel at 8B shapes and in a CUDA graph; the engine on AWQ/GPTQ checkpoints
      python3 -m pytest -q -m cuda tests/kernels/test_w4a16.py tests/quantization/test_int4_gpu.py 2>&1 \
        | tee "$OUT/pytest_int4.log" | tail -15
      summary+=("int4 tests: $(tail -1 "$OUT/pytest_int4.log")") ;;
    int4-bench|int4-gemm)  # the GEMMs alone at Qwen3-8B shapes against bf16 (int4-bench: then a sweep of configs)
      python3 benchmarks/bench_w4a16.py $([ "$part" = int4-bench ] && echo --sweep) --json "$OUT/w4a16.json" 2>&1 | tee "$OUT/w4a16.log" | tail -90
      summary+=("w4a16: $(grep '^goal' "$OUT/w4a16.log")") ;;
    int4-mid)  # W4A16 at 128 rows (INT4_MID_M="128,256": both): the decode launch (split-K, tl.dot) against the
      # default (dequantize + cuBLAS). Both row counts on four shapes outlasted a 600 s call after other parts.
      python3 benchmarks/bench_w4a16.py --sweep --sweep-m "${INT4_MID_M:-128}" --json "$OUT/w4a16_mid.json" 2>&1 \
        | tee "$OUT/w4a16_mid.log" | grep -E -A3 "^sweep|^ +[a-z_]* *[0-9]+x[0-9]+ +(128|256) "
      summary+=("w4a16 mid-batch sweep: see w4a16_mid.log") ;;
    gemv-sweep)  # the W4A16 GEMV's launch grid alone at 1 and 2 rows (with and without prefetch), after the GEMM table
      python3 benchmarks/bench_w4a16.py --sweep --sweep-family gemv --sweep-m 1,2 --json "$OUT/w4a16_gemv.json" 2>&1 \
        | tee "$OUT/w4a16_gemv.log" | grep -A3 "^sweep"
      summary+=("w4a16 gemv sweep: see w4a16_gemv.log") ;;
    int4-8b)  # single-stream decode steps, bf16 vs AWQ, then the reference workload in AWQ and bf16 (Qwen3-8B shapes)
      for model in qwen3-8b-random qwen3-8b-awq-random; do
        python3 benchmarks/profile_step.py --model $model --attention-backend triton --num-seqs 1 --context 256 \
          --steps 100 2>&1 | tail -7 | tee "$OUT/profile_int4_$model.log"
        summary+=("batch 1 $model: $(grep -E '^(step wall|forward)' "$OUT/profile_int4_$model.log" | tr -s ' ' | paste -sd';')")
      done
      for model in qwen3-8b-awq-random qwen3-8b-random; do
        python3 bench.py --model $model --attention-backend triton --json "$OUT/bench_int4_$model.json" 2>&1 \
          | tee "$OUT/bench_int4_$model.log" | grep -E "^(Decode|Floor|GPU|Total|Breakdown|  )"
        summary+=("bench $model: $(grep -E '^(Total|Floor)' "$OUT/bench_int4_$model.log" | paste -sd';')")
      done ;;
    long)  # long context: windowed kernels, rope scalings and windows end to end, bench_long_context.py (~6 min)
      python3 -m pytest -q -m cuda tests/kernels/test_window_kernels.py tests/models/test_long_context.py 2>&1 \
        | tee "$OUT/pytest_long.log" | tail -15
      summary+=("long tests: $(tail -1 "$OUT/pytest_long.log")")
      python3 benchmarks/bench_long_context.py --attention-backend triton --json "$OUT/long_context.json" 2>&1 \
        | grep -v "Loading weights" | tee "$OUT/long_context.log" | tail -12
      summary+=("long: $(grep -E '^(long|batch|decode kernel 1 x 131072)' "$OUT/long_context.log" | paste -sd';')") ;;
    long-vllm)  # the same long/batch parts through vLLM (install the bundle first, see its README)
      # One process per part: vLLM's engine core keeps its GPU memory until its process ends, so a second
      # LLM in the same process would find the card full. A limit above the checkpoint's
      # max_position_embeddings is what yarn is for; vLLM asks for this variable to accept one.
      for vpart in long batch; do
        VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 vllm_env python3 benchmarks/bench_long_context.py --engine vllm \
          --parts $vpart --json "$OUT/long_context_vllm_$vpart.json" 2>&1 | grep -vE "Loading weights|INFO|WARNING" \
          | tee "$OUT/long_context_vllm_$vpart.log" | tail -6
        summary+=("long vllm $vpart: $(grep -E '^(long|batch)' "$OUT/long_context_vllm_$vpart.log" | paste -sd';')")
      done ;;
    ray)  # Ray replicas: their tests (CPU replicas) and bench_ray.py, plain engine vs one Ray replica on one GPU
      # Ray is not on the GPU machine: carry .raywheel/ray312_site.tar.xz (Ray 2.60 for cp312, 39 MB, unpacked
      # onto PYTHONPATH after the machine's own packages). Build it here: `pip download --no-deps
      # --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 ray==2.60.0 msgpack protobuf
      # click jsonschema jsonschema-specifications referencing rpds-py attrs`, `pip install --no-deps --target
      # site` those wheels, delete site/ray/jars and site/ray/rllib, then `tar -cJf ray312_site.tar.xz -C site .`
      # (the whole wheel, 79 MB, is over one call's 64 MiB carry).
      if ! python3 -c "import ray" 2>/dev/null && [ -f .raywheel/ray312_site.tar.xz ]; then
        mkdir -p /tmp/ray_site && tar -xJf .raywheel/ray312_site.tar.xz -C /tmp/ray_site
        export PYTHONPATH="$PYTHONPATH:/tmp/ray_site"
      fi
      # (the Ray Data test needs pyarrow and pandas, which the carried Ray lacks)
      python3 -m pytest -q tests/distributed/test_ray.py -k "not ray_data" 2>&1 | tee "$OUT/pytest_ray.log" | tail -5
      summary+=("ray tests: $(tail -1 "$OUT/pytest_ray.log")")
      python3 benchmarks/bench_ray.py --model qwen3-0.6b-random --device cuda --replicas 1 --num-prompts 256 \
        --min-input-len 100 --max-input-len 1024 --min-output-len 100 --max-output-len 1024 --repeats 1 \
        --json "$OUT/bench_ray.json" 2>&1 | grep -E "^(plain|ray)" | tee "$OUT/bench_ray.log"
      summary+=("bench_ray: $(paste -sd';' "$OUT/bench_ray.log")") ;;
    fp8-tests)  # FP8 (issue 19): the GPU tests (`fp8` = these and fp8-bench)
      python3 -m pytest -q -m cuda tests/quantization/test_fp8.py tests/kernels/test_fp8_gemm.py \
        tests/kernels/test_fp8_kv.py 2>&1 | tee "$OUT/pytest_fp8.log" | tail -15
      summary+=("fp8 tests: $(tail -1 "$OUT/pytest_fp8.log")") ;;
    fp8-bench)  # the GEMMs and accuracy (bench_fp8.py), bench.py in bf16 and with FP8 KV / weights (same call)
      python3 benchmarks/bench_fp8.py gemm accuracy --json "$OUT/fp8.json" 2>&1 | tee "$OUT/bench_fp8.log" \
        | grep -vi warn | tail -75
      summary+=("fp8 accuracy: $(grep '^accuracy' "$OUT/bench_fp8.log" | tr -s ' ' | paste -sd';')")
      for opts in "" "--kv-cache-dtype fp8" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8"; do
        name=fp8$(echo "${opts:---bf16}" | tr -d ' -')
        python3 bench.py --attention-backend triton $opts --json "$OUT/bench_$name.json" 2>&1 \
          | tee "$OUT/bench_$name.log" | grep -E "^(Decode must|Floor|Total)"
        summary+=("bench $opts: $(grep -E '^(Total|Floor)' "$OUT/bench_$name.log" | paste -sd';')")
      done ;;
    fp8-sweep)  # launch configurations of the block-scaled FP8 GEMM (the tunables of kernels/fp8_gemm.py)
      python3 benchmarks/bench_fp8.py sweep --json "$OUT/fp8_sweep.json" 2>&1 | tee "$OUT/fp8_sweep.log" | tail -32
      summary+=("fp8 sweep: see fp8_sweep.log") ;;
    fp8-vllm)  # vLLM with its FP8 KV cache (and FP8 weights) on the reference workload (install the bundle first)
      for opts in "--kv-cache-dtype fp8" "--quantization fp8 --kv-cache-dtype fp8"; do
        name=vllm_fp8$(echo "$opts" | tr -d ' -')
        vllm_env python3 bench.py --engine vllm $opts --json "$OUT/bench_$name.json" 2>&1 | tee "$OUT/bench_$name.log" \
          | grep -E "^(Floor|Total)"
        summary+=("bench vllm $opts: $(grep -E '^(Total|Floor)' "$OUT/bench_$name.log" | paste -sd';')")
      done ;;
    tune-prefill)  # the prefill attention's tunables at the engine's prefill shapes (tune_prefill.py, ~3 min)
      python3 benchmarks/tune_prefill.py --json "$OUT/tune_prefill.json" 2>&1 | tee "$OUT/tune_prefill.log" | tail -40
      summary+=("tune prefill: $(grep -E '^(whole|best)' "$OUT/tune_prefill.log" | paste -sd';')") ;;
    tune-attention)  # the decode attention's kernel configurations with an FP8 cache (TUNE_KV=auto: bf16), ~3 min
      python3 benchmarks/tune_attention.py --kernel-only --kv-cache-dtype "${TUNE_KV:-fp8}" \
        --json "$OUT/tune_attention_${TUNE_KV:-fp8}.json" 2>&1 | tee "$OUT/tune_attention.log" | tail -8
      summary+=("tune attention ${TUNE_KV:-fp8}: see tune_attention.log") ;;
    profile-fp8)  # decode steps at batch 256, FP8 cache then bf16, with the kernels of 5 steps listed
      for kv in fp8 auto; do
        python3 benchmarks/profile_step.py --attention-backend triton --kv-cache-dtype $kv --steps 30 \
          --torch-profile /tmp/trace_$kv.json --top-kernels 12 2>&1 | grep -vi warn | tee "$OUT/profile_b256_$kv.log" \
          | grep -E "^(Decode|step wall|forward|bandwidth|_decode|_store)"
        summary+=("decode step b256 kv $kv: $(grep -E '^(forward|bandwidth)' "$OUT/profile_b256_$kv.log" | tr -s ' ' | paste -sd';')")
      done ;;
    skinny-ab)  # a switch of kernels/skinny_gemm.py (SKINNY_FLAG, default ENGINE_ONE_LAUNCH_ADD_NORM; or
      # ENGINE_FUSE_SILU_MUL) off and on: the skinny GPU tests, then single stream alternating, twice each
      # (one process per run: graphs capture the setting)
      flag=${SKINNY_FLAG:-ENGINE_ONE_LAUNCH_ADD_NORM}
      python3 -m pytest -q -m cuda tests/kernels/test_skinny_gemm.py 2>&1 | tee "$OUT/pytest_skinny.log" | tail -3
      summary+=("skinny tests: $(tail -1 "$OUT/pytest_skinny.log")")
      for on in False True False True; do
        python3 - "$flag" "$on" <<'PY' 2>&1 | grep "^Latency" | sed "s/^/$flag $on: /" | tee -a "$OUT/skinny_ab.log"
import runpy, sys
import nanovllm.kernels.skinny_gemm as skinny
assert hasattr(skinny, sys.argv[1]), sys.argv[1]
setattr(skinny, sys.argv[1], sys.argv[2] == "True")
sys.argv = ["bench_latency.py", "--model", "qwen3-0.6b-random", "--prompt-len", "256", "--output-len", "512"]
runpy.run_path("benchmarks/bench_latency.py", run_name="__main__")
PY
      done
      summary+=("$flag: $(paste -sd';' "$OUT/skinny_ab.log")") ;;
    profile-b1)  # single-stream decode steps (Qwen3-0.6B shapes, batch 1, 256 tokens of context), kernels listed
      python3 benchmarks/profile_step.py --attention-backend triton --num-seqs 1 --context 256 --steps 50 \
        --torch-profile /tmp/trace_b1.json --top-kernels 20 2>&1 | grep -vi warn | tee "$OUT/profile_b1.log" | tail -40
      summary+=("decode step b1: $(grep -E '^(forward|bandwidth)' "$OUT/profile_b1.log" | tr -s ' ' | paste -sd';')") ;;
    quant-8b)  # Qwen3-8B shapes: bench.py and single stream in bf16, AWQ, online FP8 + FP8 KV, block FP8 + FP8 KV
      # (QUANT_RUNS="bf16 fp8block" picks some)
      runs=()
      for run in "bf16|--model qwen3-8b-random" "awq|--model qwen3-8b-awq-random" \
          "fp8online|--model qwen3-8b-random --quantization fp8 --kv-cache-dtype fp8" \
          "fp8block|--model /tmp/qwen3-8b-fp8-block --kv-cache-dtype fp8"; do
        [[ " ${QUANT_RUNS:-bf16 awq fp8online fp8block} " == *" ${run%%|*} "* ]] && runs+=("$run")
      done
      [[ " ${runs[*]} " == *fp8-block* ]] \
        && python3 benchmarks/bench_fp8.py --make-block-checkpoint /tmp/qwen3-8b-fp8-block --from qwen3-8b-random
      for run in "${runs[@]}"; do
        tag=${run%%|*}; opts=${run#*|}
        python3 bench.py --attention-backend triton $opts --num-seqs 1 --max-input-len 256 --max-output-len 512 \
          --no-breakdown 2>&1 | tee "$OUT/bench_8b_${tag}_single.log" | grep -E "^Total"
        summary+=("single stream 8b $tag: $(grep '^Total' "$OUT/bench_8b_${tag}_single.log")")
      done
      for run in "${runs[@]}"; do
        tag=${run%%|*}; opts=${run#*|}
        python3 bench.py --attention-backend triton $opts --json "$OUT/bench_8b_$tag.json" 2>&1 \
          | tee "$OUT/bench_8b_$tag.log" | grep -E "^(Decode must|Floor|Total|Breakdown)"
        summary+=("bench 8b $tag: $(grep -E '^(Total|Floor)' "$OUT/bench_8b_$tag.log" | paste -sd';')")
      done ;;
    peers)  # about 4 minutes: transformers' continuous batching on the same workload
      python3 bench.py --engine hf --json "$OUT/bench_hf.json" 2>&1 | tee "$OUT/bench_hf.log" | tail -3
      summary+=("bench hf: $(grep '^Total:' "$OUT/bench_hf.log" | tail -1)") ;;
  esac
done
echo "================ summary ================"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
# The device tool brings back at most 8 files from $OUT: past that, everything goes into one archive
# (only there: a local benchmarks/results/latest keeps its files).
if [ "$OUT" != benchmarks/results/latest ] && [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  tar -czf /tmp/gpu_check_results.tar.gz -C "$OUT" --exclude=./summary.txt . \
    && find "$OUT" -mindepth 1 ! -name summary.txt -delete \
    && mv /tmp/gpu_check_results.tar.gz "$OUT/results.tar.gz" && echo "(all files of $OUT in results.tar.gz)"
fi
