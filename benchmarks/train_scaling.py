"""Training throughput past one process: samples/s and peak memory per rank for Fluid configs at
1 rank and N ranks, DDP against FSDP2; and a training step on `prepare`d caches against the
same step encoding images (tokenizer / VAE) and captions (text encoder) itself.

    python benchmarks/train_scaling.py --quick                 # tiny config, 1 and 2 ranks, < 1 min on CPU
    python benchmarks/train_scaling.py                         # Fluid-166M and -369M, 1 rank (+ N GPUs)
    python benchmarks/train_scaling.py --ranks 1,8 --configs fluid-166m,fluid-369m --batch-per-rank 32
    python benchmarks/train_scaling.py --cache-only --configs fluid-166m   # prepared vs encode each step

Every point is a real `fluid_ops.train` run, one process per rank started with the environment
torchrun gives its workers (so `train` joins the group exactly as under torchrun), data
synthetic (random images, unique captions) and held in memory; the first `--warmup` steps are
not timed; time is wall clock between the loss flushes after step `warmup` and the last step
(log_every=1: one host sync per step, which every point pays alike). Peak memory: CUDA
`max_memory_allocated` per rank on GPU; on CPU the process's peak RSS (it includes the
interpreter and torch, ~0.4 GB). Text encoder: the configs' own (MiniLM) for the cache
comparison; "hash" (no model) for the scaling grid, where the frozen encoder is not what is
measured. The VAE of the cache comparison is a randomly initialised diffusers AutoencoderKL
with the layout of MAR's KL-16 (5 levels, 128-128-256-256-512 channels, 2 res blocks per level,
16 latent channels): no weights are downloaded, and its cost per image is that of the trained
model's (same layers, same shapes). Results: table on stdout, JSON (+ PNG with matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class SyntheticPairs(torch.utils.data.Dataset):
    """n random images with unique captions (so a text-encoder cache never hits)."""

    def __init__(self, n: int, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.images[i], f"a photo of object number {i} on a table"


def kl16_like_vae(folder: Path) -> Path:
    """A random-init diffusers AutoencoderKL with MAR KL-16's layout, saved to `folder`."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 5,
                        up_block_types=("UpDecoderBlock2D",) * 5, block_out_channels=(128, 128, 256, 256, 512),
                        layers_per_block=2, latent_channels=16, sample_size=256)
    vae.save_pretrained(folder)
    return folder


def _peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed_train(model, ds, *, steps, warmup, batch, out_dir, fsdp=False, amp="auto", collate_fn=None):
    from fluid_ops.training import train
    stamps = {}

    def cb(info):
        stamps[info.step] = time.perf_counter()

    res = train(model, ds, out_dir=out_dir, steps=warmup + steps, batch_size=batch, lr=1e-4, warmup_steps=1,
                ckpt_every=10 ** 9, log_every=1, callback=cb, progress=False, fsdp=fsdp, amp=amp,
                collate_fn=collate_fn, num_workers=0)
    dt = stamps[warmup + steps] - stamps[warmup]
    dev = next(res.model.parameters()).device
    return {"step_s": dt / steps, "samples_per_s": steps * batch / dt, "peak_mib": _peak_mib(dev)}


# ---- one grid point (inside torchrun) -------------------------------------------------------------
def worker(spec: dict) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from fluid_ops.models import Fluid
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = Fluid(spec["config"], text_encoder="hash", **spec.get("set", {}))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.reset_peak_memory_stats()
    batch = spec["batch_per_rank"] * world
    ds = SyntheticPairs(batch * (spec["warmup"] + spec["steps"]), model.config.image.size)
    with tempfile.TemporaryDirectory() as tmp:
        r = _timed_train(model, ds, steps=spec["steps"], warmup=spec["warmup"], batch=batch, out_dir=tmp,
                         fsdp=spec["mode"] == "fsdp", amp=spec["amp"])
    r.update(rank=rank, params_m=round(model.num_parameters() / 1e6, 1))
    Path(spec["out"]).with_suffix(f".rank{rank}.json").write_text(json.dumps(r))
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_point(spec: dict, nproc: int, threads: int) -> dict:
    """One process per rank with the environment torchrun gives its workers (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT, LOCAL_RANK): the same processes as torchrun's, without its agent."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "out": str(Path(tmp) / "r.json")}
        port = _free_port()
        procs = []
        for r in range(nproc):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", "RANK": str(r),
                   "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate() for p in procs]
        bad = [(p.returncode, e or o) for p, (o, e) in zip(procs, outs) if p.returncode != 0]
        if bad:
            return {"error": bad[0][1][-1500:]}
        ranks = [json.loads(Path(tmp, f"r.rank{r}.json").read_text()) for r in range(nproc)]
    return {"samples_per_s": min(r["samples_per_s"] for r in ranks),  # the slowest rank sets the pace
            "step_s": max(r["step_s"] for r in ranks),
            "peak_mib_per_rank": [round(r["peak_mib"], 1) for r in ranks]}


# ---- prepared caches vs encoding each step (one process) ----------------------------------------
def cache_compare(config: str, *, batch: int, steps: int, warmup: int, amp: str, vae: bool,
                  text_encoder: str | None = None) -> dict:
    from fluid_ops.data import ShardDataset
    from fluid_ops.models import Fluid
    from fluid_ops.prepare import prepare
    out = {"config": config, "batch": batch, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        over = {} if text_encoder is None else {"text_encoder": text_encoder}
        if vae:
            over = dict(tokenizer="vae", vae_path=str(kl16_like_vae(Path(tmp) / "vae")), patch_size=1)
        out["tokenizer"] = "vae (random-init KL-16 layout)" if vae else "patch"

        def model():
            torch.manual_seed(0)
            return Fluid(config, **over)
        m = model()
        out["text_encoder"] = m.config.text.encoder
        n = batch * (warmup + steps)
        raw = SyntheticPairs(n, m.config.image.size)
        t0 = time.perf_counter()
        prepare(raw, Path(tmp) / "cache", m.config, flip=True, batch_size=batch, progress=False)
        out["prepare_s_per_sample_2_views"] = (time.perf_counter() - t0) / n
        out["encode_each_step"] = _timed_train(m, raw, steps=steps, warmup=warmup, batch=batch,
                                               out_dir=Path(tmp) / "a", amp=amp)
        cache = ShardDataset(Path(tmp) / "cache")
        out["prepared"] = _timed_train(model(), cache, steps=steps, warmup=warmup, batch=batch,
                                       out_dir=Path(tmp) / "b", amp=amp, collate_fn=cache.collate)
    out["speedup"] = out["encode_each_step"]["step_s"] / out["prepared"]["step_s"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny config, 1 and 2 ranks, 3 steps: well under a minute")
    ap.add_argument("--configs", default=None, help="comma-separated (default fluid-166m,fluid-369m; quick: tiny)")
    ap.add_argument("--ranks", default=None, help="comma-separated rank counts (default: 1 and every GPU, or 1,2 on CPU)")
    ap.add_argument("--modes", default="ddp,fsdp")
    ap.add_argument("--batch-per-rank", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "none"))
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads per rank (default 1: a second thread only adds spin-wait contention on a "
                         "busy small machine, and every point gets the same per-rank resources)")
    ap.add_argument("--cache-only", action="store_true", help="only the prepared-vs-encode comparison")
    ap.add_argument("--no-cache", action="store_true", help="skip the prepared-vs-encode comparison")
    ap.add_argument("--exclude", default="", help="points to skip, CONFIG:RANKS:MODE comma-separated "
                    "(e.g. fluid-369m:2:ddp where two full replicas do not fit in memory)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    ap.add_argument("--note", default=None, help="free text stored in the JSON (e.g. machine load)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    from fluid_ops.bench import machine_info
    gpus = torch.cuda.device_count()
    configs = (args.configs or ("tiny" if args.quick else "fluid-166m,fluid-369m")).split(",")
    ranks = [int(r) for r in (args.ranks or (f"1,{gpus}" if gpus > 1 else "1,2")).split(",")]
    ranks = sorted(set(ranks))
    bpr = args.batch_per_rank or (8 if args.quick else (32 if gpus else 2))
    steps = args.steps or (3 if args.quick else (20 if gpus else 3))
    torch.set_num_threads(args.threads)
    results = {"machine": machine_info(), "note": args.note, "batch_per_rank": bpr, "steps": steps,
               "warmup": args.warmup, "amp": args.amp, "scaling": [], "cache": []}
    if not args.cache_only:
        print(f"{'config':<12}{'ranks':>6}{'mode':>6}{'samples/s':>11}{'step s':>9}  peak MiB per rank")
        for cfg in configs:
            for n in ranks:
                if gpus and n > gpus:
                    continue
                for mode in args.modes.split(","):
                    if f"{cfg}:{n}:{mode}" in args.exclude.split(","):
                        print(f"{cfg:<12}{n:>6}{mode:>6}  skipped (--exclude)")
                        continue
                    spec = {"config": cfg, "batch_per_rank": bpr, "steps": steps, "warmup": args.warmup,
                            "mode": mode, "amp": args.amp}
                    threads = args.threads
                    r = run_point(spec, n, threads)
                    row = {"config": cfg, "ranks": n, "mode": mode, "threads_per_rank": threads,
                           "global_batch": bpr * n, **r}
                    results["scaling"].append(row)
                    if "error" in r:
                        print(f"{cfg:<12}{n:>6}{mode:>6}  failed: {r['error'][-300:]}")
                    else:
                        print(f"{cfg:<12}{n:>6}{mode:>6}{r['samples_per_s']:>11.2f}{r['step_s']:>9.3f}  "
                              f"{r['peak_mib_per_rank']}")
    if not args.no_cache:
        for cfg in configs[:1]:
            vae = not args.quick and cfg != "tiny"
            try:
                import diffusers  # noqa: F401
            except ImportError:
                vae = False
            # quick: the hash text encoder (no model to load) and pixel patches: little to cache, and
            # the comparison shows what the cache path itself costs
            c = cache_compare(cfg, batch=bpr, steps=steps, warmup=args.warmup, amp=args.amp, vae=vae,
                              text_encoder="hash" if args.quick else None)
            results["cache"].append(c)
            print(f"\n{cfg} ({c['tokenizer']}, text {c['text_encoder']}), batch {bpr}: encode each step "
                  f"{c['encode_each_step']['step_s']:.3f} s/step, prepared {c['prepared']['step_s']:.3f} s/step: "
                  f"{c['speedup']:.2f}x; prepare {c['prepare_s_per_sample_2_views'] * 1e3:.1f} ms/sample (2 views)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(f"wrote {out}")
        plot(results, Path(args.plot) if args.plot else out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    rows = [r for r in results["scaling"] if "error" not in r]
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    if not rows:
        return
    fig = Figure(figsize=(7, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    labels = [f"{r['config']}\n{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}" for r in rows if r["mode"] == "ddp"]
    modes = sorted({r["mode"] for r in rows})
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        vals = [r["samples_per_s"] for r in rows if r["mode"] == mode]
        ax.bar([i + j * width for i in range(len(vals))], vals, width, label=mode.upper())
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(labels))], labels)
    ax.set_ylabel("samples / s (global)")
    ax.set_title(f"fluid_ops.train throughput ({results['machine'].get('gpu') or 'CPU'})", fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.9, bottom=0.2)
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
