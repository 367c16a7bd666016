"""fluid_ops.models.Fluid: the four variants train, sample deterministically, round-trip their
state dict; the head runs on masked positions only; raster KV-cache generation equals full
recomputation; configs and bad input. Small shapes, the "hash" text encoder (one test: MiniLM)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fluid_ops
from fluid_ops.models import CONFIGS, Fluid, FluidConfig
from fluid_ops.reference import diffusion as ref_diffusion

VARIANTS = ["tiny", "tiny-raster", "tiny-discrete", "tiny-raster-discrete"]
# Smaller than "tiny" so each test takes a fraction of a second; every structural choice of the
# named config (order, token kind, sin-cos positions, pooled text, head positions) is kept.
SMALL = {"text.encoder": "hash", "image.size": 16, "image.patch_size": 4, "image.codebook_size": 16,
         "model.width": 64, "model.depth": 2, "model.num_heads": 2, "text.aligner_depth": 1, "head.depth": 2,
         "head.width": 64, "sampling.num_diffusion_steps": 5}
CAPTIONS = ["a red circle at the top left", "a blue square", "a green triangle at the bottom", "a red square"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def small(name, **kw):
    torch.manual_seed(0)
    if "raster" not in name:
        kw.setdefault("sampling.num_iter", 4)
    m = Fluid(name, **{**SMALL, **kw})
    if m.needs_tokenizer_fit:
        m.fit_tokenizer(images(), iters=5, generator=gen(9))
    return m


def images(b=4, size=16, seed=1):
    """Blocky images (2x2 cells of one colour each), so k-means has structure to find."""
    g = gen(seed)
    cells = torch.rand(b, 3, 2, 2, generator=g)
    return cells.repeat_interleave(size // 2, 2).repeat_interleave(size // 2, 3).contiguous()


def randomize_head(m, seed=123):
    """DenoiserMLP starts as the zero map (MAR's zero init): give the zero-initialised weights
    small random values so the head's output depends on z."""
    g = gen(seed)
    with torch.no_grad():
        for p in m.head.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return m


def spy_sampling(monkeypatch, kwarg):
    """Record the `kwarg` argument of every fluid_ops.sampling.diffusion_sample call (which still runs)."""
    seen = []
    real = fluid_ops.sampling.diffusion_sample

    def spy(*args, **kwargs):
        seen.append(kwargs[kwarg])
        return real(*args, **kwargs)

    monkeypatch.setattr(fluid_ops.sampling, "diffusion_sample", spy)
    return seen


def loss_at(m, seed=5):
    return m(images(), CAPTIONS, generator=gen(seed))


# ---- the four variants --------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_training_lowers_the_loss(name):
    """AdamW steps on one fixed batch with fixed draws: the loss at those draws falls."""
    m = small(name)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    with torch.no_grad():
        before = loss_at(m).item()
    for _ in range(8):
        opt.zero_grad()
        loss = loss_at(m)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = loss_at(m).item()
    assert after < 0.9 * before, (before, after)
    # every trainable parameter that the loss can reach got a gradient
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, no_grad


@pytest.mark.parametrize("name", VARIANTS)
def test_generate_is_seeded(name):
    m = randomize_head(small(name))
    a = m.generate(CAPTIONS[:2], generator=gen(0))
    b = m.generate(CAPTIONS[:2], generator=gen(0))
    c = m.generate(CAPTIONS[:2], generator=gen(1))
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # fluid_ops.generate: batches, same seed -> same images
    d = fluid_ops.generate(m, CAPTIONS[:3], batch_size=2, seed=4, progress=False)
    e = fluid_ops.generate(m, CAPTIONS[:3], batch_size=2, seed=4, progress=False)
    assert d.shape == (3, 3, 16, 16) and torch.equal(d, e)


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_round_trip(name, tmp_path):
    m = randomize_head(small(name))
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    loss_at(m).backward()
    opt.step()  # move away from the init
    path = tmp_path / "ckpt.pt"
    torch.save({"config": dataclasses.asdict(m.config), "model": m.state_dict()}, path)
    ck = torch.load(path, weights_only=True)
    m2 = Fluid.from_config_dict(ck["config"])
    assert m2.needs_tokenizer_fit == (m.config.token_kind == "discrete")  # a fresh codebook ...
    m2.load_state_dict(ck["model"], strict=True)
    assert not m2.needs_tokenizer_fit                                     # ... comes with the weights
    m.train(), m2.train()
    with torch.no_grad():
        assert torch.equal(loss_at(m), loss_at(m2))
    assert torch.equal(m.generate(CAPTIONS[:2], generator=gen(3)), m2.generate(CAPTIONS[:2], generator=gen(3)))
    assert not any(k.startswith("text_encoder") for k in ck["model"])


# ---- random order: the head sees the masked positions only ----------------------------------
def test_head_runs_on_masked_rows_only_and_matches_the_masked_full_loss():
    m = randomize_head(small("tiny", diffusion_batch_mul=2))
    m.train()
    rows_seen = []
    hook = m.head.net.register_forward_hook(lambda mod, args, out: rows_seen.append(args[0].shape[0]))
    loss = loss_at(m, seed=7)
    hook.remove()
    # the same computation by parts, from the same generator state
    g = gen(7)
    z, tokens, index = m._outputs(images(), CAPTIONS, g)
    b, l = tokens.shape[:2]
    num_masked = index.shape[1]
    assert 1 <= num_masked < l  # the mask ratio keeps some tokens known (min ratio 0.7 on 16 tokens)
    assert rows_seen == [b * num_masked * 2]  # the head ran once, on the masked rows x diffusion_batch_mul
    zs, ts = m._select(z, tokens, index)
    t, noise = m.draw_head_inputs(zs.shape[0], g)
    torch.testing.assert_close(m.head_loss(zs, ts, t=t, noise=noise), loss, rtol=1e-6, atol=1e-6)
    # the head on ALL rows, then masked, with the same t and noise at the masked rows
    mul, n_all = 2, b * l
    full_rows = (torch.arange(b)[:, None] * l + index).reshape(-1)               # row of (b, j) in B*L
    pos = (torch.arange(mul)[:, None] * n_all + full_rows[None, :]).reshape(-1)  # in the repeated rows
    t_all = torch.randint(0, 1000, (mul * n_all,), generator=gen(8))
    noise_all = torch.randn(mul * n_all, tokens.shape[-1], generator=gen(8))
    t_all[pos], noise_all[pos] = t, noise
    mask = torch.zeros(b, l).scatter_(1, index, 1.0).reshape(-1)
    full = ref_diffusion.diffusion_loss(m.head.net, tokens.reshape(n_all, -1), z.reshape(n_all, -1), mask,
                                        diffusion_batch_mul=mul, t=t_all, noise=noise_all,
                                        schedule=m.head.train_schedule)
    torch.testing.assert_close(full, loss, rtol=1e-5, atol=1e-6)


def test_discrete_masked_loss_equals_masked_full_cross_entropy():
    m = small("tiny-discrete")
    m.train()
    loss = loss_at(m, seed=11)
    z, tokens, index = m._outputs(images(), CAPTIONS, gen(11))
    mask = torch.zeros(tokens.shape).scatter_(1, index, 1.0).reshape(-1)
    full = m.head_loss(z.reshape(-1, z.shape[-1]), tokens.reshape(-1), mask=mask)
    torch.testing.assert_close(full, loss, rtol=1e-6, atol=1e-6)


# ---- raster order: KV cache == full recomputation ------------------------------------------
@pytest.mark.parametrize("name", ["tiny-raster", "tiny-raster-discrete"])
def test_raster_kv_cache_equals_full_recomputation(name):
    m = randomize_head(small(name))
    m.eval()
    args = (CAPTIONS[:2], 4.5, "linear", 0.9, 5)
    with torch.no_grad():
        cached = m._generate_raster(*args, gen(2), False, True, None)
        full = m._generate_raster(*args, gen(2), False, False, None)
    if cached.is_floating_point():
        err, scale = (cached - full).abs().max().item(), full.abs().max().item()
        assert err <= 1e-4 * scale, (err, scale)
    else:
        assert torch.equal(cached, full)
    # the public path: the same images both ways
    a = m.generate(CAPTIONS[:2], generator=gen(6), kv_cache=True)
    b = m.generate(CAPTIONS[:2], generator=gen(6), kv_cache=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


# ---- conditioning options: head position embedding, adaLN text ---------------------------------
def test_head_pos_embed_puts_the_position_into_the_head_input():
    """head_pos_embed (MAR's diffusion_pos_embed): the head reads transformer output + a position
    embedding: the fixed sin-cos table itself (no new state) or, with learned positions, its own
    parameter (in the state dict, trained)."""
    m = small("tiny", head_pos_embed=True)
    assert m.head_pos is m.pos_embed and "head_pos" not in m.state_dict()
    z = torch.zeros(2, m.seq_len, m.config.model.width)
    torch.testing.assert_close(m._head_input(z), m.pos_embed.expand(2, -1, -1))
    torch.testing.assert_close(m._head_input(z[:, :1], positions=[5])[:, 0], m.pos_embed[:, 5].expand(2, -1))
    off = small("tiny", head_pos_embed=False)
    assert off.head_pos is None and torch.equal(off._head_input(z), z)
    # with the same weights, the loss changes: the head really reads it
    off.load_state_dict(m.state_dict())
    randomize_head(m), randomize_head(off)
    assert not torch.allclose(loss_at(m), loss_at(off))
    learned = small("tiny", head_pos_embed=True, pos_embed="learned")
    assert isinstance(learned.head_pos, torch.nn.Parameter) and "head_pos" in learned.state_dict()
    assert learned.head_pos is not learned.pos_embed
    randomize_head(learned)
    loss_at(learned).backward()
    assert learned.head_pos.grad is not None and learned.head_pos.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny", "tiny-raster"])
def test_text_adaln_conditions_every_block(name):
    """text_adaln: every block's norms are modulated by the pooled text; zero-initialised (a fresh
    model computes what the model without it does), trained, and the raster KV cache agrees."""
    m = small(name, text_adaln=True)
    plain = small(name, text_adaln=False)
    mods = [blk.modulation for blk in m.transformer.blocks]
    assert all(mod is not None and not mod[1].weight.any() for mod in mods)
    missing, unexpected = m.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".modulation." in k for k in missing)
    randomize_head(m), randomize_head(plain)
    with torch.no_grad():
        torch.testing.assert_close(loss_at(m), loss_at(plain))
    with torch.no_grad():
        for mod in mods:
            mod[1].weight.normal_(0, 0.05, generator=gen(4))
    assert not torch.allclose(loss_at(m), loss_at(plain))
    loss_at(m).backward()
    assert all(mod[1].weight.grad.abs().sum() > 0 for mod in mods)
    if name == "tiny-raster":
        a = m.generate(CAPTIONS[:2], generator=gen(6), kv_cache=True)
        b = m.generate(CAPTIONS[:2], generator=gen(6), kv_cache=False)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_running_standardize_tracks_the_training_statistics():
    """RunningStandardize: identity before any update; the k-th update weighs the batch max(1/k,
    momentum) (a plain average of the first batches); standardises with the result; no update in
    eval; its statistics are buffers (saved)."""
    from fluid_ops.models.fluid import RunningStandardize
    g = gen(3)
    norm = RunningStandardize(5, momentum=0.25)
    x = torch.randn(7, 5, generator=g)
    torch.testing.assert_close(norm(x), x)  # mean 0, variance 1 before any update
    batches = [torch.randn(64, 5, generator=g) * torch.tensor([1.0, 2, 3, 4, 5]) + 7.0 for _ in range(6)]
    mean, sq = torch.zeros(5), torch.ones(5)
    for k, b in enumerate(batches, 1):
        out = norm(b, update=True)
        w = max(1.0 / k, 0.25)
        mean, sq = mean + w * (b.mean(0) - mean), sq + w * ((b * b).mean(0) - sq)
        want = (b - mean) / torch.sqrt(sq - mean * mean + norm.eps)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert int(norm.count) == 6
    # three plain-average updates: the first batches' mean and spread, standardised to ~0 / ~1
    fresh = RunningStandardize(5)
    for b in batches[:3]:
        fresh(b, update=True)
    out = fresh(torch.cat(batches[:3]))
    assert out.mean(0).abs().max() < 1e-4 and (out.std(0) - 1).abs().max() < 0.02
    before = fresh.mean.clone()
    fresh(batches[4])  # no update
    assert torch.equal(fresh.mean, before) and set(fresh.state_dict()) == {"mean", "sq_mean", "count"}


def test_text_pool_encoder_standardises_the_frozen_encoder_mean():
    """text_pool "encoder": the pooled text is a linear map of the frozen encoder's mask-mean,
    standardised with statistics that follow the training captions (updated in training, saved
    with the model, fixed in eval); dropped rows and the CFG branch get the mean caption (0)."""
    m = small("tiny", text_pool="encoder")
    assert m.text_pool_proj.in_features == m.text_encoder.dim and m.text_pool_norm is not None
    assert {"text_pool_norm.mean", "text_pool_norm.sq_mean", "text_pool_norm.count"} <= set(m.state_dict())
    emb, mask = m.text_encoder.encode(CAPTIONS)
    mf = mask.float()[..., None]
    raw = (emb * mf).sum(1) / mf.sum(1)
    m.train()
    loss_at(m)
    assert int(m.text_pool_norm.count) == 1
    torch.testing.assert_close(m.text_pool_norm.mean, raw.mean(0))
    m.eval()
    with torch.no_grad():
        _, _, pooled = m.encode_text(CAPTIONS)
        std = (raw - raw.mean(0)) / torch.sqrt((raw * raw).mean(0) - raw.mean(0) ** 2 + m.text_pool_norm.eps)
        torch.testing.assert_close(pooled, m.text_pool_proj(std), rtol=1e-4, atol=1e-4)
        _, _, dropped = m.encode_text(CAPTIONS, drop=torch.tensor([True, False, True, False]))
        bias = m.text_pool_proj.bias
        torch.testing.assert_close(dropped[0], bias)
        torch.testing.assert_close(dropped[2], bias)
        torch.testing.assert_close(dropped[1], pooled[1])
        nctx, nmask = m.null_context(2)
        torch.testing.assert_close(m._null_pooled(nctx, nmask), bias.expand(2, -1))
    assert int(m.text_pool_norm.count) == 1  # eval does not update
    a = m.generate(CAPTIONS[:2], generator=gen(2))
    again = small("tiny", text_pool="encoder")
    again.load_state_dict(m.state_dict())
    again.eval()
    torch.testing.assert_close(again.generate(CAPTIONS[:2], generator=gen(2)), a)
    with pytest.raises(ValueError, match="text.pool must be one of"):
        Fluid("tiny", text_encoder="hash", text_pool="max")


# ---- configs -------------------------------------------------------------------------------
PAPER_PARAMS = {"fluid-166m": 166e6, "fluid-369m": 369e6, "fluid-665m": 665e6, "fluid-1.1b": 1.1e9,
                "fluid-3.1b": 3.1e9, "fluid-10.5b": 10.5e9}


def test_paper_configs_match_the_paper_table_and_parameter_counts():
    table = {"fluid-166m": (12, 768, 12), "fluid-369m": (16, 1024, 16), "fluid-665m": (20, 1280, 16),
             "fluid-1.1b": (24, 1536, 16), "fluid-3.1b": (32, 2304, 24), "fluid-10.5b": (34, 4096, 64)}
    for name, (depth, width, heads) in table.items():
        c = CONFIGS[name]
        assert (c.depth, c.width, c.num_heads, c.aligner_depth) == (depth, width, heads, 6)
        assert (c.image_size // c.patch_size) ** 2 == 256
        with torch.device("meta"):  # shapes only, no memory
            n = Fluid(name, text_encoder="hash").num_parameters()
        assert abs(n / PAPER_PARAMS[name] - 1) < 0.08, (name, n)
    tiny = CONFIGS["tiny"]
    assert (tiny.image_size, tiny.patch_size, tiny.width, tiny.depth, tiny.head_depth, tiny.head_width,
            tiny.diffusion_batch_mul, tiny.pos_embed, tiny.text_pool_add, tiny.num_iter) == \
        (32, 4, 128, 4, 3, 256, 1, "sincos", True, 16)
    assert tiny.sampling_defaults() == {"num_iter": 16, "cfg": 3.0, "temperature": 0.7, "cfg_uncond": "all"}
    assert CONFIGS["tiny-discrete"].sampling_defaults() == {"num_iter": 16, "cfg": 1.6, "temperature": 1.05,
                                                            "cfg_uncond": "text"}
    assert CONFIGS["tiny-raster-discrete"].sampling_defaults()["cfg"] == 2.5
    assert CONFIGS["fluid-166m"].sampling_defaults() == {"num_iter": None, "cfg": 5.0, "temperature": 0.975,
                                                         "cfg_uncond": "text"}


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="unknown config 'fluid-7b'.*tiny-raster"):
        Fluid("fluid-7b")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['widht'\].*width"):
        Fluid("tiny", widht=64)
    with pytest.raises(ValueError, match="head dim"):
        Fluid("tiny", text_encoder="hash", width=600, num_heads=2)  # head dim 300 > 256
    with pytest.raises(ValueError, match="token_kind 'discrete' goes with tokenizer 'kmeans'"):
        Fluid("tiny", text_encoder="hash", token_kind="discrete")
    with pytest.raises(ValueError, match="unknown config field"):
        Fluid.from_config_dict({"depht": 3})
    with pytest.raises(ValueError, match="text.layer must be an int"):
        Fluid("tiny", text_encoder="hash", text_layer=True)
    m = small("tiny")
    with pytest.raises(ValueError, match="prompts is empty"):
        m.generate([])
    with pytest.raises(ValueError, match=r"captions\[1\] must be a non-empty str"):
        m.generate(["a red circle", "  "])
    with pytest.raises(ValueError, match="prompts must be a list"):
        m.generate("a red circle")
    with pytest.raises(ValueError, match=r"images must be a float tensor of shape \(B, 3, 16, 16\)"):
        m(torch.rand(2, 3, 32, 32), CAPTIONS[:2])
    with pytest.raises(ValueError, match="got 3 captions for 2 images"):
        m(torch.rand(2, 3, 16, 16), CAPTIONS[:3])
    with pytest.raises(ValueError, match="cfg_schedule"):
        m.generate(["a red circle"], cfg_schedule="cosine")
    with pytest.raises(ValueError, match="prompts is empty"):
        fluid_ops.generate(m, [], progress=False)
    with pytest.raises(ValueError, match="one token per step"):
        Fluid("tiny-raster", **SMALL, num_iter=4)
    r = small("tiny-raster")
    with pytest.raises(ValueError, match="one token per step"):
        r.generate(["a red circle"], num_iter=3)
    torch.manual_seed(0)
    d = Fluid("tiny-discrete", **SMALL)
    assert d.needs_tokenizer_fit
    with pytest.raises(RuntimeError, match="fit_tokenizer"):
        d(images(), CAPTIONS)


def _generate_all_masked_uncond(m, prompts, generator):
    """cfg_uncond="all" written out: at every step, the unconditional rows (null text) run the
    transformer on an input with every token masked, beside the conditional rows (as a batch)."""
    from fluid_ops.reference import schedules
    d = m.config.sampling_defaults()
    b, l = len(prompts), m.seq_len
    ctx, cmask, pooled = m._conditions(prompts, True)
    tokens = m._empty_tokens(b)
    known = torch.zeros(b, l, dtype=torch.bool)
    orders = schedules.random_orders(b, l, generator=generator)
    after = schedules.mask_schedule(l, d["num_iter"])
    scales = schedules.cfg_schedule(d["cfg"], l, d["num_iter"], "linear")
    bidx, n_before = torch.arange(b)[:, None], l
    for k in range(d["num_iter"]):
        x = torch.where(known[..., None], m._embed_tokens(tokens), m.mask_token)
        x = m._add_position_and_text(torch.cat([x, m.mask_token.expand(b, l, -1)]), pooled)
        z = m._head_input(m.transformer(x, context=ctx, context_mask=cmask, cond=m._cond(pooled)))
        idx = orders[:, after[k]:n_before]
        zc, zu = (z[rows][bidx, idx].reshape(-1, z.shape[-1]) for rows in (slice(0, b), slice(b, None)))
        new = m._sample_rows(zc, zu if scales[k] != 1.0 else None, scales[k], d["temperature"],
                             m.config.sampling.num_diffusion_steps, generator, None)
        tokens[bidx, idx] = new.reshape(b, idx.shape[1], *tokens.shape[2:]).to(tokens.dtype)
        known[bidx, idx] = True
        n_before = after[k]
    return m.tokenizer.decode(tokens).float().clamp(0, 1)


@pytest.mark.parametrize("name", ["tiny", "tiny-discrete"])
def test_cfg_uncond_all_masks_every_known_token_in_the_unconditional_branch(name):
    """cfg_uncond="all": CFG's unconditional branch is the null text with no known token. The
    generation (that branch run once, reused at every step) equals the branch recomputed at every
    step; it differs from the null-text-only branch ("text") when CFG is on, not when it is off."""
    m = randomize_head(small(name, cfg=4.0))
    with torch.no_grad():
        m.mask_token.mul_(50.0)   # make known vs masked inputs matter at init
        want = _generate_all_masked_uncond(m, CAPTIONS[:3], gen(2))
    got = m.generate(CAPTIONS[:3], cfg_uncond="all", generator=gen(2))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - m.generate(CAPTIONS[:3], cfg_uncond="text", generator=gen(2))).abs().max() > 1e-2
    assert torch.equal(small(name, cfg=4.0, cfg_uncond="all").generate(CAPTIONS[:3], generator=gen(2)),
                       small(name, cfg=4.0, cfg_uncond="all").generate(CAPTIONS[:3], cfg_uncond=None,
                                                                         generator=gen(2)))
    assert torch.equal(m.generate(CAPTIONS[:2], cfg=1.0, cfg_uncond="all", generator=gen(3)),
                       m.generate(CAPTIONS[:2], cfg=1.0, cfg_uncond="text", generator=gen(3)))
    with pytest.raises(ValueError, match="cfg_uncond must be 'text'"):
        m.generate(CAPTIONS[:1], cfg_uncond="none")
    with pytest.raises(ValueError, match="cfg_uncond must be 'text'"):
        small(name, cfg_uncond="image")
    with pytest.raises(ValueError, match="cfg_uncond 'all' is for random order"):
        small(name.replace("tiny", "tiny-raster"), cfg_uncond="all")
    with pytest.raises(ValueError, match="cfg_uncond 'all' is for random order"):
        small(name.replace("tiny", "tiny-raster")).generate(CAPTIONS[:1], cfg_uncond="all")


@pytest.mark.parametrize("order", ["random", "raster"])
def test_pixel_tokens_sample_with_the_predicted_x0_clamped(order, monkeypatch):
    """Pixel-patch tokens lie in [-1, 1]: sampling clamps each step's predicted x_0 there by default
    (without it the first steps from t ~ 1000 amplify the head's eps error ~1e4-fold: a tiny model
    trained 600 steps sampled noise of magnitude ~1e3). A head whose eps is far off still gives
    tokens in [-1, 1]; clip_denoised=False turns the clamp off."""
    seen = spy_sampling(monkeypatch, "clip_denoised")
    name = "tiny" if order == "random" else "tiny-raster"
    m = randomize_head(small(name), seed=7)
    with torch.no_grad():  # a head with large, wrong eps: unclamped samples leave [-1, 1] far behind
        m.head.net.final_layer.linear.weight[: m.token_dim].mul_(200.0)  # eps channels only
    captured = []
    decode = m.tokenizer.decode
    monkeypatch.setattr(m.tokenizer, "decode", lambda t: captured.append(t) or decode(t))
    m.generate(["a red circle"], generator=gen(0))
    assert seen and all(seen) and captured[-1].abs().max() <= 1.0
    seen.clear()
    free = small(name, clip_denoised=False)
    free.load_state_dict(m.state_dict())
    free_decode = free.tokenizer.decode
    monkeypatch.setattr(free.tokenizer, "decode", lambda t: captured.append(t) or free_decode(t))
    free.generate(["a red circle"], generator=gen(0))
    assert seen and not any(seen) and captured[-1].abs().max() > 2.0
    with pytest.raises(ValueError, match="VAE latents are not bounded"):
        Fluid(FluidConfig(tokenizer="vae", vae_path="/x", clip_denoised=True))


def test_noise_shift_trains_and_samples_on_the_shifted_schedule(monkeypatch, tmp_path):
    """noise_shift k: the head's training schedule and every sampling call use the cosine schedule
    with its SNR divided by k^2; the loss changes with it, a checkpoint keeps it, bad values fail."""
    plain = randomize_head(small("tiny"))
    shifted = small("tiny", noise_shift=4.0)
    shifted.load_state_dict(plain.state_dict())
    assert plain.head.train_schedule.noise_shift == 1.0 and shifted.head.train_schedule.noise_shift == 4.0
    ab, ab_k = plain.head.train_schedule.alphas_cumprod, shifted.head.train_schedule.alphas_cumprod
    assert ab_k[500] < ab[500] / 4  # SNR / 16 at the middle step
    assert abs(loss_at(plain).item() - loss_at(shifted).item()) > 1e-4
    seen = spy_sampling(monkeypatch, "noise_shift")
    a = shifted.generate(["a red circle"], generator=gen(0))
    assert seen and all(k == 4.0 for k in seen)
    b = plain.generate(["a red circle"], generator=gen(0))
    assert (a - b).abs().max() > 1e-3
    path = tmp_path / "m.pt"
    torch.save({"config": dataclasses.asdict(shifted.config)}, path)
    again = Fluid.from_config_dict(torch.load(path)["config"])
    assert again.config.head.noise_shift == 4.0 and again.head.train_schedule.noise_shift == 4.0
    for bad in (0, -1.0, float("inf"), "8"):
        with pytest.raises(ValueError, match="noise_shift must be a finite number > 0"):
            Fluid("tiny", text_encoder="hash", noise_shift=bad)


# ---- the real text encoder -------------------------------------------------------------------
def test_minilm_text_encoder_stays_out_of_the_state_dict():
    m = small("tiny", text_encoder="minilm")
    assert m.text_encoder.dim == 384 and m.text_encoder.layer == 2   # the tiny configs read block 2 of 6
    sd = m.state_dict()
    assert not any("text_encoder" in k for k in sd)
    assert m.num_parameters() < 2_000_000  # MiniLM alone has 22.7M
    assert not any(p.requires_grad for p in m.text_encoder.parameters())
    m.train()
    loss = loss_at(m)
    loss.backward()
    assert torch.isfinite(loss)
    # different captions give different text contexts (the encoder is really used)
    ctx, mask, _ = m.encode_text(["a red circle", "a blue square at the bottom right"])
    assert mask.shape[0] == 2 and not torch.allclose(ctx[0, :2], ctx[1, :2])
    out = m.generate(["a red circle"], generator=gen(0))
    assert out.shape == (1, 3, 16, 16)


# ---- mixed precision ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny-raster"])
def test_runs_under_bf16_autocast(name):
    """The training loop autocasts to bf16 on GPUs: the loss, its backward and both samplers run
    under autocast (on the CPU here; the numbers are only checked to be finite / in range)."""
    m = randomize_head(small(name))
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_at(m)
    loss.backward()
    assert torch.isfinite(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.generate(CAPTIONS[:2], generator=gen(0), num_diffusion_steps=2)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    m = randomize_head(small("tiny"))
    m.train()
    loss_at(m).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m2 = randomize_head(small("tiny", grad_checkpointing=True))
    m2.load_state_dict(m.state_dict())
    m2.train()
    loss_at(m2).backward()
    for n, p in m2.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


# ---- the grouped config and its deprecated flat names ----------------------------------------
def test_config_groups_and_one_name_per_quantity():
    from fluid_ops.models.fluid_config import FLAT_NAMES, REMOVED
    c = CONFIGS["tiny"]
    assert (c.model.width, c.image.size, c.text.layer, c.head.width, c.sampling.num_diffusion_steps) == \
        (128, 32, 2, 256, 100)
    # every old flat name maps to exactly one grouped field, and every grouped field has one
    paths = {(g, n) for g, n in FLAT_NAMES.values()}
    grouped = {(None, f.name) for f in dataclasses.fields(c) if not dataclasses.is_dataclass(getattr(c, f.name))}
    grouped |= {(f.name, g.name) for f in dataclasses.fields(c) if dataclasses.is_dataclass(getattr(c, f.name))
                for g in dataclasses.fields(getattr(c, f.name))}
    assert len(paths) == len(FLAT_NAMES) == 34 - len(REMOVED) and paths == grouped
    m = Fluid("tiny", **{**SMALL, "model.depth": 3, "text": {"pool": "aligned"}})
    assert m.config.model.depth == 3 and m.config.text.pool == "aligned" and m.config.text.layer == 2
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['text.encodr'\]"):
        Fluid("tiny", **{"text.encodr": "hash"})


def test_flat_config_names_still_work_and_warn():
    """Deprecated for one release: FluidConfig(**flat), Fluid(name, **flat), flat attribute reads,
    and the flat config dicts of older checkpoints (with removed knobs at their old default)."""
    with pytest.warns(DeprecationWarning, match="width -> model.width"):
        c = FluidConfig(width=64, num_heads=2, text_encoder="hash", num_sampling_steps=7)
    assert (c.model.width, c.model.num_heads, c.text.encoder, c.sampling.num_diffusion_steps) == (64, 2, "hash", 7)
    with pytest.warns(DeprecationWarning, match="num_sampling_steps -> sampling.num_diffusion_steps"):
        assert c.num_sampling_steps == 7
    with pytest.warns(DeprecationWarning):
        m = Fluid("tiny", text_encoder="hash", depth=1)
    assert m.config.model.depth == 1
    new = Fluid("tiny", **SMALL)
    flat = {**new.config.flat_dict(), "mask_ratio_kind": "truncnorm"}   # as the old code saved it
    assert len(flat) == 34
    with pytest.warns(DeprecationWarning):
        old = Fluid.from_config_dict(flat)
    assert old.config == new.config
    assert Fluid.from_config_dict(dataclasses.asdict(new.config)).config == new.config
    with pytest.raises(ValueError, match="mask_ratio_kind was removed"):
        with pytest.warns(DeprecationWarning):
            Fluid.from_config_dict({**flat, "mask_ratio_kind": "uniform"})


def test_old_flat_checkpoint_loads_and_resumes(tmp_path):
    """A run folder whose checkpoint holds a flat config (the old format) loads with load_run
    and resumes training with a model built from today's grouped config."""
    from fluid_ops.checkpoint import load_checkpoint, save_checkpoint
    from fluid_ops.data import ShapesDataset
    from fluid_ops.models import load_run
    from fluid_ops.training import train
    m = small("tiny")
    ds = ShapesDataset(size=16, length=8, seed=0)
    train(m, ds, out_dir=tmp_path, steps=1, batch_size=2, progress=False, warmup_steps=1)
    path = tmp_path / "checkpoint.pt"
    ck = load_checkpoint(path)
    ck["config"] = {**m.config.flat_dict(), "mask_ratio_kind": "truncnorm"}
    save_checkpoint(ck, path)
    with pytest.warns(DeprecationWarning):
        run = load_run(tmp_path)
    assert run.config == m.config and run.step == 1 and run.weights == "ema"
    with pytest.warns(DeprecationWarning):
        res = train(small("tiny"), ds, out_dir=tmp_path, steps=2, batch_size=2, progress=False, warmup_steps=1)
    assert res.step == 2
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_run(tmp_path / "nowhere")
