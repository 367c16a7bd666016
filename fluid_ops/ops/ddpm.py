"""`ddpm_step`: one fused reverse-diffusion step with CFG and temperature (docs/contracts.md §2.3).

Numerical contract: exact (fp32 arithmetic on the same table row as the reference; only the
rounding of exp and the order of a few multiply-adds may differ).
"""
from __future__ import annotations

import torch

from fluid_ops import _compiled, backend
from fluid_ops.ops._checks import FLOAT_DTYPES, check_finite_scalar, check_same_device, check_tensor
from fluid_ops.reference import diffusion as ref
from fluid_ops.backend import triton_cpu_rule

OP = "ddpm_step"
OP_PARAMS = "ddpm_step_params"


# ---- backends ---------------------------------------------------------------------------
@backend.register(OP, "reference")
def _ddpm_step_reference(x, model_out, noise, table, step, temperature, cfg, clip_denoised):
    return ref.ddpm_step(x, model_out, noise, table, step, temperature=temperature, cfg=cfg,
                         clip_denoised=clip_denoised)


def _contig(*ts):
    return [t.contiguous() for t in ts]


@backend.register(OP, "cpu")
def _ddpm_step_cpu(x, model_out, noise, table, step, temperature, cfg, clip_denoised):
    x, model_out, noise, table = _contig(x, model_out, noise, table)
    out = torch.empty_like(x)
    v = _compiled.view
    _compiled.cpu.ddpm_step(v(x), v(model_out), v(noise), v(table), step, temperature, cfg, clip_denoised,
                            v(out), _compiled.cpu_threads())
    return out


@backend.register(OP, "cuda")
def _ddpm_step_cuda(x, model_out, noise, table, step, temperature, cfg, clip_denoised):
    x, model_out, noise, table = _contig(x, model_out, noise, table)
    out = torch.empty_like(x)
    v = _compiled.view
    _compiled.cuda.ddpm_step(v(x), v(model_out), v(noise), v(table), step, temperature, cfg, clip_denoised,
                             v(out), _compiled.cuda_stream(x.device))
    return out


@backend.register(OP, "triton", supports=lambda x, *args: triton_cpu_rule(x))
def _ddpm_step_triton(x, model_out, noise, table, step, temperature, cfg, clip_denoised):
    from fluid_ops.triton import sampling  # imports triton: only when a Triton kernel runs
    return sampling.ddpm_step(x, model_out, noise, table, step, temperature, cfg, clip_denoised=clip_denoised)


# ---- custom op --------------------------------------------------------------------------
@torch.library.custom_op("fluid_ops::ddpm_step", mutates_args=())
def _ddpm_step_op(x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor, table: torch.Tensor,
                  step: int, temperature: float, cfg: float, clip_denoised: bool) -> torch.Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    return backend.dispatch(OP, x.device, x, model_out, noise, table, step, temperature, cfg, clip_denoised)


@_ddpm_step_op.register_fake
def _(x, model_out, noise, table, step, temperature, cfg, clip_denoised):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, model_out, noise, table, step, temperature, cfg, clip_denoised = inputs
    # x itself is needed only to know where the clamp of the predicted x_0 was active
    ctx.save_for_backward(model_out, noise, table, x if clip_denoised else None)
    ctx.step, ctx.temperature, ctx.cfg, ctx.n = step, temperature, cfg, x.shape[0]
    ctx.clip_denoised = clip_denoised
    ctx.x_dtype = x.dtype


def _backward(ctx, grad):
    # The step is affine in x and eps and smooth in the variance channel v:
    #   out = c1 * x0 + c2 x + [step > 0] exp(0.5 logvar) T noise, x0 = a x - b eps
    #   (clamped to [-1, 1] with clip_denoised: then x0 passes no gradient where the clamp is active),
    #   logvar = frac max_log + (1 - frac) min_log, frac = (v + 1) / 2.
    model_out, noise, table, x = ctx.saved_tensors
    n, step, temp, cfg = ctx.n, ctx.step, ctx.temperature, ctx.cfg
    c = grad.shape[1]
    c1, c2, a, b, min_log, max_log = table[step].float().unbind(0)
    g = grad.float()
    g0 = g * c1  # gradient reaching x0
    if ctx.clip_denoised:
        mo = model_out.float()
        eps = mo[:n, :c] if mo.shape[0] == n else mo[n:, :c] + cfg * (mo[:n, :c] - mo[n:, :c])
        x0 = a * x.float() - b * eps
        g0 = torch.where((x0 >= -1.0) & (x0 <= 1.0), g0, torch.zeros_like(g0))
    gx = g0 * a + g * c2
    geps = -g0 * b
    gmo = torch.zeros(model_out.shape, dtype=torch.float32, device=grad.device)
    guided = model_out.shape[0] == 2 * n
    gmo[:n, :c] = geps * cfg if guided else geps
    if guided:
        gmo[n:, :c] = geps * (1.0 - cfg)
    gnoise = None
    if step > 0:
        v = model_out[:n, c:].float()
        frac = (v + 1.0) * 0.5
        std = torch.exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))
        gmo[:n, c:] = g * std * temp * noise.float() * 0.25 * (max_log - min_log)
        gnoise = (g * std * temp).to(noise.dtype)
    else:
        gnoise = torch.zeros_like(noise)
    return gx.to(ctx.x_dtype), gmo.to(model_out.dtype), gnoise, None, None, None, None, None


_ddpm_step_op.register_autograd(_backward, setup_context=_setup_context)


def _check_step_args(op, x, model_out, noise, table, step, clip_denoised):
    """The checks ddpm_step and ddpm_step_params share (everything but temperature / cfg)."""
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    n, c = x.shape
    check_tensor(op, "model_out", model_out, ndim=2, dtypes=FLOAT_DTYPES)
    if model_out.shape[1] != 2 * c or model_out.shape[0] not in (n, 2 * n):
        raise ValueError(f"{op}: model_out must have shape ({n}, {2 * c}) or ({2 * n}, {2 * c}) "
                         f"(eps and variance channels; 2N rows = [cond; uncond] for CFG), got {tuple(model_out.shape)}")
    check_tensor(op, "noise", noise, shape=(n, c), dtypes=(x.dtype,))
    check_tensor(op, "table", table, ndim=2, dtypes=(torch.float32,))
    if table.shape[1] != 6:
        raise ValueError(f"{op}: table must have shape (S, 6) (DiffusionSchedule.table), got {tuple(table.shape)}")
    if isinstance(step, (torch.Tensor, bool)) or not isinstance(step, int):
        raise TypeError(f"{op}: step must be a Python int, got {type(step).__name__}")
    if not 0 <= step < table.shape[0]:
        raise ValueError(f"{op}: step must be in [0, {table.shape[0]}) (rows of table), got {step}")
    if not isinstance(clip_denoised, bool):
        raise TypeError(f"{op}: clip_denoised must be a bool, got {type(clip_denoised).__name__}")


# ---- public API ---------------------------------------------------------------------------
def ddpm_step(x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor, table: torch.Tensor,
              step: int, *, temperature: float = 1.0, cfg: float = 1.0, clip_denoised: bool = False) -> torch.Tensor:
    """One reverse-diffusion step, fused: returns x_{t-1} (same shape and dtype as x).

    x (N, C); model_out (N, 2C), or (2N, 2C) = [cond; uncond] rows for classifier-free guidance
    with scale `cfg`; noise (N, C) (added, times `temperature`, iff step > 0); table (S, 6) float32
    from `DiffusionSchedule.table(device)`; step the respaced index (S-1 down to 0). The table
    stays on the device and `step` travels as a kernel argument: no host-to-device copy.
    clip_denoised: clamp the predicted x_0 = a x - b eps to [-1, 1] before the posterior mean
    (IDDPM's clip_denoised; for tokens that lie in [-1, 1], such as pixel patches: it keeps the
    first steps from t ~ T, where 1/sqrt(alpha_bar) ~ 2e4 amplifies any error in eps, from
    throwing x out of range). Off by default, as MAR samples. Contract: exact."""
    _check_step_args(OP, x, model_out, noise, table, step, clip_denoised)
    temperature = check_finite_scalar(OP, "temperature", temperature, min_value=0.0)
    cfg = check_finite_scalar(OP, "cfg", cfg)
    check_same_device(OP, x=x, model_out=model_out, noise=noise, table=table)
    return torch.ops.fluid_ops.ddpm_step(x, model_out, noise, table, step, temperature, cfg, clip_denoised)


# ---- the same step with temperature and cfg read from the device --------------------------
# For loops captured as a CUDA graph (fluid_ops.diffusion_sample): the graph replays with any
# temperature / cfg written into `params` before the replay, so one capture serves every value.
@backend.register(OP_PARAMS, "reference")
def _ddpm_step_params_reference(x, model_out, noise, table, step, params, clip_denoised):
    # 0-dim tensors in the formula: no read back to the host (capturable on CUDA)
    return ref.ddpm_step(x, model_out, noise, table, step, temperature=params[0], cfg=params[1],
                         clip_denoised=clip_denoised)


@backend.register(OP_PARAMS, "cpu")
def _ddpm_step_params_cpu(x, model_out, noise, table, step, params, clip_denoised):
    temperature, cfg = params.tolist()  # a CPU tensor: no device sync
    return _ddpm_step_cpu(x, model_out, noise, table, step, temperature, cfg, clip_denoised)


@backend.register(OP_PARAMS, "cuda", supports=lambda *a: None if hasattr(_compiled.cuda, "ddpm_step_params")
                  else "fluid_ops._C_cuda has no ddpm_step_params (an older build)")
def _ddpm_step_params_cuda(x, model_out, noise, table, step, params, clip_denoised):
    x, model_out, noise, table, params = _contig(x, model_out, noise, table, params)
    out = torch.empty_like(x)
    v = _compiled.view
    _compiled.cuda.ddpm_step_params(v(x), v(model_out), v(noise), v(table), step, v(params), clip_denoised,
                                    v(out), _compiled.cuda_stream(x.device))
    return out


@backend.register(OP_PARAMS, "triton", supports=lambda x, *args: triton_cpu_rule(x))
def _ddpm_step_params_triton(x, model_out, noise, table, step, params, clip_denoised):
    from fluid_ops.triton import sampling
    return sampling.ddpm_step(x, model_out, noise, table, step, 1.0, 1.0, params=params, clip_denoised=clip_denoised)


def ddpm_step_params(x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor, table: torch.Tensor,
                     step: int, params: torch.Tensor, *, clip_denoised: bool = False) -> torch.Tensor:
    """`ddpm_step` with temperature and cfg in `params`, a (2,) float32 tensor on x's device
    ([temperature, cfg]; the caller keeps them finite, temperature >= 0), read by the kernel:
    nothing in the call depends on their values on the host, so a CUDA graph captured once
    replays with any. clip_denoised as in ddpm_step. No autograd (sampling only). Contract:
    exact, as ddpm_step."""
    _check_step_args(OP_PARAMS, x, model_out, noise, table, step, clip_denoised)
    check_tensor(OP_PARAMS, "params", params, shape=(2,), dtypes=(torch.float32,))
    check_same_device(OP_PARAMS, x=x, model_out=model_out, noise=noise, table=table, params=params)
    if x.numel() == 0:
        return torch.empty_like(x)
    return backend.dispatch(OP_PARAMS, x.device, x, model_out, noise, table, step, params, clip_denoised)
