"""`DiffLoss`: MAR's per-token diffusion head (arXiv 2406.11838) as a module, shared by MAR and
the continuous Fluid variant. Parameter names as MAR's (`diffloss.net.*`), so MAR checkpoints load."""
from __future__ import annotations

import torch.nn as nn

from fluid_ops import sampling
from fluid_ops.nn.denoiser import DenoiserMLP
from fluid_ops.nn.diffusion import diffusion_loss
from fluid_ops.reference import diffusion as ref_diffusion

__all__ = ["DiffLoss"]


class DiffLoss(nn.Module):
    """MAR's diffusion head: `net` is the denoiser MLP (names `diffloss.net.*`). The keyword
    `num_sampling_steps` is MAR's name for the diffusion steps per token when sampling."""

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: int, grad_checkpointing: bool = False, noise_shift: float = 1.0):
        super().__init__()
        self.in_channels = target_channels
        self.num_sampling_steps = num_sampling_steps
        self.grad_checkpointing = grad_checkpointing
        self.net = DenoiserMLP(target_channels, width, 2 * target_channels, z_channels, depth)
        # noise_shift != 1 (Fluid's option, never MAR's): the shifted cosine schedule, in training and sampling
        self.train_schedule = ref_diffusion.DiffusionSchedule(None, noise_shift=noise_shift)
        self.noise_shift = self.train_schedule.noise_shift

    def forward(self, target, z, mask=None, *, diffusion_batch_mul: int = 1, generator=None, index=None):
        """Mean diffusion loss over rows with mask 1, each row with diffusion_batch_mul t-draws
        (`fluid_ops.nn.diffusion_loss`: the same value and draws as MAR's loss, the head run on
        the masked rows only, z not repeated). index: the rows with mask 1, if known (no sync)."""
        # grad checkpointing: the head's activations are recomputed too, as MAR does
        return diffusion_loss(self.net, target, z, mask, index=index, diffusion_batch_mul=diffusion_batch_mul,
                              generator=generator, schedule=self.train_schedule,
                              checkpoint=self.grad_checkpointing and self.training)

    def sample(self, z, temperature=1.0, cfg=1.0, generator=None, gemm_dtype=None, *, num_steps=None, solver="ddpm",
               eta=0.0, clip_denoised=False):
        """MAR's DiffLoss.sample; gemm_dtype, num_steps (default num_sampling_steps), solver, eta and
        clip_denoised (off, as MAR: VAE latents are unbounded): see fluid_ops.diffusion_sample."""
        return sampling.diffusion_sample(self.net, z, num_steps=self.num_sampling_steps if num_steps is None else num_steps,
                                         temperature=temperature, cfg=cfg, generator=generator,
                                         noise_shift=self.noise_shift, gemm_dtype=gemm_dtype, solver=solver, eta=eta,
                                         clip_denoised=clip_denoised)
