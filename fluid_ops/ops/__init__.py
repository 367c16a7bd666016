"""The public ops: argument checks, backend choice, torch.library registration (one module per
op family)."""
from fluid_ops.ops.ddpm import ddpm_step  # noqa: F401
