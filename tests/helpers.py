"""Inputs and references the test modules share (test modules never import each other;
tests/test_layers.py checks it). Backend parameters, skips and the comparison rule live in
tests/conftest.py."""
from __future__ import annotations

import importlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fluid_ops
from fluid_ops.reference import categorical as ref_cat
from fluid_ops.reference import denoiser as rden
from fluid_ops.reference import diffusion as rdiff

# by path: fluid_ops.reference's attribute `attention` is the function, not the module
ref_attn = importlib.import_module("fluid_ops.reference.attention")

# The small diffusion head of `eps_net`: in = C channels (out 2C), width D, condition Z, BLOCKS blocks.
C, D, Z, BLOCKS = 4, 64, 12, 2


# ---- attention -------------------------------------------------------------------------------------

def naive_attention(q, k, v, mask=None, causal=False, scale=None, seqlens_k=None, dtype=torch.float64):
    """softmax(Q Kᵀ · scale + mask) V per (b, h), written from docs/contracts.md §2.1 with explicit loops
    over batch and head, in `dtype`; a row with no allowed key is 0."""
    b, nq, h, d = q.shape
    nk = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, nq, h, d, dtype=dtype)
    for bi in range(b):
        lk = nk if seqlens_k is None else int(seqlens_k[bi])
        i = torch.arange(nq).view(nq, 1)
        j = torch.arange(nk).view(1, nk)
        allowed = (j < lk).expand(nq, nk)
        if mask is not None:
            allowed = allowed & mask[bi].view(1, nk)
        if causal:
            allowed = allowed & (j <= i + (lk - nq))
        for hi in range(h):
            qq, kk, vv = (t[bi, :, hi].to(dtype) for t in (q, k, v))
            s = (qq @ kk.T) * scale
            s = s.masked_fill(~allowed, float("-inf"))
            p = torch.softmax(s.float() if dtype != torch.float64 else s, dim=-1).to(dtype)
            p = torch.nan_to_num(p, nan=0.0)  # fully masked rows: softmax of all -inf
            out[bi, :, hi] = (p @ vv).to(dtype)
    return out


def attention_inputs(b, nq, nk, h, d, dtype=torch.float32, seed=0, masked=False, full_mask_batch=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, h, d, generator=g).to(dtype)
    k = torch.randn(b, nk, h, d, generator=g).to(dtype)
    v = torch.randn(b, nk, h, d, generator=g).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(b, nk, generator=g) > 0.3
        if full_mask_batch is not None and b > full_mask_batch:
            mask[full_mask_batch] = False
    return q, k, v, mask


def fwd_on(backend_name, q, k, v, mask, causal, scale=None):
    """The attention_fwd op (output, lse) on one named backend."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with fluid_ops.use_backend(backend_name):
        return torch.ops.fluid_ops.attention_fwd(q, k, v, mask, causal, scale)


def grads_on(backend_name, q, k, v, mask, causal, do):
    """fluid_ops.attention's output and its q / k / v gradients for `do` on one named backend."""
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with fluid_ops.use_backend(backend_name):
        out = fluid_ops.attention(qs, ks, vs, key_padding_mask=mask, causal=causal)
        return out, torch.autograd.grad(out, (qs, ks, vs), do)


def ref_grads(q, k, v, mask, causal, do):
    """fp64 reference output and gradients, on the CPU."""
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    m = None if mask is None else mask.cpu()
    o = ref_attn.attention(q64, k64, v64, key_padding_mask=m, causal=causal)
    return o, torch.autograd.grad(o, (q64, k64, v64), do.cpu().double())


def naive_attention_autograd_lowp(q, k, v, mask, causal=True):
    """The contract formula (docs/contracts.md) in the low precision itself, differentiable (the 2x rule's baseline)."""
    nq, nk, d = q.shape[1], k.shape[1], q.shape[3]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    s = (qt @ kt.transpose(-1, -2)) * d ** -0.5
    allowed = torch.ones(1, 1, 1, nk, dtype=torch.bool) if mask is None else mask.view(-1, 1, 1, nk)
    if causal:
        allowed = allowed & (torch.arange(nk).view(1, nk) <= torch.arange(nq).view(nq, 1) + nk - nq)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return (p @ vt).transpose(1, 2)


# ---- denoiser ops ----------------------------------------------------------------------------------

def randomize(net, seed=0, std=0.3):
    """Random non-zero weights everywhere (MAR's init zeroes adaLN and the output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def lnm_inputs(r, d, layout, dtype=torch.float32, seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    xbig = torch.randn(r, d + 3, generator=g) * 2 + 0.5
    x = xbig[:, 1:d + 1].to(dtype) if layout == "chunk" else (torch.randn(r, d, generator=g) * 2 + 0.5).to(dtype)
    if layout == "chunk":  # shift, scale: column chunks of one (R, 3D) adaLN output (row stride 3D)
        ada = torch.randn(r, 3 * d, generator=g).to(dtype)
        shift, scale = ada[:, :d], ada[:, d:2 * d]
        x = x.to(dtype)
    elif layout == "broadcast":
        shift, scale = torch.randn(1, d, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)
    else:
        shift, scale = torch.randn(r, d, generator=g).to(dtype), torch.randn(r, d, generator=g).to(dtype)
    w = b = None
    if affine:
        w, b = torch.randn(d, generator=g) + 1, torch.randn(d, generator=g)
    return x, shift, scale, w, b


def ref_lnm(x, shift, scale, w, b, out_dtype=None, eps=1e-6):
    r, d = x.shape
    return rden.layernorm_modulate(x, shift.expand(r, d), scale.expand(r, d), w, b, eps, out_dtype)


def gr_inputs(r, d, layout, dtype=torch.float32, gdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(r, d, generator=g).to(dtype)
    y = torch.randn(r, d, generator=g).to(gdtype or dtype)
    if layout == "chunk":
        gate = torch.randn(r, 3 * d, generator=g).to(gdtype or dtype)[:, 2 * d:]
    elif layout == "broadcast":
        gate = torch.randn(1, d, generator=g).to(gdtype or dtype)
    else:
        gate = torch.randn(r, d, generator=g).to(gdtype or dtype)
    return h, gate, y


# ---- sample_categorical ----------------------------------------------------------------------------

def logits(n, v, dtype=torch.float32, seed=0, ties=False, neg_inf=False, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: ties at the argmax, the top-k threshold and the top-p cut
        x = torch.randint(-3, 3, (n, v), generator=g).float()
    else:
        x = torch.randn(n, v, generator=g) * scale
    if neg_inf and v > 1:
        x[torch.rand(n, v, generator=g) < 0.3] = float("-inf")
        x[:, 0] = 0.0  # a finite value in every row
    return x.to(dtype)


def uniform(n, seed=1):
    return torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def assert_same_indices(got, logits, u, **kw):
    """got must equal the reference, except in rows whose uniform sits so close to a CDF
    boundary (the reference's answer changes when u moves by 1e-12) that float64 exp rounding
    may decide; such rows must be rare."""
    want = ref_cat.sample_categorical(logits, uniform=u, **kw)
    diff = (got != want).nonzero().flatten()
    if diff.numel():
        lo = ref_cat.sample_categorical(logits[diff], uniform=(u[diff] - 1e-12).clamp(min=0), **kw)
        hi = ref_cat.sample_categorical(logits[diff], uniform=(u[diff] + 1e-12).clamp(max=1 - 2**-53), **kw)
        ambiguous = lo != hi
        assert bool(ambiguous.all()), f"{kw}: rows {diff[~ambiguous].tolist()} differ away from any CDF boundary"
        assert diff.numel() <= max(1, got.numel() // 100), f"{kw}: {diff.numel()} boundary rows"


# ---- diffusion sampling ----------------------------------------------------------------------------

def eps_net(seed=0, cls=rden.DenoiserMLP, ada_std=0.02):
    """A small net whose eps output tracks x_t (so 10-20 step samples stay O(1-1000) instead of
    exploding as with random weights): a large input-projection bias makes LN(h) nearly linear
    in x, and the output layer is least-squares fitted to give x back; the blocks' adaLN layers
    get small random weights so every block and the conditioning path are active."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = rden.DenoiserMLP(C, D, 2 * C, Z, BLOCKS)
    with torch.no_grad():
        net.input_proj.bias.copy_(torch.randn(D, generator=g) * 20)
        for n, p in net.named_parameters():
            if "adaLN" in n:
                p.copy_(torch.randn(p.shape, generator=g) * ada_std)
        xs = torch.randn(2048, C, generator=g) * 2
        t = torch.randint(0, 1000, (2048,), generator=g)
        y = net.time_embed(t) + net.cond_embed(torch.randn(2048, Z, generator=g))
        h = net.input_proj(xs)
        for blk in net.res_blocks:
            h = blk(h, y)
        feats = torch.nn.functional.layer_norm(h, (D,), eps=1e-6)
        net.final_layer.linear.weight[:C] = torch.linalg.lstsq(feats, xs).solution.T
        net.final_layer.linear.weight[C:] = torch.randn(C, D, generator=g) * 0.01  # variance channel
    if cls is rden.DenoiserMLP:
        return net
    out = cls(C, D, 2 * C, Z, BLOCKS)
    out.load_state_dict(net.state_dict(), strict=True)
    return out


def diffusion_inputs(n, cfg, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * n if cfg != 1.0 else n, Z, generator=g)
    noise = rdiff.draw_sampling_noise(n, C, steps, generator=g)
    return z, noise


class RecordOps(TorchDispatchMode):
    """Records every aten op that reads a value back to the host (.item() / tolist / bool(t))
    or creates a tensor from host data or moves one across devices."""

    HOST_DATA = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.lift_fresh_copy", "aten.scalar_tensor")

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        out = func(*args, **kwargs)
        if name in self.HOST_DATA:
            self.events.append(name)
        elif name in ("aten._to_copy", "aten.copy_", "aten.to"):
            devs = {a.device.type for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor):
                devs.add(out.device.type)
            if len(devs) > 1:
                self.events.append(f"{name} {sorted(devs)}")
        return out


def loop_events(net, z, noise, steps, cfg, device="cpu", gemm_dtype=None):
    mode = RecordOps()
    with mode:
        fluid_ops.diffusion_sample(net, z, num_steps=steps, cfg=cfg, noise=noise, temperature=0.9, gemm_dtype=gemm_dtype)
    return mode.events
