"""Backend machinery: backends() report, forcing by env var and context manager, clear errors,
and that both compiled modules import on a machine with no GPU."""
import os
import subprocess
import sys

import pytest
import torch

import fluid_ops
from fluid_ops import backend
from fluid_ops.reference.diffusion import DiffusionSchedule


def _step_args():
    return (torch.randn(3, 4), torch.randn(3, 8), torch.randn(3, 4), DiffusionSchedule(10).table(), 2)


def test_backends_report_shape():
    info = fluid_ops.backends()
    assert set(info) == {"cuda", "triton", "cpu", "reference"}
    assert info["reference"]["available"] and info["reference"]["reason"] is None
    for name, v in info.items():
        assert isinstance(v["available"], bool)
        assert v["available"] == (v["reason"] is None), name
        assert isinstance(v["ops"], list)
    assert "ddpm_step" in info["cpu"]["ops"] and "ddpm_step" in info["reference"]["ops"]


def test_cpu_module_built_and_cuda_module_reports_no_device():
    from fluid_ops import _compiled
    assert _compiled.cpu is not None, _compiled.cpu_error
    if _compiled.cuda is None:
        pytest.skip(f"built without nvcc: {_compiled.cuda_error}")
    count, msg = _compiled.cuda.device_status()
    if torch.cuda.is_available():
        assert count > 0 and msg == "ok"
    else:
        assert count == 0 and "no CUDA device" in msg
        assert fluid_ops.backends()["cuda"]["reason"] == msg
    assert _compiled.cuda.cuda_runtime_version >= 12000
    assert "90a" in _compiled.cuda.compiled_archs or os.environ.get("FLUID_OPS_CUDA_ARCHS")


def test_default_choice_on_cpu_is_compiled_cpu():
    name, _ = backend.select("ddpm_step", torch.device("cpu"), *_step_args(), 1.0, 1.0)
    assert name == "cpu"


def test_use_backend_forces_and_restores():
    with fluid_ops.use_backend("reference"):
        assert backend.select("ddpm_step", torch.device("cpu"), *_step_args(), 1.0, 1.0)[0] == "reference"
        with fluid_ops.use_backend("cpu"):
            assert backend.forced_backend() == "cpu"
        assert backend.forced_backend() == "reference"
    assert backend.forced_backend() in (None, os.environ.get("FLUID_OPS_BACKEND"))


def test_forcing_a_backend_that_cannot_run_says_why():
    with fluid_ops.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="forced backend cannot run this call.*cuda: does not run on cpu tensors"):
            fluid_ops.ddpm_step(*_step_args())
    with fluid_ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="triton"):
            fluid_ops.ddpm_step(*_step_args())


def test_unknown_backend_names_are_rejected():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with fluid_ops.use_backend("gpu"):
            pass


def test_env_var_forces_backend_in_a_fresh_process():
    code = ("import torch, fluid_ops; from fluid_ops import backend;"
            "from fluid_ops.reference.diffusion import DiffusionSchedule as S;"
            "a=(torch.randn(3,4),torch.randn(3,8),torch.randn(3,4),S(10).table(),2,1.0,1.0);"
            "print(backend.select('ddpm_step', torch.device('cpu'), *a)[0])")
    env = dict(os.environ, FLUID_OPS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["FLUID_OPS_BACKEND"] = "nonsense"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown backend 'nonsense'" in bad.stderr


def test_denoiser_head_step_is_an_op_family_with_an_eager_composite():
    """The sampler's head step is chosen by the selector: every backend lists it, the eager step
    runs on CPU tensors unless triton is forced (and can run), and a forced backend that cannot
    run the fused head gets the eager composite instead of an error."""
    from fluid_ops.nn import DenoiserMLP
    from fluid_ops.ops.head import HEAD_STEP, CpuHeadStep, EagerHeadStep
    info = fluid_ops.backends()
    assert all(HEAD_STEP in info[b]["ops"] for b in backend.BACKENDS)
    net = DenoiserMLP(6, 48, 12, 10, 2)
    z, ts = torch.randn(4, 10), torch.arange(5)
    want = {None: "cpu" if info["cpu"]["available"] else "reference", "cpu": "cpu", "reference": "reference",
            "cuda": "composite"}
    for forced, name in want.items():
        with fluid_ops.use_backend(forced):
            s = net.sampler(z, ts, torch.bfloat16)
        # the cpu backend's step is the eager one with oneDNN fused linears for bf16 GEMMs
        step_type = CpuHeadStep if name == "cpu" else EagerHeadStep
        assert (s.backend, type(s.head), s.fused) == (name, step_type, None), forced
    with fluid_ops.use_backend("triton"):  # bf16 GEMMs never run on the Triton interpreter
        assert net.sampler(z, ts, torch.bfloat16).backend == "composite"
