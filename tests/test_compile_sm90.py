"""GPU-only compile errors, caught on a CPU machine: every kernel that the shipped config caches select, and the
defaults take, compiles for the GPU its cache was tuned on, and no kernel's spills or SASS grew past its recorded
size (tests/compile_sm90.py, in two processes without TRITON_INTERPRET: the interpreter runs kernels that a GPU
compile rejects)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("compile_sm90.py")
PROCESSES = 2


def test_kernels_compile_for_the_cached_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [subprocess.Popen([sys.executable, str(SCRIPT), "--part", f"{i}/{PROCESSES}"], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(PROCESSES)]
    outputs = [run.communicate(timeout=1200)[0] for run in runs]
    lines = [line for output in outputs for line in output.splitlines()]
    failures = [line for line in lines if line.startswith("FAIL")]
    assert all(run.returncode == 0 for run in runs), "\n".join(failures) or "\n".join(outputs)[-4000:]
    assert sum(line.startswith("ok ") for line in lines) >= 30  # the caches' entries and the defaults ran
