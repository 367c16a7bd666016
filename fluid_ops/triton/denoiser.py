"""Triton kernels of the diffusion head (docs/contracts.md §2.2): the fused-op kernels and the fused head forward.

Fused ops (registered as the `triton` backend of fluid_ops.ops.denoiser's custom ops):
`layernorm_modulate` (one tile of rows per program, LN statistics in fp32, two-pass variance),
`gated_residual`, and both backwards (`layernorm_modulate_backward` writes per-program partial
column sums of the weight / bias gradients, summed on the host side in a fixed order).

The fused head forward (`FusedHeadStep`, used by `DenoiserSampler` on CUDA tensors and, when
triton is forced, under the interpreter on CPU tensors; `head_forward` for any (x, t, c)):

* GEMMs are Triton `tl.dot` kernels with fp32 accumulation, not cuBLAS / cuBLASLt: the point is
  to fuse what sits around each GEMM, which a library GEMM cannot take (cuBLASLt epilogues stop
  at bias + activation and have no prologue), and Triton keeps the package free of a compiled
  GPU GEMM dependency (the wheel builds and imports without a GPU). One kernel,
  `_head_linear_kernel`, with compile-time switches for its prologue and epilogue:
  - prologue SILU_ADD: A = SiLU(cemb + temb) computed while loading (y never materialises);
  - prologue LN_MODULATE: A = (LN(h) * w + b) * (1 + scale) + shift, with the row mean / rstd
    combined (Chan et al.'s pairwise formula) from per-tile (mean, M2) partials that the GEMM
    which wrote h left behind, so no separate statistics pass over h is needed;
  - epilogue: + bias (vector) and / or + a bias matrix, SiLU, `res + gate * acc` (the gated
    residual, in place on the fp32 residual stream) and the (mean, M2) partials of what it
    stored, for the next LN prologue.
* One step of the sampler is then 1 launch for ALL adaLN linears (every block's shift / scale /
  gate and the final layer's scale, with the final shift folded through the output linear, as
  `_SamplingWeights` lays them out), 1 for the input projection (CFG's [x; x] read as x's rows
  modulo N, no copy), 2 per ResBlock (LN-modulate -> fc1 + SiLU; fc2 + gate + residual) and 1
  for the final layer: 3 + 2 * blocks launches (15 for MAR-B), plus the ddpm_step kernel. From
  SPLIT_PROLOGUE_MIN_ROWS rows on (compute-bound GEMMs) the two prologues run instead as one
  row kernel each, once per row rather than once per column tile (`_Chain`, `prologue_mode`).
* Tile configs are fixed heuristics per shape (`gemm_config`), not autotuned: autotuning
  benchmarks at the first call, which a CUDA-graph capture cannot contain, and whichever config
  writes h fixes the width of the LN partials its consumers read.
* Dtypes: the GEMM operands are in the sampler's gemm dtype (bf16 / fp16 / fp32; fp32 uses
  `input_precision="ieee"`, no TF32), accumulation fp32, the residual stream h fp32.
  Contract: exact in fp32 (up to summation order, and the fold of the final shift),
  rounding-level with bf16 / fp16 GEMMs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fluid_ops.triton._lang import cdiv, reduce_sum, sigmoid
from fluid_ops.triton._util import MAX_ROW_WIDTH, interpreting  # noqa: F401 (MAX_ROW_WIDTH re-exported)

# @triton.jit chose at import time between compiling and interpreting these kernels.
INTERPRETED = interpreting()

__all__ = ["layernorm_modulate", "gated_residual", "layernorm_modulate_backward", "gated_residual_backward",
           "silu_add", "FusedHeadStep", "head_forward", "gemm_config", "prologue_mode", "MAX_ROW_WIDTH"]


def _row_tiles(r: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for the row kernels: whole rows, several per program when
    they are short (a GPU holds <= 4096 elements per program; the interpreter pays per operation,
    not per element, so it takes up to 64K)."""
    block_d = triton.next_power_of_2(max(d, 1))
    budget = 65536 if INTERPRETED else 4096
    block_r = max(1, min(budget // block_d, triton.next_power_of_2(max(r, 1)), 64))
    warps = 4 if block_r * block_d <= 2048 else (8 if block_r * block_d <= 8192 else 16)
    return block_r, block_d, warps


# ---- layernorm_modulate ------------------------------------------------------------------------
@triton.jit
def _ln_rows(x_ptr, stride_x, rows64, r_ok, cols, c_ok, D, eps):
    """x's rows as fp32 (BLOCK_R, BLOCK_D) with their mean, rstd and xhat = (x - mean) * rstd
    (0 in masked lanes). Two passes over registers: the variance of centred values."""
    mask = r_ok[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = reduce_sum(x, 1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(reduce_sum(xc * xc, 1) / D + eps)
    return mask, xc * rstd[:, None], rstd


@triton.jit
def _lnm_kernel(x_ptr, stride_x, shift_ptr, stride_shift, scale_ptr, stride_scale, w_ptr, b_ptr, out_ptr, stride_out,
                R, D, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    r_ok = rows < R
    c_ok = cols < D
    rows64 = rows.to(tl.int64)
    mask, n, rstd = _ln_rows(x_ptr, stride_x, rows64, r_ok, cols, c_ok, D, eps)
    if HAS_W:
        n = n * tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        n = n + tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(scale_ptr + rows64[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = n * (1.0 + scale)
    if HAS_SHIFT:
        out += tl.load(shift_ptr + rows64[:, None] * stride_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _unit_cols(t):
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def layernorm_modulate(x, shift, scale, weight, bias, eps, out):
    """out[:] = LN(x) * (1 + scale) + shift for checked (R, D) arguments (shift / scale may be
    row-broadcast views; shift None: no shift); out (R, D) any float dtype, unit column stride."""
    x, shift, scale = _unit_cols(x), _unit_cols(shift), _unit_cols(scale)
    r, d = x.shape
    if r * d == 0:
        return out
    block_r, block_d, warps = _row_tiles(r, d)
    _lnm_kernel[(triton.cdiv(r, block_r),)](
        x, x.stride(0), shift if shift is not None else scale, (shift if shift is not None else scale).stride(0),
        scale, scale.stride(0), weight if weight is not None else x, bias if bias is not None else x, out,
        out.stride(0), r, d, float(eps), HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_SHIFT=shift is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return out


@triton.jit
def _lnm_bwd_kernel(x_ptr, stride_x, scale_ptr, stride_scale, g_ptr, stride_g, w_ptr, b_ptr, gx_ptr, gs_ptr,
                    pw_ptr, pb_ptr, R, D, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Each program walks row tiles pid, pid + P, ...; grad_x and grad_scale per row, and the
    program's partial column sums of dn * xhat (weight) and dn (bias) into row pid of pw / pb."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    else:
        w = 1.0
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    else:
        b = 0.0
    acc_w = tl.full([BLOCK_D], 0, tl.float32)
    acc_b = tl.full([BLOCK_D], 0, tl.float32)
    for tile in range(pid, cdiv(R, BLOCK_R), tl.num_programs(0)):
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rows < R
        rows64 = rows.to(tl.int64)
        mask, xhat, rstd = _ln_rows(x_ptr, stride_x, rows64, r_ok, cols, c_ok, D, eps)
        g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + rows64[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gscale = g * (xhat * w + b)
        dn = g * (1.0 + sc)
        acc_w += reduce_sum(dn * xhat, 0)
        acc_b += reduce_sum(dn, 0)
        dxh = dn * w
        mean1 = reduce_sum(dxh, 1) / D
        mean2 = reduce_sum(dxh * xhat, 1) / D
        gx = rstd[:, None] * (dxh - mean1[:, None] - xhat * mean2[:, None])
        tl.store(gx_ptr + rows64[:, None] * D + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gs_ptr + rows64[:, None] * D + cols[None, :], gscale.to(gs_ptr.dtype.element_ty), mask=mask)
    tl.store(pw_ptr + pid * D + cols, acc_w, mask=c_ok)
    tl.store(pb_ptr + pid * D + cols, acc_b, mask=c_ok)


def layernorm_modulate_backward(x, scale, grad, weight, bias, eps):
    """(grad_x, grad_scale, grad_weight, grad_bias) as fluid_ops' layernorm_modulate_backward:
    the last two float32 column sums."""
    x, scale, grad = _unit_cols(x), _unit_cols(scale), _unit_cols(grad)
    r, d = x.shape
    gx = torch.empty((r, d), dtype=x.dtype, device=x.device)
    gs = torch.empty((r, d), dtype=scale.dtype, device=x.device)
    block_r, block_d, warps = _row_tiles(r, d)
    tiles = triton.cdiv(r, block_r)
    # enough programs to fill a GPU, few enough that the partial sums stay small
    programs = max(1, min(tiles, 4 if INTERPRETED else 512))
    pw = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    pb = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    _lnm_bwd_kernel[(programs,)](
        x, x.stride(0), scale, scale.stride(0), grad, grad.stride(0),
        weight if weight is not None else x, bias if bias is not None else x, gx, gs, pw, pb,
        r, d, float(eps), HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=warps)
    return gx, gs, pw.sum(0), pb.sum(0)


# ---- gated_residual ---------------------------------------------------------------------------
@triton.jit
def _gated_residual_kernel(h_ptr, stride_h, gate_ptr, stride_gate, y_ptr, stride_y, out_ptr, stride_out, R, D,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
    mask = (rows < R) & (cols < D)
    h = tl.load(h_ptr + rows * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_out + cols, (h + g * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(g_ptr, stride_g, gate_ptr, stride_gate, y_ptr, stride_y, ggate_ptr, gy_ptr, R, D,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
    mask = (rows < R) & (cols < D)
    g = tl.load(g_ptr + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(ggate_ptr + rows * D + cols, (g * y).to(ggate_ptr.dtype.element_ty), mask=mask)
    tl.store(gy_ptr + rows * D + cols, (g * gate).to(gy_ptr.dtype.element_ty), mask=mask)


def _elementwise_grid(r, d):
    block_d = min(triton.next_power_of_2(max(d, 1)), 65536 if INTERPRETED else 1024)
    block_r = max(1, min((65536 if INTERPRETED else 2048) // block_d, triton.next_power_of_2(max(r, 1))))
    return (triton.cdiv(r, block_r), triton.cdiv(d, block_d)), block_r, block_d


def gated_residual(h, gate, y, out):
    """out[:] = h + gate * y (fp32 arithmetic) for checked (R, D) arguments; out may be h."""
    gate, y = _unit_cols(gate), _unit_cols(y)
    if h.shape[1] > 1 and h.stride(1) != 1:
        h = h.contiguous()
    r, d = h.shape
    if r * d == 0:
        return out
    grid, block_r, block_d = _elementwise_grid(r, d)
    _gated_residual_kernel[grid](h, h.stride(0), gate, gate.stride(0), y, y.stride(0), out, out.stride(0), r, d,
                                 BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def gated_residual_backward(grad, gate, y):
    """(grad_gate, grad_y) = (grad * y, grad * gate) in gate's and y's dtypes, (R, D) contiguous."""
    grad, gate, y = _unit_cols(grad), _unit_cols(gate), _unit_cols(y)
    r, d = grad.shape
    ggate = torch.empty((r, d), dtype=gate.dtype, device=grad.device)
    gy = torch.empty((r, d), dtype=y.dtype, device=grad.device)
    if r * d:
        grid, block_r, block_d = _elementwise_grid(r, d)
        _gated_residual_bwd_kernel[grid](grad, grad.stride(0), gate, gate.stride(0), y, y.stride(0), ggate, gy, r, d,
                                         BLOCK_R=block_r, BLOCK_D=block_d)
    return ggate, gy


@triton.jit
def _silu_add_kernel(a_ptr, stride_a, c_ptr, stride_c, out_ptr, stride_out, R, D,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
    mask = (rows < R) & (cols < D)
    y = tl.load(a_ptr + rows * stride_a + cols, mask=mask, other=0.0).to(tl.float32) + \
        tl.load(c_ptr + rows * stride_c + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_out + cols, (y * sigmoid(y)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_add(a, c, out):
    """out[:] = SiLU(a + c) for (R, D) a, c (R, D) or (1, D) (broadcast), unit column strides."""
    r, d = out.shape
    if r * d:
        grid, block_r, block_d = _elementwise_grid(r, d)
        _silu_add_kernel[grid](a, a.stride(0), c, 0 if c.shape[0] == 1 else c.stride(0), out, out.stride(0), r, d,
                               BLOCK_R=block_r, BLOCK_D=block_d)
    return out


# ---- the fused head GEMM ----------------------------------------------------------------------
PRO_PLAIN, PRO_SILU_ADD, PRO_LN_MODULATE = 0, 1, 2


@triton.jit
def _head_linear_kernel(
        a_ptr, stride_am, a_rows,                  # A (M, K) (row r reads A's row r % a_rows)
        c_ptr, stride_cm,                          # SILU_ADD: A + C (row stride 0: one shared row)
        stats_ptr, stat_tiles, stat_bn, eps,       # LN_MODULATE: (M, stat_tiles, 2) (mean, M2) partials of A
        lnw_ptr, lnb_ptr,                          # LN_MODULATE: affine weight / bias (K,)
        shift_ptr, scale_ptr, stride_mod,          # LN_MODULATE: (M, K) views, unit column stride
        w_ptr, stride_wk, stride_wn,               # B (K, N): W^T of a Linear weight
        bias_ptr, rbias_ptr, stride_rbm,           # + bias (N,), + row bias (M, N)
        gate_ptr, stride_gm, res_ptr, stride_rm,   # GATED_RESIDUAL: out = res + gate * acc
        out_ptr, stride_om, ostats_ptr,            # out (M, N); OUT_STATS: (M, cdiv(N, BLOCK_N), 2)
        M, N, K,
        PROLOGUE: tl.constexpr, LN_W: tl.constexpr, LN_B: tl.constexpr, HAS_SHIFT: tl.constexpr,
        STAT_TILES_P2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RBIAS: tl.constexpr, SILU_OUT: tl.constexpr,
        GATED_RESIDUAL: tl.constexpr, OUT_STATS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    num_m = cdiv(M, BLOCK_M)
    # Programs that share a weight tile are adjacent: at sampling sizes the weights are most of
    # the bytes, and this way each weight tile leaves DRAM / L2 once per wave.
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64)
    a_row = (offs_m % a_rows).to(tl.int64)

    if PROLOGUE == 2:
        # Row statistics from the producer's per-tile (mean, M2): mean = sum(n_t mean_t) / K,
        # M2 = sum(M2_t + n_t (mean_t - mean)^2) -- the variance of centred values, never
        # E[x^2] - E[x]^2, so an offset residual stream keeps its precision.
        t = tl.arange(0, STAT_TILES_P2)
        t_ok = t < stat_tiles
        tmask = m_ok[:, None] & t_ok[None, :]
        cnt = tl.where(t_ok, tl.minimum(K - t * stat_bn, stat_bn), 0).to(tl.float32)[None, :]
        sp = stats_ptr + rows[:, None] * (stat_tiles * 2) + t[None, :] * 2
        t_mean = tl.load(sp, mask=tmask, other=0.0)
        t_m2 = tl.load(sp + 1, mask=tmask, other=0.0)
        mean = reduce_sum(cnt * t_mean, 1) / K
        dev = tl.where(tmask, t_mean - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(reduce_sum(t_m2 + cnt * dev * dev, 1) / K + eps)

    acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        amask = m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptr + a_row[:, None] * stride_am + offs_k[None, :], mask=amask, other=0.0)
        if PROLOGUE == 1:
            a = a.to(tl.float32) + tl.load(c_ptr + rows[:, None] * stride_cm + offs_k[None, :], mask=amask,
                                           other=0.0).to(tl.float32)
            a = a * sigmoid(a)
        if PROLOGUE == 2:
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
            if LN_W:
                a = a * tl.load(lnw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if LN_B:
                a = a + tl.load(lnb_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            mod = rows[:, None] * stride_mod + offs_k[None, :]
            a = a * (1.0 + tl.load(scale_ptr + mod, mask=amask, other=0.0).to(tl.float32))
            if HAS_SHIFT:
                a = a + tl.load(shift_ptr + mod, mask=amask, other=0.0).to(tl.float32)
            a = tl.where(amask, a, 0.0)
        wt = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(wt.dtype), wt, acc)

    omask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RBIAS:
        acc += tl.load(rbias_ptr + rows[:, None] * stride_rbm + offs_n[None, :], mask=omask, other=0.0).to(tl.float32)
    if SILU_OUT:
        acc = acc * sigmoid(acc)
    if GATED_RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * stride_rm + offs_n[None, :], mask=omask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + rows[:, None] * stride_gm + offs_n[None, :], mask=omask, other=0.0).to(tl.float32)
        acc = res + gate * acc
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], out, mask=omask)
    if OUT_STATS:  # (mean, M2) of this tile's part of each row, as stored
        val = tl.where(omask, out.to(tl.float32), 0.0)
        t_mean = reduce_sum(val, 1) / tl.minimum(N - pid_n * BLOCK_N, BLOCK_N).to(tl.float32)
        dev = tl.where(omask, val - t_mean[:, None], 0.0)
        sp = ostats_ptr + rows * (cdiv(N, BLOCK_N) * 2) + pid_n * 2
        tl.store(sp, t_mean, mask=m_ok)
        tl.store(sp + 1, reduce_sum(dev * dev, 1), mask=m_ok)


def gemm_config(m: int, n: int, k: int, dtype: torch.dtype) -> dict:
    """Tile sizes of `_head_linear_kernel` for an (m x k) @ (k x n) GEMM in `dtype` (fixed
    heuristics, see the module docstring).

    GPU, bf16 / fp16 (tensor cores): up to 256 rows (the sampling sizes: 64-512 tokens, doubled
    by CFG) the GEMMs are weight-bound and small, so 64 x 64 tiles give more programs to stream
    the weights with; from 1024 rows on 128 x 128 tiles, 8 warps, 3 stages (compute-bound).
    GPU fp32 (IEEE, CUDA cores): 64 x 64 x 32. Interpreter: big tiles (it pays per operation,
    not per element), but 32 rows and 64 columns up to N = 128, so that the small test shapes
    still cover masked edges and LN partials of several tiles."""
    def p2(v, lo, hi):
        return max(lo, min(hi, triton.next_power_of_2(max(v, 1))))

    if INTERPRETED:
        return dict(BLOCK_M=32, BLOCK_N=p2(n, 16, 64 if n <= 128 else 128), BLOCK_K=p2(k, 16, 64), num_warps=4,
                    num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=p2(m, 16, 64), BLOCK_N=p2(n, 16, 64), BLOCK_K=p2(k, 16, 32), num_warps=4, num_stages=2)
    if m <= 256:
        return dict(BLOCK_M=p2(m, 16, 64), BLOCK_N=p2(n, 16, 64), BLOCK_K=p2(k, 16, 64), num_warps=4, num_stages=4)
    if m <= 1024:
        return dict(BLOCK_M=64, BLOCK_N=p2(n, 16, 128), BLOCK_K=p2(k, 16, 64), num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=p2(n, 16, 128), BLOCK_K=p2(k, 16, 64), num_warps=8, num_stages=3)


def _linear(a, w_t, out, *, cfg, a_rows=None, silu_add=None, ln=None, bias=None, row_bias=None, silu_out=False,
            gated_residual=None, out_stats=None):
    """One `_head_linear_kernel` launch: out = epilogue(prologue(a) @ w_t).

    a (M, K) (or (a_rows, K) read modulo a_rows); w_t (K, N) any strides; silu_add: C (M or 1, K)
    view; ln: dict(stats, stat_bn, eps, weight, bias, shift, scale); gated_residual: (gate, res)
    (M, N) views; out_stats: (M, cdiv(N, BLOCK_N), 2) fp32 buffer."""
    m, n = out.shape
    k = w_t.shape[0]
    if m == 0:
        return out
    for buf in (out_stats, ln and ln["stats"]):
        if buf is not None and not buf.is_contiguous():
            raise ValueError("fused head: the LN statistics buffer must be contiguous (M, tiles, 2)")
    dummy = out
    prologue = PRO_PLAIN
    c, stride_c = dummy, 0
    if silu_add is not None:
        prologue, c = PRO_SILU_ADD, silu_add
        stride_c = 0 if c.shape[0] == 1 else c.stride(0)
    stats, stat_tiles, stat_bn, eps, lnw, lnb, shift, scale, stride_mod = dummy, 1, 1, 0.0, None, None, None, dummy, 0
    if ln is not None:
        prologue = PRO_LN_MODULATE
        stats, stat_bn, eps = ln["stats"], ln["stat_bn"], ln["eps"]
        stat_tiles = stats.shape[1]
        lnw, lnb, shift, scale = ln.get("weight"), ln.get("bias"), ln.get("shift"), ln["scale"]
        stride_mod = scale.stride(0)
        if shift is not None and shift.stride(0) != stride_mod:
            raise ValueError("fused head: shift and scale must share a row stride")
    gate, res = gated_residual if gated_residual is not None else (dummy, dummy)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _head_linear_kernel[grid](
        a, a.stride(0), a_rows or a.shape[0], c, stride_c,
        stats, stat_tiles, stat_bn, float(eps),
        lnw if lnw is not None else dummy, lnb if lnb is not None else dummy,
        shift if shift is not None else dummy, scale, stride_mod,
        w_t, w_t.stride(0), w_t.stride(1),
        bias if bias is not None else dummy, row_bias if row_bias is not None else dummy,
        row_bias.stride(0) if row_bias is not None else 0,
        gate, gate.stride(0), res, res.stride(0),
        out, out.stride(0), out_stats if out_stats is not None else dummy,
        m, n, k,
        PROLOGUE=prologue, LN_W=lnw is not None, LN_B=lnb is not None, HAS_SHIFT=shift is not None,
        STAT_TILES_P2=triton.next_power_of_2(stat_tiles), HAS_BIAS=bias is not None, HAS_RBIAS=row_bias is not None,
        SILU_OUT=silu_out, GATED_RESIDUAL=gated_residual is not None, OUT_STATS=out_stats is not None,
        IEEE=w_t.dtype == torch.float32, **cfg)
    return out


# From this many rows on, the sampler / head_forward run the prologues as separate passes (see
# `_Chain`). A guess from operation counts, not a measurement: tune it on a GPU with
# benchmarks/denoiser.py (which times both modes) or override with FLUID_OPS_HEAD_PROLOGUE.
SPLIT_PROLOGUE_MIN_ROWS = 2048
PROLOGUE_MODES = ("fused", "split")


def prologue_mode(m: int, gemm_dtype: torch.dtype, mode: str | None = None) -> str:
    """"fused" or "split" for an M-row head evaluation: `mode` if given, else the environment
    variable FLUID_OPS_HEAD_PROLOGUE, else split from SPLIT_PROLOGUE_MIN_ROWS rows on with
    tensor-core GEMMs (bf16 / fp16), fused otherwise."""
    mode = mode or os.environ.get("FLUID_OPS_HEAD_PROLOGUE") or None
    if mode is None:
        return "split" if m >= SPLIT_PROLOGUE_MIN_ROWS and gemm_dtype != torch.float32 else "fused"
    if mode not in PROLOGUE_MODES:
        raise ValueError(f"fused head: prologue mode must be one of {PROLOGUE_MODES} (FLUID_OPS_HEAD_PROLOGUE), "
                         f"got {mode!r}")
    return mode


class _Chain:
    """The launch sequence of one head evaluation for M rows, with its tile configs and LN-stats
    buffer; `run` fills ada, h, u and returns out (M, out_channels) in the GEMM dtype.

    mode "fused": SiLU(c + t) and LN-modulate run in the GEMM prologues (3 + 2 * blocks launches;
    the fewest launches and bytes: what small, launch- and weight-bound batches want). Each
    program of a GEMM then redoes the prologue of its A rows, once per column tile: at large M,
    where the GEMMs are compute-bound, that elementwise work (an exp per element for SiLU,
    ~6 operations for LN-modulate) competes with the tensor cores. Mode "split" therefore runs
    them once each, as row kernels writing a GEMM-dtype buffer that plain GEMMs read
    (4 + 3 * blocks launches, one more M x D buffer)."""

    def __init__(self, weights, in_wt, in_b, m: int, device, mode: str | None = None):
        self.w = w = weights
        self.in_wt, self.in_b = in_wt, in_b
        d = w.ada_wt.shape[0]
        gd = w.ada_wt.dtype
        self.d, self.m = d, m
        self.mode = prologue_mode(m, gd, mode)
        self.a = torch.empty(m, d, dtype=gd, device=device) if self.mode == "split" else None
        self.cfg_ada = gemm_config(m, w.ada_wt.shape[1], d, gd)
        self.cfg_fc1 = gemm_config(m, d, d, gd)
        # every producer of h (input projection, fc2) writes LN partials of the same width
        self.cfg_fc2 = dict(self.cfg_fc1)
        self.cfg_in = dict(gemm_config(m, d, in_wt.shape[0], torch.float32), BLOCK_N=self.cfg_fc2["BLOCK_N"])
        self.cfg_out = gemm_config(m, w.final_wt.shape[1], d, gd)
        self.stat_bn = self.cfg_fc2["BLOCK_N"]
        self.stats = torch.empty(m, triton.cdiv(d, self.stat_bn), 2, dtype=torch.float32, device=device)

    def run(self, x, cemb, temb, ada, h, u, out):
        """x (n, in) fp32 (rows repeated to M when M = 2n), cemb (M, D) fp32, temb (1 or M, D)."""
        if self.mode == "split":
            return self._run_split(x, cemb, temb, ada, h, u, out)
        w, d = self.w, self.d
        _linear(cemb, w.ada_wt, ada, cfg=self.cfg_ada, silu_add=temb, bias=w.ada_b)
        _linear(x, self.in_wt, h, cfg=self.cfg_in, a_rows=x.shape[0], bias=self.in_b, out_stats=self.stats)
        for i, ((w0t, b0, w2t, b2), (lw, lb, eps)) in enumerate(zip(w.mlp, w.ln)):
            base = 3 * d * i
            ln = dict(stats=self.stats, stat_bn=self.stat_bn, eps=eps, weight=lw, bias=lb,
                      shift=ada[:, base:base + d], scale=ada[:, base + d:base + 2 * d])
            _linear(h, w0t, u, cfg=self.cfg_fc1, ln=ln, bias=b0, silu_out=True)
            _linear(u, w2t, h, cfg=self.cfg_fc2, bias=b2, gated_residual=(ada[:, base + 2 * d:base + 3 * d], h),
                    out_stats=self.stats)
        base = 3 * d * len(w.mlp)
        ln = dict(stats=self.stats, stat_bn=self.stat_bn, eps=w.final_eps, scale=ada[:, base:base + d])
        # final linear + (the folded final shift and bias: the last columns of ada)
        return _linear(h, w.final_wt, out, cfg=self.cfg_out, ln=ln, row_bias=ada[:, base + d:])

    def _run_split(self, x, cemb, temb, ada, h, u, out):
        w, d, a = self.w, self.d, self.a
        _linear(silu_add(cemb, temb, a), w.ada_wt, ada, cfg=self.cfg_ada, bias=w.ada_b)
        _linear(x, self.in_wt, h, cfg=self.cfg_in, a_rows=x.shape[0], bias=self.in_b)
        for i, ((w0t, b0, w2t, b2), (lw, lb, eps)) in enumerate(zip(w.mlp, w.ln)):
            base = 3 * d * i
            layernorm_modulate(h, ada[:, base:base + d], ada[:, base + d:base + 2 * d], lw, lb, eps, a)
            _linear(a, w0t, u, cfg=self.cfg_fc1, bias=b0, silu_out=True)
            _linear(u, w2t, h, cfg=self.cfg_fc2, bias=b2, gated_residual=(ada[:, base + 2 * d:base + 3 * d], h))
        base = 3 * d * len(w.mlp)
        layernorm_modulate(h, None, ada[:, base:base + d], None, None, w.final_eps, a)
        return _linear(a, w.final_wt, out, cfg=self.cfg_out, row_bias=ada[:, base + d:])


def _x_rows(x):
    x = x.float()
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


class FusedHeadStep:
    """The fused Triton evaluation of `DenoiserSampler` (same call: (x, step) -> (M, out) in the
    GEMM dtype), reusing the sampler's embeddings, cached weights and workspaces."""

    def __init__(self, sampler, mode: str | None = None):
        self.s = sampler
        self.chain = _Chain(sampler.w, sampler.in_wt, sampler.in_b, sampler.rows, sampler.h.device, mode)

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        s = self.s
        out = torch.empty(s.rows, s.net.out_channels, dtype=s.gd, device=s.h.device)  # fresh: callers keep it
        return self.chain.run(_x_rows(x), s.cemb, s.temb[step:step + 1], s.ada, s.h, s.u, out)


@torch.no_grad()
def head_forward(net, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, gemm_dtype: torch.dtype | None = None,
                 prologue: str | None = None):
    """`net(x, t, c)` of a fluid_ops.nn.DenoiserMLP through the fused Triton kernels (inference,
    no autograd): x (N, in), t (N,), c (N, z) -> (N, out) in the GEMM dtype (default: the
    parameters' dtype). `prologue`: "fused" / "split" (see `_Chain`; default `prologue_mode`).
    Contract: exact in fp32, rounding-level in bf16 / fp16."""
    gd = gemm_dtype or net.cond_embed.weight.dtype
    w = net._sampling_weights(gd, x.device)
    n, d = x.shape[0], net.model_channels
    # the embeddings are plain Linear layers: torch runs them, in the GEMM dtype on a GPU
    lowp = x.device.type == "cuda" and gd != torch.float32
    with torch.autocast(x.device.type, dtype=gd, enabled=lowp):
        temb = net.time_embed(t).float().contiguous()
        cemb = net.cond_embed(c.to(net.cond_embed.weight.dtype)).float().contiguous()
    in_wt = net.input_proj.weight.detach().float().t()
    in_b = net.input_proj.bias.detach().float()
    chain = _Chain(w, in_wt, in_b, n, x.device, prologue)
    dev = x.device
    ada = torch.empty(n, w.ada_wt.shape[1], dtype=gd, device=dev)
    h = torch.empty(n, d, device=dev)
    u = torch.empty(n, d, dtype=gd, device=dev)
    out = torch.empty(n, net.out_channels, dtype=gd, device=dev)
    if n == 0:
        return out
    return chain.run(_x_rows(x), cemb, temb, ada, h, u, out)
