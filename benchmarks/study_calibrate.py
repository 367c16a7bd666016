"""What one run of `fluid-ops study` costs here: training steps per second of each variant at some
widths (1 thread, the study's protocol), and with --eval the cost of one evaluation (the study's
prompts and sampling) and of the validation loss. Rates are steps per CPU-second of the one
thread, read after 10 warm-up steps: on a machine shared with busier processes they still give
the idle 1-thread rate, which wall time would not.

    python benchmarks/study_calibrate.py --widths 64,128,256 --eval --out calib.jsonl
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="64,128,256")
    ap.add_argument("--variants", default="continuous-random,continuous-raster,discrete-random,discrete-raster")
    ap.add_argument("--steps", type=int, default=50, help="timed after the first 10")
    ap.add_argument("--eval", action="store_true", help="also time one evaluation at the study's --per-category")
    ap.add_argument("--out", default=None, help="append one JSON line per (variant, width)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from fluid_ops import study as S
    from fluid_ops.data import ShapesDataset
    from fluid_ops.eval import evaluate
    from fluid_ops.models import Fluid
    from fluid_ops.training import train
    p = S.make_protocol()
    tr = p["train"]
    for v in args.variants.split(","):
        for w in [int(x) for x in args.widths.split(",")]:
            torch.manual_seed(0)
            model = Fluid(S.variant_config(p, v, w))
            ds = ShapesDataset(size=p["data"]["image_size"], seed=0, kinds=p["data"]["kinds"])
            marks = []
            tmp = tempfile.mkdtemp()
            try:
                train(model, ds, out_dir=tmp, steps=args.steps, batch_size=tr["batch_size"], lr=tr["lr"],
                      warmup_steps=tr["warmup_steps"], lr_decay=tr["lr_decay"], ema_decay=tr["ema_decay"],
                      ckpt_every=10 ** 9, seed=0, device="cpu", amp=tr["precision"], progress=False, log_every=1,
                      tokenizer_fit_images=tr["tokenizer_fit_images"],
                      callback=lambda i: marks.append((i.step, time.thread_time(), time.perf_counter())))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            a, b = marks[9], marks[-1]
            rec = {"variant": v, "width": w, "params": model.num_parameters(),
                   "steps_per_cpu_s": round((b[0] - a[0]) / (b[1] - a[1]), 3),
                   "steps_per_wall_s": round((b[0] - a[0]) / (b[2] - a[2]), 3)}
            if args.eval:
                c0 = time.thread_time()
                prompts, images = S.eval_images(model, p, v)
                evaluate(images, prompts, progress=False, detections=False)
                c1 = time.thread_time()
                S.validation_loss(model, p)
                rec.update(eval_cpu_s=round(c1 - c0, 2), val_loss_cpu_s=round(time.thread_time() - c1, 2),
                           per_category=p["eval"]["per_category"])
            print(json.dumps(rec), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
