"""Fused attention in Triton (docs/contracts.md §2.1): forward, backward and KV-cache decode.

Layout (B, N, H, D) with any strides along B / N / H and unit stride along D; one program per
(query tile, batch x head) in the forward and dq passes, per (key tile, batch x head) in the dk/dv
pass. Scores live in base 2: s2 = q·k · scale · log2(e), so the online softmax uses exp2 and the
saved log-sum-exp is natural-log (lse = (m2 + log2 l) · ln 2), the convention of the reference:
-inf for a row with no key it may attend (its output and gradient are 0).

Skipping work:
* key padding: one small launch per call lists, for each batch, the key tiles holding at least
  one attendable key (ascending) and a prefix count; the forward and dq loops walk that list,
  so tiles that are entirely padding are never loaded nor multiplied; the dk/dv pass gives such
  a tile an empty query loop (it only writes its zeros);
* causal (bottom-right, query i sees key j iff j <= i + Lk - Nq): tiles above the diagonal are
  not visited (the loop ends at the tile's last visible key; with padding, at the prefix count
  of that tile);
* KV cache: each batch's key length is cache_seqlens[b] + Nnew, read on the device (no host sync).
Each loop is split in two (three in dk/dv): tiles wholly inside the sequences and below the causal
diagonal run without bounds or causal tests (and, with unit-stride power-of-two D, unmasked
loads); only the tiles on the diagonal and at the ragged ends pay for them.

Backward: a preprocess pass writes delta = rowsum(dO ∘ O) and lse · log2(e) (+inf for empty rows,
so their probabilities recompute to 0); then either
* deterministic (default): dk/dv per key tile looping over query tiles, dq per query tile
  looping over key tiles: no atomics, bit-reproducible, at the cost of recomputing Q·Kᵀ and
  dO·Vᵀ in the dq pass (7 tile GEMMs instead of 5); or
* atomic: one pass per key tile that also adds its dq share into an fp32 buffer with atomics
  (FLUID_OPS_TRITON_ATTENTION_BWD=atomic; fewer GEMMs, run-to-run differences in the last bits).
The deterministic one is the default because the gap is only the dq pass's two recomputed GEMMs
(the flash-attn 2 Triton tutorial's choice too) and reproducible training is worth it; it has not
been timed against the atomic one on a GPU here (no GPU on the machine this was written on).

Precision: fp32 accumulation everywhere; fp16 / bf16 probabilities are rounded to the input dtype
before the P·V and dS·K GEMMs (as flash-attn does); fp32 inputs use IEEE fp32 dots (no TF32), so
the fp32 path keeps the op's "exact" contract.

Autotuning (GPU only): `triton.autotune` keyed on head dim, power-of-two buckets of Nq and Nk,
the mask / causal / cache flags and the dtypes (FLUID_OPS_TRITON_AUTOTUNE=0: the first candidate
that suits the call, no trial runs). Under the interpreter (TRITON_INTERPRET=1, CPU tensors,
tests) one small fixed configuration runs instead: tuning there is meaningless and slow.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton < 3.4 has no knobs
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634

# Key-tile width of the masked kernels: the padding block list is built at this granularity, so
# every kernel that walks it uses this BLOCK_N (the tuner picks BLOCK_M, warps and stages).
MASK_BLOCK_N = 32 if INTERPRETED else 64


# =============================================================================================
# kernels
# =============================================================================================
@triton.jit
def _mask_block_list_kernel(KEEP, BLOCK_IDX, BLOCK_CNT, stride_keep_b, stride_keep_n, stride_list_b, N_K, N_BLOCKS,
                            BLOCK_N: tl.constexpr):
    """Per batch b: BLOCK_IDX[b, :count] = the key tiles with an attendable key, ascending;
    BLOCK_CNT[b, j] = how many of tiles 0..j have one (so the loops know where to stop)."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    count = tl.program_id(1) * 0  # int32 zero (program_id(1) is 0: grid is (B, 1))
    for j in range(0, N_BLOCKS):
        n = j * BLOCK_N + offs
        keep = tl.load(KEEP + b * stride_keep_b + n * stride_keep_n, mask=n < N_K, other=0)
        any_keep = tl.max((keep != 0).to(tl.int32), axis=0)
        tl.store(BLOCK_IDX + b * stride_list_b + count, j, mask=any_keep > 0)
        count += any_keep
        tl.store(BLOCK_CNT + b * stride_list_b + j, count)


@triton.jit
def _key_tiles(b, start_m, BLOCK_CNT, SEQLENS_K, stride_list_b, N_Q, N_K, seqlen_add,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_SEQLENS: tl.constexpr):
    """(Lk, n_inner, n_iter) for the query tile starting at start_m: the batch's key length, and
    how many key tiles its loops visit: the first n_inner lie wholly inside the key range and below
    the causal diagonal (no bounds or causal test needed), up to n_iter need them. Counts are
    entries of the block list when masked, else tiles 0, 1, ..."""
    if HAS_SEQLENS:
        len_k = tl.load(SEQLENS_K + b).to(tl.int32) + seqlen_add
    else:
        len_k = N_K + start_m * 0
    n_tiles = tl.cdiv(len_k, BLOCK_N)
    n_full = len_k // BLOCK_N
    if CAUSAL:
        # row i sees keys j <= i + Lk - Nq: the tile's last valid row bounds what is visited, its
        # first row what needs no causal test
        last_key = tl.minimum(start_m + BLOCK_M, N_Q) - 1 + len_k - N_Q
        n_tiles = tl.minimum(n_tiles, tl.cdiv(tl.maximum(last_key, -1) + 1, BLOCK_N))
        n_full = tl.minimum(n_full, tl.maximum(start_m + len_k - N_Q + 1, 0) // BLOCK_N)
    n_full = tl.minimum(n_full, n_tiles)
    if HAS_MASK:  # tile counts -> entries of the list (prefix counts of non-empty tiles)
        list_row = BLOCK_CNT + b * stride_list_b
        n_iter = tl.where(n_tiles > 0, tl.load(list_row + tl.maximum(n_tiles - 1, 0)), 0)
        n_inner = tl.where(n_full > 0, tl.load(list_row + tl.maximum(n_full - 1, 0)), 0)
    else:
        n_iter = n_tiles
        n_inner = n_full
    return len_k, n_inner, n_iter


@triton.jit
def _load_rows(base, offs_r, stride_r, offs_d, r_ok, d_ok, EDGE: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, BLOCK_D) tile; bounds tests only where they can fail (edge tiles, padded head dim)."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    if EDGE:
        return tl.load(ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, KEEP_ROW, start_n, offs_m, offs_j, offs_d, d_ok, len_k, N_Q,
              stride_kn, stride_vn, stride_keep_n, scale_log2,
              EDGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_D: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """One key tile of the online softmax. Inner tiles (EDGE False) are wholly valid apart from
    key padding, and a listed tile has an attendable key, so every row keeps a finite max there."""
    offs_n = start_n + offs_j
    n_ok = offs_n < len_k
    k = _load_rows(k_base, offs_n, stride_kn, offs_d, n_ok, d_ok, EDGE, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    if HAS_MASK:
        keep = tl.load(KEEP_ROW + offs_n * stride_keep_n, mask=n_ok, other=0) != 0
        s = tl.where(keep[None, :], s, float("-inf"))
    if EDGE:
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + (len_k - N_Q))
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with nothing allowed so far keeps m = -inf: subtract 0 instead (exp2(-inf) = 0, no NaN)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_sub = m_new
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _load_rows(v_base, offs_n, stride_vn, offs_d, n_ok, d_ok, EDGE, EVEN_D)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
        Q, K, V, O, LSE, KEEP, BLOCK_IDX, BLOCK_CNT, SEQLENS_K,
        stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
        stride_ob, stride_on, stride_oh, stride_keep_b, stride_keep_n, stride_list_b,
        H, N_Q, N_K, seqlen_add, scale_log2, q_bucket, k_bucket,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEQLENS: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # D = 80 / 96 run in a 128-wide tile, the tail masked off
    m_ok = offs_m < N_Q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    keep_row = KEEP + b * stride_keep_b
    list_row = BLOCK_IDX + b * stride_list_b
    len_k, n_inner, n_iter = _key_tiles(b, start_m, BLOCK_CNT, SEQLENS_K, stride_list_b, N_Q, N_K, seqlen_add,
                                        BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, HAS_SEQLENS)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 scores
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running sum of exp2(s2 - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # two loops (each software-pipelined): inner tiles without bounds / causal tests, then the rest
    for it in range(0, n_inner):
        start_n = (tl.load(list_row + it) if HAS_MASK else it) * BLOCK_N
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, keep_row, start_n, offs_m, offs_j, offs_d, d_ok,
                                  len_k, N_Q, stride_kn, stride_vn, stride_keep_n, scale_log2,
                                  False, CAUSAL, HAS_MASK, HEAD_DIM == BLOCK_D, DOT_PREC)
    for it in range(n_inner, n_iter):
        start_n = (tl.load(list_row + it) if HAS_MASK else it) * BLOCK_N
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, keep_row, start_n, offs_m, offs_j, offs_d, d_ok,
                                  len_k, N_Q, stride_kn, stride_vn, stride_keep_n, scale_log2,
                                  True, CAUSAL, HAS_MASK, HEAD_DIM == BLOCK_D, DOT_PREC)

    has_key = l_i > 0.0
    l_div = tl.where(has_key, l_i, 1.0)
    o = acc / l_div[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(l_div)) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, LSE, DELTA, LSE2, stride_ob, stride_on, stride_oh,
                                stride_dob, stride_don, stride_doh, H, N_Q,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO ∘ O) (fp32) and lse2 = lse · log2(e), +inf where lse = -inf (so every
    probability of an empty row recomputes to exp2(s2 - inf) = 0)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row = pid_bh.to(tl.int64) * N_Q + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + row, delta, mask=m_ok)
    tl.store(LSE2 + row, lse2, mask=m_ok)


@triton.jit
def _dkdv_tile(dk, dv, k, v, keep, Q_BASE, DO_BASE, LSE2_ROW, DELTA_ROW, start_m, offs_n, offs_i, offs_d, d_ok,
               N_Q, N_K, stride_qn, stride_don, scale, scale_log2, DQ_BASE, stride_dqn,
               EDGE: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, ATOMIC_DQ: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """One query tile's contribution to a key tile's dK, dV (transposed scores: (BLOCK_N, BLOCK_M)).
    Inner query tiles (EDGE False) are wholly inside Nq and below the diagonal."""
    offs_m = start_m + offs_i
    m_ok = offs_m < N_Q
    q = _load_rows(Q_BASE, offs_m, stride_qn, offs_d, m_ok, d_ok, EDGE, EVEN_D)
    do = _load_rows(DO_BASE, offs_m, stride_don, offs_d, m_ok, d_ok, EDGE, EVEN_D)
    if EDGE:
        lse2 = tl.load(LSE2_ROW + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA_ROW + offs_m, mask=m_ok, other=0.0)
    else:
        lse2 = tl.load(LSE2_ROW + offs_m)
        delta = tl.load(DELTA_ROW + offs_m)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2
    ok = keep[:, None]  # (keep includes n < Nk)
    if EDGE:
        ok = ok & m_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[:, None] <= offs_m[None, :] + (N_K - N_Q))
    # rows with no key have lse2 = +inf: their probabilities recompute to exactly 0
    p_t = tl.where(ok, tl.math.exp2(s_t - lse2[None, :]), 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    if ATOMIC_DQ:
        dq_part = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PREC) * scale
        tl.atomic_add(DQ_BASE + offs_m[:, None] * stride_dqn + offs_d[None, :], dq_part,
                      mask=m_ok[:, None] & d_ok[None, :])
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE2, DELTA, KEEP, DK, DV, DQ_ACC,
        stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
        stride_dob, stride_don, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
        stride_keep_b, stride_keep_n,
        H, N_Q, N_K, scale, scale_log2, q_bucket, k_bucket,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key tile: dV = Σ Pᵀ dO, dK = scale · Σ dSᵀ Q over the query tiles that can see it
    (transposed tiles, so the accumulations need no transposes). With ATOMIC_DQ it also adds
    scale · dS K into DQ_ACC (fp32, contiguous (B, Nq, H, D))."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < N_K
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    keep = n_ok
    if HAS_MASK:
        keep = keep & (tl.load(KEEP + b * stride_keep_b + offs_n * stride_keep_n, mask=n_ok, other=0) != 0)

    # query tiles [lo, hi) see this key tile (causal row i sees key j iff i >= j - (Nk - Nq)); those
    # in [mid, hi_full) see all of it and lie wholly inside Nq: no bounds or causal tests there
    lo = start_n * 0
    mid = lo
    if CAUSAL:
        lo = (tl.maximum(start_n - (N_K - N_Q), 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (N_K - N_Q), 0), BLOCK_M) * BLOCK_M
    hi = N_Q + lo * 0
    if HAS_MASK:  # a tile that is all padding gets no gradient: skip its query loops entirely
        hi = tl.where(tl.max(keep.to(tl.int32), axis=0) > 0, hi, lo)
    hi_full = tl.minimum((N_Q // BLOCK_M) * BLOCK_M, hi)

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dq_base = DQ_ACC + (b * N_Q * H + h) * HEAD_DIM  # (atomic mode only)
    lse2_row = LSE2 + pid_bh.to(tl.int64) * N_Q
    delta_row = DELTA + pid_bh.to(tl.int64) * N_Q
    even_d: tl.constexpr = HEAD_DIM == BLOCK_D
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(lo, tl.minimum(mid, hi), BLOCK_M):  # along the diagonal
        dk, dv = _dkdv_tile(dk, dv, k, v, keep, q_base, do_base, lse2_row, delta_row, start_m, offs_n, offs_i,
                            offs_d, d_ok, N_Q, N_K, stride_qn, stride_don, scale, scale_log2, dq_base, H * HEAD_DIM,
                            True, CAUSAL, even_d, ATOMIC_DQ, DOT_PREC)
    for start_m in range(tl.maximum(lo, mid), hi_full, BLOCK_M):  # inner tiles
        dk, dv = _dkdv_tile(dk, dv, k, v, keep, q_base, do_base, lse2_row, delta_row, start_m, offs_n, offs_i,
                            offs_d, d_ok, N_Q, N_K, stride_qn, stride_don, scale, scale_log2, dq_base, H * HEAD_DIM,
                            False, CAUSAL, even_d, ATOMIC_DQ, DOT_PREC)
    for start_m in range(tl.maximum(tl.maximum(lo, mid), hi_full), hi, BLOCK_M):  # the last, partial tile
        dk, dv = _dkdv_tile(dk, dv, k, v, keep, q_base, do_base, lse2_row, delta_row, start_m, offs_n, offs_i,
                            offs_d, d_ok, N_Q, N_K, stride_qn, stride_don, scale, scale_log2, dq_base, H * HEAD_DIM,
                            True, CAUSAL, even_d, ATOMIC_DQ, DOT_PREC)
    dk = dk * scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, KEEP_ROW, start_n, offs_m, offs_j, offs_d, d_ok, len_k, N_Q,
             stride_kn, stride_vn, stride_keep_n, scale_log2,
             EDGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_D: tl.constexpr,
             DOT_PREC: tl.constexpr):
    offs_n = start_n + offs_j
    n_ok = offs_n < len_k
    k = _load_rows(k_base, offs_n, stride_kn, offs_d, n_ok, d_ok, EDGE, EVEN_D)
    v = _load_rows(v_base, offs_n, stride_vn, offs_d, n_ok, d_ok, EDGE, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    p = tl.math.exp2(s - lse2[:, None])  # rows past Nq or with no key: lse2 = +inf, p = 0
    if HAS_MASK:
        keep = tl.load(KEEP_ROW + offs_n * stride_keep_n, mask=n_ok, other=0) != 0
        p = tl.where(keep[None, :], p, 0.0)
    if EDGE:
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + (len_k - N_Q))
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)


@triton.jit
def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE2, DELTA, KEEP, BLOCK_IDX, BLOCK_CNT, DQ,
        stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
        stride_dob, stride_don, stride_doh, stride_dqb, stride_dqn, stride_dqh,
        stride_keep_b, stride_keep_n, stride_list_b,
        H, N_Q, N_K, scale, scale_log2, q_bucket, k_bucket,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """One query tile: dQ = scale · Σ dS K over the key tiles the forward visited (same list, same
    inner / edge split)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N_Q
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :], mask=q_mask,
                 other=0.0)
    row = pid_bh.to(tl.int64) * N_Q + offs_m
    lse2 = tl.load(LSE2 + row, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    keep_row = KEEP + b * stride_keep_b
    list_row = BLOCK_IDX + b * stride_list_b
    len_k, n_inner, n_iter = _key_tiles(b, start_m, BLOCK_CNT, BLOCK_CNT, stride_list_b, N_Q, N_K, 0,
                                        BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, False)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for it in range(0, n_inner):
        start_n = (tl.load(list_row + it) if HAS_MASK else it) * BLOCK_N
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, keep_row, start_n, offs_m, offs_j, offs_d, d_ok, len_k,
                      N_Q, stride_kn, stride_vn, stride_keep_n, scale_log2,
                      False, CAUSAL, HAS_MASK, HEAD_DIM == BLOCK_D, DOT_PREC)
    for it in range(n_inner, n_iter):
        start_n = (tl.load(list_row + it) if HAS_MASK else it) * BLOCK_N
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, keep_row, start_n, offs_m, offs_j, offs_d, d_ok, len_k,
                      N_Q, stride_kn, stride_vn, stride_keep_n, scale_log2,
                      True, CAUSAL, HAS_MASK, HEAD_DIM == BLOCK_D, DOT_PREC)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _kv_append_kernel(KC, VC, KN, VN, CACHE_SEQLENS,
                      stride_kcb, stride_kcn, stride_kch, stride_kcd, stride_vcb, stride_vcn, stride_vch, stride_vcd,
                      stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh,
                      H, N_NEW, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """k_cache[b, cache_seqlens[b] + i] = k_new[b, i] (and v), one program per (b, i), all heads.
    The caches are written in place whatever their strides (a copy would lose the append)."""
    pid = tl.program_id(0)
    b = (pid // N_NEW).to(tl.int64)
    i = (pid % N_NEW).to(tl.int64)
    row = tl.load(CACHE_SEQLENS + b).to(tl.int64) + i
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < H)[:, None] & (offs_d < HEAD_DIM)[None, :]
    hd = offs_h[:, None]
    k = tl.load(KN + b * stride_knb + i * stride_knn + hd * stride_knh + offs_d[None, :], mask=mask)
    v = tl.load(VN + b * stride_vnb + i * stride_vnn + hd * stride_vnh + offs_d[None, :], mask=mask)
    tl.store(KC + b * stride_kcb + row * stride_kcn + hd * stride_kch + offs_d[None, :] * stride_kcd, k, mask=mask)
    tl.store(VC + b * stride_vcb + row * stride_vcn + hd * stride_vch + offs_d[None, :] * stride_vcd, v, mask=mask)


# =============================================================================================
# tuning
# =============================================================================================
def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Candidates kept after compiling every one for sm_90 (Triton 3.9 and 3.6; bf16, causal + padded,
# D 64 / 80 / 128) without a GPU and dropping those that spill registers heavily: 128-row tiles
# need 8 warps; 16- and 32-row tiles (mma.sync rather than wgmma) are for short query sets such as
# decode steps. The first candidate that survives pruning is the untuned default (no spills at any
# head dim); which one wins per shape is the tuner's call on the GPU (not measured here).
FWD_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3),
               _cfg(64, 64, 4, 4), _cfg(64, 128, 4, 3), _cfg(32, 64, 4, 3), _cfg(16, 64, 4, 3),
               _cfg(16, 128, 4, 3)]
# dk/dv: BLOCK_N keys per program (the accumulators), BLOCK_M queries per step.
BWD_DKDV_CONFIGS = [_cfg(32, 64, 8, 3), _cfg(32, 64, 4, 3), _cfg(64, 64, 8, 3), _cfg(32, 128, 8, 3),
                    _cfg(16, 64, 4, 3), _cfg(16, 128, 8, 3)]
# dq: BLOCK_M queries per program, BLOCK_N keys per step (masked calls keep BLOCK_N = 64).
BWD_DQ_CONFIGS = [_cfg(64, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 3),
                  _cfg(128, 32, 8, 3), _cfg(32, 64, 4, 3), _cfg(16, 64, 4, 3)]
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}  # small: the tests' shapes cross tile edges


def _prune(uses_block_list: bool, rows_arg: str, rows_tile: str):
    """early_config_prune: drop configs that cannot suit the call. Kernels that walk the padding
    block list need BLOCK_N = MASK_BLOCK_N (the list's granularity) when masked; a tile more than
    2x taller than the rows it covers is waste (decode has Nq = 1), and 16- / 32-row tiles are for
    such short sets only (fewer trial compiles). Keeps at least one."""
    def prune(configs, named_args, **kwargs):
        merged = {**named_args, **kwargs}
        out = list(configs)
        if uses_block_list and merged.get("HAS_MASK", False):
            out = [c for c in out if c.kwargs["BLOCK_N"] == MASK_BLOCK_N] or [_cfg(64, MASK_BLOCK_N, 4, 3)]
        rows = merged[rows_arg]
        fit = [c for c in out if c.kwargs[rows_tile] <= max(16, 2 * rows) and (rows <= 64 or c.kwargs[rows_tile] >= 64)]
        return fit or [min(out, key=lambda c: c.kwargs[rows_tile])]
    return prune


def autotune_enabled() -> bool:
    """FLUID_OPS_TRITON_AUTOTUNE=0 skips tuning: each call takes the first candidate that survives
    pruning (no trial runs; for quick runs and tests that compile many shapes once each)."""
    return os.environ.get("FLUID_OPS_TRITON_AUTOTUNE", "1").strip() != "0"


class _TunedKernel:
    """A kernel with its candidate configs: `triton.autotune` on a GPU, keyed on head dim, the
    power-of-two buckets of Nq and Nk and the mask / causal / cache flags (Triton adds the dtypes);
    one fixed small config under the interpreter."""

    def __init__(self, kernel, configs, prune, reset_to_zero=None):
        self.kernel, self.configs, self.prune = kernel, configs, prune
        self.tuner = None
        if not INTERPRETED:
            key = ["HEAD_DIM", "q_bucket", "k_bucket", "CAUSAL", "HAS_MASK"]
            if "HAS_SEQLENS" in kernel.arg_names:
                key.append("HAS_SEQLENS")
            self.tuner = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                                         reset_to_zero=reset_to_zero)(kernel)

    def __call__(self, grid, args, consts):
        if self.tuner is None:
            meta = {**consts, **INTERPRETER_CONFIG}
            self.kernel[grid(meta)](*args, **meta)
        elif autotune_enabled():
            self.tuner[grid](*args, **consts)
        else:
            cfg = self.prune(self.configs, dict(zip(self.kernel.arg_names, args)), **consts)[0]
            meta = {**consts, **cfg.kwargs}
            self.kernel[grid(meta)](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


_fwd_kernel = _TunedKernel(_attn_fwd_kernel, FWD_CONFIGS, _prune(True, "q_bucket", "BLOCK_M"))
# (the atomic mode accumulates dq across launches: the tuner's trial runs must start from zero)
_dkdv_kernel = _TunedKernel(_attn_bwd_dkdv_kernel, BWD_DKDV_CONFIGS, _prune(False, "k_bucket", "BLOCK_N"),
                            reset_to_zero=["DQ_ACC"])
_dq_kernel = _TunedKernel(_attn_bwd_dq_kernel, BWD_DQ_CONFIGS, _prune(True, "q_bucket", "BLOCK_M"))


def tuning_report() -> dict:
    """The config each autotuned kernel chose per key so far (empty under the interpreter)."""
    out = {}
    for name, k in (("forward", _fwd_kernel), ("backward_dkdv", _dkdv_kernel), ("backward_dq", _dq_kernel)):
        if k.tuner is not None and k.tuner.cache:
            out[name] = {str(key): str(cfg) for key, cfg in k.tuner.cache.items()}
    return out


# =============================================================================================
# host side
# =============================================================================================
def _bucket(n: int) -> int:
    """Power-of-two bucket of a sequence length (the tuner's key): 16 .. 16384."""
    return min(max(triton.next_power_of_2(max(n, 1)), 16), 16384)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: no TF32 (keeps the exact contract)


def _unit_d(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _as_bytes(mask):
    """A bool mask as uint8 storage (Triton loads bytes; no copy)."""
    return mask.view(torch.uint8)


def _device_guard(t):
    import contextlib
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def mask_block_list(keep: torch.Tensor, block_n: int = MASK_BLOCK_N):
    """(block_idx, block_cnt), both (B, ceil(Nk / block_n)) int32: the key tiles of each batch with
    at least one True, ascending (entries past the count are unused), and the prefix counts."""
    b, nk = keep.shape
    n_blocks = triton.cdiv(nk, block_n)
    block_idx = torch.zeros(b, n_blocks, dtype=torch.int32, device=keep.device)
    block_cnt = torch.empty(b, n_blocks, dtype=torch.int32, device=keep.device)
    keep8 = _as_bytes(keep)
    _mask_block_list_kernel[(b, 1)](keep8, block_idx, block_cnt, keep8.stride(0), keep8.stride(1),
                                    block_idx.stride(0), nk, n_blocks, BLOCK_N=block_n)
    return block_idx, block_cnt


def _fwd(q, k, v, key_padding_mask, causal, softmax_scale, cache_seqlens=None, seqlen_add=0):
    q, k, v = _unit_d(q), _unit_d(k), _unit_d(v)
    b, nq, h, d = q.shape
    nk = k.shape[1]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    has_mask = key_padding_mask is not None
    if has_mask:
        keep = _as_bytes(key_padding_mask)
        block_idx, block_cnt = mask_block_list(key_padding_mask)
        mask_strides = (keep.stride(0), keep.stride(1), block_idx.stride(0))
    else:
        keep = block_idx = block_cnt = lse  # placeholders: never read (HAS_MASK is a compile-time False)
        mask_strides = (0, 0, 0)
    seqlens = cache_seqlens if cache_seqlens is not None else lse
    args = (q, k, v, o, lse, keep, block_idx, block_cnt, seqlens,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), *mask_strides,
            h, nq, nk, seqlen_add, softmax_scale * LOG2E, _bucket(nq), _bucket(nk))
    consts = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), CAUSAL=causal, HAS_MASK=has_mask,
                  HAS_SEQLENS=cache_seqlens is not None, DOT_PREC=_dot_precision(q.dtype))
    grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * h)  # noqa: E731
    with _device_guard(q):
        _fwd_kernel(grid, args, consts)
    return o, lse


def forward(q, k, v, key_padding_mask, causal: bool, softmax_scale: float):
    """(o, lse): o like q (contiguous), lse (B, H, Nq) fp32, natural log, -inf for empty rows."""
    return _fwd(q, k, v, key_padding_mask, causal, softmax_scale)


def deterministic_backward_default() -> bool:
    """FLUID_OPS_TRITON_ATTENTION_BWD=atomic picks the atomic dq pass unless torch's deterministic
    algorithms are switched on; otherwise (default) the deterministic one."""
    mode = os.environ.get("FLUID_OPS_TRITON_ATTENTION_BWD", "deterministic").strip().lower()
    if mode not in ("deterministic", "atomic"):
        raise ValueError(f"FLUID_OPS_TRITON_ATTENTION_BWD must be 'deterministic' or 'atomic', got {mode!r}")
    return mode == "deterministic" or torch.are_deterministic_algorithms_enabled()


def backward(do, q, k, v, o, lse, key_padding_mask, causal: bool, softmax_scale: float,
             deterministic: bool | None = None):
    """(dq, dk, dv) in the inputs' dtypes, recomputing the probabilities from lse."""
    if deterministic is None:
        deterministic = deterministic_backward_default()
    do, q, k, v, o = (_unit_d(t) for t in (do, q, k, v, o))
    lse = lse.contiguous()
    b, nq, h, d = q.shape
    nk = k.shape[1]
    block_d = triton.next_power_of_2(d)
    dev = q.device
    delta = torch.empty(b, h, nq, dtype=torch.float32, device=dev)
    lse2 = torch.empty_like(delta)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dq_acc = dq if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=dev)
    has_mask = key_padding_mask is not None
    keep = _as_bytes(key_padding_mask) if has_mask else delta
    keep_strides = (keep.stride(0), keep.stride(1)) if has_mask else (0, 0)
    prec = _dot_precision(q.dtype)
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, HAS_MASK=has_mask, DOT_PREC=prec)
    buckets = (_bucket(nq), _bucket(nk))
    with _device_guard(q):
        pre_m = 32 if INTERPRETED else 64
        _attn_bwd_preprocess_kernel[(triton.cdiv(nq, pre_m), b * h)](
            o, do, lse, delta, lse2, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
            h, nq, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=pre_m)
        qkv_do_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                          v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
        _dkdv_kernel(lambda meta: (triton.cdiv(nk, meta["BLOCK_N"]), b * h),
                (q, k, v, do, lse2, delta, keep, dk, dv, dq_acc, *qkv_do_strides,
                 dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), *keep_strides,
                 h, nq, nk, softmax_scale, softmax_scale * LOG2E, *buckets),
                dict(common, ATOMIC_DQ=not deterministic))
        if deterministic:
            if has_mask:
                block_idx, block_cnt = mask_block_list(key_padding_mask)
                list_stride = block_idx.stride(0)
            else:
                block_idx = block_cnt = delta
                list_stride = 0
            _dq_kernel(lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * h),
                    (q, k, v, do, lse2, delta, keep, block_idx, block_cnt, dq, *qkv_do_strides,
                     dq.stride(0), dq.stride(1), dq.stride(2), *keep_strides, list_stride,
                     h, nq, nk, softmax_scale, softmax_scale * LOG2E, *buckets),
                    common)
        else:
            dq = dq_acc.to(q.dtype)
    return dq, dk, dv


def append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens):
    """Write k_new / v_new (B, Nnew, H, D) into the caches at rows cache_seqlens[b] + i, in place."""
    b, nnew, h, d = k_new.shape
    if b == 0 or nnew == 0:
        return
    k_new, v_new = _unit_d(k_new), _unit_d(v_new)
    with _device_guard(k_cache):
        _kv_append_kernel[(b * nnew,)](
            k_cache, v_cache, k_new, v_new, cache_seqlens,
            *k_cache.stride(), *v_cache.stride(), *k_new.stride()[:3], *v_new.stride()[:3], h, nnew,
            HEAD_DIM=d, BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d))


def kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal: bool, softmax_scale: float):
    """Append, then attend over each batch's first cache_seqlens[b] + Nnew cache rows: two launches,
    no host sync (the lengths are read on the device)."""
    nnew = 0
    if k_new is not None and k_new.shape[1] > 0:
        append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens)
        nnew = k_new.shape[1]
    return _fwd(q, k_cache, v_cache, None, causal, softmax_scale, cache_seqlens=cache_seqlens, seqlen_add=nnew)[0]
