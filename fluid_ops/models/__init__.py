"""Models assembled from fluid_ops' modules: MAR (class-conditional) and Fluid (text-to-image)."""
from fluid_ops.models.mar import MAR, mar_base, mar_huge, mar_large  # noqa: F401
from fluid_ops.models.fluid import CONFIGS, Fluid, FluidConfig  # noqa: F401
from fluid_ops.models.runs import LoadedRun, load_run  # noqa: F401

__all__ = ["MAR", "mar_base", "mar_large", "mar_huge", "Fluid", "FluidConfig", "CONFIGS", "load_run", "LoadedRun"]
