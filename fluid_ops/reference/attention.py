"""Attention in plain PyTorch (docs/contracts.md §2.1): the oracle for the compiled kernels.

Layout q (B, Nq, H, D), k / v (B, Nk, H, D). Scores and softmax run in fp32 for fp32 / fp16 /
bf16 inputs (fp64 stays fp64, so gradcheck can use this), the output comes back in q's dtype.
A query row that may attend no key returns 0 and its log-sum-exp is -inf.
"""
from __future__ import annotations

import torch

__all__ = ["attention", "attention_with_lse", "attention_backward", "attention_kvcache", "allowed_mask"]


def allowed_mask(nq: int, nk: int, *, key_padding_mask=None, causal=False, seqlens_k=None,
                 batch: int = 1, device=None) -> torch.Tensor:
    """(B, 1, Nq, Nk) bool: may query i attend key j? Bottom-right causal: j <= i + (Lk - Nq),
    Lk = the batch's key length (Nk, or seqlens_k[b] for a KV cache)."""
    j = torch.arange(nk, device=device)
    i = torch.arange(nq, device=device)
    if seqlens_k is not None:
        lk = seqlens_k.to(device=device, dtype=torch.int64).view(-1, 1, 1, 1)
    else:
        lk = torch.full((batch, 1, 1, 1), nk, dtype=torch.int64, device=device)
    allowed = j.view(1, 1, 1, nk) < lk
    if causal:
        allowed = allowed & (j.view(1, 1, 1, nk) <= i.view(1, 1, nq, 1) + (lk - nq))
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(device).view(-1, 1, 1, nk)
    return allowed.expand(-1, 1, nq, nk)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_with_lse(q, k, v, *, key_padding_mask=None, causal=False, softmax_scale=None,
                       seqlens_k=None):
    """(o, lse): o (B, Nq, H, D) in q's dtype, lse (B, H, Nq) fp32 (fp64 for fp64 inputs),
    natural-log log-sum-exp of the scaled scores; -inf for rows with no allowed key."""
    b, nq, h, d = q.shape
    nk = k.shape[1]
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    ct = _compute_dtype(q.dtype)
    qf, kf, vf = (t.to(ct).transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    s = (qf @ kf.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    allowed = allowed_mask(nq, nk, key_padding_mask=key_padding_mask, causal=causal,
                           seqlens_k=seqlens_k, batch=b, device=q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where the whole row is masked
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = p.masked_fill(~allowed, 0.0)
    o = (p @ vf).transpose(1, 2).to(q.dtype)
    return o, lse.to(ct if ct == torch.float64 else torch.float32)


def attention(q, k, v, *, key_padding_mask=None, causal=False, softmax_scale=None):
    """softmax(Q Kᵀ · scale + mask) V per batch and head (docs/contracts.md §2.1); fully masked rows give 0."""
    return attention_with_lse(q, k, v, key_padding_mask=key_padding_mask, causal=causal,
                              softmax_scale=softmax_scale)[0]


def attention_backward(do, q, k, v, o, lse, *, key_padding_mask=None, causal=False, softmax_scale=None):
    """(dq, dk, dv) from the saved lse, as the compiled backward computes them:
    P = exp(S - lse), dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = dS K · scale,
    dK = dSᵀ Q · scale. Rows with lse = -inf have P = 0, hence 0 gradient."""
    b, nq, h, d = q.shape
    nk = k.shape[1]
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    ct = _compute_dtype(q.dtype)
    qf, kf, vf, of, dof = (t.to(ct).transpose(1, 2) for t in (q, k, v, o, do))
    allowed = allowed_mask(nq, nk, key_padding_mask=key_padding_mask, causal=causal, batch=b, device=q.device)
    s = (qf @ kf.transpose(-1, -2)) * scale
    lse_f = lse.to(ct).unsqueeze(-1)
    p = torch.exp(s - lse_f.masked_fill(torch.isinf(lse_f), 0.0))
    p = p.masked_fill(~allowed | torch.isinf(lse_f), 0.0)
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    delta = (dof * of).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    return tuple(t.transpose(1, 2).to(x.dtype) for t, x in ((dq, q), (dk, k), (dv, v)))


def attention_kvcache(q, k_cache, v_cache, k_new=None, v_new=None, *, cache_seqlens, causal=True,
                      softmax_scale=None):
    """Append k_new / v_new (B, Nnew, H, D) to the caches (B, Nmax, H, D) in place at rows
    [cache_seqlens[b], cache_seqlens[b] + Nnew), then attend q over the first
    cache_seqlens[b] + Nnew rows of each batch's cache (causal: bottom-right to that length)."""
    b = q.shape[0]
    lens = cache_seqlens.to(device=q.device, dtype=torch.int64)
    nnew = 0
    if k_new is not None:
        nnew = k_new.shape[1]
        if nnew > 0:
            rows = lens.view(b, 1) + torch.arange(nnew, device=q.device).view(1, nnew)
            bidx = torch.arange(b, device=q.device).view(b, 1).expand(b, nnew)
            k_cache[bidx, rows] = k_new.to(k_cache.dtype)
            v_cache[bidx, rows] = v_new.to(v_cache.dtype)
    return attention_with_lse(q, k_cache, v_cache, causal=causal, softmax_scale=softmax_scale,
                              seqlens_k=lens + nnew)[0]
