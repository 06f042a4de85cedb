"""How the Triton kernel tests run without a GPU: under Triton's interpreter, in a subprocess.

TRITON_INTERPRET=1 only takes effect if it is set before triton is imported, which other tests of the
same session may already have done. So each kernel test file marks its kernel tests `direct` (they run
on a GPU, or inside the interpreter session, and skip otherwise) and has one test, marked
`interpreter_test`, that re-runs that file alone with TRITON_INTERPRET=1 via
`run_file_under_interpreter` and checks its pass count.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RUN_DIRECT = ON_GPU or INTERPRET
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
REPO_ROOT = Path(__file__).resolve().parents[2]

# Skips the subprocess test where the kernel tests run in this session already.
interpreter_test = pytest.mark.skipif(RUN_DIRECT, reason="kernel tests run directly in this session")


def direct(fn):
    """Mark a kernel test: runs on the GPU (marked `cuda` there), or inside the interpreter subprocess."""
    fn = pytest.mark.skipif(not RUN_DIRECT, reason="no CUDA: run by this file's interpreter subprocess")(fn)
    if ON_GPU:
        fn = pytest.mark.cuda(fn)
    return fn


def run_file_under_interpreter(path: str | Path, min_passed: int, exact: bool = False, timeout: float = 900):
    """Run the test file `path` alone with TRITON_INTERPRET=1 and assert that it passed: exit status 0,
    nothing failed, and at least `min_passed` tests passed (exactly that many when `exact`)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(path).resolve())]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert "failed" not in proc.stdout, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed, report
    count = int(passed.group(1))
    assert (count == min_passed) if exact else (count >= min_passed), f"{count} passed\n{report}"


def compile_for_sm90(fn, signature: dict[str, str], constants: dict, aligned=(), num_warps=4, num_stages=2):
    """Compile the Triton kernel `fn` for an H200 (sm_90) without a GPU; returns its `asm` dict (ttgir,
    ptx, ...), for tests of how a kernel lowers where the interpreter cannot tell. signature: each
    non-constexpr argument's Triton type ("*bf16", "i32", ...); constants: the constexpr arguments;
    aligned: arguments to mark as multiples of 16, as Triton specializes pointers and strides at run time."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(
        fn=fn,
        signature={**signature, **{name: "constexpr" for name in constants}},
        constexprs={(fn.arg_names.index(name),): value for name, value in constants.items()},
        attrs={(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned},
    )
    options = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm


def record_compiles(monkeypatch) -> list[str]:
    """From now on (for the test's duration), the name of every Triton kernel compiled, in order."""
    from triton.runtime.jit import JITFunction

    compiles: list[str] = []
    compile_once = JITFunction._do_compile

    def counted(self, *args, **kwargs):
        compiles.append(self.__name__)
        return compile_once(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "_do_compile", counted)
    return compiles
