"""`load_run`: a trained Fluid model back from its training run (folder or checkpoint file).

    run = load_run("runs/a")                 # EMA weights, eval mode, on the CPU
    images = fluid_ops.generate(run.model, ["a red circle at the top left"])
    run.config, run.step, run.train_args     # what it was trained as, and how far

Errors are ordinary exceptions with the path in the message: FileNotFoundError (no checkpoint
there), `fluid_ops.checkpoint.CheckpointError` (a damaged or foreign file, or an FSDP folder
not yet consolidated), ValueError (a config this version cannot build).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["load_run", "LoadedRun"]

CHECKPOINT_NAME = "checkpoint.pt"  # fluid_ops.training.CHECKPOINT_NAME (not imported: training is heavier)


@dataclass
class LoadedRun:
    model: torch.nn.Module           # in eval mode, on the requested device
    config: object                   # the model's FluidConfig
    step: int | None                 # optimizer steps the checkpoint was written after
    path: Path                       # the checkpoint file read
    weights: str                     # "ema" or "model" (raw)
    train_args: dict = field(default_factory=dict)


def _checkpoint_file(path) -> Path:
    from fluid_ops import distributed as D
    from fluid_ops.checkpoint import CheckpointError
    p = Path(path)
    if p.is_dir():
        if not (p / CHECKPOINT_NAME).exists() and D.latest_dcp_dir(p) is not None:
            raise CheckpointError(f"{p} holds an FSDP checkpoint ({D.latest_dcp_dir(p).name}): write one file with "
                                  "fluid_ops.distributed.consolidate (fluid-ops consolidate) first")
        p = p / CHECKPOINT_NAME
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p} (give a training run folder or a checkpoint file)")
    return p


def load_run(path: str | os.PathLike, *, ema: bool = True, device=None) -> LoadedRun:
    """The Fluid model of a training run (`path`: its folder or a checkpoint file), with the EMA
    weights (ema=True, when the checkpoint has them) or the raw ones, in eval mode on `device`
    (default CPU). Checkpoints of older versions (a flat config dict) load too."""
    from fluid_ops.checkpoint import CheckpointError, load_checkpoint
    from fluid_ops.models.fluid import Fluid
    p = _checkpoint_file(path)
    state = load_checkpoint(p)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{p}: the checkpoint has no model config (not a Fluid training checkpoint)")
    try:
        model = Fluid.from_config_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: cannot build the model from the checkpoint's config: {e}") from None
    use_ema = ema and state.get("ema") is not None
    model.load_state_dict(state["ema"] if use_ema else state["model"], strict=True)
    model = model.to(device or torch.device("cpu")).eval()
    return LoadedRun(model=model, config=model.config, step=state.get("step"), path=p,
                     weights="ema" if use_ema else "model", train_args=dict(state.get("train_args") or {}))
