"""Transformer pieces on fluid_ops' attention ops: self-attention (bidirectional, or causal with a
KV cache for one-token-at-a-time decoding), cross-attention to a text sequence with a key-padding
mask, an MLP, pre-norm blocks and a stack of them.

Layout: activations are (B, N, C); q / k / v are views of the fused projections in the
flash-attn layout (B, N, H, D) that `fluid_ops.attention` reads in place (no transposes).

Decoding (raster order): `Transformer.new_cache(batch, max_len)` preallocates every block's K/V,
`Transformer.context_kv(context)` computes the cross-attention K/V of the text ONCE, and
`Transformer.decode(x_new, cache, context_kv, context_mask)` runs the new positions through every
block with `fluid_ops.attention_kvcache` (append to the cache and attend to its valid prefix in one
call), then advances the cache. The result equals the full causal forward on the whole prefix up to
summation order (exact contract in fp32).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fluid_ops.ops.attention import MAX_HEAD_DIM, attention, attention_kvcache

__all__ = ["SelfAttention", "CrossAttention", "MLP", "TransformerBlock", "Transformer", "KVCache",
           "check_attention_shape"]


def check_attention_shape(owner: str, dim: int, num_heads: int) -> int:
    """The head dim dim // num_heads, after checking that fluid_ops.attention supports it."""
    for name, v in (("dim", dim), ("num_heads", num_heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}: {name} must be an int >= 1, got {v!r}")
    if dim % num_heads:
        raise ValueError(f"{owner}: dim ({dim}) must be divisible by num_heads ({num_heads})")
    head_dim = dim // num_heads
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{owner}: head dim dim // num_heads = {dim} // {num_heads} = {head_dim} is not "
                         f"supported by fluid_ops.attention; it must be at most {MAX_HEAD_DIM}")
    return head_dim


class SelfAttention(nn.Module):
    """Multi-head self-attention, fused qkv projection (names `qkv`, `proj`)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True):
        super().__init__()
        self.head_dim = check_attention_shape("SelfAttention", dim, num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x):
        b, n, _ = x.shape
        return self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        """x (B, N, C); key_padding_mask (B, N) bool, True = may be attended; causal: GPT-style."""
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        o = attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal)
        return self.proj(o.reshape(b, n, c))

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               cache_seqlens: torch.Tensor) -> torch.Tensor:
        """Causal attention of the new positions x (B, Nnew, C) over the cache's valid prefix and
        themselves; appends their K/V to the caches in place (the caller advances cache_seqlens)."""
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        o = attention_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True)
        return self.proj(o.reshape(b, n, c))


class CrossAttention(nn.Module):
    """Image queries attend to a context (text) sequence: names `q`, `kv` (fused), `proj`."""

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None, qkv_bias: bool = True):
        super().__init__()
        self.head_dim = check_attention_shape("CrossAttention", dim, num_heads)
        self.num_heads = num_heads
        self.context_dim = dim if context_dim is None else context_dim
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(self.context_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each (B, Nt, H, D): computed once per generation and reused at every step."""
        b, n, _ = context.shape
        return self.kv(context).view(b, n, 2, self.num_heads, self.head_dim).unbind(2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                context_mask: torch.Tensor | None = None,
                context_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, N, C); context (B, Nt, context_dim) or its precomputed context_kv; context_mask
        (B, Nt) bool, True = a real token (padding is never attended)."""
        if (context is None) == (context_kv is None):
            raise ValueError("CrossAttention: pass exactly one of context and context_kv")
        b, n, c = x.shape
        k, v = self.context_kv(context) if context_kv is None else context_kv
        q = self.q(x).view(b, n, self.num_heads, self.head_dim)
        o = attention(q, k, v, key_padding_mask=context_mask)
        return self.proj(o.reshape(b, n, c))


class MLP(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """Pre-norm block: x += attn(norm1(x)); [x += cross(norm_cross(x), text)]; x += mlp(norm2(x)).

    cond_dim: adaLN as DiT's (without its gates): a global condition c (B, cond_dim) gives, through
    SiLU -> Linear (zero-initialised), a shift and a scale for each of the block's norms, whose
    output becomes norm(x) * (1 + scale) + shift. Unlike a vector added to the residual stream,
    the condition multiplies each position's features, so "where" (the position embedding) and
    "what the text says" interact from the first block on.

    cross_attention=True adds the text cross-attention (context of width context_dim, default dim).
    LayerNorm eps 1e-6 (as MAR's blocks)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, cross_attention: bool = False,
                 context_dim: int | None = None, norm_eps: float = 1e-6, cond_dim: int | None = None):
        super().__init__()
        if not (isinstance(mlp_ratio, (int, float)) and not isinstance(mlp_ratio, bool) and mlp_ratio > 0):
            raise ValueError(f"TransformerBlock: mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads)
        self.has_cross = bool(cross_attention)
        if self.has_cross:
            self.norm_cross = nn.LayerNorm(dim, eps=norm_eps)
            self.cross = CrossAttention(dim, num_heads, context_dim=context_dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        # adaLN (DiT): a global condition (B, cond_dim) shifts and scales each norm's output;
        # zero-initialised, so the block starts as the unconditioned one (reset_modulation)
        self.modulation = None
        if cond_dim is not None:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
            self.reset_modulation()

    def reset_modulation(self):
        """Zero the adaLN linear (identity modulation); a no-op without one."""
        if self.modulation is not None:
            nn.init.zeros_(self.modulation[1].weight)
            nn.init.zeros_(self.modulation[1].bias)

    def _mods(self, cond):
        if self.modulation is None:
            if cond is not None:
                raise ValueError("TransformerBlock: got cond but the block was built without cond_dim")
            return (None,) * 6
        if cond is None:
            raise ValueError("TransformerBlock: this block has adaLN modulation (cond_dim); pass cond (B, cond_dim)")
        return self.modulation(cond)[:, None, :].chunk(6, dim=-1)

    @staticmethod
    def _norm(norm, x, shift, scale):
        y = norm(x)
        return y if shift is None else y * (1 + scale) + shift

    def _cross_and_mlp(self, x, context, context_mask, context_kv, mods):
        if self.has_cross:
            x = x + self.cross(self._norm(self.norm_cross, x, mods[2], mods[3]), context, context_mask=context_mask,
                               context_kv=context_kv)
        elif context is not None or context_kv is not None:
            raise ValueError("TransformerBlock: got a context but the block has no cross-attention")
        return x + self.mlp(self._norm(self.norm2, x, mods[4], mods[5]))

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """cond (B, cond_dim): the adaLN condition, required exactly when the block has cond_dim."""
        mods = self._mods(cond)
        x = x + self.attn(self._norm(self.norm1, x, mods[0], mods[1]), key_padding_mask=key_padding_mask,
                          causal=causal)
        return self._cross_and_mlp(x, context, context_mask, context_kv, mods)

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
               *, context_mask: torch.Tensor | None = None,
               context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
               cond: torch.Tensor | None = None) -> torch.Tensor:
        """The block on new positions only (causal self-attention through the KV cache)."""
        mods = self._mods(cond)
        x = x + self.attn.decode(self._norm(self.norm1, x, mods[0], mods[1]), k_cache, v_cache, cache_seqlens)
        return self._cross_and_mlp(x, None, context_mask, context_kv, mods)


class KVCache:
    """Preallocated self-attention K/V of every block of a `Transformer`: k[i], v[i] are
    (B, max_len, H, D); `seqlens` (B,) int32 is the filled length (the same for every row here)."""

    def __init__(self, num_layers: int, batch: int, max_len: int, num_heads: int, head_dim: int, *,
                 device=None, dtype=torch.float32):
        shape = (batch, max_len, num_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.max_len = max_len
        self.length = 0  # host copy of seqlens (all rows advance together): no device read-back

    def advance(self, n: int):
        if self.length + n > self.max_len:
            raise ValueError(f"KVCache: advancing by {n} would exceed max_len {self.max_len} "
                             f"(filled {self.length})")
        self.seqlens += n
        self.length += n


class Transformer(nn.Module):
    """`depth` TransformerBlocks and a final LayerNorm (`blocks.{i}`, `norm`)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 cross_attention: bool = False, context_dim: int | None = None, grad_checkpointing: bool = False,
                 cond_dim: int | None = None):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"Transformer: depth must be an int >= 0, got {depth!r}")
        self.head_dim = check_attention_shape("Transformer", dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.blocks = nn.ModuleList([
            TransformerBlock(dim, num_heads, mlp_ratio, cross_attention=cross_attention, context_dim=context_dim,
                             cond_dim=cond_dim)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False, key_padding_mask=key_padding_mask, causal=causal,
                               context=context, context_mask=context_mask, cond=cond)
            else:
                x = blk(x, key_padding_mask=key_padding_mask, causal=causal, context=context,
                        context_mask=context_mask, cond=cond)
        return self.norm(x)

    # ---- decoding -------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        p = self.norm.weight
        return KVCache(len(self.blocks), batch, max_len, self.num_heads, self.head_dim,
                       device=p.device if device is None else device, dtype=p.dtype if dtype is None else dtype)

    def context_kv(self, context: torch.Tensor) -> list:
        """Every block's cross-attention (k, v) of `context`, computed once for a whole generation."""
        return [blk.cross.context_kv(context) if blk.has_cross else None for blk in self.blocks]

    def decode(self, x: torch.Tensor, cache: KVCache, context_kv: list | None = None,
               context_mask: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The new positions x (B, Nnew, C) through every block (causal, over the cache), then the
        final norm; appends their K/V and advances the cache by Nnew."""
        if cache.length + x.shape[1] > cache.max_len:
            raise ValueError(f"Transformer.decode: {x.shape[1]} new positions would exceed max_len "
                             f"{cache.max_len} of the cache (filled {cache.length})")
        for i, blk in enumerate(self.blocks):
            x = blk.decode(x, cache.k[i], cache.v[i], cache.seqlens, context_mask=context_mask,
                           context_kv=None if context_kv is None else context_kv[i], cond=cond)
        cache.advance(x.shape[1])
        return self.norm(x)
