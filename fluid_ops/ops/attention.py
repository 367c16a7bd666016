"""`attention` and `attention_kvcache` (docs/contracts.md §2.1).

Numerical contract: exact for fp32 (fp32 scores, online softmax and accumulation; only the
summation order and the exp polynomial differ from the reference); fp16 / bf16 inputs are read
into fp32 and the output is rounded once, well inside the flash-attn 2x rule.

Custom ops: `fluid_ops::attention_fwd` -> (o, lse), `fluid_ops::attention_bwd` -> (dq, dk, dv)
(recomputes the probabilities from lse), `fluid_ops::attention_kvcache` (mutates the caches).
float64 inputs run on the reference backend only (for gradcheck); the compiled backends take
float32 / float16 / bfloat16.

Head dims: every D in 1..256 (MAX_HEAD_DIM). The compiled kernels (cpu, cuda, triton) are built
for HEAD_DIMS = (32, 64, 80, 96, 128); a smaller D that is not one of them is ZERO-PADDED to the
next of them (_padded_*): q, k and v get zero columns, the softmax scale stays that of the true D
(the public functions fix it before dispatch), so Q Kᵀ, the softmax and the first D output columns
are unchanged; the padded output columns are 0 and are sliced off (the backward likewise: the
padded dq / dk / dv columns are 0). That is exact, at the price of one copy of q, k and v. D in
(128, 256] has no kernel: the compiled backends' `supports` hooks decline it, and the reference
runs it (a forced compiled backend raises, as for any call it cannot run).
`attention_head_dims()` says which head dims each backend runs natively, padded or not at all.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from fluid_ops import _compiled, backend
from fluid_ops.ops._checks import FLOAT_DTYPES, check_finite_scalar, check_same_device, check_tensor
import importlib

ref = importlib.import_module("fluid_ops.reference.attention")  # the module (the package re-exports a function of that name)

__all__ = ["attention", "attention_kvcache", "attention_head_dims"]

FWD, BWD, KV = "attention_fwd", "attention_bwd", "attention_kvcache"
HEAD_DIMS = (32, 64, 80, 96, 128)  # the compiled kernels' head dims (see the module docstring)
MAX_HEAD_DIM = 256  # the largest D any backend takes (the reference; contracts.md §2.1)
_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- head dims that are not compiled: zero-padding (see the module docstring) ---------------
def _kernel_head_dim(d: int):
    """The compiled head dim a D runs at: D itself, the next of HEAD_DIMS for a smaller D, or None
    (D > max(HEAD_DIMS): no kernel)."""
    return next((n for n in HEAD_DIMS if n >= d), None)


def _head_dim_reason(d: int):
    if _kernel_head_dim(d) is None:
        return f"head dim {d} > {HEAD_DIMS[-1]} has no compiled kernel (the reference backend runs it)"
    return None


def _pad_d(t, dp):
    return t if t is None or t.shape[-1] == dp else torch.nn.functional.pad(t, (0, dp - t.shape[-1]))


def _padded_fwd(fn):
    """fn(q, k, v, *rest) -> (o, lse) on a kernel head dim, for any D <= max(HEAD_DIMS)."""
    def run(q, k, v, *rest):
        d = q.shape[3]
        dp = _kernel_head_dim(d)
        if dp == d:
            return fn(q, k, v, *rest)
        o, lse = fn(_pad_d(q, dp), _pad_d(k, dp), _pad_d(v, dp), *rest)
        return o[..., :d], lse
    return run


def _padded_bwd(fn):
    """fn(dout, q, k, v, o, lse, *rest) -> (dq, dk, dv), zero-padded like _padded_fwd."""
    def run(dout, q, k, v, o, lse, *rest):
        d = q.shape[3]
        dp = _kernel_head_dim(d)
        if dp == d:
            return fn(dout, q, k, v, o, lse, *rest)
        dq, dk, dv = fn(*(_pad_d(t, dp) for t in (dout, q, k, v, o)), lse, *rest)
        return dq[..., :d], dk[..., :d], dv[..., :d]
    return run


def _padded_kv(fn):
    """fn(q, k_cache, v_cache, k_new, v_new, cache_seqlens, ...) for any D <= max(HEAD_DIMS). With
    a padded D the new rows are written into the caller's caches first (in place, as the contract
    says), then the kernel reads zero-padded copies of the caches with k_new = v_new = None."""
    def run(q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal, softmax_scale):
        d = q.shape[3]
        dp = _kernel_head_dim(d)
        if dp == d:
            return fn(q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal, softmax_scale)
        nnew = _append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens)
        seqlens = cache_seqlens + nnew
        return fn(_pad_d(q, dp), _pad_d(k_cache, dp), _pad_d(v_cache, dp), None, None, seqlens, causal,
                  softmax_scale)[..., :d]
    return run


def attention_head_dims() -> dict[str, dict]:
    """Which head dims each backend runs (docs/contracts.md §2.1): {backend: {"native": dims the
    kernels are compiled for, "padded": "D < max(native) not in native, zero-padded to the next
    native dim (exact)", "max": the largest D it takes}}. The public ops take 1 <= D <= 256
    everywhere; a D a backend does not take runs on the next backend in the preference order
    (in the end the reference), or raises when that backend is forced."""
    compiled = {"native": HEAD_DIMS, "padded": f"D < {HEAD_DIMS[-1]} not in native: zero-padded to the next "
                f"native head dim (exact)", "max": HEAD_DIMS[-1]}
    return {"cuda": dict(compiled), "triton": dict(compiled), "cpu": dict(compiled),
            "reference": {"native": f"every D in 1..{MAX_HEAD_DIM}", "padded": None, "max": MAX_HEAD_DIM}}


backend.declare_limits("attention_head_dims", attention_head_dims())


# ---- backends ---------------------------------------------------------------------------
@backend.register(FWD, "reference")
def _fwd_reference(q, k, v, key_padding_mask, causal, softmax_scale):
    return ref.attention_with_lse(q, k, v, key_padding_mask=key_padding_mask, causal=causal,
                                  softmax_scale=softmax_scale)


@backend.register(BWD, "reference")
def _bwd_reference(dout, q, k, v, o, lse, key_padding_mask, causal, softmax_scale):
    return ref.attention_backward(dout, q, k, v, o, lse, key_padding_mask=key_padding_mask,
                                  causal=causal, softmax_scale=softmax_scale)


@backend.register(KV, "reference")
def _kv_reference(q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal, softmax_scale):
    return ref.attention_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                                 causal=causal, softmax_scale=softmax_scale)


_ISA_CODES = {"": 0, "auto": 0, "portable": 1, "avx2": 2, "avx512": 3, "avx512bf16": 5}


def _cpu_impl() -> int:
    """FLUID_OPS_CPU_ATTENTION_ISA=portable|avx2|avx512|avx512bf16 forces a compiled path (default:
    the fastest this CPU has, chosen at run time). avx512bf16 is avx512 plus, for bf16 inputs, a
    forward and backward with native bf16 dot products; avx512 runs bf16 inputs in fp32 arithmetic.
    `_compiled.cpu.attention_bwd_isa(dtype, d, impl)` names the backward a call takes."""
    name = os.environ.get("FLUID_OPS_CPU_ATTENTION_ISA", "").strip().lower()
    if name not in _ISA_CODES:
        raise ValueError("FLUID_OPS_CPU_ATTENTION_ISA must be one of portable, avx2, avx512, avx512bf16 "
                         f"(or unset), got {name!r}")
    return _ISA_CODES[name]


def _cpu_supports(q, *args, **kwargs):
    if q.dtype not in FLOAT_DTYPES:
        return f"dtype {q.dtype} is not supported by the CPU kernels (float32, float16, bfloat16)"
    return _head_dim_reason(q.shape[3])


def _unit_d(t):
    """The kernels take any strides but need unit stride along D (views of a fused QKV are fine)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _cpu_forward(q, k, v, key_padding_mask, seqlens_k, causal, softmax_scale, impl=None):
    q, k, v = _unit_d(q), _unit_d(k), _unit_d(v)
    b, nq, h, _ = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, h, nq, dtype=torch.float32)
    vw = _compiled.view
    _compiled.cpu.attention_fwd(vw(q), vw(k), vw(v), vw(key_padding_mask), vw(seqlens_k), vw(o), vw(lse),
                                causal, softmax_scale, _compiled.cpu_threads(), _cpu_impl() if impl is None else impl)
    return o, lse


@backend.register(FWD, "cpu", supports=_cpu_supports)
@_padded_fwd
def _fwd_cpu(q, k, v, key_padding_mask, causal, softmax_scale):
    return _cpu_forward(q, k, v, key_padding_mask, None, causal, softmax_scale)


@backend.register(BWD, "cpu", supports=lambda dout, q, *a, **kw: _cpu_supports(q))
@_padded_bwd
def _bwd_cpu(dout, q, k, v, o, lse, key_padding_mask, causal, softmax_scale):
    # locals keep every tensor (and any copy) alive until the kernel returns: a view is a raw pointer
    dout, q, k, v, o = (_unit_d(t) for t in (dout, q, k, v, o))
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.empty(k.shape, dtype=k.dtype)
    dv = torch.empty(v.shape, dtype=v.dtype)
    vw = _compiled.view
    _compiled.cpu.attention_bwd(vw(dout), vw(q), vw(k), vw(v), vw(o), vw(lse), vw(key_padding_mask),
                                vw(dq), vw(dk), vw(dv), causal, softmax_scale, _compiled.cpu_threads(), _cpu_impl())
    return dq, dk, dv


def _append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens):
    if k_new is None or k_new.shape[1] == 0:
        return 0
    b, nnew = k_new.shape[0], k_new.shape[1]
    rows = cache_seqlens.to(torch.int64).view(b, 1) + torch.arange(nnew, device=k_new.device).view(1, nnew)
    bidx = torch.arange(b, device=k_new.device).view(b, 1).expand(b, nnew)
    k_cache[bidx, rows] = k_new
    v_cache[bidx, rows] = v_new
    return nnew


@backend.register(KV, "cpu", supports=_cpu_supports)
@_padded_kv
def _kv_cpu(q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal, softmax_scale):
    nnew = _append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens)
    seqlens_k = (cache_seqlens.to(torch.int64) + nnew).contiguous()
    return _cpu_forward(q, k_cache, v_cache, None, seqlens_k, causal, softmax_scale)[0]


def _triton_kernels():
    """The Triton kernel module, imported on first use (importing it fixes whether its kernels are
    compiled for the GPU or interpreted: see fluid_ops.triton)."""
    return importlib.import_module("fluid_ops.triton.attention")


_TRITON_MAX_BATCH_HEADS = 65535  # B·H is the kernels' second grid axis


def _triton_supports(q, *args, **kwargs):
    if q.dtype not in FLOAT_DTYPES:
        return f"dtype {q.dtype} is not supported by the Triton kernels (float32, float16, bfloat16)"
    if q.shape[0] * q.shape[2] > _TRITON_MAX_BATCH_HEADS:
        return f"B·H = {q.shape[0] * q.shape[2]} > {_TRITON_MAX_BATCH_HEADS} (the kernels' grid limit)"
    if _head_dim_reason(q.shape[3]):
        return _head_dim_reason(q.shape[3])
    from fluid_ops import triton as fluid_triton
    return fluid_triton.run_reason(q.device, q.dtype)


@backend.register(FWD, "triton", supports=_triton_supports)
@_padded_fwd
def _fwd_triton(q, k, v, key_padding_mask, causal, softmax_scale):
    return _triton_kernels().forward(q, k, v, key_padding_mask, causal, softmax_scale)


@backend.register(BWD, "triton", supports=lambda dout, q, *a, **kw: _triton_supports(q))
@_padded_bwd
def _bwd_triton(dout, q, k, v, o, lse, key_padding_mask, causal, softmax_scale):
    return _triton_kernels().backward(dout, q, k, v, o, lse, key_padding_mask, causal, softmax_scale)


@backend.register(KV, "triton", supports=_triton_supports)
@_padded_kv
def _kv_triton(q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal, softmax_scale):
    return _triton_kernels().kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal, softmax_scale)


# ---- cuda: tensor-core kernels of fluid_ops._C_cuda (csrc/cuda/attention_*.cu) -------------
# fp16 / bf16 only (mma.sync m16n8k16, fp32 accumulate). fp32 is declined with a reason and runs
# on the Triton backend (IEEE fp32 dots), which keeps the op's exact-fp32 contract; a SIMT fp32
# path here would be slower than Triton's and is not worth its compile time. The backward has the
# Triton backend's two modes, chosen the same way (_cuda_deterministic_backward): deterministic
# (default: dk/dv pass + separate dq pass, no atomics) or atomic (FLUID_OPS_CUDA_ATTENTION_BWD=
# atomic: dq added with fp32 atomics inside the dk/dv pass), deterministic whenever
# torch.are_deterministic_algorithms_enabled().
# UNPROVEN: written and compiled on a machine without a GPU. What a GPU run must check first, in
# this order: (1) `pytest tests/test_attention_cuda.py` (the forward cases catch fragment-layout
# and tail-tile mistakes; test_padding_tiles_are_skipped the tile skipping; the backward cases the
# dk/dv and dq passes; it should take well under a minute); (2) the same under
# `compute-sanitizer --tool memcheck` (out-of-bounds reads at the ragged ends, cp.async alignment)
# and `--tool racecheck` (the __syncthreads around the shared K / V buffers); (3) the cuda rows
# of `python benchmarks/attention.py` (speed is unmeasured).
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_MAX_GRID_YZ = 65535  # H and B are the kernels' grid y / z axes


def _cuda_supports(q, *args, **kwargs):
    if q.dtype not in _CUDA_DTYPES:
        return (f"dtype {str(q.dtype).replace('torch.', '')} is not supported by the CUDA tensor-core kernels "
                f"(float16, bfloat16; float32 runs on the triton backend)")
    if _compiled.cuda is None or not hasattr(_compiled.cuda, "attention_fwd"):
        return "fluid_ops._C_cuda has no attention kernels (built before they existed?)"
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}, not cuda"
    b, nq, h, d = q.shape
    if _head_dim_reason(d):
        return _head_dim_reason(d)
    if b > _CUDA_MAX_GRID_YZ or h > _CUDA_MAX_GRID_YZ:
        return f"B = {b} or H = {h} > {_CUDA_MAX_GRID_YZ} (the kernels' grid limit)"
    if torch.cuda.get_device_capability(q.device)[0] < 8:
        return "needs compute capability 8.0+ (mma.sync with bf16, cp.async, ldmatrix)"
    return None


def _cuda_rows(t):
    """The kernels move 16-byte chunks: unit stride along D, a 16-byte aligned pointer and strides
    along B / N / H in multiples of 8 elements (any view of a fused QKV with D in HEAD_DIMS
    qualifies); anything else is copied."""
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        st % 8 == 0 for st, n in zip(t.stride()[:3], t.shape[:3]) if n > 1)
    return t if ok else t.contiguous()


def _cuda_tile_any(mask):
    """(B, ceil(Nk / tile)) bool on the device: key tile t of batch b holds an attendable key. The
    kernels skip the other tiles (never load them); computed by torch ops, no host sync."""
    if mask is None:
        return None
    tile = _compiled.cuda.attention_tile_n
    b, nk = mask.shape
    n_tiles = -(-nk // tile)
    padded = mask.new_zeros(b, n_tiles * tile)
    padded[:, :nk] = mask
    return padded.view(b, n_tiles, tile).any(-1)


def _cuda_deterministic_backward() -> bool:
    """FLUID_OPS_CUDA_ATTENTION_BWD=atomic picks the atomic dq unless torch's deterministic
    algorithms are switched on; otherwise (default) the deterministic passes."""
    mode = os.environ.get("FLUID_OPS_CUDA_ATTENTION_BWD", "deterministic").strip().lower()
    if mode not in ("deterministic", "atomic"):
        raise ValueError(f"FLUID_OPS_CUDA_ATTENTION_BWD must be 'deterministic' or 'atomic', got {mode!r}")
    return mode == "deterministic" or torch.are_deterministic_algorithms_enabled()


def _cuda_device(t):
    return torch.cuda.device(t.device)


def _cuda_forward(q, k, v, key_padding_mask, seqlens_k, causal, softmax_scale):
    q, k, v = _cuda_rows(q), _cuda_rows(k), _cuda_rows(v)
    b, nq, h, _ = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    tile_any = _cuda_tile_any(key_padding_mask)
    vw = _compiled.view
    with _cuda_device(q):
        _compiled.cuda.attention_fwd(vw(q), vw(k), vw(v), vw(key_padding_mask), vw(tile_any), vw(seqlens_k),
                                     vw(o), vw(lse), causal, softmax_scale, _compiled.cuda_stream(q.device))
    return o, lse


@backend.register(FWD, "cuda", supports=_cuda_supports)
@_padded_fwd
def _fwd_cuda(q, k, v, key_padding_mask, causal, softmax_scale):
    return _cuda_forward(q, k, v, key_padding_mask, None, causal, softmax_scale)


@backend.register(BWD, "cuda", supports=lambda dout, q, *a, **kw: _cuda_supports(q))
@_padded_bwd
def _bwd_cuda(dout, q, k, v, o, lse, key_padding_mask, causal, softmax_scale):
    return _cuda_backward(dout, q, k, v, o, lse, key_padding_mask, causal, softmax_scale)


def _cuda_backward(dout, q, k, v, o, lse, key_padding_mask, causal, softmax_scale, deterministic=None):
    if deterministic is None:
        deterministic = _cuda_deterministic_backward()
    # locals keep every tensor (and any copy) alive until the kernels are enqueued
    dout, q, k, v, o = (_cuda_rows(t) for t in (dout, q, k, v, o))
    lse = lse.contiguous()
    dev = q.device
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=dev)
    lse2 = torch.empty_like(delta)
    tile_any = _cuda_tile_any(key_padding_mask)
    dq_accum = None if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=dev)
    vw = _compiled.view
    with _cuda_device(q):
        _compiled.cuda.attention_bwd(vw(dout), vw(q), vw(k), vw(v), vw(o), vw(lse), vw(key_padding_mask),
                                     vw(tile_any), vw(dq), vw(dk), vw(dv), vw(delta), vw(lse2), vw(dq_accum),
                                     causal, softmax_scale, _compiled.cuda_stream(dev))
    if dq_accum is not None:
        dq.copy_(dq_accum)
    return dq, dk, dv


@backend.register(KV, "cuda", supports=_cuda_supports)
@_padded_kv
def _kv_cuda(q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal, softmax_scale):
    # append with torch indexing on the device (no host sync), then one forward launch over each
    # batch's first cache_seqlens[b] + Nnew rows (lengths read on the device)
    nnew = _append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens)
    seqlens_k = (cache_seqlens.to(torch.int32) + nnew).contiguous()
    return _cuda_forward(q, k_cache, v_cache, None, seqlens_k, causal, softmax_scale)[0]


# ---- custom ops -------------------------------------------------------------------------
def _empty_fwd(q, k):
    b, nq, h, _ = q.shape
    o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((b, h, nq), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
    return o, lse


@torch.library.custom_op("fluid_ops::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                   causal: bool, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if q.numel() == 0 or k.shape[1] == 0:  # empty batch / no queries / no keys (every row masked: 0)
        return _empty_fwd(q, k)
    o, lse = backend.dispatch(FWD, q.device, q, k, v, key_padding_mask, causal, softmax_scale)
    return o.contiguous(), lse


@_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, causal, softmax_scale):
    b, nq, h, _ = q.shape
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty((b, h, nq), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("fluid_ops::attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], causal: bool,
                   softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq, dk, dv = backend.dispatch(BWD, q.device, dout, q, k, v, o, lse, key_padding_mask, causal, softmax_scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_bwd.register_fake
def _(dout, q, k, v, o, lse, key_padding_mask, causal, softmax_scale):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, softmax_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
    if do is None:
        return None, None, None, None, None, None
    dq, dk, dv = torch.ops.fluid_ops.attention_bwd(do, q, k, v, o, lse, key_padding_mask, ctx.causal,
                                                   ctx.softmax_scale)
    return dq, dk, dv, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fluid_ops::attention_kvcache", mutates_args=("k_cache", "v_cache"))
def _attention_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: Optional[torch.Tensor],
                       v_new: Optional[torch.Tensor], cache_seqlens: torch.Tensor, causal: bool,
                       softmax_scale: float) -> torch.Tensor:
    if q.shape[0] == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[1] == 0:  # no queries: only the append (checked by the public op), no kernel
        if k_new is not None and k_new.shape[1] > 0:
            idx = (cache_seqlens.to(torch.int64)[:, None]
                   + torch.arange(k_new.shape[1], device=q.device)[None, :])[:, :, None, None]
            k_cache.scatter_(1, idx.expand(k_new.shape), k_new)
            v_cache.scatter_(1, idx.expand(v_new.shape), v_new)
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return backend.dispatch(KV, q.device, q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal,
                            softmax_scale).contiguous()


@_attention_kvcache.register_fake
def _(q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal, softmax_scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# ---- checks -----------------------------------------------------------------------------
def _check_qkv(op, q, k, v, *, kname="k", vname="v"):
    check_tensor(op, "q", q, ndim=4, dtypes=_DTYPES)
    b, nq, h, d = q.shape
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim D = q.shape[3] must be in 1..{MAX_HEAD_DIM}, got {d}")
    check_tensor(op, kname, k, ndim=4, dtypes=_DTYPES)
    check_tensor(op, vname, v, ndim=4, dtypes=_DTYPES)
    for name, t in ((kname, k), (vname, v)):
        if t.shape[0] != b or t.shape[2] != h or t.shape[3] != d:
            raise ValueError(f"{op}: {name} must have shape ({b}, *, {h}, {d}) (batch, heads and head dim "
                             f"of q), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {str(q.dtype).replace('torch.', '')}, "
                            f"got {str(t.dtype).replace('torch.', '')}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"{op}: {vname} must have shape {tuple(k.shape)} (that of {kname}), got {tuple(v.shape)}")


def _check_scale(op, softmax_scale, d):
    if softmax_scale is None:
        return d ** -0.5
    f = check_finite_scalar(op, "softmax_scale", softmax_scale, min_value=0.0, min_inclusive=False)
    if f > _FP32_MAX:  # kernels take the scale as a float32: a finite double above this would become inf
        raise ValueError(f"{op}: softmax_scale must be at most {_FP32_MAX:.6g} (the largest float32; scores are "
                         f"scaled in float32), got {softmax_scale}")
    return f


_FP32_MAX = float(torch.finfo(torch.float32).max)


def _check_cache_writable(op, name, t):
    """A cache written in place must own each of its elements and must not be a leaf that needs a
    gradient (docs/contracts.md §3)."""
    if torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(f"{op}: {name} has elements that share memory (an expanded or stride-0 view, strides "
                         f"{tuple(t.stride())}); it is written in place: pass a tensor that owns its rows "
                         "(e.g. .clone())")
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{op}: {name} requires grad and is written in place; call under torch.no_grad() or "
                           "pass a cache that does not require grad")


def _check_causal(op, causal):
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")


# ---- public API -------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
              causal: bool = False, softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ · scale + mask) V (docs/contracts.md §2.1), differentiable in q, k, v.

    q (B, Nq, H, D), k / v (B, Nk, H, D), any D in 1..256 (compiled kernels for 32, 64, 80, 96,
    128; a smaller D is zero-padded to one of them, a larger one runs on the reference: see
    attention_head_dims()), float32 / float16 /
    bfloat16 (float64 on the reference backend). Views with unit stride along D (e.g. slices of
    a fused QKV projection) are read in place. key_padding_mask (B, Nk) bool, True = may be
    attended. causal: query i attends key j iff j <= i + Nk - Nq (bottom-right). softmax_scale
    defaults to D ** -0.5. A row with no attendable key returns 0 and gets 0 gradient.
    Contract: exact in fp32; rounding-level (one output rounding) in fp16 / bf16."""
    op = "attention"
    _check_qkv(op, q, k, v)
    b, nk = k.shape[0], k.shape[1]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"{op}: key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{op}: key_padding_mask must have dtype bool (True = may attend), "
                            f"got {str(key_padding_mask.dtype).replace('torch.', '')}")
        check_tensor(op, "key_padding_mask", key_padding_mask, shape=(b, nk))
    _check_causal(op, causal)
    scale = _check_scale(op, softmax_scale, q.shape[3])
    check_same_device(op, q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    return torch.ops.fluid_ops.attention_fwd(q, k, v, key_padding_mask, causal, scale)[0]


def attention_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor | None = None,
                      v_new: torch.Tensor | None = None, *, cache_seqlens: torch.Tensor, causal: bool = True,
                      softmax_scale: float | None = None) -> torch.Tensor:
    """Decode step with a preallocated KV cache, in one call (docs/contracts.md §2.1, last bullet).

    k_cache / v_cache (B, Nmax, H, D); cache_seqlens (B,) int32 / int64, each batch's filled
    length before this call; k_new / v_new (B, Nnew, H, D) or None. Writes k_new / v_new IN PLACE
    into rows [cache_seqlens[b], cache_seqlens[b] + Nnew) of the caches, then returns attention of
    q (B, Nq, H, D) over the first cache_seqlens[b] + Nnew rows of batch b (causal: bottom-right
    relative to that length, so one query attends the whole valid prefix). Forward only.
    The caller advances cache_seqlens by Nnew. Contract: as `attention`."""
    op = "attention_kvcache"
    _check_qkv(op, q, k_cache, v_cache, kname="k_cache", vname="v_cache")
    b, nmax = k_cache.shape[0], k_cache.shape[1]
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{op}: k_new and v_new must both be given or both be None, got "
                         f"k_new={'None' if k_new is None else 'a tensor'}, v_new={'None' if v_new is None else 'a tensor'}")
    nnew = 0
    if k_new is not None:
        _check_qkv(op, q, k_new, v_new, kname="k_new", vname="v_new")
        nnew = k_new.shape[1]
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"{op}: cache_seqlens must be a torch.Tensor of shape ({b},), got {type(cache_seqlens).__name__}")
    check_tensor(op, "cache_seqlens", cache_seqlens, shape=(b,), dtypes=(torch.int32, torch.int64))
    _check_causal(op, causal)
    scale = _check_scale(op, softmax_scale, q.shape[3])
    check_same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new, cache_seqlens=cache_seqlens)
    if nnew > 0:
        _check_cache_writable(op, "k_cache", k_cache)
        _check_cache_writable(op, "v_cache", v_cache)
        if (k_cache.data_ptr() == v_cache.data_ptr() and k_cache.stride() == v_cache.stride()
                and k_cache.numel() > 0):
            raise ValueError(f"{op}: k_cache and v_cache are the same memory; they need separate buffers")
    if b > 0:
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0:
            raise ValueError(f"{op}: cache_seqlens must be >= 0, got min {lo}")
        if hi + nnew > nmax:
            raise ValueError(f"{op}: appending {nnew} rows would overflow the cache: cache_seqlens max {hi} + "
                             f"{nnew} > Nmax = {nmax} (k_cache.shape[1])")
    return torch.ops.fluid_ops.attention_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal, scale)
