"""A stand-in for the user's MAR (LTH14/mar) for testing `fluid_ops.accelerate`.

Neither timm nor MAR's repository can be installed here, so this module rebuilds, from reading
them, the parts `accelerate` touches, with the same module structure and attribute names:

* timm's `Attention` (qkv, q_norm, k_norm, attn_drop, proj, proj_drop, num_heads, head_dim,
  scale, fused_attn; forward(x, attn_mask=None) in the (3, B, H, N, D) layout), `Mlp`
  (fc1, act, drop1, norm, fc2, drop2) and `Block` (norm1, attn, ls1, drop_path1, norm2, mlp,
  ls2, drop_path2), timm 1.0-style;
* MAR's `SimpleMLPAdaLN` (with `forward_with_cfg`) and `DiffLoss` (`net`, `train_diffusion`,
  `gen_diffusion`, `forward(target, z, mask)`, `sample(z, temperature, cfg)` drawing its noise
  with torch.randn on the global RNG exactly as MAR does);
* a small IDDPM `SpacedDiffusion` stand-in (`num_timesteps`, `timestep_map`, `betas`,
  `p_sample_loop`, `training_losses`) on `fluid_ops.reference.diffusion`; like IDDPM it feeds
  the model the original timestep and draws each step's noise with randn_like after the model;
* a tiny `MAR` with MAR's attribute names whose encoder drops the masked tokens by a boolean
  gather (MAR's `nonzero`), or, with `key_masking=True`, keeps all positions and passes a
  boolean key mask to the blocks (timm >= 1.0 Blocks take `attn_mask`).

Device-agnostic where MAR calls `.cuda()`; orders and mask ratios come from torch's global RNG
instead of numpy / scipy (the RNG source is not what accelerate changes).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fluid_ops.reference import diffusion as rd


# ---- timm-like layers --------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0, proj_drop=0.0,
                 norm_layer=nn.LayerNorm, fused_attn=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_norm=False, proj_drop=0.0,
                 attn_drop=0.0, norm_layer=nn.LayerNorm, fused_attn=True):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop,
                              proj_drop=proj_drop, norm_layer=norm_layer, fused_attn=fused_attn)
        self.ls1 = nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


# ---- MAR's diffusion head ---------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class ResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, model_channels, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, in_channels, model_channels, out_channels, z_channels, num_res_blocks):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        # MAR zero-initialises the adaLN and output layers; tests randomise them (randomize_head)
        # so that the head's output is not trivially zero.

    def forward(self, x, t, c):
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, :self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class _Named:
    def __init__(self, name):
        self.name = name


class SpacedDiffusion:
    """IDDPM's SpacedDiffusion, the parts MAR uses (cosine schedule, learned-range variance)."""

    model_mean_type = _Named("EPSILON")
    model_var_type = _Named("LEARNED_RANGE")

    def __init__(self, timestep_respacing: str = ""):
        steps = 1000 if timestep_respacing in ("", None) else int(timestep_respacing)
        # IDDPM's respacing: a running float index, rounded (which, for some counts such as 21,
        # keeps other steps than rounding i * stride does).
        stride = (1000 - 1) / (steps - 1) if steps > 1 else 1.0
        kept, cur = set(), 0.0
        for _ in range(steps):
            kept.add(round(cur))
            cur += stride
        self.timestep_map = sorted(kept)
        acp = np.cumprod(1.0 - rd.cosine_betas(1000))
        self.betas = 1.0 - acp[self.timestep_map] / np.append(1.0, acp[self.timestep_map][:-1])
        self.num_timesteps = len(self.timestep_map)
        self.original_num_steps = 1000
        sched = rd.DiffusionSchedule(None if steps == 1000 else steps)
        # the loop below reuses fluid_ops' reference tables, which exist for its own respacing only
        self.sched = sched if [int(t) for t in sched.timesteps] == self.timestep_map else None

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None, progress=False,
                      temperature=1.0):
        if self.sched is None:
            raise NotImplementedError(f"stand-in: no sampling tables for IDDPM's respacing to {self.num_timesteps}")
        img = noise if noise is not None else torch.randn(*shape)
        table = self.sched.table(img.device)
        tmap = torch.tensor(self.timestep_map, device=img.device)
        for i in reversed(range(self.num_timesteps)):
            with torch.no_grad():
                out = model(img, tmap[i].expand(shape[0]), **(model_kwargs or {}))
                step_noise = torch.randn_like(img)  # IDDPM's p_sample: after the model, every step
                img = rd.ddpm_step(img, out, step_noise, table, i, temperature=temperature)
        return img

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        if noise is None:
            noise = torch.randn_like(x_start)
        s = self.sched
        x_t = rd._gather(s.sqrt_alphas_cumprod, t, x_start) * x_start + \
            rd._gather(s.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        out = model(x_t, self._map(t), **(model_kwargs or {}))
        return {"loss": rd.diffusion_loss_terms(out, x_start, x_t, noise, t, s)}

    def _map(self, t):
        return torch.tensor(self.timestep_map, device=t.device)[t]


def create_diffusion(timestep_respacing, noise_schedule="cosine"):
    assert noise_schedule == "cosine"
    return SpacedDiffusion(timestep_respacing)


class DiffLoss(nn.Module):
    def __init__(self, target_channels, z_channels, depth, width, num_sampling_steps):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, target_channels * 2, z_channels, depth)
        self.train_diffusion = create_diffusion(timestep_respacing="", noise_schedule="cosine")
        self.gen_diffusion = create_diffusion(timestep_respacing=num_sampling_steps, noise_schedule="cosine")

    def forward(self, target, z, mask=None):
        t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device)
        loss = self.train_diffusion.training_losses(self.net, target, t, dict(c=z))["loss"]
        if mask is not None:
            loss = (loss * mask).sum() / mask.sum()
        return loss.mean()

    def sample(self, z, temperature=1.0, cfg=1.0):
        if not cfg == 1.0:
            noise = torch.randn(z.shape[0] // 2, self.in_channels).to(z.device)
            noise = torch.cat([noise, noise], dim=0)
            model_kwargs = dict(c=z, cfg_scale=cfg)
            sample_fn = self.net.forward_with_cfg
        else:
            noise = torch.randn(z.shape[0], self.in_channels).to(z.device)
            model_kwargs = dict(c=z)
            sample_fn = self.net.forward
        return self.gen_diffusion.p_sample_loop(sample_fn, noise.shape, noise, clip_denoised=False,
                                                model_kwargs=model_kwargs, progress=False, temperature=temperature)


# ---- MAR ---------------------------------------------------------------------------------
class MAR(nn.Module):
    def __init__(self, img_size=64, vae_stride=16, patch_size=1, encoder_embed_dim=64, encoder_depth=2,
                 encoder_num_heads=2, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2, mlp_ratio=4.0,
                 vae_embed_dim=4, label_drop_prob=0.1, class_num=10, attn_dropout=0.1, proj_dropout=0.1,
                 buffer_size=4, diffloss_d=2, diffloss_w=64, num_sampling_steps="10", diffusion_batch_mul=4,
                 qk_norm=False, fused_attn=True):
        super().__init__()
        self.vae_embed_dim = vae_embed_dim
        self.patch_size = patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.num_classes = class_num
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.label_drop_prob = label_drop_prob
        self.fake_latent = nn.Parameter(torch.randn(1, encoder_embed_dim) * 0.02)
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.buffer_size = buffer_size
        self.encoder_pos_embed_learned = nn.Parameter(torch.randn(1, self.seq_len + buffer_size, encoder_embed_dim) * .02)
        blk = dict(mlp_ratio=mlp_ratio, qkv_bias=True, qk_norm=qk_norm, proj_drop=proj_dropout,
                   attn_drop=attn_dropout, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), fused_attn=fused_attn)
        self.encoder_blocks = nn.ModuleList([Block(encoder_embed_dim, encoder_num_heads, **blk)
                                             for _ in range(encoder_depth)])
        self.encoder_norm = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_embed_dim) * .02)
        self.decoder_pos_embed_learned = nn.Parameter(torch.randn(1, self.seq_len + buffer_size, decoder_embed_dim) * .02)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, **blk)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.randn(1, self.seq_len, decoder_embed_dim) * .02)
        self.diffloss = DiffLoss(self.token_embed_dim, decoder_embed_dim, diffloss_d, diffloss_w, num_sampling_steps)
        self.diffusion_batch_mul = diffusion_batch_mul

    def patchify(self, x):
        b, c, h, w = x.shape  # patch_size 1
        return x.reshape(b, c, h * w).transpose(1, 2)

    def unpatchify(self, x):
        b = x.shape[0]
        return x.transpose(1, 2).reshape(b, self.vae_embed_dim, self.seq_h, self.seq_w)

    def sample_orders(self, bsz):
        return torch.stack([torch.randperm(self.seq_len) for _ in range(bsz)])

    def random_masking(self, x, orders):
        bsz, seq_len, _ = x.shape
        rate = 0.7 + 0.3 * torch.rand(()).item()
        num_masked = int(math.ceil(seq_len * rate))
        mask = torch.zeros(bsz, seq_len, device=x.device)
        return torch.scatter(mask, -1, orders[:, :num_masked].to(x.device), torch.ones(bsz, seq_len, device=x.device))

    def forward_mae_encoder(self, x, mask, class_embedding, key_masking=False):
        x = self.z_proj(x)
        bsz, _, dim = x.shape
        x = torch.cat([torch.zeros(bsz, self.buffer_size, dim, device=x.device), x], dim=1)
        mask_with_buffer = torch.cat([torch.zeros(bsz, self.buffer_size, device=x.device), mask], dim=1)
        if self.training:
            drop = (torch.rand(bsz) < self.label_drop_prob).unsqueeze(-1).to(x.device, x.dtype)
            class_embedding = drop * self.fake_latent + (1 - drop) * class_embedding
        x[:, :self.buffer_size] = class_embedding.unsqueeze(1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        if key_masking:  # all positions, masked tokens hidden as keys (rows at masked positions: junk)
            attn_mask = (mask_with_buffer == 0)[:, None, None, :]
            for blk in self.encoder_blocks:
                x = blk(x, attn_mask=attn_mask)
            return self.encoder_norm(x)
        x = x[(1 - mask_with_buffer).nonzero(as_tuple=True)].reshape(bsz, -1, dim)
        for blk in self.encoder_blocks:
            x = blk(x)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x, mask):
        x = self.decoder_embed(x)
        mask_with_buffer = torch.cat([torch.zeros(x.size(0), self.buffer_size, device=x.device), mask], dim=1)
        pad = self.mask_token.repeat(mask_with_buffer.shape[0], mask_with_buffer.shape[1], 1).to(x.dtype).clone()
        pad[(1 - mask_with_buffer).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[2])
        x = pad + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, self.buffer_size:]
        return x + self.diffusion_pos_embed_learned

    def forward_loss(self, z, target, mask):
        bsz, seq_len, _ = target.shape
        target = target.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)
        z = z.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)
        mask = mask.reshape(bsz * seq_len).repeat(self.diffusion_batch_mul)
        return self.diffloss(z=z, target=target, mask=mask)

    def forward(self, imgs, labels):
        class_embedding = self.class_emb(labels)
        x = self.patchify(imgs)
        gt = x.clone().detach()
        orders = self.sample_orders(x.size(0))
        mask = self.random_masking(x, orders)
        x = self.forward_mae_encoder(x, mask, class_embedding)
        z = self.forward_mae_decoder(x, mask)
        return self.forward_loss(z=z, target=gt, mask=mask)

    def sample_tokens(self, bsz, num_iter=4, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0):
        dev = self.mask_token.device
        mask = torch.ones(bsz, self.seq_len, device=dev)
        tokens = torch.zeros(bsz, self.seq_len, self.token_embed_dim, device=dev)
        orders = self.sample_orders(bsz).to(dev)
        for step in range(num_iter):
            cur_tokens = tokens.clone()
            class_embedding = self.class_emb(labels) if labels is not None else self.fake_latent.repeat(bsz, 1)
            if not cfg == 1.0:
                tokens = torch.cat([tokens, tokens], dim=0)
                class_embedding = torch.cat([class_embedding, self.fake_latent.repeat(bsz, 1)], dim=0)
                mask = torch.cat([mask, mask], dim=0)
            x = self.forward_mae_encoder(tokens, mask, class_embedding)
            z = self.forward_mae_decoder(x, mask)
            ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
            mask_len = torch.tensor([math.floor(self.seq_len * ratio)], dtype=torch.float32, device=dev)
            mask_len = torch.maximum(torch.ones(1, device=dev),
                                     torch.minimum(torch.sum(mask, dim=-1, keepdim=True) - 1, mask_len))
            mask_next = torch.zeros(bsz, self.seq_len, device=dev).scatter(
                -1, orders[:, :int(mask_len[0].item())], 1.0).bool()
            if step >= num_iter - 1:
                mask_to_pred = mask[:bsz].bool()
            else:
                mask_to_pred = torch.logical_xor(mask[:bsz].bool(), mask_next)
            mask = mask_next.float()
            if not cfg == 1.0:
                mask_to_pred = torch.cat([mask_to_pred, mask_to_pred], dim=0)
            z = z[mask_to_pred.nonzero(as_tuple=True)]
            if cfg_schedule == "linear":
                cfg_iter = 1 + (cfg - 1) * (self.seq_len - mask_len[0]) / self.seq_len  # a tensor, as in MAR
            else:
                cfg_iter = cfg
            sampled = self.diffloss.sample(z, temperature, cfg_iter)
            if not cfg == 1.0:
                sampled, _ = sampled.chunk(2, dim=0)
                mask_to_pred, _ = mask_to_pred.chunk(2, dim=0)
            cur_tokens[mask_to_pred.nonzero(as_tuple=True)] = sampled
            tokens = cur_tokens.clone()
        return self.unpatchify(tokens)


def randomize_head(model: MAR, seed: int = 0, std: float = 0.05):
    """Give every parameter of the diffusion head small random values (MAR zero-inits some)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffloss.net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
