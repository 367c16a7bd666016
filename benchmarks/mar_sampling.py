"""End-to-end MAR sampling throughput: images/s of fluid_ops' MAR against its peers, and where
the time goes (transformer vs diffusion head).

    python benchmarks/mar_sampling.py                 # the issue's grid (for a GPU): MAR-B/L/H, batch 16 and 256,
                                                      #   64 AR steps, 100 diffusion steps
    python benchmarks/mar_sampling.py --grid cpu      # a reduced CPU grid: MAR-B, batch 2, 8 AR x 12 diffusion steps
    python benchmarks/mar_sampling.py --quick         # tiny MAR, a few seconds (CI smoke test)

Variants, all with the same random weights (fluid_ops' MAR init, the head's zero-initialised
layers given small random values so that the head's output depends on z), class-conditional
with CFG and the linear CFG schedule, temperature 1.0, fp32:
  fluid_ops            fluid_ops.models.MAR, default backends (the fastest built one per op)
  fluid_ops_reference  the same model under fluid_ops.use_backend("reference") (plain PyTorch ops)
  standin_accelerated  tests/mar_standin.py's MAR (MAR's own code structure: the real timm's blocks, DiffLoss,
                       IDDPM loop, nonzero gathers, host syncs) after fluid_ops.accelerate(model)
  standin              the same stand-in unaccelerated: the "MAR as published" baseline
  fluid_ops_bf16       fluid_ops.models.MAR with precision="bf16" (transformer under bf16 autocast, our
                       attention on bf16 inputs, bf16 head GEMMs)
  standin_accelerated_bf16  the stand-in after fluid_ops.accelerate(model, precision="bf16")
  standin_autocast     the stand-in under torch.autocast(device, torch.bfloat16): the one-line peer a
                       user reaches for first
  standin_compile      the stand-in with torch.compile(dynamic=True) on its encoder, decoder and head
                       network (MAR's sampling loop itself has host syncs and data-dependent shapes, so
                       the loop stays eager, as a user compiling MAR would leave it); fp32
  standin_autocast_compile  the same under bf16 autocast: the strongest one-file peer
  (compile time is paid in the warm-up call and is not in the medians; it is reported as
  compile_seconds)
The stand-in loads fluid_ops' MAR state dict (same names), so all variants run the same network;
the first four in fp32 (precision="fp32"), the last three in bf16 (rounding-level; where bf16 is
emulated, as on AVX2-only CPUs, they are slower than fp32).

Timing: whole `sample_tokens` calls, variants interleaved round by round (round r runs every
variant once; machine load hits all alike), reported as medians over rounds; one short warm-up
call (2 AR steps) per variant first. CUDA: CUDA events around each call (then a synchronize);
CPU: time.perf_counter. Images/s = batch / median seconds.

Time split: explicit timers around the two parts, installed as instance attributes that wrap
`model.forward_mae_encoder` + `model.forward_mae_decoder` ("transformer") and
`model.diffloss.sample` ("head"); both MARs call these through `self`, so the wrappers see every
call. On CUDA each wrapper records a pair of CUDA events on the current stream (no host sync is
added; the events are read after the call), on CPU it reads perf_counter. "other" = total -
transformer - head (orders, gathers, masks, MAR's nonzero and .item() calls, token scatter). The
split comes from the same timed runs (the timers cost microseconds per AR step); --no-split
times without them.

Agreement (a benchmark of a wrong result is worthless): fluid_ops vs fluid_ops_reference use the
same generator, and standin_accelerated vs standin the same torch seed, so each pair should
give the same latents up to fp32 rounding amplified by the loop: reported as max |a - b| /
max |b| (untrained heads give samples of large magnitude, so relative to the largest value).

Output: a table, JSON under benchmarks/results/mar_sampling[_<grid>].json (device, versions, date,
settings, per-round times, medians, split, ratios to each peer) and a PNG plot beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

import fluid_ops  # noqa: E402
from fluid_ops.models.mar import FACTORIES  # noqa: E402

VARIANTS = ("fluid_ops", "fluid_ops_reference", "standin_accelerated", "standin", "standin_compile",
            "fluid_ops_bf16", "standin_accelerated_bf16", "standin_autocast", "standin_autocast_compile")
# MAR's paper CFG scales per size (docs/contracts.md §1); tiny uses MAR-B's
CFG = {"mar_base": 2.9, "mar_large": 3.0, "mar_huge": 3.2, "mar_tiny": 2.9}
GRIDS = {
    # the grid
    "full": dict(models=["mar_base", "mar_large", "mar_huge"], batches=[16, 256], num_iter=64, steps=100, rounds=3),
    # MAR-B on a CPU: 64 AR x 100 diffusion steps at batch 16 would take hours here. AR steps and
    # diffusion steps are cut by the same factor (~8), which keeps the transformer / head balance
    # of the full setting at this batch (the transformer's work scales with AR steps, the head's
    # with diffusion steps; the head samples every token once whatever the number of AR steps).
    # Batch 2: one such run is ~1.5 TFLOP (~20 s on an idle 2-core EPYC, minutes on a loaded one).
    "cpu": dict(models=["mar_base"], batches=[2], num_iter=8, steps=12, rounds=3),
    # CI smoke test: tiny MAR, seconds; one thread (tiny ops only lose to thread hand-offs)
    "quick": dict(models=["mar_tiny"], batches=[2, 4], num_iter=4, steps=5, rounds=1, threads=1),
}


def load_standin():
    """tests/mar_standin.py, imported by path (the tests folder is not a package to install)."""
    path = ROOT / "tests" / "mar_standin.py"
    spec = importlib.util.spec_from_file_location("mar_standin", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def machine_info(device: torch.device) -> dict:
    from benchmarks.cpu_ops import machine_info as cpu_info

    info = cpu_info()
    info["device"] = str(device)
    info["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    info["backends"] = {k: v["available"] for k, v in fluid_ops.backends().items()}
    # the stand-in's blocks are the installed timm's (tests/mar_standin.py)
    info["timm"] = load_standin().TIMM_VERSION
    return info


# ---- models -------------------------------------------------------------------------------------
def build_models(name: str, steps: int, device, seed: int = 0) -> dict:
    """{variant: (model, sample_fn(bsz, labels, num_iter, cfg, seed) -> latents)} sharing one set
    of random weights."""
    torch.manual_seed(seed)
    ours = FACTORIES[name](num_sampling_steps=str(steps), attn_dropout=0.0, proj_dropout=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # MAR zero-inits the head's adaLN / output layers: give them small values
        for p in ours.diffloss.parameters():
            if not p.any():
                p.copy_(0.02 * (64 / p.shape[-1]) ** 0.5 * torch.randn(p.shape, generator=g))
    ours = ours.to(device).eval()

    sm = load_standin()
    c = ours.config
    standin = sm.MAR(img_size=c["img_size"], vae_stride=c["vae_stride"], patch_size=c["patch_size"],
                     encoder_embed_dim=c["encoder_embed_dim"], encoder_depth=c["encoder_depth"],
                     encoder_num_heads=c["encoder_num_heads"], decoder_embed_dim=c["decoder_embed_dim"],
                     decoder_depth=c["decoder_depth"], decoder_num_heads=c["decoder_num_heads"],
                     mlp_ratio=c["mlp_ratio"], vae_embed_dim=c["vae_embed_dim"], class_num=c["class_num"],
                     attn_dropout=0.0, proj_dropout=0.0, buffer_size=c["buffer_size"], diffloss_d=c["diffloss_d"],
                     diffloss_w=c["diffloss_w"], num_sampling_steps=str(steps))
    standin.load_state_dict(ours.state_dict(), strict=True)
    standin = standin.to(device).eval()
    accelerated = fluid_ops.accelerate(copy.deepcopy(standin))
    accelerated_bf16 = fluid_ops.accelerate(copy.deepcopy(standin), precision="bf16")

    def ours_fn(backend, precision="fp32"):
        def run(bsz, labels, num_iter, cfg, seed):
            gen = torch.Generator(device=device).manual_seed(seed)
            ctx = fluid_ops.use_backend(backend) if backend else contextlib.nullcontext()
            with ctx, torch.no_grad():
                return ours.sample_tokens(bsz, num_iter=num_iter, cfg=cfg, cfg_schedule="linear", labels=labels,
                                          temperature=1.0, generator=gen, precision=precision)
        return run

    def standin_fn(model, autocast=False):
        def run(bsz, labels, num_iter, cfg, seed):
            torch.manual_seed(seed)  # MAR's code draws orders and noise from the global RNG
            ctx = torch.autocast(device.type, torch.bfloat16) if autocast else contextlib.nullcontext()
            with ctx, torch.no_grad():
                return model.sample_tokens(bsz, num_iter=num_iter, cfg=cfg, cfg_schedule="linear", labels=labels,
                                           temperature=1.0)
        return run

    def compiled(model):
        # only the networks: MAR's loop has .item()/nonzero syncs and a varying token count per step
        model = copy.deepcopy(model)
        model.forward_mae_encoder = torch.compile(model.forward_mae_encoder, dynamic=True)
        model.forward_mae_decoder = torch.compile(model.forward_mae_decoder, dynamic=True)
        model.diffloss.net = torch.compile(model.diffloss.net, dynamic=True)
        return model

    standin_c = compiled(standin)
    standin_ac = compiled(standin)
    return {"fluid_ops": (ours, ours_fn(None)), "fluid_ops_reference": (ours, ours_fn("reference")),
            "standin_compile": (standin_c, standin_fn(standin_c)),
            "standin_autocast_compile": (standin_ac, standin_fn(standin_ac, autocast=True)),
            "standin_accelerated": (accelerated, standin_fn(accelerated)), "standin": (standin, standin_fn(standin)),
            "fluid_ops_bf16": (ours, ours_fn(None, "bf16")),
            "standin_accelerated_bf16": (accelerated_bf16, standin_fn(accelerated_bf16)),
            "standin_autocast": (standin, standin_fn(standin, autocast=True))}


# ---- timing -------------------------------------------------------------------------------------
class _Clock:
    """Start/stop marks: CUDA events on the current stream (read after a synchronize), or
    perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class PartTimer:
    """Wraps model.forward_mae_encoder / forward_mae_decoder ("transformer") and
    model.diffloss.sample ("head") with start/stop marks, as instance attributes; restores what
    was there on exit (accelerate's own instance-level `sample` included)."""

    PARTS = (("transformer", "forward_mae_encoder", False), ("transformer", "forward_mae_decoder", False),
             ("head", "sample", True))

    def __init__(self, model, clock: _Clock):
        self.model, self.clock, self.marks = model, clock, []
        self._saved = []

    def _wrap(self, part, fn):
        def timed(*args, **kwargs):
            a = self.clock.mark()
            out = fn(*args, **kwargs)
            self.marks.append((part, a, self.clock.mark()))
            return out
        return timed

    def __enter__(self):
        for part, attr, on_head in self.PARTS:
            owner = self.model.diffloss if on_head else self.model
            had = attr in owner.__dict__
            self._saved.append((owner, attr, had, owner.__dict__.get(attr)))
            setattr(owner, attr, self._wrap(part, getattr(owner, attr)))
        return self

    def __exit__(self, *exc):
        for owner, attr, had, old in reversed(self._saved):
            if had:
                setattr(owner, attr, old)
            else:
                delattr(owner, attr)
        self._saved = []

    def totals(self) -> dict:
        out = {"transformer": 0.0, "head": 0.0}
        for part, a, b in self.marks:
            out[part] += self.clock.seconds(a, b)
        return out


def timed_call(fn, model, clock: _Clock, device, split: bool):
    """(seconds, {part: seconds} or None, output) of one call."""
    timer = PartTimer(model, clock) if split else None
    with timer if timer else contextlib.nullcontext():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        a = clock.mark()
        out = fn()
        b = clock.mark()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return clock.seconds(a, b), (timer.totals() if timer else None), out


def rel_diff(a, b) -> float | None:
    if a is None or b is None:
        return None
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def bench_group(name: str, bsz: int, s: dict, device, args, progress, on_round=None) -> list[dict]:
    """All variants of one (model, batch): interleaved rounds, medians, split, ratios.
    on_round(rows): called with the rows so far after each complete round (partial results)."""
    models = build_models(name, s["steps"], device, seed=args.seed)
    n_classes = models["fluid_ops"][0].num_classes
    labels = torch.randint(0, n_classes, (bsz,), generator=torch.Generator().manual_seed(args.seed + 2)).to(device)
    cfg = CFG[name]
    clock = _Clock(device)
    variants = [v for v in VARIANTS if v in args.variants]
    times = {v: [] for v in variants}
    splits = {v: [] for v in variants}
    outputs, errors, warm = {}, {}, {}
    for v in variants:  # warm-up: lazy caches, kernels, allocator (2 AR steps, same diffusion steps)
        model, fn = models[v]
        try:
            t_w = time.perf_counter()
            fn(bsz, labels, 2, cfg, args.seed)
            warm[v] = time.perf_counter() - t_w  # torch.compile's compile time is in here
        except Exception as e:  # record and go on: one failing variant must not lose the others
            errors[v] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    for r in range(s["rounds"]):
        for v in variants:
            if v in errors:
                continue
            model, fn = models[v]
            t, parts, out = timed_call(lambda: fn(bsz, labels, s["num_iter"], cfg, args.seed), model, clock, device,
                                       not args.no_split)
            times[v].append(t)
            if parts:
                splits[v].append(parts)
            if r == 0:
                outputs[v] = out
            progress(f"{name} b={bsz} round {r + 1}/{s['rounds']} {v}: {t:.3f} s")
        if on_round is not None:
            on_round(_with_warmup(summarize(name, bsz, s, cfg, variants, times, splits, outputs, errors), warm))
    return _with_warmup(summarize(name, bsz, s, cfg, variants, times, splits, outputs, errors), warm)


def _with_warmup(rows, warm):
    for r in rows:
        if r["variant"] in warm:
            r["warmup_seconds"] = round(warm[r["variant"]], 2)
    return rows


def summarize(name, bsz, s, cfg, variants, times, splits, outputs, errors) -> list[dict]:
    """One row per variant: median seconds, images/s, split, speedups over each peer, agreement."""
    med = {v: statistics.median(times[v]) for v in variants if times[v]}
    agreement = {
        "fluid_ops_vs_reference_rel_max_diff": rel_diff(outputs.get("fluid_ops"), outputs.get("fluid_ops_reference")),
        "standin_accelerated_vs_standin_rel_max_diff": rel_diff(outputs.get("standin_accelerated"),
                                                                outputs.get("standin")),
        # bf16 against fp32: rounding-level, amplified by the loop (not an exactness check)
        "fluid_ops_bf16_vs_fluid_ops_rel_max_diff": rel_diff(outputs.get("fluid_ops_bf16"), outputs.get("fluid_ops")),
    }
    rows = []
    for v in variants:
        row = {"model": name, "batch": bsz, "variant": v, "num_iter": s["num_iter"], "diffusion_steps": s["steps"],
               "cfg": cfg, "cfg_schedule": "linear", "temperature": 1.0}
        if v in errors:
            row["error"] = errors[v]
            rows.append(row)
            continue
        m = med[v]
        row.update(seconds_median=m, seconds_all=times[v], images_per_s=bsz / m)
        if splits[v]:
            tr = statistics.median(p["transformer"] for p in splits[v])
            hd = statistics.median(p["head"] for p in splits[v])
            row["split_seconds"] = {"transformer": tr, "head": hd, "other": max(m - tr - hd, 0.0)}
            row["split_fraction"] = {k: x / m for k, x in row["split_seconds"].items()}
        # speedup of this variant over each peer: peer seconds / this variant's seconds
        row["speedup_over"] = {p: med[p] / m for p in variants if p != v and p in med}
        row["agreement"] = agreement
        rows.append(row)
    return rows


# ---- output -------------------------------------------------------------------------------------
def print_table(rows: list[dict]) -> None:
    hdr = (f"{'model':<10} {'batch':>5} {'variant':<25} {'median s':>10} {'images/s':>10} {'transf.':>8} "
           f"{'head':>6} {'other':>6} {'fluid_ops is':>13}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<10} {r['batch']:>5} {r['variant']:<25} ERROR {r['error'][:60]}")
            continue
        f = r.get("split_fraction", {})
        pct = [f"{100 * f[k]:>5.0f}%" if k in f else f"{'-':>6}" for k in ("transformer", "head", "other")]
        ours = next((x for x in rows if x["model"] == r["model"] and x["batch"] == r["batch"]
                     and x["variant"] == "fluid_ops" and "error" not in x), None)
        if r["variant"].endswith(("_bf16", "_autocast", "_autocast_compile")):  # bf16 rows against our bf16 row
            ours = next((x for x in rows if x["model"] == r["model"] and x["batch"] == r["batch"]
                         and x["variant"] == "fluid_ops_bf16" and "error" not in x), None)
        vs = "" if ours is None or r["variant"] == ours["variant"] else f"{ours['speedup_over'][r['variant']]:.2f}x faster"
        print(f"{r['model']:<10} {r['batch']:>5} {r['variant']:<25} {r['seconds_median']:>10.3f} "
              f"{r['images_per_s']:>10.3f} {pct[0]:>8} {pct[1]} {pct[2]} {vs:>13}")


def plot(rows: list[dict], info: dict, settings: dict, path: Path) -> bool:
    """Left: images/s per variant, grouped by (model, batch), log scale. Right: each variant's
    time split (transformer / head / other) as stacked fractions."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return False
    groups = sorted({(r["model"], r["batch"]) for r in ok}, key=lambda g: (list(CFG).index(g[0]), g[1]))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in ok)]
    colors = {"fluid_ops": "#2a9d8f", "fluid_ops_reference": "#8ab17d", "standin_accelerated": "#e9c46a",
              "standin": "#e76f51", "fluid_ops_bf16": "#1d6f66", "standin_accelerated_bf16": "#b8962e",
              "standin_autocast": "#a8432a", "standin_compile": "#f4a261", "standin_autocast_compile": "#7a2e1c"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 0.5 * len(ok) + 3.2), gridspec_kw={"width_ratios": [1.2, 1]})
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        xs, ys = [], []
        for i, g in enumerate(groups):
            r = next((r for r in ok if (r["model"], r["batch"]) == g and r["variant"] == v), None)
            if r:
                xs.append(i + (j - (len(variants) - 1) / 2) * width)
                ys.append(r["images_per_s"])
        bars = ax.bar(xs, ys, width, label=v, color=colors[v])
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.3g}", ha="center", va="bottom", fontsize=7)
    short = {"mar_base": "MAR-B", "mar_large": "MAR-L", "mar_huge": "MAR-H", "mar_tiny": "MAR tiny"}
    ax.set_xticks(range(len(groups)), [f"{short[m]}\nbatch {b}" for m, b in groups])
    ax.set_yscale("log")
    ax.set_ylabel("images / s (higher is better)")
    ax.legend(fontsize=8)
    ax.set_title(f"{settings['num_iter']} AR steps x {settings['steps']} diffusion steps, CFG (linear); "
                 "*_bf16 / *_autocast in bf16, the rest fp32", fontsize=9)
    labels, left = [], None
    parts = [("transformer", "#264653"), ("head", "#f4a261"), ("other", "#bbbbbb")]
    split_rows = [r for r in ok if "split_fraction" in r]
    left = [0.0] * len(split_rows)
    for part, col in parts:
        vals = [r["split_fraction"][part] for r in split_rows]
        bx.barh(range(len(split_rows)), vals, left=left, color=col, label=part)
        left = [a + b for a, b in zip(left, vals)]
    labels = [f"{r['model']} b{r['batch']} {r['variant']}" for r in split_rows]
    bx.set_yticks(range(len(split_rows)), labels, fontsize=7)
    bx.invert_yaxis()
    bx.set_xlim(0, 1)
    bx.set_xlabel("fraction of sampling time")
    bx.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    dev = info.get("gpu") or info.get("cpu")
    fig.suptitle(f"MAR sampling: {dev}, torch {info['torch']}, fluid_ops {info['fluid_ops']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=list(GRIDS), default="full", help="settings grid (default: the issue's, for a GPU)")
    p.add_argument("--quick", action="store_true", help="same as --grid quick (CI smoke test)")
    p.add_argument("--models", nargs="*", choices=list(FACTORIES), help="override the grid's models")
    p.add_argument("--batches", nargs="*", type=int, help="override the grid's batch sizes")
    p.add_argument("--num-iter", type=int, help="override the grid's AR steps")
    p.add_argument("--steps", type=int, help="override the grid's diffusion steps")
    p.add_argument("--rounds", type=int, help="override the grid's interleaved rounds")
    p.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--no-split", action="store_true", help="time without the transformer / head timers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default benchmarks/results/mar_sampling[_<grid>].json)")
    p.add_argument("--replot", metavar="JSON", help="only print the table and redraw the plot of a results file")
    args = p.parse_args(argv)
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        print_table(data["rows"])
        if not data.get("complete", True):
            print(f"(partial: {data['settings']['rounds']} rounds were planned; see seconds_all)")
        plot(data["rows"], data["machine"], data["settings"], Path(args.replot).with_suffix(".png"))
        return 0
    if args.quick:
        args.grid = "quick"
    s = dict(GRIDS[args.grid])
    for k in ("models", "batches", "num_iter", "steps", "rounds"):
        if getattr(args, k):
            s[k] = getattr(args, k)
    threads = args.threads or s.pop("threads", None)
    s.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cpu" and args.grid == "full" and not args.models:
        print("note: the full grid on a CPU takes many hours; --grid cpu is the CPU setting", file=sys.stderr)
    info = machine_info(device)
    print(json.dumps(info))
    print(f"grid {args.grid}: {json.dumps(s)}")
    name = "mar_sampling" + ("" if args.grid == "full" else f"_{args.grid}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {**s, "grid": args.grid, "cfg_by_model": {m: CFG[m] for m in s["models"]}, "cfg_schedule": "linear",
                "temperature": 1.0, "dtype": "float32 (*_bf16, *_autocast: bfloat16)",
                "precision_auto_here": fluid_ops.backend.auto_precision(device),
                "split_timers": not args.no_split, "seed": args.seed,
                "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter"}
    t0 = time.perf_counter()

    def write(rows, complete):
        """The JSON, rewritten after every round: a long run killed midway keeps what it measured."""
        if hasattr(os, "getloadavg"):  # other processes on a shared machine slow every variant alike
            info["load_average_1_5_15_last"] = list(os.getloadavg())
        settings["wall_seconds"] = time.perf_counter() - t0
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"machine": info, "settings": settings, "complete": complete, "rows": rows},
                                  indent=2) + "\n")
        os.replace(tmp, out)

    rows = []
    for model_name in s["models"]:
        for bsz in s["batches"]:
            rows += bench_group(model_name, bsz, s, device, args,
                                lambda msg: print(f"  [{time.perf_counter() - t0:7.1f} s] {msg}", flush=True),
                                on_round=lambda part: write(rows + part, False))
    write(rows, True)
    print_table(rows)
    for r in rows:
        if r["variant"] == "fluid_ops" and "agreement" in r:
            print(f"agreement {r['model']} b={r['batch']}: " + ", ".join(
                f"{k} {v:.2e}" if v is not None else f"{k} n/a" for k, v in r["agreement"].items()))
    print(f"wrote {out}")
    if plot(rows, info, s, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
