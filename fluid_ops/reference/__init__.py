"""Plain-PyTorch implementations of every op of docs/contracts.md §2: the oracle the tests hold each backend
to, and the baseline the benchmarks compare with. Nothing here calls a compiled kernel."""
from fluid_ops.reference.attention import *  # noqa: F401,F403
from fluid_ops.reference.categorical import *  # noqa: F401,F403
from fluid_ops.reference.denoiser import *  # noqa: F401,F403
from fluid_ops.reference.diffusion import (  # noqa: F401
    DiffusionSchedule,
    cosine_betas,
    ddpm_step,
    diffusion_loss,
    diffusion_sample,
    space_timesteps,
)
from fluid_ops.reference.schedules import *  # noqa: F401,F403
