"""`fluid_ops.nn.diffusion_loss`: MAR's diffusion loss (docs/contracts.md §2.3) without the repeated rows.

Same arguments, random draws and value as `fluid_ops.reference.diffusion.diffusion_loss`, which
repeats target and z `diffusion_batch_mul` (R) times and runs the head on every row, masked or
not. Here:

* only the rows that count are evaluated: the masked rows (`index`, or mask != 0) are selected
  first, and the head runs on K * R rows instead of M * R. With `index` (K,) given (MAR and Fluid
  know the masked tokens: a prefix of the generation order) every shape is fixed by K and there
  is no host sync; from a mask alone the rows are found by `nonzero` (one host sync);
* z is never repeated: with a `fluid_ops.nn.DenoiserMLP`, `cond_embed` runs once on the K
  distinct rows and is broadcast into the K * R rows (`c_repeats`; its backward sums the R
  copies), and the time embedding runs on the schedule's T timesteps and is gathered when K * R
  exceeds T (`num_timesteps`). Other nets get the selected z repeated (still masked rows only);
* t and noise are drawn exactly as the reference draws them (for all M * R rows, from
  `generator`, t first), then the masked rows' draws are picked, so a seed gives the same loss;
* the schedule's float64 tables live on the device (cached), not copied from NumPy per call.

Numerical contract: exact (the same loss and gradients as the reference in fp32, up to
summation order: row sums in another order, the broadcast's summed backward, GEMMs on fewer rows).
"""
from __future__ import annotations

import functools
import types

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from fluid_ops.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from fluid_ops.reference import diffusion as ref

__all__ = ["diffusion_loss"]

OP = "diffusion_loss"
_TABLES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_log_variance_clipped",
           "log_betas", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
           "posterior_mean_coef1", "posterior_mean_coef2")


@functools.lru_cache(maxsize=4)
def _default_schedule() -> ref.DiffusionSchedule:
    return ref.DiffusionSchedule(None)


def _device_tables(sched: ref.DiffusionSchedule, device: torch.device):
    """A stand-in for `sched` whose tables are float64 tensors on `device` (the reference's
    `_gather` indexes them as it indexes the NumPy arrays, without the per-call copy)."""
    cache = sched.__dict__.setdefault("_loss_tables", {})
    hit = cache.get(device)
    if hit is None:
        hit = types.SimpleNamespace(num_steps=sched.num_steps, **{
            k: torch.as_tensor(getattr(sched, k), dtype=torch.float64).to(device) for k in _TABLES})
        cache[device] = hit
    return hit


def _uses_fast_forward(net) -> bool:
    """fluid_ops.nn.DenoiserMLP's forward takes c_repeats / num_timesteps (also through a wrapper
    that says so with `accepts_c_repeats`)."""
    from fluid_ops.nn.denoiser import DenoiserMLP
    return isinstance(net, DenoiserMLP) or bool(getattr(net, "accepts_c_repeats", False))


def diffusion_loss(net, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None, *,
                   index: torch.Tensor | None = None, diffusion_batch_mul: int = 4,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None,
                   schedule: ref.DiffusionSchedule | None = None,
                   checkpoint: bool = False) -> torch.Tensor:
    """MAR's diffusion loss (scalar): target (M, C) tokens, z (M, Z) conditions, mask (M,)
    (nonzero = predict; the loss is the mask-weighted mean), each row with `diffusion_batch_mul`
    R independent t draws. t (M * R,) and noise (M * R, C), row j * M + i the j-th draw of row
    i, are drawn from `generator` unless given, as by the reference.

    An empty selection (a mask of zeros, or an index of length 0) gives a loss of 0 with a zero
    gradient, not NaN (docs/contracts.md §3). t must be int32 / int64 in [0, schedule steps);
    index in [0, M) (checked on CPU tensors; on CUDA that check would cost a host sync).

    index (K,) int64: the rows with a nonzero mask (any order, no repeats; the caller vouches
    that mask is zero elsewhere). With index and no mask: the mean over those rows. Without
    index, a mask is turned into rows by `nonzero` (a host sync). checkpoint: recompute the
    head's activations in the backward (torch.utils.checkpoint, non-reentrant)."""
    check_tensor(OP, "target", target, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    m, c = target.shape
    check_tensor(OP, "z", z, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,), shape=(m, None))
    mul = diffusion_batch_mul
    if isinstance(mul, bool) or not isinstance(mul, int) or mul < 1:
        raise ValueError(f"{OP}: diffusion_batch_mul must be an int >= 1, got {mul!r}")
    if mask is not None:
        check_tensor(OP, "mask", mask, ndim=1, shape=(m,))
    if index is not None:
        check_tensor(OP, "index", index, ndim=1, dtypes=(torch.int64, torch.int32))
    if t is not None:
        check_tensor(OP, "t", t, ndim=1, shape=(m * mul,), dtypes=(torch.int64, torch.int32))
    if noise is not None:
        check_tensor(OP, "noise", noise, ndim=2, shape=(m * mul, c), dtypes=(target.dtype,))
    check_same_device(OP, target=target, z=z, mask=mask, index=index, t=t, noise=noise)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{OP}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    sched = schedule or _default_schedule()
    # values: a given t and (on the CPU, where it costs no device sync) a given index must be in range
    if t is not None and t.numel() > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= sched.num_steps:
            raise ValueError(f"{OP}: t must hold timesteps in [0, {sched.num_steps}) (the schedule's steps), got "
                             f"values in [{lo}, {hi}]")
    if index is not None and index.numel() > 0 and index.device.type == "cpu":
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= m:
            raise ValueError(f"{OP}: index must hold row numbers in [0, {m}) (rows of target), got values in "
                             f"[{lo}, {hi}]")
    dev = target.device
    rows = m * mul
    # the reference's draws, in its order
    if t is None:
        t = torch.randint(0, sched.num_steps, (rows,), device=dev, generator=generator)
    if noise is None:
        noise = torch.randn(target.shape[0] * mul, c, device=dev, dtype=target.dtype, generator=generator)
    if index is None and mask is not None:
        index = (mask != 0).nonzero().squeeze(1)  # host sync: pass index to avoid it
    weight = None
    if index is not None:
        k = index.shape[0]
        target = target.index_select(0, index)
        z = z.index_select(0, index)
        t = t.view(mul, m).index_select(1, index).reshape(k * mul)
        noise = noise.view(mul, m, c).index_select(1, index).reshape(k * mul, c)
        if mask is not None:
            weight = mask.index_select(0, index).to(target.dtype)
    else:
        k = m
    tab = _device_tables(sched, dev)
    x_start = target.expand(mul, k, c).reshape(k * mul, c)  # C wide: cheap, and the loss terms need it
    x_t = ref._gather(tab.sqrt_alphas_cumprod, t, x_start) * x_start + \
        ref._gather(tab.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
    if _uses_fast_forward(net):
        kwargs = dict(c_repeats=mul, num_timesteps=sched.num_steps)
        cond = z
    else:
        kwargs, cond = {}, z.repeat(mul, 1)
    if checkpoint and torch.is_grad_enabled():
        out = _checkpoint(net, x_t, t, cond, use_reentrant=False, **kwargs)
    else:
        out = net(x_t, t, cond, **kwargs)
    loss = ref.diffusion_loss_terms(out, x_start, x_t, noise, t, tab)
    if k == 0:  # nothing to predict: the loss is 0, its gradient 0 (a sum over no rows), never NaN
        return loss.sum()
    if mask is None:
        return loss.mean()
    # a mask that is zero on every selected row (index given) also gives 0, not 0 / 0
    total = (mask.to(loss.dtype).sum() * mul).clamp_min(torch.finfo(loss.dtype).tiny)
    return (loss.view(mul, k) * weight.to(loss.dtype)).sum() / total

