"""MAR's per-token denoiser ("SimpleMLPAdaLN", docs/contracts.md §2.2) in plain PyTorch, plus plain
versions of the two fused non-GEMM pieces the fast module uses.

Parameter names and shapes are MAR's `diffloss.net.*`, so a MAR checkpoint's head loads here
with strict=True. This module is the oracle: `fluid_ops.nn.DenoiserMLP` is held to it."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["timestep_embedding", "layernorm_modulate", "gated_residual", "DenoiserMLP"]


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim) float32: [cos(t f), sin(t f)],
    f_i = exp(-ln(max_period) * i / (dim // 2)), i < dim // 2 (MAR's / DiT's TimestepEmbedder).
    An odd `dim` gets one zero column at the end."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _acc(*ts) -> torch.dtype:
    """Compute dtype: fp32 for half inputs, fp64 if any input is fp64."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def layernorm_modulate(x, shift, scale, weight=None, bias=None, eps: float = 1e-6, out_dtype=None):
    """LN(x) * (1 + scale) + shift over the last dim (LN optionally affine), computed in fp32
    (fp64 for fp64 inputs), returned in `out_dtype` (default x's dtype)."""
    acc = _acc(x, shift, scale, weight, bias)
    d = x.shape[-1]
    n = torch.nn.functional.layer_norm(x.to(acc), (d,), None if weight is None else weight.to(acc),
                                       None if bias is None else bias.to(acc), eps)
    out = n * (1.0 + scale.to(acc)) + shift.to(acc)
    return out.to(out_dtype or x.dtype)


def gated_residual(h, gate, y):
    """h + gate * y, computed in fp32 (fp64 for fp64 inputs), in h's dtype."""
    acc = _acc(h, gate, y)
    return (h.to(acc) + gate.to(acc) * y.to(acc)).to(h.dtype)


class TimestepEmbedder(nn.Module):
    """t -> MLP(sinusoid(t, 256)), names `mlp.0`, `mlp.2` as MAR."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """h + gate * MLP(LN(h) * (1 + scale) + shift), (shift, scale, gate) = adaLN(SiLU(y))."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels, bias=True), nn.SiLU(),
                                 nn.Linear(channels, channels, bias=True))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels, bias=True))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = self.in_ln(x) * (1 + scale) + shift
        return x + gate * self.mlp(h)


class FinalLayer(nn.Module):
    """linear(LN_noaffine(h) * (1 + scale) + shift), (shift, scale) = adaLN(SiLU(y))."""

    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels, bias=True))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DenoiserMLP(nn.Module):
    """MAR's SimpleMLPAdaLN: x (N, in), t (N,) timesteps, c (N, z) -> (N, out).

    MAR-B: DenoiserMLP(16, 1024, 32, 768, 6). out = 2 * in (eps and the learned-range variance
    value). Initialised as MAR: xavier-uniform linears with zero bias, N(0, 0.02) time MLP,
    zero adaLN and output layers (each block starts as the identity)."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("model_channels", model_channels),
                        ("out_channels", out_channels), ("z_channels", z_channels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"DenoiserMLP: {name} must be a positive int, got {v!r}")
        if not isinstance(num_res_blocks, int) or num_res_blocks < 0:
            raise ValueError(f"DenoiserMLP: num_res_blocks must be an int >= 0, got {num_res_blocks!r}")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.z_channels = z_channels
        self.num_res_blocks = num_res_blocks

        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for blk in self.res_blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        y = self.time_embed(t) + self.cond_embed(c)
        h = self.input_proj(x)
        for blk in self.res_blocks:
            h = blk(h, y)
        return self.final_layer(h, y)
