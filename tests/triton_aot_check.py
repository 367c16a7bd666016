"""Compile the head / sampling Triton kernels for NVIDIA GPUs on a machine without one.

    python tests/triton_aot_check.py [--arch 90 80]

triton.compile with an explicit GPUTarget runs the whole pipeline (Triton IR -> PTX -> cubin with
the ptxas shipped in the triton wheel) without a driver, so type errors, unsupported operations
and shared-memory overflows of the GPU build show up here, where the interpreter (which runs the
Python body with numpy) cannot see them. Each kernel is compiled in the configurations the
wrappers choose on a GPU (gemm_config / _row_tiles / the categorical tile rule) for MAR-B-sized
shapes. Exit status 0 when all compile and fit the target's shared memory. Used by
tests/test_triton_head.py (FLUID_OPS_TRITON_AOT=1); runs in its own process because kernels
imported under TRITON_INTERPRET=1 cannot be compiled.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's default-change warning
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fluid_ops.triton import denoiser as td  # noqa: E402
from fluid_ops.triton import sampling as ts  # noqa: E402

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
       torch.int64: "i64", torch.int32: "i32"}
# Largest dynamic shared memory per block (bytes).
_SMEM = {90: 232448, 89: 101376, 80: 166912}


def _ptr(dtype):
    return torch.empty(1, dtype=dtype)


def compile_kernel(kernel, args: tuple, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """triton.compile of `kernel` for sm_<arch>: `args` are the runtime arguments in order (tensors
    stand for pointers of their dtype), `constexprs` the compile-time ones by name."""
    sig, rest = {}, list(args)
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        v = rest.pop(0)
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + _TY[v.dtype]
        elif isinstance(v, int):
            sig[name] = "i64" if abs(v) >= 2**31 else "i32"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} has unsupported type {type(v).__name__}")
    if rest:
        raise TypeError(f"{kernel.__name__}: {len(rest)} arguments too many")
    src = ASTSource(kernel, sig, {k: v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                                 num_stages=num_stages))


def cases():
    """(name, kernel, args, constexprs, num_warps, num_stages) for MAR-B-sized shapes."""
    f32, bf16, f64 = _ptr(torch.float32), _ptr(torch.bfloat16), _ptr(torch.float64)
    d = 1024
    out = []
    for guided, from_ptr, params, dt in ((True, False, False, torch.float32), (False, True, False, torch.bfloat16),
                                         (True, False, True, torch.float32)):
        x = _ptr(dt)
        out.append((f"ddpm_step guided={guided} step_from_ptr={from_ptr} params_from_ptr={params} {dt}",
                    ts._ddpm_step_kernel, (x, bf16, x, f32, _ptr(torch.int32), f32, x, 256, 16, 3, 0.9, 2.0),
                    dict(GUIDED=guided, STEP_FROM_PTR=from_ptr, PARAMS_FROM_PTR=params, BLOCK=1024), 4, 3))
    for v in (17, 1024, 16384):
        block = min(2048, max(16, triton.next_power_of_2(v)))
        rows = max(1, min(2048 // block, 64))
        for argmax, top_k, top_p in ((True, False, False), (False, True, True)):
            out.append((f"sample_categorical V={v} argmax={argmax} top_k={top_k} top_p={top_p}",
                        ts._categorical_kernel, (bf16, v, f64, f64, _ptr(torch.int64), 300, v, 0.7, 5),
                        dict(ARGMAX=argmax, TOP_K=top_k, TOP_P=top_p, SINGLE=v <= block, ROWS=rows, BLOCK_V=block),
                        4 if block * rows <= 1024 else 8, 3))
    for width in (1024, 1536):
        br, bd, w = td._row_tiles(4096, width)
        for has_shift in (True, False):
            out.append((f"layernorm_modulate D={width} shift={has_shift}", td._lnm_kernel,
                        (f32, width, bf16, 3 * width, bf16, 3 * width, f32, f32, bf16, width, 4096, width, 1e-6),
                        dict(HAS_W=has_shift, HAS_B=has_shift, HAS_SHIFT=has_shift, BLOCK_R=br, BLOCK_D=bd), w, 3))
        out.append((f"layernorm_modulate_backward D={width}", td._lnm_bwd_kernel,
                    (bf16, width, bf16, 3 * width, bf16, width, f32, f32, bf16, bf16, f32, f32, 4096, width, 1e-6),
                    dict(HAS_W=True, HAS_B=True, BLOCK_R=br, BLOCK_D=bd), w, 3))
    out.append(("gated_residual", td._gated_residual_kernel, (f32, d, bf16, 3 * d, bf16, d, f32, d, 4096, d),
                dict(BLOCK_R=2, BLOCK_D=1024), 4, 3))
    out.append(("silu_add", td._silu_add_kernel, (f32, d, f32, 0, bf16, d, 4096, d), dict(BLOCK_R=2, BLOCK_D=1024),
                4, 3))
    out.append(("gated_residual_backward", td._gated_residual_bwd_kernel,
                (bf16, d, bf16, 3 * d, bf16, d, bf16, bf16, 4096, d), dict(BLOCK_R=2, BLOCK_D=1024), 4, 3))

    n_ada = 6 * 3 * d + d + 32
    off = dict(PROLOGUE=0, LN_W=False, LN_B=False, HAS_SHIFT=False, STAT_TILES_P2=1, HAS_BIAS=False,
               HAS_RBIAS=False, SILU_OUT=False, GATED_RESIDUAL=False, OUT_STATS=False, IEEE=False)
    for m, gd in ((128, torch.bfloat16), (1024, torch.bfloat16), (8192, torch.bfloat16), (1024, torch.float32)):
        g = _ptr(gd)

        def linear(name, a, out_t, n, k, gdt=gd, **flags):
            cfg = td.gemm_config(m, n, k, gdt)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            args = (a, k, 64, f32, 0, f32, 8, 128, 1e-6, f32, f32, g, g, n_ada, _ptr(gdt), 1, k, g, g, n_ada,
                    g, n_ada, f32, d, out_t, n, f32, m, n, k)
            return (f"head {name} M={m} {gd} {cfg}", td._head_linear_kernel, args,
                    dict(off, IEEE=gdt == torch.float32, **flags, **cfg), warps, stages)

        tiles_p2 = triton.next_power_of_2(triton.cdiv(d, td.gemm_config(m, d, d, gd)["BLOCK_N"]))
        out.append(linear("adaLN (SiLU(c + t) prologue)", f32, g, n_ada, d, PROLOGUE=1, HAS_BIAS=True))
        out.append(linear("input_proj (stats epilogue)", f32, f32, d, 16, gdt=torch.float32, HAS_BIAS=True,
                          OUT_STATS=True))
        out.append(linear("fc1 (LN-modulate prologue, SiLU)", f32, g, d, d, PROLOGUE=2, LN_W=True, LN_B=True,
                          HAS_SHIFT=True, STAT_TILES_P2=tiles_p2, HAS_BIAS=True, SILU_OUT=True))
        out.append(linear("fc2 (gated residual + stats)", g, f32, d, d, HAS_BIAS=True, GATED_RESIDUAL=True,
                          OUT_STATS=True))
        out.append(linear("final (LN prologue, row bias)", f32, g, 32, d, PROLOGUE=2, STAT_TILES_P2=tiles_p2,
                          HAS_RBIAS=True))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="*", type=int, default=[90, 80], help="compute capabilities (default 90 80)")
    args = p.parse_args(argv)
    print(f"triton {triton.__version__}")
    failures = 0
    for arch in args.arch:
        for name, kernel, kargs, consts, warps, stages in cases():
            t0 = time.perf_counter()
            try:
                k = compile_kernel(kernel, kargs, consts, arch, warps, stages)
            except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                failures += 1
                print(f"FAIL sm_{arch} {name}: {type(e).__name__}: {str(e)[:1500]}")
                continue
            smem = k.metadata.shared
            fits = smem <= _SMEM.get(arch, 101376)
            failures += not fits
            print(f"{'ok  ' if fits else 'SMEM'} sm_{arch} {name}: {smem} B shared, "
                  f"{time.perf_counter() - t0:.1f} s")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
