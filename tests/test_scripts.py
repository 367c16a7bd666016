"""The user scripts in python/ (train_fluid.py -> generate.py -> evaluate.py) on a tiny run: each
runs as a user would run it, from the command line, and writes what its docstring says."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "--set", "text_encoder=hash", "--set", "num_iter=2", "--set",
        "num_sampling_steps=4"]


def _run(script, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "python" / script), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{script} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scripts") / "run"
    stdout = _run("train_fluid.py", *TINY, "--out", str(out), "--steps", "3", "--batch-size", "4",
                  "--warmup", "1", "--ckpt-every", "2", "--data-length", "64", "--no-progress", cwd=out.parent)
    assert "step 3" in stdout, stdout
    return out


def test_train_script_writes_run_and_resumes(run_dir):
    for name in ("checkpoint.pt", "history.json", "loss.png"):
        assert (run_dir / name).exists(), name
    assert len(json.loads((run_dir / "history.json").read_text())["loss"]) == 3
    # the same command with more steps continues the run instead of starting over
    _run("train_fluid.py", *TINY, "--out", str(run_dir), "--steps", "4", "--batch-size", "4", "--warmup", "1",
         "--data-length", "64", "--no-progress", cwd=run_dir.parent)
    assert len(json.loads((run_dir / "history.json").read_text())["loss"]) == 4


def test_generate_script_writes_a_grid(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    _run("generate.py", "--ckpt", str(run_dir), "--prompt", "a red circle at the top left",
         "--prompt", "a blue square", "-n", "2", "--out", str(out), cwd=tmp_path)
    with Image.open(out) as im:
        w, h = im.size
    assert w > 2 * 32 and h > 2 * 32  # two rows of two 32x32 images, upscaled, plus labels


def test_evaluate_script_writes_a_report(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    stdout = _run("evaluate.py", "--ckpt", str(run_dir), "--per-category", "2", "--categories",
                  "single_object,colors", "--out", str(out), cwd=tmp_path)
    report = json.loads(out.read_text())
    assert set(report["categories"]) == {"single_object", "colors"}
    assert all(c["n"] == 2 for c in report["categories"].values())
    assert 0.0 <= report["overall"] <= 1.0 and "overall" in stdout


def test_gpu_pass_script_runs_its_stages_and_packs_the_logs(tmp_path):
    """benchmarks/gpu_pass.sh on a small selection: the env stage and a one-file test stage run,
    a stage past its limit is reported as timed out, and the summary (printed last) and the
    tarball land in $OUT."""
    import shutil
    import tarfile
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    env = dict(os.environ, OUT=str(tmp_path / "out"), PY=sys.executable, STAGES="env tests",
               TEST_PATHS="tests/test_schedules.py", LIMIT_env="120", OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_pass.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    summary = (tmp_path / "out" / "gpu_pass_summary.txt").read_text()
    lines = {ln.split()[0]: ln for ln in summary.splitlines() if ln.strip()}
    assert "rc=0" in lines["env"] and "rc=0" in lines["tests"] and " passed" in lines["tests"], summary
    with tarfile.open(tmp_path / "out" / "gpu_pass.tar.gz") as tf:
        names = set(tf.getnames())
    assert {"gpu_pass/env.log", "gpu_pass/tests.log", "gpu_pass/tests.xml", "gpu_pass/summary.txt"} <= names
    assert p.stdout.rstrip().endswith(lines["tests"].rstrip())
    env.update(STAGES="tests", LIMIT_tests="1", OUT=str(tmp_path / "out2"))
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_pass.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert "TIMED OUT after 1s" in (tmp_path / "out2" / "gpu_pass_summary.txt").read_text()
