"""fluid_ops.models.MAR: MAR's parameter names, its masking semantics, training and sampling on
tiny configs (CPU)."""
from __future__ import annotations

import ast
import copy
import math
from pathlib import Path

import pytest
import torch

import fluid_ops
from fluid_ops.models import MAR, mar_base, mar_huge, mar_large
from fluid_ops.reference import schedules

TSV = Path(__file__).parent / "data" / "mar_base_state_dict.tsv"


def tiny(**kw) -> MAR:
    args = dict(img_size=64, vae_stride=16, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
                decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2, buffer_size=4, class_num=10,
                diffloss_d=2, diffloss_w=64, num_sampling_steps="8", attn_dropout=0.0, proj_dropout=0.0)
    args.update(kw)
    torch.manual_seed(0)
    return MAR(**args)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randomize_zero_inits(model):
    """MAR zero-initialises the head's adaLN and output layers (no gradient reaches most of the
    model at step 0); give every parameter a small random value so gradients can be checked."""
    g = gen(123)
    with torch.no_grad():
        for p in model.diffloss.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def assert_close_scaled(a, b, rel=1e-5):
    """max |a - b| <= rel * max |b|: an untrained head's samples reach ~1e4 (its x0 estimate
    x_T / sqrt(alpha_bar_T) is never pulled back), so an element-wise rtol is the wrong yardstick."""
    assert a.shape == b.shape
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rel * scale, f"max abs diff {err} > {rel} * {scale}"


def tsv_shapes():
    out = {}
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, dtype = line.split("\t")
        assert dtype == "torch.float32"
        out[name] = tuple(ast.literal_eval(shape))
    return out


# ---- names and shapes ---------------------------------------------------------------------
def test_mar_base_state_dict_matches_tsv():
    with torch.device("meta"):
        m = mar_base()
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = tsv_shapes()
    assert len(want) == 364
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want
    assert all(v.dtype == torch.float32 for v in m.state_dict().values())
    assert sum(v.numel() for v in m.state_dict().values()) == pytest.approx(208e6, rel=0.01)


@pytest.mark.parametrize("factory,width,depth,heads,head_d,head_w,params", [
    (mar_large, 1024, 16, 16, 8, 1280, 479e6), (mar_huge, 1280, 20, 16, 12, 1536, 943e6)])
def test_large_huge_sizes(factory, width, depth, heads, head_d, head_w, params):
    with torch.device("meta"):
        m = factory()
    assert len(m.encoder_blocks) == len(m.decoder_blocks) == depth
    assert m.encoder_blocks[0].attn.num_heads == heads and m.decoder_blocks[0].attn.head_dim == width // heads
    assert m.fake_latent.shape == (1, width)
    assert len(m.diffloss.net.res_blocks) == head_d and m.diffloss.net.model_channels == head_w
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(params, rel=0.01)


def test_factory_kwargs_override_head_and_pass_through():
    with torch.device("meta"):
        m = mar_base(diffloss_d=3, diffloss_w=512, buffer_size=32, class_num=7)
    assert len(m.diffloss.net.res_blocks) == 3 and m.diffloss.net.model_channels == 512
    assert m.encoder_pos_embed_learned.shape == (1, 256 + 32, 768) and m.class_emb.weight.shape == (7, 768)


def test_state_dict_round_trip_strict():
    a, b = tiny(), tiny()
    randomize_zero_inits(a)
    with torch.no_grad():
        for p in b.parameters():
            p.zero_()
    b.load_state_dict(copy.deepcopy(a.state_dict()), strict=True)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    x, y = torch.randn(2, 16, 4, 4, generator=gen(0)), torch.tensor([1, 2])
    assert torch.equal(a(x, y, generator=gen(5)), b(x, y, generator=gen(5)))
    bad = a.state_dict()
    bad.pop("mask_token")
    with pytest.raises(RuntimeError, match="mask_token"):
        b.load_state_dict(bad, strict=True)


def test_load_mar_checkpoint_picks_ema_or_model(tmp_path):
    a, b = tiny(), tiny()
    randomize_zero_inits(a)
    ema = {k: v + 1.0 for k, v in a.state_dict().items()}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": a.state_dict(), "model_ema": ema, "epoch": 3}, path)
    b.load_mar_checkpoint(path)
    assert all(torch.equal(b.state_dict()[k], ema[k]) for k in ema)
    b.load_mar_checkpoint(str(path), ema=False)
    assert all(torch.equal(b.state_dict()[k], v) for k, v in a.state_dict().items())
    with pytest.raises(KeyError, match="model_ema"):
        b.load_mar_checkpoint({"model": a.state_dict()})
    with pytest.raises(TypeError, match="checkpoint must be"):
        b.load_mar_checkpoint(3)


def timm_block(blk, x):
    """timm's Block (MAR's), written out: qkv reshaped (B, N, 3, H, D), heads permuted to the front."""
    b, n, c = x.shape
    h = blk.attn.num_heads
    y = blk.norm1(x)
    qkv = blk.attn.qkv(y).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1) * (c // h) ** -0.5).softmax(-1)
    x = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
    return x + blk.mlp.fc2(torch.nn.functional.gelu(blk.mlp.fc1(blk.norm2(x))))


def test_block_matches_timm_layout():
    """A checkpoint's qkv rows are [q; k; v], each split into heads: the block must read them so."""
    m = tiny().eval()
    x = torch.randn(2, 20, 64, generator=gen(0))
    with torch.no_grad():
        for blk in list(m.encoder_blocks) + list(m.decoder_blocks):
            torch.testing.assert_close(blk(x), timm_block(blk, x), rtol=1e-5, atol=1e-5)


# ---- tokens and masks ---------------------------------------------------------------------
@pytest.mark.parametrize("patch", [1, 2])
def test_patchify_matches_mar_and_round_trips(patch):
    m = tiny(patch_size=patch, img_size=128, vae_stride=16)
    x = torch.randn(2, 16, 8, 8, generator=gen(1))
    t = m.patchify(x)
    h = 8 // patch
    mar = torch.einsum("nchpwq->nhwcpq", x.reshape(2, 16, h, patch, h, patch)).reshape(2, h * h, 16 * patch ** 2)
    assert torch.equal(t, mar)
    assert torch.equal(m.unpatchify(t), x)


def test_random_masking_counts_and_prefix():
    m = tiny()
    x = torch.zeros(5, m.seq_len, 16)
    orders = m.sample_orders(5, gen(3))
    assert orders.dtype == torch.int64 and torch.equal(orders.sort(1).values, torch.arange(16).expand(5, 16))
    mask = m.random_masking(x, orders, gen(4))
    r = schedules.mask_ratio(generator=gen(4), min_ratio=0.7)
    n = math.ceil(16 * r)
    assert mask.shape == (5, 16) and (mask.sum(1) == n).all()
    assert (mask.gather(1, orders[:, :n]) == 1).all()
    assert torch.equal(m.sample_orders(5, gen(3)), orders) and not torch.equal(m.sample_orders(5, gen(9)), orders)


# ---- fixed-shape encoder / decoder equal MAR's gather / scatter ----------------------------
def mar_encoder_gather(m, x, mask, class_embedding):
    """MAR's forward_mae_encoder (eval mode): drop the masked tokens with a boolean gather."""
    x = m.z_proj(x)
    b, _, e = x.shape
    x = torch.cat([class_embedding.unsqueeze(1).expand(b, m.buffer_size, e), x], 1) + m.encoder_pos_embed_learned
    x = m.z_proj_ln(x)
    keep = torch.cat([torch.zeros(b, m.buffer_size), mask], 1) == 0
    x = x[keep.nonzero(as_tuple=True)].reshape(b, -1, e)
    for blk in m.encoder_blocks:
        x = blk(x)
    return m.encoder_norm(x)


def mar_decoder_scatter(m, x, mask):
    """MAR's forward_mae_decoder on the compacted encoder output."""
    x = m.decoder_embed(x)
    b = x.shape[0]
    keep = torch.cat([torch.zeros(b, m.buffer_size), mask], 1) == 0
    full = m.mask_token.repeat(b, keep.shape[1], 1).clone()
    full[keep.nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1])
    x = full + m.decoder_pos_embed_learned
    for blk in m.decoder_blocks:
        x = blk(x)
    return m.decoder_norm(x)[:, m.buffer_size:] + m.diffusion_pos_embed_learned


@pytest.mark.parametrize("num_masked", [0, 5, 13, 16])
def test_encoder_decoder_equal_mar_gather(num_masked):
    m = tiny().eval()
    b = 3
    x = torch.randn(b, 16, 16, generator=gen(2))
    orders = m.sample_orders(b, gen(3))
    mask = schedules.training_mask(b, 16, num_masked / 16, orders)
    ce = m.class_emb(torch.tensor([0, 4, 9]))
    with torch.no_grad():
        ours = m.forward_mae_encoder(x, mask, ce)
        ref = mar_encoder_gather(m, x, mask, ce)
        keep = torch.cat([torch.zeros(b, 4), mask], 1) == 0
        assert ours.shape == (b, 4 + 16, 64)
        torch.testing.assert_close(ours[keep].reshape(b, -1, 64), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.forward_mae_decoder(ours, mask), mar_decoder_scatter(m, ref, mask),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_masked", [0, 11, 16])
def test_compact_encoder_decoder_equal_mar_gather(num_masked):
    """known_index = orders[:, num_masked:]: MAR's compacted encoder, tokens in order-of-order."""
    m = tiny().eval()
    b = 3
    x = torch.randn(b, 16, 16, generator=gen(2))
    orders = m.sample_orders(b, gen(3))
    mask = schedules.training_mask(b, 16, num_masked / 16, orders)
    known = orders[:, num_masked:]
    ce = m.class_emb(torch.tensor([0, 4, 9]))
    with torch.no_grad():
        ours = m.forward_mae_encoder(x, mask, ce, known_index=known)
        ref = mar_encoder_gather(m, x, mask, ce)
        assert ours.shape == ref.shape == (b, 4 + 16 - num_masked, 64)
        torch.testing.assert_close(ours[:, :4], ref[:, :4], rtol=1e-5, atol=1e-5)
        # MAR's compacted tokens are in ascending position order; ours follow the order
        rank = known.argsort(1)
        torch.testing.assert_close(ours[:, 4:].gather(1, rank[..., None].expand(-1, -1, 64)), ref[:, 4:],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.forward_mae_decoder(ours, mask, known_index=known),
                                   mar_decoder_scatter(m, ref, mask), rtol=1e-5, atol=1e-5)


def test_compact_and_fixed_shape_paths_agree_in_training_and_sampling():
    m = tiny(label_drop_prob=0.5).train()
    randomize_zero_inits(m)
    x, y = torch.randn(3, 16, 4, 4, generator=gen(0)), torch.tensor([1, 2, 3])
    res = []
    for compact in (True, False):
        m.compact_encoder = compact
        m.zero_grad()
        loss = m(x, y, generator=gen(6))
        loss.backward()
        res.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    m.eval()
    out = []
    for compact in (True, False):
        m.compact_encoder = compact
        out.append(m.sample_tokens(2, num_iter=4, cfg=2.0, labels=torch.tensor([1, 5]), generator=gen(2)))
    assert_close_scaled(out[0], out[1])


def test_encoder_label_drop_uses_generator_and_fake_latent():
    m = tiny(label_drop_prob=1.0).train()
    x = torch.randn(2, 16, 16, generator=gen(2))
    mask = torch.zeros(2, 16)
    ce = m.class_emb(torch.tensor([1, 2]))
    with torch.no_grad():
        dropped = m.forward_mae_encoder(x, mask, ce, gen(0))
        m.eval()
        with_fake = m.forward_mae_encoder(x, mask, m.fake_latent.expand(2, -1))
        with_label = m.forward_mae_encoder(x, mask, ce)
    torch.testing.assert_close(dropped, with_fake)
    assert not torch.allclose(dropped, with_label)


# ---- training -----------------------------------------------------------------------------
def test_forward_loss_finite_and_backward_reaches_every_parameter():
    m = tiny(label_drop_prob=0.5).train()
    randomize_zero_inits(m)
    x, y = torch.randn(4, 16, 4, 4, generator=gen(0)), torch.tensor([0, 3, 5, 9])
    loss = m(x, y, generator=gen(1))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_forward_is_deterministic_for_a_generator():
    m = tiny().train()
    x, y = torch.randn(2, 16, 4, 4, generator=gen(0)), torch.tensor([1, 2])
    assert torch.equal(m(x, y, generator=gen(7)), m(x, y, generator=gen(7)))
    assert not torch.equal(m(x, y, generator=gen(7)), m(x, y, generator=gen(8)))


def test_forward_loss_matches_reference_diffusion_loss():
    m = tiny()
    z = torch.randn(2, 16, 64, generator=gen(0))
    target = torch.randn(2, 16, 16, generator=gen(1))
    mask = torch.zeros(2, 16)
    mask[:, :5] = 1
    got = m.forward_loss(z, target, mask, gen(3))
    want = fluid_ops.reference.diffusion_loss(m.diffloss.net, target.reshape(32, 16), z.reshape(32, 64),
                                              mask.reshape(32), diffusion_batch_mul=4, generator=gen(3))
    torch.testing.assert_close(got, want)


def test_loss_decreases_with_adam():
    m = tiny().train()
    x, y = torch.randn(4, 16, 4, 4, generator=gen(0)), torch.tensor([0, 3, 5, 9])
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss = m(x, y, generator=gen(11))  # same mask, t and noise every step: a fixed objective
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("compact", [True, False])
def test_dropout_training_path_runs_and_differs_from_eval(compact):
    m = tiny(attn_dropout=0.5, proj_dropout=0.5, label_drop_prob=0.0)
    m.compact_encoder = compact
    randomize_zero_inits(m)
    x, y = torch.randn(2, 16, 4, 4, generator=gen(0)), torch.tensor([1, 2])
    torch.manual_seed(0)
    loss = m.train()(x, y, generator=gen(3))
    loss.backward()
    assert torch.isfinite(loss) and m.encoder_blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert m.eval()(x, y, generator=gen(3)) != loss


def test_grad_checkpointing_gives_same_loss_and_grads():
    x, y = torch.randn(2, 16, 4, 4, generator=gen(0)), torch.tensor([1, 2])
    grads = []
    for ckpt in (False, True):
        m = tiny(grad_checkpointing=ckpt).train()
        randomize_zero_inits(m)
        loss = m(x, y, generator=gen(4))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


# ---- sampling -----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,schedule,labels", [(1.0, "linear", None), (3.0, "linear", [1, 2, 3]),
                                                 (3.0, "constant", [0, 0, 9]), (1.0, "linear", [4, 5, 6])])
def test_sample_tokens_shape_and_determinism(cfg, schedule, labels):
    m = tiny().eval()
    randomize_zero_inits(m)
    lab = None if labels is None else torch.tensor(labels)
    kw = dict(num_iter=4, cfg=cfg, cfg_schedule=schedule, labels=lab)
    a = m.sample_tokens(3, generator=gen(0), **kw)
    assert a.shape == (3, 16, 4, 4) and torch.isfinite(a).all()
    assert torch.equal(a, m.sample_tokens(3, generator=gen(0), **kw))
    assert not torch.allclose(a, m.sample_tokens(3, generator=gen(1), **kw))


def test_sample_tokens_cfg_and_temperature_change_the_result():
    m = tiny().eval()
    randomize_zero_inits(m)
    lab = torch.tensor([1, 2])
    base = m.sample_tokens(2, num_iter=4, labels=lab, generator=gen(0))
    assert not torch.allclose(base, m.sample_tokens(2, num_iter=4, cfg=3.0, labels=lab, generator=gen(0)))
    cold = m.sample_tokens(2, num_iter=4, labels=lab, temperature=0.1, generator=gen(0))
    assert not torch.allclose(base, cold)
    # temperature 0: the only randomness left is x_T and the order
    z0 = m.sample_tokens(2, num_iter=4, labels=lab, temperature=0.0, generator=gen(0))
    assert torch.isfinite(z0).all()


def test_sample_tokens_equals_mar_loop():
    """One explicit MAR-style loop (nonzero / boolean masks, mask_by_order) with the same orders
    and the same diffusion noise, reordered: equal to sample_tokens."""
    m = tiny().eval()
    randomize_zero_inits(m)
    bsz, k, cfg = 2, 5, 2.5
    lab = torch.tensor([3, 7])
    got = m.sample_tokens(bsz, num_iter=k, cfg=cfg, labels=lab, generator=gen(0))

    g = gen(0)
    orders = m.sample_orders(bsz, g)
    tokens = torch.zeros(bsz, 16, 16)
    mask = torch.ones(bsz, 16)
    ce = torch.cat([m.class_emb(lab), m.fake_latent.expand(bsz, -1)])
    with torch.no_grad():
        for step in range(k):
            tk, mk = torch.cat([tokens, tokens]), torch.cat([mask, mask])
            z = m.forward_mae_decoder(m.forward_mae_encoder(tk, mk, ce), mk)
            mask_len = max(1, min(int(mask[0].sum()) - 1, math.floor(16 * math.cos(math.pi / 2 * (step + 1) / k))))
            nxt = torch.zeros(bsz, 16).scatter(1, orders[:, :mask_len], 1.0)
            pred = mask.bool() if step == k - 1 else mask.bool() ^ nxt.bool()
            w = 1 + (cfg - 1) * (16 - mask_len) / 16
            # sample_tokens feeds the head in order-of-generation: the same draws, per token
            idx = orders[:, (0 if step == k - 1 else mask_len):int(mask[0].sum())]
            zc = z[:bsz][torch.arange(bsz)[:, None], idx].reshape(-1, 64)
            zu = z[bsz:][torch.arange(bsz)[:, None], idx].reshape(-1, 64)
            new = fluid_ops.reference.diffusion_sample(m.diffloss.net, torch.cat([zc, zu]), num_steps=8,
                                                       cfg=w, generator=g)
            ref_tokens = tokens.clone()
            ref_tokens[torch.arange(bsz)[:, None], idx] = new.reshape(bsz, -1, 16)
            # the gathered positions are exactly MAR's mask_to_pred
            assert torch.equal(torch.zeros(bsz, 16, dtype=torch.bool).scatter(1, idx, True), pred)
            tokens, mask = ref_tokens, nxt
    # fp32 summation-order differences only
    assert_close_scaled(got, m.unpatchify(tokens))


def test_sample_tokens_reference_backend_close_to_default():
    m = tiny().eval()
    randomize_zero_inits(m)
    lab = torch.tensor([1, 8])
    a = m.sample_tokens(2, num_iter=4, cfg=3.0, labels=lab, generator=gen(5))
    with fluid_ops.use_backend("reference"):
        b = m.sample_tokens(2, num_iter=4, cfg=3.0, labels=lab, generator=gen(5))
    assert_close_scaled(a, b)  # fp32 rounding through 4 x 8 steps


def test_sample_tokens_progress_bar_does_not_change_the_result(capsys):
    m = tiny().eval()
    a = m.sample_tokens(2, num_iter=3, generator=gen(0))
    assert torch.equal(a, m.sample_tokens(2, num_iter=3, progress=True, generator=gen(0)))


def test_sample_tokens_more_steps_than_tokens_and_empty_batch():
    m = tiny().eval()
    out = m.sample_tokens(2, num_iter=20, generator=gen(0))  # L = 16 < 20 steps
    assert out.shape == (2, 16, 4, 4) and torch.isfinite(out).all() and (out != 0).all()
    assert m.sample_tokens(0, generator=gen(0)).shape == (0, 16, 4, 4)


# ---- bad arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(img_size=60), "multiple of vae_stride"),
    (dict(encoder_num_heads=3), "divisible by num_heads"),
    (dict(buffer_size=0), "buffer_size"),
    (dict(mask_ratio_min=1.0), "mask_ratio_min"),
    (dict(label_drop_prob=1.5), "label_drop_prob"),
    (dict(attn_dropout=-0.1), "attn_dropout"),
    (dict(num_sampling_steps="ddim50"), "num_sampling_steps"),
    (dict(num_sampling_steps="0"), "num_sampling_steps"),
    (dict(class_num=0), "class_num"),
])
def test_constructor_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_methods_reject_bad_arguments():
    m = tiny().eval()
    x, y = torch.randn(2, 16, 4, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="imgs must be VAE latents of shape"):
        m(torch.randn(2, 16, 8, 8), y)
    with pytest.raises(TypeError, match="imgs must be floating point"):
        m(x.long(), y)
    with pytest.raises(TypeError, match="imgs must be a torch.Tensor"):
        m.patchify([1, 2])
    with pytest.raises(ValueError, match="labels must be"):
        m(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="labels must be"):
        m(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="unpatchify: x must have shape"):
        m.unpatchify(torch.randn(2, 15, 16))
    tok, mask, ce = torch.randn(2, 16, 16), torch.zeros(2, 16), torch.randn(2, 64)
    with pytest.raises(ValueError, match="forward_mae_encoder: x must have shape"):
        m.forward_mae_encoder(torch.randn(2, 16, 8), mask, ce)
    with pytest.raises(ValueError, match="forward_mae_encoder: mask must be"):
        m.forward_mae_encoder(tok, torch.zeros(2, 15), ce)
    with pytest.raises(ValueError, match="class_embedding must have shape"):
        m.forward_mae_encoder(tok, mask, torch.randn(2, 32))
    h = m.forward_mae_encoder(tok, mask, ce)
    with pytest.raises(ValueError, match="forward_mae_decoder: x must have shape"):
        m.forward_mae_decoder(h[:, 4:], mask)
    with pytest.raises(ValueError, match="forward_mae_decoder: mask must be"):
        m.forward_mae_decoder(h, torch.zeros(3, 16))
    with pytest.raises(ValueError, match="known_index must be"):
        m.forward_mae_encoder(tok, mask, ce, known_index=torch.zeros(2, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match="known_index must be"):
        m.forward_mae_encoder(tok, mask, ce, known_index=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="known_index must be"):
        m.forward_mae_decoder(h[:, :7], mask, known_index=torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 7, E\)"):
        m.forward_mae_decoder(h, mask, known_index=torch.zeros(2, 3, dtype=torch.int64))
    z = m.forward_mae_decoder(h, mask)
    with pytest.raises(ValueError, match="forward_loss: target"):
        m.forward_loss(z, tok.reshape(2, -1), mask)
    with pytest.raises(ValueError, match="forward_loss: z"):
        m.forward_loss(z[:, :8], tok, mask)
    with pytest.raises(ValueError, match="forward_loss: mask"):
        m.forward_loss(z, tok, mask[:, :8])


@pytest.mark.parametrize("kw,match", [
    (dict(bsz=-1), "bsz"), (dict(bsz=2.0), "bsz"), (dict(num_iter=0), "num_iter"),
    (dict(cfg_schedule="cosine"), "cfg_schedule"), (dict(cfg=float("nan")), "cfg"),
    (dict(temperature=-1.0), "temperature"), (dict(labels=torch.tensor([1, 2, 3])), "labels"),
])
def test_sample_tokens_rejects_bad_arguments(kw, match):
    m = tiny().eval()
    args = dict(bsz=2, num_iter=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        m.sample_tokens(**args)


@pytest.mark.parametrize("heads", [2, 4, 8])  # head dims 32, 16, 8 (the last two: zero-padded kernels)
def test_encoder_decoder_equal_mar_on_real_timm(heads):
    """models.MAR against MAR's own structure built from the installed timm (tests/mar_standin.py:
    timm's Block, MAR's boolean gather), same weights: MAR's z to fp32 rounding, any head dim."""
    from tests import mar_standin

    import functools

    # MAR's factories (mar_base ...) pass LayerNorm(eps=1e-6), the stand-in's only norm
    m = tiny(encoder_num_heads=heads, decoder_num_heads=heads,
             norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    c = m.config
    theirs = mar_standin.MAR(img_size=c["img_size"], vae_stride=c["vae_stride"], patch_size=c["patch_size"],
                             encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=heads, decoder_embed_dim=64,
                             decoder_depth=2, decoder_num_heads=heads, mlp_ratio=c["mlp_ratio"],
                             vae_embed_dim=c["vae_embed_dim"], class_num=c["class_num"], buffer_size=c["buffer_size"],
                             diffloss_d=2, diffloss_w=64, num_sampling_steps="8", attn_dropout=0.0,
                             proj_dropout=0.0)
    theirs.load_state_dict(m.state_dict(), strict=True)
    theirs.eval()
    b = 3
    x = torch.randn(b, 16, 16, generator=gen(2))
    mask = schedules.training_mask(b, 16, 7 / 16, m.sample_orders(b, gen(3)))
    ce = m.class_emb(torch.tensor([0, 4, 9]))
    with torch.no_grad():
        ours = m.forward_mae_encoder(x, mask, ce)
        ref = theirs.forward_mae_encoder(x, mask, ce)
        keep = torch.cat([torch.zeros(b, 4), mask], 1) == 0
        torch.testing.assert_close(ours[keep].reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.forward_mae_decoder(ours, mask), theirs.forward_mae_decoder(ref, mask),
                                   rtol=1e-5, atol=1e-5)
