"""MAR (Li et al., arXiv 2406.11838): class-conditional masked autoregressive generation with a
per-token diffusion head, assembled from fluid_ops' ops (docs/contracts.md §1, §2.3, §2.4).

Same constructor arguments, parameter names and shapes as MAR's `models/mar.py`, so a published
MAR checkpoint (`ckpt['model']` or `ckpt['model_ema']`) loads with `strict=True`.

Differences from MAR's code, all on purpose (the results are MAR's):
* No `nonzero`. MAR drops the masked tokens before its encoder with a boolean gather
  (`nonzero`: a host sync and a data-dependent shape). Here the masked tokens are always a
  prefix of the order, so the known ones are `orders[:, num_masked:]` with `num_masked` known on
  the host (training: from the mask ratio; sampling: `mask_schedule`); `forward` and
  `sample_tokens` gather / scatter by those indices (`known_index=`; `compact_encoder = True`).
  Inside the encoder the tokens follow the order instead of MAR's ascending positions;
  attention is permutation-equivariant and everything else is per token, so the results equal
  MAR's up to summation order.
* Fixed shapes, when wanted (`compact_encoder = False`, or `forward_mae_encoder` without
  known_index): the encoder runs on all buffer + L positions and a key-padding mask keeps every
  query from attending masked tokens; outputs at known positions equal MAR's, the decoder
  replaces the others by `mask_token` as MAR's scatter does. One shape for every step (CUDA-graph
  friendly) at the cost of computing the masked rows too.
* The diffusion loss (`fluid_ops.nn.diffusion_loss`) runs the head on the masked tokens only
  (MAR runs it on all B * L * diffusion_batch_mul rows and multiplies by the mask) and embeds each
  token's z once for its diffusion_batch_mul t-draws instead of repeating z; t and noise are drawn
  as MAR draws them, so the loss and its gradients equal MAR's up to summation order.
* The tokens predicted at a sampling step are `orders[:, n_after:n_before]`; they reach the
  diffusion head in order-of-generation rather than MAR's row-major order, which only changes
  which noise draw goes to which token (same distribution).
* Randomness: orders, the training mask ratio, label dropout and all diffusion noise come from
  the `generator` argument. Dropout layers (training only) use torch's global RNG so that
  activation checkpointing (`grad_checkpointing=True`) replays them exactly.
* Attention dropout (`attn_dropout`, training only) is not an option of `fluid_ops.attention`;
  while training with attn_dropout > 0 the blocks use torch's scaled_dot_product_attention with
  dropout (same maths). In eval mode, or with attn_dropout=0, they call `fluid_ops.attention`.

Loading and saving:
* `MAR.from_checkpoint(path, ema=True, model=None, **mar_kwargs)` builds the model from one of
  MAR's own `.pth` checkpoints (weights_only), the constructor's arguments taken from
  mar_kwargs, the checkpoint's training args, or the weights' shapes (see there);
  `model.load_mar_checkpoint(path)` loads one into an existing model.
* `model.save(path)` / `MAR.load(path)`: our safetensors files (weights + `model.config`, the
  constructor's arguments as JSON; `fluid_ops.models.io`), bit-exact round trip.

Host syncs that remain: the training mask ratio (`mask_ratio` returns a Python float, read from
`generator`'s device: a sync when that is a CUDA generator). Sampling has none of its own.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fluid_ops import backend, sampling
from fluid_ops.models import io as model_io
from fluid_ops.models import mar_checkpoint as _ckpt
from fluid_ops.nn.diffloss import DiffLoss
from fluid_ops.ops.attention import attention
from fluid_ops.reference import schedules

__all__ = ["MAR", "DiffLoss", "Block", "mar_base", "mar_large", "mar_huge", "mar_tiny", "FACTORIES"]

# what `MAR.save` writes as the safetensors kind, and `MAR.load` accepts
KIND = "fluid_ops.models.MAR"


# ---- transformer block (timm's Block, the parts MAR uses) ---------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv Linear; parameter names as timm (`qkv`, `proj`)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # (B, N, H, D) views, no transposes
        if self.training and self.attn_drop > 0:
            # fluid_ops.attention has no dropout on the probabilities: torch's SDPA does it here.
            mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, dropout_p=self.attn_drop).transpose(1, 2)
        else:
            o = attention(q, k, v, key_padding_mask=key_padding_mask)
        return self.proj_drop(self.proj(o.reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) (timm's Block with
    qkv_bias=True; parameter names norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_layer=nn.LayerNorm,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask)
        return x + self.mlp(self.norm2(x))


def _shape_of(t):
    """For error messages: a tensor's shape, or the type of whatever came instead."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_pos_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"MAR: {name} must be an int >= {minimum}, got {v!r}")


def _check_prob(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"MAR: {name} must be a number in [0, 1], got {v!r}")


class MAR(nn.Module):
    """Masked autoregressive model with a diffusion head (MAR's constructor and methods)."""

    def __init__(self, img_size=256, vae_stride=16, patch_size=1,
                 encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                 decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=nn.LayerNorm,
                 vae_embed_dim=16, mask_ratio_min=0.7, label_drop_prob=0.1, class_num=1000,
                 attn_dropout=0.1, proj_dropout=0.1, buffer_size=64,
                 diffloss_d=3, diffloss_w=1024, num_sampling_steps='100',
                 diffusion_batch_mul=4, grad_checkpointing=False):
        super().__init__()
        # The constructor's arguments, JSON-able (what `save` writes and `from_config` rebuilds
        # from); norm_layer is described as {"type": "LayerNorm", "eps": ...} (None when it is
        # something else: such a model cannot be saved with `save`).
        self.config = dict(
            img_size=img_size, vae_stride=vae_stride, patch_size=patch_size,
            encoder_embed_dim=encoder_embed_dim, encoder_depth=encoder_depth, encoder_num_heads=encoder_num_heads,
            decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio, norm_layer=_describe_norm_layer(norm_layer), vae_embed_dim=vae_embed_dim,
            mask_ratio_min=mask_ratio_min, label_drop_prob=label_drop_prob, class_num=class_num,
            attn_dropout=attn_dropout, proj_dropout=proj_dropout, buffer_size=buffer_size, diffloss_d=diffloss_d,
            diffloss_w=diffloss_w, num_sampling_steps=num_sampling_steps, diffusion_batch_mul=diffusion_batch_mul,
            grad_checkpointing=grad_checkpointing)
        for name, v in (("img_size", img_size), ("vae_stride", vae_stride), ("patch_size", patch_size),
                        ("encoder_embed_dim", encoder_embed_dim), ("encoder_depth", encoder_depth),
                        ("encoder_num_heads", encoder_num_heads), ("decoder_embed_dim", decoder_embed_dim),
                        ("decoder_depth", decoder_depth), ("decoder_num_heads", decoder_num_heads),
                        ("vae_embed_dim", vae_embed_dim), ("class_num", class_num), ("buffer_size", buffer_size),
                        ("diffloss_w", diffloss_w), ("diffusion_batch_mul", diffusion_batch_mul)):
            _check_pos_int(name, v)
        _check_pos_int("encoder_depth", encoder_depth, 0)
        _check_pos_int("decoder_depth", decoder_depth, 0)
        _check_pos_int("diffloss_d", diffloss_d, 0)
        if img_size % (vae_stride * patch_size):
            raise ValueError(f"MAR: img_size ({img_size}) must be a multiple of vae_stride * patch_size "
                             f"({vae_stride} * {patch_size})")
        for name, v in (("mask_ratio_min", mask_ratio_min), ("label_drop_prob", label_drop_prob),
                        ("attn_dropout", attn_dropout), ("proj_dropout", proj_dropout)):
            _check_prob(name, v)
        if mask_ratio_min >= 1.0:
            raise ValueError(f"MAR: mask_ratio_min must be < 1, got {mask_ratio_min}")
        try:  # MAR passes IDDPM's respacing string; only a plain step count is meaningful here
            steps = int(str(num_sampling_steps))
        except ValueError:
            raise ValueError(f"MAR: num_sampling_steps must be a step count such as '100', got "
                             f"{num_sampling_steps!r}") from None
        if not 1 <= steps <= 1000:
            raise ValueError(f"MAR: num_sampling_steps must be in [1, 1000], got {num_sampling_steps!r}")

        self.vae_embed_dim = vae_embed_dim
        self.img_size, self.vae_stride, self.patch_size = img_size, vae_stride, patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.grad_checkpointing = grad_checkpointing

        self.num_classes = class_num
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.label_drop_prob = label_drop_prob
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))  # the "null" class
        self.mask_ratio_min = mask_ratio_min

        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim, bias=True)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.buffer_size = buffer_size
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList([
            Block(encoder_embed_dim, encoder_num_heads, mlp_ratio, norm_layer, attn_dropout, proj_dropout)
            for _ in range(encoder_depth)])
        self.encoder_norm = norm_layer(encoder_embed_dim)

        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer, attn_dropout, proj_dropout)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))

        self.initialize_weights()

        self.diffloss = DiffLoss(self.token_embed_dim, decoder_embed_dim, diffloss_d, diffloss_w, steps,
                                 grad_checkpointing)
        self.diffusion_batch_mul = diffusion_batch_mul
        # forward / sample_tokens run the encoder on the buffer + known tokens only (gathered by
        # order, as MAR); False: fixed shapes (all positions, key-padding mask), same results.
        self.compact_encoder = True

    def initialize_weights(self):
        """MAR's init (before the diffusion head exists, which keeps its own): N(0, 0.02)
        embeddings, xavier-uniform linears with zero bias, LayerNorm weight 1 / bias 0."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def load_mar_checkpoint(self, checkpoint, *, ema: bool = True, strict: bool = True):
        """Load a published MAR checkpoint into this model (copying): a path (torch.load on the
        CPU, weights_only) or the loaded dict `{'model': ..., 'model_ema': ...}` (ema=True picks
        'model_ema', the weights MAR evaluates with), or a bare state dict. Raises ValueError
        naming every tensor of the wrong shape (and, strict, the missing / unexpected ones)
        before anything is copied. Returns load_state_dict's result.
        To build the model from the checkpoint instead, use `MAR.from_checkpoint`."""
        return _ckpt.load_mar_checkpoint(self, checkpoint, ema=ema, strict=strict)

    # ---- building from files ----------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict) -> "MAR":
        """A new MAR from a `config` dict (`model.config`: the constructor's arguments, norm_layer
        as {"type": "LayerNorm", "eps": e}). Freshly initialised weights."""
        if not isinstance(config, dict):
            raise TypeError(f"MAR.from_config: config must be a dict, got {type(config).__name__}")
        kw = dict(config)
        if "norm_layer" in kw:
            kw["norm_layer"] = _norm_layer_from_description(kw["norm_layer"])
        try:
            return cls(**kw)
        except TypeError as e:
            raise TypeError(f"MAR.from_config: config has an argument MAR does not take ({e}); keys: "
                            f"{sorted(config)}") from None

    @classmethod
    def from_checkpoint(cls, checkpoint, ema: bool = True, model: str | None = None, *, strict: bool = True,
                        **mar_kwargs) -> "MAR":
        """Build a MAR from one of MAR's own checkpoints (LTH14/mar's `checkpoint-last.pth`:
        `{'model', 'model_ema'}`, training checkpoints also 'optimizer', 'epoch', 'args'), in eval
        mode, on the CPU. checkpoint: a path (read with torch.load(weights_only=True); MAR's
        argparse 'args' entry is allowed) or the loaded dict (its tensors are copied).
        ema: take 'model_ema' (the weights MAR evaluates with) or 'model'.

        The constructor's arguments, first found wins:
          1. `mar_kwargs` (any of MAR's constructor arguments, e.g. num_sampling_steps="50");
          2. the checkpoint's 'args' (MAR's training arguments: model name, img_size,
             vae_stride, patch_size, vae_embed_dim, class_num, buffer_size, diffloss_d,
             diffloss_w, num_sampling_steps, ...), when present;
          3. the weights' shapes: class_num, buffer_size, diffloss_d / diffloss_w, and the token
             grid (img_size = sqrt(tokens) * patch_size * vae_stride, vae_stride 16 and
             patch_size 1 unless given; vae_embed_dim = token width / patch_size^2).
        The model size: `model` ("mar_base", "mar_large", "mar_huge", "mar_tiny"), else the
        checkpoint's args.model, else the factory whose width and depth the weights have. Weights
        of another size build a plain MAR from their shapes (widths, depths, mlp_ratio) and
        then need encoder_num_heads and decoder_num_heads in mar_kwargs (heads leave no trace in
        the weights).
        Errors: FileNotFoundError (no file), ValueError (not a torch checkpoint, no weights,
        wrong shapes: every such tensor named with both shapes), KeyError (no 'model_ema' /
        'model' entry, or it is None)."""
        return _ckpt.from_checkpoint(cls, checkpoint, ema, model, strict=strict, **mar_kwargs)

    def save(self, path) -> Path:
        """Write this model to `path` as safetensors: the weights (their dtype kept) and the
        metadata {"kind": "fluid_ops.models.MAR", "config": self.config, "fluid_ops_version"}
        (`fluid_ops.models.io.save_safetensors`; atomic). `MAR.load(path)` rebuilds it."""
        if self.config.get("norm_layer") is None:
            raise ValueError("MAR.save: this model's norm_layer is not nn.LayerNorm (or a partial of it with "
                             "only eps), so the config cannot describe it; save its state_dict instead")
        return model_io.save_safetensors(self, path, config=self.config, kind=KIND)

    @classmethod
    def load(cls, path, *, device="cpu", strict: bool = True) -> "MAR":
        """The model `save` wrote to `path`, in eval mode on `device`, bit-exact (same weights,
        same dtype, same config). Errors: FileNotFoundError, ValueError for a corrupt file, a file
        of another kind, or weights that do not fit the config (missing tensors, wrong shapes,
        each named)."""
        state_dict, meta = model_io.load_safetensors(path, kind=KIND, device=device)
        return model_io.build_with_weights(partial(cls.from_config, meta["config"]), state_dict,
                                           source=f"MAR.load({path})", strict=strict).eval()

    # ---- tokens ---------------------------------------------------------------------------
    def _check_latents(self, op, imgs):
        size = self.seq_h * self.patch_size
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"MAR.{op}: imgs must be a torch.Tensor, got {type(imgs).__name__}")
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != (self.vae_embed_dim, size, size):
            raise ValueError(f"MAR.{op}: imgs must be VAE latents of shape (B, {self.vae_embed_dim}, {size}, {size}), "
                             f"got {tuple(imgs.shape)}")
        if not imgs.is_floating_point():
            raise TypeError(f"MAR.{op}: imgs must be floating point, got {imgs.dtype}")

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, L, C p^2) tokens, channel-major within a patch (as MAR)."""
        self._check_latents("patchify", x)
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C p^2) tokens -> (B, C, h, w) latents (inverse of `patchify`)."""
        want = (self.seq_len, self.token_embed_dim)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[1:]) != want:
            raise ValueError(f"MAR.unpatchify: x must have shape (B, {self.seq_len}, {self.token_embed_dim}), "
                             f"got {_shape_of(x)}")
        b, p, c = x.shape[0], self.patch_size, self.vae_embed_dim
        x = x.reshape(b, self.seq_h, self.seq_w, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, self.seq_h * p, self.seq_w * p)

    def sample_orders(self, bsz: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(bsz, seq_len) int64: a random generation order (permutation) per image."""
        device = self.fake_latent.device if device is None else device
        return schedules.random_orders(bsz, self.seq_len, generator=generator, device=device)

    def random_masking(self, x: torch.Tensor, orders: torch.Tensor, generator: torch.Generator | None = None):
        """(B, L) float mask, 1 = masked (to predict): the first ceil(L * r) tokens of each order,
        r ~ truncated normal on [mask_ratio_min, 1] (one ratio per batch)."""
        return self._random_masking(x, orders, generator)[0]

    def _random_masking(self, x, orders, generator):
        """(mask, number of masked tokens per row) -- the count as a Python int (no sync)."""
        bsz, seq_len = x.shape[0], x.shape[1]
        r = schedules.mask_ratio(generator=generator, min_ratio=self.mask_ratio_min)
        mask = schedules.training_mask(bsz, seq_len, r, orders.to(x.device)).to(x.dtype)
        return mask, int(math.ceil(seq_len * r))

    # ---- encoder / decoder ----------------------------------------------------------------
    def _check_mask(self, op, mask, bsz):
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (bsz, self.seq_len):
            raise ValueError(f"MAR.{op}: mask must be a tensor of shape ({bsz}, {self.seq_len}), got "
                             f"{_shape_of(mask)}")

    def _known_with_buffer(self, mask):
        """(B, buffer + L) bool, True at the buffer and the known (unmasked) tokens."""
        known = ~mask.bool()
        buf = torch.ones(known.shape[0], self.buffer_size, dtype=torch.bool, device=known.device)
        return torch.cat([buf, known], dim=1)

    def _check_known_index(self, op, known_index, bsz, device):
        """Validate known_index (B, K) and prepend the buffer positions: (B, buffer + K) indices
        into the buffer + L sequence."""
        if not isinstance(known_index, torch.Tensor) or known_index.dtype != torch.int64 \
                or known_index.dim() != 2 or known_index.shape[0] != bsz or known_index.shape[1] > self.seq_len:
            got = f"{tuple(known_index.shape)} {known_index.dtype}" if isinstance(known_index, torch.Tensor) \
                else type(known_index).__name__
            raise ValueError(f"MAR.{op}: known_index must be an int64 tensor of shape ({bsz}, K), K <= "
                             f"{self.seq_len}, got {got}")
        buf = torch.arange(self.buffer_size, device=device).expand(bsz, self.buffer_size)
        return torch.cat([buf, known_index.to(device) + self.buffer_size], dim=1)

    def _run(self, blocks, x, key_padding_mask):
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, key_padding_mask, use_reentrant=False)
            else:
                x = blk(x, key_padding_mask)
        return x

    def forward_mae_encoder(self, x: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor,
                            generator: torch.Generator | None = None, *,
                            known_index: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, token_dim) tokens, mask (B, L) (nonzero = masked), class_embedding (B, E).

        known_index None (fixed shapes): returns (B, buffer + L, E), at the buffer and the known
        positions MAR's encoder output; rows of masked positions are unspecified (the decoder
        replaces them) and cost compute. known_index (B, K) int64, the positions of the K known
        tokens of each row (e.g. orders[:, num_masked:]; must agree with mask): the encoder runs
        on the buffer and those tokens only, as MAR's, and returns (B, buffer + K, E) in that
        order (MAR's compacted output, its tokens permuted). Pass the same known_index to
        `forward_mae_decoder`. In training, each row's class embedding is replaced by
        `fake_latent` with probability label_drop_prob (drawn from generator)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1:] != (self.seq_len, self.token_embed_dim):
            raise ValueError(f"MAR.forward_mae_encoder: x must have shape (B, {self.seq_len}, {self.token_embed_dim}), "
                             f"got {_shape_of(x)}")
        bsz = x.shape[0]
        self._check_mask("forward_mae_encoder", mask, bsz)
        e = self.fake_latent.shape[1]
        if not isinstance(class_embedding, torch.Tensor) or tuple(class_embedding.shape) != (bsz, e):
            raise ValueError(f"MAR.forward_mae_encoder: class_embedding must have shape ({bsz}, {e}), got "
                             f"{_shape_of(class_embedding)}")
        x = self.z_proj(x)
        if self.training and self.label_drop_prob > 0:
            drop = schedules.null_condition_mask(bsz, self.label_drop_prob, generator=generator, device=x.device)
            class_embedding = torch.where(drop[:, None], self.fake_latent.to(x.dtype), class_embedding)
        buf = class_embedding.to(x.dtype).unsqueeze(1).expand(bsz, self.buffer_size, x.shape[2])
        x = torch.cat([buf, x], dim=1) + self.encoder_pos_embed_learned
        x = self.z_proj_ln(x)
        if known_index is None:
            x = self._run(self.encoder_blocks, x, self._known_with_buffer(mask))
        else:
            idx = self._check_known_index("forward_mae_encoder", known_index, bsz, x.device)
            x = self._run(self.encoder_blocks, x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2])), None)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor, *,
                            known_index: torch.Tensor | None = None) -> torch.Tensor:
        """x: `forward_mae_encoder`'s output (with the same known_index); mask (B, L). Returns
        z (B, L, decoder dim): masked positions start from mask_token, all positions attend all
        others."""
        bsz = x.shape[0] if isinstance(x, torch.Tensor) else 0
        n_in = self.buffer_size + (self.seq_len if known_index is None else known_index.shape[-1])
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != n_in:
            raise ValueError(f"MAR.forward_mae_decoder: x must have shape (B, {n_in}, E) "
                             f"(forward_mae_encoder's output), got "
                             f"{_shape_of(x)}")
        self._check_mask("forward_mae_decoder", mask, bsz)
        x = self.decoder_embed(x)
        if known_index is None:
            keep = self._known_with_buffer(mask).unsqueeze(-1)
            x = torch.where(keep, x, self.mask_token.to(x.dtype))
        else:  # scatter the encoded tokens among mask tokens (MAR's x_after_pad, without nonzero)
            idx = self._check_known_index("forward_mae_decoder", known_index, bsz, x.device)
            full = self.mask_token.to(x.dtype).expand(bsz, self.buffer_size + self.seq_len, x.shape[2])
            x = full.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]), x)
        x = x + self.decoder_pos_embed_learned
        x = self._run(self.decoder_blocks, x, None)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    def forward_loss(self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     generator: torch.Generator | None = None, *,
                     masked_index: torch.Tensor | None = None) -> torch.Tensor:
        """Diffusion loss of the masked tokens: z (B, L, Dz), target (B, L, C), mask (B, L).
        The head runs on the masked tokens only; masked_index (B, K), the positions with mask 1
        in each row (e.g. orders[:, :num_masked]), finds them without a host sync."""
        if not isinstance(target, torch.Tensor) or target.dim() != 3:
            raise ValueError(f"MAR.forward_loss: target must have shape (B, L, C), got "
                             f"{_shape_of(target)}")
        b, l, c = target.shape
        if not isinstance(z, torch.Tensor) or z.dim() != 3 or z.shape[:2] != (b, l):
            raise ValueError(f"MAR.forward_loss: z must have shape ({b}, {l}, *), got "
                             f"{_shape_of(z)}")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, l):
            raise ValueError(f"MAR.forward_loss: mask must have shape ({b}, {l}), got "
                             f"{_shape_of(mask)}")
        index = None
        if masked_index is not None:
            if not isinstance(masked_index, torch.Tensor) or masked_index.dim() != 2 or masked_index.shape[0] != b:
                raise ValueError(f"MAR.forward_loss: masked_index must have shape ({b}, K), got {_shape_of(masked_index)}")
            # row of token (i, masked_index[i, j]) in the flattened (B * L) rows
            index = (torch.arange(b, device=masked_index.device)[:, None] * l + masked_index).reshape(-1)
        return self.diffloss(target.reshape(b * l, c), z.reshape(b * l, -1), mask.reshape(b * l),
                             diffusion_batch_mul=self.diffusion_batch_mul, generator=generator, index=index)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        """Training loss. imgs: VAE latents (B, vae_embed_dim, h, w) (already scaled, as MAR's
        training loop feeds them); labels (B,) int64 class indices."""
        self._check_latents("forward", imgs)
        self._check_labels("forward", labels, imgs.shape[0])
        class_embedding = self.class_emb(labels)
        x = self.patchify(imgs)
        gt = x.detach()
        orders = self.sample_orders(x.shape[0], generator, device=x.device)
        mask, num_masked = self._random_masking(x, orders, generator)
        known = orders[:, num_masked:] if self.compact_encoder else None
        h = self.forward_mae_encoder(x, mask, class_embedding, generator, known_index=known)
        z = self.forward_mae_decoder(h, mask, known_index=known)
        return self.forward_loss(z, gt, mask, generator, masked_index=orders[:, :num_masked])

    def _check_labels(self, op, labels, bsz):
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32) \
                or tuple(labels.shape) != (bsz,):
            got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"MAR.{op}: labels must be an int64 / int32 tensor of shape ({bsz},), got {got}")
        n = self.class_emb.num_embeddings
        if labels.numel() > 0:
            lo, hi = (int(v) for v in torch.aminmax(labels))
            if lo < 0 or hi >= n:
                raise ValueError(f"MAR.{op}: labels must be class indices in [0, {n}) (class_num), got values in "
                                 f"[{lo}, {hi}]")

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample_tokens(self, bsz: int, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                      labels: torch.Tensor | None = None, temperature: float = 1.0, progress: bool = False,
                      generator: torch.Generator | None = None, precision: str = "auto", *,
                      num_diffusion_steps=None, solver: str | None = None, eta: float | None = None,
                      cache_interval: int | None = None, uncond_cache_interval: int | None = None,
                      preset: str | None = None, clip_denoised: bool = False) -> torch.Tensor:
        """Generate (bsz, vae_embed_dim, h, w) latents in `num_iter` steps (docs/contracts.md §2.4): random
        order per image, cosine mask schedule, CFG against the null class (`fake_latent`) with the
        "linear" or "constant" schedule, `fluid_ops.sampling.diffusion_sample` for the tokens of each step.
        labels None: unconditional (every row uses the null class). Call in eval mode (as MAR).
        precision: "auto" (bf16 where the device computes it natively: `fluid_ops.backend.auto_precision`),
        "bf16" (encoder / decoder under bf16 autocast, bf16 head GEMMs; rounding-level) or "fp32" (exact).

        Faster sampling, opt-in as in `Fluid.generate` (docs/contracts.md §2.3, "Fast sampling"):
        num_diffusion_steps (default diffloss.num_sampling_steps) an int or a per-AR-step schedule;
        solver / eta for the head; cache_interval / uncond_cache_interval: the encoder and decoder run
        every k-th AR step, the still-masked tokens reusing their cached decoder features in between;
        preset="fast".
        clip_denoised: clamp the head's predicted x_0 to [-1, 1] at every diffusion step; off by default,
        as MAR (its VAE latents are unbounded), on for tokens known to lie in [-1, 1] (pixels)."""
        if not isinstance(clip_denoised, bool):
            raise TypeError(f"MAR.sample_tokens: clip_denoised must be a bool, got {type(clip_denoised).__name__}")
        prec = backend.resolve_precision(precision, self.fake_latent.device)
        fast = sampling.resolve_fast_options("MAR.sample_tokens", preset, num_diffusion_steps, solver, eta,
                                             cache_interval, uncond_cache_interval)
        if isinstance(bsz, bool) or not isinstance(bsz, int) or bsz < 0:
            raise ValueError(f"MAR.sample_tokens: bsz must be an int >= 0, got {bsz!r}")
        if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
            raise ValueError(f"MAR.sample_tokens: num_iter must be an int >= 1, got {num_iter!r}")
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"MAR.sample_tokens: cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
            raise ValueError(f"MAR.sample_tokens: cfg must be a finite number, got {cfg!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"MAR.sample_tokens: temperature must be a finite number >= 0, got {temperature!r}")
        if labels is not None:
            self._check_labels("sample_tokens", labels, bsz)
        steps_k = sampling.step_schedule(fast["num_diffusion_steps"] if fast["num_diffusion_steps"] is not None
                                         else self.diffloss.num_sampling_steps, num_iter,
                                         self.diffloss.num_sampling_steps, owner="MAR.sample_tokens")
        every, every_u = fast["cache_interval"], fast["uncond_cache_interval"]
        dev = self.fake_latent.device
        l, c = self.seq_len, self.token_embed_dim
        tokens = torch.zeros(bsz, l, c, device=dev, dtype=self.fake_latent.dtype)
        if bsz == 0:
            return self.unpatchify(tokens)
        guided = cfg != 1.0
        orders = self.sample_orders(bsz, generator, device=dev)
        masked_after = schedules.mask_schedule(l, num_iter)
        cfgs = schedules.cfg_schedule(cfg, l, num_iter, cfg_schedule)
        cond = self.class_emb(labels.to(dev)) if labels is not None else self.fake_latent.expand(bsz, -1)
        if guided:
            cond = torch.cat([cond, self.fake_latent.expand(bsz, -1)])
        mask = torch.ones(bsz, l, device=dev)
        steps = range(num_iter)
        if progress:
            try:
                from tqdm.auto import tqdm
                steps = tqdm(steps)
            except ImportError:
                pass
        n_before = l
        bidx = torch.arange(bsz, device=dev)[:, None]
        z_c = z_u = None  # cached decoder features (feature caching; refreshed every `every` AR steps)
        # one autocast context for the whole loop: its cache casts each weight to bf16 once per call;
        # "fp32" leaves autocast as the caller set it
        with torch.autocast(dev.type, torch.bfloat16) if prec == "bf16" else contextlib.nullcontext():
            done = 0
            for k in steps:
                n_after = masked_after[k]
                if n_after == n_before:  # K > L: this step unmasks nothing (MAR predicts no tokens)
                    continue
                run_c = z_c is None or done % every == 0
                run_u = guided and (z_u is None or done % every_u == 0)
                if run_c or run_u:
                    two = run_c and run_u
                    tok_in, mask_in = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if two else (tokens, mask)
                    c_in = cond if two else (cond[:bsz] if run_c else cond[bsz:])
                    known = None
                    if self.compact_encoder:  # the known tokens are the order's suffix orders[:, n_before:]
                        known = orders[:, n_before:]
                        known = torch.cat([known, known]) if two else known
                    z = self.forward_mae_encoder(tok_in, mask_in, c_in, known_index=known)
                    z = self.forward_mae_decoder(z, mask_in, known_index=known).float()
                    if run_c:
                        z_c = z[:bsz]
                    if run_u:
                        z_u = z[-bsz:]
                done += 1
                # this step's tokens: orders[:, n_after:n_before] (masked tokens are the order's prefix)
                idx = orders[:, n_after:n_before]
                zs = z_c[bidx, idx].reshape(-1, z_c.shape[-1])
                w = cfgs[k]
                if guided and w != 1.0:
                    zs = torch.cat([zs, z_u[bidx, idx].reshape(-1, z_c.shape[-1])])
                head = {} if (steps_k[k] == self.diffloss.num_sampling_steps and fast["solver"] == "ddpm") else \
                    {"num_steps": steps_k[k], "solver": fast["solver"], "eta": fast["eta"]}
                with torch.autocast(dev.type, enabled=False):  # the head's GEMM dtype is gemm_dtype's
                    new = self.diffloss.sample(zs, temperature, w if guided else 1.0, generator,
                                               gemm_dtype=torch.bfloat16 if prec == "bf16" else None,
                                               clip_denoised=clip_denoised, **head)
                tokens = tokens.clone()
                tokens[bidx, idx] = new.reshape(bsz, -1, c).to(tokens.dtype)
                mask = schedules.next_mask(mask, orders, n_after)
                n_before = n_after
        return self.unpatchify(tokens)


def _factory(width, depth, heads, head_depth, head_width, kwargs):
    # The diffusion head's size defaults to the paper's for this model (MAR's factories leave it
    # to the training script's --diffloss_d / --diffloss_w); any keyword overrides it.
    kwargs.setdefault("diffloss_d", head_depth)
    kwargs.setdefault("diffloss_w", head_width)
    return MAR(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
               decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads,
               mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def mar_base(**kwargs) -> MAR:
    """MAR-B: 12+12 blocks, width 768, 12 heads, diffusion head 6 blocks x 1024 (208M params)."""
    return _factory(768, 12, 12, 6, 1024, kwargs)


def mar_large(**kwargs) -> MAR:
    """MAR-L: 16+16 blocks, width 1024, 16 heads, diffusion head 8 x 1280 (479M params)."""
    return _factory(1024, 16, 16, 8, 1280, kwargs)


def mar_huge(**kwargs) -> MAR:
    """MAR-H: 20+20 blocks, width 1280, 16 heads, diffusion head 12 x 1536 (943M params)."""
    return _factory(1280, 20, 16, 12, 1536, kwargs)


def mar_tiny(**kwargs) -> MAR:
    """A tiny MAR for tests, CPU demos and smoke runs (not a published size): 64 px at stride
    16 (16 tokens of dim 16), 2+2 blocks, width 64, 2 heads of 32, 4 buffer tokens, 1000
    classes (ImageNet label numbers work), diffusion head 2 x 64, 8 sampling steps."""
    kwargs.setdefault("img_size", 64)
    kwargs.setdefault("buffer_size", 4)
    kwargs.setdefault("num_sampling_steps", "8")
    return _factory(64, 2, 2, 2, 64, kwargs)


# name -> factory (MAR's `mar.__dict__[args.model]`), used by `MAR.from_checkpoint`
FACTORIES = {"mar_base": mar_base, "mar_large": mar_large, "mar_huge": mar_huge, "mar_tiny": mar_tiny}
def _describe_norm_layer(norm_layer):
    """{"type": "LayerNorm", "eps": e} for nn.LayerNorm or partial(nn.LayerNorm, eps=e); else None."""
    if norm_layer is nn.LayerNorm:
        return {"type": "LayerNorm", "eps": 1e-5}
    if isinstance(norm_layer, partial) and norm_layer.func is nn.LayerNorm and not norm_layer.args \
            and set(norm_layer.keywords) <= {"eps"}:
        return {"type": "LayerNorm", "eps": float(norm_layer.keywords.get("eps", 1e-5))}
    return None


def _norm_layer_from_description(desc):
    if callable(desc):  # already a norm layer (a config built by hand)
        return desc
    if not isinstance(desc, dict) or desc.get("type") != "LayerNorm" \
            or not isinstance(desc.get("eps"), (int, float)) or isinstance(desc.get("eps"), bool):
        raise ValueError(f"MAR.from_config: norm_layer must be {{'type': 'LayerNorm', 'eps': <number>}}, got {desc!r}")
    return partial(nn.LayerNorm, eps=float(desc["eps"]))


# Checkpoint reading lives in fluid_ops.models.mar_checkpoint; these names stay importable from
# here (deprecated aliases, for one release).
from fluid_ops.models.mar_checkpoint import (  # noqa: E402,F401
    _CKPT_ARG_KEYS, _FACTORY_SIZES, _count_blocks, _describe, _factory_of_shapes, _infer_mar_kwargs,
    _read_mar_checkpoint, _shape, _size_from_shapes)
