"""Training under the diffusion loss: one forward + backward of MAR's loss (docs/contracts.md §2.3) through the
head, `fluid_ops.nn.diffusion_loss` against the reference `fluid_ops.reference.diffusion_loss`,
time and peak memory.

    python benchmarks/diffusion_loss.py            # tiny and MAR-B heads (CPU: a few minutes)
    python benchmarks/diffusion_loss.py --quick    # the tiny head only, < 1 min

A batch of B images x L tokens, a fraction `mask_ratio` of them masked, diffusion_batch_mul R = 4
t-draws per token (MAR). Both implementations run the same head (fluid_ops.nn.DenoiserMLP, fp32)
on the same draws:
* `reference`: MAR's loss as written: target and z repeated R times, the head on all B L R rows,
  the loss multiplied by the mask;
* `ours`: the masked rows selected first (by index, no host sync), cond_embed on the K distinct
  masked rows broadcast to K R rows, the time embedding gathered from the 1000 timesteps.
Each case first checks that the two losses agree (relative 1e-5).

Memory, per case in a fresh subprocess: `peak_mb`, the rise of the process's peak resident
set during the step over its resident set before it (torch's CPU allocator returns large blocks
to the OS, so this follows live tensors); `saved_mb`, the bytes autograd keeps for the backward
(unique storages seen by saved_tensors_hooks), which does not depend on the allocator. On a GPU
(`--device cuda`) the peak is torch.cuda.max_memory_allocated's rise. Time: both implementations
in one process, `--reps` interleaved rounds after a warm-up, medians.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HEADS = {  # (blocks, width, token channels, z channels)
    "tiny": dict(in_channels=16, model_channels=256, out_channels=32, z_channels=192, num_res_blocks=3),
    "MAR-B": dict(in_channels=16, model_channels=1024, out_channels=32, z_channels=768, num_res_blocks=6),
}
IMPLS = ("reference", "ours")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup(head, images, tokens, mask_ratio, mul, device):
    import torch

    from fluid_ops.nn import DenoiserMLP
    torch.manual_seed(0)
    net = DenoiserMLP(**HEADS[head]).to(device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # MAR's zero-init would make every adaLN GEMM trivial to differentiate
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(device))
    m = images * tokens
    target = torch.randn(m, HEADS[head]["in_channels"], generator=g).to(device)
    z = torch.randn(m, HEADS[head]["z_channels"], generator=g).to(device).requires_grad_(True)
    num_masked = int(math.ceil(tokens * mask_ratio))
    orders = torch.stack([torch.randperm(tokens, generator=g) for _ in range(images)]).to(device)
    index = (torch.arange(images, device=device)[:, None] * tokens + orders[:, :num_masked]).reshape(-1)
    mask = torch.zeros(m, device=device)
    mask[index] = 1.0
    t = torch.randint(0, 1000, (m * mul,), generator=g).to(device)
    noise = torch.randn(m * mul, HEADS[head]["in_channels"], generator=g).to(device)
    return net, target, z, mask, index, t, noise


def _step_fn(impl, net, target, z, mask, index, t, noise, mul):
    from fluid_ops.nn import diffusion_loss
    from fluid_ops.reference import diffusion as rdiff
    if impl == "reference":
        return lambda: rdiff.diffusion_loss(net, target, z, mask, diffusion_batch_mul=mul, t=t, noise=noise)
    return lambda: diffusion_loss(net, target, z, mask, index=index, diffusion_batch_mul=mul, t=t, noise=noise)


def _prepare(args, impl):
    import torch
    device = torch.device(args.device)
    net, target, z, mask, index, t, noise = _setup(args.head, args.images, args.tokens, args.mask_ratio,
                                                   args.mul, device)
    step = _step_fn(impl, net, target, z, mask, index, t, noise, args.mul)

    def run():
        net.zero_grad(set_to_none=True)
        z.grad = None
        loss = step()
        loss.backward()
        return loss

    return run, index.numel()


def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def worker_memory(args) -> dict:
    """The first forward + backward of one implementation in this (fresh) process: peak memory
    and the bytes saved for the backward."""
    import torch
    torch.set_num_threads(args.threads)
    run, k = _prepare(args, args.impl)
    saved = {}

    def pack(x):
        s = x.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return x

    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = run()
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return dict(masked=k, peak_mb=round(peak, 1), saved_mb=round(sum(saved.values()) / 2**20, 1), loss=float(loss))


def worker_time(args) -> dict:
    """Both implementations in this process, timed in interleaved rounds (a shared machine's load
    then hits both alike): {impl: median ms}."""
    import torch
    torch.set_num_threads(args.threads)
    runs = {impl: _prepare(args, impl)[0] for impl in IMPLS}
    for run in runs.values():
        run()  # warm-up
    times = {impl: [] for impl in IMPLS}
    for _ in range(args.reps):
        for impl, run in runs.items():
            _sync(args.device)
            t0 = time.perf_counter()
            run()
            _sync(args.device)
            times[impl].append(time.perf_counter() - t0)
    return {impl: 1e3 * statistics.median(v) for impl, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/diffusion_loss_<device>.json)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--mask-ratio", type=float, default=0.8)
    ap.add_argument("--mul", type=int, default=4)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--head", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker_time(args) if args.impl == "both" else worker_memory(args)))
        return
    # (head, images, tokens): the tiny head as the CPU demo trains it (64 tokens per image), MAR-B
    # with its 256 tokens per image (a GPU batch is 64+ images; 2 here to keep a CPU step short)
    cases = [("tiny", 32, 64)] + ([] if args.quick else [("MAR-B", 2, 256)])
    if args.device == "cuda" and not args.quick:
        cases = [("tiny", 256, 64), ("MAR-B", 64, 256)]
    reps = args.reps or (2 if args.quick else 3)
    rows = []
    for head, images, tokens in cases:
        def sub(impl):
            cmd = [sys.executable, __file__, "--worker", "--head", head, "--impl", impl, "--images", str(images),
                   "--tokens", str(tokens), "--device", args.device, "--threads", str(args.threads),
                   "--reps", str(reps), "--mask-ratio", str(args.mask_ratio), "--mul", str(args.mul)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        res = {impl: sub(impl) for impl in IMPLS}
        ms = sub("both")
        for impl in IMPLS:
            res[impl].update(head=head, impl=impl, images=images, tokens=tokens, mul=args.mul, ms=round(ms[impl], 2),
                             head_rows=(res[impl]["masked"] if impl == "ours" else images * tokens) * args.mul)
        a, b = res["reference"]["loss"], res["ours"]["loss"]
        if not abs(a - b) <= 1e-5 * max(1.0, abs(a)):
            raise AssertionError(f"{head}: losses differ: reference {a} vs ours {b}")
        for impl in IMPLS:
            r = res[impl]
            r["speedup_vs_reference"] = round(res["reference"]["ms"] / r["ms"], 3)
            r["peak_vs_reference"] = round(r["peak_mb"] / max(res["reference"]["peak_mb"], 1e-9), 3)
            r["saved_vs_reference"] = round(r["saved_mb"] / max(res["reference"]["saved_mb"], 1e-9), 3)
            rows.append(r)
    hdr = f"{'head':6} {'impl':10} {'rows':>6} {'ms':>9} {'x ref':>6} {'peak MB':>8} {'x ref':>6} {'saved MB':>9} {'x ref':>6}"
    print(hdr)
    for r in rows:
        print(f"{r['head']:6} {r['impl']:10} {r['head_rows']:6d} {r['ms']:9.1f} {r['speedup_vs_reference']:6.2f} "
              f"{r['peak_mb']:8.1f} {r['peak_vs_reference']:6.2f} {r['saved_mb']:9.1f} {r['saved_vs_reference']:6.2f}")
    import torch
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=args.device, cpu=platform.processor() or platform.machine(), threads=args.threads,
                torch=torch.__version__, load_avg=os.getloadavg(), mask_ratio=args.mask_ratio, diffusion_batch_mul=args.mul, reps=reps,
                quick=args.quick)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"diffusion_loss_{args.device}{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
