"""How well the rule-based shapes detector (fluid_ops.eval) reads the generator's own renders.

For each size and degradation (Gaussian blur in pixels at size 32, scaled with the size;
additive Gaussian noise; optional contrast loss toward the background) it renders one image per
GenEval-style prompt, scores them with `fluid_ops.eval.evaluate` and prints per-category
accuracy and the detector's time per image. With --shuffle it also scores each prompt
against another prompt's image of the same category (a floor: what chance gets).

    python benchmarks/detector_accuracy.py --per-category 100 --sizes 32 64 --out det.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from fluid_ops.data import degrade
from fluid_ops.eval import CATEGORIES, evaluate, geneval_prompts, render_spec

CONDITIONS = {  # name: (blur px at size 32, noise std, contrast)
    "clean": (0.0, 0.0, 1.0),
    "mild": (0.6, 0.06, 1.0),
    "heavy": (1.0, 0.10, 1.0),
    "dim+mild": (0.6, 0.06, 0.6),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=100)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shuffle", action="store_true", help="also score against other prompts' images")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    prompts = geneval_prompts(args.per_category, seed=args.seed)
    rows = []
    header = f"{'size':>4} {'condition':<9} " + " ".join(f"{c[:12]:>12}" for c in CATEGORIES) + f" {'overall':>8} {'ms/img':>7}"
    print(header)
    for size in args.sizes:
        clean = torch.stack([render_spec(p.spec, size, seed=args.seed * 100_000 + i) for i, p in enumerate(prompts)])
        for cond in args.conditions:
            blur, noise, contrast = CONDITIONS[cond]
            images = degrade(clean, blur_px=blur * size / 32, noise=noise, contrast=contrast,
                             generator=torch.Generator().manual_seed(args.seed))
            t0 = time.perf_counter()
            result = evaluate(images, prompts, detections=False, progress=False)
            ms = (time.perf_counter() - t0) / len(prompts) * 1e3
            acc = {c: result["categories"][c]["accuracy"] for c in CATEGORIES}
            row = {"size": size, "condition": cond, "blur_px_at_32": blur, "noise": noise, "contrast": contrast,
                   "overall": result["overall"], "categories": result["categories"], "ms_per_image": ms}
            rows.append(row)
            print(f"{size:>4} {cond:<9} " + " ".join(f"{acc[c]:>12.3f}" for c in CATEGORIES)
                  + f" {result['overall']:>8.3f} {ms:>7.2f}")
            if args.shuffle and cond == "clean":
                perm = np.random.default_rng(args.seed).permutation(args.per_category)
                n = args.per_category
                shuffled = images[[n * (i // n) + perm[i % n] for i in range(len(prompts))]]
                r = evaluate(shuffled, prompts, detections=False, progress=False)
                acc = {c: r["categories"][c]["accuracy"] for c in CATEGORIES}
                rows.append({"size": size, "condition": "shuffled", "overall": r["overall"], "categories": r["categories"]})
                print(f"{size:>4} {'shuffled':<9} " + " ".join(f"{acc[c]:>12.3f}" for c in CATEGORIES)
                      + f" {r['overall']:>8.3f}")
    if args.out:
        meta = {"per_category": args.per_category, "seed": args.seed, "torch": torch.__version__,
                "numpy": np.__version__, "machine": platform.machine(), "processor": platform.processor()}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
