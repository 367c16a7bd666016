"""The benchmark scripts run end to end on their --quick grids, as a user runs them (a separate
process), and write their JSON; the Triton kernels compile for sm_90 without a GPU. Timings are
not checked here: benchmarks report speed, tests only that the scripts work."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.parametrize("script, extra", [
    ("benchmarks/cpu_ops.py", []),
    ("benchmarks/denoiser.py", []),
    ("benchmarks/attention.py", ["--threads", "1"]),
])
def test_benchmark_quick_run_writes_json(script, extra, tmp_path):
    out = tmp_path / "result.json"
    stdout = _run([script, "--quick", "--out", str(out), *extra], tmp_path)
    assert stdout.strip(), "the benchmark printed no table"
    data = json.loads(out.read_text())
    assert data, "empty JSON"


def test_triton_kernels_compile_for_sm90(tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.fail("triton is not installed: ./run test installs it (the interpreter tests need it)")
    _run(["-m", "fluid_ops.triton.compile_check", "--quick"], tmp_path)
