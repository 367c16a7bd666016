"""The DenoiserMLP's fused non-GEMM pieces (docs/contracts.md §2.2):

* `layernorm_modulate(x, shift, scale, *, weight=None, bias=None, eps=1e-6, out_dtype=None)`
  = LN(x) * (1 + scale) + shift, one pass per row, output in any float dtype (fp32 residual
  stream in, bf16 GEMM input out);
* `gated_residual(h, gate, y)` = h + gate * y (and `gated_residual_` in place, for inference).

x / h / y are (R, D); shift, scale and gate are (R, D), (1, D) or (D,) and may be column chunks
of one adaLN output (row stride 3D, unit column stride): no copies. Both are differentiable.

Numerical contract: exact (fp32 arithmetic; only the summation order of the LN statistics
differs from the reference), apart from the one rounding to a lower-precision output dtype.
"""
from __future__ import annotations

import torch

from fluid_ops import _compiled, backend
from fluid_ops.ops._checks import FLOAT_DTYPES, check_finite_scalar, check_same_device, check_tensor
from fluid_ops.reference import denoiser as ref
from fluid_ops.backend import triton_cpu_rule
from fluid_ops.triton._util import MAX_ROW_WIDTH

__all__ = ["layernorm_modulate", "gated_residual", "gated_residual_"]

LNM = "layernorm_modulate"
LNM_BWD = "layernorm_modulate_backward"
GR = "gated_residual"
GR_BWD = "gated_residual_backward"
GR_INPLACE = "gated_residual_"

# The reference backend also takes float64 (gradcheck); the kernels take fp32 / fp16 / bf16.
_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _no_f64(*ts):
    if any(t is not None and t.dtype == torch.float64 for t in ts):
        return "float64 is handled by the reference backend only"
    return None


def _unit_cols(t):
    """Kernels need unit stride along D (any row stride, 0 included)."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _f32(t):
    return None if t is None else t.float().contiguous()


# ---- reference backends -------------------------------------------------------------------
def _lnm_backward_math(x, scale, grad, weight, bias, eps):
    acc = ref._acc(x, scale, grad, weight)
    xf = x.to(acc)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (xf - mean) * rstd
    w = 1.0 if weight is None else weight.to(acc)
    b = 0.0 if bias is None else bias.to(acc)
    g = grad.to(acc)
    gscale = g * (xhat * w + b)
    dn = g * (1.0 + scale.to(acc))
    gw = (dn * xhat).sum(0)
    gb = dn.sum(0)
    dxh = dn * w
    gx = rstd * (dxh - dxh.mean(-1, keepdim=True) - xhat * (dxh * xhat).mean(-1, keepdim=True))
    pd = torch.float64 if acc == torch.float64 else torch.float32
    return gx.to(x.dtype), gscale.to(scale.dtype), gw.to(pd), gb.to(pd)


@backend.register(LNM, "reference")
def _lnm_reference(x, shift, scale, weight, bias, eps, out_dtype):
    return ref.layernorm_modulate(x, shift, scale, weight, bias, eps, out_dtype)


@backend.register(LNM_BWD, "reference")
@backend.register(LNM_BWD, "cuda")  # torch ops on the CUDA tensors; the forward is the kernel
def _lnm_bwd_reference(x, scale, grad, weight, bias, eps):
    return _lnm_backward_math(x, scale, grad, weight, bias, eps)


@backend.register(GR, "reference")
def _gr_reference(h, gate, y):
    return ref.gated_residual(h, gate, y)


@backend.register(GR_BWD, "reference")
@backend.register(GR_BWD, "cuda")
def _gr_bwd_reference(grad, gate, y):
    acc = ref._acc(grad, gate, y)
    g = grad.to(acc)
    return (g * y.to(acc)).to(gate.dtype), (g * gate.to(acc)).to(y.dtype)


@backend.register(GR_INPLACE, "reference")
def _gr_inplace_reference(h, gate, y):
    h.copy_(ref.gated_residual(h, gate, y))


@backend.register("layernorm_modulate_into", "reference")
def _lnm_into_reference(x, shift, scale, weight, bias, eps, out):
    out.copy_(ref.layernorm_modulate(x, shift, scale, weight, bias, eps, out.dtype))


# ---- cpu backends ---------------------------------------------------------------------------
_v = _compiled.view


def _writable_rows(out):
    if out.shape[1] > 1 and out.stride(1) != 1:
        return "out must have unit column stride"
    return None


@backend.register("layernorm_modulate_into", "cpu", supports=lambda x, shift, scale, weight, bias, eps, out:
                  _no_f64(x, shift, scale, weight, bias, out) or _writable_rows(out))
def _lnm_into_cpu(x, shift, scale, weight, bias, eps, out):
    x, shift, scale = _unit_cols(x), _unit_cols(shift), _unit_cols(scale)
    _compiled.cpu.layernorm_modulate(_v(x), _v(_f32(weight)), _v(_f32(bias)), _v(shift), _v(scale),
                                     eps, _v(out), _compiled.cpu_threads())


@backend.register(LNM, "cpu", supports=lambda x, shift, scale, weight, bias, eps, out_dtype:
                  _no_f64(x, shift, scale, weight, bias) or (
                      "float64 output is handled by the reference backend only" if out_dtype == torch.float64 else None))
def _lnm_cpu(x, shift, scale, weight, bias, eps, out_dtype):
    x, shift, scale = _unit_cols(x), _unit_cols(shift), _unit_cols(scale)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _compiled.cpu.layernorm_modulate(_v(x), _v(_f32(weight)), _v(_f32(bias)), _v(shift), _v(scale),
                                     eps, _v(out), _compiled.cpu_threads())
    return out


@backend.register(LNM_BWD, "cpu", supports=lambda x, scale, grad, weight, bias, eps: _no_f64(x, scale, grad, weight))
def _lnm_bwd_cpu(x, scale, grad, weight, bias, eps):
    x, scale, grad = _unit_cols(x), _unit_cols(scale), _unit_cols(grad)
    d = x.shape[1]
    gx = torch.empty(x.shape, dtype=x.dtype)
    gscale = torch.empty(x.shape, dtype=scale.dtype)
    gw = torch.empty(d, dtype=torch.float32)
    gb = torch.empty(d, dtype=torch.float32)
    _compiled.cpu.layernorm_modulate_backward(_v(x), _v(_f32(weight)), _v(_f32(bias)), _v(scale), _v(grad), eps,
                                              _v(gx), _v(gscale), _v(gw), _v(gb), _compiled.cpu_threads())
    return gx, gscale, gw, gb


@backend.register(GR, "cpu", supports=lambda h, gate, y: _no_f64(h, gate, y))
def _gr_cpu(h, gate, y):
    h, gate, y = _unit_cols(h), _unit_cols(gate), _unit_cols(y)
    out = torch.empty(h.shape, dtype=h.dtype)
    _compiled.cpu.gated_residual(_v(h), _v(gate), _v(y), _v(out), _compiled.cpu_threads())
    return out


@backend.register(GR_BWD, "cpu", supports=lambda grad, gate, y: _no_f64(grad, gate, y))
def _gr_bwd_cpu(grad, gate, y):
    grad, gate, y = _unit_cols(grad), _unit_cols(gate), _unit_cols(y)
    ggate = torch.empty(grad.shape, dtype=gate.dtype)
    gy = torch.empty(grad.shape, dtype=y.dtype)
    _compiled.cpu.gated_residual_backward(_v(grad), _v(gate), _v(y), _v(ggate), _v(gy), _compiled.cpu_threads())
    return ggate, gy


@backend.register(GR_INPLACE, "cpu", supports=lambda h, gate, y: _no_f64(h, gate, y) or (
    None if h.shape[1] <= 1 or h.stride(1) == 1 else "h must have unit column stride to be updated in place"))
def _gr_inplace_cpu(h, gate, y):
    gate, y = _unit_cols(gate), _unit_cols(y)
    _compiled.cpu.gated_residual(_v(h), _v(gate), _v(y), _v(h), _compiled.cpu_threads())


# ---- cuda backends -------------------------------------------------------------------------
def _cuda_has(name):
    return None if _compiled.cuda is not None and hasattr(_compiled.cuda, name) else \
        f"this build of fluid_ops._C_cuda has no {name} kernel"


def _lnm_cuda_unsupported(x, shift, scale, weight, bias, *outs):
    return _no_f64(x, shift, scale, weight, bias, *outs) or _cuda_has("layernorm_modulate") or (
        None if shift.dtype == scale.dtype else "the CUDA kernel needs shift and scale in one dtype") or (
        None if weight is None or bias is None or weight.dtype == bias.dtype
        else "the CUDA kernel needs weight and bias in one dtype")


@backend.register("layernorm_modulate_into", "cuda", supports=lambda x, shift, scale, weight, bias, eps, out:
                  _writable_rows(out) or _lnm_cuda_unsupported(x, shift, scale, weight, bias, out))
def _lnm_into_cuda(x, shift, scale, weight, bias, eps, out):
    x, shift, scale = _unit_cols(x), _unit_cols(shift), _unit_cols(scale)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    _compiled.cuda.layernorm_modulate(_v(x), _v(weight), _v(bias), _v(shift), _v(scale), eps, _v(out),
                                      _compiled.cuda_stream(x.device))


@backend.register(LNM, "cuda", supports=lambda x, shift, scale, weight, bias, eps, out_dtype:
                  ("float64 output is handled by the reference backend only" if out_dtype == torch.float64 else None)
                  or _lnm_cuda_unsupported(x, shift, scale, weight, bias))
def _lnm_cuda(x, shift, scale, weight, bias, eps, out_dtype):
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _lnm_into_cuda(x, shift, scale, weight, bias, eps, out)
    return out


@backend.register(GR, "cuda", supports=lambda h, gate, y: _no_f64(h, gate, y) or _cuda_has("gated_residual"))
def _gr_cuda(h, gate, y):
    h, gate, y = _unit_cols(h), _unit_cols(gate), _unit_cols(y)
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    _compiled.cuda.gated_residual(_v(h), _v(gate), _v(y), _v(out), _compiled.cuda_stream(h.device))
    return out


@backend.register(GR_INPLACE, "cuda", supports=lambda h, gate, y: _no_f64(h, gate, y) or _cuda_has("gated_residual") or (
    None if h.shape[1] <= 1 or h.stride(1) == 1 else "h must have unit column stride to be updated in place"))
def _gr_inplace_cuda(h, gate, y):
    gate, y = _unit_cols(gate), _unit_cols(y)
    _compiled.cuda.gated_residual(_v(h), _v(gate), _v(y), _v(h), _compiled.cuda_stream(h.device))


# ---- triton backends -----------------------------------------------------------------------
# The kernels live in fluid_ops.triton.denoiser, imported on first use (it imports triton).
def _tk():
    from fluid_ops.triton import denoiser
    return denoiser


def _triton_rows(x, *ts):
    """triton_cpu_rule, float64, and the row kernels' width limit."""
    return triton_cpu_rule(x) or _no_f64(x, *ts) or (
        None if x.shape[-1] <= MAX_ROW_WIDTH else
        f"the Triton row kernels take rows of at most {MAX_ROW_WIDTH} elements, got {x.shape[-1]}")


@backend.register(LNM, "triton", supports=lambda x, shift, scale, weight, bias, eps, out_dtype:
                  _triton_rows(x, shift, scale, weight, bias) or (
                      "float64 output is handled by the reference backend only" if out_dtype == torch.float64 else None))
def _lnm_triton(x, shift, scale, weight, bias, eps, out_dtype):
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    return _tk().layernorm_modulate(x, shift, scale, weight, bias, eps, out)


@backend.register("layernorm_modulate_into", "triton", supports=lambda x, shift, scale, weight, bias, eps, out:
                  _triton_rows(x, shift, scale, weight, bias, out) or _writable_rows(out))
def _lnm_into_triton(x, shift, scale, weight, bias, eps, out):
    _tk().layernorm_modulate(x, shift, scale, weight, bias, eps, out)


@backend.register(LNM_BWD, "triton", supports=lambda x, scale, grad, weight, bias, eps:
                  _triton_rows(x, scale, grad, weight, bias))
def _lnm_bwd_triton(x, scale, grad, weight, bias, eps):
    return _tk().layernorm_modulate_backward(x, scale, grad, weight, bias, eps)


@backend.register(GR, "triton", supports=lambda h, gate, y: triton_cpu_rule(h) or _no_f64(h, gate, y))
def _gr_triton(h, gate, y):
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    return _tk().gated_residual(h, gate, y, out)


@backend.register(GR_BWD, "triton", supports=lambda grad, gate, y: triton_cpu_rule(grad) or _no_f64(grad, gate, y))
def _gr_bwd_triton(grad, gate, y):
    return _tk().gated_residual_backward(grad, gate, y)


@backend.register(GR_INPLACE, "triton", supports=lambda h, gate, y: triton_cpu_rule(h) or _no_f64(h, gate, y) or (
    None if h.shape[1] <= 1 or h.stride(1) == 1 else "h must have unit column stride to be updated in place"))
def _gr_inplace_triton(h, gate, y):
    _tk().gated_residual(h, gate, y, h)


# ---- custom ops -------------------------------------------------------------------------------
@torch.library.custom_op("fluid_ops::layernorm_modulate", mutates_args=())
def _lnm_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None,
            bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=out_dtype, device=x.device)
    return backend.dispatch(LNM, x.device, x, shift, scale, weight, bias, eps, out_dtype)


@_lnm_op.register_fake
def _(x, shift, scale, weight, bias, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("fluid_ops::layernorm_modulate_backward", mutates_args=())
def _lnm_bwd_op(x: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_scale, grad_weight, grad_bias); the last two are float32 (float64 for
    float64 inputs) column sums, as if weight = 1 / bias = 0 when those are None."""
    if x.numel() == 0:
        pd = torch.float64 if x.dtype == torch.float64 else torch.float32
        z = torch.zeros(x.shape[1], dtype=pd, device=x.device)
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty(x.shape, dtype=scale.dtype, device=x.device), z, z.clone())
    return backend.dispatch(LNM_BWD, x.device, x, scale, grad, weight, bias, eps)


@_lnm_bwd_op.register_fake
def _(x, scale, grad, weight, bias, eps):
    pd = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty(x.shape), x.new_empty(x.shape, dtype=scale.dtype),
            x.new_empty(x.shape[1], dtype=pd), x.new_empty(x.shape[1], dtype=pd))


def _lnm_setup(ctx, inputs, output):
    x, shift, scale, weight, bias, eps, out_dtype = inputs
    ctx.save_for_backward(x, scale, weight, bias)
    ctx.eps = eps
    ctx.shift_dtype = shift.dtype


def _lnm_backward(ctx, grad):
    x, scale, weight, bias = ctx.saved_tensors
    gx, gscale, gw, gb = torch.ops.fluid_ops.layernorm_modulate_backward(x, scale, grad, weight, bias, ctx.eps)
    need = ctx.needs_input_grad
    return (gx if need[0] else None,
            grad.to(ctx.shift_dtype) if need[1] else None,
            gscale if need[2] else None,
            gw.to(weight.dtype) if weight is not None and need[3] else None,
            gb.to(bias.dtype) if bias is not None and need[4] else None,
            None, None)


_lnm_op.register_autograd(_lnm_backward, setup_context=_lnm_setup)


@torch.library.custom_op("fluid_ops::gated_residual", mutates_args=())
def _gr_op(h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if h.numel() == 0:
        return torch.empty(h.shape, dtype=h.dtype, device=h.device)
    return backend.dispatch(GR, h.device, h, gate, y)


@_gr_op.register_fake
def _(h, gate, y):
    return h.new_empty(h.shape)


@torch.library.custom_op("fluid_ops::gated_residual_backward", mutates_args=())
def _gr_bwd_op(grad: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_gate, grad_y) in gate's and y's dtypes; grad_h is grad itself."""
    if grad.numel() == 0:
        return (torch.empty(grad.shape, dtype=gate.dtype, device=grad.device),
                torch.empty(grad.shape, dtype=y.dtype, device=grad.device))
    return backend.dispatch(GR_BWD, grad.device, grad, gate, y)


@_gr_bwd_op.register_fake
def _(grad, gate, y):
    return grad.new_empty(grad.shape, dtype=gate.dtype), grad.new_empty(grad.shape, dtype=y.dtype)


def _gr_setup(ctx, inputs, output):
    h, gate, y = inputs
    ctx.save_for_backward(gate, y)
    ctx.h_dtype = h.dtype


def _gr_backward(ctx, grad):
    gate, y = ctx.saved_tensors
    need = ctx.needs_input_grad
    ggate = gy = None
    if need[1] or need[2]:
        ggate, gy = torch.ops.fluid_ops.gated_residual_backward(grad, gate, y)
    return (grad.to(ctx.h_dtype) if need[0] else None, ggate if need[1] else None, gy if need[2] else None)


_gr_op.register_autograd(_gr_backward, setup_context=_gr_setup)


@torch.library.custom_op("fluid_ops::layernorm_modulate_into", mutates_args=("out",))
def _lnm_into_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float, out: torch.Tensor) -> None:
    if x.numel() == 0:
        return
    backend.dispatch("layernorm_modulate_into", x.device, x, shift, scale, weight, bias, eps, out)


@_lnm_into_op.register_fake
def _(x, shift, scale, weight, bias, eps, out):
    return None


@torch.library.custom_op("fluid_ops::gated_residual_", mutates_args=("h",))
def _gr_inplace_op(h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> None:
    if h.numel() == 0:
        return
    backend.dispatch(GR_INPLACE, h.device, h, gate, y)


@_gr_inplace_op.register_fake
def _(h, gate, y):
    return None


# ---- public API -----------------------------------------------------------------------------
def _rows(op, name, t, r, d, dtypes):
    """(R, D), (1, D) or (D,) -> an (R, D) view (broadcast rows have stride 0, no copy)."""
    check_tensor(op, name, t, dtypes=dtypes)
    if t.shape == (d,) or (t.dim() == 2 and t.shape[0] in (1, r) and t.shape[1] == d):
        return t.expand(r, d) if (t.dim() == 1 or t.shape[0] != r) else t
    raise ValueError(f"{op}: {name} must have shape ({r}, {d}), (1, {d}) or ({d},), got {tuple(t.shape)}")


def _vec(op, name, t, d, dtypes):
    if t is None:
        return None
    check_tensor(op, name, t, ndim=1, dtypes=dtypes, shape=(d,))
    return t


def _check_lnm_args(op, x, shift, scale, weight, bias, eps):
    """The checks layernorm_modulate and layernorm_modulate_into share; returns the arguments
    with shift / scale broadcast to (R, D) and eps as a float."""
    check_tensor(op, "x", x, ndim=2, dtypes=_DTYPES)
    r, d = x.shape
    shift = _rows(op, "shift", shift, r, d, _DTYPES)
    scale = _rows(op, "scale", scale, r, d, (shift.dtype,))
    weight = _vec(op, "weight", weight, d, _DTYPES)
    bias = _vec(op, "bias", bias, d, _DTYPES)
    eps = check_finite_scalar(op, "eps", eps, min_value=0.0, min_inclusive=False)
    return shift, scale, weight, bias, eps


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *,
                       weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift, LayerNorm over the last dim (affine when weight / bias are
    given), fused in one pass per row.

    x (R, D) with any row stride; shift and scale (R, D), (1, D) or (D,) in one float dtype, e.g.
    column chunks of one adaLN output; weight, bias (D,). Returns (R, D) in `out_dtype`
    (default x's dtype): an fp32 residual stream can feed a bf16 GEMM directly. Differentiable in
    x, shift, scale, weight and bias. Contract: exact (fp32 arithmetic)."""
    shift, scale, weight, bias, eps = _check_lnm_args(LNM, x, shift, scale, weight, bias, eps)
    if out_dtype is None:
        out_dtype = x.dtype
    elif not isinstance(out_dtype, torch.dtype) or out_dtype not in _DTYPES:
        raise TypeError(f"{LNM}: out_dtype must be None or one of float32, float16, bfloat16, float64, got {out_dtype!r}")
    check_same_device(LNM, x=x, shift=shift, scale=scale, weight=weight, bias=bias)
    return torch.ops.fluid_ops.layernorm_modulate(x, shift, scale, weight, bias, eps, out_dtype)


def layernorm_modulate_into(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, *,
                            weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                            eps: float = 1e-6) -> torch.Tensor:
    """`layernorm_modulate` written into a preallocated `out` (R, D) of any float dtype, for
    inference loops that reuse workspaces (no autograd); returns out."""
    op = "layernorm_modulate_into"
    shift, scale, weight, bias, eps = _check_lnm_args(op, x, shift, scale, weight, bias, eps)
    r, d = x.shape
    check_tensor(op, "out", out, ndim=2, dtypes=_DTYPES, shape=(r, d))
    check_same_device(op, x=x, shift=shift, scale=scale, weight=weight, bias=bias, out=out)
    if d > 1 and out.stride(1) != 1 or r > 1 and out.stride(0) < d:
        raise ValueError(f"{op}: out must have unit column stride and non-overlapping rows, got strides {tuple(out.stride())}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, shift, scale, weight, bias)):
        raise RuntimeError(f"{op}: writes into out without autograd; use layernorm_modulate or torch.no_grad()")
    torch.ops.fluid_ops.layernorm_modulate_into(x, shift, scale, weight, bias, eps, out)
    return out


def _gr_check(op, h, gate, y):
    check_tensor(op, "h", h, ndim=2, dtypes=_DTYPES)
    r, d = h.shape
    gate = _rows(op, "gate", gate, r, d, _DTYPES)
    check_tensor(op, "y", y, ndim=2, dtypes=_DTYPES, shape=(r, d))
    check_same_device(op, h=h, gate=gate, y=y)
    return gate


def gated_residual(h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h + gate * y in h's dtype (fp32 arithmetic): the residual update of an adaLN block.

    h, y (R, D); gate (R, D), (1, D) or (D,) (a column chunk of the adaLN output is fine).
    Differentiable in all three. Contract: exact."""
    gate = _gr_check(GR, h, gate, y)
    return torch.ops.fluid_ops.gated_residual(h, gate, y)


def gated_residual_(h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """In-place `h += gate * y` for inference (no autograd); returns h. h must own its rows
    (no broadcast / overlapping rows) and have unit column stride."""
    gate = _gr_check(GR_INPLACE, h, gate, y)
    if h.shape[1] > 1 and h.stride(1) != 1:
        raise ValueError(f"{GR_INPLACE}: h must have unit stride along its last dim to be updated in place, "
                         f"got strides {tuple(h.stride())}")
    if h.shape[0] > 1 and h.stride(0) < h.shape[1]:
        raise ValueError(f"{GR_INPLACE}: h's rows must not overlap (row stride >= D) to be updated in place, "
                         f"got strides {tuple(h.stride())}")
    if torch.is_grad_enabled() and (h.requires_grad or gate.requires_grad or y.requires_grad):
        raise RuntimeError(f"{GR_INPLACE}: in-place update has no autograd; use gated_residual (out of place) "
                           "or call under torch.no_grad()")
    torch.ops.fluid_ops.gated_residual_(h, gate, y)
    return h
