"""`fluid-ops study` / `run_study`: the paper's comparison of the four Fluid variants, reproduced
on the synthetic shapes under one protocol (docs/study.md).

    from fluid_ops.study import run_study
    result = run_study("study/")              # the full default study (about an hour on 2 cores)
    result = run_study("study-q/", quick=True)  # the whole pipeline on a tiny budget (CI)

The four variants {continuous, discrete} x {random, raster} train on the same data in the same
order per seed, with the same backbone, optimizer, schedule and number of steps; each samples
with the paper's CFG / temperature for that variant (`PAPER_SAMPLING`) and is scored on the same
GenEval-style prompts at several points of its run, plus a held-out validation loss. Then the
same protocol over several widths fits L = a * N^-alpha per variant.

Everything goes to `out/`: one folder per run (`runs/<id>/`: training checkpoint, one snapshot
and one evaluation JSON per eval point, `result.json` when the run is done), `protocol.json`,
`study.json`, `table.md` and the plots. A rerun with the same `out` skips what is done; a
different protocol there is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["run_study", "make_protocol", "fit_power_law", "check_study", "StudyError", "VARIANTS",
           "variant_config", "validation_loss", "heads_for", "eval_images"]

# name -> (token_kind, order, config in fluid_ops.models.fluid_config.CONFIGS)
VARIANTS = {
    "continuous-random": ("continuous", "random", "tiny"),
    "continuous-raster": ("continuous", "raster", "tiny-raster"),
    "discrete-random": ("discrete", "random", "tiny-discrete"),
    "discrete-raster": ("discrete", "raster", "tiny-raster-discrete"),
}
PROTOCOL_VERSION = 1
HEAD_DIM = 64                 # attention heads = width / 64 (the tiny config's 2 heads of 64 at width 128)
HEAD_WIDTH_RATIO = 2          # the continuous head's MLP width = 2 x width (tiny: 256 at 128)
VAL_DATA_SEED = 1_000_003     # the validation images' data seed; training seeds must differ from it

# The full default study, sized from the calibration in docs/study.md to take about 60-75 min of
# wall time on a 2-core CPU with --jobs 2. Widths 48-192 span >= 8x in trainable parameters for
# every variant (discrete 0.24M-3.1M, continuous 0.43M-5.9M); 256 would cost as much as the rest.
FULL = dict(steps=1000, seeds=(0, 1, 2), base_width=128, widths=(48, 64, 96, 128, 192), per_category=16,
            eval_fractions=(0.25, 0.5, 0.75, 1.0), num_diffusion_steps=50, val_images=256, warmup=100,
            text_encoder=None, tokenizer_fit_images=2048)
# --quick: every stage of the pipeline on a budget CI affords (hash text encoder: no weights to load)
QUICK = dict(steps=16, seeds=(0, 1), base_width=32, widths=(32, 64), per_category=1,
             eval_fractions=(0.5, 1.0), num_diffusion_steps=4, val_images=16, warmup=4, text_encoder="hash",
             tokenizer_fit_images=256)


class StudyError(ValueError):
    """A bad argument or a protocol clash: one line, raised before any work."""


# ---- the protocol ---------------------------------------------------------------------------
def heads_for(width: int) -> int:
    return max(1, int(width / HEAD_DIM + 0.5))


def make_protocol(*, quick: bool = False, steps: int | None = None, minutes: float | None = None,
                  seeds=None, widths=None, base_width: int | None = None, per_category: int | None = None,
                  scaling_seeds=None, precision: str = "auto") -> dict:
    """The protocol as a JSON-able dict: every choice that decides a result (and nothing that
    does not, such as --jobs). Validated: StudyError names the first bad argument."""
    d = QUICK if quick else FULL
    if steps is not None and minutes is not None:
        raise StudyError("study: give --steps or --minutes, not both (the budget is one or the other)")
    if minutes is not None and (not isinstance(minutes, (int, float)) or not math.isfinite(minutes) or minutes <= 0):
        raise StudyError(f"study: --minutes must be a number > 0, got {minutes!r}")
    steps = None if minutes is not None else (d["steps"] if steps is None else steps)
    fractions = list(d["eval_fractions"])
    if steps is not None and (not _is_int(steps) or steps < len(fractions)):
        raise StudyError(f"study: --steps must be an int >= {len(fractions)} (one per eval point), got {steps!r}")
    seeds = list(d["seeds"] if seeds is None else seeds)
    if not seeds or not all(_is_int(s) and 0 <= s != VAL_DATA_SEED for s in seeds) or len(set(seeds)) != len(seeds):
        raise StudyError(f"study: seeds must be distinct ints >= 0 (and not {VAL_DATA_SEED}, the validation data's), "
                         f"got {seeds!r}")
    base = d["base_width"] if base_width is None else base_width
    widths = sorted(set(d["widths"] if widths is None else widths) | {base})
    for w in widths:
        if not _is_int(w) or w < 8 or w % 4 or w % heads_for(w):
            raise StudyError(f"study: widths must be ints >= 8, multiples of 4 (sin-cos positions), divisible by "
                             f"their head count (width / {HEAD_DIM}); got {w!r}")
    per_category = d["per_category"] if per_category is None else per_category
    if not _is_int(per_category) or per_category < 1:
        raise StudyError(f"study: --per-category must be an int >= 1, got {per_category!r}")
    scaling_seeds = list(seeds[:1] if scaling_seeds is None else scaling_seeds)
    if not set(scaling_seeds) <= set(seeds):
        raise StudyError(f"study: scaling seeds {scaling_seeds} must be among the seeds {seeds} (the base-width "
                         "runs are reused)")
    if precision not in ("auto", "bf16", "fp32"):
        raise StudyError(f"study: --precision must be auto, bf16 or fp32, got {precision!r}")
    from fluid_ops.data.shapes import CATEGORIES, DEFAULT_KINDS
    from fluid_ops.models.fluid_config import PAPER_SAMPLING
    sampling = {}
    for name, (kind, order, _) in VARIANTS.items():
        cfg, temp = PAPER_SAMPLING[(kind, order)]
        s = {"cfg": cfg, "temperature": temp, "cfg_uncond": "text", "cfg_schedule": "linear",
             "num_iter": 16 if order == "random" else "all tokens"}
        if kind == "continuous":
            s["num_diffusion_steps"] = d["num_diffusion_steps"]
        sampling[name] = s
    return {
        "version": PROTOCOL_VERSION,
        "quick": bool(quick),
        "variants": {name: {"token_kind": k, "order": o, "config": c} for name, (k, o, c) in VARIANTS.items()},
        "model": {"base_width": base, "depth": 4, "head_dim": HEAD_DIM, "head_width_ratio": HEAD_WIDTH_RATIO,
                  "text_encoder": d["text_encoder"] or "the tiny config's"},
        "data": {"dataset": "shapes", "image_size": 32, "kinds": dict(DEFAULT_KINDS), "data_seed": "= run seed"},
        "train": {"steps": steps, "minutes": minutes, "batch_size": 32, "lr": 2e-3, "warmup_steps": d["warmup"],
                  "lr_decay": 0.3, "ema_decay": 0.99, "grad_clip": 1.0, "weight_decay": 0.02,
                  "betas": [0.9, 0.95], "precision": precision,
                  "tokenizer_fit_images": d["tokenizer_fit_images"]},
        "seeds": seeds,
        "eval": {"fractions": fractions, "per_category": per_category, "categories": list(CATEGORIES),
                 "prompt_seed": 0, "sample_seed": 0, "generate_batch_size": 16, "weights": "ema",
                 "sampling": sampling},
        "validation": {"images": d["val_images"], "data_seed": VAL_DATA_SEED, "batch_size": 32,
                       "draw_seed": 0, "precision": "fp32",
                       "note": "comparable only within a variant: token type and order define the loss"},
        # the scaling runs need only their final point (score and loss vs size): evaluating them once
        # saves a fifth of the study's time; their training is the main runs' protocol
        "scaling": {"widths": widths, "seeds": scaling_seeds, "eval_fractions": [1.0],
                    "variants": ["continuous-random", "continuous-raster", "best discrete by overall score"]},
    }


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def variant_config(protocol: dict, variant: str, width: int):
    """The FluidConfig of `variant` at `width` under `protocol` (validated)."""
    from fluid_ops.models.fluid_config import resolve_config
    p = protocol["eval"]["sampling"][variant]
    kind, order, base = VARIANTS[variant]
    over = {"model.width": width, "model.depth": protocol["model"]["depth"], "model.num_heads": heads_for(width),
            "head.width": protocol["model"]["head_width_ratio"] * width,
            # the config carries the study's sampling, so a snapshot samples as the study did
            "sampling.cfg": p["cfg"], "sampling.temperature": p["temperature"], "sampling.cfg_uncond": "text",
            "sampling.num_iter": p["num_iter"] if order == "random" else None}
    if "num_diffusion_steps" in p:
        over["sampling.num_diffusion_steps"] = p["num_diffusion_steps"]
    if protocol["model"]["text_encoder"] != "the tiny config's":
        over["text.encoder"] = protocol["model"]["text_encoder"]
    return resolve_config(base, **over)


def _sampling_kwargs(protocol: dict, variant: str) -> dict:
    p = dict(protocol["eval"]["sampling"][variant])
    if p["num_iter"] == "all tokens":
        p["num_iter"] = None
    return p


# ---- tasks: one training run with its evaluations ---------------------------------------------
def _run_id(variant: str, width: int, seed: int) -> str:
    return f"{variant}-w{width}-s{seed}"


def _fractions(protocol: dict, width: int) -> list[float]:
    """Eval points of a run at `width`: the main study's (base width) or the scaling runs' own."""
    return protocol["eval"]["fractions"] if width == protocol["model"]["base_width"] else \
        protocol["scaling"]["eval_fractions"]


def _eval_steps(protocol: dict, fractions) -> list[int] | None:
    steps = protocol["train"]["steps"]
    if steps is None:
        return None
    return sorted({max(1, round(f * steps)) for f in fractions})


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _log(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def validation_loss(model, protocol: dict) -> float:
    """The held-out loss: the first `images` shapes of the validation data seed, in batches whose
    masks / orders / noise / t are drawn from generators seeded by (draw_seed, batch index), in
    fp32, eval mode (no caption dropout). The same number for the same weights, whatever ran
    before; comparable across checkpoints and sizes of one variant only."""
    import torch
    from fluid_ops.data import ShapesDataset
    from fluid_ops.training import default_collate
    v = protocol["validation"]
    ds = ShapesDataset(size=protocol["data"]["image_size"], seed=v["data_seed"], kinds=protocol["data"]["kinds"])
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for b, start in enumerate(range(0, v["images"], v["batch_size"])):
                idx = range(start, min(start + v["batch_size"], v["images"]))
                images, captions = default_collate([ds[i] for i in idx])
                g = torch.Generator(device=model.device).manual_seed(v["draw_seed"] * 1_000_003 + b)
                total += float(model(images, captions, generator=g)) * len(idx)
                n += len(idx)
    finally:
        model.train(was)
    return total / n


def _snapshot(model, ema: dict, step: int, path: Path) -> None:
    """An EMA checkpoint `load_run` reads (config, EMA state dict, step)."""
    from fluid_ops.checkpoint import save_checkpoint
    sd = model.state_dict()
    sd.update({k: t.detach().clone() for k, t in ema.items()})
    save_checkpoint({"format": 1, "step": int(step), "config": dataclasses.asdict(model.config), "ema": sd},
                    path, keep_previous=False)


def eval_images(model, protocol: dict, variant: str):
    """(prompts, images): the protocol's evaluation prompts and `model`'s samples of them, drawn as
    the study draws them (one call, the protocol's seed, batch size, precision and the variant's
    sampling), so anything that scores or shows them sees the study's own images."""
    import fluid_ops
    from fluid_ops.eval import geneval_prompts
    e = protocol["eval"]
    prompts = geneval_prompts(per_category=e["per_category"], seed=e["prompt_seed"], categories=e["categories"])
    images = fluid_ops.generate(model, [p.text for p in prompts], seed=e["sample_seed"],
                                batch_size=e["generate_batch_size"], progress=False,
                                precision=protocol["train"]["precision"], **_sampling_kwargs(protocol, variant))
    return prompts, images


def _evaluate_snapshot(path: Path, protocol: dict, variant: str) -> dict:
    from fluid_ops.eval import evaluate
    from fluid_ops.models import load_run
    run = load_run(path)
    t0 = time.time()
    prompts, images = eval_images(run.model, protocol, variant)
    report = evaluate(images, prompts, progress=False, detections=False)
    t_sample = time.time() - t0
    val = validation_loss(run.model, protocol)
    return {"step": run.step, "overall": report["overall"],
            "categories": {k: c["accuracy"] for k, c in report["categories"].items()},
            "category_details": report["categories"], "val_loss": val,
            "prompts": [{"text": r["text"], "correct": bool(r["correct"])} for r in report["prompts"]],
            "sample_eval_seconds": round(t_sample, 2), "eval_seconds": round(time.time() - t0, 2)}


def _run_task(task: dict) -> dict:
    """Train one run (resuming its checkpoint if any), snapshot the EMA at each eval point, then
    evaluate every snapshot not yet evaluated; writes result.json last. Runs in a worker."""
    import torch
    from fluid_ops import backend
    from fluid_ops.data import ShapesDataset
    from fluid_ops.models import Fluid
    from fluid_ops.training import train
    protocol, variant, width, seed = task["protocol"], task["variant"], task["width"], task["seed"]
    folder = Path(task["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    rid = folder.name
    t_wall, t_cpu = time.time(), time.process_time()
    tr = protocol["train"]
    torch.manual_seed(seed)   # init: the seed, shared across variants
    model = Fluid(variant_config(protocol, variant, width))
    ds = ShapesDataset(size=protocol["data"]["image_size"], seed=seed, kinds=protocol["data"]["kinds"])
    fractions = _fractions(protocol, width)
    eval_steps = _eval_steps(protocol, fractions)
    snaps: dict[int, str] = {}
    budget_s = None if tr["minutes"] is None else 60.0 * tr["minutes"]
    next_frac = [0]
    report_every = max(1, (tr["steps"] or 10_000) // 10)

    def callback(info):
        due = False
        if eval_steps is not None:
            due = info.step in eval_steps and info.step != tr["steps"]   # the last one: after train returns
        else:
            while next_frac[0] < len(fractions) - 1 and info.elapsed_s >= fractions[next_frac[0]] * budget_s:
                next_frac[0] += 1
                due = True
        if due:
            _snapshot(info.model, info.ema, info.step, folder / f"snapshot-{info.step}.pt")
        if task["progress"] and info.step % report_every == 0:
            _log(f"{rid}: step {info.step}{'/' + str(tr['steps']) if tr['steps'] else ''} loss {info.loss:.4f} "
                 f"({info.elapsed_s:.0f} s)")
        return False

    if not (folder / "trained.json").exists():
        # a checkpoint per eval point (at most that much is lost to a crash); short runs: at the end
        n = tr["steps"] or 400
        ckpt_every = max(n // len(fractions), min(n, 100))
        result = train(model, ds, out_dir=folder / "train", steps=tr["steps"], minutes=tr["minutes"],
                       batch_size=tr["batch_size"], lr=tr["lr"], warmup_steps=tr["warmup_steps"],
                       lr_decay=tr["lr_decay"], weight_decay=tr["weight_decay"], betas=tuple(tr["betas"]),
                       grad_clip=tr["grad_clip"], ema_decay=tr["ema_decay"], ckpt_every=ckpt_every, seed=seed,
                       device="cpu", amp=tr["precision"], progress=False, log_every=1, callback=callback,
                       tokenizer_fit_images=tr["tokenizer_fit_images"])
        _snapshot(result.model, result.ema, result.step, folder / f"snapshot-{result.step}.pt")
        steps_per_s = None
        h = result.history
        if len(h["time"]) > 20:   # after warm-up: the last 80% of the steps
            k = len(h["time"]) // 5
            steps_per_s = (h["step"][-1] - h["step"][k]) / max(1e-9, h["time"][-1] - h["time"][k])
        _write_json(folder / "trained.json", {
            "steps": result.step, "train_seconds": round(result.elapsed_s, 2), "steps_per_s": steps_per_s,
            "stopped_by": result.stopped_by, "final_train_loss": result.final_loss,
            "precision": backend.resolve_precision(tr["precision"], torch.device("cpu")),
            "threads": torch.get_num_threads(),
            "snapshots": sorted(int(p.stem.split("-")[1]) for p in folder.glob("snapshot-*.pt"))})
        # the training checkpoint's weights live on in the snapshots; keep the folder small
        for name in ("checkpoint.pt", "checkpoint.prev.pt"):
            (folder / "train" / name).unlink(missing_ok=True)
    trained = json.loads((folder / "trained.json").read_text())
    evals = []
    for step in trained["snapshots"]:
        ej = folder / f"eval-{step}.json"
        if not ej.exists():
            _write_json(ej, _evaluate_snapshot(folder / f"snapshot-{step}.pt", protocol, variant))
        evals.append(json.loads(ej.read_text()))
    tok = None
    if VARIANTS[variant][0] == "discrete":  # the codebook: fitted per seed; the same across widths
        from fluid_ops.models import load_run
        sd = load_run(folder / f"snapshot-{trained['snapshots'][-1]}.pt").model.state_dict()
        cb = [v for k, v in sd.items() if k.startswith("tokenizer.")]
        tok = hashlib.sha256(b"".join(t.float().numpy().tobytes() for t in cb)).hexdigest()[:16]
    res = {"id": rid, "variant": variant, "width": width, "seed": seed, "params": model.num_parameters(),
           "config": dataclasses.asdict(model.config), "tokenizer_hash": tok, **trained,
           "evals": [{k: v for k, v in e.items() if k != "prompts"} for e in evals],
           "wall_seconds": round(time.time() - t_wall, 1), "cpu_seconds": round(time.process_time() - t_cpu, 1)}
    _write_json(folder / "result.json", res)
    return res


def _worker_init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


# ---- analysis ---------------------------------------------------------------------------------
def fit_power_law(n, loss) -> dict:
    """Least squares of log L = log a - alpha log N: {"alpha", "a", "r2" (in log space), "points"}."""
    import numpy as np
    x, y = np.log(np.asarray(n, float)), np.log(np.asarray(loss, float))
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(f"fit_power_law: needs >= 2 distinct sizes, got {list(n)}")
    slope, intercept = np.polyfit(x, y, 1)
    pred = intercept + slope * x
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {"alpha": float(-slope), "a": float(math.exp(intercept)),
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0, "points": len(x)}


def _stats(values: list[float]) -> dict:
    import statistics
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _summaries(protocol: dict, runs: dict) -> dict:
    base, cats = protocol["model"]["base_width"], protocol["eval"]["categories"]
    out = {}
    for v in VARIANTS:
        mine = [runs[_run_id(v, base, s)] for s in protocol["seeds"] if _run_id(v, base, s) in runs]
        if not mine:
            continue
        final = [r["evals"][-1] for r in mine]
        out[v] = {"seeds": [r["seed"] for r in mine], "steps": _stats([r["steps"] for r in mine]),
                  "params": mine[0]["params"],
                  "overall": _stats([e["overall"] for e in final]),
                  "categories": {c: _stats([e["categories"][c] for e in final]) for c in cats},
                  "val_loss": _stats([e["val_loss"] for e in final]),
                  "curve": [{"step": _stats([r["evals"][i]["step"] for r in mine])["mean"],
                             "overall": _stats([r["evals"][i]["overall"] for r in mine])}
                            for i in range(min(len(r["evals"]) for r in mine))]}
    return out


def _best_discrete(summary: dict) -> str | None:
    d = [v for v in ("discrete-random", "discrete-raster") if v in summary]
    if len(d) < 2:
        return None
    return max(d, key=lambda v: (summary[v]["overall"]["mean"], v == "discrete-random"))


def _scaling(protocol: dict, runs: dict, best: str | None) -> dict:
    out = {}
    for v in ["continuous-random", "continuous-raster"] + ([best] if best else []):
        pts = []
        for w in protocol["scaling"]["widths"]:
            rs = [runs[_run_id(v, w, s)] for s in protocol["scaling"]["seeds"] if _run_id(v, w, s) in runs]
            if rs:
                pts.append({"width": w, "params": rs[0]["params"],
                            "val_loss": _stats([r["evals"][-1]["val_loss"] for r in rs])["mean"],
                            "overall": _stats([r["evals"][-1]["overall"] for r in rs])["mean"]})
        entry = {"points": pts}
        if len(pts) >= 2:
            entry["fit"] = fit_power_law([p["params"] for p in pts], [p["val_loss"] for p in pts])
            entry["params_span"] = max(p["params"] for p in pts) / min(p["params"] for p in pts)
        out[v] = entry
    return out


def _table(study: dict) -> str:
    p, summ = study["protocol"], study["summary"]
    cats = p["eval"]["categories"]
    budget = f"{p['train']['steps']} steps" if p["train"]["steps"] else f"{p['train']['minutes']} min"
    lines = [f"# Fluid variants on the synthetic shapes{' (quick)' if p['quick'] else ''}", "",
             f"Width {p['model']['base_width']}, {budget} per run, seeds {p['seeds']}, "
             f"{p['eval']['per_category']} prompts per category; mean ± std over seeds (min–max in study.json). "
             "Validation losses compare only within a variant.", "",
             "| variant | params | " + " | ".join(cats) + " | overall | val loss |",
             "|---|---|" + "---|" * (len(cats) + 2)]
    for v, s in summ.items():
        cells = [f"{s['categories'][c]['mean']:.3f} ± {s['categories'][c]['std']:.3f}" for c in cats]
        lines.append(f"| {v} | {s['params'] / 1e6:.2f}M | " + " | ".join(cells) +
                     f" | **{s['overall']['mean']:.3f} ± {s['overall']['std']:.3f}** | "
                     f"{s['val_loss']['mean']:.4f} ± {s['val_loss']['std']:.4f} |")
    if study.get("best_discrete"):
        lines += ["", f"Best discrete variant (by mean overall score): {study['best_discrete']}."]
    lines += ["", "## Scaling (validation loss L = a · N^-α, N trainable parameters)", "",
              "| variant | widths | params span | α | R² (log-log) |", "|---|---|---|---|---|"]
    for v, s in study["scaling"].items():
        if "fit" in s:
            lines.append(f"| {v} | {', '.join(str(x['width']) for x in s['points'])} | {s['params_span']:.1f}x | "
                         f"{s['fit']['alpha']:.3f} | {s['fit']['r2']:.3f} |")
    return "\n".join(lines) + "\n"


def _plots(study: dict, out: Path) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import numpy as np
    written = []

    def save(fig, name):
        FigureCanvasAgg(fig)
        fig.tight_layout()
        fig.savefig(out / name)
        written.append(name)

    summ, cats, runs = study["summary"], study["protocol"]["eval"]["categories"], study["runs"]
    base, seeds = study["protocol"]["model"]["base_width"], study["protocol"]["seeds"]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for i, v in enumerate(summ):
        rs = [runs[_run_id(v, base, s)] for s in seeds if _run_id(v, base, s) in runs]
        for r in rs:
            ax.plot([e["step"] for e in r["evals"]], [e["overall"] for e in r["evals"]], color=f"C{i}", alpha=0.3,
                    linewidth=0.8)
        c = summ[v]["curve"]
        ax.plot([e["step"] for e in c], [e["overall"]["mean"] for e in c], "o-", color=f"C{i}", label=v)
    ax.set_xlabel("training step")
    ax.set_ylabel("overall score (mean over seeds; thin: each seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "score_vs_steps.png")

    fig = Figure(figsize=(9, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    names = list(cats) + ["overall"]
    width = 0.8 / max(1, len(summ))
    for i, v in enumerate(summ):
        s = summ[v]
        m = [s["categories"][c]["mean"] for c in cats] + [s["overall"]["mean"]]
        e = [s["categories"][c]["std"] for c in cats] + [s["overall"]["std"]]
        ax.bar(np.arange(len(names)) + i * width, m, width, yerr=e, capsize=2, color=f"C{i}", label=v)
    ax.set_xticks(np.arange(len(names)) + width * (len(summ) - 1) / 2)
    ax.set_xticklabels(names, rotation=20)
    ax.set_ylabel("accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    save(fig, "score_per_category.png")

    colour = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for v, s in study["scaling"].items():
        if not s["points"]:
            continue
        n = np.array([p["params"] for p in s["points"]], float)
        ax.plot(n, [p["val_loss"] for p in s["points"]], "o", color=colour[v])
        label = v
        if "fit" in s:
            f = s["fit"]
            xs = np.geomspace(n.min(), n.max(), 50)
            label = f"{v}: α = {f['alpha']:.3f} (R² {f['r2']:.2f})"
            ax.plot(xs, f["a"] * xs ** -f["alpha"], "-", color=colour[v], label=label)
        else:
            ax.plot([], [], "o", color=colour[v], label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("validation loss (each variant its own loss)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save(fig, "val_loss_vs_params.png")

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for v, s in study["scaling"].items():
        if s["points"]:
            ax.plot([p["params"] for p in s["points"]], [p["overall"] for p in s["points"]], "o-", color=colour[v],
                    label=v)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("overall score (final eval point)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "score_vs_params.png")
    return written


def check_study(new: dict, committed: dict, *, k: float = 2.0) -> tuple[list[str], bool]:
    """Whether each variant's and category's new mean lies in the committed seed interval: the
    committed mean ± max(k * std over seeds, one prompt's worth, 1 / per_category). Returns the
    table lines and whether every cell passed. The protocols must be the same."""
    diff = _protocol_diff(committed["protocol"], new["protocol"])
    if diff:
        raise StudyError(f"study --check: the protocols differ ({diff}); only the same protocol compares")
    slack = 1.0 / committed["protocol"]["eval"]["per_category"]
    cats = list(committed["protocol"]["eval"]["categories"]) + ["overall"]
    lines = [f"{'variant':<20}{'category':<15}{'committed':>20}{'new':>8}  within",
             "-" * 72]
    ok = True
    for v, s in committed["summary"].items():
        for c in cats:
            ref = s["overall"] if c == "overall" else s["categories"][c]
            got = new.get("summary", {}).get(v)
            if got is None:
                lines.append(f"{v:<20}{c:<15}{'':>20}{'-':>8}  MISSING")
                ok = False
                continue
            m = (got["overall"] if c == "overall" else got["categories"][c])["mean"]
            half = max(k * ref["std"], slack)
            inside = ref["mean"] - half - 1e-9 <= m <= ref["mean"] + half + 1e-9
            ok &= inside
            lines.append(f"{v:<20}{c:<15}{ref['mean']:>11.3f} ± {half:<6.3f}{m:>8.3f}  {'yes' if inside else 'NO'}")
    lines.append(f"rule: new mean within committed mean ± max({k:g} x seed std, 1/{int(1 / slack)}); "
                 f"{'all within' if ok else 'NOT all within'}")
    return lines, ok


def _protocol_diff(a: dict, b: dict, prefix: str = "") -> str:
    """The first differing keys of two protocol dicts, as 'key: old -> new', or ''."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        x, y = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(x, dict) and isinstance(y, dict):
            d = _protocol_diff(x, y, f"{prefix}{k}.")
            if d:
                out.append(d)
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return "; ".join(out[:4])


# ---- the driver ---------------------------------------------------------------------------------
def _default_jobs() -> int:
    # 2 x 1-thread processes beat 1 x 2-thread on these tiny models (docs/study.md, calibration):
    # one thread per core, as many jobs as cores (at most 4: the runs are small).
    return max(1, min(4, os.cpu_count() or 1))


def run_study(out="study", *, quick: bool = False, steps: int | None = None, minutes: float | None = None,
              seeds=None, widths=None, per_category: int | None = None, jobs: int | None = None,
              precision: str = "auto", progress: bool = True, check: str | os.PathLike | None = None) -> dict:
    """Run (or resume) the study into `out`; returns the study dict also written to study.json.
    Arguments and a protocol clash with `out` are checked before any work (StudyError)."""
    t0_wall, t0_cpu = time.time(), time.process_time()
    protocol = make_protocol(quick=quick, steps=steps, minutes=minutes, seeds=seeds, widths=widths,
                             per_category=per_category, precision=precision)
    jobs = _default_jobs() if jobs is None else jobs
    if not _is_int(jobs) or jobs < 1:
        raise StudyError(f"study: --jobs must be an int >= 1, got {jobs!r}")
    committed = None
    if check is not None:
        try:
            committed = json.loads(Path(check).read_text())
            committed["protocol"], committed["summary"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StudyError(f"study --check: {check} is not a readable study.json ({e})") from None
    for v in VARIANTS:
        for w in protocol["scaling"]["widths"]:
            try:
                variant_config(protocol, v, w)
            except (ValueError, TypeError) as e:
                raise StudyError(f"study: {v} at width {w}: {e}") from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StudyError(f"study: --out {out} exists and is not a folder")
    pfile = out / "protocol.json"
    if pfile.exists():
        old = json.loads(pfile.read_text())
        if old != json.loads(json.dumps(protocol)):
            raise StudyError(f"study: {out} holds a study under another protocol ({_protocol_diff(old, protocol)}); "
                             "use another --out, or the same arguments to resume it")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(pfile, protocol)

    base, seeds_ = protocol["model"]["base_width"], protocol["seeds"]
    main = [(v, base, s) for v in ("discrete-random", "discrete-raster", "continuous-random",
                                   "continuous-raster") for s in seeds_]
    sc_widths = [w for w in protocol["scaling"]["widths"] if w != base]
    cont_scaling = [(v, w, s) for w in sorted(sc_widths, reverse=True) for v in ("continuous-random",
                                                                                   "continuous-raster")
                    for s in protocol["scaling"]["seeds"]]
    runs: dict[str, dict] = {}
    for f in (out / "runs").glob("*/result.json"):
        r = json.loads(f.read_text())
        runs[r["id"]] = r
    import torch
    cores = os.cpu_count() or 1
    threads = max(1, cores // jobs)
    state = {"best": None}

    def discrete_scaling():
        summ = _summaries(protocol, runs)
        state["best"] = _best_discrete(summ)
        return [(state["best"], w, s) for w in sorted(sc_widths, reverse=True) for s in protocol["scaling"]["seeds"]]

    def pending(keys):
        return [k for k in keys if _run_id(*k) not in runs]

    def task(k):
        v, w, s = k
        folder = out / "runs" / _run_id(v, w, s)
        return {"protocol": protocol, "variant": v, "width": w, "seed": s, "folder": str(folder),
                "progress": progress}

    def write_all(final: bool):
        summ = _summaries(protocol, runs)
        best = _best_discrete(summ)
        study = {"protocol": protocol, "machine": _machine(threads, jobs), "runs": dict(sorted(runs.items())),
                 "summary": summ, "best_discrete": best, "scaling": _scaling(protocol, runs, best),
                 "complete": final}
        prev = out / "study.json"
        calls = json.loads(prev.read_text()).get("calls", []) if prev.exists() else []
        study["calls"] = calls + [{"date": time.strftime("%Y-%m-%d %H:%M:%S"), "jobs": jobs, "threads": threads,
                                   "wall_seconds": round(time.time() - t0_wall, 1),
                                   "main_cpu_seconds": round(time.process_time() - t0_cpu, 1)}]
        study["total"] = {"runs_wall_seconds": round(sum(r["wall_seconds"] for r in runs.values()), 1),
                          "cpu_seconds": round(sum(r["cpu_seconds"] for r in runs.values()) +
                                               sum(c["main_cpu_seconds"] for c in study["calls"]), 1),
                          "wall_seconds": round(sum(c["wall_seconds"] for c in study["calls"]), 1)}
        if final:
            _write_json(prev, study)
            (out / "table.md").write_text(_table(study))
            study["plots"] = _plots(study, out)
            _write_json(prev, study)
        else:
            # a partial study.json would count this call twice once resumed: progress goes to a side file
            _write_json(out / "study.partial.json", study)
        return study

    todo_first = pending(main) + pending(cont_scaling)
    total_expected = len(main) + len(cont_scaling) + len(sc_widths) * len(protocol["scaling"]["seeds"])
    _log(f"{len(runs)} of {total_expected} runs already done in {out}; {len(todo_first)} to run now, then the best "
         f"discrete variant's scaling runs; {jobs} job(s) x {threads} thread(s)")

    done_count = [len(runs)]

    def finished(res):
        runs[res["id"]] = res
        done_count[0] += 1
        e = res["evals"][-1]
        _log(f"done {res['id']} ({done_count[0]}/{total_expected}): {res['steps']} steps, overall {e['overall']:.3f}, "
             f"val loss {e['val_loss']:.4f}, {res['wall_seconds']:.0f} s; elapsed {time.time() - t0_wall:.0f} s")
        write_all(False)

    discrete_main = {_run_id(*k) for k in main if k[0].startswith("discrete")}
    if jobs == 1:
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for k in todo_first:
                finished(_run_task(task(k)))
            for k in pending(discrete_scaling()):
                finished(_run_task(task(k)))
        finally:
            torch.set_num_threads(torch_threads)
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        queue = list(todo_first)
        added_discrete = False
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            running = {}
            while queue or running or not added_discrete:
                if not added_discrete and discrete_main <= set(runs):
                    queue += pending(discrete_scaling())
                    added_discrete = True
                while queue and len(running) < jobs:
                    k = queue.pop(0)
                    running[pool.submit(_run_task, task(k))] = k
                if not running:
                    if not added_discrete and not queue:
                        raise RuntimeError("study: the discrete main runs did not finish")  # not reached
                    continue
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    running.pop(f)
                    finished(f.result())
    discrete_scaling()
    study = write_all(True)
    (out / "study.partial.json").unlink(missing_ok=True)
    _log(f"wrote {out / 'study.json'}, {out / 'table.md'} and {len(study['plots'])} plots "
         f"({time.time() - t0_wall:.0f} s this call)")
    if committed is not None:
        lines, ok = check_study(study, committed)
        study["check"] = {"against": str(check), "ok": ok, "lines": lines}
    return study


def _machine(threads: int, jobs: int) -> dict:
    from fluid_ops import backend
    from fluid_ops.bench import machine_info
    info = machine_info()
    info.update({"threads_per_job": threads, "jobs": jobs, "precision_auto_means": backend.auto_precision("cpu")})
    return info


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `fluid-ops study`")
