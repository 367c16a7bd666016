"""Categorical sampling with temperature, top-k and top-p (docs/contracts.md §2.4), in plain PyTorch.

This file *defines* the algorithm; every backend reproduces it index for index. The whole
definition, for one row x = logits[r] (length V) and one uniform u = uniform[r] in [0, 1):

1. x = float32(x)  (fp16 / bf16 convert exactly).
2. T = float32(temperature). T == 0 (also a tiny T that rounds to 0): return argmax(x), the
   first index among equal maxima; top_k / top_p and u play no part (the argmax survives both
   filters anyway). (The op layer rejects a T beyond float32's range.)
3. m = max(x);  s_i = (x_i - m) / T, both operations in float32 (IEEE, correctly rounded).
   Subtracting the max before dividing is the same distribution as softmax(x / T) but cannot
   overflow for tiny T, and makes max(s) exactly 0, so no second max is needed.
4. weights w_i = exp(float64(s_i)): every weight and every sum below is float64. (float32 sums
   would put CDF boundaries 1e-7 apart between backends; in float64 two backends agree unless u
   falls within ~1e-15 of a boundary, and the sums below have a fixed order, so they agree
   bit for bit when their exp does.)
5. top_k (1 <= k <= V): t_k = the k-th largest s (counting repeats); K1 = {i : s_i >= t_k}.
   Every token tied with the k-th one is kept, so K1 can hold more than k tokens.
   top_k None: K1 = all tokens.
6. top_p (0 < p <= 1; p == 1 or None: no filter): Z1 = sum of w over K1, summed in index
   order. Go through K1 by decreasing s, with c_j the running sum of w in that order; the
   first position j with c_j >= p * Z1 gives t_p = s of that token, and K2 = {i in K1 :
   s_i >= t_p}. So K2 is the smallest set of most probable tokens reaching probability p,
   plus every token tied with the last one taken (ties in s have equal w, so the order among
   them does not change any c_j). If rounding keeps every c_j below p * Z1, K2 = K1.
   The argmax (w = 1) is always in K2.
7. Z = sum of w_i over K2, in index order; C_j = the same running sum up to index j. Return
   the smallest j with C_j > u * Z (j is then in K2 with w_j > 0). If rounding leaves no such
   j (u * Z rounded up to Z), return the largest j in K2 with w_j > 0.

Inputs are assumed valid (the op layer checks them): logits finite or -inf with at least one
finite value per row, 0 <= u < 1, T >= 0 finite.
"""
from __future__ import annotations

import torch

__all__ = ["sample_categorical"]


def sample_categorical(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, uniform: torch.Tensor) -> torch.Tensor:
    """Sample one index per row of `logits` (N, V) by the algorithm of this module's docstring,
    driven by `uniform` (N,) in [0, 1). Returns int64 (N,)."""
    x = logits.float()
    n, v = x.shape
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    t = torch.tensor(float(temperature), dtype=torch.float32, device=x.device)
    if float(t) == 0.0:
        return x.argmax(dim=1)
    m = x.amax(dim=1, keepdim=True)
    s = (x - m) / t
    w = s.double().exp()

    thr = torch.full((n, 1), float("-inf"), dtype=torch.float32, device=x.device)
    if top_k is not None and top_k < v:
        thr = s.topk(top_k, dim=1).values[:, -1:]
    if top_p is not None and top_p < 1.0:
        keep1 = s >= thr
        w1 = torch.where(keep1, w, 0.0)
        z1 = w1.cumsum(dim=1)[:, -1:]
        s_sorted, order = s.masked_fill(~keep1, float("-inf")).sort(dim=1, descending=True, stable=True)
        c = w1.gather(1, order).cumsum(dim=1)
        reached = c >= top_p * z1
        j = reached.int().argmax(dim=1, keepdim=True)
        t_p = s_sorted.gather(1, j)
        thr = torch.where(reached.any(dim=1, keepdim=True), torch.maximum(thr, t_p), thr)

    kept = s >= thr
    wk = torch.where(kept, w, 0.0)
    cdf = wk.cumsum(dim=1)
    target = uniform.to(device=x.device, dtype=torch.float64).reshape(n, 1) * cdf[:, -1:]
    hit = cdf > target
    idx = hit.int().argmax(dim=1)
    none = ~hit.any(dim=1)
    if bool(none.any()):
        positive = kept & (w > 0)
        last = v - 1 - positive.flip(1).int().argmax(dim=1)
        idx = torch.where(none, last, idx)
    return idx.to(torch.int64)
