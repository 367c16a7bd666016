"""A stand-in for the user's MAR (LTH14/mar) for testing `fluid_ops.accelerate`.

MAR's repository is not a package, so this module rebuilds, from reading it, the parts
`accelerate` touches, with the same module structure and attribute names, ON THE REAL timm:

* `Block`, `Attention` and `Mlp` are timm's own (`timm.models.vision_transformer`, the import MAR
  makes), whatever release is installed (the test extra installs the newest: a timm change shows
  up here). `Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=..., proj_drop=..., attn_drop=...)`
  is MAR's call; `qk_norm` and `fused_attn` are the stand-in's switches for other timm paths;
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

timm's own dependencies include torchvision, which only imports beside a matching torch build;
`import_timm` imports timm without it where it is missing (see there).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import math
import sys
import types

import numpy as np
import torch
import torch.nn as nn

from fluid_ops.reference import diffusion as rd


# ---- timm, imported as installed -----------------------------------------------------------
class _FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d, the one torchvision class timm's layers import at
    module level (its norm factories name it); never built by MAR."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, fill(num_features))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


class _Absent(type):
    """A torchvision name timm imports at module level but MAR never uses (datasets, transforms)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(name, (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision is not installed: {cls.__name__} is a placeholder (tests/mar_standin.py)")


class _AbsentModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Absent(name, (), {})
        setattr(self, name, value)
        return value


class _TorchvisionPlaceholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _AbsentModule(spec.name)
        module.__path__ = []
        if spec.name == "torchvision.ops.misc":
            module.FrozenBatchNorm2d = _FrozenBatchNorm2d
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """`timm.models.vision_transformer`, the real package. The test extra installs timm with
    --no-deps (pyproject.toml / ./run say why: PyPI's torchvision pins a CUDA torch build and does
    not import beside the CPU one). timm imports torchvision names at module level (datasets,
    transforms, FrozenBatchNorm2d) that MAR's Block never uses; where torchvision is missing or
    does not import, those names are served by placeholders FOR THE DURATION OF THIS IMPORT ONLY
    (a meta-path finder removed afterwards, with its modules), so nothing else in the process
    sees a torchvision. Where a working torchvision is installed it is used as is."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or PyPI's CUDA build beside a CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    else:
        import timm.models.vision_transformer as vit
        return vit
    finder = _TorchvisionPlaceholders()
    sys.meta_path.insert(0, finder)
    try:
        import timm.models.vision_transformer as vit
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    return vit


_vit = None


def _timm_vit():
    """timm is imported on first use, not when this module is: importing timm imports
    torch._dynamo, which imports triton, and the Triton interpreter tests need TRITON_INTERPRET=1
    set before triton's first import (tests/test_attention_triton.py sets it when collected;
    a test module importing this one is collected before it)."""
    global _vit
    if _vit is None:
        _vit = import_timm()
    return _vit


def __getattr__(name):
    """Block, Attention, Mlp (timm's own), timm and TIMM_VERSION, imported on first access."""
    if name in ("Block", "Attention", "Mlp"):
        return getattr(_timm_vit(), name)
    if name in ("timm", "TIMM_VERSION"):
        _timm_vit()
        return sys.modules["timm"] if name == "timm" else sys.modules["timm"].__version__
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_block(dim, num_heads, mlp_ratio=4.0, qk_norm=False, proj_drop=0.0, attn_drop=0.0, norm_layer=nn.LayerNorm,
               fused_attn=True):
    """timm's Block as MAR builds it (models/mar.py: qkv_bias=True, norm_layer, proj_drop, attn_drop);
    qk_norm and fused_attn pick timm's other paths (fused_attn is timm's per-module flag)."""
    kw = dict(qkv_bias=True, norm_layer=norm_layer, proj_drop=proj_drop, attn_drop=attn_drop)
    if qk_norm:
        kw["qk_norm"] = True
    blk = _timm_vit().Block(dim, num_heads, mlp_ratio, **kw)
    blk.attn.fused_attn = fused_attn
    return blk


def block_takes_attn_mask() -> bool:
    """timm >= 1.0: Block.forward(x, attn_mask=None, ...); 0.9.12 (MAR's pin): forward(x)."""
    import inspect
    return "attn_mask" in inspect.signature(_timm_vit().Block.forward).parameters


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
def _norm_layer(dim, **kwargs):
    """MAR's partial(nn.LayerNorm, eps=1e-6); timm >= 1.0.2x passes device= / dtype= to it."""
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


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
        blk = dict(mlp_ratio=mlp_ratio, qk_norm=qk_norm, proj_drop=proj_dropout, attn_drop=attn_dropout,
                   norm_layer=_norm_layer, fused_attn=fused_attn)
        self.encoder_blocks = nn.ModuleList([make_block(encoder_embed_dim, encoder_num_heads, **blk)
                                             for _ in range(encoder_depth)])
        self.encoder_norm = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_embed_dim) * .02)
        self.decoder_pos_embed_learned = nn.Parameter(torch.randn(1, self.seq_len + buffer_size, decoder_embed_dim) * .02)
        self.decoder_blocks = nn.ModuleList([make_block(decoder_embed_dim, decoder_num_heads, **blk)
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
