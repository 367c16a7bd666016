"""CPU kernel microbenchmarks: fluid_ops against PyTorch's own CPU paths.

    python benchmarks/cpu_ops.py            # full shapes, writes benchmarks/results/cpu_ops.json
    python benchmarks/cpu_ops.py --quick    # tiny shapes, a few seconds (CI smoke test)

Each section is a function `bench_<name>(args) -> list[dict]` (one dict per row) registered in
SECTIONS; `main` runs them, prints one table and writes JSON with the machine description.
Timings: torch.utils.benchmark medians with torch's thread count; ours and the peer are timed
interleaved (ours, peer, ours, peer, ...) so load from other processes hits both alike, and the
reported time is the median over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

import fluid_ops  # noqa: E402
from fluid_ops import _compiled  # noqa: E402
import importlib  # noqa: E402
_attn_ops = importlib.import_module("fluid_ops.ops.attention")  # the module (fluid_ops re-exports the function)
_ISA_ENV = "FLUID_OPS_CPU_ATTENTION_ISA"


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "fluid_ops": fluid_ops.__version__,
        "fluid_ops_attention_isa": _compiled.cpu.attention_fwd_isa() if _compiled.cpu is not None else None,
        "cpu_simd_flags": fluid_ops.backend.cpu_simd_flags(),
        "cpu_native_bf16": fluid_ops.backend.native_bf16("cpu"),
        "python": platform.python_version(),
        # other processes on a small machine skew timings (interleaving spreads it over both sides)
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def time_interleaved(fns: dict, *, rounds: int, min_run_time: float) -> dict:
    """{name: median seconds}: each round times every fn once (blocked_autorange median)."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            samples[name].append(t.blocked_autorange(min_run_time=min_run_time).median)
    return {name: statistics.median(v) for name, v in samples.items()}


# ---- attention ---------------------------------------------------------------------------------
def bench_attention(args) -> list[dict]:
    """fluid_ops.attention (B, N, H, D) vs torch SDPA (B, H, N, D) on CPU, fp32 and bf16, with and
    without a key-padding mask (each batch's last 15-35% keys padded; SDPA gets the same mask as
    its boolean attn_mask). FLOPs = 4 B H Nq Nk D (padding is counted: same work for both)."""
    shapes = [(2, 2, 64, 64)] if args.quick else [(8, 8, 256, 64)]
    rows = []
    g = torch.Generator().manual_seed(0)
    for b, h, n, d in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for padded in (False, True):
                q, k, v = (torch.randn(b, n, h, d, generator=g).to(dtype) for _ in range(3))
                qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
                mask = attn_mask = None
                if padded:
                    pad = (n * (0.15 + 0.2 * torch.rand(b, generator=g))).long()
                    mask = torch.arange(n).view(1, n) < (n - pad).view(b, 1)
                    attn_mask = mask.view(b, 1, 1, n)
                fns = {
                    "ours": lambda: fluid_ops.attention(q, k, v, key_padding_mask=mask),
                    "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask),
                }
                if dtype == torch.bfloat16 and _compiled.cpu.attention_fwd_isa() == "avx512bf16":
                    # our own earlier path for bf16 inputs: packed to fp32, fp32 arithmetic (AVX-512)
                    fns["ours_fp32_arith"] = lambda: _attn_ops._cpu_forward(q, k, v, mask, None, False, d ** -0.5, 3)[0]
                # same numbers first: a benchmark of a wrong result is worthless
                err = (fns["ours"]().float() - fns["sdpa"]().transpose(1, 2).float()).abs().max().item()
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                if err > tol:
                    raise AssertionError(f"attention disagrees with SDPA: max error {err:.3e} > {tol}")
                med = time_interleaved(fns, rounds=args.rounds, min_run_time=args.min_run_time)
                flops = 4 * b * h * n * n * d
                rows.append({
                    "op": "attention",
                    "pass": "forward",
                    "shape": {"B": b, "H": h, "Nq": n, "Nk": n, "D": d},
                    "dtype": str(dtype).replace("torch.", ""),
                    "key_padding_mask": padded,
                    "ours_ms": med["ours"] * 1e3,
                    "peer": "torch SDPA (B,H,N,D)" + (", bool attn_mask" if padded else ""),
                    "peer_ms": med["sdpa"] * 1e3,
                    "ours_gflops": flops / med["ours"] / 1e9,
                    "peer_gflops": flops / med["sdpa"] / 1e9,
                    "speedup": med["sdpa"] / med["ours"],
                    "max_abs_diff": err,
                    "ours_isa": _compiled.cpu.attention_fwd_isa(),
                })
                if "ours_fp32_arith" in med:
                    rows[-1].update(ours_fp32_arith_ms=med["ours_fp32_arith"] * 1e3,
                                    native_bf16_speedup_over_fp32_arith=med["ours_fp32_arith"] / med["ours"])
        # causal self-attention (Nq == Nk, so SDPA's top-left is_causal equals our bottom-right);
        # FLOPs halved (docs/design.md)
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(b, n, h, d, generator=g).to(dtype) for _ in range(3))
            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            fns = {"ours": lambda: fluid_ops.attention(q, k, v, causal=True),
                   "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)}
            err = (fns["ours"]().float() - fns["sdpa"]().transpose(1, 2).float()).abs().max().item()
            if err > (1e-4 if dtype == torch.float32 else 3e-2):
                raise AssertionError(f"causal attention disagrees with SDPA: max error {err:.3e}")
            med = time_interleaved(fns, rounds=args.rounds, min_run_time=args.min_run_time)
            flops = 2 * b * h * n * n * d
            rows.append({
                "op": "attention", "pass": "forward", "causal": True,
                "shape": {"B": b, "H": h, "Nq": n, "Nk": n, "D": d},
                "dtype": str(dtype).replace("torch.", ""), "key_padding_mask": False,
                "ours_ms": med["ours"] * 1e3, "peer": "torch SDPA (B,H,N,D), is_causal", "peer_ms": med["sdpa"] * 1e3,
                "ours_gflops": flops / med["ours"] / 1e9, "peer_gflops": flops / med["sdpa"] / 1e9,
                "speedup": med["sdpa"] / med["ours"], "max_abs_diff": err,
            })
        # training step: forward + backward (FLOPs 3.5x forward, docs/design.md), unmasked
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(b, n, h, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
            do = torch.randn(b, n, h, d, generator=g).to(dtype)
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            dot = do.transpose(1, 2).contiguous()

            def ours_step():
                return torch.autograd.grad(fluid_ops.attention(q, k, v), (q, k, v), do)

            def sdpa_step():
                return torch.autograd.grad(F.scaled_dot_product_attention(qt, kt, vt), (qt, kt, vt), dot)

            gq, gq_ref = ours_step()[0], sdpa_step()[0].transpose(1, 2)
            err = (gq.float() - gq_ref.float()).abs().max().item()
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            if err > tol:
                raise AssertionError(f"attention backward disagrees with SDPA: max error in dq {err:.3e} > {tol}")
            fns = {"ours": ours_step, "sdpa": sdpa_step}
            if dtype == torch.bfloat16 and _compiled.cpu.attention_bwd_isa("bfloat16", d) == "avx512bf16":
                # our earlier paths for bf16 inputs, forced per pass through the ISA override (read
                # at each call): the native forward with the fp32-arithmetic backward (what shipped
                # before the native backward), and both passes in fp32 arithmetic
                def forced_step(fwd_isa, bwd_isa):
                    saved = os.environ.get(_ISA_ENV)
                    try:
                        os.environ[_ISA_ENV] = fwd_isa
                        out = fluid_ops.attention(q, k, v)
                        os.environ[_ISA_ENV] = bwd_isa
                        return torch.autograd.grad(out, (q, k, v), do)
                    finally:
                        if saved is None:
                            os.environ.pop(_ISA_ENV, None)
                        else:
                            os.environ[_ISA_ENV] = saved

                fns["ours_fp32_bwd"] = lambda: forced_step("avx512bf16", "avx512")
                fns["ours_fp32_arith"] = lambda: forced_step("avx512", "avx512")
                for name in ("ours_fp32_bwd", "ours_fp32_arith"):
                    e = (fns[name]()[0].float() - gq_ref.float()).abs().max().item()
                    if e > tol:
                        raise AssertionError(f"{name}: attention backward disagrees with SDPA: max error in dq {e:.3e}")
            med = time_interleaved(fns, rounds=args.rounds, min_run_time=args.min_run_time)
            flops = 3.5 * 4 * b * h * n * n * d
            rows.append({
                "op": "attention", "pass": "forward+backward",
                "shape": {"B": b, "H": h, "Nq": n, "Nk": n, "D": d},
                "dtype": str(dtype).replace("torch.", ""), "key_padding_mask": False,
                "ours_ms": med["ours"] * 1e3, "peer": "torch SDPA (B,H,N,D) + autograd", "peer_ms": med["sdpa"] * 1e3,
                "ours_gflops": flops / med["ours"] / 1e9, "peer_gflops": flops / med["sdpa"] / 1e9,
                "speedup": med["sdpa"] / med["ours"], "max_abs_diff": err,
                "ours_isa": _compiled.cpu.attention_fwd_isa(),
                "ours_bwd_isa": _compiled.cpu.attention_bwd_isa(str(dtype).replace("torch.", ""), d),
            })
            if "ours_fp32_arith" in med:
                rows[-1].update(ours_fp32_bwd_ms=med["ours_fp32_bwd"] * 1e3,
                                native_bwd_speedup_over_fp32_bwd=med["ours_fp32_bwd"] / med["ours"],
                                ours_fp32_arith_ms=med["ours_fp32_arith"] * 1e3,
                                native_bf16_speedup_over_fp32_arith=med["ours_fp32_arith"] / med["ours"])
    return rows


def bench_sampling(args) -> list[dict]:
    """The 100-step diffusion_sample of a MAR-B sized head at 256 rows, fluid_ops (fp32 GEMMs,
    and bf16 GEMMs) against the reference loop as MAR runs it. Full mode times whole 100-step
    loops (3 interleaved rounds); bf16 is timed over 10 steps per round where this CPU has no
    native bf16 dot products (there it is emulated and slow: see the cpu_native_bf16 field)."""
    from benchmarks._sampling_bench import MAR_B, bench_sampling as run
    from fluid_ops.nn.denoiser import _cpu_has_native_bf16

    d, cin, cout, zc, nb = (MAR_B[k] for k in ("model_channels", "in_channels", "out_channels", "z_channels",
                                               "num_res_blocks"))
    rows = 256
    # multiply-adds per row and step as the reference runs it (time and cond embeddings per row)
    macs = 256 * d + d * d + zc * d + cin * d + nb * (2 * d * d + 3 * d * d) + 2 * d * d + d * cout
    if args.quick:
        res = run(True, rounds=args.rounds, quality=False)
    else:
        res = run(False, steps=100, rounds=3, quality=False, variants_wanted=("fast_fp32",))
        bf16_steps = 100 if _cpu_has_native_bf16() else 10
        res_bf16 = run(False, steps=bf16_steps, rounds=3, quality=False, variants_wanted=("fast_bf16",))
        res += [r for r in res_bf16 if r["name"].endswith("fast_bf16")]
    by = {r["name"].split("/")[1]: r for r in res}
    ref_ms = by["reference"]["ms_per_step"]
    out = []
    for k in ("fast_fp32", "fast_bf16"):
        if k not in by:
            continue
        r = by[k]
        steps = r["steps_timed"]
        gflop = 2 * macs * rows * steps / 1e9
        out.append({
            "op": "sampling", "pass": f"{steps}-step loop", "shape": {"rows": rows, "head": "MAR-B 6x1024"},
            "dtype": "fp32" if k == "fast_fp32" else "bf16 GEMM",
            "key_padding_mask": False,
            "ours_ms": r["ms_per_step"] * steps, "peer": "reference loop (fp32, MAR's graph)",
            "peer_ms": ref_ms * steps, "ours_gflops": gflop / (r["ms_per_step"] * steps / 1e3),
            "peer_gflops": gflop / (ref_ms * steps / 1e3),
            # median of per-round ratios (each round saw the same load on both sides)
            "speedup": r["speedup_vs_reference"], "cpu_native_bf16": r["cpu_native_bf16"],
            "ms_per_step": r["ms_per_step"], "ref_ms_per_step": ref_ms,
        })
    return out


SECTIONS = {"attention": bench_attention, "sampling": bench_sampling}


def print_table(rows: list[dict]) -> None:
    hdr = f"{'op':<10} {'pass':<14} {'shape':<16} {'dtype':<9} {'mask':<5} {'ours ms':>9} {'peer ms':>9} {'ours GF/s':>10} {'peer GF/s':>10} {'speedup':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        s = r["shape"]
        shape = "x".join(str(s[k]) for k in ("B", "H", "Nq", "D")) if "Nq" in s else f"{s['rows']} rows"
        kind = {"forward": "fwd", "forward+backward": "fwd+bwd"}.get(r.get("pass"), r.get("pass", ""))
        if r.get("causal"):
            kind += " causal"
        print(f"{r['op']:<10} {kind:<14} {shape:<16} {r['dtype']:<9} {'yes' if r.get('key_padding_mask') else 'no':<5} "
              f"{r['ours_ms']:>9.3f} {r['peer_ms']:>9.3f} {r['ours_gflops']:>10.1f} {r['peer_gflops']:>10.1f} "
              f"{r['speedup']:>7.2f}x")
        # our earlier bf16 paths, where timed (native bf16 vs fp32 arithmetic)
        for key, ratio, what in (("ours_fp32_bwd_ms", "native_bwd_speedup_over_fp32_bwd", "fp32-arithmetic backward"),
                                 ("ours_fp32_arith_ms", "native_bf16_speedup_over_fp32_arith", "fp32 arithmetic")):
            if key in r:
                print(f"{'':<10}   vs ours with {what}: {r[key]:.3f} ms, native {r[ratio]:.2f}x")


def plot(rows: list[dict], info: dict, path: Path) -> bool:
    """Bar chart of speedup over the peer, one bar per row (needs matplotlib; skipped without)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels, ratios = [], []
    for r in rows:
        kind = {"forward": "fwd", "forward+backward": "fwd+bwd"}.get(r.get("pass"), r.get("pass", ""))
        kind += " causal" if r.get("causal") else ""
        kind += " masked" if r.get("key_padding_mask") else ""
        labels.append(f"{r['op']} {kind}, {r['dtype']}")
        ratios.append(r["speedup"])
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.4))
    colors = ["#2a9d8f" if x >= 1 else "#e76f51" for x in ratios]
    ax.barh(range(len(rows)), ratios, color=colors)
    ax.axvline(1.0, color="black", lw=1)
    for i, x in enumerate(ratios):
        ax.text(x, i, f" {x:.2f}x", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the PyTorch peer (SDPA / reference loop); > 1 is faster")
    ax.set_title(f"fluid_ops CPU kernels: {info['cpu']}, {info['threads']} threads, torch {info['torch']}", fontsize=9)
    ax.set_xlim(0, max(ratios) * 1.18)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and short timings (CI smoke test)")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5, quick 1)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per blocked_autorange (default 1, quick 0.05)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (our kernels follow it); default: torch's choice")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_ops.json"))
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 1.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if _compiled.cpu is None:
        print(f"fluid_ops._C is not built: {_compiled.cpu_error}", file=sys.stderr)
        return 1
    info = machine_info()
    print(json.dumps(info))
    rows = []
    for name in args.sections:
        rows += SECTIONS[name](args)
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "quick": args.quick, "rounds": args.rounds,
                               "min_run_time_s": args.min_run_time, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    if plot(rows, info, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
