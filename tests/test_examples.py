"""The vLLM-style scripts in examples/offline_inference/ run as they are (each in its own process, on the
tiny checkpoint) and print what vLLM's scripts print; their only nanovllm imports are vLLM's names."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "offline_inference"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))
TIMEOUT_S = 120

# What vLLM's examples import from vllm, under nanovllm's module names; plus the built-in default model.
ALLOWED_IMPORTS = {
    "nanovllm": {"LLM", "SamplingParams", "EngineArgs", "LLMEngine", "RequestOutput"},
    "nanovllm.utils": {"FlexibleArgumentParser"},
    "nanovllm.utils.argparse_utils": {"FlexibleArgumentParser"},
    "nanovllm.distributed": {"cleanup_dist_env_and_memory"},
    "nanovllm.utils.builtin_model": {"get_builtin_model"},
    "nanovllm.sampling_params": {"StructuredOutputsParams"},
}

GENERATED = re.compile(r"Generated text: ")


def run_example(script: str, model: str, *flags: str) -> str:
    """Run a script with `--model model` and return its stdout; fail with its output if it fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TOKENIZERS_PARALLELISM"] = "false"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--model", model, *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_all_scripts_are_covered():
    assert SCRIPTS == [
        "basic.py",
        "chat.py",
        "data_parallel.py",  # run by tests/distributed/test_ray.py (needs Ray)
        "generate.py",
        "llm_engine_example.py",
        "n_completions.py",
        "prefix_caching.py",
        "reproducibility.py",
        "structured_outputs.py",
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_imports_only_vllm_names(script):
    tree = ast.parse((EXAMPLES / script).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "nanovllm" for a in node.names), ast.unparse(node)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "nanovllm":
            names = {a.name for a in node.names}
            assert names <= ALLOWED_IMPORTS.get(node.module, set()), ast.unparse(node)


def test_basic(qwen3_tied):
    out = run_example("basic.py", qwen3_tied)
    lines = [line for line in out.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == 4
    assert lines[0].startswith("Prompt: 'Hello, my name is', Generated text: ")


def test_generate(qwen3_tied):
    flags = ["--max-model-len", "1024", "--max-tokens", "8", "--temperature", "0.7", "--top-p", "0.9"]
    out = run_example("generate.py", qwen3_tied, *flags, "--top-k", "20")
    assert len(GENERATED.findall(out)) == 4
    assert "Prompt: 'The capital of France is', Generated text: " in out


def test_generate_help_documents_engine_flags():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "generate.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\n  --max-model-len MAX_MODEL_LEN" in proc.stdout


def test_chat(qwen3_tied, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}[CUSTOM] {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[CUSTOM] assistant:{% endif %}"
    )
    out = run_example(
        "chat.py", qwen3_tied, "--max-model-len", "1024", "--max-tokens", "8",
        "--chat-template-path", str(template),
    )  # fmt: skip
    prompts = [line for line in out.splitlines() if line.startswith("Prompt: ")]
    assert len(prompts) == len(GENERATED.findall(out)) == 1 + 10 + 10
    # The tokenizer's template for the first eleven, the given one for the last ten.
    assert all("<|im_start|>system" in p for p in prompts[:11])
    assert all(p.startswith("Prompt: '[CUSTOM] system: You are a helpful assistant") for p in prompts[11:])


def test_llm_engine_example(qwen3_tied):
    # vLLM's underscore spelling of a flag works too (FlexibleArgumentParser).
    out = run_example("llm_engine_example.py", qwen3_tied, "--max_model_len", "1024")
    printed = [line for line in out.splitlines() if line.startswith("RequestOutput(")]
    ids = [re.match(r"RequestOutput\(request_id='(\w+)'", line).group(1) for line in printed]
    assert sorted(ids) == ["0", "1", "2"]  # each finished request printed once
    by_id = dict(zip(ids, printed))
    assert all("finished=True" in line for line in printed)
    assert "prompt_logprobs=[None, {" in by_id["0"] and "logprobs=[{" in by_id["0"]
    assert by_id["2"].count("CompletionOutput(index=") == 2  # n=2


@pytest.fixture(scope="module")
def reproducibility_runs(qwen3_tied) -> list[list[str]]:
    return [run_example("reproducibility.py", qwen3_tied).splitlines() for _ in range(2)]


def test_reproducibility_repeats_sampled_text(reproducibility_runs):
    first, second = (
        [line for line in run if line.startswith("Generated text: ")] for run in reproducibility_runs
    )
    assert len(first) == 4
    assert first == second


def test_reproducibility_repeats_global_random(reproducibility_runs):
    first, second = reproducibility_runs
    assert first[-1].isdigit() and first[-1] == second[-1]


def test_prefix_caching(qwen3_tied):
    out = run_example("prefix_caching.py", qwen3_tied)
    texts = [line for line in out.splitlines() if line.startswith("Generated text: ")]
    assert len(texts) == 8
    assert texts[:4] == texts[4:]
    assert "Generated answers are the same: True" in out


def test_n_completions(qwen3_tied):
    out = run_example("n_completions.py", qwen3_tied, "--n", "3")
    lines = out.splitlines()
    assert sum(line.startswith("Prompt: ") for line in lines) == 3
    pattern = r"  completion (\d+): (\d+) tokens, Generated text: (.*)$"
    completions = [re.match(pattern, line) for line in lines]
    completions = [m for m in completions if m]
    assert [int(m.group(1)) for m in completions] == [0, 1, 2] * 3
    assert all(1 <= int(m.group(2)) <= 16 for m in completions)
    # Greedy: the three completions of each prompt are the same text.
    texts = [m.group(3) for m in completions]
    for i in range(0, 9, 3):
        assert texts[i] == texts[i + 1] == texts[i + 2]


def test_structured_outputs(qwen3_tied):
    import json

    out = run_example("structured_outputs.py", qwen3_tied)
    texts = dict(
        line.split(": ", 1)
        for line in out.splitlines()
        if line.split(": ", 1)[0] in ("choice", "regex", "json", "grammar")
    )
    texts = {k: ast.literal_eval(v) for k, v in texts.items()}
    assert texts["choice"] in ("Positive", "Negative")
    assert re.fullmatch(r"[a-z]{2,8}@[a-z]{2,8}\.com\n", texts["regex"])
    car = json.loads(texts["json"])
    assert set(car) == {"brand", "model", "car_type"} and all(
        v in ("sedan", "SUV", "Truck", "Coupe") for v in car.values()
    )
    assert re.fullmatch(r"SELECT col_[12]  from table_[12]  where col_[12] = [12] ", texts["grammar"])
