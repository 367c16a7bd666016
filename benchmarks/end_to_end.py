"""End-to-end Fluid throughput: sampling images/s and training steps/s, fluid_ops' default backends
against `fluid_ops.use_backend("reference")` (plain PyTorch ops) at equal batch and settings.

    python benchmarks/end_to_end.py --grid gpu      # Fluid-166M and -369M (64 AR steps, 100 diffusion steps, CFG)
    python benchmarks/end_to_end.py --grid cpu      # what a 2-core CPU can do: tiny, and Fluid-166M at batch 2
    python benchmarks/end_to_end.py --quick         # tiny grid for CI (< 1 min); prints, writes only with --out

Both backends run the same model code: only the ops differ (attention, the denoiser's fused
LayerNorm-modulate and gated residual, the DDPM step, categorical sampling). GEMMs are torch's
in both, so on a CPU the gap is what the kernels save around them. Timings alternate between the
backends round by round (the machine may be shared, so only interleaved medians compare); on CUDA
every timed call is bracketed by synchronize. Each sampling run starts from the same seed, so the
two backends' images are also compared (fp32: exact contract, differences at rounding level; the
images are clamped to [0, 1] and an untrained head's tokens are large, so many pixels saturate and
this is a weak check: the tests compare tokens).

Model weights: fresh init, with the diffusion head's zero-initialised layers given small random
values (MAR's init makes the head the zero map, which would make every sample trivially equal).
Text: the "hash" encoder by default (its outputs are cached per caption, so the text encoder
costs nothing after the first call whichever it is; `--text-encoder minilm` to use the real one).

Writes JSON (device, versions, date, settings, per-run times, medians, ratios) and a PNG plot
next to it: benchmarks/results/end_to_end_<grid>.json / .png.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fluid_ops  # noqa: E402
from fluid_ops.models import Fluid  # noqa: E402
from benchmarks._sampling_bench import _cpu_name  # noqa: E402

PROMPTS = ["a red circle at the top left", "two blue squares", "a green triangle at the bottom",
           "a yellow circle in the center", "a purple square at the right", "an orange triangle at the top"]

# Per grid: models, and for each model the sampling and training settings. "sample": batch,
# num_iter (AR steps), steps (diffusion steps per token), cfg; "train": batch.
GRIDS = {
    "quick": {"rounds": 2, "warmup": 1, "models": {
        "tiny": {"sample": dict(batch=2, num_iter=4, steps=5, cfg=5.0), "train": dict(batch=4)},
        "tiny-raster": {"sample": dict(batch=2, num_iter=None, steps=2, cfg=4.5), "train": dict(batch=4)},
    }},
    "cpu": {"rounds": 3, "warmup": 1, "rounds_by_model": {"fluid-166m": 2}, "models": {
        "tiny": {"sample": dict(batch=4, num_iter=64, steps=100, cfg=5.0), "train": dict(batch=64)},
        "fluid-166m": {"sample": dict(batch=1, num_iter=2, steps=20, cfg=5.0), "train": dict(batch=2)},
    }},
    "gpu": {"rounds": 5, "warmup": 1, "models": {
        "fluid-166m": {"sample": dict(batch=64, num_iter=64, steps=100, cfg=5.0), "train": dict(batch=32)},
        "fluid-369m": {"sample": dict(batch=64, num_iter=64, steps=100, cfg=5.0), "train": dict(batch=32)},
    }},
}
BACKENDS = ("default", "reference")


def machine_info(device: torch.device) -> dict:
    info = {"device": str(device), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "fluid_ops": fluid_ops.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backends": {k: v["available"] for k, v in fluid_ops.backends().items()},
            "cpu_simd_flags": fluid_ops.backend.cpu_simd_flags(), "cpu_native_bf16": fluid_ops.backend.native_bf16("cpu"),
            "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["load_avg_1min_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def _backend_ctx(name):
    return fluid_ops.use_backend("reference") if name == "reference" else contextlib.nullcontext()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(name: str, device, text_encoder: str, seed: int = 0) -> Fluid:
    torch.manual_seed(seed)
    m = Fluid(name, text_encoder=text_encoder)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-degenerate head (see module docstring)
        for p in m.head.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    m.to(device)
    if m.needs_tokenizer_fit:
        s = m.config.image.size
        m.fit_tokenizer(torch.rand(16, 3, s, s, generator=g).to(device), iters=3, generator=g)
    return m


def time_sampling(m: Fluid, backend: str, s: dict, device, precision) -> tuple[float, torch.Tensor]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(s["batch"])]
    g = torch.Generator(device=device).manual_seed(0)
    with _backend_ctx(backend):
        _sync(device)
        t0 = time.perf_counter()
        # precision "bf16": the transformer under bf16 autocast, bf16 head GEMMs (Fluid.generate)
        out = m.generate(prompts, num_iter=s["num_iter"], cfg=s["cfg"], num_diffusion_steps=s["steps"], generator=g,
                         precision=precision)
        _sync(device)
    return time.perf_counter() - t0, out


def time_training(m: Fluid, opt, backend: str, s: dict, device, autocast, images, captions) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    with _backend_ctx(backend):
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = m(images, captions, generator=g)
        loss.backward()
        opt.step()
        _sync(device)
    return time.perf_counter() - t0


def run_grid(grid: str, device, *, text_encoder: str, precision: str, rounds=None, models=None,
             tasks=("sample", "train"), progress=True) -> list[dict]:
    spec = GRIDS[grid]
    explicit_rounds = rounds is not None
    rounds = rounds or spec["rounds"]
    variants = [(b, p) for p in (("fp32", "bf16") if precision == "both" else (precision,)) for b in BACKENDS]

    def autocast_for(p):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16) if p == "bf16" else contextlib.nullcontext()

    rows = []
    for name, settings in spec["models"].items():
        if models and name not in models:
            continue
        m = build_model(name, device, text_encoder)
        n_rounds = rounds if explicit_rounds else spec.get("rounds_by_model", {}).get(name, rounds)
        nparams = m.num_parameters()
        if "sample" in tasks:
            s = settings["sample"]
            times = {v: [] for v in variants}
            outs = {}
            m.eval()
            for r in range(spec["warmup"] + n_rounds):
                for v in variants:
                    t, out = time_sampling(m, v[0], s, device, v[1])
                    if r >= spec["warmup"]:
                        times[v].append(t)
                    outs[v] = out
                    if progress:
                        print(f"  {name} sample {v[0]} {v[1]} round {r}: {t:.3f} s", file=sys.stderr, flush=True)
            for v in variants:
                other = outs[("reference" if v[0] == "default" else "default", v[1])]
                med = statistics.median(times[v])
                rows.append({"model": name, "params": nparams, "task": "sample", "backend": v[0], "precision": v[1],
                             "settings": s, "times_s": times[v], "median_s": med, "throughput": s["batch"] / med,
                             "unit": "images/s",
                             "max_abs_image_diff_vs_other_backend": (outs[v].float() - other.float()).abs().max().item()})
        if "train" in tasks:
            s = settings["train"]
            m.train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
            sz = m.config.image.size
            images = torch.rand(s["batch"], 3, sz, sz, generator=torch.Generator().manual_seed(2)).to(device)
            captions = [PROMPTS[i % len(PROMPTS)] for i in range(s["batch"])]
            times = {v: [] for v in variants}
            for r in range(spec["warmup"] + n_rounds):
                for v in variants:
                    t = time_training(m, opt, v[0], s, device, autocast_for(v[1]), images, captions)
                    if r >= spec["warmup"]:
                        times[v].append(t)
                    if progress:
                        print(f"  {name} train {v[0]} {v[1]} round {r}: {t:.3f} s", file=sys.stderr, flush=True)
            for v in variants:
                med = statistics.median(times[v])
                rows.append({"model": name, "params": nparams, "task": "train", "backend": v[0], "precision": v[1],
                             "settings": s, "times_s": times[v], "median_s": med, "throughput": 1.0 / med,
                             "unit": "steps/s", "images_per_s": s["batch"] / med})
            del opt
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """fluid_ops over the reference ops at each precision; with both precisions, also bf16 over fp32
    (fluid_ops in bf16 against fluid_ops in fp32, and against the reference ops under autocast)."""
    out = []
    by = {(r["model"], r["task"], r["backend"], r.get("precision", "fp32")): r for r in rows}
    for (model, task, backend, prec), r in by.items():
        if backend != "default" or (model, task, "reference", prec) not in by:
            continue
        ref = by[(model, task, "reference", prec)]
        out.append({"model": model, "task": task, "precision": prec, "unit": r["unit"], "default": r["throughput"],
                    "reference": ref["throughput"], "speedup": r["throughput"] / ref["throughput"]})
        if prec == "bf16" and (model, task, "default", "fp32") in by:
            f32 = by[(model, task, "default", "fp32")]
            out[-1]["bf16_over_fp32"] = r["throughput"] / f32["throughput"]
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'model':12s} {'task':6s} {'prec':5s} {'settings':42s} {'fluid_ops':>10s} {'reference':>10s} "
             f"{'unit':9s} {'speedup':>7s} {'bf16/fp32':>9s}"]
    for q in ratios(rows):
        s = next(r["settings"] for r in rows if r["model"] == q["model"] and r["task"] == q["task"])
        st = ", ".join(f"{k}={v}" for k, v in s.items())
        bf = f"{q['bf16_over_fp32']:8.2f}x" if "bf16_over_fp32" in q else ""
        lines.append(f"{q['model']:12s} {q['task']:6s} {q['precision']:5s} {st:42s} {q['default']:10.4g} "
                     f"{q['reference']:10.4g} {q['unit']:9s} {q['speedup']:6.2f}x {bf:>9s}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    qs = ratios(rows)
    if not qs:
        return
    fig, axes = plt.subplots(1, len(qs), figsize=(3.2 * len(qs), 3.4), squeeze=False)
    for ax, q in zip(axes[0], qs):
        vals = [q["default"], q["reference"]]
        ax.bar(["fluid_ops", "reference"], vals, color=["tab:blue", "tab:gray"])
        ax.set_title(f"{q['model']} {q['task']} {q['precision']}\n{q['speedup']:.2f}x", fontsize=9)
        ax.set_ylabel(q["unit"])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=list(GRIDS), default=None, help="default: gpu on CUDA, else cpu")
    p.add_argument("--quick", action="store_true", help="the tiny CI grid (same as --grid quick)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "both", "auto"), default="auto",
                   help="bf16: Fluid.generate(precision='bf16') and bf16 autocast for training; both: fp32 and bf16 "
                        "interleaved; auto (default): both where the device computes bf16 natively (CUDA, CPUs "
                        "with AVX512_BF16 / AMX), else fp32 (emulated bf16 is several times slower)")
    p.add_argument("--text-encoder", default="hash")
    p.add_argument("--models", nargs="*", default=None, help="a subset of the grid's models")
    p.add_argument("--tasks", nargs="*", default=["sample", "train"], choices=["sample", "train"])
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per backend (interleaved)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/end_to_end_<grid>.json; "
                                               "--quick writes only when given)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = "quick" if args.quick else (args.grid or ("gpu" if device.type == "cuda" else "cpu"))
    precision = args.precision
    if precision == "auto":
        precision = "both" if fluid_ops.backend.native_bf16(device) else "fp32"
    info = machine_info(device)
    print(json.dumps(info), file=sys.stderr)
    t0 = time.perf_counter()
    rows = run_grid(grid, device, text_encoder=args.text_encoder, precision=precision, rounds=args.rounds,
                    models=args.models, tasks=tuple(args.tasks))
    print(table(rows))
    result = {"machine": info, "grid": grid, "precision": precision, "text_encoder": args.text_encoder,
              "grid_spec": GRIDS[grid], "wall_s": time.perf_counter() - t0, "results": rows, "ratios": ratios(rows)}
    try:
        result["machine"]["load_avg_1min_at_end"] = os.getloadavg()[0]
    except OSError:
        pass
    out = args.out or (None if grid == "quick" else str(ROOT / "benchmarks" / "results" / f"end_to_end_{grid}.json"))
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        plot(rows, out.with_suffix(".png"), f"Fluid end to end, {grid} grid, {info.get('gpu', info['cpu'])}, {precision}")
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
