"""fluid_ops.nn.tokenizers: pixel patches, k-means VQ of patches, a frozen diffusers VAE."""
from __future__ import annotations

import copy

import pytest
import torch

from fluid_ops.nn.tokenizers import KMeansTokenizer, PatchTokenizer, VAETokenizer, build_tokenizer


# ------------------------------------------------------------------------------------------------
# PatchTokenizer
# ------------------------------------------------------------------------------------------------

def test_patch_round_trip_exact():
    tok = PatchTokenizer(16, 4)
    assert (tok.num_tokens, tok.token_dim, tok.grid) == (16, 48, 4)
    assert len(list(tok.parameters())) == 0 and len(tok.state_dict()) == 0
    g = torch.Generator().manual_seed(0)
    # values k / 256 are exact through 2x - 1 and back: the round trip is bit-exact
    x = torch.randint(0, 257, (3, 3, 16, 16), generator=g).float() / 256
    tokens = tok.encode(x)
    assert tokens.shape == (3, 16, 48) and tokens.min() >= -1 and tokens.max() <= 1
    assert torch.equal(tok.decode(tokens), x)
    # any [0, 1] image: up to the rounding of 2x - 1
    y = torch.rand(2, 3, 16, 16, generator=g)
    torch.testing.assert_close(tok.decode(tok.encode(y)), y, atol=1e-7, rtol=0)


def test_patch_layout_is_row_major_channels_last():
    tok = PatchTokenizer(6, 3, channels=2)
    x = torch.rand(1, 2, 6, 6)
    tokens = tok.encode(x)
    p, C = 3, 2
    for row in range(2):
        for col in range(2):
            for y in range(p):
                for xx in range(p):
                    for c in range(C):
                        want = 2 * x[0, c, row * p + y, col * p + xx] - 1
                        assert tokens[0, row * 2 + col, (y * p + xx) * C + c] == want


def test_patch_decode_clamps():
    tok = PatchTokenizer(4, 2, channels=1)
    out = tok.decode(torch.full((1, 4, 4), 3.0))
    assert torch.all(out == 1)
    assert torch.all(tok.decode(torch.full((1, 4, 4), -3.0)) == 0)


def test_patch_errors():
    with pytest.raises(ValueError, match="image_size: expected a multiple of patch_size=3"):
        PatchTokenizer(16, 3)
    tok = PatchTokenizer(8, 4)
    with pytest.raises(ValueError, match="expected 3 channels"):
        tok.encode(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="expected 8x8 images"):
        tok.encode(torch.rand(1, 3, 8, 16))
    with pytest.raises(ValueError, match="expected shape"):
        tok.encode(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="floating-point"):
        tok.encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"tokens: expected shape \(B, 4, 48\)"):
        tok.decode(torch.zeros(1, 4, 47))


def test_patch_empty_batch():
    tok = PatchTokenizer(8, 4)
    assert tok.encode(torch.rand(0, 3, 8, 8)).shape == (0, 4, 48)
    assert tok.decode(torch.rand(0, 4, 48)).shape == (0, 3, 8, 8)


# ------------------------------------------------------------------------------------------------
# KMeansTokenizer
# ------------------------------------------------------------------------------------------------

def _palette_images(n, seed, image_size=16, patch=4):
    """Images tiled from 4 known patch types (dyadic values, so cluster means are exact)."""
    types = torch.zeros(4, 3, patch, patch)
    types[0] = 0.0
    types[1] = 1.0
    types[2, 0] = 1.0                                  # red
    types[3, :, : patch // 2] = 0.5                    # half grey, half black
    g = torch.Generator().manual_seed(seed)
    grid = image_size // patch
    which = torch.randint(0, 4, (n, grid, grid), generator=g)
    imgs = types[which]                                # (n, grid, grid, 3, p, p)
    return imgs.permute(0, 3, 1, 4, 2, 5).reshape(n, 3, image_size, image_size), which, types


def test_kmeans_recovers_a_palette():
    imgs, which, types = _palette_images(12, seed=0)
    tok = KMeansTokenizer(16, 4, codebook_size=4).fit(imgs, generator=torch.Generator().manual_seed(1))
    idx = tok.encode(imgs)
    assert idx.shape == (12, 16) and idx.dtype == torch.int64
    assert torch.equal(tok.decode(idx), imgs)
    # the codebook holds exactly the 4 patch types (in some order), one code per type
    want = PatchTokenizer(4, 4).encode(types).reshape(4, -1)
    assert sorted(map(tuple, tok.codebook.tolist())) == sorted(map(tuple, want.tolist()))
    code_of_type = {int(w): int(i) for w, i in zip(which.flatten(), idx.flatten())}
    assert len(code_of_type) == 4 and len(set(code_of_type.values())) == 4
    # unseen images of the same palette are encoded exactly too
    other, _, _ = _palette_images(3, seed=5)
    assert torch.equal(tok.decode(tok.encode(other)), other)


def test_kmeans_codebook_larger_than_distinct_patches():
    imgs, _, _ = _palette_images(6, seed=2)
    tok = KMeansTokenizer(16, 4, codebook_size=32).fit(imgs)
    assert torch.isfinite(tok.codebook).all()
    assert torch.equal(tok.decode(tok.encode(imgs)), imgs)
    assert tok.encode(imgs).unique().numel() == 4


def test_kmeans_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(20, 3, 8, 8, generator=g)
    a = KMeansTokenizer(8, 2, codebook_size=16).fit(imgs, iters=5, generator=torch.Generator().manual_seed(3))
    b = KMeansTokenizer(8, 2, codebook_size=16).fit(imgs, iters=5, generator=torch.Generator().manual_seed(3))
    c = KMeansTokenizer(8, 2, codebook_size=16).fit(imgs, iters=5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.codebook, b.codebook) and not torch.equal(a.codebook, c.codebook)
    # Lloyd iterations lower the quantisation error below the k-means++ start
    start = KMeansTokenizer(8, 2, codebook_size=16).fit(imgs, iters=0, generator=torch.Generator().manual_seed(3))
    err = lambda t: (t.decode(t.encode(imgs)) - imgs).pow(2).mean().item()
    assert err(a) < err(start)
    # every code is the mean of the patches assigned to it (a Lloyd fixed point after convergence)
    conv = KMeansTokenizer(8, 2, codebook_size=16).fit(imgs, iters=100)
    patches = PatchTokenizer(8, 2).encode(imgs).reshape(-1, 12)
    assign = conv.encode(imgs).flatten()
    for k in assign.unique():
        torch.testing.assert_close(conv.codebook[k], patches[assign == k].mean(0), atol=1e-5, rtol=0)


def test_kmeans_subsamples_patches_deterministically():
    imgs, _, _ = _palette_images(40, seed=3)                    # 640 patches of 4 kinds
    fit = lambda seed: KMeansTokenizer(16, 4, codebook_size=4).fit(
        imgs, max_patches=100, generator=torch.Generator().manual_seed(seed))
    a, b = fit(0), fit(0)
    assert torch.equal(a.codebook, b.codebook)
    assert torch.equal(a.decode(a.encode(imgs)), imgs)          # 100 random patches still cover the palette


def test_kmeans_state_dict_round_trip():
    imgs, _, _ = _palette_images(4, seed=1)
    tok = KMeansTokenizer(16, 4, codebook_size=8).fit(imgs)
    assert sorted(tok.state_dict()) == ["codebook", "fitted"]
    fresh = KMeansTokenizer(16, 4, codebook_size=8)
    fresh.load_state_dict(tok.state_dict())
    assert torch.equal(fresh.encode(imgs), tok.encode(imgs))


def test_kmeans_errors():
    tok = KMeansTokenizer(8, 4, codebook_size=4)
    with pytest.raises(RuntimeError, match="not fitted"):
        tok.encode(torch.rand(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="not fitted"):
        tok.decode(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one image"):
        tok.fit(torch.rand(0, 3, 8, 8))
    tok.fit(torch.rand(4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 4\)"):
        tok.decode(torch.full((1, 4), 4))
    with pytest.raises(ValueError, match="integer tensor"):
        tok.decode(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"indices: expected a tensor of shape \(B, 4\)"):
        tok.decode(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="codebook_size"):
        KMeansTokenizer(8, 4, codebook_size=1)
    with pytest.raises(ValueError, match="image_size"):
        KMeansTokenizer(10, 4)


def test_build_tokenizer():
    assert isinstance(build_tokenizer("patch", image_size=16, patch_size=4), PatchTokenizer)
    km = build_tokenizer("kmeans", image_size=16, patch_size=4, codebook_size=64)
    assert isinstance(km, KMeansTokenizer) and km.codebook.shape == (64, 48)
    with pytest.raises(ValueError, match="kind: expected one of"):
        build_tokenizer("vq", image_size=16, patch_size=4)
    with pytest.raises(ValueError, match="vae_path"):
        build_tokenizer("vae", image_size=16, patch_size=1)


# ------------------------------------------------------------------------------------------------
# VAETokenizer: a tiny randomly initialised AutoencoderKL saved to a temporary folder
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    import diffusers
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                  sample_size=16, scaling_factor=0.5)
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path)
    return path


def test_vae_shapes_and_round_trip(tiny_vae_dir):
    import diffusers
    tok = build_tokenizer("vae", image_size=16, patch_size=2, vae_path=str(tiny_vae_dir))
    assert isinstance(tok, VAETokenizer) and tok.scale == 0.5
    # downsample 2 -> 8x8 latents of 4 channels -> 4x4 patches of 2x2: 16 tokens of 16 values
    assert (tok.num_tokens, tok.token_dim) == (16, 16)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tokens = tok.encode(x)
    assert tokens.shape == (2, 16, 16) and torch.isfinite(tokens).all()
    # tokens are the scaled posterior mean, in MAR's patch layout
    ref = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    with torch.no_grad():
        mean = ref.encode(x * 2 - 1).latent_dist.mean * 0.5
    want = mean.reshape(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 16)
    torch.testing.assert_close(tokens, want, atol=1e-5, rtol=1e-5)
    images = tok.decode(tokens)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        want_img = ((ref.decode(mean / 0.5).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(images, want_img, atol=1e-5, rtol=1e-5)
    # posterior samples: seeded, and different from the mean
    s1 = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    s2 = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2) and not torch.allclose(s1, tokens)


def test_vae_stays_out_of_state_dict(tiny_vae_dir):
    tok = VAETokenizer(str(tiny_vae_dir), image_size=16, scale=0.25)
    assert tok.scale == 0.25 and (tok.num_tokens, tok.token_dim) == (64, 4)
    owner = torch.nn.Module()
    owner.tokenizer = tok
    owner.head = torch.nn.Linear(4, 4)
    assert sorted(owner.state_dict()) == ["head.bias", "head.weight"]
    assert len(list(owner.parameters())) == 2
    owner.train()
    assert not tok.vae.training and not any(p.requires_grad for p in tok.vae.parameters())
    assert copy.deepcopy(owner).tokenizer is tok
    owner.to(torch.float64)
    assert next(tok.vae.parameters()).dtype == torch.float64
    assert tok.encode(torch.rand(1, 3, 16, 16)).dtype == torch.float32
    owner.to(torch.float32)


def test_vae_errors(tiny_vae_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VAETokenizer(str(tmp_path / "missing"), image_size=16)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VAETokenizer(str(tmp_path), image_size=16)
    with pytest.raises(ValueError, match="image_size: expected a multiple of 4"):
        VAETokenizer(str(tiny_vae_dir), image_size=18, patch_size=2)
    tok = VAETokenizer(str(tiny_vae_dir), image_size=16)
    with pytest.raises(ValueError, match="expected 3 channels"):
        tok.encode(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="tokens: expected shape"):
        tok.decode(torch.rand(1, 64, 5))


def test_vae_missing_diffusers_message(tiny_vae_dir, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "diffusers", None)     # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match="pip install diffusers"):
        VAETokenizer(str(tiny_vae_dir), image_size=16)
