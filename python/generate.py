"""Prompts in, a PNG grid out (one row per prompt), from a trained Fluid checkpoint.

    python python/generate.py --ckpt runs/demo/run --prompt "a red circle at the top left" \
        --prompt "a blue square at the centre" -n 8 --cfg 5 --temperature 0.975 --out grid.png
"""
import argparse

import torch

import fluid_ops
from fluid_ops.models import load_run
from fluid_ops.viz import save_image_grid

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--ckpt", required=True, help="training run folder or checkpoint file")
ap.add_argument("--prompt", action="append", required=True)
ap.add_argument("-n", type=int, default=4, help="images per prompt")
ap.add_argument("--num-iter", type=int, default=None, help="AR steps (default: the config's)")
ap.add_argument("--cfg", type=float, default=None)
ap.add_argument("--temperature", type=float, default=None)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--raw-weights", action="store_true", help="not the EMA weights")
ap.add_argument("--out", default="grid.png")
args = ap.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
model = load_run(args.ckpt, ema=not args.raw_weights, device=device).model
prompts = [p for p in args.prompt for _ in range(args.n)]
kw = {k: v for k, v in dict(num_iter=args.num_iter, cfg=args.cfg, temperature=args.temperature).items() if v is not None}
images = fluid_ops.generate(model, prompts, seed=args.seed, **kw)
save_image_grid(images, args.out, nrow=args.n, row_labels=args.prompt, scale=max(1, 96 // images.shape[-1]))
print(f"wrote {args.out}")
