"""A picture of a finished `fluid-ops study`: one row per variant (its seed-0 run at the base width,
final EMA snapshot), one column per prompt, sampled exactly as the study scored it (the
protocol's per-variant CFG / temperature, the same sample seed), each image marked by the
evaluator's verdict.

    python benchmarks/study_samples.py --study study/ --out study/samples.png

Prompts: the first `--per-category` prompts of each GenEval category from the study's own prompt
list, so the grid shows images the study's table counted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fluid_ops import study as S
from fluid_ops.eval import evaluate
from fluid_ops.models import load_run
from fluid_ops.viz import save_image_grid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, help="a finished study folder (holds study.json and runs/)")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--per-category", type=int, default=2, help="prompts per category in the grid")
    ap.add_argument("--seed", type=int, default=None, help="which training seed's runs (default: the first)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    root = Path(a.study)
    if not (root / "study.json").is_file():
        sys.exit(f"study_samples: {root / 'study.json'} not found (run `fluid-ops study --out {root}` first)")
    if a.per_category < 1:
        sys.exit("study_samples: --per-category must be >= 1")
    study = json.loads((root / "study.json").read_text())
    p = study["protocol"]
    seed = p["seeds"][0] if a.seed is None else a.seed
    if seed not in p["seeds"]:
        sys.exit(f"study_samples: --seed {seed} is not among the study's seeds {p['seeds']}")
    if a.threads:
        torch.set_num_threads(a.threads)
    images, labels, rows = [], [], []
    for v in S.VARIANTS:
        rid = f"{v}-w{p['model']['base_width']}-s{seed}"
        run_dir = root / "runs" / rid
        snaps = sorted(run_dir.glob("snapshot-*.pt"), key=lambda q: int(q.stem.split("-")[1]))
        if not snaps:
            sys.exit(f"study_samples: no snapshot in {run_dir} (the committed results keep none: use the study's "
                     "own output folder)")
        run = load_run(snaps[-1])
        # the study samples all its prompts in one seeded call: redo that call so each image is the
        # very one the table scored, then keep the grid's prompts
        prompts_all, imgs = S.eval_images(run.model, p, v)
        keep = [i for c in p["eval"]["categories"]
                for i in [j for j, q in enumerate(prompts_all) if q.category == c][:a.per_category]]
        prompts = [prompts_all[i] for i in keep]
        rep = evaluate(imgs[keep], prompts, progress=False, detections=False)
        images.append(imgs[keep].float())
        labels += [f"{'OK' if r['correct'] else 'x'} {q.text}" for q, r in zip(prompts, rep["prompts"])]
        rows.append(f"{v}, step {run.step}: {rep['overall']:.2f} on these {len(prompts)}")
        print(rows[-1], flush=True)
    out = save_image_grid(torch.cat(images), a.out, nrow=len(prompts), labels=labels, row_labels=rows, scale=3,
                          label_wrap=18)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
