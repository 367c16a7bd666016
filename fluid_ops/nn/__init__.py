"""Drop-in modules built on fluid_ops' ops."""
from fluid_ops.nn.denoiser import *  # noqa: F401,F403
from fluid_ops.nn.transformer import *  # noqa: F401,F403
from fluid_ops.nn.diffusion import *  # noqa: F401,F403
from fluid_ops.nn.diffloss import *  # noqa: F401,F403
