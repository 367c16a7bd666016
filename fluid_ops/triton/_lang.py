"""Reductions and math for the head / sampling kernels, built on Triton builtins only.

Triton's own library functions (tl.sum, tl.max, tl.cumsum, tl.sigmoid, tl.cdiv, tl.zeros, ...) are
@triton.jit functions, compiled-only or interpreted depending on TRITON_INTERPRET when *triton* was
imported. A process that imported triton before asking for the interpreter (torch.compile imports
it, for one) cannot call them from interpreted kernels. The functions here are decorated when our
kernel modules are imported, so they always match the kernels' mode, and they call the builtin
reduce / scan with the very combine functions tl.sum / tl.max / tl.min / tl.cumsum use: the same
IR when compiled, the interpreter's numpy fast paths when interpreted. (Unlike tl.sum / tl.max
they do not widen narrow inputs: callers reduce int32, fp32 and fp64 only.)
"""
import triton
import triton.language as tl


@triton.jit
def reduce_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def reduce_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def reduce_min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


@triton.jit
def scan_sum(x, axis: tl.constexpr):
    return tl.associative_scan(x, axis, tl.standard._sum_combine)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def cdiv(a, b):
    return (a + b - 1) // b
