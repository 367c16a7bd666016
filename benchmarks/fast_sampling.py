"""Fast sampling (issue 24) against exact sampling: step schedules, head solvers, feature caching.

    python benchmarks/fast_sampling.py --ckpt /tmp/fc/demo/run        # (a) + (b) + (c), ~1 hour on 2 cores
    python benchmarks/fast_sampling.py --quick --out /tmp/fs          # tiny random models, ~1 min (a test runs it)

(a) the demo's Fluid checkpoint (`fluid-ops demo`): GenEval-style score (single-object + colour
    prompts, `fluid_ops.eval`) of every option over the same prompts and seeds, with its standard
    error and the paired standard error of its difference to exact sampling;
(b) a class-conditional MAR (18 classes = colour x shape, one object of the shapes data in the
    middle cell, or with --mar-layout any in any of the 3x3 cells; 32x32 pixels as 3-channel
    "latents", 4x4 patches) trained here for --mar-steps (4000: ~15 min on 1 thread of the Zen 4):
    class accuracy = the detector finds an object of the class's shape in the class's colour;
(c) MAR-B with random weights, for speed only (at --marb-size pixels / 16 = tokens per side).

Timing: the images of every option are generated in the same batches, the options interleaved
batch by batch, so a shared machine's load spreads over all of them; speed-ups are ratios of
summed seconds within this run. NFE per image: `head` = diffusion-head evaluations (the sum over
AR steps of that step's diffusion steps; cond and uncond rows of a step are one batched call) and
`transformer` = transformer (MAR: encoder + decoder) passes. Writes fast_sampling.json and
fast_sampling.png (speed-up against score) into --out.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fluid_ops  # noqa: E402
from fluid_ops import sampling  # noqa: E402

# name -> Fluid.generate / MAR.sample_tokens keywords. "exact" is the reference of every ratio.
OPTIONS = {
    "exact": {},
    "ddpm 50": {"num_diffusion_steps": 50},
    "ddpm 25": {"num_diffusion_steps": 25},
    "ddpm linear 100->10": {"num_diffusion_steps": ("linear", 100, 10)},
    "ddim 25": {"solver": "ddim", "num_diffusion_steps": 25},
    "ddim 25 eta 1": {"solver": "ddim", "eta": 1.0, "num_diffusion_steps": 25},
    "dpm++2m 25": {"solver": "dpm++2m", "num_diffusion_steps": 25},
    "dpm++2m 10": {"solver": "dpm++2m", "num_diffusion_steps": 10},
    "dpm++2m linear 25->10": {"solver": "dpm++2m", "num_diffusion_steps": ("linear", 25, 10)},
    "dpm++2m cosine 50->10": {"solver": "dpm++2m", "num_diffusion_steps": ("cosine", 50, 10)},
    "cache 2": {"cache_interval": 2},
    "dpm++2m 25 + cache 2": {"solver": "dpm++2m", "num_diffusion_steps": 25, "cache_interval": 2},
    "dpm++2m linear 25->10 + cache 2": {"solver": "dpm++2m", "num_diffusion_steps": ("linear", 25, 10),
                                        "cache_interval": 2},
    "preset fast": {"preset": "fast"},
}
C_OPTIONS = ("exact", "dpm++2m 25", "preset fast", "cache 2", "dpm++2m 25 + cache 2", "uncond cache 4",
             "dpm++2m 25 + uncond cache 4", "dpm++2m linear 25->10 + cache 2")
MAR_EXTRA = {"uncond cache 4": {"uncond_cache_interval": 4},
             "dpm++2m 25 + uncond cache 4": {"solver": "dpm++2m", "num_diffusion_steps": 25,
                                             "uncond_cache_interval": 4}}


def machine_info() -> dict:
    from benchmarks.cpu_ops import machine_info as cpu_info
    info = cpu_info()
    flags = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = sorted(x for x in have if x.startswith(("avx", "amx", "fma", "f16c", "sse4")))
                    break
    except OSError:
        pass
    info["cpu_flags"] = flags
    info["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info["load_note"] = ("load averages at the start and end: above the thread count, other jobs ran beside the "
                         "run; speed-ups are ratios of interleaved runs either way")
    return info


class Counter:
    """Counts head NFE (sum of num_steps of diffusion_sample calls) and transformer passes."""

    def __init__(self):
        self.head = self.passes = 0

    def __enter__(self):
        self._real = sampling.diffusion_sample

        def counted(*a, **k):
            self.head += k.get("num_steps", 100)
            return self._real(*a, **k)
        sampling.diffusion_sample = counted
        return self

    def __exit__(self, *exc):
        sampling.diffusion_sample = self._real


def _wrap_passes(obj, attr, counter):
    real = getattr(obj, attr)

    def counted(*a, **k):
        counter.passes += 1
        return real(*a, **k)
    setattr(obj, attr, counted)
    return lambda: setattr(obj, attr, real) if attr not in obj.__dict__ else obj.__dict__.pop(attr)


def run_interleaved(options: dict, batches: list, gen_fn, progress=True) -> dict:
    """{name: {"seconds", "images", "head_nfe", "passes", "outputs"}}: batch j of every option in turn,
    after one untimed warm-up call per option on the first batch's first two items."""
    for name in options:
        gen_fn(batches[0][:2], -1, options[name], Counter())
    res = {n: {"seconds": 0.0, "images": 0, "head_nfe": None, "passes": None, "outputs": []} for n in options}
    for j, batch in enumerate(batches):
        order = list(options) if j % 2 == 0 else list(options)[::-1]  # alternate the order as well
        for name in order:
            c = Counter()
            t0 = time.perf_counter()
            with c:
                out = gen_fn(batch, j, options[name], c)
            dt = time.perf_counter() - t0
            r = res[name]
            r["seconds"] += dt
            r["images"] += out.shape[0]
            r["head_nfe"], r["passes"] = c.head, c.passes
            r["outputs"].append(out)
        if progress:
            print(f"  batch {j + 1}/{len(batches)} done; load {os.getloadavg()[0]:.1f}", flush=True)
    return res


def score_stats(correct_by_cat: dict) -> tuple[float, float]:
    """overall = mean of the category accuracies; its standard error (binomial per category)."""
    accs = {k: sum(v) / len(v) for k, v in correct_by_cat.items()}
    ses = [math.sqrt(a * (1 - a) / len(correct_by_cat[k])) for k, a in accs.items()]
    overall = sum(accs.values()) / len(accs)
    return overall, math.sqrt(sum(s * s for s in ses)) / len(ses)


def paired_se(a: dict, b: dict) -> float:
    """SE of overall(a) - overall(b) over the same prompts (paired per prompt)."""
    parts = []
    for k in a:
        d = [x - y for x, y in zip(a[k], b[k])]
        m = sum(d) / len(d)
        var = sum((x - m) ** 2 for x in d) / max(1, len(d) - 1)
        parts.append(var / len(d))
    return math.sqrt(sum(parts)) / len(parts)


def summarize(res: dict, correct: dict | None) -> list[dict]:
    ex = res["exact"]
    rows = []
    for name, r in res.items():
        row = {"option": name, "seconds": round(r["seconds"], 2), "images": r["images"],
               "images_per_s": round(r["images"] / r["seconds"], 4),
               "speedup": round(ex["seconds"] / r["seconds"], 2), "head_nfe": r["head_nfe"],
               "transformer_passes": r["passes"]}
        if correct is not None:
            s, se = score_stats(correct[name])
            row.update(score=round(s, 4), se=round(se, 4))
            if name != "exact":
                s0, _ = score_stats(correct["exact"])
                row.update(delta=round(s - s0, 4), delta_se=round(paired_se(correct[name], correct["exact"]), 4))
        rows.append(row)
    return rows


def print_table(title, rows):
    print(f"\n{title}")
    print(f"{'option':<34}{'img/s':>8}{'speedup':>9}{'head NFE':>9}{'passes':>7}{'score':>8}{'SE':>7}{'delta':>8}{'+-':>7}")
    for r in rows:
        print(f"{r['option']:<34}{r['images_per_s']:>8.3f}{r['speedup']:>8.2f}x{r['head_nfe']:>9}"
              f"{r['transformer_passes']:>7}{r.get('score', float('nan')):>8.3f}{r.get('se', float('nan')):>7.3f}"
              f"{r.get('delta', float('nan')):>8.3f}{r.get('delta_se', float('nan')):>7.3f}"
              + (f"   colour {r['colour_score']:.3f} ± {r['colour_se']:.3f}" if "colour_score" in r else "")
              + (f" ({r['colour_delta']:+.3f} ± {r['colour_delta_se']:.3f})" if "colour_delta" in r else ""),
              flush=True)


# ---- (a) the demo's Fluid ---------------------------------------------------------------------
def part_a(args, options):
    from fluid_ops.eval import evaluate, geneval_prompts
    if args.quick:
        from fluid_ops.models import Fluid
        torch.manual_seed(0)
        model = Fluid("tiny", **{"text.encoder": "hash", "image.size": 16, "model.width": 64, "model.depth": 2,
                                 "head.depth": 2, "head.width": 64, "sampling.num_iter": 4,
                                 "sampling.num_diffusion_steps": 20}).eval()
        per_cat, bs = 4, 4
    else:
        from fluid_ops.models import load_run
        model = load_run(args.ckpt).model.eval()
        per_cat, bs = args.prompts // 2, args.batch
    prompts = geneval_prompts(per_category=per_cat, seed=args.seed, categories=["single_object", "colors"])
    texts = [p.text for p in prompts]
    batches = [texts[i:i + bs] for i in range(0, len(texts), bs)]

    def gen_fn(batch, j, kw, counter):
        undo = _wrap_passes(model.transformer, "forward", counter)
        try:
            return model.generate(batch, generator=torch.Generator().manual_seed(args.seed * 1000 + j), **kw)
        finally:
            undo()
    res = run_interleaved(options, batches, gen_fn, progress=not args.quick)
    correct = {}
    for name, r in res.items():
        rep = evaluate(torch.cat(r["outputs"]), prompts, progress=False, detections=False)
        cats = {}
        for rec in rep["prompts"]:
            cats.setdefault(rec["category"], []).append(int(bool(rec["correct"])))
        correct[name] = cats
    rows = summarize(res, correct)
    d = model.config.sampling_defaults()
    return {"model": "demo Fluid tiny checkpoint" if not args.quick else "tiny Fluid, random weights (quick)",
            "checkpoint": None if args.quick else str(args.ckpt), "prompts": len(texts), "batch": bs,
            "sampling": {k: (v if isinstance(v, (int, float, str, type(None))) else str(v)) for k, v in d.items()}
            | {"num_diffusion_steps": model.config.sampling.num_diffusion_steps}, "rows": rows}


# ---- (b) class-conditional MAR on the shapes ---------------------------------------------------
def _mar_data(n, seed, size=32, layout="middle"):
    """n shapes-data images of 18 classes (colour x shape): the object in the middle cell
    (layout "middle") or in a random one of the 3x3 cells ("any")."""
    from fluid_ops.data.shapes import COLOURS, POSITIONS, SHAPES, render_spec
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(COLOURS) * len(SHAPES), (n,), generator=g)
    where = torch.randint(0, 9, (n,), generator=g) if layout == "any" else torch.full((n,), POSITIONS.index("centre"))
    cols, shp = list(COLOURS), list(SHAPES)
    imgs = torch.stack([render_spec(f"a {cols[int(y) // 3]} {shp[int(y) % 3]} at the {POSITIONS[int(w)]}", size,
                                    seed=seed + i)
                        for i, (y, w) in enumerate(zip(labels, where))])
    return imgs, labels


def _class_prompt(y):
    from fluid_ops.data.shapes import COLOURS, SHAPES
    return f"a {list(COLOURS)[y // 3]} {list(SHAPES)[y % 3]}"


def _train_mar(model, args):
    """Train part (b)'s MAR in place, leave its EMA weights in it; returns (steps, seconds, recipe).
    The recipe is the demo's rather than MAR's (measured on the Zen 4, docs in the results README):
    MAR's (lr 1e-3 constant, 4 t draws per token, EMA 0.999, fp32) drew the class's colour in
    scattered blocks after 3000 steps; this one, with the object in the middle cell, draws the
    class's object (class accuracy 0.94 at 3200 steps, 0.97 at 4000). With the object in any cell
    its samples were still scattered blocks at 4000 steps."""
    from fluid_ops import backend
    layout = args.mar_layout
    pool, labels_pool = _mar_data(256 if args.quick else 8192, seed=1, layout=layout)
    lr, warmup, ema_decay = 2e-3, 100, 0.99
    prec = backend.resolve_precision(args.mar_precision, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(2)
    max_steps = 20 if args.quick else (None if args.mar_minutes else args.mar_steps)
    t0, steps = time.time(), 0
    model.train()
    # a step budget makes the model independent of the machine's load; --mar-minutes is the alternative
    while (steps < max_steps) if max_steps else (time.time() - t0 < args.mar_minutes * 60):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (steps + 1) / warmup)
        idx = torch.randint(0, pool.shape[0], (32,), generator=g)
        with torch.autocast("cpu", torch.bfloat16, enabled=prec == "bf16"):
            loss = model(pool[idx] * 2 - 1, labels_pool[idx], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p, 1 - min(ema_decay, (1 + steps) / (10 + steps)))
        if not args.quick and steps % 250 == 0:
            print(f"  (b) step {steps}  loss {loss.item():.4f}  {time.time() - t0:.0f} s", flush=True)
    train_s = time.time() - t0
    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            p.copy_(e)
    recipe = {"layout": layout, "images": pool.shape[0], "batch": 32, "optimizer": "AdamW", "lr": lr,
              "warmup_steps": warmup, "grad_clip": 1.0, "ema": ema_decay, "diffusion_batch_mul": 1,
              "precision": prec}
    return steps, train_s, recipe


def _b_samples(res, path, per_row=18):
    """Part (b)'s first images of exact sampling and of the fastest options, one row each (the same
    classes and seeds in every row: the row-to-row changes are the options' drift)."""
    from fluid_ops.viz import save_image_grid
    keep = [k for k in ("exact", "preset fast", "dpm++2m 10", "dpm++2m linear 25->10 + cache 2", "uncond cache 4")
            if k in res]
    n = min(per_row, min(torch.cat(res[k]["outputs"]).shape[0] for k in keep))
    imgs = torch.cat([torch.cat(res[k]["outputs"])[:n] for k in keep])
    save_image_grid(imgs, path, nrow=n, row_labels=keep, scale=2)


def _load_mar_ckpt(args):
    """(path or None, its saved dict or None) of --mar-ckpt; called before any part runs, so a file
    trained on another layout than --mar-layout is refused before any work."""
    ckpt = Path(args.mar_ckpt) if args.mar_ckpt and not args.quick else None
    if ckpt is None or not ckpt.exists():
        return ckpt, None
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    layout = saved.get("recipe", {}).get("layout", "any")
    if layout != args.mar_layout:  # files from before --mar-layout were trained on "any"
        raise SystemExit(f"--mar-ckpt {ckpt} was trained with --mar-layout {layout}, not {args.mar_layout}: "
                         f"pass that layout, another path, or delete the file to retrain")
    return ckpt, saved


def part_b(args, options, mar_ckpt=(None, None)):
    """mar_ckpt: `_load_mar_ckpt(args)`."""
    from fluid_ops.eval import evaluate
    from fluid_ops.models.mar import MAR
    torch.manual_seed(0)
    model = MAR(img_size=32, vae_stride=1, vae_embed_dim=3, patch_size=4, encoder_embed_dim=128, encoder_depth=2,
                encoder_num_heads=2, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=2, buffer_size=4,
                class_num=18, diffloss_d=3, diffloss_w=256, num_sampling_steps="10" if args.quick else "100",
                attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.1, diffusion_batch_mul=1)
    ckpt, saved = mar_ckpt
    if saved is not None:  # sampling reruns reuse one trained model
        model.load_state_dict(saved["ema"])
        steps, train_s, recipe = saved["steps"], saved["seconds"], saved.get("recipe", {})
    else:
        steps, train_s, recipe = _train_mar(model, args)
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"ema": model.state_dict(), "steps": steps, "seconds": round(train_s, 1), "recipe": recipe},
                       ckpt)
    model.eval()
    n = 8 if args.quick else args.mar_images
    bs = 4 if args.quick else args.batch
    ys = [i % 18 for i in range(n)]
    batches = [ys[i:i + bs] for i in range(0, n, bs)]
    num_iter = 4 if args.quick else 16

    def gen_fn(batch, j, kw, counter):
        undo = _wrap_passes(model, "forward_mae_encoder", counter)
        try:
            # pixel tokens lie in [-1, 1]: clip the head's x_0 (unclipped, MAR's default for its
            # unbounded VAE latents, a 3000-step model scatters saturated pixels over every image)
            lat = model.sample_tokens(len(batch), num_iter=num_iter, cfg=3.0, labels=torch.tensor(batch),
                                      temperature=0.7, generator=torch.Generator().manual_seed(100 + j),
                                      clip_denoised=True, **kw)
            return ((lat + 1) / 2).clamp(0, 1)
        finally:
            undo()
    res = run_interleaved(options, batches, gen_fn, progress=not args.quick)
    _b_samples(res, Path(args.out) / f"fast_sampling{'_quick' if args.quick else ''}{args.tag}_b_samples.png")
    prompts = [_class_prompt(y) for y in ys]
    correct, colour = {}, {}
    for name, r in res.items():
        rep = evaluate(torch.cat(r["outputs"]), prompts, progress=False, detections=False)
        correct[name] = {"class": [int(bool(rec["correct"])) for rec in rep["prompts"]]}
        # the class's colour on the object the detector picked: a second, easier score, still
        # informative where a small model has learned colours but not yet shapes
        colour[name] = {"colour": [int(bool(rec.get("colour"))) for rec in rep["prompts"]]}
    rows = summarize(res, correct)
    for row in rows:
        s, se = score_stats(colour[row["option"]])
        row.update(colour_score=round(s, 4), colour_se=round(se, 4))
        if row["option"] != "exact":
            row.update(colour_delta=round(s - score_stats(colour["exact"])[0], 4),
                       colour_delta_se=round(paired_se(colour[row["option"]], colour["exact"]), 4))
    return {"model": "class-conditional MAR (width 128, 2+2 blocks, head 3 x 256) on 32x32 shapes, 18 classes",
            "train_steps": steps, "train_seconds": round(train_s, 1), "train_recipe": recipe, "images": n,
            "sampling": {"num_iter": num_iter, "cfg": 3.0, "cfg_schedule": "linear", "temperature": 0.7,
                         "num_diffusion_steps": 100, "clip_denoised": True}, "rows": rows}


# ---- (c) MAR-B, random weights, speed only -----------------------------------------------------
def part_c(args, options):
    from fluid_ops.models.mar import mar_base, mar_tiny
    torch.manual_seed(0)
    if args.quick:
        model = mar_tiny(img_size=64, vae_stride=16, num_sampling_steps="20").eval()
        n, bs, num_iter = 2, 2, 4
    else:
        model = mar_base(img_size=args.marb_size, vae_stride=16, num_sampling_steps="100").eval()
        n, bs, num_iter = args.marb_images, args.marb_images, args.marb_iter
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # MAR zero-inits the head's adaLN / output layers: give them values
        for p in model.diffloss.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    batches = [list(range(bs))] * max(1, n // bs)

    def gen_fn(batch, j, kw, counter):
        undo = _wrap_passes(model, "forward_mae_encoder", counter)
        try:
            return model.sample_tokens(len(batch), num_iter=num_iter, cfg=3.0, labels=torch.tensor(batch),
                                       generator=torch.Generator().manual_seed(j), **kw)
        finally:
            undo()
    res = run_interleaved(options, batches, gen_fn, progress=not args.quick)
    rows = summarize(res, None)
    return {"model": f"MAR-B random weights at {args.marb_size if not args.quick else 64} px "
                     f"({(args.marb_size // 16) ** 2 if not args.quick else 16} tokens)" if not args.quick
            else "mar_tiny random weights (quick)", "images": n, "num_iter": num_iter, "cfg": 3.0, "rows": rows}


def plot(result, path):
    """Score against speed-up per part. Points carry numbers, keyed in a column beside each panel
    (option names written at the points overlapped where options share a speed)."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)
    parts = [(k, v) for k, v in result["parts"].items() if any("score" in r for r in v["rows"])]
    if not parts:
        return
    fig, axes = plt.subplots(1, 2 * len(parts), figsize=(10.5 * len(parts), 5.8), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1] * len(parts)})
    for i, (key, part) in enumerate(parts):
        ax, key_ax = axes[0][2 * i], axes[0][2 * i + 1]
        lines = []
        for n, r in enumerate(part["rows"]):
            colour = "k" if r["option"] == "exact" else ("C3" if r["option"] == "preset fast" else "C0")
            ax.errorbar(r["speedup"], r["score"], yerr=r["se"], fmt="o", capsize=3, color=colour)
            ax.annotate(str(n), (r["speedup"], r["score"]), fontsize=7, color=colour, xytext=(4, 2 + 7 * (n % 2)),
                        textcoords="offset points")
            delta = "" if r["option"] == "exact" else f", {r['delta']:+.3f}"
            lines.append(f"{n:>2}  {r['option']}  ({r['speedup']:.2f}x{delta})")
        ex = part["rows"][0]
        ax.axhspan(ex["score"] - ex["se"], ex["score"] + ex["se"], color="0.85", zorder=0)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("speed-up over exact sampling (images/s ratio, interleaved)")
        ax.set_ylabel("score (+- 1 SE; grey: exact's band)")
        ax.set_title(textwrap.fill(f"({key}) {part['model']}", 90), fontsize=9)
        key_ax.axis("off")
        key_ax.text(0, 1, "option (speed-up, score change)\n\n" + "\n".join(lines), va="top", family="monospace",
                    fontsize=7.5, transform=key_ax.transAxes)
    m = result["machine"]
    # the runs' own threads count toward the load: more than that means something ran beside them
    load = max(m["load_average_1_5_15"][0], m.get("load_average_end", [0])[0])
    fig.suptitle(f"fast sampling on {m['cpu']}, {m['threads']} thread{'s' * (m['threads'] != 1)}, {m['date'][:10]}"
                 f"{' (shared machine: load ' + format(load, '.1f') + ')' if load > m['threads'] + 0.75 else ''}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random models, a few images: checks the script")
    ap.add_argument("--ckpt", default="/tmp/fc/demo/run", help="(a): the demo's run folder or checkpoint")
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--prompts", type=int, default=192, help="(a): prompts (half single-object, half colour)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mar-steps", type=int, default=4000, help="(b): training steps")
    ap.add_argument("--mar-minutes", type=float, default=None, help="(b): training minutes (instead of steps)")
    ap.add_argument("--mar-layout", choices=("middle", "any"), default="middle",
                    help="(b): the object in the middle cell, or in any of the 9 (MAR needs far more steps)")
    ap.add_argument("--mar-precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="(b): training precision (auto: bf16 where the CPU has it natively)")
    ap.add_argument("--mar-ckpt", default=None,
                    help="(b): load the trained MAR from this file if it exists, else train and save it there")
    ap.add_argument("--mar-images", type=int, default=144, help="(b): images per option")
    ap.add_argument("--marb-size", type=int, default=64, help="(c): image size (tokens = (size / 16) ** 2)")
    ap.add_argument("--marb-images", type=int, default=2)
    ap.add_argument("--marb-iter", type=int, default=16)
    ap.add_argument("--options", default=None, help="comma-separated option names (default: all)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (on a busy shared machine 1 was 12x faster than 2 oversubscribed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = dict(OPTIONS)
    if args.options:
        names = ["exact"] + [s.strip() for s in args.options.split(",") if s.strip() and s.strip() != "exact"]
        opts = {k: (OPTIONS | MAR_EXTRA)[k] for k in names}
    result = {"machine": machine_info(), "fast_preset": {k: str(v) for k, v in sampling.FAST_PRESET.items()},
              "options": {k: {a: str(b) for a, b in v.items()} for k, v in (opts | MAR_EXTRA).items()}, "parts": {}}
    mar_ckpt = _load_mar_ckpt(args) if "b" in args.parts.split(",") else (None, None)
    jpath = out / (("fast_sampling_quick" if args.quick else "fast_sampling") + args.tag + ".json")
    c_opts = {k: (OPTIONS | MAR_EXTRA)[k] for k in C_OPTIONS} if not args.options else opts
    for key, fn, o in (("a", part_a, opts),
                       ("b", functools.partial(part_b, mar_ckpt=mar_ckpt), opts | ({} if args.options else MAR_EXTRA)),
                       ("c", part_c, c_opts)):
        if key not in args.parts.split(","):
            continue
        t0 = time.time()
        print(f"part ({key}) ...", flush=True)
        result["parts"][key] = fn(args, o)
        result["parts"][key]["wall_seconds"] = round(time.time() - t0, 1)
        print_table(f"({key}) {result['parts'][key]['model']}", result["parts"][key]["rows"])
        result["machine"]["load_average_end"] = list(os.getloadavg())
        jpath.write_text(json.dumps(result, indent=1))
    plot(result, jpath.with_suffix(".png"))
    print(f"wrote {jpath} and {jpath.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
