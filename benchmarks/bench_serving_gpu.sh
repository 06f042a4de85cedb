#!/usr/bin/env bash
# The serving benchmark on the GPU machine: nano-vllm's OpenAI server, then `vllm serve` (when the vLLM
# bundle is installed in /root/vllm_site), each timed by benchmarks/bench_serving.py at concurrency
# 1, 16, 64 and 256 with the reference workload's lengths (random-weight Qwen3-0.6B shapes, bf16).
#   bash benchmarks/bench_serving_gpu.sh OUT_DIR          (gpu_check.sh's `serve` part calls it)
# The GPU image has no fastapi/uvicorn/pydantic: carry `.serve_wheels` (wheels for Python 3.12, made
# on the CPU machine with `pip download`, see the report of issue 20); they are unpacked to
# /tmp/serve_site. vLLM's own server also needs them (uvicorn, prometheus-fastapi-instrumentator, ...).
# Build it with `pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
# --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
# -d .serve_wheels` of: fastapi==0.136.3 (vLLM 0.26 wants <0.137; 0.165 imports opentelemetry) starlette
# uvicorn h11 httptools uvloop click anyio sniffio idna annotated-doc pydantic pydantic-core annotated-types
# typing-inspection typing-extensions prometheus_client prometheus-fastapi-instrumentator aiohttp
# aiohappyeyeballs aiosignal frozenlist multidict yarl propcache attrs python-multipart setproctitle httpx
# httpcore jiter certifi watchfiles model-hosting-container-standards jmespath cloudpickle py-cpuinfo einops
# (38 wheels, 13 MB). watchfiles and model_hosting_container_standards stopped `vllm serve` on 2026-12-02;
# the list was then checked on the CPU machine (2026-12-02): with Python 3.12 each package in these wheels
# and in the bundle's imports from /tmp/vsite:/tmp/serve_site, and, since no CPU torch for cp312 is at hand
# there, with Python 3.11 + torch 2.13 CPU and the same versions for cp311, `api_server --help`, build_app,
# init_app_state (mock engine) and uvicorn serving /v1/models ran, and `python3 -m vllm.entrypoints.openai
# .api_server` went through its engine and worker processes to the CPU worker's missing vllm._C (a CPU
# machine's failure), with no other module missing. Pillow, which vLLM also needs, is on the GPU image; so
# are cloudpickle, py-cpuinfo, einops and the aiohttp/httpx stack (carried copies shadow them, same API).
set -uo pipefail
OUT=${1:-benchmarks/results/latest}
mkdir -p "$OUT"
SITE=/tmp/serve_site
if [ -d .serve_wheels ]; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .serve_wheels/*.whl 2>&1 | tail -2
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
MODEL=${MODEL:-$(python3 -c "
import os
real = os.path.expanduser('~/huggingface/Qwen3-0.6B/')
if os.path.isdir(real):
    print(real)
else:
    from nanovllm.utils.builtin_model import get_builtin_model
    print(get_builtin_model('qwen3-0.6b-random'))")}
echo "model: $MODEL"
# What uvicorn will run on: its pure-Python HTTP parser (h11) costs the event loop several microseconds
# a chunk more than httptools, and uvloop writes sockets with the GIL held; both shape these figures.
python3 -c "
import importlib.util as u, sys, uvicorn
have = {m: u.find_spec(m) is not None for m in ('uvloop', 'httptools')}
print(f'server stack: python {sys.version.split()[0]}, uvicorn {uvicorn.__version__}, '
      f'loop {\"uvloop\" if have[\"uvloop\"] else \"asyncio\"}, http {\"httptools\" if have[\"httptools\"] else \"h11\"}')
" | tee "$OUT/server_stack.txt"
CONCURRENCY=${CONCURRENCY:-1 16 64 256}
# A trial on the CPU: MODEL=<tiny dir> CONCURRENCY="1 4" SERVER_ARGS="--device cpu --enforce-eager"
# BENCH_ARGS="--input-len-range 20 60 --output-len-range 8 16 --max-token-id 400" bash benchmarks/bench_serving_gpu.sh
SERVER_ARGS=${SERVER_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:-}

wait_health() {  # url pid seconds
  for _ in $(seq "$3"); do
    if ! kill -0 "$2" 2>/dev/null; then echo "server $2 died"; return 1; fi
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('$1/health', timeout=2)" 2>/dev/null; then
      return 0
    fi
    sleep 1
  done
  echo "server at $1 not healthy after $3 s"; return 1
}

run_bench() {  # label url
  for c in $CONCURRENCY; do
    n=$(( c == 1 ? 16 : (c < 32 ? 64 : (c > 128 ? c : 2 * c)) ))
    python3 benchmarks/bench_serving.py --base-url "$2" --model qwen3 --max-concurrency "$c" --num-prompts "$n" \
      --label "$1" --result-json "$OUT/serving.jsonl" $BENCH_ARGS 2>&1 | tee -a "$OUT/serving_$1.log"
  done
}

stop_server() {  # pid seconds
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq "$2"); do kill -0 "$1" 2>/dev/null || return 0; sleep 1; done
  kill -KILL "$1" 2>/dev/null
}

rm -f "$OUT/serving.jsonl"
python3 -m nanovllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name qwen3 --port 8100 \
  --host 127.0.0.1 --max-model-len 4096 --uvicorn-log-level warning $SERVER_ARGS > "$OUT/server_nanovllm.log" 2>&1 &
pid=$!
if wait_health http://127.0.0.1:8100 "$pid" 300; then
  run_bench nano-vllm http://127.0.0.1:8100
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8100/metrics').read().decode())" \
    | grep -E "^vllm:(num_requests|kv_cache|prompt_tokens_total|generation_tokens_total)" > "$OUT/metrics_nanovllm.txt"
fi
stop_server "$pid" 60
tail -5 "$OUT/server_nanovllm.log"

if [ -d /root/vllm_site/vllm ]; then
  PYTHONPATH="/root/vllm_site:$SITE" VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 \
    python3 -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name qwen3 --port 8200 \
    --host 127.0.0.1 --max-model-len 4096 > "$OUT/server_vllm.log" 2>&1 &
  pid=$!
  if wait_health http://127.0.0.1:8200 "$pid" 420; then
    run_bench vllm http://127.0.0.1:8200
  else
    tail -30 "$OUT/server_vllm.log"
  fi
  stop_server "$pid" 60
else
  echo "no vLLM bundle in /root/vllm_site: vllm serve skipped (see ../shared/vllm-bundle/README.md)"
fi
python3 - "$OUT/serving.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
print(f"{'server':10s} {'conc':>5s} {'ok':>4s} {'out tok/s':>10s} {'TTFT p50/p99 ms':>17s} {'ITL p50/p99 ms':>16s} {'TPOT p50 ms':>11s}")
for r in rows:
    print(f"{r['label']:10s} {r['max_concurrency']:5d} {r['completed']:4d} {r['output_throughput']:10.0f} "
          f"{r['ttft_ms']['median']:8.1f}/{r['ttft_ms']['p99']:<8.1f} {r['itl_ms']['median']:7.2f}/{r['itl_ms']['p99']:<8.2f} "
          f"{r['tpot_ms']['median']:11.2f}")
EOF
