"""IDDPM diffusion as MAR uses it (docs/contracts.md §2.3), in plain PyTorch / NumPy: schedule tables,
the training loss with learned-range variance, the reverse step and the sampling loop.

Tables are computed in float64 (as IDDPM does) and handed to kernels as float32."""
from __future__ import annotations

import math

import numpy as np
import torch

# Columns of DiffusionSchedule.table: the per-step constants one reverse step needs.
TABLE_COLUMNS = ("coef1", "coef2", "sqrt_recip_acp", "sqrt_recipm1_acp", "min_log", "max_log")


def check_noise_shift(owner: str, noise_shift) -> float:
    """noise_shift as a float, after checking it is a finite number > 0."""
    if isinstance(noise_shift, bool) or not isinstance(noise_shift, (int, float)) \
            or not math.isfinite(noise_shift) or noise_shift <= 0:
        raise ValueError(f"{owner}: noise_shift must be a finite number > 0, got {noise_shift!r}")
    return float(noise_shift)


def cosine_alpha_bar(s: np.ndarray | float, num_steps: int = 1000, shift: float = 1.0):
    """alpha_bar(s) = cos(((s / T + 0.008) / 1.008) * pi / 2) ** 2.

    shift k != 1: the shifted cosine schedule (Hoogeboom et al., "simple diffusion", 2023): the
    signal-to-noise ratio alpha_bar / (1 - alpha_bar) of every step divided by k ** 2, i.e.
    alpha_bar / (alpha_bar + k ** 2 (1 - alpha_bar)). Noising tokens x on the shifted schedule is
    noising x / k on the plain one (up to a scale of x_t); k > 1 moves the steps where a token's
    content is decided towards lower t, where the eps loss weighs it more."""
    ab = np.cos(((np.asarray(s, dtype=np.float64) / num_steps + 0.008) / 1.008) * math.pi / 2) ** 2
    if shift == 1.0:
        return ab
    return ab / (ab + shift * shift * (1.0 - ab))


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999, shift: float = 1.0) -> np.ndarray:
    """beta_i = min(1 - alpha_bar(i + 1) / alpha_bar(i), max_beta), i = 0..T-1 (float64)."""
    i = np.arange(num_steps, dtype=np.float64)
    return np.minimum(1.0 - cosine_alpha_bar(i + 1, num_steps, shift) / cosine_alpha_bar(i, num_steps, shift),
                      max_beta)


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """IDDPM's evenly spaced respacing of one section: `count` original steps out of `num_steps`,
    always including the first and the last. IDDPM advances a running float index by the stride
    and rounds it (Python's round); accumulating differs from rounding i * stride for some counts
    (21, 23, 31, ...), and MAR's checkpoints were sampled with IDDPM's steps, so we accumulate."""
    if count <= 0 or count > num_steps:
        raise ValueError(f"space_timesteps: count must be in [1, {num_steps}], got {count}")
    if count == 1:
        return [0]
    stride = (num_steps - 1) / (count - 1)
    kept, index = set(), 0.0
    for _ in range(count):
        kept.add(round(index))
        index += stride
    return sorted(kept)


class DiffusionSchedule:
    """All IDDPM quantities of a (possibly respaced) cosine schedule.

    `timesteps[i]` is the ORIGINAL step index of respaced step i: the value the model is fed.
    noise_shift: the SNR of every step divided by noise_shift ** 2 (`cosine_alpha_bar`); 1 is
    MAR's schedule. Training and sampling must use the same value.
    """

    def __init__(self, num_sampling_steps: int | None = None, num_train_steps: int = 1000, *,
                 noise_shift: float = 1.0):
        self.noise_shift = check_noise_shift("DiffusionSchedule", noise_shift)
        base = cosine_betas(num_train_steps, shift=self.noise_shift)
        if num_sampling_steps is None or num_sampling_steps == num_train_steps:
            betas, kept = base, list(range(num_train_steps))
        else:
            kept = space_timesteps(num_train_steps, num_sampling_steps)
            acp = np.cumprod(1.0 - base)
            betas, last = [], 1.0
            for i in kept:  # recompute betas from the kept alpha_bars
                betas.append(1.0 - acp[i] / last)
                last = acp[i]
            betas = np.asarray(betas, dtype=np.float64)
        self.num_steps = len(betas)
        self.timesteps = np.asarray(kept, dtype=np.int64)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1.0)
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        if self.num_steps > 1:
            pv = self.posterior_variance
            self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:]))
        else:
            self.posterior_log_variance_clipped = np.log(betas)  # degenerate 1-step schedule
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
        self.log_betas = np.log(betas)
        self._tables: dict = {}

    def table(self, device="cpu") -> torch.Tensor:
        """(S, 6) float32 on `device`, columns TABLE_COLUMNS; cached per device."""
        device = torch.device(device)
        if device not in self._tables:
            cols = [self.posterior_mean_coef1, self.posterior_mean_coef2,
                    self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod,
                    self.posterior_log_variance_clipped, self.log_betas]
            self._tables[device] = torch.tensor(np.stack(cols, 1), dtype=torch.float32, device=device)
        return self._tables[device]

    def model_timesteps(self, device="cpu") -> torch.Tensor:
        """(S,) int64: the original step index fed to the model at respaced step i."""
        return torch.as_tensor(self.timesteps, device=device)


def _gather(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(arr, dtype=torch.float64, device=t.device)[t]
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def ddpm_step(x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor, table: torch.Tensor,
              step: int, *, temperature: float = 1.0, cfg: float = 1.0,
              clip_denoised: bool = False) -> torch.Tensor:
    """One reverse step (docs/contracts.md §2.3), in fp32, from one row of `table`; clip_denoised clamps the
    predicted x_0 = a x - b eps to [-1, 1] (IDDPM's option) before the posterior mean.

    model_out is (N, 2C), or (2N, 2C) = [cond; uncond] for guidance: eps = eps_u + cfg * (eps_c - eps_u),
    variance channel from the cond half. Noise is added iff step > 0."""
    n, c = x.shape
    mo = model_out.float()
    eps, v = mo[:n, :c], mo[:n, c:]
    if mo.shape[0] == 2 * n:
        eps_u = mo[n:, :c]
        eps = eps_u + cfg * (eps - eps_u)
    c1, c2, a, b, min_log, max_log = table[step].float().unbind(0)
    frac = (v + 1.0) * 0.5
    logvar = frac * max_log + (1.0 - frac) * min_log
    xf = x.float()
    xstart = a * xf - b * eps
    if clip_denoised:
        xstart = xstart.clamp(-1.0, 1.0)
    out = c1 * xstart + c2 * xf
    if step > 0:
        out = out + torch.exp(0.5 * logvar) * temperature * noise.float()
    return out.to(x.dtype)


def draw_sampling_noise(n: int, channels: int, num_steps: int, *, device="cpu",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(num_steps + 1, n, channels) float32: [0] is x_T, [i + 1] the noise of loop iteration i."""
    return torch.randn(num_steps + 1, n, channels, device=device, generator=generator)


def diffusion_sample(net, z: torch.Tensor, *, num_steps: int = 100, temperature: float = 1.0,
                     cfg: float = 1.0, noise: torch.Tensor | None = None,
                     generator: torch.Generator | None = None,
                     schedule: DiffusionSchedule | None = None, clip_denoised: bool = False) -> torch.Tensor:
    """The reference sampling loop, as MAR runs it: every step evaluates `net(x, t, z)` on all
    rows ([x; x] against [z_cond; z_uncond] when cfg != 1) and applies `ddpm_step`.

    z: (N, Z), or (2N, Z) = [cond; uncond] when cfg != 1. Returns (N, C) float32, C = net.in_channels."""
    sched = schedule or DiffusionSchedule(num_steps)
    guided = cfg != 1.0
    n = z.shape[0] // 2 if guided else z.shape[0]
    c = net.in_channels
    if noise is None:
        noise = draw_sampling_noise(n, c, sched.num_steps, device=z.device, generator=generator)
    table = sched.table(z.device)
    ts = sched.model_timesteps(z.device)
    x = noise[0].float()
    for i, step in enumerate(range(sched.num_steps - 1, -1, -1)):
        xin = torch.cat([x, x]) if guided else x
        t = ts[step].expand(xin.shape[0])
        model_out = net(xin, t, z)
        x = ddpm_step(x, model_out, noise[i + 1], table, step, temperature=temperature, cfg=cfg,
                      clip_denoised=clip_denoised)
    return x


# ---- training loss (IDDPM learned-range variance, MSE on eps + VLB) -----------------------

def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def diffusion_loss_terms(model_out: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                         noise: torch.Tensor, t: torch.Tensor, sched: DiffusionSchedule) -> torch.Tensor:
    """Per-row loss = MSE(eps) + VLB (bits/dim), the VLB with a stop-gradient on the mean."""
    c = x_start.shape[1]
    eps, v = model_out[:, :c], model_out[:, c:]
    mse = ((noise - eps) ** 2).mean(1)
    # VLB term: mean from the detached eps, variance from v (gradient flows into v only).
    min_log = _gather(sched.posterior_log_variance_clipped, t, x_t)
    max_log = _gather(sched.log_betas, t, x_t)
    frac = (v + 1.0) / 2.0
    model_logvar = frac * max_log + (1.0 - frac) * min_log
    pred_x0 = _gather(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t - \
        _gather(sched.sqrt_recipm1_alphas_cumprod, t, x_t) * eps.detach()
    c1, c2 = _gather(sched.posterior_mean_coef1, t, x_t), _gather(sched.posterior_mean_coef2, t, x_t)
    model_mean = c1 * pred_x0 + c2 * x_t
    true_mean = c1 * x_start + c2 * x_t
    kl = _normal_kl(true_mean, min_log, model_mean, model_logvar).mean(1) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_logvar).mean(1) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return mse + vb


def diffusion_loss(net, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None, *,
                   diffusion_batch_mul: int = 4, t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   schedule: DiffusionSchedule | None = None) -> torch.Tensor:
    """MAR's diffusion loss: target (M, C) tokens, z (M, Z) conditions, mask (M,) (1 = predict).
    Each row is repeated `diffusion_batch_mul` times with independent t and noise (drawn from
    `generator` unless given: t (M * mul,), noise (M * mul, C)); the mean is over masked rows."""
    sched = schedule or DiffusionSchedule(None)
    target = target.repeat(diffusion_batch_mul, 1)
    z = z.repeat(diffusion_batch_mul, 1)
    rows = target.shape[0]
    if t is None:
        t = torch.randint(0, sched.num_steps, (rows,), device=target.device, generator=generator)
    if noise is None:
        noise = torch.randn(target.shape, device=target.device, dtype=target.dtype, generator=generator)
    x_t = _gather(sched.sqrt_alphas_cumprod, t, target) * target + \
        _gather(sched.sqrt_one_minus_alphas_cumprod, t, target) * noise
    loss = diffusion_loss_terms(net(x_t, t, z), target, x_t, noise, t, sched)
    if mask is None:
        return loss.mean()
    mask = mask.to(loss.dtype).repeat(diffusion_batch_mul)
    # a mean over no rows is 0 (zero gradient), not 0 / 0: docs/contracts.md §2.3
    return (loss * mask).sum() / mask.sum().clamp(min=1)
