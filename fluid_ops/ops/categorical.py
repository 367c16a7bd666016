"""`sample_categorical`: discrete-token sampling with temperature, top-k and top-p (docs/contracts.md §2.4).

The algorithm, tie rules included, is defined in `fluid_ops.reference.categorical`; every
backend returns the same indices for the same uniforms (float64 weights and sums in a fixed
order: backends can differ only when a uniform falls within ~1e-15 of a CDF boundary, through
the last bit of exp). Sampling has no gradient: the op returns int64 indices, and autograd does
not apply (logits that require grad are fine; nothing flows back through the sample).
"""
from __future__ import annotations

import operator

import torch

from fluid_ops import _compiled, backend
from fluid_ops.ops._checks import FLOAT_DTYPES, check_finite_scalar, check_same_device, check_tensor
from fluid_ops.reference import categorical as ref
from fluid_ops.backend import triton_cpu_rule

__all__ = ["sample_categorical"]

OP = "sample_categorical"
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


# ---- backends ---------------------------------------------------------------------------
@backend.register(OP, "reference")
def _sample_categorical_reference(logits, uniform, temperature, top_k, top_p):
    return ref.sample_categorical(logits, temperature=temperature, top_k=top_k, top_p=top_p, uniform=uniform)


@backend.register(OP, "cpu")
def _sample_categorical_cpu(logits, uniform, temperature, top_k, top_p):
    logits = logits.contiguous()
    uniform = uniform.to(torch.float64).contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    v = _compiled.view
    _compiled.cpu.sample_categorical(v(logits), v(uniform), float(temperature),
                                     0 if top_k is None else int(top_k),
                                     1.0 if top_p is None else float(top_p), v(out),
                                     _compiled.cpu_threads())
    return out


def _cuda_has_categorical(*args):
    if not hasattr(_compiled.cuda, "sample_categorical"):
        return "fluid_ops._C_cuda has no sample_categorical (an older build)"
    return None


@backend.register(OP, "cuda", supports=_cuda_has_categorical)
def _sample_categorical_cuda(logits, uniform, temperature, top_k, top_p):
    # csrc/cuda/categorical.cu: one block per row, thresholds by bisection on the bits of |s|
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    uniform = uniform.to(torch.float64).contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    v = _compiled.view
    _compiled.cuda.sample_categorical(v(logits), v(uniform), float(temperature),
                                      0 if top_k is None else int(top_k),
                                      1.0 if top_p is None else float(top_p), v(out),
                                      _compiled.cuda_stream(logits.device))
    return out


@backend.register(OP, "triton", supports=lambda logits, *args: triton_cpu_rule(logits))
def _sample_categorical_triton(logits, uniform, temperature, top_k, top_p):
    from fluid_ops.triton import sampling  # imports triton: only when a Triton kernel runs
    return sampling.sample_categorical(logits, uniform, temperature, top_k, top_p)


# ---- custom op --------------------------------------------------------------------------
@torch.library.custom_op("fluid_ops::sample_categorical", mutates_args=())
def _sample_categorical_op(logits: torch.Tensor, uniform: torch.Tensor, temperature: float,
                           top_k: int | None, top_p: float | None) -> torch.Tensor:
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    return backend.dispatch(OP, logits.device, logits, uniform, temperature, top_k, top_p)


@_sample_categorical_op.register_fake
def _(logits, uniform, temperature, top_k, top_p):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


# ---- public API ---------------------------------------------------------------------------
def sample_categorical(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, uniform: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `logits` (N, V), from softmax(logits / temperature) restricted by
    top_k / top_p; returns int64 (N,).

    temperature 0 is argmax (first index on ties). top_k keeps the tokens whose scaled logit is
    >= the k-th largest (ties at the threshold kept); top_p keeps the smallest set of most
    probable tokens whose probability reaches top_p, plus ties of the last one (top_p=1: all).
    `uniform` (N,) float32/float64 in [0, 1) drives the inverse CDF; when None it is drawn
    (float64) from `generator` (the default generator if None), also at temperature 0, so the
    generator advances the same way whatever the settings. logits must be finite or -inf
    (-inf: never sampled), with a finite value in every row. No gradient (see module doc).
    Contract: exact (same indices as the reference, up to uniforms within ~1e-15 of a CDF
    boundary)."""
    check_tensor(OP, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    n, v = logits.shape
    if v == 0:
        raise ValueError(f"{OP}: logits must have at least one category (V >= 1), got shape {tuple(logits.shape)}")
    temperature = check_finite_scalar(OP, "temperature", temperature, min_value=0.0)
    if temperature > _FLOAT32_MAX:
        raise ValueError(f"{OP}: temperature must be at most {_FLOAT32_MAX:.7g} (it is applied in float32), got {temperature}")
    if top_k is not None:
        if isinstance(top_k, (bool, torch.Tensor)) or not hasattr(top_k, "__index__"):
            raise TypeError(f"{OP}: top_k must be None or an int, got {type(top_k).__name__}")
        top_k = operator.index(top_k)  # numpy integers too
        if not 1 <= top_k <= v:
            raise ValueError(f"{OP}: top_k must be in [1, {v}] (V = logits.shape[1]) or None, got {top_k}")
    if top_p is not None:
        top_p = check_finite_scalar(OP, "top_p", top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"{OP}: top_p must be in (0, 1] or None, got {top_p}")
    if uniform is None:
        if generator is not None and generator.device.type != logits.device.type:
            raise ValueError(f"{OP}: generator is on {generator.device} but logits is on {logits.device}")
        uniform = torch.rand(n, dtype=torch.float64, device=logits.device, generator=generator)
    else:
        check_tensor(OP, "uniform", uniform, shape=(n,), dtypes=(torch.float32, torch.float64))
        check_same_device(OP, logits=logits, uniform=uniform)
        if n and not bool(((uniform >= 0) & (uniform < 1)).all()):
            raise ValueError(f"{OP}: uniform values must be in [0, 1), got min {uniform.min().item()} "
                             f"and max {uniform.max().item()}")
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    # One reduction finds NaN (amax propagates it), +inf and rows that are all -inf.
    row_max = logits.detach().amax(dim=1)
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"{OP}: logits must be finite or -inf with a finite value in every row; row {r} has "
                         f"max {row_max[r].item()} (NaN, +inf, or all -inf)")
    return torch.ops.fluid_ops.sample_categorical(logits.detach(), uniform, temperature, top_k, top_p)
