"""Fluid (Fan et al., arXiv 2410.13863): text-to-image autoregressive generation on fluid_ops'
ops (docs/contracts.md §1, §2.3, §2.4), in its four variants {continuous, discrete} x {random, raster} order.

    model = Fluid("tiny")                                  # or Fluid("fluid-369m"), Fluid(cfg, **{"model.depth": 6})
    loss = model(images, captions, generator=g)            # images (B, 3, H, W) in [0, 1]
    images = model.generate(["a red circle at the top left"], generator=g)

The pieces (config names: `fluid_ops.models.fluid_config`):
* image tokens: `fluid_ops.nn.tokenizers` (pixel patches by default; k-means VQ of patches for
  the discrete variant, `fit_tokenizer` first; a local diffusers VAE);
* text: a frozen encoder (`fluid_ops.nn.text`, never in the state_dict) -> linear to the width ->
  a trainable text aligner (`text.aligner_depth` bidirectional blocks with the key-padding mask)
  -> cross-attention in every block of the image transformer. A learned null text embedding (one
  vector, as a one-token text) replaces the text of dropped rows in training (p =
  `text.drop_prob`) and is the unconditional branch of classifier-free guidance;
  `text.pool_add` also adds a linear map of the mask-mean of the aligned text to every image
  position; with `text.pool="encoder"` that pooled text is instead the frozen encoder's own
  mask-mean, standardised per feature with running statistics of the training captions
  (`RunningStandardize`), so the words that tell captions apart are not drowned by what every
  caption shares; `text.adaln` lets that pooled text shift and scale every block's norms (DiT's
  adaLN, zero-initialised); `head.pos_embed` adds the position embedding to what the head reads
  (MAR's diffusion_pos_embed);
* random order (MAR / MaskGIT, bidirectional): masked positions are a learned [MASK] embedding;
  training masks ceil(L * r) tokens of a random order (r: truncated normal on
  [masking.ratio_min, 1] as docs/contracts.md §2.4), the head runs on the MASKED positions only
  (gathered by order: the masked ones are orders[:, :num_masked], no `nonzero`); sampling reveals
  tokens over `sampling.num_iter` steps on the cosine schedule with a linear CFG schedule
  (`fluid_ops.reference.schedules`); CFG's unconditional branch is the null text with the known
  tokens (MAR), or with `sampling.cfg_uncond="all"` the null text with every token masked, so the
  guidance also pulls each new token toward the tokens already drawn (that branch is the same at
  every step: one pass per generation);
* raster order (GPT, causal): a learned start token, token i predicted from tokens < i; sampling
  one token per step through a KV cache (`fluid_ops.ops.attention_kvcache`), the text K/V of every
  cross-attention computed once per generation;
* heads: continuous -> MAR's DiffLoss (`fluid_ops.nn.DiffLoss`: `fluid_ops.nn.DenoiserMLP`, IDDPM
  loss with `head.diffusion_batch_mul` t-draws per token through `fluid_ops.nn.diffusion_loss` (z
  embedded once per token, not repeated), sampled by `fluid_ops.sampling.diffusion_sample` in
  `sampling.num_diffusion_steps` steps with CFG on [cond; uncond] rows and a temperature;
  `head.noise_shift` k trains and samples on the cosine schedule with every SNR divided by k^2,
  `fluid_ops.reference.diffusion.cosine_alpha_bar`); discrete -> a linear map to codebook
  logits, cross-entropy, sampled by `fluid_ops.ops.sample_categorical` with CFG on the logits.

All randomness comes from the `generator` argument, drawn in a fixed order (training: generation
order, mask ratio, text dropout, then the head's t and noise; sampling: orders, then each step's
noise). The only host reads are the training mask ratio (one float per batch, as MAR) and the
KV-cache op's bounds check.

Diffusion head size: the Fluid paper follows MAR's Diffusion Loss; the parts of the paper we could
consult do not restate the head's size, so the paper-size configs use MAR's default head,
3 blocks x 1024 (the defaults of MAR's constructor, `diffloss_d=3, diffloss_w=1024`). With it
and a 6-block aligner at the model width, the configs here count 179M / 368M / 667M / 1.10B /
3.13B / 10.37B trainable parameters against the paper's 166M / 369M / 665M / 1.1B / 3.1B / 10.5B
(the head is 22-26M of them; tests/test_fluid.py holds the counts within 8%), which suggests the
paper's head is of that order too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fluid_ops import backend, sampling
from fluid_ops.models.fluid_config import (  # noqa: F401  (re-exported: their old home)
    CONFIGS, PAPER_SAMPLING, FluidConfig, check_cfg_uncond, config_from_dict, resolve_config, validate_config)
from fluid_ops.nn.diffloss import DiffLoss
from fluid_ops.nn.diffusion import diffusion_loss
from fluid_ops.nn.prepared import PreparedText, PreparedTokens
from fluid_ops.nn.text import build_text_encoder
from fluid_ops.nn.tokenizers import build_tokenizer
from fluid_ops.nn.transformer import Transformer
from fluid_ops.ops.categorical import sample_categorical
from fluid_ops.reference import schedules

__all__ = ["Fluid", "FluidConfig", "CONFIGS", "PAPER_SAMPLING", "RunningStandardize"]

class RunningStandardize(nn.Module):
    """Standardises features (B, D) per feature with running statistics of what it saw in training
    (buffers, saved with the model): before any update mean 0 and variance 1; `update=True` first
    folds the batch in (the k-th update with weight max(1/k, momentum): a plain average over the
    first 1/momentum batches, then an exponential one), then standardises with the result. Meant
    for the output of a frozen encoder, whose statistics do not drift. No host sync. Under
    torch.distributed every rank must update together: the batch moments are all-reduced over
    the default group."""

    def __init__(self, dim: int, momentum: float = 0.01, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("sq_mean", torch.ones(dim))   # E[x^2]; var = E[x^2] - mean^2
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update(self, x):
        # batch moments as sums; under torch.distributed they are summed over the ranks (their
        # batches are one global batch), so every rank keeps the statistics one process would
        sums = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), float(x.shape[0]))])
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(sums)
        d = self.mean.shape[0]
        n = sums[2 * d:].clamp(min=1.0)
        self.count += 1
        w = torch.clamp(1.0 / self.count.to(torch.float32), min=self.momentum)
        self.mean.lerp_(sums[:d] / n, w)
        self.sq_mean.lerp_(sums[d:2 * d] / n, w)

    def forward(self, x: torch.Tensor, update: bool = False) -> torch.Tensor:
        x = x.float()
        if update:
            self._update(x.detach())
        var = (self.sq_mean - self.mean * self.mean).clamp(min=0.0)
        return (x - self.mean) * torch.rsqrt(var + self.eps)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) fixed 2D sin-cos position embedding, row-major positions: the first half
    of the channels encodes the row, the second the column, each as [sin(p w_i), cos(p w_i)],
    w_i = 10000 ** (-i / (dim / 4)), i < dim / 4."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    pos = torch.arange(grid, dtype=torch.float64)
    ang = pos[:, None] * omega[None, :]                       # (grid, q)
    one = torch.cat([ang.sin(), ang.cos()], 1)                 # (grid, dim / 2)
    rows = one[:, None, :].expand(grid, grid, 2 * q)
    cols = one[None, :, :].expand(grid, grid, 2 * q)
    return torch.cat([rows, cols], -1).reshape(grid * grid, dim).float()


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False, disable=None)


def _check_image_values(op: str, images: torch.Tensor, slack: float = 1e-3) -> None:
    """Images are in [0, 1] (a little slack for resampling); 0..255 or [-1, 1] data is named
    instead of trained on. One min / max read (a host sync on CUDA, once per step)."""
    if images.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if not (lo >= -slack and hi <= 1 + slack):  # NaN fails too
        hint = " (0..255 data: divide by 255)" if hi > 2 else " ([-1, 1] data: use (x + 1) / 2)" if lo < -slack else ""
        raise ValueError(f"{op}: images must have values in [0, 1], got values in [{lo:g}, {hi:g}]{hint}")


class Fluid(nn.Module):
    """Text-to-image autoregressive model (see the module docstring). `Fluid(config, **overrides)`:
    a name from CONFIGS (default "tiny") or a FluidConfig, with any field overridden by keyword.

    Data-parallel training (`fluid_ops.distributed`): `forward(..., batch_slice=(start, total))`
    draws every random number for a batch of `total` rows and uses rows [start, start + B), so
    ranks holding the slices of a global batch see exactly the draws of one process holding all
    of it. Pre-encoded inputs (`fluid-ops prepare`): `forward(PreparedTokens, PreparedText)`;
    with two cached views per image, the view is drawn first, one per row."""

    supports_batch_slice = True

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """True when a training step leaves a trainable parameter unused (no text dropout: the
        null embedding), so DDP must look for unused parameters (fluid_ops.distributed)."""
        return not self.config.text.drop_prob > 0

    def __init__(self, config: FluidConfig | str = "tiny", **overrides):
        super().__init__()
        cfg = self.config = resolve_config(config, **overrides)
        w = cfg.model.width

        # frozen text encoder: holds no parameters or state (see fluid_ops.nn.text)
        self.text_encoder = build_text_encoder(cfg.text.encoder, max_length=cfg.text.max_length, layer=cfg.text.layer)
        self.tokenizer = build_tokenizer(cfg.image.tokenizer, image_size=cfg.image.size, patch_size=cfg.image.patch_size,
                                         codebook_size=cfg.image.codebook_size, vae_path=cfg.image.vae_path)
        self.seq_len = self.tokenizer.num_tokens
        self.token_dim = self.tokenizer.token_dim
        self.grid = math.isqrt(self.seq_len)
        if self.grid * self.grid != self.seq_len:
            raise ValueError(f"Fluid: the tokenizer must give a square grid of tokens, got {self.seq_len}")
        if cfg.order == "raster" and cfg.sampling.num_iter not in (None, self.seq_len):
            raise ValueError(f"Fluid: raster order generates one token per step; num_iter must be None or "
                             f"{self.seq_len} (the number of tokens), got {cfg.sampling.num_iter}")

        # text path: encoder dim -> width -> aligner (bidirectional, key-padding mask) -> null vector
        self.text_proj = nn.Linear(self.text_encoder.dim, w)
        self.text_aligner = Transformer(w, cfg.text.aligner_depth, cfg.model.num_heads, cfg.model.mlp_ratio)
        self.null_text = nn.Parameter(torch.zeros(1, w))
        self.text_pool_proj = None
        self.text_pool_norm = None
        if cfg.text.pool_add or cfg.text.adaln:
            if cfg.text.pool == "encoder":
                self.text_pool_norm = RunningStandardize(self.text_encoder.dim)
                self.text_pool_proj = nn.Linear(self.text_encoder.dim, w)
            else:
                self.text_pool_proj = nn.Linear(w, w)

        # image path
        if cfg.token_kind == "continuous":
            self.token_embed = nn.Linear(self.token_dim, w)
        else:
            self.token_embed = nn.Embedding(cfg.image.codebook_size, w)
        if cfg.order == "random":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, w))
        else:
            self.start_token = nn.Parameter(torch.zeros(1, 1, w))
        if cfg.model.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.seq_len, w))
        else:  # fixed: a buffer, not saved (recomputed from the config)
            self.register_buffer("pos_embed", sincos_2d(self.grid, w)[None], persistent=False)
        self.head_pos = None
        if cfg.head.pos_embed:
            # learned positions get their own table (MAR: diffusion_pos_embed_learned); fixed sin-cos reuses it
            self.head_pos = nn.Parameter(torch.zeros(1, self.seq_len, w)) if cfg.model.pos_embed == "learned" \
                else self.pos_embed
        self.transformer = Transformer(w, cfg.model.depth, cfg.model.num_heads, cfg.model.mlp_ratio, cross_attention=True,
                                       grad_checkpointing=cfg.model.grad_checkpointing,
                                       cond_dim=w if cfg.text.adaln else None)
        self.text_aligner.grad_checkpointing = cfg.model.grad_checkpointing
        self._init_weights()
        for blk in self.transformer.blocks:   # adaLN starts as the identity (after the xavier init)
            blk.reset_modulation()

        # heads keep their own init (DenoiserMLP: zero-initialised adaLN and output layers, as MAR)
        if cfg.token_kind == "continuous":
            self.head = DiffLoss(self.token_dim, w, cfg.head.depth, cfg.head.width, cfg.sampling.num_diffusion_steps,
                                 cfg.model.grad_checkpointing, noise_shift=cfg.head.noise_shift)
        else:
            self.head = nn.Linear(w, cfg.image.codebook_size)
            nn.init.xavier_uniform_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @classmethod
    def from_config_dict(cls, d: dict) -> "Fluid":
        """Rebuild from `dataclasses.asdict(model.config)` (as checkpoints store it); the flat
        dicts of older checkpoints are read too (deprecated)."""
        if not isinstance(d, dict):
            raise TypeError(f"Fluid.from_config_dict: d must be a dict, got {type(d).__name__}")
        try:
            return cls(config_from_dict(d))
        except ValueError as e:
            raise ValueError(f"Fluid.from_config_dict: {e}") from None

    @staticmethod
    def normalize_config_dict(d):
        """A checkpoint's config dict in today's grouped form (flat dicts of older checkpoints
        converted), for comparing with `dataclasses.asdict(model.config)` on resume."""
        return dataclasses.asdict(config_from_dict(d))

    def _init_weights(self):
        """MAR's init: N(0, 0.02) embeddings and learned tokens, xavier-uniform linears with zero
        bias, LayerNorm weight 1 / bias 0."""
        for p in (self.null_text, getattr(self, "mask_token", None), getattr(self, "start_token", None)):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        for p in (self.pos_embed, self.head_pos):
            if isinstance(p, nn.Parameter):
                nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    # ---- small helpers ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.null_text.device

    @property
    def needs_tokenizer_fit(self) -> bool:
        """True for the discrete variant until its k-means codebook is fitted (or loaded)."""
        return self.config.token_kind == "discrete" and not bool(self.tokenizer.fitted)

    def fit_tokenizer(self, images: torch.Tensor, *, iters: int = 20, generator: torch.Generator | None = None,
                      progress: bool = False) -> "Fluid":
        """Fit the discrete variant's k-means codebook on training images (B, 3, H, W) in [0, 1]."""
        if self.config.token_kind != "discrete":
            raise ValueError(f"Fluid.fit_tokenizer: only the discrete variant has a tokenizer to fit; this model's "
                             f"tokenizer is {self.config.image.tokenizer!r}")
        self._check_images("fit_tokenizer", images)
        self.tokenizer.fit(images.to(self.device), iters=iters, generator=generator, progress=progress)
        return self

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _check_images(self, op, images):
        s = self.config.image.size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s) \
                or not images.is_floating_point():
            got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"Fluid.{op}: images must be a float tensor of shape (B, 3, {s}, {s}) with values in "
                             f"[0, 1], got {got}")

    @staticmethod
    def _check_captions(op, captions, batch=None):
        if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
            raise ValueError(f"Fluid.{op}: captions must be a list of str, got {type(captions).__name__}")
        if batch is not None and len(captions) != batch:
            raise ValueError(f"Fluid.{op}: got {len(captions)} captions for {batch} images")
        for i, c in enumerate(captions):
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"Fluid.{op}: captions[{i}] must be a non-empty str, got {c!r}")
        return list(captions)

    # ---- text ------------------------------------------------------------------------------
    def encode_text(self, captions: list[str] | PreparedText, drop: torch.Tensor | None = None):
        """(context (B, Nt, W), mask (B, Nt) bool, pooled (B, W) or None). Rows where `drop` is
        True get the null text: the learned vector as a one-token text. `captions` may be the
        frozen encoder's cached output (PreparedText)."""
        if isinstance(captions, PreparedText):
            emb, mask = captions.emb.to(self.device), captions.mask.to(self.device)
        else:
            emb, mask = self.text_encoder.encode(captions, device=self.device)
        x = self.text_aligner(self.text_proj(emb.to(self.text_proj.weight.dtype)), key_padding_mask=mask)
        captions_mask = mask
        if drop is not None:
            null_ctx, null_mask = self.null_context(x.shape[0], x.shape[1])
            x = torch.where(drop[:, None, None], null_ctx.to(x.dtype), x)
            mask = torch.where(drop[:, None], null_mask, mask)
        if self.text_pool_norm is None:
            return x, mask, self._pool(x, mask)
        return x, mask, self._pool_encoder(emb, captions_mask, drop)

    def null_context(self, batch: int, length: int = 1):
        """The unconditional text: (B, length, W) with the null vector at position 0, mask True there only."""
        ctx = torch.zeros(batch, length, self.config.model.width, device=self.device, dtype=self.null_text.dtype)
        ctx[:, 0] = self.null_text
        mask = torch.zeros(batch, length, dtype=torch.bool, device=self.device)
        mask[:, 0] = True
        return ctx, mask

    def _pool(self, ctx, mask):
        """text_pool "aligned": the linear map of the mask-mean of the aligned text ctx (B, Nt, W)."""
        if self.text_pool_proj is None:
            return None
        return self.text_pool_proj(self._masked_mean(ctx, mask))

    @staticmethod
    def _masked_mean(x, mask):
        """Mean of x (B, N, D) over the positions where mask (B, N) is True: (B, D), in x's dtype."""
        m = mask.to(x.dtype)[..., None]
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)

    def _pool_encoder(self, emb, mask, drop):
        """text_pool "encoder": the mask-mean of the frozen encoder's output emb (B, Nt, E),
        standardised per feature (RunningStandardize: its statistics follow the training captions),
        0 (the mean caption) for dropped rows, then the linear map to the width. Standardising is
        what makes this work: the raw mean is dominated by a part every caption shares, and the
        words that tell captions apart (e.g. where the object goes) are a small fraction of it."""
        p = self.text_pool_norm(self._masked_mean(emb.float(), mask), update=self.training)
        if drop is not None:
            p = torch.where(drop[:, None], torch.zeros_like(p), p)
        return self.text_pool_proj(p.to(self.text_pool_proj.weight.dtype))

    def _null_pooled(self, nctx, nmask):
        """The pooled text of the unconditional (null) text, or None."""
        if self.text_pool_norm is None:
            return self._pool(nctx, nmask)
        zero = torch.zeros(nctx.shape[0], self.text_pool_proj.in_features, device=self.device,
                           dtype=self.text_pool_proj.weight.dtype)
        return self.text_pool_proj(zero)

    def _add_position_and_text(self, x, pooled, positions=None):
        """x (B, N, W) + position embedding (of `positions`, default 0..N-1) + pooled text."""
        x = x + self._at(self.pos_embed, x.shape[1], positions).to(x.dtype)
        if pooled is not None and self.config.text.pool_add:
            x = x + pooled[:, None, :].to(x.dtype)
        return x

    def _head_input(self, z, positions=None):
        """What the head reads: the transformer output (B, N, W), plus the head position
        embedding (of `positions`, default 0..N-1) with head_pos_embed. The final LayerNorm lets
        the transformer wash position out of z while no position tells the targets apart (as at
        the start of training, before the text's "where" is read); this keeps it in."""
        if self.head_pos is None:
            return z
        return z + self._at(self.head_pos, z.shape[1], positions).to(z.dtype)

    @staticmethod
    def _at(table, n, positions=None):
        """Rows of a (1, L, W) position table: the first n, or those in `positions`."""
        return table[:, :n] if positions is None else table[:, positions]

    def _cond(self, pooled):
        """The transformer's adaLN condition (text_adaln) or None."""
        return pooled if self.config.text.adaln else None

    def _embed_tokens(self, tokens):
        if self.config.token_kind == "continuous":
            return self.token_embed(tokens.to(self.token_embed.weight.dtype))
        return self.token_embed(tokens)

    # ---- training --------------------------------------------------------------------------
    def _draw_mask_count(self, generator) -> int:
        """ceil(L * r) masked tokens, r ~ truncated normal on [masking.ratio_min, 1] (one per batch)."""
        r = schedules.mask_ratio(generator=generator, min_ratio=self.config.masking.ratio_min)
        return min(self.seq_len, max(1, int(math.ceil(self.seq_len * r))))

    def _outputs(self, images, captions, generator, batch_slice=None):
        """The transformer's outputs and what the head needs, before the head:
        (z (B, L, W), tokens (B, L, C) or (B, L), index (B, M) of the positions to predict or None
        for all). Draws, in order: the view of each image (prepared inputs with 2 views), the
        generation orders and the mask ratio (random order), the text dropout; each for `total`
        rows of which rows [start, start + B) are used (batch_slice; default: all B)."""
        c = self.config
        if isinstance(images, PreparedTokens):
            tokens = images.tokens.to(self.device)
        else:
            tokens = self.tokenizer.encode(images.to(self.device))
        b = tokens.shape[0]
        start, total = (0, b) if batch_slice is None else batch_slice
        rows = slice(start, start + b)
        if isinstance(images, PreparedTokens):
            if tokens.shape[1] > 1:  # flip augmentation: one cached view per row
                view = torch.randint(0, tokens.shape[1], (total,), generator=generator,
                                     device=generator.device if generator is not None else "cpu")[rows]
                tokens = tokens[torch.arange(b, device=self.device), view.to(self.device)]
            else:
                tokens = tokens[:, 0]
        index = None
        if c.order == "random":
            orders = schedules.random_orders(total, self.seq_len, generator=generator)[rows].to(self.device)
            num_masked = self._draw_mask_count(generator)
            index = orders[:, :num_masked]            # the masked tokens are a prefix of the order
        drop = None
        if self.training and c.text.drop_prob > 0:
            drop = schedules.null_condition_mask(total, c.text.drop_prob, generator=generator)[rows].to(self.device)
        ctx, cmask, pooled = self.encode_text(captions, drop)
        x = self._embed_tokens(tokens)
        if c.order == "random":
            masked = torch.zeros(b, self.seq_len, dtype=torch.bool, device=self.device).scatter_(1, index, True)
            x = torch.where(masked[..., None], self.mask_token.to(x.dtype), x)
            x = self._add_position_and_text(x, pooled)
            z = self.transformer(x, context=ctx, context_mask=cmask, cond=self._cond(pooled))
        else:
            x = torch.cat([self.start_token.to(x.dtype).expand(b, 1, -1), x[:, :-1]], 1)
            x = self._add_position_and_text(x, pooled)
            z = self.transformer(x, causal=True, context=ctx, context_mask=cmask, cond=self._cond(pooled))
        return self._head_input(z), tokens, index

    @staticmethod
    def _select(z, tokens, index):
        """Rows of the positions in `index` (B, M) (all positions if None): z (B*M, W), targets."""
        if index is None:
            return z.reshape(-1, z.shape[-1]), tokens.reshape(tokens.shape[0] * tokens.shape[1], *tokens.shape[2:])
        zi = z.gather(1, index[..., None].expand(-1, -1, z.shape[-1])).reshape(-1, z.shape[-1])
        if tokens.dim() == 3:
            ti = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1])).reshape(-1, tokens.shape[-1])
        else:
            ti = tokens.gather(1, index).reshape(-1)
        return zi, ti

    def draw_head_inputs(self, rows: int, generator, device=None):
        """The diffusion loss's t (rows * diffusion_batch_mul,) and noise (same rows, token_dim),
        drawn in this order from `generator`; row j * rows + i is the j-th draw of row i."""
        n = rows * self.config.head.diffusion_batch_mul
        dev = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.head.train_schedule.num_steps, (n,), generator=generator, device=dev)
        noise = torch.randn(n, self.token_dim, generator=generator, device=dev)
        device = self.device if device is None else device
        return t.to(device), noise.to(device)

    def head_loss(self, z, target, generator=None, *, mask=None, t=None, noise=None):
        """Loss of the head on rows z (N, W) with targets (N, C) float / (N,) long; mean over rows
        with mask 1 (all if None). Continuous: t and noise drawn by `draw_head_inputs` unless given."""
        if self.config.token_kind == "discrete":
            ce = F.cross_entropy(self.head(z).float(), target, reduction="none")
            return ce.mean() if mask is None else (ce * mask).sum() / mask.sum()
        if t is None:
            t, noise = self.draw_head_inputs(z.shape[0], generator)
        # fluid_ops.nn.diffusion_loss: z embedded once per token and broadcast to the t-draws;
        # with grad checkpointing the head's activations (the largest) are recomputed
        return diffusion_loss(self.head.net, target.to(z.dtype), z, mask,
                              diffusion_batch_mul=self.config.head.diffusion_batch_mul, t=t,
                              noise=noise.to(z.dtype), schedule=self.head.train_schedule,
                              checkpoint=self.config.model.grad_checkpointing and self.training)

    def forward(self, images: torch.Tensor | PreparedTokens, captions: list[str] | PreparedText, *,
                generator: torch.Generator | None = None, batch_slice: tuple[int, int] | None = None) -> torch.Tensor:
        """Training loss (scalar): images (B, 3, H, W) in [0, 1], one caption per image (or their
        cached encodings, PreparedTokens / PreparedText). Random order: the loss of the masked
        tokens only (the head runs on them alone); raster: of all. batch_slice: see the class."""
        if isinstance(images, PreparedTokens):
            self._check_prepared(images, captions)
        else:
            self._check_images("forward", images)
            _check_image_values("Fluid.forward", images)
            captions = self._check_captions("forward", captions, images.shape[0])
        b = images.shape[0]
        if b == 0:
            raise ValueError("Fluid.forward: the batch is empty (0 images); the training loss is a mean over "
                             "images and needs at least one")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Fluid.forward: generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        if batch_slice is not None:
            ok = (isinstance(batch_slice, (tuple, list)) and len(batch_slice) == 2
                  and all(isinstance(v, int) for v in batch_slice)
                  and 0 <= batch_slice[0] and batch_slice[0] + b <= batch_slice[1])
            if not ok:
                raise ValueError(f"Fluid.forward: batch_slice must be (start, total) ints with 0 <= start and "
                                 f"start + {b} (this batch) <= total, got {batch_slice!r}")
            batch_slice = (int(batch_slice[0]), int(batch_slice[1]))
        if self.needs_tokenizer_fit:
            raise RuntimeError("Fluid.forward: the discrete variant's k-means tokenizer is not fitted; call "
                               "model.fit_tokenizer(images) first (or load a checkpoint)")
        z, tokens, index = self._outputs(images, captions, generator, batch_slice)
        zs, targets = self._select(z, tokens, index)
        t = noise = None
        if batch_slice is not None and self.config.token_kind == "continuous":
            start, total = batch_slice
            per_row = zs.shape[0] // b                # masked tokens per image (or all L)
            t, noise = self.draw_head_inputs(total * per_row, generator)
            mul = self.config.head.diffusion_batch_mul    # draw j*rows + i: view (mul, total, per_row)
            t = t.view(mul, total, per_row)[:, start:start + b].reshape(-1)
            noise = noise.view(mul, total, per_row, -1)[:, start:start + b].reshape(-1, noise.shape[-1])
        return self.head_loss(zs, targets, generator, t=t, noise=noise)

    def _check_prepared(self, tokens: PreparedTokens, text):
        if self.config.token_kind != "continuous":
            raise ValueError("Fluid.forward: prepared (cached) tokens are supported for continuous tokens only; "
                             f"this model's token_kind is {self.config.token_kind!r}")
        want = (self.seq_len, self.token_dim)
        if tuple(tokens.shape[2:]) != want:
            raise ValueError(f"Fluid.forward: prepared tokens have shape {tuple(tokens.shape)}, this model needs "
                             f"(B, views, {want[0]}, {want[1]}): the cache was prepared for another tokenizer "
                             "or image size")
        if not isinstance(text, PreparedText) or len(text) != len(tokens):
            raise ValueError("Fluid.forward: with PreparedTokens, captions must be PreparedText of the same batch, "
                             f"got {type(text).__name__}")
        if text.emb.shape[-1] != self.text_encoder.dim:
            raise ValueError(f"Fluid.forward: prepared text embeddings have dim {text.emb.shape[-1]}, this model's "
                             f"text encoder {self.config.text.encoder!r} gives {self.text_encoder.dim}")

    # ---- sampling --------------------------------------------------------------------------
    def _check_sampling_args(self, prompts, num_iter, cfg, cfg_schedule, temperature, num_diffusion_steps,
                             cfg_uncond):
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError(f"Fluid.generate: prompts must be a list of str, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("Fluid.generate: prompts is empty; give at least one prompt")
        prompts = self._check_captions("generate", prompts)
        d = self.config.sampling_defaults()
        num_iter = d["num_iter"] if num_iter is None else num_iter
        cfg = d["cfg"] if cfg is None else cfg
        temperature = d["temperature"] if temperature is None else temperature
        cfg_uncond = d["cfg_uncond"] if cfg_uncond is None else cfg_uncond
        check_cfg_uncond("Fluid.generate", cfg_uncond, self.config.order)
        steps = self.config.sampling.num_diffusion_steps if num_diffusion_steps is None else num_diffusion_steps
        if self.config.order == "raster":
            if num_iter is not None and num_iter != self.seq_len:
                raise ValueError(f"Fluid.generate: raster order generates one token per step, so num_iter must be "
                                 f"None or {self.seq_len} (the number of tokens), got {num_iter!r}")
            num_iter = self.seq_len
        elif num_iter is None:
            num_iter = 64
        if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
            raise ValueError(f"Fluid.generate: num_iter must be an int >= 1, got {num_iter!r}")
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
            raise ValueError(f"Fluid.generate: cfg must be a finite number, got {cfg!r}")
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"Fluid.generate: cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"Fluid.generate: temperature must be a finite number >= 0, got {temperature!r}")
        # one count per AR step (raster: per token); an int, a named schedule or a callable
        steps = sampling.step_schedule(steps, num_iter, self.config.sampling.num_diffusion_steps,
                                       owner="Fluid.generate")
        return prompts, num_iter, float(cfg), float(temperature), steps, cfg_uncond

    def _sample_rows(self, z_cond, z_uncond, w, temperature, steps, generator, gemm_dtype, solver="ddpm", eta=0.0):
        """Tokens for rows z_cond (N, W); CFG with scale w against z_uncond when given."""
        if self.config.token_kind == "continuous":
            z = z_cond if z_uncond is None else torch.cat([z_cond, z_uncond])
            clip = self.config.sampling.clip_denoised
            if clip is None:
                # Pixel-patch tokens lie in [-1, 1]. Clamping the predicted x_0 there keeps the first
                # steps from t ~ 1000 (1/sqrt(alpha_bar) ~ 2e4 amplifies the head's eps error) from
                # throwing x out of range: without it a tiny head trained 600 steps sampled noise of
                # magnitude ~1e3, with it the right colours on a clean background.
                clip = self.config.image.tokenizer == "patch"
            # the head's GEMM dtype is gemm_dtype's, never autocast's (generate's precision="bf16")
            with torch.autocast(self.device.type, enabled=False):
                return sampling.diffusion_sample(self.head.net, z.float(), num_steps=steps, temperature=temperature,
                                                  cfg=1.0 if z_uncond is None else w, generator=generator,
                                                  gemm_dtype=gemm_dtype, clip_denoised=clip,
                                                  noise_shift=self.config.head.noise_shift, solver=solver, eta=eta)
        logits = self.head(z_cond).float()
        if z_uncond is not None:
            lu = self.head(z_uncond).float()
            logits = lu + w * (logits - lu)
        return sample_categorical(logits, temperature=temperature, generator=generator)

    def _empty_tokens(self, b):
        if self.config.token_kind == "continuous":
            return torch.zeros(b, self.seq_len, self.token_dim, device=self.device)
        return torch.zeros(b, self.seq_len, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, num_iter: int | None = None, cfg: float | None = None,
                 cfg_schedule: str = "linear", temperature: float | None = None,
                 num_diffusion_steps: int | None = None, cfg_uncond: str | None = None,
                 generator: torch.Generator | None = None, progress: bool = False, kv_cache: bool = True,
                 gemm_dtype=None, precision: str = "auto", solver: str | None = None, eta: float | None = None,
                 cache_interval: int | None = None, uncond_cache_interval: int | None = None,
                 preset: str | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) float32 in [0, 1], one per prompt. Defaults (None) come from the
        config: num_iter (random order; raster always takes one step per token), cfg and temperature
        (the paper's values for the variant), num_diffusion_steps (config.sampling.num_diffusion_steps).
        cfg_schedule "linear": the CFG scale grows with the fraction of known tokens (docs/contracts.md §2.4);
        "constant". cfg_uncond (random order): the unconditional branch drops the text ("text") or the
        text and every known token ("all"); see FluidConfig. The same generator state gives the same
        images. kv_cache=False (raster only)
        recomputes the whole prefix every step instead of using the cache (same result; a check).
        gemm_dtype: the diffusion head's GEMM dtype (see fluid_ops.diffusion_sample; None: the
        precision's). precision: "auto" (bf16 where the device computes it natively:
        `fluid_ops.backend.auto_precision`), "bf16" (the transformer under bf16 autocast, bf16 head
        GEMMs; rounding-level) or "fp32" (exact).

        Faster sampling, all opt-in (docs/contracts.md §2.3, "Fast sampling"); the defaults are exact:
        num_diffusion_steps may also be a per-AR-step schedule: ("linear", first, last),
        ("cosine", first, last), "linear" / "cosine" (the config's count down to a tenth of it) or a
        callable of the progress p in [0, 1] -> steps (fluid_ops.sampling.step_schedule).
        solver: "ddpm" (default), "ddim" (with eta) or "dpm++2m" (fluid_ops.diffusion_sample).
        cache_interval k (random order): the transformer runs on every k-th AR step only; in between,
        the tokens still masked (whose inputs did not change) reuse their cached features.
        uncond_cache_interval: the same for CFG's unconditional branch (default: cache_interval).
        preset="fast": fluid_ops.sampling.FAST_PRESET for the options left None."""
        prec = backend.resolve_precision(precision, self.device)
        if gemm_dtype is None and prec == "bf16":
            gemm_dtype = torch.bfloat16
        fast = sampling.resolve_fast_options("Fluid.generate", preset, num_diffusion_steps, solver, eta,
                                             cache_interval, uncond_cache_interval)
        prompts, num_iter, cfg, temperature, steps, cfg_uncond = self._check_sampling_args(
            prompts, num_iter, cfg, cfg_schedule, temperature, fast["num_diffusion_steps"], cfg_uncond)
        head = {"solver": fast["solver"], "eta": fast["eta"]}
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Fluid.generate: generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__} (fluid_ops.generate takes seed=...)")
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"Fluid.generate: generator must be on the model's device ({self.device.type}), got a "
                             f"{generator.device.type} generator (sampling draws its noise on the device)")
        if self.needs_tokenizer_fit:
            raise RuntimeError("Fluid.generate: the discrete variant's k-means tokenizer is not fitted; call "
                               "model.fit_tokenizer(images) first (or load a checkpoint)")
        was_training = self.training
        self.eval()
        try:
            # "fp32" leaves autocast as the caller set it (the head's GEMMs follow gemm_dtype alone)
            amp = torch.autocast(self.device.type, torch.bfloat16) if prec == "bf16" else contextlib.nullcontext()
            with amp:
                if self.config.order == "random":
                    tokens = self._generate_random(prompts, num_iter, cfg, cfg_schedule, temperature, steps,
                                                   generator, progress, gemm_dtype, cfg_uncond, head=head,
                                                   cache=(fast["cache_interval"], fast["uncond_cache_interval"]))
                else:
                    tokens = self._generate_raster(prompts, cfg, cfg_schedule, temperature, steps, generator,
                                                   progress, kv_cache, gemm_dtype, head=head)
        finally:
            self.train(was_training)
        return self.tokenizer.decode(tokens).float().clamp(0, 1)

    def _conditions(self, prompts, guided):
        """Text context for the batch, [cond; uncond] (2B rows) when guided."""
        ctx, cmask, pooled = self.encode_text(prompts)
        if guided:
            b, n = ctx.shape[:2]
            nctx, nmask = self.null_context(b, n)
            ctx, cmask = torch.cat([ctx, nctx.to(ctx.dtype)]), torch.cat([cmask, nmask])
            pooled = None if pooled is None else torch.cat([pooled, self._null_pooled(nctx.to(ctx.dtype), nmask)])
        return ctx, cmask, pooled

    def _generate_random(self, prompts, num_iter, cfg, cfg_schedule, temperature, steps, generator, progress,
                         gemm_dtype, cfg_uncond="text", head=None, cache=(1, 1)):
        b, l, dev = len(prompts), self.seq_len, self.device
        guided = cfg != 1.0
        ctx, cmask, pooled = self._conditions(prompts, guided)
        z_uncond_all = None
        if guided and cfg_uncond == "all":
            # the unconditional rows see the null text and no known token at any step: one pass
            pu = None if pooled is None else pooled[b:]
            xu = self._add_position_and_text(self.mask_token.to(ctx.dtype).expand(b, l, -1), pu)
            z_uncond_all = self._head_input(self.transformer(xu, context=ctx[b:], context_mask=cmask[b:],
                                                             cond=self._cond(pu)))
            ctx, cmask, pooled = ctx[:b], cmask[:b], None if pooled is None else pooled[:b]
        both = guided and z_uncond_all is None     # [cond; uncond] rows through the transformer
        tokens = self._empty_tokens(b)
        known = torch.zeros(b, l, dtype=torch.bool, device=dev)
        orders = schedules.random_orders(b, l, generator=generator).to(dev)
        masked_after = schedules.mask_schedule(l, num_iter)
        scales = schedules.cfg_schedule(cfg, l, num_iter, cfg_schedule)
        bidx = torch.arange(b, device=dev)[:, None]
        n_before = l
        every, every_u = cache
        z_c = z_u = None   # the features of the last pass (feature caching, LazyMAR): cond rows, uncond rows
        done = 0           # AR steps that revealed tokens so far
        for k in _progress(range(num_iter), progress, "Fluid.generate"):
            n_after = masked_after[k]
            if n_after == n_before:  # num_iter > L: this step reveals nothing
                continue
            # The tokens sampled now are still masked: their inputs are the ones they had at the last
            # pass, so between refreshes their cached features stand in (exact when every == 1).
            run_c = z_c is None or done % every == 0
            run_u = both and (z_u is None or done % every_u == 0)
            if run_c or run_u:
                x = torch.where(known[..., None], self._embed_tokens(tokens), self.mask_token.to(ctx.dtype))
                if run_c and run_u:
                    rows, xs = slice(None), torch.cat([x, x])
                else:
                    rows, xs = (slice(0, b), x) if run_c else (slice(b, None), x)
                pr = None if pooled is None else pooled[rows]
                z = self._head_input(self.transformer(self._add_position_and_text(xs, pr), context=ctx[rows],
                                                      context_mask=cmask[rows], cond=self._cond(pr)))
                if run_c:
                    z_c = z[:b]
                if run_u:
                    z_u = z[-b:]
            done += 1
            idx = orders[:, n_after:n_before]              # this step's tokens (masked = order prefix)
            w = scales[k]
            zc = z_c[bidx, idx].reshape(-1, z_c.shape[-1])
            zsrc = z_u if both else z_uncond_all
            zu = zsrc[bidx, idx].reshape(-1, zc.shape[-1]) if guided and w != 1.0 else None
            new = self._sample_rows(zc, zu, w, temperature, steps if isinstance(steps, int) else steps[k], generator,
                                    gemm_dtype, **(head or {}))
            tokens[bidx, idx] = new.reshape(b, idx.shape[1], *tokens.shape[2:]).to(tokens.dtype)
            known[bidx, idx] = True
            n_before = n_after
        return tokens

    def _raster_scale(self, cfg, i, kind):
        """CFG scale for raster token i: linear in the number of known tokens after the step."""
        return cfg if kind == "constant" else 1.0 + (cfg - 1.0) * (i + 1) / self.seq_len

    def _generate_raster(self, prompts, cfg, cfg_schedule, temperature, steps, generator, progress, kv_cache,
                         gemm_dtype, head=None):
        b, l = len(prompts), self.seq_len
        guided = cfg != 1.0
        ctx, cmask, pooled = self._conditions(prompts, guided)
        rows = ctx.shape[0]
        tokens = self._empty_tokens(b)
        inputs = self.start_token.to(ctx.dtype).expand(rows, 1, -1)   # input of position 0
        if kv_cache:
            dev_type = ctx.device.type
            # under autocast the K/V projections come out in the autocast dtype: cache that dtype
            cache_dtype = torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else ctx.dtype
            cache = self.transformer.new_cache(rows, l, dtype=cache_dtype)
            ckv = self.transformer.context_kv(ctx)                     # text K/V once per generation
        else:
            history = []
        for i in _progress(range(l), progress, "Fluid.generate"):
            x = self._add_position_and_text(inputs, pooled, positions=[i])
            if kv_cache:
                z = self.transformer.decode(x, cache, ckv, cmask, cond=self._cond(pooled))
            else:
                history.append(x)
                z = self.transformer(torch.cat(history, 1), causal=True, context=ctx, context_mask=cmask,
                                     cond=self._cond(pooled))[:, -1:]
            z = self._head_input(z, positions=[i])[:, 0]
            w = self._raster_scale(cfg, i, cfg_schedule)
            zu = z[b:] if guided and w != 1.0 else None
            new = self._sample_rows(z[:b], zu, w, temperature, steps if isinstance(steps, int) else steps[i], generator,
                                    gemm_dtype, **(head or {}))
            tokens[:, i] = new.to(tokens.dtype)
            if i + 1 < l:
                e = self._embed_tokens(tokens[:, i:i + 1])
                inputs = torch.cat([e, e]) if guided else e
        return tokens
