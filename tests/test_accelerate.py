"""fluid_ops.accelerate on a stand-in of MAR's own class (tests/mar_standin.py: the installed timm's
Block / Attention / Mlp, MAR's DiffLoss / SimpleMLPAdaLN / IDDPM sampling): same outputs before and
after, fluid_ops attention calls counted on the op itself (torch.profiler), any head dim, the
report, refusals that change nothing, idempotence, undo."""
from __future__ import annotations

import copy
import importlib
import io

import pytest
import torch
import torch.nn as nn

from tests import mar_standin as mar

acc = importlib.import_module("fluid_ops.accelerate")  # the module (fluid_ops may re-export the function)
accelerate = acc.accelerate


def tiny(seed=0, **kw) -> mar.MAR:
    args = dict(attn_dropout=0.0, proj_dropout=0.0, num_sampling_steps="10")
    args.update(kw)
    torch.manual_seed(seed)
    return mar.randomize_head(mar.MAR(**args), seed=seed)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of fluid_ops.attention / diffusion_sample made by the swapped code."""
    n = {"attention": 0, "diffusion_sample": 0}

    def wrap(name, fn):
        def counted(*a, **k):
            n[name] += 1
            return fn(*a, **k)
        return counted

    monkeypatch.setattr(acc, "attention", wrap("attention", acc.attention))
    monkeypatch.setattr(acc, "diffusion_sample", wrap("diffusion_sample", acc.diffusion_sample))
    return n


def zero(calls):
    calls.update(attention=0, diffusion_sample=0)


def pair(**kw):
    """(MAR as is, an accelerated copy with the same weights)."""
    ref = tiny(**kw)
    fast = accelerate(copy.deepcopy(ref))
    return ref, fast


def close(got, want, rel=1e-5):
    """fp32 tolerance relative to the largest magnitude (samples of a random head get large)."""
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=rel * (1.0 + want.abs().max().item()))


def inputs(model, bsz=3, masked=10, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, model.seq_len, model.token_embed_dim, generator=g)
    orders = torch.stack([torch.randperm(model.seq_len, generator=g) for _ in range(bsz)])
    mask = torch.zeros(bsz, model.seq_len).scatter(-1, orders[:, :masked], 1.0)
    labels = torch.randint(0, model.num_classes, (bsz,), generator=g)
    return x, mask, model.class_emb(labels).detach()


def swapped(model):
    attns = [b.attn for b in list(model.encoder_blocks) + list(model.decoder_blocks)]
    return ["forward" in a.__dict__ for a in attns] + ["sample" in model.diffloss.__dict__]


# ---- same outputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("qk_norm,fused_attn,dim", [(False, True, 64), (True, True, 64), (False, False, 64),
                                                    (False, True, 160)])
def test_encoder_decoder_eval_equal(calls, qk_norm, fused_attn, dim):
    """dim 160 with 2 heads: head dim 80, as MAR-H."""
    ref, fast = pair(qk_norm=qk_norm, fused_attn=fused_attn, encoder_embed_dim=dim, decoder_embed_dim=dim)
    zero(calls)  # the probes of accelerate also call fluid_ops.attention
    if qk_norm:  # non-trivial q/k norms
        with torch.no_grad():
            for m in (ref, fast):
                for blk in m.encoder_blocks:
                    blk.attn.q_norm.weight.copy_(torch.linspace(0.5, 1.5, blk.attn.head_dim))
    ref.eval(), fast.eval()
    x, mask, cls = inputs(ref)
    with torch.no_grad():
        e_ref, e_fast = ref.forward_mae_encoder(x, mask, cls), fast.forward_mae_encoder(x, mask, cls)
        close(e_fast, e_ref)
        close(fast.forward_mae_decoder(e_ref, mask), ref.forward_mae_decoder(e_ref, mask))
    assert calls["attention"] == len(ref.encoder_blocks) + len(ref.decoder_blocks)


def test_encoder_with_key_masking_equal(calls):
    """All positions through the encoder with a boolean key mask (timm >= 1.0 attn_mask): becomes
    fluid_ops' key_padding_mask; the known positions equal MAR's dropped-token encoder."""
    if not mar.block_takes_attn_mask():
        pytest.skip(f"timm {mar.TIMM_VERSION}: Block.forward takes no attn_mask")
    ref, fast = pair()
    zero(calls)  # the probes of accelerate also call fluid_ops.attention
    ref.eval(), fast.eval()
    x, mask, cls = inputs(ref, masked=12)
    with torch.no_grad():
        full_ref = ref.forward_mae_encoder(x, mask, cls, key_masking=True)
        full_fast = fast.forward_mae_encoder(x, mask, cls, key_masking=True)
        dropped = ref.forward_mae_encoder(x, mask, cls)
    close(full_fast, full_ref)
    assert calls["attention"] == len(ref.encoder_blocks)
    keep = torch.cat([torch.ones(3, ref.buffer_size), 1 - mask], 1).bool()
    close(full_fast[keep].reshape(dropped.shape), dropped)


@pytest.mark.parametrize("proj_dropout", [0.0, 0.2])
def test_training_loss_and_grads_equal(calls, proj_dropout):
    ref, fast = pair(proj_dropout=proj_dropout)
    zero(calls)  # the probes of accelerate also call fluid_ops.attention
    ref.train(), fast.train()
    imgs = torch.randn(2, ref.vae_embed_dim, ref.seq_h, ref.seq_w)
    labels = torch.tensor([1, 7])
    torch.manual_seed(3)
    l_ref = ref(imgs, labels)
    torch.manual_seed(3)
    l_fast = fast(imgs, labels)
    close(l_fast, l_ref)
    assert calls["attention"] == len(ref.encoder_blocks) + len(ref.decoder_blocks)
    l_ref.backward(), l_fast.backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            close(q.grad, p.grad, rel=1e-4)


def test_training_with_attention_dropout_runs_timm(calls):
    """fluid_ops.attention has no dropout: with attn_drop p > 0 in training, timm's own forward runs
    (same RNG draws, same loss); in eval the fluid path runs."""
    ref, fast = pair(attn_dropout=0.3, proj_dropout=0.1)
    zero(calls)  # the probes of accelerate also call fluid_ops.attention
    ref.train(), fast.train()
    imgs = torch.randn(2, ref.vae_embed_dim, ref.seq_h, ref.seq_w)
    labels = torch.tensor([0, 4])
    torch.manual_seed(9)
    l_ref = ref(imgs, labels)
    torch.manual_seed(9)
    l_fast = fast(imgs, labels)
    assert calls["attention"] == 0
    assert torch.equal(l_fast, l_ref)
    fast.eval()
    x, mask, cls = inputs(fast)
    with torch.no_grad():
        fast.forward_mae_encoder(x, mask, cls)
    assert calls["attention"] == len(fast.encoder_blocks)


@pytest.mark.parametrize("cfg,temperature", [(1.0, 1.0), (1.0, 0.8), (3.0, 0.95), (1.5, 1.0)])
def test_diffloss_sample_equal_under_global_seed(calls, cfg, temperature):
    ref, fast = pair()
    zero(calls)  # the probes of accelerate also call fluid_ops.attention
    ref.eval(), fast.eval()
    z = torch.randn(8, 64)
    torch.manual_seed(11)
    want = ref.diffloss.sample(z, temperature, cfg)
    after_ref = torch.rand(4)  # the global RNG must end where MAR's leaves it
    torch.manual_seed(11)
    got = fast.diffloss.sample(z, temperature, cfg)
    after_fast = torch.rand(4)
    assert calls["diffusion_sample"] == 1
    assert got.shape == want.shape == (8, ref.token_embed_dim)
    half = 4 if cfg != 1.0 else 8  # with guidance MAR keeps only the first (cond) half
    close(got[:half], want[:half])
    assert torch.equal(after_fast, after_ref)
    torch.manual_seed(12)  # a different seed gives different samples (the noise is really used)
    assert not torch.allclose(fast.diffloss.sample(z, temperature, cfg)[:half], got[:half])


def test_diffloss_sample_tensor_cfg(calls):
    """MAR's sample_tokens passes a one-element tensor as cfg (the linear schedule)."""
    ref, fast = pair()
    zero(calls)  # the probes of accelerate also call fluid_ops.attention
    z = torch.randn(6, 64)
    cfg = torch.tensor([2.5])
    torch.manual_seed(1)
    want = ref.diffloss.sample(z, 1.0, cfg)
    torch.manual_seed(1)
    got = fast.diffloss.sample(z, 1.0, cfg)
    close(got[:3], want[:3])


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_sample_tokens_equal(calls, cfg):
    ref, fast = pair()
    zero(calls)  # the probes of accelerate also call fluid_ops.attention
    ref.eval(), fast.eval()
    labels = torch.tensor([3, 5])
    with torch.no_grad():
        torch.manual_seed(21)
        want = ref.sample_tokens(2, num_iter=4, cfg=cfg, labels=labels, temperature=0.9)
        torch.manual_seed(21)
        got = fast.sample_tokens(2, num_iter=4, cfg=cfg, labels=labels, temperature=0.9)
    close(got, want)
    assert calls["diffusion_sample"] == 4
    assert calls["attention"] == 4 * (len(ref.encoder_blocks) + len(ref.decoder_blocks))


def test_precision_bf16_and_the_callers_autocast(calls):
    """precision="bf16": sample_tokens under bf16 autocast (attention on bf16 inputs, bf16 head GEMMs),
    rounding-level close to MAR's fp32; precision=None under the caller's own bf16 autocast does
    the same; precision="fp32" and undo take the wrapper away."""
    ref, fast = pair()
    ref.eval(), fast.eval()
    labels = torch.tensor([3, 5])

    def sample(m):
        torch.manual_seed(21)
        with torch.no_grad():
            return m.sample_tokens(2, num_iter=4, cfg=2.0, labels=labels, temperature=0.0)

    want = sample(ref)
    accelerate(fast, precision="bf16")
    assert "sample_tokens" in fast.__dict__
    got = sample(fast)
    assert got.dtype == want.dtype and torch.isfinite(got).all()
    assert not torch.equal(got, want)  # really in bf16
    close(got, want, rel=0.1)
    accelerate(fast)  # precision None: no wrapper; the caller's autocast is followed
    assert "sample_tokens" not in fast.__dict__
    with torch.autocast("cpu", torch.bfloat16):
        close(sample(fast), want, rel=0.1)
    accelerate(fast, precision="fp32")
    close(sample(fast), want)
    accelerate(fast, precision="bf16")
    accelerate(fast, undo=True)
    assert "sample_tokens" not in fast.__dict__
    with pytest.raises(ValueError, match="precision must be one of"):
        accelerate(fast, precision="half")


# ---- the model stays the same model -------------------------------------------------------
def test_state_dict_types_and_parameters_unchanged():
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    types = [(n, type(x)) for n, x in m.named_modules()]
    params = [id(p) for p in m.parameters()]
    assert accelerate(m) is m
    after = m.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [(n, type(x)) for n, x in m.named_modules()] == types
    assert [id(p) for p in m.parameters()] == params


def test_head_shares_parameters_with_mar_net():
    """Weight updates after accelerate (in place, or a replaced Parameter) are seen by sampling."""
    ref, fast = pair()
    z = torch.randn(4, 64)
    sample = fast.diffloss.sample
    torch.manual_seed(0)
    sample(z)
    new = mar.randomize_head(tiny(seed=1), seed=7).diffloss.net.state_dict()
    ref.diffloss.net.load_state_dict(new)
    fast.diffloss.net.load_state_dict(new)  # copies in place into the shared tensors
    torch.manual_seed(4)
    want = ref.diffloss.sample(z)
    torch.manual_seed(4)
    close(fast.diffloss.sample(z), want)
    with torch.no_grad():  # a replaced Parameter object
        w = ref.diffloss.net.final_layer.linear.weight * 1.5
    ref.diffloss.net.final_layer.linear.weight = nn.Parameter(w.clone())
    fast.diffloss.net.final_layer.linear.weight = nn.Parameter(w.clone())
    torch.manual_seed(4)
    want2 = ref.diffloss.sample(z)
    torch.manual_seed(4)
    close(fast.diffloss.sample(z), want2)
    assert not torch.allclose(want2, want)


def test_deepcopy_and_pickle_keep_the_swaps(calls):
    _, fast = pair()
    zero(calls)  # the probes of accelerate also call fluid_ops.attention
    for other in (copy.deepcopy(fast), _roundtrip(fast)):
        assert all(swapped(other))
        attn = other.encoder_blocks[0].attn
        assert attn.forward.args[0] is attn  # bound to the copy, not to the original
        assert other.diffloss.sample.args[0] is other.diffloss
        x, mask, cls = inputs(other)
        other.eval(), fast.eval()
        with torch.no_grad():
            close(other.forward_mae_encoder(x, mask, cls), fast.forward_mae_encoder(x, mask, cls))


def _roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_idempotent_and_undo(calls):
    ref, fast = pair()
    zero(calls)  # the probes of accelerate also call fluid_ops.attention
    fwd = fast.encoder_blocks[0].attn.forward
    accelerate(fast)
    zero(calls)
    assert fast.encoder_blocks[0].attn.forward is fwd
    assert len(fast.state_dict()) == len(ref.state_dict())
    ref.eval(), fast.eval()
    x, mask, cls = inputs(ref)
    with torch.no_grad():
        close(fast.forward_mae_encoder(x, mask, cls), ref.forward_mae_encoder(x, mask, cls))
    n = calls["attention"]
    assert n == len(ref.encoder_blocks)  # each block once, not wrapped twice
    assert accelerate(fast, undo=True) is fast
    assert not any(swapped(fast))
    assert acc._NET_KEY not in fast.diffloss.__dict__
    with torch.no_grad():
        assert torch.equal(fast.forward_mae_encoder(x, mask, cls), ref.forward_mae_encoder(x, mask, cls))
        torch.manual_seed(2)
        a = fast.diffloss.sample(torch.randn(4, 64))
        torch.manual_seed(2)
        b = ref.diffloss.sample(torch.randn(4, 64))
    assert torch.equal(a, b)
    assert calls["attention"] == n and calls["diffusion_sample"] == 0
    accelerate(fast, undo=True)  # undo of a plain model: nothing to do
    accelerate(fast)
    assert all(swapped(fast))


# ---- refusals change nothing --------------------------------------------------------------
def _snapshot(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return sd, [(n, type(x)) for n, x in model.named_modules()], swapped(model)


def _assert_unchanged(model, snap):
    sd, types, sw = snap
    now = model.state_dict()
    assert list(now) == list(sd) and all(torch.equal(now[k], sd[k]) for k in sd)
    assert [(n, type(x)) for n, x in model.named_modules()] == types
    assert swapped(model) == sw
    assert acc._NET_KEY not in model.diffloss.__dict__


def _break_qkv(m):
    del m.decoder_blocks[1].attn.qkv


def _scaled_attention(m):
    class _ScaledAttention(mar.Attention):  # (timm is imported on first use: see tests/mar_standin.py)
        """Looks like timm's Attention, computes something else."""

        def forward(self, x, attn_mask=None):
            return 2.0 * (super().forward(x) if attn_mask is None else super().forward(x, attn_mask=attn_mask))

    m.decoder_blocks[1].attn.__class__ = _ScaledAttention


def _gelu_in_head(m):
    m.diffloss.net.res_blocks[1].mlp[1] = nn.GELU()


def _wrong_betas(m):
    m.diffloss.gen_diffusion.betas = m.diffloss.gen_diffusion.betas * 1.01


def _rope(m):
    m.encoder_blocks[0].attn.rope = nn.Identity()


def _qnorm_over_all(m):
    m.encoder_blocks[0].attn.q_norm = nn.LayerNorm(64)


def _foreign_forward(m):
    m.encoder_blocks[1].attn.forward = lambda x, attn_mask=None: x


def _extra_head_param(m):
    m.diffloss.net.extra = nn.Linear(2, 2)


def _no_num_heads(m):
    del m.encoder_blocks[1].attn.num_heads


@pytest.mark.parametrize("break_it,exc,words", [
    (_break_qkv, TypeError, "decoder_blocks.1.attn.qkv"),
    (_scaled_attention, ValueError, "not recognised"),
    (_gelu_in_head, ValueError, "res_blocks.1.mlp.1"),
    (_wrong_betas, ValueError, "betas"),
    (_rope, ValueError, "rope"),
    (_qnorm_over_all, ValueError, "q_norm"),
    (_foreign_forward, ValueError, "already overridden"),
    (_extra_head_param, ValueError, "unexpected"),
    (_no_num_heads, TypeError, "encoder_blocks.1.attn.num_heads"),
])
def test_refusal_leaves_model_unchanged(break_it, exc, words):
    m = tiny()
    break_it(m)
    snap = _snapshot(m)
    with pytest.raises(exc, match=words.replace(".", r"\.")):
        accelerate(m)
    _assert_unchanged(m, snap)


def test_refuses_head_dims_over_256():
    m = tiny(encoder_embed_dim=520, encoder_num_heads=2)  # head dim 260
    snap = _snapshot(m)
    with pytest.raises(ValueError, match="head dim 260"):
        accelerate(m)
    _assert_unchanged(m, snap)


def test_refuses_an_attention_forward_with_unknown_keywords():
    """A future timm keyword is an error at accelerate time, never a silent fall-back to timm."""
    class _RopeKeywordAttention(mar.Attention):
        """A timm Attention whose forward takes a keyword fluid_ops does not implement."""

        def forward(self, x, attn_mask=None, is_causal=False, rope=None):
            return super().forward(x)

    m = tiny()
    m.encoder_blocks[1].attn.__class__ = _RopeKeywordAttention
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=r"encoder_blocks\.1\.attn: _RopeKeywordAttention\.forward takes rope"):
        accelerate(m)
    _assert_unchanged(m, snap)


def test_a_model_without_blocks_is_an_error():
    m = tiny()
    m.encoder_blocks = nn.ModuleList()
    m.decoder_blocks = nn.ModuleList()
    with pytest.raises(ValueError, match="no attention to swap"):
        accelerate(m)
    assert "sample" not in m.diffloss.__dict__


def test_refuses_models_that_are_not_mar():
    with pytest.raises(TypeError, match="encoder_blocks"):
        accelerate(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="nn.Module"):
        accelerate(object())
    m = tiny()
    del m.diffloss
    before = [("forward" in b.attn.__dict__) for b in m.encoder_blocks]
    with pytest.raises(TypeError, match="diffloss"):
        accelerate(m)
    assert [("forward" in b.attn.__dict__) for b in m.encoder_blocks] == before == [False, False]
    m = tiny()
    with pytest.raises(TypeError, match="gemm_dtype"):
        accelerate(m, gemm_dtype=torch.int8)
    assert not any(swapped(m))


def test_an_accelerated_model_with_a_broken_block_keeps_its_swaps():
    """A refusal on a second call does not half-undo the first one."""
    m = accelerate(tiny())
    _gelu_in_head(m)
    with pytest.raises(ValueError):
        accelerate(m)
    assert all(swapped(m))


def test_gemm_dtype_is_passed_to_diffusion_sample(calls, monkeypatch):
    seen = []
    inner = acc.diffusion_sample
    monkeypatch.setattr(acc, "diffusion_sample", lambda *a, **k: seen.append(k["gemm_dtype"]) or inner(*a, **k))
    m = accelerate(tiny(), gemm_dtype=torch.bfloat16)
    out = m.diffloss.sample(torch.randn(4, 64), 1.0, 2.0)
    assert seen == [torch.bfloat16] and out.shape == (4, m.token_embed_dim) and torch.isfinite(out).all()
    accelerate(m)  # a later call sets the option again (default: exact fp32)
    m.diffloss.sample(torch.randn(2, 64))
    assert seen == [torch.bfloat16, None]


def test_refuses_a_respacing_fluid_ops_does_not_reproduce():
    """A gen_diffusion whose kept steps (timestep_map) are not IDDPM's even respacing, which
    `diffusion_sample` cannot reproduce, is refused (ValueError naming timestep_map) and the model
    is left unchanged. IDDPM's own respacings are accepted, including counts such as 21 where a
    running float index and i * stride round differently."""
    m = tiny(num_sampling_steps="21")
    m.diffloss.gen_diffusion.timestep_map[5] += 1  # no longer IDDPM's spacing
    snap = _snapshot(m)
    with pytest.raises(ValueError, match="timestep_map"):
        accelerate(m)
    _assert_unchanged(m, snap)
    for steps in ("100", "64", "50", "250", "21", "23"):
        assert all(swapped(accelerate(tiny(num_sampling_steps=steps))))

# ---- real timm: fused calls counted on the op itself, any head dim, the report ----------------------
def _profile_counts(fn):
    """Calls of the fluid_ops attention op and of torch's SDPA while fn runs (torch.profiler names)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return {"fluid_ops": names.count("fluid_ops::attention_fwd"),
            "sdpa": names.count("aten::scaled_dot_product_attention")}


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("heads", [2, 4, 8])  # width 64: head dims 32, 16 (padded), 8 (padded)
def test_one_fluid_ops_attention_call_per_block_per_pass(fused_attn, heads):
    """With the installed timm, an accelerated MAR calls fluid_ops' attention op once per block per
    pass and torch's SDPA never; MAR's z is kept to fp32 rounding."""
    kw = dict(fused_attn=fused_attn, encoder_num_heads=heads, decoder_num_heads=heads)
    ref, fast = pair(**kw)
    ref.eval(), fast.eval()
    x, mask, cls = inputs(ref)
    nblocks = len(ref.encoder_blocks) + len(ref.decoder_blocks)
    out = {}

    def run(model, key):
        def go():
            with torch.no_grad():
                out[key] = model.forward_mae_decoder(model.forward_mae_encoder(x, mask, cls), mask)
        return go

    n_fast = _profile_counts(run(fast, "fast"))
    n_ref = _profile_counts(run(ref, "ref"))
    assert n_fast == {"fluid_ops": nblocks, "sdpa": 0}
    assert n_ref == {"fluid_ops": 0, "sdpa": nblocks if fused_attn else 0}
    close(out["fast"], out["ref"])
    rep_ = fast.fluid_ops_report
    assert (rep_.attention_modules, rep_.heads) == (nblocks, nblocks * heads)
    assert rep_.fused_attn == (fused_attn,)
    assert rep_.padded_head_dims == (() if heads == 2 else (64 // heads,))


def test_sample_tokens_counted_and_equal_with_small_heads():
    """MAR with head dim 16 (width 64, 4 heads): tokens under one seed equal MAR's, and every
    attention of every pass runs on fluid_ops."""
    ref, fast = pair(encoder_num_heads=4, decoder_num_heads=4)
    ref.eval(), fast.eval()
    labels = torch.tensor([3, 5])
    res = {}

    def go(model, key):
        def run():
            with torch.no_grad():
                torch.manual_seed(21)
                res[key] = model.sample_tokens(2, num_iter=4, cfg=2.0, labels=labels, temperature=0.9)
        return run

    n = _profile_counts(go(fast, "fast"))
    go(ref, "ref")()
    assert n == {"fluid_ops": 4 * (len(ref.encoder_blocks) + len(ref.decoder_blocks)), "sdpa": 0}
    close(res["fast"], res["ref"])


@pytest.mark.parametrize("d", [8, 16, 48, 160, 256])
def test_any_head_dim_up_to_256_is_accelerated(d):
    heads = 2
    ref, fast = pair(encoder_embed_dim=heads * d, decoder_embed_dim=heads * d, encoder_num_heads=heads,
                     decoder_num_heads=heads)
    ref.eval(), fast.eval()
    x, mask, cls = inputs(ref)
    with torch.no_grad():
        z_ref = ref.forward_mae_decoder(ref.forward_mae_encoder(x, mask, cls), mask)
        z_fast = fast.forward_mae_decoder(fast.forward_mae_encoder(x, mask, cls), mask)
    close(z_fast, z_ref)
    r = fast.fluid_ops_report
    assert r.head_dims == (d,)
    assert r.padded_head_dims == ((d,) if d < 128 and d not in (32, 64, 80, 96) else ())
    assert r.reference_head_dims == ((d,) if d > 128 else ())


def test_is_causal_keyword_runs_on_fluid_ops(calls):
    if "is_causal" not in __import__("inspect").signature(mar.Attention.forward).parameters:
        pytest.skip(f"timm {mar.TIMM_VERSION}: Attention.forward takes no is_causal")
    ref, fast = pair()
    zero(calls)
    ref.eval(), fast.eval()
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i in range(2):
            close(fast.encoder_blocks[i](x, is_causal=True), ref.encoder_blocks[i](x, is_causal=True))
            close(fast.encoder_blocks[i].attn(x, None, True), ref.encoder_blocks[i].attn(x, None, True))
    assert calls["attention"] == 4


def test_gated_attention_equal(calls):
    if "gated" not in __import__("inspect").signature(mar.Attention.__init__).parameters:
        pytest.skip(f"timm {mar.TIMM_VERSION}: no gated attention")
    ref = tiny()
    torch.manual_seed(3)
    for blk in ref.decoder_blocks:
        gated = mar.Attention(64, 2, qkv_bias=True, gated=True)
        gated.fused_attn = blk.attn.fused_attn
        blk.attn = gated
    fast = accelerate(copy.deepcopy(ref))
    zero(calls)
    ref.eval(), fast.eval()
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(fast.decoder_blocks[0](x), ref.decoder_blocks[0](x))
    assert calls["attention"] == 1


def test_report_is_logged_printed_and_undone(caplog, capsys):
    m = tiny()
    with caplog.at_level("INFO", logger="fluid_ops.accelerate"):
        accelerate(m, verbose=True)
    r = m.fluid_ops_report
    assert isinstance(r, acc.AccelerateReport)
    assert (r.attention_modules, r.encoder_modules, r.decoder_modules, r.heads) == (4, 2, 2, 8)
    assert r.head_dims == (32,) and r.diffusion_sample
    assert set(r.keywords) <= {"attn_mask", "is_causal"}
    text = str(r)
    assert "4 attention modules (2 encoder + 2 decoder), 8 heads, head dim 32" in text
    assert text in caplog.text and text in capsys.readouterr().out
    assert "fluid_ops_report" not in dict(m.named_modules()) and "fluid_ops_report" not in m.state_dict()
    accelerate(m, undo=True)
    assert not hasattr(m, "fluid_ops_report")
