"""Triton kernels of the sampling ops: `ddpm_step` (docs/contracts.md §2.3) and `sample_categorical` (§2.4).

Both are registered as the `triton` backend of the existing custom ops (fluid_ops.ops.ddpm,
fluid_ops.ops.categorical); the functions here take already-checked arguments.

* `ddpm_step`: one elementwise kernel. The schedule table stays on the device; the step index is
  a kernel argument (a Python int) or read by the kernel from a one-element integer device tensor,
  so a loop can be captured in a CUDA graph and replayed with a step counter kept on the device.
  Contract: exact (fp32 arithmetic of the reference; exp and a few contracted multiply-adds may
  round differently).
* `sample_categorical`: ROWS rows per program (many for a small V, one for a large V), each row
  held in registers when it fits one chunk of BLOCK_V and streamed chunk by chunk otherwise (any
  V; 2048-element tiles on a GPU). Thresholds are found by bisection instead of a sort: every s = (x - max) / T is <= 0, so the
  integer bits of |s| order the tokens, and 31 halvings of [0, bits(+inf)] find the k-th largest
  s (top-k: the smallest bit pattern A with #{|s| <= A} >= k) and the top-p cut (the smallest A
  whose kept weight sum reaches p * Z1). Both land exactly on a value present in the row, which
  is what the reference's sort-and-cumsum finds, ties included. Weights and sums are float64 as
  in the reference; only the order of the float64 sums differs, so indices agree except when a
  uniform (or the top-p target) is within ~1e-15 of a CDF boundary. The division by T uses
  IEEE round-to-nearest (`div_rn`) so s is bit-identical to the reference's.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fluid_ops.triton._lang import reduce_max, reduce_min, reduce_sum, scan_sum
from fluid_ops.triton._util import interpreting

# @triton.jit chose at import time between compiling and interpreting these kernels.
INTERPRETED = interpreting()

__all__ = ["ddpm_step", "sample_categorical"]


# ---- ddpm_step --------------------------------------------------------------------------------
@triton.jit
def _ddpm_step_kernel(x_ptr, mo_ptr, noise_ptr, table_ptr, step_ptr, params_ptr, out_ptr, n, c, step,
                      temperature, cfg, GUIDED: tl.constexpr, STEP_FROM_PTR: tl.constexpr,
                      PARAMS_FROM_PTR: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n * c
    row = offs // c
    col = offs - row * c
    if STEP_FROM_PTR:
        cur = tl.load(step_ptr).to(tl.int32)
    else:
        cur = step
    if PARAMS_FROM_PTR:  # [temperature, cfg] in a float32 device tensor (a graph replays any value)
        temperature = tl.load(params_ptr)
        cfg = tl.load(params_ptr + 1)
    coef = table_ptr + cur * 6
    c1 = tl.load(coef)
    c2 = tl.load(coef + 1)
    a = tl.load(coef + 2)
    b = tl.load(coef + 3)
    min_log = tl.load(coef + 4)
    max_log = tl.load(coef + 5)
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(mo_ptr + row * 2 * c + col, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:  # rows n..2n-1 of model_out are the unconditional half
        eps_u = tl.load(mo_ptr + (row + n) * 2 * c + col, mask=mask, other=0.0).to(tl.float32)
        eps = eps_u + cfg * (eps - eps_u)
    v = tl.load(mo_ptr + row * 2 * c + c + col, mask=mask, other=0.0).to(tl.float32)
    frac = (v + 1.0) * 0.5
    logvar = frac * max_log + (1.0 - frac) * min_log
    xstart = a * xv - b * eps
    if CLIP:  # clamp to [-1, 1] as torch.clamp does (NaN stays NaN)
        xstart = tl.where(xstart < -1.0, -1.0, tl.where(xstart > 1.0, 1.0, xstart))
    out = c1 * xstart + c2 * xv
    noise = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    noisy = out + tl.exp(0.5 * logvar) * temperature * noise
    out = tl.where(cur > 0, noisy, out)  # the last step (index 0) adds no noise
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def ddpm_step(x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor, table: torch.Tensor,
              step, temperature: float, cfg: float, out: torch.Tensor | None = None,
              params: torch.Tensor | None = None, clip_denoised: bool = False) -> torch.Tensor:
    """x_{t-1} for checked arguments (see fluid_ops.ddpm_step). `step` is a Python int or a
    one-element integer tensor on x's device (read by the kernel: no host sync, graph-capturable).
    `out` (N, C) in x's dtype may be given (e.g. a buffer a CUDA graph reuses). `params`: a
    (2,) float32 tensor on x's device holding [temperature, cfg], read by the kernel instead of
    the two scalar arguments."""
    x, model_out, noise, table = (t.contiguous() for t in (x, model_out, noise, table))
    n, c = x.shape
    if out is None:
        out = torch.empty_like(x)
    if n * c == 0:
        return out
    from_ptr = isinstance(step, torch.Tensor)
    step_t = step if from_ptr else table  # any pointer when unused
    block = 1024
    grid = (triton.cdiv(n * c, block),)
    _ddpm_step_kernel[grid](x, model_out, noise, table, step_t, table if params is None else params, out, n, c,
                            0 if from_ptr else int(step), float(temperature), float(cfg),
                            GUIDED=model_out.shape[0] == 2 * n, STEP_FROM_PTR=from_ptr,
                            PARAMS_FROM_PTR=params is not None, CLIP=bool(clip_denoised), BLOCK=block)
    return out


# ---- sample_categorical -------------------------------------------------------------------------
@triton.jit
def _row_chunk(base, start, cols, row_ok, V, m, temperature):
    """One chunk of ROWS rows: (a, w, valid) with s = (x - m) / T in float32 with IEEE division
    (the reference's s, bit for bit), a = the int32 bits of |s| (monotone in |s|, both zeros 0;
    out-of-range lanes get a = INT32_MAX, above every threshold) and w = exp(float64(s))."""
    valid = row_ok[:, None] & (start + cols < V)
    x = tl.load(base + start + cols, mask=valid, other=float("-inf")).to(tl.float32)
    s = tl.math.div_rn(x - m, temperature)
    a = tl.where(valid, s.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 2147483647)
    w = tl.where(valid, tl.exp(s.to(tl.float64)), 0.0)
    return a, w, valid


@triton.jit
def _mass_below(base, cols, row_ok, V, m, temperature, a0, w0, bound, COUNT: tl.constexpr,
                SINGLE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row: #{tokens with |s| bits <= bound} (COUNT) or their float64 weight sum. SINGLE: the
    row fits one chunk, already in registers as (a0, w0); otherwise it is streamed again."""
    if SINGLE:
        sel = a0 <= bound[:, None]
        if COUNT:
            total = reduce_sum(sel.to(tl.int32), 1)
        else:
            total = reduce_sum(tl.where(sel, w0, 0.0), 1)
    else:
        if COUNT:
            acc = tl.full(a0.shape, 0, tl.int32)
        else:
            acc = tl.full(a0.shape, 0, tl.float64)
        for start in range(0, V, BLOCK_V):
            a, w, valid = _row_chunk(base, start, cols, row_ok, V, m, temperature)
            sel = a <= bound[:, None]
            if COUNT:
                acc += sel.to(tl.int32)
            else:
                acc += tl.where(sel, w, 0.0)
        total = reduce_sum(acc, 1)
    return total


@triton.jit
def _smallest_bound(base, cols, row_ok, V, m, temperature, a0, w0, hi, target, COUNT: tl.constexpr,
                    SINGLE: tl.constexpr, BLOCK_V: tl.constexpr):
    """The smallest bit pattern A in [0, hi] with _mass_below(A) >= target, per row, by 31
    halvings (hi < 2^31). The mass only steps up at bit patterns present in the row, so A is
    the |s| of a token: the k-th largest s for counts, the top-p cut for weights."""
    lo = tl.full(hi.shape, 0, tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        ok = _mass_below(base, cols, row_ok, V, m, temperature, a0, w0, mid, COUNT, SINGLE, BLOCK_V) >= target
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid + 1)
    return hi


@triton.jit
def _categorical_kernel(logits_ptr, stride_row, u_ptr, top_p_ptr, out_ptr, N, V, temperature, top_k,
                        ARGMAX: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                        SINGLE: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """ROWS rows per program (small V: more work per program, and the bisections of all of them
    run at once), each in chunks of BLOCK_V columns; SINGLE (V <= BLOCK_V) keeps the row in
    registers for the whole kernel."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    base = logits_ptr + rows.to(tl.int64)[:, None] * stride_row
    cols = tl.arange(0, BLOCK_V)[None, :]
    big = 2147483647

    # pass 1: the row max
    mvec = tl.full([ROWS, BLOCK_V], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=row_ok[:, None] & (start + cols < V), other=float("-inf"))
        mvec = tl.maximum(mvec, x.to(tl.float32))
    m = tl.where(row_ok, reduce_max(mvec, 1), 0.0)[:, None]  # rows past N: 0, not -inf (no inf - inf)

    if ARGMAX:  # temperature 0: the first index of the max
        best = tl.full([ROWS, BLOCK_V], big, tl.int32)
        for start in range(0, V, BLOCK_V):
            valid = row_ok[:, None] & (start + cols < V)
            x = tl.load(base + start + cols, mask=valid, other=float("-inf")).to(tl.float32)
            best = tl.minimum(best, tl.where(valid & (x == m), start + cols, big))
        tl.store(out_ptr + rows, reduce_min(best, 1).to(tl.int64), mask=row_ok)
    else:
        a0, w0, valid0 = _row_chunk(base, 0, cols, row_ok, V, m, temperature)
        # top-k: K1 = {|s| bits <= kbits}, kbits the k-th largest s (ties all kept)
        thr = tl.full([ROWS], 0x7F800000, tl.int32)  # bits of +inf: everything
        if TOP_K:
            thr = _smallest_bound(base, cols, row_ok, V, m, temperature, a0, w0, thr, top_k, True, SINGLE, BLOCK_V)
        if TOP_P:  # K2 = the smallest most-probable set of K1 reaching p * Z1, ties of the last kept
            z1 = _mass_below(base, cols, row_ok, V, m, temperature, a0, w0, thr, False, SINGLE, BLOCK_V)
            target = tl.load(top_p_ptr) * z1
            thr = _smallest_bound(base, cols, row_ok, V, m, temperature, a0, w0, thr, target, False, SINGLE, BLOCK_V)
        # the inverse CDF over kept tokens, in index order: the first j with C_j > u * Z
        z = _mass_below(base, cols, row_ok, V, m, temperature, a0, w0, thr, False, SINGLE, BLOCK_V)
        target = (tl.load(u_ptr + rows, mask=row_ok, other=0.0) * z)[:, None]
        running = tl.full([ROWS], 0, tl.float64)
        first = tl.full([ROWS], big, tl.int32)
        last_pos = tl.full([ROWS], -1, tl.int32)
        for start in range(0, V, BLOCK_V):
            a, w, valid = _row_chunk(base, start, cols, row_ok, V, m, temperature)
            w = tl.where(a <= thr[:, None], w, 0.0)
            cdf = running[:, None] + scan_sum(w, 1)
            idx = start + cols
            first = tl.minimum(first, reduce_min(tl.where(valid & (cdf > target), idx, big), 1))
            last_pos = tl.maximum(last_pos, reduce_max(tl.where(w > 0.0, idx, -1), 1))
            running = running + reduce_sum(w, 1)
        # rounding can leave u * Z at Z: then the last kept token with weight
        pick = tl.where(first < big, first, last_pos)
        tl.store(out_ptr + rows, pick.to(tl.int64), mask=row_ok)


def sample_categorical(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_k: int | None,
                       top_p: float | None, *, block_v: int | None = None) -> torch.Tensor:
    """Indices (N,) int64 for checked arguments (see fluid_ops.sample_categorical). `block_v`
    (a power of two >= 16) overrides the chunk width, e.g. to test the multi-chunk path."""
    n, v = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    if v > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    uniform = uniform.to(torch.float64).contiguous()
    t32 = float(np.float32(temperature))  # the reference applies T in float32
    use_k = top_k is not None and top_k < v
    use_p = top_p is not None and top_p < 1.0
    # top_p enters the float64 target p * Z1: a float kernel argument would be float32, so it
    # travels in a device scalar (a fill kernel, not a host-to-device copy)
    p_t = torch.full((1,), float(top_p), dtype=torch.float64, device=logits.device) if use_p else uniform
    # Tile of ROWS x BLOCK_V: a GPU keeps it in registers (<= 2048 elements, float64 sums
    # included); the interpreter pays per operation, not per element, so it takes big tiles.
    tile = 65536 if INTERPRETED else 2048
    block = block_v or min(tile, max(16, triton.next_power_of_2(v)))
    rows = max(1, min(tile // block, triton.next_power_of_2(n), 4096 if INTERPRETED else 64))
    _categorical_kernel[(triton.cdiv(n, rows),)](
        logits, logits.stride(0), uniform, p_t, out, n, v, t32, int(top_k) if use_k else 0,
        ARGMAX=t32 == 0.0, TOP_K=use_k, TOP_P=use_p, SINGLE=v <= block, ROWS=rows, BLOCK_V=block,
        num_warps=4 if block * rows <= 1024 else 8)
    return out
