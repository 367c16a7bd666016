"""Train a Fluid model on synthetic captioned shapes (or edit the dataset line for your own data).

    python python/train_fluid.py --config tiny --out runs/a --minutes 10
    python python/train_fluid.py --config tiny --out runs/a --minutes 10    # again: resumes runs/a
    python python/train_fluid.py --config tiny --set model.depth=6 --out runs/b --steps 2000 --lr 2e-3

Writes runs/a/checkpoint.pt (+ checkpoint.prev.pt), history.json and loss.png. Kill it at any
time: the next run with the same --out continues from the last checkpoint, exactly.
"""
import argparse
import json

import torch

from fluid_ops.data import ShapesDataset
from fluid_ops.models import Fluid
from fluid_ops.training import train


def override(item: str):
    """--set key=value, the value read as JSON when it parses (numbers, bools, lists)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                             formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
ap.add_argument("--config", default="tiny", help="a name from fluid_ops.models.fluid.CONFIGS")
ap.add_argument("--set", type=override, action="append", default=[], metavar="KEY=VALUE",
                help="override a config field, e.g. model.depth=6 (repeatable; old flat names still work)")
ap.add_argument("--out", required=True, help="run folder (resumed if it holds a checkpoint)")
ap.add_argument("--steps", type=int, default=None, help="total optimizer steps")
ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget of this run")
ap.add_argument("--batch-size", type=int, default=64)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
ap.add_argument("--weight-decay", type=float, default=0.02)
ap.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
ap.add_argument("--grad-clip", type=float, default=1.0, help="0: no clipping")
ap.add_argument("--ema-decay", type=float, default=0.999)
ap.add_argument("--ckpt-every", type=int, default=500)
ap.add_argument("--log-every", type=int, default=10)
ap.add_argument("--seed", type=int, default=0, help="model init, data order, per-step randomness")
ap.add_argument("--data-length", type=int, default=100_000, help="synthetic images in the dataset")
ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
ap.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto")
ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
ap.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
ap.add_argument("--no-progress", action="store_true")
args = ap.parse_args()
if args.steps is None and args.minutes is None:
    ap.error("give --steps and/or --minutes")

torch.manual_seed(args.seed)  # model init
model = Fluid(args.config, **dict(args.set))
dataset = ShapesDataset(size=model.config.image.size, length=args.data_length, seed=args.seed)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"Fluid {args.config}: {trainable / 1e6:.2f}M trainable parameters; {len(dataset)} images; out {args.out}")

result = train(model, dataset, out_dir=args.out, steps=args.steps, minutes=args.minutes,
               batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
               betas=tuple(args.betas), grad_clip=args.grad_clip or None, ema_decay=args.ema_decay,
               ckpt_every=args.ckpt_every, log_every=args.log_every, seed=args.seed, device=args.device,
               amp=args.amp, num_workers=args.workers, resume=not args.no_resume, progress=not args.no_progress)
loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
print(f"step {result.step} ({result.stopped_by}), last loss {loss}, {result.elapsed_s / 60:.1f} min of training; "
      f"{result.checkpoint_path}, history.json, loss.png")
