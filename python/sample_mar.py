"""Sample class-conditional images from MAR (fluid_ops.models.MAR): class labels in, VAE latents
(and images, when a VAE decoder is given) out, plus a grid PNG.

    # a published MAR checkpoint (LTH14/mar's checkpoint-last.pth), EMA weights, 4 images of 3 classes
    python python/sample_mar.py --model mar_base --ckpt pretrained/mar_base/checkpoint-last.pth \
        --labels 207 360 387 --num-per-class 4 --cfg 2.9 --vae pretrained/kl16-diffusers --out samples
    # our own safetensors file (MAR.save)
    python python/sample_mar.py --weights mar_base.safetensors --labels 207 --num-per-class 8
    # try it on a CPU: a tiny random-weight MAR, latents + a grid of their first 3 channels
    python python/sample_mar.py --model tiny --labels 1 2 3 --num-per-class 2 --num-iter 4 --out /tmp/mar

Writes to --out: latents.pt ({"latents": (N, 16, h, w) float32, "labels": (N,)}) or, with
--latents-format npy, latents.npy + labels.npy; with --vae, images/NNNNN_classL.png and grid.png
of the decoded images; without, grid.png of the latents' first 3 channels (latents_preview).
The latents are MAR's scaled ones (MAR trains on VAE latents x 0.2325); they are divided by
--vae-scale before decoding, as MAR does. --vae takes a local diffusers AutoencoderKL folder
(needs `pip install diffusers`; nothing is downloaded). One generator seeded by --seed drives all
batches in order, so a given seed and --batch-size give the same samples every run.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

from fluid_ops.models.mar import FACTORIES, MAR  # noqa: E402
from fluid_ops.viz import latents_preview, save_image_grid  # noqa: E402

MODELS = {"mar_base": "mar_base", "mar_large": "mar_large", "mar_huge": "mar_huge", "tiny": "mar_tiny"}
PAPER_CFG = {"mar_base": 2.9, "mar_large": 3.0, "mar_huge": 3.2, "mar_tiny": 2.9}  # MAR's FID-best scales
MAR_LATENT_SCALE = 0.2325


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("model and weights")
    w.add_argument("--model", choices=list(MODELS),
                   help="model size: with --ckpt the factory to build (default: read from the checkpoint), "
                        "without weights the random model to build (default mar_base); --weights files say it")
    src = w.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path, help="MAR's own .pth checkpoint ({'model', 'model_ema'})")
    src.add_argument("--weights", type=Path, help="a safetensors file written by MAR.save")
    w.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="with --ckpt: use the EMA weights (default; MAR evaluates with them) or --no-ema")
    w.add_argument("--num-sampling-steps", type=int, help="diffusion steps per token (default: the model's, 100)")
    c = p.add_argument_group("what to sample")
    c.add_argument("--labels", type=int, nargs="+", help="class labels (default: every class)")
    c.add_argument("--num-per-class", type=int, default=1, help="images per label")
    c.add_argument("--batch-size", type=int, default=16)
    s = p.add_argument_group("sampling")
    s.add_argument("--num-iter", type=int, default=64, help="autoregressive steps")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: MAR's for the size, 2.9 for B)")
    s.add_argument("--cfg-schedule", choices=["linear", "constant"], default="linear")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("samples_mar"), help="output folder")
    o.add_argument("--latents-format", choices=["pt", "npy"], default="pt")
    o.add_argument("--vae", type=Path, help="local diffusers AutoencoderKL folder to decode the latents")
    o.add_argument("--vae-scale", type=float, default=MAR_LATENT_SCALE,
                   help="latents are divided by this before decoding (MAR: 0.2325)")
    o.add_argument("--grid-max", type=int, default=64, help="at most this many images in grid.png")
    o.add_argument("--grid-scale", type=int, help="grid upscaling (default 1 for images, 8 for latent previews)")
    o.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("num_per_class", "batch_size", "num_iter", "grid_max"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_sampling_steps is not None and not 1 <= args.num_sampling_steps <= 1000:
        p.error(f"--num-sampling-steps must be in [1, 1000], got {args.num_sampling_steps}")
    if args.temperature < 0 or args.vae_scale <= 0:
        p.error("--temperature must be >= 0 and --vae-scale > 0")
    return args


def build_model(args) -> MAR:
    name = MODELS[args.model] if args.model else None
    steps = {} if args.num_sampling_steps is None else {"num_sampling_steps": str(args.num_sampling_steps)}
    if args.weights is not None:
        model = MAR.load(args.weights)
        if steps:  # the number of sampling steps is a sampling setting, not part of the weights
            model.diffloss.num_sampling_steps = args.num_sampling_steps
    elif args.ckpt is not None:
        model = MAR.from_checkpoint(args.ckpt, ema=args.ema, model=name, **steps)
    else:
        name = name or "mar_base"
        print(f"no --ckpt / --weights: {name} with RANDOM weights (the samples are noise)", file=sys.stderr)
        torch.manual_seed(args.seed)
        model = FACTORIES[name](**steps)
    return model.to(args.device).eval()


def default_cfg(model: MAR) -> float:
    """MAR's FID-best CFG scale for the model's size (by its width), 2.9 for other sizes."""
    by_width = {768: "mar_base", 1024: "mar_large", 1280: "mar_huge"}
    return PAPER_CFG.get(by_width.get(model.config["encoder_embed_dim"]), 2.9)


def class_labels(args, num_classes: int) -> torch.Tensor:
    labels = args.labels if args.labels is not None else list(range(num_classes))
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise SystemExit(f"--labels must be in [0, {num_classes}), got {bad}")
    return torch.tensor(labels, dtype=torch.int64).repeat_interleave(args.num_per_class)


def load_vae(path: Path, device):
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise SystemExit("--vae needs diffusers (pip install diffusers)") from None
    if not path.is_dir():
        raise SystemExit(f"--vae must be a local diffusers AutoencoderKL folder, got {path}")
    return AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(device).eval()


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """MAR's latents -> images in [0, 1]: undo MAR's latent scaling, decode, map [-1, 1] to [0, 1]."""
    x = vae.decode(latents / scale).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    model = build_model(args)
    labels = class_labels(args, model.num_classes)
    cfg = args.cfg if args.cfg is not None else default_cfg(model)
    vae = load_vae(args.vae, args.device) if args.vae is not None else None
    gen = torch.Generator(device=args.device).manual_seed(args.seed)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(labels), desc="images", unit="img", disable=not progress)
    latents, images = [], []
    for start in range(0, len(labels), args.batch_size):
        y = labels[start:start + args.batch_size].to(args.device)
        z = model.sample_tokens(len(y), num_iter=args.num_iter, cfg=cfg, cfg_schedule=args.cfg_schedule, labels=y,
                                temperature=args.temperature, progress=progress, generator=gen)
        latents.append(z.float().cpu())
        if vae is not None:
            images.append(decode(vae, z, args.vae_scale).cpu())
        bar.update(len(y))
    bar.close()
    latents = torch.cat(latents)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.latents_format == "pt":
        torch.save({"latents": latents, "labels": labels}, out / "latents.pt")
    else:
        import numpy as np
        np.save(out / "latents.npy", latents.numpy())
        np.save(out / "labels.npy", labels.numpy())
    if vae is not None:
        images = torch.cat(images)
        from PIL import Image
        (out / "images").mkdir(exist_ok=True)
        for i, (im, y) in enumerate(zip(images, labels.tolist())):
            arr = (im * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(out / "images" / f"{i:05d}_class{y}.png")
        shown, scale = images, args.grid_scale or 1
    else:
        shown, scale = latents_preview(latents), args.grid_scale or 8
    n = min(len(shown), args.grid_max)
    per_row = args.num_per_class if args.num_per_class > 1 else max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / per_row)
    # one class per row when each row holds exactly one label's samples
    row_labels = [f"class {labels[r * per_row].item()}" for r in range(rows)] if args.num_per_class > 1 else None
    save_image_grid(shown[:n], out / "grid.png", nrow=per_row, row_labels=row_labels, scale=scale)
    print(f"{len(latents)} samples: latents {tuple(latents.shape)} -> {out}/latents.{args.latents_format}"
          + (f", images -> {out}/images" if vae is not None else "") + f", grid -> {out}/grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
