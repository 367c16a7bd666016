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
