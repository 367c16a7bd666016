"""fluid_ops: fast kernels and models for Fluid / MAR-style continuous-token image generation.

    import fluid_ops
    fluid_ops.backends()                      # what is available, and why not
    with fluid_ops.use_backend("reference"):  # force one (or FLUID_OPS_BACKEND=...)
        ...
"""
from fluid_ops.backend import backends, use_backend  # noqa: F401
from fluid_ops.ops import *  # noqa: F401,F403
from fluid_ops.ops import ddpm_step  # noqa: F401
from fluid_ops.reference.diffusion import DiffusionSchedule  # noqa: F401
from fluid_ops.sampling import *  # noqa: F401,F403
from fluid_ops import models, nn, reference  # noqa: F401,E402

from fluid_ops.accelerate import accelerate  # noqa: F401,E402
from fluid_ops.generate import generate  # noqa: F401,E402
from fluid_ops import data, eval  # noqa: F401,E402  (fluid_ops.eval: the GenEval-style evaluator)
# fluid_ops.train(model, dataset, ...): the training loop (module fluid_ops.training)
from fluid_ops.training import train  # noqa: F401,E402

from fluid_ops._version import __version__  # noqa: F401,E402
