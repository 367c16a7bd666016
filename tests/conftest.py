"""Shared test helpers: which backends can run here, and the comparison rules of docs/design.md, "Testing"."""
from __future__ import annotations

import os

import pytest
import torch

# precision="auto" (sampling, training) is bf16 on CPUs with native bf16; the suite's exactness
# checks (models against loops, resumes bit for bit) were written for fp32, so "auto" means fp32
# here on every CPU (subprocesses inherit it). The bf16 paths have their own tests, which unset it
# (tests/test_precision.py); FLUID_OPS_PRECISION=auto runs the suite with the hardware's choice.
os.environ.setdefault("FLUID_OPS_PRECISION", "fp32")

import fluid_ops  # noqa: E402


def available(name: str) -> str | None:
    """None if backend `name` can run here, else the reason it cannot."""
    info = fluid_ops.backends()[name]
    return None if info["available"] else info["reason"]


def backend_params(*names, device="cpu"):
    """pytest params for each backend, skipped with the backend's own reason where unavailable."""
    out = []
    for n in names:
        reason = available(n)
        if n == "cuda" or device == "cuda":
            reason = reason or (None if torch.cuda.is_available() else "no CUDA device in this torch")
        out.append(pytest.param(n, marks=pytest.mark.skipif(reason is not None, reason=f"{n}: {reason}")))
    return out


def cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (CUDA kernels are compiled in CI but run only on a GPU machine)"
    return available("cuda")


requires_cuda = pytest.mark.skipif(cuda_skip_reason() is not None, reason=str(cuda_skip_reason()))


def assert_lowp_close(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, *,
                      factor: float = 2.0, atol: float = 1e-5, name: str = "output"):
    """The flash-attn rule: the backend's max error against an fp64 reference is at most
    `factor` x the error of the reference run in the same low precision, plus `atol`."""
    err = (out.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    base = (ref_lowp.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    assert err <= factor * base + atol, f"{name}: max error {err:.3e} > {factor} x {base:.3e} + {atol:.1e}"
