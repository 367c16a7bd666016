"""Helpers the Triton kernel modules share; importing this file never imports triton.

The kernel modules (`fluid_ops.triton.denoiser`, `fluid_ops.triton.sampling`) are imported
lazily, on the first call that runs a Triton kernel: `triton.jit` decides at decoration time
whether a kernel is compiled for the GPU or run by the interpreter (TRITON_INTERPRET=1), so a
process that sets the variable before its first Triton call (the tests do) gets interpreted
kernels even if it imported fluid_ops earlier.
"""
from __future__ import annotations

import os
import sys

import torch

from fluid_ops import backend

# The Triton row kernels (layernorm_modulate and its backward) keep a whole row in registers.
MAX_ROW_WIDTH = 16384


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The modules whose kernels this file's rules are about; each sets INTERPRETED at import.
KERNEL_MODULES = ("fluid_ops.triton.denoiser", "fluid_ops.triton.sampling")


def kernels_interpreted() -> bool:
    """Whether the head / sampling kernels are (or, not imported yet, will be) interpreted."""
    for name in KERNEL_MODULES:
        mod = sys.modules.get(name)
        if mod is not None:
            return bool(mod.INTERPRETED)
    return interpreting()


def cpu_rule(*tensors) -> str | None:
    """The backend rule for Triton on CPU tensors: it runs there (under the interpreter) only when
    forced with `use_backend("triton")` / FLUID_OPS_BACKEND=triton, never by automatic choice,
    because the interpreter is orders of magnitude slower than the compiled CPU kernels."""
    t = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if t is None or t.device.type != "cpu":
        return None
    if backend.forced_backend() != "triton":
        return "on CPU tensors triton runs (interpreted) only when forced with use_backend('triton')"
    if not kernels_interpreted():
        return ("CPU tensors need Triton's interpreter, but the kernels are compiled for the GPU "
                "(set TRITON_INTERPRET=1 before the first Triton call)")
    return None


def fused_head_unusable(device: torch.device, gemm_dtype: torch.dtype) -> str | None:
    """Why the fused Triton head cannot serve `DenoiserSampler` on `device` (None: it can): the
    same rule as the op backends (CUDA: unless another backend is forced; CPU: only when triton is
    forced, and then under the interpreter, which computes tl.dot wrongly on bf16 inputs)."""
    forced = backend.forced_backend()
    if forced not in (None, "triton"):
        return f"backend {forced!r} is forced"
    if device.type not in ("cuda", "cpu"):
        return f"triton does not run on {device.type} tensors"
    if device.type == "cpu":
        why = cpu_rule(torch.empty(0))
        if why is not None:
            return why
        if gemm_dtype == torch.bfloat16:
            return "the Triton interpreter computes tl.dot wrongly on bf16 inputs"
    return backend._status("triton")
