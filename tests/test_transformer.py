"""fluid_ops.nn.transformer: blocks against a plain PyTorch composition (SDPA), KV-cache decoding
against the full causal forward, and argument checks."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fluid_ops
from tests.conftest import assert_lowp_close
from fluid_ops.nn.transformer import CrossAttention, SelfAttention, Transformer, TransformerBlock


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randomize(module, seed=0):
    """Non-trivial weights everywhere (LayerNorm affine too), so every path is exercised."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise * (0.2 if p.dim() > 1 else 0.1))
    return module


# ---- plain PyTorch composition (the oracle) ------------------------------------------------
def sdpa(q, k, v, key_padding_mask=None, causal=False):
    """q (B, Nq, H, D), k / v (B, Nk, H, D) -> (B, Nq, H, D) with torch's SDPA."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    nq, nk = q.shape[1], k.shape[1]
    mask = torch.ones(q.shape[0], 1, nq, nk, dtype=torch.bool)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    if causal:  # bottom-right aligned
        i = torch.arange(nq)[:, None]
        j = torch.arange(nk)[None, :]
        mask = mask & (j <= i + nk - nq)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)


def ref_block(blk: TransformerBlock, x, *, key_padding_mask=None, causal=False, context=None, context_mask=None,
              cond=None):
    h, d = blk.attn.num_heads, blk.attn.head_dim
    b, n, c = x.shape
    if cond is None:
        mods = [x.new_zeros(b, 1, c)] * 6
    else:  # adaLN: SiLU -> Linear -> (shift, scale) x (norm1, norm_cross, norm2)
        lin = blk.modulation[1]
        mods = list(F.linear(F.silu(cond), lin.weight, lin.bias)[:, None, :].split(c, dim=-1))

    def norm(x, ln, i):
        return F.layer_norm(x, (c,), ln.weight, ln.bias, 1e-6) * (1 + mods[2 * i + 1]) + mods[2 * i]

    y = norm(x, blk.norm1, 0)
    q, k, v = F.linear(y, blk.attn.qkv.weight, blk.attn.qkv.bias).view(b, n, 3, h, d).unbind(2)
    x = x + F.linear(sdpa(q, k, v, key_padding_mask, causal).reshape(b, n, c), blk.attn.proj.weight, blk.attn.proj.bias)
    if blk.has_cross:
        y = norm(x, blk.norm_cross, 1)
        q = F.linear(y, blk.cross.q.weight, blk.cross.q.bias).view(b, n, h, d)
        nt = context.shape[1]
        k, v = F.linear(context, blk.cross.kv.weight, blk.cross.kv.bias).view(b, nt, 2, h, d).unbind(2)
        x = x + F.linear(sdpa(q, k, v, context_mask).reshape(b, n, c), blk.cross.proj.weight, blk.cross.proj.bias)
    y = norm(x, blk.norm2, 2)
    y = F.linear(F.gelu(F.linear(y, blk.mlp.fc1.weight, blk.mlp.fc1.bias), approximate="tanh"),
                 blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + y


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_block_matches_sdpa_composition(causal, cross):
    torch.manual_seed(0)
    dim, heads, b, n, nt, cdim = 64, 2, 3, 7, 5, 48
    blk = randomize(TransformerBlock(dim, heads, 2.0, cross_attention=cross, context_dim=cdim if cross else None))
    g = gen(1)
    x = torch.randn(b, n, dim, generator=g)
    kpm = torch.rand(b, n, generator=g) > 0.3
    kpm[:, 0] = True
    ctx = torch.randn(b, nt, cdim, generator=g) if cross else None
    cmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool) if cross else None
    kw = dict(key_padding_mask=None if causal else kpm, causal=causal, context=ctx, context_mask=cmask)
    # The flash-attn rule at fp32: the block's error against the composition in fp64 is at most 2x
    # the error of the composition run in fp32 (summation order differs between CPUs and kernels).
    blk64 = copy.deepcopy(blk).double()
    kw64 = dict(kw, context=ctx.double() if cross else None)
    assert_lowp_close(blk(x, **kw), ref_block(blk64, x.double(), **kw64), ref_block(blk, x, **kw), atol=1e-6)
    # and it is differentiable: gradients held to the same rule

    def grad_of(fn, x0, **kw_):
        x1 = x0.clone().requires_grad_(True)
        fn(x1, **kw_).square().sum().backward()
        return x1.grad

    assert_lowp_close(grad_of(blk, x, **kw), grad_of(lambda t, **k: ref_block(blk64, t, **k), x.double(), **kw64),
                      grad_of(lambda t, **k: ref_block(blk, t, **k), x, **kw), atol=1e-6, name="dx")


@pytest.mark.parametrize("causal", [False, True])
def test_adaln_block_matches_composition(causal):
    """cond_dim: each norm's output is scaled and shifted by SiLU -> Linear of the condition."""
    dim, heads, b, n, nt, cdim = 64, 2, 3, 6, 4, 32
    blk = randomize(TransformerBlock(dim, heads, 2.0, cross_attention=True, cond_dim=cdim), seed=7)
    g = gen(8)
    x, ctx = torch.randn(b, n, dim, generator=g), torch.randn(b, nt, dim, generator=g)
    cond = torch.randn(b, cdim, generator=g)
    out = blk(x, causal=causal, context=ctx, cond=cond)
    torch.testing.assert_close(out, ref_block(blk, x, causal=causal, context=ctx, cond=cond), rtol=1e-5, atol=1e-5)
    # the condition changes the output row by row (no leak between rows)
    cond2 = cond.clone()
    cond2[1] += 1.0
    out2 = blk(x, causal=causal, context=ctx, cond=cond2)
    torch.testing.assert_close(out2[[0, 2]], out[[0, 2]])
    assert (out2[1] - out[1]).abs().max() > 1e-2
    # gradients reach the modulation and the condition
    cond_g = cond.clone().requires_grad_(True)
    blk(x, causal=causal, context=ctx, cond=cond_g).square().sum().backward()
    assert blk.modulation[1].weight.grad.abs().sum() > 0 and cond_g.grad.abs().sum() > 0


def test_adaln_starts_as_identity_modulation():
    """A fresh cond_dim block (zero-initialised modulation) equals the same block without it."""
    torch.manual_seed(0)
    plain = randomize(TransformerBlock(64, 2, 2.0, cross_attention=True), seed=3)
    mod = TransformerBlock(64, 2, 2.0, cross_attention=True, cond_dim=16)
    missing, unexpected = mod.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("modulation.") for k in missing) and missing
    g = gen(9)
    x, ctx = torch.randn(2, 5, 64, generator=g), torch.randn(2, 3, 64, generator=g)
    torch.testing.assert_close(mod(x, context=ctx, cond=torch.randn(2, 16, generator=g)), plain(x, context=ctx))
    with pytest.raises(ValueError, match="pass cond"):
        mod(x, context=ctx)
    with pytest.raises(ValueError, match="without cond_dim"):
        plain(x, context=ctx, cond=torch.zeros(2, 16))


def test_adaln_kvcache_decoding_equals_full_forward():
    dim, heads, depth, b, n = 64, 2, 2, 2, 6
    tr = randomize(Transformer(dim, depth, heads, 2.0, cross_attention=True, cond_dim=dim), seed=11)
    tr.eval()
    g = gen(12)
    x, ctx, cond = torch.randn(b, n, dim, generator=g), torch.randn(b, 3, dim, generator=g), torch.randn(b, dim, generator=g)
    with torch.no_grad():
        full = tr(x, causal=True, context=ctx, cond=cond)
        cache, ckv = tr.new_cache(b, n), tr.context_kv(ctx)
        outs = [tr.decode(x[:, i:i + 1], cache, ckv, cond=cond) for i in range(n)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    # and with gradient checkpointing the same gradients
    tr.train()
    tr(x, context=ctx, cond=cond).square().sum().backward()
    grads = [p.grad.clone() for p in tr.parameters()]
    tr.zero_grad()
    tr.grad_checkpointing = True
    tr(x, context=ctx, cond=cond).square().sum().backward()
    for a, p in zip(grads, tr.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)


def test_cross_attention_padding_is_ignored():
    """Changing the context at padded positions must not change the output."""
    ca = randomize(CrossAttention(64, 2, context_dim=32))
    g = gen(2)
    x, ctx = torch.randn(2, 4, 64, generator=g), torch.randn(2, 6, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ctx2 = ctx.clone()
    ctx2[0, 3:] = 100.0
    torch.testing.assert_close(ca(x, ctx, context_mask=mask), ca(x, ctx2, context_mask=mask))
    # precomputed context_kv gives the same result
    torch.testing.assert_close(ca(x, context_kv=ca.context_kv(ctx), context_mask=mask), ca(x, ctx, context_mask=mask))


def test_kvcache_decoding_equals_full_causal_forward():
    torch.manual_seed(0)
    dim, heads, depth, b, n, nt = 64, 2, 3, 2, 9, 4
    tr = randomize(Transformer(dim, depth, heads, 2.0, cross_attention=True))
    tr.eval()
    g = gen(3)
    x = torch.randn(b, n, dim, generator=g)
    ctx = torch.randn(b, nt, dim, generator=g)
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        full = tr(x, causal=True, context=ctx, context_mask=cmask)
        cache = tr.new_cache(b, n)
        ckv = tr.context_kv(ctx)
        outs = [tr.decode(x[:, :3], cache, ckv, cmask)]  # a prefill of 3 positions, then one at a time
        for i in range(3, n):
            outs.append(tr.decode(x[:, i:i + 1], cache, ckv, cmask))
    assert cache.length == n and cache.seqlens.tolist() == [n] * b
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed max_len"):
        tr.decode(x[:, :1], cache, ckv, cmask)


def test_blocks_run_on_the_reference_backend_too():
    tr = randomize(Transformer(64, 2, 2, cross_attention=True))
    g = gen(4)
    x, ctx = torch.randn(2, 5, 64, generator=g), torch.randn(2, 3, 64, generator=g)
    out = tr(x, context=ctx)
    with fluid_ops.use_backend("reference"):
        ref = tr(x, context=ctx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_grad_checkpointing_same_gradients():
    tr = randomize(Transformer(64, 2, 2, cross_attention=True))
    g = gen(5)
    x, ctx = torch.randn(2, 5, 64, generator=g), torch.randn(2, 3, 64, generator=g)
    tr.train()
    tr(x, context=ctx).square().sum().backward()
    grads = [p.grad.clone() for p in tr.parameters()]
    tr.zero_grad()
    tr.grad_checkpointing = True
    tr(x, context=ctx).square().sum().backward()
    for a, p in zip(grads, tr.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="head dim"):
        SelfAttention(600, 2)  # head dim 300 > 256
    with pytest.raises(ValueError, match="divisible"):
        TransformerBlock(64, 3)
    with pytest.raises(ValueError, match="depth"):
        Transformer(64, -1, 2)
    ca = CrossAttention(64, 2)
    with pytest.raises(ValueError, match="exactly one"):
        ca(torch.zeros(1, 2, 64))
    blk = TransformerBlock(64, 2)
    with pytest.raises(ValueError, match="no cross-attention"):
        blk(torch.zeros(1, 2, 64), context=torch.zeros(1, 2, 64))
