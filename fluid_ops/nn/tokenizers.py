"""Image tokenizers for Fluid: images (B, C, H, W) in [0, 1] <-> tokens.

* `PatchTokenizer` (the default, continuous): raw pixel patches, no parameters.
* `KMeansTokenizer` (discrete variant): k-means vector quantisation of pixel patches; `fit` it
  on training images, then tokens are codebook indices. The codebook is a buffer, so it is
  saved in the owner's `state_dict()`.
* `VAETokenizer` (continuous, optional extra "vae"): a frozen diffusers `AutoencoderKL` from a
  local folder, latents (scaled as in MAR / Stable Diffusion) cut into tokens. Like the text
  encoders (see `fluid_ops.nn.text`), its weights are a plain attribute, not a registered
  submodule: they never enter the owner's `state_dict()` or `parameters()`, `.to()` moves them,
  and `copy.deepcopy` of an owning model shares the VAE.

Token layout (PatchTokenizer, KMeansTokenizer): the image is cut into a grid x grid array of
patch_size x patch_size patches; token l = row * grid + col (row-major); inside a token the
values run over (y, x, channel) with channel fastest ("channels-last"):
token[l][(y * patch_size + x) * C + c] = 2 * image[c, row * patch_size + y, col * patch_size + x] - 1.
VAETokenizer keeps MAR's latent patch order instead (channel slowest: (c, y, x)), so a
MAR-style model with patch_size 1 sees exactly MAR's tokens.
"""
from __future__ import annotations

import math
import os
import sys

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["PatchTokenizer", "KMeansTokenizer", "VAETokenizer", "build_tokenizer"]

_VAE_INSTALL_HINT = "install it with `pip install diffusers` (or `pip install 'fluid_ops[vae]'`)"


def _check_int(name, value, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_grid(image_size, patch_size):
    _check_int("image_size", image_size)
    _check_int("patch_size", patch_size)
    if image_size % patch_size:
        raise ValueError(f"image_size: expected a multiple of patch_size={patch_size}, got {image_size}")
    return image_size // patch_size


def _check_images(images, channels, image_size, name="images"):
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor (B, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name}: expected shape (B, {channels}, {image_size}, {image_size}), got {tuple(images.shape)}")
    if images.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels (B, {channels}, H, W), got {images.shape[1]} "
                         f"in shape {tuple(images.shape)}")
    if images.shape[2] != image_size or images.shape[3] != image_size:
        raise ValueError(f"{name}: expected {image_size}x{image_size} images, got {tuple(images.shape[2:])} "
                         f"in shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor with values in [0, 1], got dtype {images.dtype} "
                         "(convert uint8 images with images.float() / 255)")


def _patchify(images, patch_size):
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), row-major patches, channels-last inside a patch."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def _unpatchify(tokens, patch_size, channels, grid):
    B = tokens.shape[0]
    p = patch_size
    x = tokens.reshape(B, grid, grid, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, grid * p, grid * p)


class PatchTokenizer(nn.Module):
    """Raw pixel patches as continuous tokens (no parameters): images in [0, 1] -> tokens in
    [-1, 1] (2x - 1), layout in the module docstring. `decode` inverts `encode` (up to float
    rounding of 2x - 1) and clamps to [0, 1]."""

    def __init__(self, image_size: int, patch_size: int, channels: int = 3):
        super().__init__()
        self.grid = _check_grid(image_size, patch_size)
        _check_int("channels", channels)
        self.image_size = image_size
        self.patch_size = patch_size
        self.channels = channels
        self.num_tokens = self.grid * self.grid
        self.token_dim = patch_size * patch_size * channels

    def extra_repr(self):
        return (f"image_size={self.image_size}, patch_size={self.patch_size}, channels={self.channels}, "
                f"num_tokens={self.num_tokens}, token_dim={self.token_dim}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, num_tokens, token_dim) in [-1, 1]."""
        _check_images(images, self.channels, self.image_size)
        return _patchify(images * 2 - 1, self.patch_size)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, num_tokens, token_dim) -> (B, C, H, W) clamped to [0, 1]."""
        _check_tokens(tokens, self.num_tokens, self.token_dim)
        return _unpatchify((tokens + 1) / 2, self.patch_size, self.channels, self.grid).clamp(0, 1)


def _check_tokens(tokens, num_tokens, token_dim, name="tokens"):
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor (B, {num_tokens}, {token_dim}), got {type(tokens).__name__}")
    if tokens.dim() != 3 or tokens.shape[1] != num_tokens or tokens.shape[2] != token_dim:
        raise ValueError(f"{name}: expected shape (B, {num_tokens}, {token_dim}), got {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {tokens.dtype}")


# ------------------------------------------------------------------------------------------------
# k-means VQ of pixel patches (discrete tokens)
# ------------------------------------------------------------------------------------------------

def _sq_dists(x, centers, center_sq):
    """Squared distances (N, K) by ||x||^2 - 2 x.c + ||c||^2 (clamped at 0 against rounding)."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centers.T + center_sq[None, :]).clamp_min_(0)


def _nearest(x, centers, chunk=32768):
    """Index of the nearest center for each row of x and its squared distance, in row chunks."""
    center_sq = (centers * centers).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], chunk):
        d = _sq_dists(x[s:s + chunk], centers, center_sq)
        dist[s:s + chunk], idx[s:s + chunk] = d.min(1)
    return idx, dist


class KMeansTokenizer(nn.Module):
    """Discrete tokens: each pixel patch -> the index of its nearest codebook entry (squared
    Euclidean distance; ties go to the lowest index). The codebook (codebook_size, token_dim)
    lives in PatchTokenizer's token space ([-1, 1], channels-last patches) and is a buffer, as is
    `fitted`, so both are saved with the owner's state_dict. `fit` first."""

    def __init__(self, image_size: int, patch_size: int, codebook_size: int = 256, channels: int = 3):
        super().__init__()
        _check_int("codebook_size", codebook_size, 2)
        self.patches = PatchTokenizer(image_size, patch_size, channels)
        self.image_size = image_size
        self.patch_size = patch_size
        self.channels = channels
        self.grid = self.patches.grid
        self.num_tokens = self.patches.num_tokens
        self.token_dim = self.patches.token_dim
        self.codebook_size = codebook_size
        self.register_buffer("codebook", torch.zeros(codebook_size, self.token_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def extra_repr(self):
        return f"codebook_size={self.codebook_size}, token_dim={self.token_dim}, fitted={bool(self.fitted)}"

    @torch.no_grad()
    def fit(self, images: torch.Tensor, *, iters: int = 20, generator: torch.Generator | None = None,
            progress: bool = False, max_patches: int = 200_000) -> "KMeansTokenizer":
        """k-means (Lloyd) on the images' patches: k-means++ init, `iters` iterations at most
        (stops early when no assignment changes). Deterministic for a given `generator` (default:
        seed 0). Uses at most `max_patches` patches (a random subset beyond that). An empty
        cluster is moved onto the patch farthest from its center; with fewer distinct patches
        than codebook_size the extra entries stay duplicates (never chosen by encode)."""
        _check_int("iters", iters, 0)
        _check_int("max_patches", max_patches, 1)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        x = self.patches.encode(images).reshape(-1, self.token_dim).float()
        if x.shape[0] == 0:
            raise ValueError("images: expected at least one image to fit the codebook, got an empty batch")
        gen_device = generator.device
        if x.shape[0] > max_patches:
            keep = torch.randperm(x.shape[0], generator=generator, device=gen_device)[:max_patches]
            x = x[keep.to(x.device)]
        centers = self._kmeans_pp(x, generator)
        K = self.codebook_size
        assign = None
        bar = tqdm(range(iters), desc="k-means", disable=not (progress and sys.stderr.isatty()), leave=False)
        for _ in bar:
            new_assign, dist = _nearest(x, centers)
            if assign is not None and torch.equal(new_assign, assign):
                break
            assign = new_assign
            sums = torch.zeros_like(centers).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=K)
            nonempty = counts > 0
            centers = torch.where(nonempty[:, None], sums / counts.clamp_min(1)[:, None].to(x.dtype), centers)
            empty = (~nonempty).nonzero().flatten()
            if empty.numel():
                # Re-seed empty clusters on the worst-fitted patches (only those not already exact).
                far_dist, far = dist.topk(min(empty.numel(), x.shape[0]))
                usable = far_dist > 0
                centers[empty[: int(usable.sum())]] = x[far[usable]]
            bar.set_postfix(mse=f"{dist.mean().item() / self.token_dim:.4g}")
        self.codebook.copy_(centers.to(self.codebook.device, self.codebook.dtype))
        self.fitted.fill_(True)
        return self

    def _kmeans_pp(self, x, generator):
        N, K = x.shape[0], self.codebook_size
        gen_device = generator.device
        first = torch.randint(N, (1,), generator=generator, device=gen_device).item()
        centers = x.new_empty(K, x.shape[1])
        centers[0] = x[first]
        d2 = ((x - centers[0]) ** 2).sum(1)
        for k in range(1, K):
            total = d2.sum()
            if total.item() <= 0:
                # Fewer distinct patches than codebook entries: the rest duplicate random patches.
                rest = torch.randint(N, (K - k,), generator=generator, device=gen_device).to(x.device)
                centers[k:] = x[rest]
                break
            pick = torch.multinomial((d2 / total).to(gen_device), 1, generator=generator).item()
            centers[k] = x[pick]
            d2 = torch.minimum(d2, ((x - centers[k]) ** 2).sum(1))
        return centers

    def _check_fitted(self):
        if not bool(self.fitted):
            raise RuntimeError("KMeansTokenizer: the codebook is not fitted; call .fit(images) first "
                               "(or load a state_dict that holds a fitted codebook)")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, num_tokens) int64 codebook indices."""
        self._check_fitted()
        x = self.patches.encode(images)
        B = x.shape[0]
        idx, _ = _nearest(x.reshape(-1, self.token_dim).to(self.codebook.dtype), self.codebook)
        return idx.reshape(B, self.num_tokens)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, num_tokens) indices -> (B, C, H, W) in [0, 1] (each patch = its codebook entry)."""
        self._check_fitted()
        if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[1] != self.num_tokens:
            got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"indices: expected a tensor of shape (B, {self.num_tokens}), got {got}")
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"indices: expected an integer tensor, got dtype {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices: expected values in [0, {self.codebook_size}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return self.patches.decode(self.codebook[indices.long()])


# ------------------------------------------------------------------------------------------------
# frozen KL VAE (diffusers AutoencoderKL)
# ------------------------------------------------------------------------------------------------

class VAETokenizer(nn.Module):
    """A frozen diffusers `AutoencoderKL` loaded from a local folder (`save_pretrained` layout;
    nothing is downloaded). encode: images [0, 1] -> VAE input [-1, 1] -> posterior mean (or a
    sample: `sample=True` with a `generator`, as MAR does when training) -> (z - shift) * scale ->
    latent patch_size x patch_size patches as tokens, channel slowest (MAR's layout).
    `scale` defaults to the VAE config's scaling_factor (MAR's KL-16: 0.2325; SD's: 0.18215),
    shift to its shift_factor (0 when absent). token_dim = latent_channels * patch_size**2."""

    def __init__(self, path: str, *, image_size: int, patch_size: int = 1, scale: float | None = None):
        super().__init__()
        _check_int("image_size", image_size)
        _check_int("patch_size", patch_size)
        path = os.fspath(path) if path is not None else None
        if path is None or not os.path.isdir(path):
            raise FileNotFoundError(f"vae_path: VAE folder {path!r} does not exist (expected a local folder "
                                    "written by AutoencoderKL.save_pretrained: config.json + weights)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"vae_path: {path!r} has no config.json: not a diffusers AutoencoderKL folder")
        try:
            import diffusers
        except ImportError as e:
            raise ImportError(f"VAETokenizer needs the `diffusers` package: {_VAE_INSTALL_HINT}") from e
        verbosity = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()   # no "install accelerate" notice on every load
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(path, local_files_only=True)
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise ValueError(f"vae_path: {path!r} could not be loaded as a diffusers AutoencoderKL: {e}") from e
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)
        vae.eval()
        vae.requires_grad_(False)
        object.__setattr__(self, "vae", vae)   # plain attribute: out of state_dict / parameters
        cfg = vae.config
        self.path = path
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        if image_size % (self.downsample * patch_size):
            raise ValueError(f"image_size: expected a multiple of {self.downsample * patch_size} (the VAE downsamples "
                             f"by {self.downsample}, then latent patches of {patch_size}), got {image_size}")
        if scale is None:
            scale = getattr(cfg, "scaling_factor", None)
            scale = 1.0 if scale is None else scale
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale: expected a finite float > 0, got {scale!r}")
        shift = getattr(cfg, "shift_factor", None)
        self.scale = float(scale)
        self.shift = 0.0 if shift is None else float(shift)
        self.channels = int(cfg.in_channels)
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = image_size // self.downsample // patch_size
        self.num_tokens = self.grid * self.grid
        self.token_dim = self.latent_channels * patch_size * patch_size
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)

    def extra_repr(self):
        return (f"path={self.path!r}, image_size={self.image_size}, patch_size={self.patch_size}, "
                f"num_tokens={self.num_tokens}, token_dim={self.token_dim}, scale={self.scale}")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.vae._apply(fn)
        return self

    def train(self, mode: bool = True):
        return super().train(False)

    def __deepcopy__(self, memo):
        return self

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, num_tokens, token_dim): the posterior mean (sample=False)
        or a posterior sample drawn with `generator` (sample=True), scaled."""
        _check_images(images, self.channels, self.image_size)
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode((images * 2 - 1).to(self.device, dtype)).latent_dist
        z = posterior.mean
        if sample:
            gdev = generator.device if generator is not None else z.device
            noise = torch.randn(z.shape, generator=generator, device=gdev, dtype=torch.float32)
            z = z + posterior.std * noise.to(z.device, z.dtype)
        z = (z.float() - self.shift) * self.scale
        B, c, h, w = z.shape
        p = self.patch_size
        z = z.reshape(B, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return z.reshape(B, (h // p) * (w // p), c * p * p)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, num_tokens, token_dim) -> (B, C, H, W) in [0, 1]."""
        _check_tokens(tokens, self.num_tokens, self.token_dim)
        B, p, g, c = tokens.shape[0], self.patch_size, self.grid, self.latent_channels
        z = tokens.reshape(B, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, c, g * p, g * p)
        z = z / self.scale + self.shift
        dtype = next(self.vae.parameters()).dtype
        x = self.vae.decode(z.to(self.device, dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)


def build_tokenizer(kind: str, *, image_size: int, patch_size: int, codebook_size: int = 256,
                    vae_path: str | None = None, channels: int = 3) -> nn.Module:
    """kind "patch" (PatchTokenizer), "kmeans" (KMeansTokenizer, still to be fitted) or "vae"
    (VAETokenizer from `vae_path`; patch_size is then the patch size in LATENT pixels, MAR: 1)."""
    if kind == "patch":
        return PatchTokenizer(image_size, patch_size, channels)
    if kind == "kmeans":
        return KMeansTokenizer(image_size, patch_size, codebook_size, channels)
    if kind == "vae":
        if vae_path is None:
            raise ValueError("vae_path: tokenizer kind 'vae' needs vae_path, a local AutoencoderKL folder")
        return VAETokenizer(vae_path, image_size=image_size, patch_size=patch_size)
    raise ValueError(f"kind: expected one of 'patch', 'kmeans', 'vae', got {kind!r}")
