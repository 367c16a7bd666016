"""`fluid_ops.diffusion_sample`: the whole reverse-diffusion loop of MAR's head (SPEC §2.3).

Same arguments and semantics as `fluid_ops.reference.diffusion.diffusion_sample`; the per-step
update is the fused `fluid_ops.ddpm_step` with the schedule table on the device, the timestep
the model sees is an index into a device tensor, and nothing in the loop copies from host to
device or reads a value back. With a `fluid_ops.nn.DenoiserMLP` the loop runs its sampling fast
path (`DenoiserMLP.sampler`); any other net is called as `net(x, t, z)`.

Numerical contract: exact (fp32) with gemm_dtype None / float32; rounding-level with
gemm_dtype=torch.bfloat16 (the samples then match the fp32 ones in distribution, and per
element to about 1e-2 over 100 steps at MAR-B size).
"""
from __future__ import annotations

import functools
import sys

import torch

from fluid_ops.nn.denoiser import DenoiserMLP
from fluid_ops.ops._checks import FLOAT_DTYPES, check_finite_scalar, check_tensor
from fluid_ops.ops.ddpm import ddpm_step
from fluid_ops.reference.diffusion import DiffusionSchedule, draw_sampling_noise

__all__ = ["diffusion_sample"]

OP = "diffusion_sample"


@functools.lru_cache(maxsize=16)
def _schedule(num_steps: int) -> DiffusionSchedule:
    """Cached so its device tables (DiffusionSchedule.table) are built once per device."""
    return DiffusionSchedule(num_steps)


class _TextProgress:
    """Fallback when tqdm is not installed: one updating line on stderr."""

    def __init__(self, total):
        self.total, self.n = total, 0

    def update(self, k=1):
        self.n += k
        sys.stderr.write(f"\r{OP}: {self.n}/{self.total} steps")
        if self.n >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self):
        pass


def _progress_bar(total):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextProgress(total)
    return tqdm(total=total, desc=OP, leave=False)


def diffusion_sample(net, z: torch.Tensor, *, num_steps: int = 100, temperature: float = 1.0,
                     cfg: float = 1.0, noise: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, gemm_dtype: torch.dtype | None = None,
                     progress: bool = False, clip_denoised: bool = False) -> torch.Tensor:
    """Sample N tokens from MAR's diffusion head; returns (N, C) float32, C = net.in_channels.

    net: a `fluid_ops.nn.DenoiserMLP` (fast path) or any module with `in_channels` called as
    net(x (M, C), t (M,) int64, z (M, Z)) -> (M, 2C). z: (N, Z), or (2N, Z) = [cond; uncond] when
    cfg != 1 (the loop carries N rows and evaluates 2N per step). noise: (num_steps + 1, N, C),
    [0] = x_T, [i + 1] = the noise of loop iteration i; drawn from `generator` when None.
    gemm_dtype: torch.bfloat16 runs the fast path's GEMMs in bf16 (None: the weights' dtype;
    "auto": bf16 where the hardware has native bf16 GEMMs (CUDA, AVX512_BF16 / AMX CPUs), else
    fp32 -- on AVX2-only CPUs torch's bf16 GEMMs are emulated and slower than fp32).
    progress: show a progress bar (tqdm when installed). clip_denoised: clamp each step's predicted
    x_0 to [-1, 1] (see `fluid_ops.ddpm_step`; for tokens in [-1, 1] such as pixel patches; MAR's
    latents are unbounded and MAR samples without it, the default)."""
    if not isinstance(net, torch.nn.Module) and not callable(net):
        raise TypeError(f"{OP}: net must be a callable module, got {type(net).__name__}")
    c = getattr(net, "in_channels", None)
    if not isinstance(c, int) or c < 1:
        raise TypeError(f"{OP}: net must have an int attribute in_channels (the token width), got {c!r}")
    check_tensor(OP, "z", z, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    zc = getattr(net, "z_channels", None)
    if isinstance(zc, int) and z.shape[1] != zc:
        raise ValueError(f"{OP}: z must have shape (*, {zc}) (net.z_channels), got {tuple(z.shape)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise TypeError(f"{OP}: num_steps must be an int, got {type(num_steps).__name__}")
    if not 1 <= num_steps <= 1000:
        raise ValueError(f"{OP}: num_steps must be in [1, 1000] (respaced from 1000 training steps), got {num_steps}")
    temperature = check_finite_scalar(OP, "temperature", temperature, min_value=0.0)
    cfg = check_finite_scalar(OP, "cfg", cfg)
    if not isinstance(clip_denoised, bool):
        raise TypeError(f"{OP}: clip_denoised must be a bool, got {type(clip_denoised).__name__}")
    guided = cfg != 1.0
    if guided and z.shape[0] % 2:
        raise ValueError(f"{OP}: with cfg != 1, z must have an even number of rows ([cond; uncond], 2N), "
                         f"got {z.shape[0]}")
    n = z.shape[0] // 2 if guided else z.shape[0]
    if gemm_dtype is not None:
        if not (isinstance(gemm_dtype, str) and gemm_dtype == "auto") and \
                gemm_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{OP}: gemm_dtype must be None, 'auto', float32, bfloat16 or float16, got {gemm_dtype!r}")
        if not isinstance(net, DenoiserMLP):
            raise ValueError(f"{OP}: gemm_dtype applies to fluid_ops.nn.DenoiserMLP only, "
                             f"got a {type(net).__name__}")
    if noise is not None:
        check_tensor(OP, "noise", noise, dtypes=FLOAT_DTYPES + (torch.float64,), shape=(num_steps + 1, n, c))
        if noise.device != z.device:
            raise ValueError(f"{OP}: noise is on {noise.device} but z is on {z.device}; all tensors must be on one device")
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            if p.device != z.device:
                raise ValueError(f"{OP}: net's parameters are on {p.device} but z is on {z.device}")
            break
    if n == 0:
        return torch.empty(0, c, device=z.device)

    sched = _schedule(num_steps)
    table = sched.table(z.device)                # built once per device, stays there
    ts = sched.model_timesteps(z.device)         # (S,) original step indices, on the device
    if noise is None:
        noise = draw_sampling_noise(n, c, num_steps, device=z.device, generator=generator)
    noise = noise.float()
    bar = _progress_bar(num_steps) if progress else None
    with torch.no_grad():
        # The fast path keeps an fp32 residual stream; an fp64 module runs its own forward.
        use_fast = isinstance(net, DenoiserMLP) and (gemm_dtype is not None or net.cond_embed.weight.dtype != torch.float64)
        fast = net.sampler(z, ts, gemm_dtype) if use_fast else None
        x = noise[0].clone()
        for i, step in enumerate(range(num_steps - 1, -1, -1)):
            if fast is not None:
                model_out = fast(x, step)
            else:
                xin = torch.cat([x, x]) if guided else x
                model_out = net(xin, ts[step].expand(xin.shape[0]), z)
            x = ddpm_step(x, model_out, noise[i + 1], table, step, temperature=temperature, cfg=cfg,
                          clip_denoised=clip_denoised)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return x


