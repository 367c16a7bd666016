"""`fluid-ops prepare`: encode a data set once into shards of cached image tokens (VAE latents
or pixel patches) and frozen text-encoder outputs, so training never runs either per step.

    fluid-ops prepare --config fluid-166m --set image.tokenizer=vae --set image.vae_path=/models/kl16 \\
        --data /data/pairs --out /data/prepared
    torchrun --nproc_per_node 8 -m fluid_ops prepare ...      # each rank encodes its own shards
    fluid-ops train --config fluid-166m --set ... --data /data/prepared --out runs/a ...

Per sample the shard holds `KEY.tokens.npy` (views, L, C) float32, `KEY.text.npy` (n, D)
float32 (the encoder's output for the caption's n tokens, no padding) and `KEY.txt`. With
`flip` (the default for image data; off for the synthetic shapes, whose captions name left and
right), view 1 is the tokens of the left-right flipped image, as MAR caches its latents both
ways: training draws one view per image per step from the step generator. The VAE encodes to
the posterior mean, as `Fluid` does when it encodes images itself, so a cache with one view
gives the same loss as the images. `prepared.json` (written last) records what the cache was
encoded with; training refuses a model whose tokenizer or text encoder differs.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from fluid_ops.data.shards import PREPARED_META, write_shards

__all__ = ["prepare", "MODEL_FIELDS"]

# The config fields a cache depends on (checked against the model at training time), by the flat
# names prepared.json has always used (FluidConfig.flat_dict).
MODEL_FIELDS = ("tokenizer", "image_size", "patch_size", "vae_path", "text_encoder", "text_max_length", "text_layer")


def prepare(dataset, out_dir, config, *, flip: bool = True, batch_size: int = 64, samples_per_shard: int = 1000,
            limit: int | None = None, device=None, progress: bool = True, num_workers: int = 0,
            collate_fn=None) -> Path:
    """Encode `dataset` (items `(image (3, H, W) in [0, 1], caption)`) for the model `config`
    (a FluidConfig, or a name from CONFIGS) into shards in `out_dir`. Under torchrun, rank r
    writes shards r, r + N, ... and rank 0 writes `prepared.json` when all are done."""
    from fluid_ops import distributed as D
    from fluid_ops.models.fluid import resolve_config
    from fluid_ops.nn.text import build_text_encoder
    from fluid_ops.nn.tokenizers import build_tokenizer
    cfg = resolve_config(config) if isinstance(config, str) else config
    if cfg.token_kind != "continuous" or cfg.image.tokenizer == "kmeans":
        raise ValueError("prepare: caches continuous tokens (tokenizer 'patch' or 'vae'); the k-means tokenizer "
                         f"is fitted per run, so its codes are not cached (config image.tokenizer="
                         f"{cfg.image.tokenizer!r})")
    for name, v, lo in (("batch_size", batch_size, 1), ("samples_per_shard", samples_per_shard, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if n < 1:
        raise ValueError("prepare: the data set is empty (or limit < 1)")
    ctx, device = D.setup(device)
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        (out / PREPARED_META).unlink(missing_ok=True)  # incomplete until written again
    ctx.barrier()
    im, tx = cfg.image, cfg.text
    tokenizer = build_tokenizer(im.tokenizer, image_size=im.size, patch_size=im.patch_size,
                                codebook_size=im.codebook_size, vae_path=im.vae_path).to(device)
    text = build_text_encoder(tx.encoder, max_length=tx.max_length, cache_size=0, layer=tx.layer).to(device)
    from fluid_ops.data.folder import collate
    collate_fn = collate_fn or collate
    n_shards = math.ceil(n / samples_per_shard)
    mine = list(range(ctx.rank, n_shards, ctx.world_size))
    width = max(9, len(str(n - 1)))
    t0 = time.monotonic()

    def samples():
        for shard in mine:
            idx = list(range(shard * samples_per_shard, min(n, (shard + 1) * samples_per_shard)))
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size,
                                                 collate_fn=collate_fn, num_workers=num_workers)
            done = 0
            for images, captions in loader:
                images = images.to(device)
                with torch.no_grad():
                    views = [tokenizer.encode(images)]
                    if flip:
                        views.append(tokenizer.encode(images.flip(-1)))
                    tokens = torch.stack(views, 1).float().cpu().numpy()
                    emb, mask = text.encode(list(captions), device=device)
                    emb, lengths = emb.float().cpu().numpy(), mask.sum(1).tolist()
                for j, cap in enumerate(captions):
                    i = idx[done + j]
                    yield {"__key__": f"{i:0{width}d}", "tokens.npy": tokens[j],
                           "text.npy": emb[j, :lengths[j]], "txt": cap}
                done += len(captions)
                if progress and ctx.is_main:
                    print(f"\r[prepare] rank 0: shard {shard} {done}/{len(idx)} ({time.monotonic() - t0:.0f} s)",
                          end="", flush=True)

    # every shard of `mine` but the global last is full, so cutting the stream every
    # samples_per_shard samples numbers the shards mine[0], mine[0] + N, ... = mine
    if mine:
        write_shards(samples(), out, samples_per_shard=samples_per_shard, first_shard=mine[0],
                     stride=ctx.world_size)
    if progress and ctx.is_main:
        print()
    ctx.barrier()
    if ctx.is_main:
        shards = sorted(p.name for p in out.glob("shard-*.tar"))
        if len(shards) != n_shards:
            raise RuntimeError(f"prepare: expected {n_shards} shards in {out}, found {len(shards)} (stale shards "
                               "from an earlier run with other settings? use an empty folder)")
        meta = {"format": "fluid_ops.prepared/1", "n": n, "views": 2 if flip else 1, "flip": bool(flip),
                "shards": shards, "samples_per_shard": samples_per_shard,
                "token_shape": [tokenizer.num_tokens, tokenizer.token_dim], "text_dim": text.dim,
                "model": {k: v for k, v in cfg.flat_dict().items() if k in MODEL_FIELDS}, "source": repr(dataset),
                "seconds": round(time.monotonic() - t0, 2), "world_size": ctx.world_size,
                "torch_version": torch.__version__}
        tmp = out / f".{PREPARED_META}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out / PREPARED_META)
    ctx.barrier()
    return out
