"""`fluid_ops.generate(model, prompts, ...)`: images for a list of prompts, in batches.

    images = fluid_ops.generate(model, ["a red circle at the top left"] * 100, batch_size=32, seed=0)

One `torch.Generator` on the model's device, seeded once with `seed`, drives every batch in turn:
the same (prompts, batch_size, seed, sampling settings) give the same images. Changing batch_size
changes which draws each image gets (as with any batched sampler).
"""
from __future__ import annotations

import torch

__all__ = ["generate"]


def generate(model, prompts: list[str], *, batch_size: int = 16, seed: int = 0, progress: bool = True,
             **sampling_kwargs) -> torch.Tensor:
    """(N, 3, H, W) float32 images in [0, 1] on the model's device, one per prompt.

    model: a `fluid_ops.models.Fluid` (anything with `generate(prompts, generator=..., **kw)` and
    `device`). sampling_kwargs go to `model.generate` (num_iter, cfg, cfg_schedule, temperature,
    num_diffusion_steps, ...). progress: a bar over batches (tqdm; off when stderr is not a tty)."""
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"generate: model must have a generate method (a fluid_ops.models.Fluid), got "
                        f"{type(model).__name__}")
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"generate: prompts must be a list of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("generate: prompts is empty; give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"generate: prompts[{i}] must be a non-empty str, got {p!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"generate: batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"generate: seed must be an int, got {seed!r}")
    if "generator" in sampling_kwargs:
        raise ValueError("generate: pass seed=..., not generator= (one generator is made from the seed)")
    device = getattr(model, "device", torch.device("cpu"))
    generator = torch.Generator(device=device).manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompts), desc="generate", unit="img", disable=None)
    out = []
    try:
        for s in range(0, len(prompts), batch_size):
            batch = list(prompts[s:s + batch_size])
            out.append(model.generate(batch, generator=generator, **sampling_kwargs))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(out)
