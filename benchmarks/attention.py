"""Attention benchmark: fluid_ops' backends against torch SDPA (each backend) and FlexAttention.

    python benchmarks/attention.py            # GPU grid (bf16) of issue 3; needs a CUDA device
    python benchmarks/attention.py --quick    # small CPU grid (fp32), a few seconds: CI smoke test
    python benchmarks/attention.py --groups self padded --merge   # part of the GPU grid, merged
                                                                  # into the same JSON

The whole GPU grid autotunes the Triton kernels per shape class and compiles FlexAttention per
shape: run it in parts (--groups ... --merge) where a command has a time limit. Tuning results are
cached on disk (TRITON_CACHE_AUTOTUNING=1 is set here), so a rerun does not tune again.

For each case (shape, causal, key padding) and pass (forward; forward+backward) it times
* ours: every fluid_ops backend that runs here and supports the call (on a GPU: cuda -- the
  mma.sync kernels of csrc/cuda/attention_*.cu, fp16 / bf16 only, its deterministic backward --
  and triton; on a CPU: cpu; never the reference; the Triton interpreter is not timed);
* peers: torch SDPA under `sdpa_kernel` with each of FLASH_ATTENTION, EFFICIENT_ATTENTION,
  CUDNN_ATTENTION, MATH that accepts the case (a key-padding mask goes in as a boolean attn_mask,
  which flash does not take), and FlexAttention (compiled; a block mask from the padding / causal
  mask_mod, built once per case outside the timing) on CUDA. Peers see (B, H, N, D) views of the
  same (B, N, H, D) tensors (no copies on either side).
Every implementation's output is first checked against the fp32 math result (a wrong fast result
is not reported). FLOPs: 4·B·H·Nq·Nk·D forward (halved when causal; padded keys are counted, the
work both sides are asked to do), backward 2.5x forward, so forward+backward is 3.5x.
Timings: GPU `triton.testing.do_bench` medians; CPU `torch.utils.benchmark` blocked_autorange
medians. Output: a table, JSON (device, versions, date, medians, TFLOP/s, ratio of each of ours to
the fastest peer and to FlexAttention, autotuned configs) and a plot under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

# keep Triton's autotuning results on disk (before the kernels are imported): a run in parts
# (--groups ... --merge) tunes each shape class once
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")

import fluid_ops  # noqa: E402


# ---- the grids ----------------------------------------------------------------------------------
def _case(kind, b, h, nq, nk, d, *, causal=False, padded=False, backward=True):
    return dict(kind=kind, B=b, H=h, Nq=nq, Nk=nk, D=d, causal=causal, padded=padded, backward=backward)


def gpu_grid(groups=None):
    """Issue 3's shapes, by group: `self` B·H = 4096 at N = 256 / 320 (MAR, Fluid), D 64..128, and
    N = 512 / 1024 at the same token count; `padded` the same with key padding; `cross` 256 image
    queries -> <= 128 padded text keys; `causal` 256; `decode` one query over a KV cache; `long`
    N = 1024..4096, D = 128 (B·N = 16k tokens, H = 16)."""
    grid = {
        "self": [_case("self", 256, 16, n, n, d, backward=d in (64, 128)) for n in (256, 320) for d in (64, 80, 96, 128)]
        + [_case("self", 4096 * 256 // n // 16, 16, n, n, d) for n in (512, 1024) for d in (64, 128)],
        "padded": [_case("self", 256, 16, n, n, d, padded=True) for n in (256, 320) for d in (64, 128)],
        "cross": [_case("cross", 256, 16, 256, 128, d, padded=True) for d in (64, 128)],
        "causal": [_case("causal", 256, 16, 256, 256, d, causal=True) for d in (64, 128)],
        "decode": [_case("decode", 64, 16, 1, nk, 128, causal=True, backward=False) for nk in (256, 1024)],
        "long": [_case("long", 16384 // n, 16, n, n, 128) for n in (1024, 2048, 4096)]
        + [_case("long", 4, 16, 4096, 4096, 128, causal=True)],
    }
    return [c for g in (groups or GPU_GROUPS) for c in grid[g]]


GPU_GROUPS = ("self", "padded", "cross", "causal", "decode", "long")


def cpu_grid(quick: bool):
    if quick:
        return [_case("self", 2, 4, 128, 128, 64), _case("self", 2, 4, 128, 128, 64, padded=True),
                _case("cross", 2, 4, 128, 32, 64, padded=True, backward=False),
                _case("causal", 2, 4, 128, 128, 64, causal=True, backward=False),
                _case("decode", 4, 4, 1, 256, 64, causal=True, backward=False)]
    return [_case("self", 8, 8, 256, 256, 64), _case("self", 8, 8, 256, 256, 64, padded=True),
            _case("self", 8, 8, 320, 320, 80), _case("cross", 8, 8, 256, 64, 64, padded=True),
            _case("causal", 8, 8, 256, 256, 64, causal=True), _case("decode", 8, 8, 1, 1024, 64, causal=True,
                                                                        backward=False)]


def flops(case, backward: bool) -> float:
    f = 4.0 * case["B"] * case["H"] * case["Nq"] * case["Nk"] * case["D"]
    if case["causal"] and case["kind"] != "decode":
        f /= 2
    return f * (3.5 if backward else 1.0)


# ---- inputs and implementations -----------------------------------------------------------------
def make_inputs(case, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, h, nq, nk, d = (case[k] for k in ("B", "H", "Nq", "Nk", "D"))
    q = torch.randn(b, nq, h, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, nk, h, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, nk, h, d, generator=g).to(device=device, dtype=dtype)
    do = torch.randn(b, nq, h, d, generator=g).to(device=device, dtype=dtype)
    mask = None
    if case["padded"]:
        if case["kind"] == "cross":  # text: 16..Nk tokens per prompt
            lens = torch.randint(16, nk + 1, (b,), generator=g)
        else:  # each batch's last 15..35% keys are padding
            lens = nk - (nk * (0.15 + 0.2 * torch.rand(b, generator=g))).long()
        mask = (torch.arange(nk).view(1, nk) < lens.view(b, 1)).to(device)
    return q, k, v, do, mask


def ours_impls(case, device):
    """{name: fn(q, k, v, mask) -> o} for every fluid_ops backend that runs here (not the reference)."""
    info = fluid_ops.backends()
    names = []
    if device == "cuda":
        for b in ("cuda", "triton"):
            if info[b]["available"] and "attention_fwd" in info[b]["ops"]:
                names.append(b)
    elif info["cpu"]["available"]:
        names.append("cpu")
    out = {}
    for name in names:
        if case["kind"] == "decode":
            out[name] = _decode_fn(name, case)
        else:
            out[name] = (lambda n: lambda q, k, v, mask: _with_backend(n, fluid_ops.attention, q, k, v,
                                                                       key_padding_mask=mask,
                                                                       causal=case["causal"]))(name)
    return out


def _with_backend(name, fn, *args, **kwargs):
    with fluid_ops.use_backend(name):
        return fn(*args, **kwargs)


def _decode_fn(name, case):
    """One decode step as the model runs it: append 1 token at position Nk - 1 of a 2·Nk cache and
    attend over the first Nk rows (the peers only attend over k[:, :Nk]: they get the append free)."""
    state = {}

    def step(q, k, v, mask):
        key = (k.data_ptr(), v.data_ptr())
        if state.get("key") != key:
            b, nk, h, d = k.shape
            kc = torch.zeros(b, 2 * nk, h, d, dtype=k.dtype, device=k.device)
            vc = torch.zeros_like(kc)
            kc[:, :nk] = k
            vc[:, :nk] = v
            lens = torch.full((b,), nk - 1, dtype=torch.int32, device=k.device)
            state.update(key=key, kc=kc, vc=vc, lens=lens, kn=k[:, nk - 1:].contiguous(), vn=v[:, nk - 1:].contiguous())
        return _with_backend(name, fluid_ops.attention_kvcache, q, state["kc"], state["vc"], state["kn"], state["vn"],
                             cache_seqlens=state["lens"], causal=True)
    return step


SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def peer_impls(case, device, with_flex: bool):
    """{name: fn(q, k, v, mask) -> o in (B, N, H, D)} for SDPA per backend and FlexAttention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    causal = case["causal"] and case["kind"] != "decode"  # one query over the whole cache needs no mask
    if causal and case["Nq"] != case["Nk"]:
        raise ValueError("SDPA's is_causal is top-left aligned: only Nq == Nk causal cases are comparable")
    out = {}
    for name in SDPA_BACKENDS:
        be = getattr(SDPBackend, name, None)
        if be is None:
            continue

        def fn(q, k, v, mask, be=be):
            attn_mask = None if mask is None else mask.view(mask.shape[0], 1, 1, mask.shape[1])
            with sdpa_kernel(be):
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_mask=attn_mask, is_causal=causal)
            return o.transpose(1, 2)
        out["sdpa_" + name.split("_")[0].lower()] = fn
    if with_flex:
        flex = _flex_impl(case, causal)
        if flex is not None:
            out["flex"] = flex
    return out


_FLEX_COMPILED = None


def _flex_impl(case, causal):
    global _FLEX_COMPILED
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    if _FLEX_COMPILED is None:
        import torch._dynamo
        for knob in ("recompile_limit", "cache_size_limit"):  # one compile per shape, ~30 shapes
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    cache = {}

    def fn(q, k, v, mask):
        key = (None if mask is None else mask.data_ptr(), q.shape, k.shape)
        if cache.get("key") != key:
            b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
            if mask is None and not causal:
                block_mask = None
            else:
                def mask_mod(bi, hi, qi, kj):
                    ok = (qi >= kj) if causal else (kj >= 0)
                    return ok & mask[bi, kj] if mask is not None else ok
                block_mask = create_block_mask(mask_mod, b, None, nq, nk, device=q.device)
            cache.update(key=key, block_mask=block_mask)
        o = _FLEX_COMPILED(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=cache["block_mask"])
        return o.transpose(1, 2)
    return fn


# ---- timing -------------------------------------------------------------------------------------
def time_ms(fn, device, min_run_time):
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    from torch.utils import benchmark
    t = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _fwd_bwd(fn, q, k, v, do, mask):
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))

    def step():
        return torch.autograd.grad(fn(qs, ks, vs, mask), (qs, ks, vs), do)
    return step


def run_case(case, dtype, device, args):
    q, k, v, do, mask = make_inputs(case, dtype, device)
    ours = ours_impls(case, device)
    peers = peer_impls(case, device, with_flex=device == "cuda" and not args.no_flex)
    # the fp32 math result is the yardstick every implementation must match first
    want = fluid_ops.reference.attention(q.float(), k.float(), v.float(), key_padding_mask=mask,
                                         causal=case["causal"])
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    rows = []
    passes = ["forward"] + (["forward+backward"] if case["backward"] and not args.forward_only else [])
    for pass_ in passes:
        backward = pass_ != "forward"
        row = dict(case, dtype=str(dtype).replace("torch.", ""), tflop=flops(case, backward) / 1e12,
                   ms={}, skipped={}, errors={})
        row["pass"] = pass_
        for group, impls in (("ours", ours), ("peer", peers)):
            for name, fn in impls.items():
                try:
                    with warnings.catch_warnings():  # SDPA warns at length about kernels it cannot use
                        warnings.simplefilter("ignore")
                        o = fn(q, k, v, mask)
                        err = (o.float() - want).abs().max().item()
                        if not err <= tol:  # (NaN fails too)
                            row["errors" if group == "ours" else "skipped"][name] = \
                                f"wrong result: max error {err:.2e} > {tol}"
                            continue
                        call = _fwd_bwd(fn, q, k, v, do, mask) if backward else (lambda fn=fn: fn(q, k, v, mask))
                        row["ms"][name] = time_ms(call, device, args.min_run_time)
                except Exception as e:  # noqa: BLE001 -- a peer that does not take the case; ours: reported
                    msg = re.sub(r"\s+", " ", f"{type(e).__name__}: {e}").strip()[:200]
                    row["errors" if group == "ours" else "skipped"][name] = msg
        _ratios(row, ours, peers)
        rows.append(row)
    return rows


def _ratios(row, ours, peers):
    ms = row["ms"]
    peer_ms = {n: t for n, t in ms.items() if n in peers}
    row["tflops"] = {n: row["tflop"] / (t / 1e3) for n, t in ms.items()}
    row["fastest_peer"] = min(peer_ms, key=peer_ms.get) if peer_ms else None
    row["fastest_sdpa"] = min((n for n in peer_ms if n.startswith("sdpa")), key=peer_ms.get, default=None)
    row["ratio_to_fastest_peer"] = {n: peer_ms[row["fastest_peer"]] / ms[n] for n in ours if n in ms and peer_ms}
    row["ratio_to_fastest_sdpa"] = {n: peer_ms[row["fastest_sdpa"]] / ms[n] for n in ours
                                    if n in ms and row["fastest_sdpa"]}
    row["ratio_to_flex"] = {n: peer_ms["flex"] / ms[n] for n in ours if n in ms and "flex" in peer_ms}


# ---- report -------------------------------------------------------------------------------------
def environment(device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "fluid_ops": fluid_ops.__version__,
            "device": device}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        from fluid_ops import _compiled
        info["fluid_ops_cuda_archs"] = getattr(_compiled.cuda, "compiled_archs", None)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["threads"] = torch.get_num_threads()
        # other processes on a small machine skew CPU timings: say how busy it was
        info["load_average_1_5_15"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


def _label(r):
    s = f"{r['kind']} B{r['B']} H{r['H']} {r['Nq']}x{r['Nk']} D{r['D']}"
    s += " causal" if r["causal"] and r["kind"] != "decode" else ""
    s += " padded" if r["padded"] else ""
    return s + (" fwd+bwd" if r["pass"] != "forward" else " fwd")


def print_table(rows):
    names = sorted({n for r in rows for n in r["ms"]}, key=lambda n: (n.startswith(("sdpa", "flex")), n))
    head = f"{'case':<46}" + "".join(f"{n:>16}" for n in names) + f"{'best peer':>18}{'ours/peer':>11}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        cells = "".join(f"{r['ms'][n]:>8.3f}ms{r['tflops'][n]:>5.0f}T" if r['tflops'][n] >= 1 else
                        f"{r['ms'][n]:>8.3f}ms{r['tflops'][n] * 1e3:>4.0f}G" if n in r["ms"] else f"{'-':>16}"
                        for n in names)
        best = r["fastest_peer"] or "-"
        ratio = max(r["ratio_to_fastest_peer"].values(), default=float("nan"))
        print(f"{_label(r):<46}{cells}{best:>18}{ratio:>10.2f}x")
        for name, err in r.get("errors", {}).items():
            print(f"    {name} FAILED: {err}")
    print("(ms = median time; T / G = TFLOP/s / GFLOP/s; ours/peer = fastest peer's time / our best time)")


def plot(rows, info, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = sorted({n for r in rows for n in r["ms"]}, key=lambda n: (n.startswith(("sdpa", "flex")), n))
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) * max(1, len(names)) / 2 + 1.5))
    height = 0.8 / max(1, len(names))
    peak = max((x for r in rows for x in r["tflops"].values()), default=1.0)
    scale, unit = (1.0, "TFLOP/s") if peak >= 1 else (1e3, "GFLOP/s")
    for i, n in enumerate(names):
        ys = [j + i * height for j in range(len(rows))]
        ax.barh(ys, [r["tflops"].get(n, 0.0) * scale for r in rows], height=height, label=n)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))], [_label(r) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(unit + " (4·B·H·Nq·Nk·D forward, /2 causal, x3.5 forward+backward)")
    dev = info.get("gpu") or info.get("cpu")
    ax.set_title(f"attention, {dev}, torch {info['torch']}, triton {info['triton']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _slug(s):
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small CPU grid, short timings (CI smoke test)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if present (cpu with --quick)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--no-flex", action="store_true", help="leave FlexAttention out (it compiles per shape)")
    p.add_argument("--groups", nargs="*", choices=GPU_GROUPS, default=None,
                   help="GPU: run only these groups of the grid (with --merge, one JSON from several runs)")
    p.add_argument("--filter", default=None, help="regex over case labels: run only the matching ones")
    p.add_argument("--min-run-time", type=float, default=None, help="CPU seconds per measurement (default 1, quick 0.05)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch.set_num_threads (our kernels follow it); 1 is steadier on a loaded machine")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention_<device>.json)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing --out JSON that this run does not redo (run the grid in parts)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 1.0)
    info = environment(device)
    print(json.dumps(info))
    cases = gpu_grid(args.groups) if device == "cuda" else cpu_grid(args.quick)
    if args.filter:
        cases = [c for c in cases if re.search(args.filter, _label({**c, "pass": "forward"}))]
    rows = []
    try:
        from tqdm import tqdm
        it = tqdm(cases, disable=not sys.stderr.isatty(), desc="cases")
    except ImportError:
        it = cases
    for case in it:
        rows += run_case(case, dtype, device, args)
    tag = "cpu_quick" if args.quick else _slug(info.get("gpu") or "cpu")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"attention_{tag}.json"
    tuned = {}
    if any("triton" in r["ms"] for r in rows):
        tuned = __import__("fluid_ops.triton.attention", fromlist=["tuning_report"]).tuning_report()
    if args.merge and out.exists():  # earlier parts of the grid: keep what this run did not redo
        old = json.loads(out.read_text())
        new_labels = {_label(r) for r in rows}
        rows = [r for r in old["rows"] if _label(r) not in new_labels] + rows
        for kernel, chosen in old.get("triton_autotune", {}).items():
            tuned[kernel] = {**chosen, **tuned.get(kernel, {})}
    print_table(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": info, "dtype": str(dtype).replace("torch.", ""), "quick": args.quick,
                               "timing": "triton.testing.do_bench median" if device == "cuda"
                               else f"torch.utils.benchmark blocked_autorange median, {args.min_run_time}s",
                               "rows": rows, "triton_autotune": tuned}, indent=1) + "\n")
    print(f"wrote {out}")
    if plot(rows, info, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    failed = [(_label(r), n, e) for r in rows for n, e in r.get("errors", {}).items()]
    for label, name, err in failed:
        print(f"ERROR {name} on {label}: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
