"""Score a trained Fluid checkpoint on the GenEval-style synthetic-shapes prompts.

    python python/evaluate.py --ckpt runs/demo/run --per-category 48 --out eval.json
"""
import argparse
import json

import torch

import fluid_ops
from fluid_ops.models import load_run
from fluid_ops.eval import evaluate, geneval_prompts

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--ckpt", required=True, help="training run folder or checkpoint file")
ap.add_argument("--per-category", type=int, default=24)
ap.add_argument("--categories", default=None, help="comma-separated, e.g. single_object,colors")
ap.add_argument("--cfg", type=float, default=None)
ap.add_argument("--temperature", type=float, default=None)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", default="eval.json")
args = ap.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
model = load_run(args.ckpt, device=device).model
prompts = geneval_prompts(per_category=args.per_category, seed=args.seed,
                          categories=args.categories.split(",") if args.categories else None)
kw = {k: v for k, v in dict(cfg=args.cfg, temperature=args.temperature).items() if v is not None}
images = fluid_ops.generate(model, [p.text for p in prompts], seed=args.seed, **kw)
report = evaluate(images, prompts)
with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
for name, r in report["categories"].items():
    print(f"{name:<16} {r['accuracy']:.3f}  (n={r['n']})")
print(f"{'overall':<16} {report['overall']:.3f}; wrote {args.out}")
