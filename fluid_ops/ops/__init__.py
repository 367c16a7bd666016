"""The public ops: argument checks, backend choice, torch.library registration (one module per
op family). Each module lists its public names in __all__."""
from fluid_ops.ops.attention import *  # noqa: F401,F403
from fluid_ops.ops.categorical import *  # noqa: F401,F403
from fluid_ops.ops.ddpm import ddpm_step  # noqa: F401
from fluid_ops.ops.denoiser import *  # noqa: F401,F403
