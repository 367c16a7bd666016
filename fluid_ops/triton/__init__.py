"""Triton kernels of fluid_ops' ops (the `triton` backend).

Importing this package does not import Triton: the kernel modules (`fluid_ops.triton.attention`)
are imported on first use, because `@triton.jit` decides at import time whether a kernel is
compiled for the GPU or run by Triton's interpreter (`TRITON_INTERPRET=1`, which runs the same
kernels on CPU tensors, ~1000x slower than the cpu backend: for tests, never chosen unless forced).
"""
from __future__ import annotations

import os
import sys

import torch

_KERNEL_MODULES = ("fluid_ops.triton.attention", "fluid_ops.triton.denoiser", "fluid_ops.triton.sampling")


def interpreter_requested() -> bool:
    """Is TRITON_INTERPRET=1 set now (what a kernel module imported now would use)?"""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def kernels_interpreted() -> bool | None:
    """True / False if the kernels were already imported interpreted / compiled, None if not yet."""
    for name in _KERNEL_MODULES:
        mod = sys.modules.get(name)
        if mod is not None:
            return bool(mod.INTERPRETED)
    return None


def triton_library_interpretable() -> bool:
    """Triton's own @jit library functions (tl.cdiv, tl.max, ...) are made interpretable or not
    when triton is first imported: True unless it was imported without TRITON_INTERPRET=1 (then
    interpreted kernels that call them fail)."""
    std = sys.modules.get("triton.language.standard")
    if std is None:  # not imported yet: it will follow the environment of that moment
        return interpreter_requested()
    return type(std.cdiv).__name__ == "InterpretedFunction"


def run_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the Triton kernels can run on tensors of this device and dtype, else why not."""
    interpreted = kernels_interpreted()
    if interpreted is None:  # not imported yet: they will be imported the way the env says now
        interpreted = interpreter_requested()
    if device.type == "cpu" and not interpreted:
        return ("cpu tensors need Triton's interpreter, but the kernels were compiled for the GPU "
                "(set TRITON_INTERPRET=1 before their first use)")
    if interpreted and not triton_library_interpretable():
        return ("the Triton interpreter needs TRITON_INTERPRET=1 set before triton itself is first imported "
                "(something imported it earlier, e.g. torch.compile), not only before the kernels")
    if interpreted and dtype == torch.bfloat16:
        return "bfloat16 under the Triton interpreter (its tl.dot mishandles bf16; bf16 runs on a GPU)"
    return None
