"""`fluid-ops bench`: a few-minute look at what fluid_ops buys on this machine.

Three rows, each ours against what a user would otherwise run, timed interleaved in the same
process (medians): attention against torch SDPA, the 100-step diffusion head loop against the
reference eager loop, and one training step of the tiny Fluid model on the default backends
against the reference backend. The full benchmarks (every shape, every peer, plots) are the
scripts in the repository's `benchmarks/` folder; this is the installed, no-checkout version.
The timing helpers here are shared with those scripts.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import fluid_ops

__all__ = ["machine_info", "time_interleaved", "main"]


def machine_info() -> dict:
    """Device, versions and load: what a benchmark JSON needs to be read later."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_simd_flags": fluid_ops.backend.cpu_simd_flags(),
        "cpu_native_bf16": fluid_ops.backend.native_bf16("cpu"),
        "fluid_ops": fluid_ops.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        # other processes on a small machine skew timings (interleaving spreads it over every side)
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, *, rounds: int = 5, min_run_time: float = 0.2, device=None) -> dict:
    """{name: median seconds per call}. Each round runs every fn for about `min_run_time` (after
    one warm-up call), in turn, so load from other processes hits every side alike."""
    device = torch.device(device or "cpu")
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    _sync(device)
    for _ in range(rounds):
        for name, fn in fns.items():
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                _sync(device)
                elapsed = time.perf_counter() - t0
                if elapsed >= min_run_time:
                    break
            samples[name].append(elapsed / n)
    return {name: statistics.median(v) for name, v in samples.items()}


def _row(name, shape, ours, peer_name, peer) -> dict:
    return {"bench": name, "shape": shape, "ours_ms": ours * 1e3, "peer": peer_name, "peer_ms": peer * 1e3,
            "speedup": peer / ours}


def bench_attention(device, quick: bool) -> dict:
    b, h, n, d = (2, 4, 128, 64) if quick else (8, 8, 256, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=g, device=device, dtype=dtype) for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool, device=device)
    mask[:, n - n // 4:] = False
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    sdpa_mask = mask[:, None, None, :]
    t = time_interleaved({"ours": lambda: fluid_ops.attention(q, k, v, key_padding_mask=mask),
                          "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=sdpa_mask)},
                         rounds=3 if quick else 5, device=device)
    return _row("attention, key-padding mask", f"B{b} H{h} N{n} D{d} {str(dtype)[6:]}", t["ours"], "torch SDPA", t["sdpa"])


def bench_head(device, quick: bool) -> dict:
    from fluid_ops import reference
    rows, width, depth, steps = (64, 256, 3, 20) if quick else (256, 1024, 6, 100)
    net = fluid_ops.nn.DenoiserMLP(16, width, 32, 768, depth).to(device).eval()
    g = torch.Generator(device).manual_seed(0)
    z = torch.randn(rows, 768, generator=g, device=device)
    noise = reference.diffusion.draw_sampling_noise(rows, 16, steps, device=device, generator=g)

    def ours():
        with torch.no_grad():
            fluid_ops.diffusion_sample(net, z, num_steps=steps, noise=noise)

    def ref():
        with torch.no_grad():
            reference.diffusion.diffusion_sample(net, z, num_steps=steps, noise=noise)

    t = time_interleaved({"ours": ours, "ref": ref}, rounds=1 if not quick else 2, min_run_time=0.0, device=device)
    return _row("diffusion head sample", f"{rows} rows, {depth}x{width}, {steps} steps", t["ours"], "reference loop", t["ref"])


def bench_train_step(device, quick: bool) -> dict:
    from fluid_ops.models import Fluid
    torch.manual_seed(0)
    model = Fluid("tiny", text_encoder="hash").to(device)
    bsz = 16 if quick else 64
    images = torch.rand(bsz, 3, model.config.image.size, model.config.image.size, device=device)
    captions = ["a red circle at the top left"] * bsz
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(images, captions, generator=torch.Generator(device).manual_seed(1)).backward()
        opt.step()

    def ref_step():
        with fluid_ops.use_backend("reference"):
            step()

    t = time_interleaved({"ours": step, "ref": ref_step}, rounds=3, min_run_time=0.5 if not quick else 0.1,
                         device=device)
    return _row("Fluid tiny train step", f"batch {bsz}", t["ours"], "reference backend", t["ref"])


def main(*, quick: bool = False, out: str | None = None, device=None) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = machine_info()
    print(f"fluid_ops {fluid_ops.__version__} on {info.get('gpu', info['cpu'])}, torch {info['torch']}, "
          f"{info['threads']} threads")
    rows = []
    for fn in (bench_attention, bench_head, bench_train_step):
        rows.append(fn(device, quick))
        r = rows[-1]
        print(f"  {r['bench']:<30} {r['shape']:<32} ours {r['ours_ms']:9.2f} ms   {r['peer']} "
              f"{r['peer_ms']:9.2f} ms   {r['speedup']:.2f}x", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump({"machine": info, "device": str(device), "quick": quick, "rows": rows}, f, indent=1)
        print(f"wrote {out}")
    return rows
