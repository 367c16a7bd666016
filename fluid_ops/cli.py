"""`fluid-ops` (also `python -m fluid_ops`): train, generate, evaluate, bench, demo.

    fluid-ops demo --out demo/                        # the tour: train tiny Fluid on shapes, grid + eval
    fluid-ops train --config tiny --data shapes --out runs/a --minutes 10
    fluid-ops generate --ckpt runs/a --prompt "a red circle at the top left" --out grid.png
    fluid-ops evaluate --ckpt runs/a --out runs/a/eval.json
    fluid-ops bench                                   # our kernels vs PyTorch on this machine
    fluid-ops study --out study/                      # the four variants + scaling, one protocol (docs/study.md)
    fluid-ops prepare --config tiny --data shapes --out cache/ --limit 10000   # cached tokens + text
    torchrun --nproc_per_node 8 -m fluid_ops train ... [--fsdp]               # data-parallel

Every command is a thin layer over the Python API (`fluid_ops.train`, `fluid_ops.generate`,
`fluid_ops.eval.evaluate`); the scripts in `python/` show the same calls in a few lines each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "load_model"]

# What the demo trains on and asks for: one shape per image, named with its colour and its
# cell of a 3x3 grid ("a red circle at the top left") -- the recipe measured to learn fastest on
# a 2-core CPU (docs/measured.md: colour and position within minutes, shape after).
DEMO_KINDS = {"single": 1.0}
DEMO_CATEGORIES = ("single_object", "colors")


def _parse_overrides(items: list[str]) -> dict:
    """`--set key=value` pairs -> dict, values read as JSON when they parse (numbers, bools)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _device(name: str | None):
    import torch
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"--device: {name!r} is not a device name (cpu, cuda, cuda:1 ...): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device: {name} asked for, but CUDA is not available on this machine")
    return dev


def _dataset(spec: str, *, image_size: int, seed: int, kinds=None, on_bad: str = "error", progress: bool = True):
    from fluid_ops import data
    if spec == "shapes":
        return data.ShapesDataset(size=image_size, seed=seed, **({"kinds": kinds} if kinds else {}))
    # shards: on_bad="error" decodes every sample before training (a member that cannot be read is
    # named then, not mid-run); "skip" reads the next readable sample in a bad one's place
    shards = dict(size=image_size, on_bad=on_bad, verify=on_bad == "error", progress=None if progress else False)
    if spec.endswith(".tar") and os.path.isfile(spec):
        return data.ShardDataset(spec, **shards)
    if not os.path.isdir(spec):
        raise SystemExit(f"--data: {spec!r} is neither 'shapes' nor an existing folder (of img.png + img.txt "
                         "pairs, of WebDataset .tar shards, or prepared by fluid-ops prepare) nor a .tar shard")
    if any(Path(spec).glob("*.tar")):  # WebDataset shards: image-caption pairs or a prepared cache
        return data.ShardDataset(spec, **shards)
    return data.ImageCaptionFolder(spec, size=image_size, on_bad=on_bad, progress=None if progress else False)


def load_model(path: str | os.PathLike, *, ema: bool = True, device=None):
    """A Fluid model from a training run folder or checkpoint file (EMA weights by default):
    `fluid_ops.models.load_run` with its errors as the CLI's one-line exit."""
    from fluid_ops.checkpoint import CheckpointError
    from fluid_ops.models import load_run
    try:
        return load_run(path, ema=ema, device=device).model
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        raise SystemExit(f"--ckpt: {e}") from None


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_bytes().decode("utf-8-sig")
        except OSError as e:
            raise SystemExit(f"--prompts-file: cannot read {args.prompts_file}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            line = Path(args.prompts_file).read_bytes()[:e.start].count(b"\n") + 1
            raise SystemExit(f"--prompts-file: {args.prompts_file} is not UTF-8 text (byte {e.start}, line "
                             f"{line}: {e.reason})") from None
        prompts += [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise SystemExit("generate: give at least one --prompt or a --prompts-file")
    return prompts


def _sampling_kwargs(args) -> dict:
    kw = {}
    for k in ("num_iter", "cfg", "temperature", "num_diffusion_steps", "cfg_uncond", "precision", "solver"):
        v = getattr(args, k, None)
        if v is not None:
            kw[k] = v
    if getattr(args, "fast", False):
        kw["preset"] = "fast"
    return kw


def _grid(model, prompts: list[str], n_per_prompt: int, seed: int, path: Path, progress: bool, **kw):
    """One row per prompt, `n_per_prompt` samples each, prompts written left of their row."""
    import fluid_ops
    from fluid_ops.viz import save_image_grid
    expanded = [p for p in prompts for _ in range(n_per_prompt)]
    images = fluid_ops.generate(model, expanded, seed=seed, progress=progress, **kw)
    save_image_grid(images, path, nrow=n_per_prompt, row_labels=prompts, scale=max(1, 96 // images.shape[-1]))
    return images


def _evaluate(model, *, per_category: int, seed: int, categories, progress: bool, **kw) -> dict:
    import fluid_ops
    from fluid_ops.eval import evaluate, geneval_prompts
    prompts = geneval_prompts(per_category=per_category, seed=seed, categories=categories)
    images = fluid_ops.generate(model, [p.text for p in prompts], seed=seed, progress=progress, **kw)
    return evaluate(images, prompts)


# ---- commands ---------------------------------------------------------------------------
def cmd_train(args) -> int:
    import torch
    from fluid_ops.models import Fluid
    from fluid_ops.training import train
    if args.steps is None and args.minutes is None:
        raise SystemExit("train: give --steps and/or --minutes")
    torch.manual_seed(args.seed)
    model = Fluid(args.config, **_parse_overrides(args.set))
    ds = _dataset(args.data, image_size=model.config.image.size, seed=args.seed, on_bad=args.on_bad,
                  progress=not args.no_progress)
    if getattr(ds, "prepared", False):
        ds.check_model_config(model.config.flat_dict())  # caches are keyed by the flat names
    device = None if args.device == "auto" else _device(args.device)  # None: one device per torchrun rank
    try:
        result = train(model, ds, out_dir=args.out, steps=args.steps, minutes=args.minutes,
                       batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup, lr_decay=args.lr_decay,
                       ema_decay=args.ema_decay, ckpt_every=args.ckpt_every, seed=args.seed, device=device,
                       num_workers=args.workers,
                       progress=not args.no_progress, grad_clip=args.grad_clip or None,
                       amp=args.precision if args.amp is None else args.amp,
                       fsdp=args.fsdp, collate_fn=getattr(ds, "collate", None))
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {result.step}; checkpoint, history.json and loss.png in {args.out}")
    return 0


def cmd_prepare(args) -> int:
    from fluid_ops.models.fluid import resolve_config
    from fluid_ops.prepare import prepare
    cfg = resolve_config(args.config, **_parse_overrides(args.set))
    ds = _dataset(args.data, image_size=cfg.image.size, seed=args.seed, on_bad=args.on_bad,
                  progress=not args.no_progress)
    if getattr(ds, "prepared", False):
        raise SystemExit(f"--data: {args.data!r} is already a prepared cache")
    flip = args.data != "shapes" if args.flip is None else args.flip  # shapes captions name left / right
    device = None if args.device == "auto" else _device(args.device)
    try:
        out = prepare(ds, args.out, cfg, flip=flip, batch_size=args.batch_size, samples_per_shard=args.shard_size,
                      limit=args.limit, device=device, progress=not args.no_progress, num_workers=args.workers,
                      collate_fn=getattr(ds, "collate", None))
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        meta = json.loads((Path(out) / "prepared.json").read_text())
        print(f"prepared {meta['n']} samples ({meta['views']} view(s), tokens {meta['token_shape']}, text dim "
              f"{meta['text_dim']}) in {len(meta['shards'])} shards in {out} ({meta['seconds']} s)")
    return 0


def cmd_consolidate(args) -> int:
    from fluid_ops.distributed import consolidate
    out = consolidate(args.ckpt, args.out)
    print(f"wrote {out}")
    return 0


def _check_out_file(path: str) -> Path:
    from fluid_ops.checkpoint import refuse_overwriting_run_file
    refuse_overwriting_run_file(path, "--out")
    return Path(path)


def cmd_generate(args) -> int:
    if args.n < 1:
        raise SystemExit(f"-n: images per prompt must be >= 1, got {args.n}")
    out = _check_out_file(args.out)
    prompts = _prompts(args)
    model = load_model(args.ckpt, ema=not args.no_ema, device=_device(args.device))
    out.parent.mkdir(parents=True, exist_ok=True)
    _grid(model, prompts, args.n, args.seed, out, not args.no_progress, **_sampling_kwargs(args))
    print(f"wrote {out} ({len(prompts)} prompts x {args.n})")
    return 0


def cmd_evaluate(args) -> int:
    out = _check_out_file(args.out)
    if args.per_category < 1:
        raise SystemExit(f"--per-category must be >= 1, got {args.per_category}")
    model = load_model(args.ckpt, ema=not args.no_ema, device=_device(args.device))
    cats = args.categories.split(",") if args.categories else None
    report = _evaluate(model, per_category=args.per_category, seed=args.seed, categories=cats,
                       progress=not args.no_progress, **_sampling_kwargs(args))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    _print_report(report)
    print(f"wrote {out}")
    return 0


def _print_report(report: dict) -> None:
    print(f"{'category':<16}{'accuracy':>9}{'n':>6}")
    for name, r in report["categories"].items():
        print(f"{name:<16}{r['accuracy']:>9.3f}{r['n']:>6}")
    print(f"{'overall':<16}{report['overall']:>9.3f}")


def cmd_bench(args) -> int:
    from fluid_ops import bench
    bench.main(quick=args.quick, out=args.out)
    return 0


def cmd_demo(args) -> int:
    """Train the tiny random-order continuous model on synthetic shapes for a time budget, then
    write a prompt -> images grid, the loss curve and an evaluation JSON into --out."""
    import torch
    from fluid_ops.models import Fluid
    from fluid_ops.training import train
    t0 = time.time()
    out = Path(args.out)
    torch.manual_seed(args.seed)
    try:
        model = Fluid(args.config, **_parse_overrides(args.set))
    except ImportError as e:  # the text encoder's packages: named once, before any work or folder
        raise SystemExit(f"demo: {e} (`./run demo` sets all of it up)") from None
    out.mkdir(parents=True, exist_ok=True)
    ds = _dataset("shapes", image_size=model.config.image.size, seed=args.seed, kinds=DEMO_KINDS)
    print(f"[demo] training {args.config} ({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M "
          f"trainable parameters) for {args.minutes:g} min on synthetic shapes; writing to {out}")
    result = train(model, ds, out_dir=out / "run", minutes=args.minutes, steps=args.steps,
                   batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup, lr_decay=args.lr_decay,
                   ema_decay=args.ema_decay, ckpt_every=args.ckpt_every, seed=args.seed, device=_device(args.device),
                   progress=not args.no_progress, amp=args.precision)
    model = load_model(out / "run", ema=not args.no_ema, device=_device(args.device))
    progress = not args.no_progress
    from fluid_ops.eval import geneval_prompts
    grid_prompts = [p.text for p in geneval_prompts(per_category=args.grid_rows, seed=args.seed + 1,
                                                    categories=["colors"])]
    _grid(model, grid_prompts, args.n, args.seed, out / "grid.png", progress, precision=args.precision)
    report = _evaluate(model, per_category=args.per_category, seed=args.seed, categories=list(DEMO_CATEGORIES),
                       progress=progress, precision=args.precision)
    from fluid_ops import backend
    report["demo"] = {"config": args.config, "minutes": args.minutes, "steps": result.step,
                      "seconds_total": round(time.time() - t0, 1), "seed": args.seed,
                      **backend.precision_record(args.precision, model.device)}
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    (out / "loss.png").write_bytes((out / "run" / "loss.png").read_bytes())
    _print_report(report)
    print(f"[demo] {result.step} steps; wrote {out / 'grid.png'}, {out / 'loss.png'}, {out / 'eval.json'} "
          f"in {time.time() - t0:.0f} s")
    return 0


def cmd_study(args) -> int:
    """The four variants under one protocol, and their scaling (fluid_ops.study, docs/study.md)."""
    from fluid_ops.study import StudyError, check_study, run_study

    def ints(text, name):
        try:
            return [int(x) for x in text.split(",") if x.strip()] if text is not None else None
        except ValueError:
            raise SystemExit(f"--{name}: expected comma-separated ints, got {text!r}") from None
    seeds = ints(args.seeds, "seeds")
    if seeds is not None and len(seeds) == 1 and "," not in args.seeds:
        seeds = list(range(seeds[0]))   # --seeds 3 means 0,1,2 (one seed of your choice: --seeds 5,)
    try:
        study = run_study(args.out, quick=args.quick, steps=args.steps, minutes=args.minutes, seeds=seeds,
                          widths=ints(args.widths, "widths"), per_category=args.per_category, jobs=args.jobs,
                          precision=args.precision, progress=not args.no_progress, check=args.check)
    except StudyError as e:
        raise SystemExit(str(e)) from None
    print((Path(args.out) / "table.md").read_text())
    if args.check:
        print("\n".join(study["check"]["lines"]))
        return 0 if study["check"]["ok"] else 1
    return 0


# ---- argument parsing ---------------------------------------------------------------------
def _add_common(p, *, sampling=False):
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 where the device computes it natively (CUDA, CPUs with AVX512_BF16 or AMX), "
                        "else fp32 (training: bf16 autocast; sampling: the transformer under autocast, bf16 "
                        "head GEMMs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core; on a machine shared with other "
                        "busy processes, 1 can be many times faster than oversubscribed cores)")
    if sampling:
        p.add_argument("--num-iter", type=int, default=None, help="AR steps (default: the config's)")
        p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the config's)")
        p.add_argument("--temperature", type=float, default=None)
        p.add_argument("--cfg-uncond", choices=("text", "all"), default=None,
                       help="random order: CFG's unconditional branch drops the text ('text') or the text and the "
                            "tokens drawn so far ('all'); default: the config's")
        p.add_argument("--num-diffusion-steps", type=int, default=None)
        p.add_argument("--fast", action="store_true",
                       help="the 'fast' sampling preset (fluid_ops.sampling.FAST_PRESET: fewer diffusion steps with "
                            "a better head solver; options given explicitly win); default: exact sampling")
        p.add_argument("--solver", choices=("ddpm", "ddim", "dpm++2m"), default=None,
                       help="the diffusion head's solver (default: ddpm, exact)")
        p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")


def _add_train_knobs(p, *, minutes=None, steps=None, ema=0.999, batch_size=64, lr_decay=0.0):
    p.add_argument("--config", default="tiny", help="a name from fluid_ops.models.fluid.CONFIGS")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. model.depth=6 or text.encoder=hash (repeatable; the old flat "
                        "names such as depth=6 still work, deprecated)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--minutes", type=float, default=minutes)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr-decay", type=float, default=lr_decay,
                   help=f"fraction of the run (steps or minutes) over which the LR falls linearly to 0 at the end "
                        f"(default {lr_decay:g}; 0: constant after the warmup)")
    p.add_argument("--ema-decay", type=float, default=ema)
    p.add_argument("--ckpt-every", type=int, default=500)


def _add_on_bad(p):
    p.add_argument("--on-bad", choices=("error", "skip"), default="error",
                   help="an image folder is decoded once before training: a file that cannot be read is an error "
                        "naming it (default), or 'skip' drops it with a warning and a count")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fluid-ops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--debug", action="store_true",
                    help="show the full traceback of an input error instead of one line")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a Fluid model")
    _add_train_knobs(p)
    p.add_argument("--data", default="shapes", help="'shapes' (synthetic) or a folder of img.png + img.txt")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, history.json, loss.png")
    p.add_argument("--workers", type=int, default=0)
    _add_on_bad(p)
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and AdamW state with FSDP2 (default: DDP)")
    p.add_argument("--amp", default=None, choices=("auto", "bf16", "none"),
                   help="bf16 autocast (deprecated name of --precision; none = fp32)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: no clipping)")
    _add_common(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("prepare", help="encode a data set once: shards of cached tokens and text-encoder outputs")
    p.add_argument("--config", default="tiny", help="the model config the cache is for (tokenizer, text encoder)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. model.depth=6 or text.encoder=hash (repeatable; the old flat "
                        "names such as depth=6 still work, deprecated)")
    p.add_argument("--data", default="shapes", help="'shapes', a folder of img.png + img.txt, or .tar shards")
    p.add_argument("--out", required=True, help="folder for shard-*.tar + prepared.json")
    p.add_argument("--limit", type=int, default=None, help="encode the first N samples only")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=0)
    _add_on_bad(p)
    p.add_argument("--flip", dest="flip", action="store_true", default=None,
                   help="also cache the left-right flipped image (default: on, off for 'shapes')")
    p.add_argument("--no-flip", dest="flip", action="store_false")
    _add_common(p)
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("consolidate", help="an FSDP run folder -> one checkpoint.pt for generate / evaluate")
    p.add_argument("--ckpt", required=True, help="FSDP training run folder")
    p.add_argument("--out", default=None, help="default: RUN/checkpoint.pt")
    p.set_defaults(fn=cmd_consolidate)

    p = sub.add_parser("generate", help="prompts -> PNG grid")
    p.add_argument("--ckpt", required=True, help="training run folder or checkpoint file")
    p.add_argument("--prompt", action="append", help="repeatable")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("-n", type=int, default=4, help="images per prompt")
    p.add_argument("--out", default="grid.png")
    _add_common(p, sampling=True)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("evaluate", help="GenEval-style scores on the synthetic-shapes prompts")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--per-category", type=int, default=24)
    p.add_argument("--categories", help="comma-separated subset (default: all six)")
    p.add_argument("--out", default="eval.json")
    _add_common(p, sampling=True)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("bench", help="our kernels against PyTorch on this machine")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("study", help="train and score the four variants under one protocol, and their scaling")
    p.add_argument("--out", default="study", help="folder for runs, study.json, table.md, plots (rerun: resume)")
    p.add_argument("--quick", action="store_true", help="the whole pipeline on a tiny budget (CI)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the protocol's)")
    p.add_argument("--minutes", type=float, default=None, help="train each run for these minutes instead of steps")
    p.add_argument("--seeds", default=None, help="N (seeds 0..N-1) or a comma-separated list, e.g. 5, (default: 3 seeds)")
    p.add_argument("--widths", default=None, help="comma-separated model widths for the scaling fit")
    p.add_argument("--per-category", type=int, default=None, help="evaluation prompts per category")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs in parallel processes, each with cores / jobs threads (default: one per core)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--check", default=None, metavar="STUDY_JSON",
                   help="then compare with a committed study.json: exit 1 if a mean leaves its seed spread")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_study)

    p = sub.add_parser("demo", help="train the tiny model on synthetic shapes, write grid + loss + eval")
    p.add_argument("--out", required=True)
    # batch 32: about twice the steps of 64 in the same minutes, and no worse per step (measured on
    # one thread: 500 steps of 32 took 478 s and put colour and cell right on 0.30 of 54 prompts;
    # 500 steps of 64 took 979 s and 0.09)
    # and the LR falls to 0 over the last 30% of the minutes (1400 steps on one thread: overall 0.29
    # against 0.28 at the same steps without; the tiny config's sampling was chosen on such a run)
    _add_train_knobs(p, minutes=15.0, ema=0.99, batch_size=32, lr_decay=0.3)
    p.add_argument("--grid-rows", type=int, default=12, help="prompts in the grid")
    p.add_argument("-n", type=int, default=6, help="images per prompt in the grid")
    p.add_argument("--per-category", type=int, default=48, help="evaluation prompts per category")
    _add_common(p)
    p.add_argument("--no-ema", action="store_true")
    p.set_defaults(fn=cmd_demo)
    return ap


class CLIError(SystemExit):
    """An input error, already printed as one line (`fluid-ops: error: ...`); exit status 2.
    `str()` is the message, so `pytest.raises(SystemExit, match=...)` still reads it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.code = 2

    def __str__(self) -> str:
        return self.message


def _input_errors() -> tuple:
    """Exceptions that mean "the input is wrong" rather than "fluid_ops has a bug": printed as
    one line unless --debug. TypeError, AssertionError, IndexError ... keep their traceback."""
    from fluid_ops.checkpoint import CheckpointError, RunInUseError
    return (ValueError, OSError, CheckpointError, RunInUseError)  # OSError: FileNotFound, FileExists, ...


def _fail(message: str) -> CLIError:
    print(f"fluid-ops: error: {message}", file=sys.stderr)
    return CLIError(message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise SystemExit(f"--threads must be >= 1, got {args.threads}")
            import torch
            torch.set_num_threads(args.threads)
        return args.fn(args)
    except CLIError:
        raise
    except SystemExit as e:
        if isinstance(e.code, str):  # SystemExit("message"): an input error found by the CLI
            raise _fail(e.code) from None
        raise
    except _input_errors() as e:
        if debug:
            raise
        raise _fail(_one_line(e)) from None


def _one_line(e: BaseException) -> str:
    msg = str(e) if not isinstance(e, OSError) or not e.strerror else (
        f"{e.strerror}: {e.filename}" if e.filename else e.strerror)
    if isinstance(e, OSError) and not e.strerror:
        msg = str(e)
    return msg.replace("\n", " ").strip() or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
