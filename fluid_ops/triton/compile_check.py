"""Compile the attention kernels for a GPU target without a GPU (Triton ships ptxas).

    python -m fluid_ops.triton.compile_check            # every autotune candidate, D 64 / 80 / 128, sm_90
    python -m fluid_ops.triton.compile_check --quick    # one config per kernel (the test suite runs this)
    python -m fluid_ops.triton.compile_check --arch 80

The interpreter (what CI runs) does not type-check kernels the way the compiler does, nor show
register spills or shared-memory use; this does, per kernel and config: shared memory (bytes),
registers per thread, spilled bytes (STACK) and the MMA instruction used. The autotune candidate
lists in fluid_ops.triton.attention were pruned with it. Must run without TRITON_INTERPRET=1.
Pointers and strides are assumed 16-byte aligned, which is what a launch on ordinary tensors
specialises to (other alignments compile a separate, slower variant at run time).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time


def _signature(fn, ptr_types, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        elif name.startswith("scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(fn, ptr_types, consts, arch, num_warps, num_stages):
    """(seconds, shared bytes, registers, spilled bytes, mma kind) of one compiled variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = _signature(fn, ptr_types, consts)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n.startswith("stride_")}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    t = time.time()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    seconds = time.time() - t
    regs = spills = None
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(tool):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+)", usage)
        regs = m and int(m.group(1))
        m = re.search(r"STACK:(\d+)", usage)
        spills = m and int(m.group(1))
    ptx = kernel.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    return seconds, kernel.metadata.shared, regs, spills, mma


def cases(quick: bool, dtype: str = "bf16"):
    """(label, kernel, pointer types, constexprs, warps, stages) for the padded + causal variants
    (the most code) of every autotune candidate, plus the small kernels."""
    import triton

    from fluid_ops.triton import attention as ta

    p = "*" + dtype
    fwd_ptrs = dict(Q=p, K=p, V=p, O=p, LSE="*fp32", KEEP="*u8", BLOCK_IDX="*i32", BLOCK_CNT="*i32", SEQLENS_K="*i32")
    bwd_ptrs = dict(Q=p, K=p, V=p, DO=p, LSE2="*fp32", DELTA="*fp32", KEEP="*u8", DK=p, DV=p, DQ=p, DQ_ACC="*fp32",
                    BLOCK_IDX="*i32", BLOCK_CNT="*i32")
    dims = (80,) if quick else (64, 80, 128)

    def pick(configs):
        configs = configs[:1] if quick else configs
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]

    out = []
    for d in dims:
        dd = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), DOT_PREC="tf32")
        for bm, bn, w, s in pick(ta.FWD_CONFIGS):
            out.append(("forward", ta._attn_fwd_kernel, fwd_ptrs,
                        dict(dd, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, HAS_MASK=True, HAS_SEQLENS=False), w, s))
        for atomic in (False,) if quick else (False, True):
            for bm, bn, w, s in pick(ta.BWD_DKDV_CONFIGS):
                out.append(("backward dk/dv" + (" atomic dq" if atomic else ""), ta._attn_bwd_dkdv_kernel, bwd_ptrs,
                            dict(dd, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, HAS_MASK=True, ATOMIC_DQ=atomic), w, s))
        for bm, bn, w, s in pick(ta.BWD_DQ_CONFIGS):
            out.append(("backward dq", ta._attn_bwd_dq_kernel, bwd_ptrs,
                        dict(dd, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, HAS_MASK=True), w, s))
    if not quick:
        out.append(("forward kv-cache", ta._attn_fwd_kernel, fwd_ptrs,
                    dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=64, CAUSAL=True, HAS_MASK=False,
                         HAS_SEQLENS=True, DOT_PREC="tf32"), 4, 3))
        out.append(("forward fp32", ta._attn_fwd_kernel, {**fwd_ptrs, **dict(Q="*fp32", K="*fp32", V="*fp32", O="*fp32")},
                    dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=64, BLOCK_N=64, CAUSAL=False, HAS_MASK=False,
                         HAS_SEQLENS=False, DOT_PREC="ieee"), 4, 3))
        out.append(("backward preprocess", ta._attn_bwd_preprocess_kernel,
                    dict(O=p, DO=p, LSE="*fp32", DELTA="*fp32", LSE2="*fp32"),
                    dict(HEAD_DIM=80, BLOCK_D=128, BLOCK_M=64), 4, 1))
        out.append(("kv append", ta._kv_append_kernel, dict(KC=p, VC=p, KN=p, VN=p, CACHE_SEQLENS="*i64"),
                    dict(HEAD_DIM=80, BLOCK_H=16, BLOCK_D=128), 4, 1))
    out.append(("padding block list", ta._mask_block_list_kernel, dict(KEEP="*u8", BLOCK_IDX="*i32", BLOCK_CNT="*i32"),
                dict(BLOCK_N=ta.MASK_BLOCK_N), 4, 1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an int: 80, 89, 90")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--quick", action="store_true", help="one config per kernel, D = 80")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    import triton
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}")
    failures = 0
    for label, fn, ptrs, consts, warps, stages in cases(args.quick, args.dtype):
        shown = {k: int(v) if isinstance(v, bool) else v for k, v in consts.items() if k not in ("DOT_PREC", "BLOCK_D")}
        try:
            secs, smem, regs, spills, mma = compile_one(fn, ptrs, consts, args.arch, warps, stages)
            print(f"{label:<28} {str(shown):<100} w{warps} s{stages}: smem {smem:>6} regs {regs} "
                  f"spill {spills} {mma} ({secs:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 -- report every failing variant, then fail
            failures += 1
            print(f"{label:<28} {shown} w{warps} s{stages}: FAILED {type(e).__name__}: {e}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
