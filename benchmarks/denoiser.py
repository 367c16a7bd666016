"""The diffusion head (MAR's SimpleMLPAdaLN, docs/contracts.md §2.2-2.3): fluid_ops against eager PyTorch and
torch.compile, forward, forward + backward and the whole 100-step sampling loop.

    python benchmarks/denoiser.py            # GPU: MAR-B / L / H heads x 64 / 512 / 4096 rows
                                             # CPU: MAR-B x 64 / 512 rows (a CPU has no Triton head)
    python benchmarks/denoiser.py --quick    # a tiny CPU grid, < 30 s (CI smoke test)

Heads: MAR-B (6 blocks x 1024, in 16, out 32, z 768), MAR-L (8 x 1280, z 1024), MAR-H (12 x 1536,
z 1280). `rows` is the number of tokens: forward and forward + backward run the head on that
many rows; the sample runs the S-step loop for that many tokens with classifier-free guidance, so
every step evaluates 2 x rows.

Implementations (each a row of the JSON, `impl`):
* `ref_fp32`: the reference head (fluid_ops.reference.DenoiserMLP) in eager fp32 and, for the
  sample, the reference loop (a full forward on [x; x] per step, as MAR runs it);
* `ref_bf16`: the same under torch.autocast(bfloat16), as MAR runs it;
* `compile_max_autotune` (GPU; `--cpu-compile` adds mode "default" on CPU): torch.compile of the
  autocast reference head, the loop around it unchanged;
* `ours`: GPU: forward = the fused Triton head (`fluid_ops.triton.denoiser.head_forward`, bf16
  GEMMs, the prologue mode its heuristic picks; `ours_fused_prologue` / `ours_split_prologue`
  times the other mode, to check the heuristic), forward + backward = fluid_ops.nn.DenoiserMLP under bf16 autocast (Triton LN-modulate /
  gated-residual kernels, cuBLAS GEMMs), sample = `fluid_ops.diffusion_sample(gemm_dtype=bf16)`
  (fused head + ddpm_step kernels, eager); CPU: fluid_ops.nn.DenoiserMLP and diffusion_sample on
  the compiled CPU kernels, fp32 GEMMs;
* `ours_graph` (GPU, sample): the same loop captured once as a CUDA graph and replayed (the
  per-AR-step sampler set-up, i.e. cond_embed(z) and the time embeddings, is outside the graph).
* `ours_cuda*` (GPU, where fluid_ops._C_cuda has the head kernels; not with `--backend`, which
  forces one head for `ours`): the same rows with the compiled CUDA head (fluid_ops.ops.head_cuda, hand-written
  mma.sync GEMMs): forward = `head_cuda.head_forward` (+ `ours_cuda_<mode>_prologue` for the other
  prologue mode), sample / graph = the loop under `use_backend("cuda")` (CUDA head + CUDA
  ddpm_step). `ours` / `ours_graph` then run under `use_backend("triton")`, so they keep timing the
  Triton head (the sampler would otherwise pick the CUDA head).
* `ours_lib_graph` (GPU, sample): `fluid_ops.diffusion_sample(cuda_graph=True)`, the library's
  cached graph per row bucket (set-up inside the graph, z and noise copied into its buffers);
  `ours` passes cuda_graph=False so it stays the eager loop.

Timing: GPU `triton.testing.do_bench` medians (L2 flushed between runs; the sample is one call
of the whole loop); CPU medians of interleaved rounds. Each case first checks ours against the
reference (a benchmark of a wrong result is worthless). FLOPs count the GEMMs of the head's
graph per row: 2 * (in D + blocks (3 D^2 + 2 D^2) + 2 D^2 + D out), plus for a forward the time
and condition embeddings 2 * (256 D + D^2 + z D) (the sampler computes those once per AR step, so
the sample counts S times the former). The roofline fraction divides achieved FLOP/s by the
device's dense bf16 tensor-core peak, from its name (H100 SXM / H200: 989 TFLOP/s, H100 PCIe: 756,
A100: 312; `--peak-tflops` overrides); it is reported for GPU runs only.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "benchmarks")):
    if p not in sys.path:  # run from a source checkout without installing
        sys.path.insert(0, p)

import fluid_ops  # noqa: E402
from fluid_ops.reference import denoiser as rden  # noqa: E402
from fluid_ops.reference import diffusion as rdiff  # noqa: E402

HEADS = {
    "MAR-B": dict(in_channels=16, model_channels=1024, out_channels=32, z_channels=768, num_res_blocks=6),
    "MAR-L": dict(in_channels=16, model_channels=1280, out_channels=32, z_channels=1024, num_res_blocks=8),
    "MAR-H": dict(in_channels=16, model_channels=1536, out_channels=32, z_channels=1280, num_res_blocks=12),
    "tiny": dict(in_channels=16, model_channels=128, out_channels=32, z_channels=64, num_res_blocks=2),
}
PASSES = ("forward", "fwd_bwd", "sample")
CFG_SCALE, TEMPERATURE = 2.9, 1.0  # MAR-B's guidance scale
# Largest max-abs error (relative to the output's max) of bf16 GEMMs against the fp32 reference
# that still counts as the same result: gross errors (a wrong kernel) are far above it.
LOWP_TOL = 0.1

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name().
_PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
          ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0))


def peak_bf16_tflops(name: str) -> float | None:
    for key, peak in _PEAKS:
        if key in name:
            return peak
    return None


def head_gemm_flops(cfg: dict, rows: int, *, embeddings: bool) -> float:
    d, cin, cout, z, nb = (cfg["model_channels"], cfg["in_channels"], cfg["out_channels"], cfg["z_channels"],
                           cfg["num_res_blocks"])
    f = 2.0 * rows * (cin * d + nb * 5 * d * d + 2 * d * d + d * cout)
    if embeddings:
        f += 2.0 * rows * (256 * d + d * d + z * d)
    return f


def machine_info(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "fluid_ops": fluid_ops.__version__, "device": str(device),
            "threads": torch.get_num_threads(),
            "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        from _sampling_bench import _cpu_name
        info["cpu"] = _cpu_name()
    return info


# ---- timing -------------------------------------------------------------------------------------
def time_gpu(fn, rep_ms: float) -> float:
    """Median seconds per call: triton.testing.do_bench for calls well under rep_ms; calls that
    take a good part of it (the fp32 reference's 100-step samples: seconds) are timed directly with
    CUDA events, at most 5 times, instead of do_bench's 5 sizing calls plus its repetitions."""
    import triton.testing
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = start.elapsed_time(end)
    if once < rep_ms / 10:
        return triton.testing.do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms, return_mode="median") / 1e3
    times = [once]
    for _ in range(max(0, min(4, int(rep_ms // once)))):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / 1e3


def time_cpu_interleaved(fns: dict, rounds: int) -> dict:
    """{name: median seconds} over `rounds` rounds, each timing every fn once (interleaved, so load
    from other processes hits all of them alike)."""
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def peak_memory(fn, device) -> float | None:
    """Peak bytes allocated above the live tensors while fn runs (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - base)


# ---- the implementations ---------------------------------------------------------------------
_NETS: dict = {}


def _nets(head: str, device):
    """(reference, fluid_ops) heads with the same non-trivial weights (MAR's init zeroes the adaLN
    and output layers: every path would compute the same zeros), built once per head."""
    if head not in _NETS:
        from _sampling_bench import _trained_like
        _NETS.clear()
        ref = _trained_like(rden.DenoiserMLP(**HEADS[head])).eval()
        ours = fluid_ops.nn.DenoiserMLP(**HEADS[head]).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        _NETS[head] = (ref.to(device), ours.to(device))
    return _NETS[head]


class _Autocast(torch.nn.Module):
    """A head run under torch.autocast(bf16), as MAR runs its DiffLoss."""

    def __init__(self, net, device_type):
        super().__init__()
        self.net, self.device_type = net, device_type
        self.in_channels = net.in_channels

    def forward(self, x, t, c):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.net(x, t, c)


_COMPILED: dict = {}


def _compiled(head, net, device, mode):
    """torch.compile of the autocast reference head, one per head (dynamic=False: each row count
    gets its own static-shape graph, autotuned once and reused by forward, backward and sample)."""
    if (head, mode) not in _COMPILED:
        _COMPILED.clear()
        torch._dynamo.reset()
        _COMPILED[(head, mode)] = torch.compile(_Autocast(net, device.type), mode=mode, dynamic=False)
    return _COMPILED[(head, mode)]


def _graph_sampler(net, z, noise, steps, device, backend=None):
    """The sampling loop of fluid_ops.diffusion_sample captured as one CUDA graph (with `backend`
    forced while the head is chosen and the loop captured; None: as the enclosing context says);
    returns its replay (the samples land in the graph's own output buffer)."""
    with fluid_ops.use_backend(backend) if backend else contextlib.nullcontext():
        return _graph_sampler_body(net, z, noise, steps, device)


def _graph_sampler_body(net, z, noise, steps, device):
    sched = rdiff.DiffusionSchedule(steps)
    table, ts = sched.table(device), sched.model_timesteps(device)
    sampler = net.sampler(z, ts, torch.bfloat16)
    x0 = noise[0].clone()

    def loop():
        x = x0
        for i, step in enumerate(range(steps - 1, -1, -1)):
            x = fluid_ops.ddpm_step(x, sampler(x, step), noise[i + 1], table, step, temperature=TEMPERATURE,
                                    cfg=CFG_SCALE)
        return x

    with torch.no_grad():
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            loop()  # compiles every kernel outside the capture
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop()
    return graph.replay


def _rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / (b.abs().max() + 1e-6)).item()


def _cuda_head_available(device, args) -> bool:
    """Whether the compiled CUDA head can run here (and no other backend is forced)."""
    if device.type != "cuda" or args.backend is not None:  # --backend cuda: `ours` is the CUDA head
        return False
    from fluid_ops.ops.head_cuda import cuda_head_unusable
    return cuda_head_unusable(device, torch.bfloat16) is None


def _forced(name):
    """A call under use_backend(name) (None: unchanged)."""
    def wrap(fn):
        def run():
            with fluid_ops.use_backend(name) if name else contextlib.nullcontext():
                return fn()
        return run
    return wrap


def bench_case(head: str, rows: int, what: str, args, device) -> list[dict]:
    cfg = HEADS[head]
    ref, ours = _nets(head, device)
    gpu = device.type == "cuda"
    cuda_head = _cuda_head_available(device, args)
    extra_checks = {}  # impl-name prefix -> (relative error, tolerance) of variants checked apart
    g = torch.Generator().manual_seed(rows)
    nograd = torch.no_grad()
    impls: dict = {}
    check = None
    if what in ("forward", "fwd_bwd"):
        x = torch.randn(rows, cfg["in_channels"], generator=g).to(device)
        t = torch.randint(0, 1000, (rows,), generator=g).to(device)
        c = torch.randn(rows, cfg["z_channels"], generator=g).to(device)
        ref_bf16 = _Autocast(ref, device.type)
        peers = {"ref_fp32": ref, "ref_bf16": ref_bf16}
        if gpu and not args.no_compile:
            peers["compile_max_autotune"] = _compiled(head, ref, device, "max-autotune")
        elif args.cpu_compile:
            peers["compile_default"] = _compiled(head, ref, device, "default")
        if what == "forward":
            for k, net in peers.items():
                impls[k] = (lambda net=net: net(x, t, c))
            if gpu:
                from fluid_ops.triton.denoiser import PROLOGUE_MODES, head_forward, prologue_mode
                auto = prologue_mode(rows, torch.bfloat16)
                impls["ours"] = lambda: head_forward(ours, x, t, c, torch.bfloat16, prologue=auto)
                for other in PROLOGUE_MODES:  # the mode the heuristic did not pick, to check it
                    if other != auto:
                        impls[f"ours_{other}_prologue"] = (
                            lambda other=other: head_forward(ours, x, t, c, torch.bfloat16, prologue=other))
                if cuda_head:
                    from fluid_ops.ops import head_cuda
                    auto_c = head_cuda.prologue_mode(rows)
                    impls["ours_cuda"] = lambda: head_cuda.head_forward(ours, x, t, c, torch.bfloat16, prologue=auto_c)
                    for other in head_cuda.PROLOGUE_MODES:
                        if other != auto_c:
                            impls[f"ours_cuda_{other}_prologue"] = (
                                lambda other=other: head_cuda.head_forward(ours, x, t, c, torch.bfloat16,
                                                                           prologue=other))
                    with nograd:
                        for k in [k for k in impls if k.startswith("ours_cuda")]:
                            extra_checks[k] = (_rel_err(impls[k](), ref(x, t, c)), LOWP_TOL)
            else:
                impls["ours"] = lambda: ours(x, t, c)
            with nograd:
                check = (_rel_err(impls["ours"](), ref(x, t, c)), LOWP_TOL if gpu else 1e-4)
            impls = {k: (lambda f=f: _no_grad_call(f)) for k, f in impls.items()}
        else:
            gout = torch.randn(rows, cfg["out_channels"], generator=g).to(device)

            def fwd_bwd(net, model):
                def run():
                    model.zero_grad(set_to_none=True)
                    net(x, t, c).float().backward(gout)
                return run

            for k, net in peers.items():
                impls[k] = fwd_bwd(net, ref)
            impls["ours"] = fwd_bwd(_Autocast(ours, device.type) if gpu else ours, ours)
            impls["ours"]()
            impls["ref_fp32"]()
            gw = ours.res_blocks[0].mlp[0].weight.grad
            check = (_rel_err(gw, ref.res_blocks[0].mlp[0].weight.grad), LOWP_TOL if gpu else 1e-3)
    else:  # sample: `rows` tokens, CFG: 2 x rows evaluated per step
        steps = args.steps
        z = torch.randn(2 * rows, cfg["z_channels"], generator=g).to(device)
        noise = rdiff.draw_sampling_noise(rows, cfg["in_channels"], steps, generator=g).to(device)
        kw = dict(num_steps=steps, cfg=CFG_SCALE, temperature=TEMPERATURE, noise=noise)
        peers = {"ref_fp32": ref, "ref_bf16": _Autocast(ref, device.type)}
        if gpu and not args.no_compile:
            peers["compile_max_autotune"] = _compiled(head, ref, device, "max-autotune")
        elif args.cpu_compile:
            peers["compile_default"] = _compiled(head, ref, device, "default")
        for k, net in peers.items():
            impls[k] = (lambda net=net: _no_grad_call(lambda: rdiff.diffusion_sample(net, z, **kw)))
        gd = torch.bfloat16 if gpu else torch.float32
        # with the CUDA head available, `ours` keeps timing the Triton head (forced), `ours_cuda` that one
        tri = "triton" if cuda_head else None
        impls["ours"] = _forced(tri)(lambda: fluid_ops.diffusion_sample(ours, z, gemm_dtype=gd, cuda_graph=False, **kw))
        if gpu:
            impls["ours_graph"] = _graph_sampler(ours, z, noise, steps, device, backend=tri)
            # the library's own graph path: set-up (cond_embed) inside the graph, z / noise copied in
            impls["ours_lib_graph"] = _forced(tri)(
                lambda: fluid_ops.diffusion_sample(ours, z, gemm_dtype=gd, cuda_graph=True, **kw))
        if cuda_head:
            impls["ours_cuda"] = _forced("cuda")(
                lambda: fluid_ops.diffusion_sample(ours, z, gemm_dtype=gd, cuda_graph=False, **kw))
            impls["ours_cuda_graph"] = _graph_sampler(ours, z, noise, steps, device, backend="cuda")
        # one model evaluation as the loop sees it (the samples themselves drift apart over 100
        # steps of bf16 rounding; test_diffusion checks them in distribution)
        ts = rdiff.DiffusionSchedule(steps).model_timesteps(device)
        xq = noise[1]
        with nograd:
            want = ref(torch.cat([xq, xq]), ts[steps // 2].expand(2 * rows), z)
            got = _forced(tri)(lambda: ours.sampler(z, ts, gd)(xq, steps // 2))()
            if cuda_head:
                got_c = _forced("cuda")(lambda: ours.sampler(z, ts, gd)(xq, steps // 2))()
                for k in ("ours_cuda", "ours_cuda_graph"):
                    extra_checks[k] = (_rel_err(got_c, want), LOWP_TOL)
        check = (_rel_err(got, want), LOWP_TOL if gpu else 1e-4)
    if check is not None and not check[0] <= check[1]:
        raise AssertionError(f"{head} {rows} {what}: ours differs from the reference by {check[0]:.3e} "
                             f"(relative) > {check[1]}")
    for k, (err, tol) in extra_checks.items():
        if not err <= tol:
            raise AssertionError(f"{head} {rows} {what}: {k} differs from the reference by {err:.3e} "
                                 f"(relative) > {tol}")
    # warm-up (compiles Triton kernels and torch.compile graphs, fills caches)
    for fn in impls.values():
        fn()
    if gpu:
        torch.cuda.synchronize(device)
        rep = args.rep_ms * (3 if what == "sample" else 1)
        med = {k: time_gpu(fn, rep) for k, fn in impls.items()}
    else:
        med = time_cpu_interleaved(impls, args.rounds)
    mem = {}
    if what == "fwd_bwd" and gpu:
        for k, fn in impls.items():
            ref.zero_grad(set_to_none=True)  # the same live tensors before each measurement
            ours.zero_grad(set_to_none=True)
            mem[k] = peak_memory(fn, device)
    evaluated = 2 * rows if what == "sample" else rows
    flops = head_gemm_flops(cfg, evaluated, embeddings=what != "sample") * (args.steps if what == "sample" else 1)
    if what == "fwd_bwd":
        flops *= 3  # backward: two GEMMs per forward GEMM
    out = []
    for k, s in med.items():
        row = dict(head=head, rows=rows, evaluated_rows=evaluated, pass_=what, impl=k, median_ms=s * 1e3,
                   tflops=flops / s / 1e12, steps=args.steps if what == "sample" else None,
                   ms_per_step=s * 1e3 / args.steps if what == "sample" else None,
                   speedup_vs_ref_fp32=med["ref_fp32"] / s, speedup_vs_ref_bf16=med["ref_bf16"] / s,
                   check_rel_err=extra_checks[k][0] if k in extra_checks else (
                       check[0] if k.startswith("ours") else None))
        for peer in ("compile_max_autotune", "compile_default"):
            if peer in med:
                row[f"speedup_vs_{peer}"] = med[peer] / s
        if args.peak_tflops:
            row["roofline_fraction"] = row["tflops"] / args.peak_tflops
        if mem:
            row["peak_mem_mb"] = mem[k] / 2**20
            row["peak_mem_vs_ref_bf16"] = mem[k] / mem["ref_bf16"] if mem["ref_bf16"] else None
        out.append(row)
    return out


def _no_grad_call(f):
    with torch.no_grad():
        return f()


# ---- report -------------------------------------------------------------------------------------
def print_table(rows: list[dict]) -> None:
    head = f"{'head':6} {'rows':>5} {'pass':8} {'impl':21} {'ms':>10} {'GFLOP/s':>9} {'x ref32':>8} {'x ref16':>8} " \
           f"{'x compile':>9} {'roofline':>8} {'peak MB':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        comp = r.get("speedup_vs_compile_max_autotune", r.get("speedup_vs_compile_default"))
        print(f"{r['head']:6} {r['rows']:>5} {r['pass_']:8} {r['impl']:21} {r['median_ms']:>10.3f} "
              f"{r['tflops'] * 1e3:>9.1f} {r['speedup_vs_ref_fp32']:>8.2f} {r['speedup_vs_ref_bf16']:>8.2f} "
              f"{'' if comp is None else f'{comp:.2f}':>9} "
              f"{'' if 'roofline_fraction' not in r else format(r['roofline_fraction'], '.1%'):>8} "
              f"{'' if 'peak_mem_mb' not in r else format(r['peak_mem_mb'], '.0f'):>8}")


def plot(rows: list[dict], info: dict, path: Path) -> bool:
    """Speedup of ours over the bf16-autocast reference per case (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401 (matplotlib.ticker below)
    except ImportError:
        return False
    ours = [r for r in rows if r["impl"].startswith("ours")]
    if not ours:
        return False
    labels = [f"{r['head']} {r['rows']} {r['pass_']} {r['impl']}" for r in ours]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(ours) + 1.4))
    y = list(range(len(ours)))
    ax.barh([i - 0.2 for i in y], [r["speedup_vs_ref_bf16"] for r in ours], height=0.4, color="tab:blue",
            label="vs eager bf16 autocast")
    ax.barh([i + 0.2 for i in y], [r["speedup_vs_ref_fp32"] for r in ours], height=0.4, color="tab:gray",
            label="vs eager fp32")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("speedup (x)")
    ax.set_title(f"fluid_ops diffusion head, {info.get('gpu') or info.get('cpu')}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU grid (CI smoke test, < 30 s)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--heads", nargs="*", default=None, choices=list(HEADS))
    p.add_argument("--rows", nargs="*", type=int, default=None)
    p.add_argument("--passes", nargs="*", default=list(PASSES), choices=PASSES)
    p.add_argument("--steps", type=int, default=None, help="diffusion steps of the sample (default 100, quick 5)")
    p.add_argument("--rounds", type=int, default=None, help="CPU: interleaved rounds (default 3, quick 2)")
    p.add_argument("--rep-ms", type=float, default=200.0, help="GPU: do_bench time per implementation")
    p.add_argument("--no-compile", action="store_true", help="GPU: skip torch.compile(mode='max-autotune')")
    p.add_argument("--cpu-compile", action="store_true", help="CPU: add torch.compile(mode='default') (slow)")
    p.add_argument("--backend", default=None, choices=list(fluid_ops.backend.BACKENDS),
                   help="force a fluid_ops backend for `ours` (default: automatic; the fused head runs on "
                        "CUDA unless a non-triton backend is forced)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; quick: 1, as OpenMP spinning on a busy small "
                        "machine can slow everything down 100x)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: from the GPU name)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/denoiser_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        device = torch.device("cpu")
    gpu = device.type == "cuda"
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    args.heads = args.heads or (["tiny"] if args.quick else (["MAR-B", "MAR-L", "MAR-H"] if gpu else ["MAR-B"]))
    args.rows = args.rows or ([64] if args.quick else ([64, 512, 4096] if gpu else [64, 512]))
    args.steps = args.steps or (5 if args.quick else 100)
    args.rounds = args.rounds or (2 if args.quick else 3)
    info = machine_info(device)
    if gpu:
        args.peak_tflops = args.peak_tflops or peak_bf16_tflops(info["gpu"])
        info["peak_bf16_tflops_assumed"] = args.peak_tflops
    info.update(cfg_scale=CFG_SCALE, temperature=TEMPERATURE, steps=args.steps, quick=args.quick)
    if gpu:
        info["cuda_head"] = _cuda_head_available(device, args)
    print(json.dumps(info))
    rows = []
    cases = [(h, r, w) for h in args.heads for r in args.rows for w in args.passes
             if gpu or args.quick or not (w == "sample" and r > 64)]  # CPU: the 100-step sample at 64 rows only
    try:
        from tqdm.auto import tqdm
        cases_it = tqdm(cases, desc="denoiser bench", disable=not sys.stderr.isatty())
    except ImportError:
        cases_it = cases
    info["backend_forced"] = args.backend
    with fluid_ops.use_backend(args.backend):
        info["backend_layernorm_modulate"] = fluid_ops.backend.select(
            "layernorm_modulate", device, *(torch.zeros(1, 8, device=device),) * 3, None, None, 1e-6, torch.float32)[0]
        for h, r, w in cases_it:
            rows += bench_case(h, r, w, args, device)
    print_table(rows)
    name = f"denoiser_{device.type}{'_quick' if args.quick else ''}.json"
    out = Path(args.out or ROOT / "benchmarks" / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "results": rows}, indent=1))
    print(f"wrote {out}")
    if plot(rows, info, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
