"""`fluid_ops.nn.DenoiserMLP`: MAR's diffusion head (docs/contracts.md §2.2) on the fused ops.

Same constructor, parameter names, shapes and initialisation as
`fluid_ops.reference.DenoiserMLP` (and MAR's `diffloss.net`): a MAR checkpoint's head loads with
strict=True.

* `forward(x, t, c)` (training and generic use): the same graph as the reference with
  LayerNorm + modulation and the gated residual fused (`fluid_ops.layernorm_modulate`,
  `fluid_ops.gated_residual`); differentiable. Contract: exact.
* `sampler(z, timesteps, gemm_dtype=None)` (the sampling fast path, used by
  `fluid_ops.diffusion_sample`): `cond_embed(z)` once per AR step, the time embeddings of all the
  schedule's timesteps once, SiLU(y) once per step, all adaLN linears (every block and the final
  layer) as ONE concatenated GEMM per step, fused LN-modulate and in-place gated residual.
  With gemm_dtype=torch.bfloat16 the GEMMs run in bf16 (weights cast once and cached, fp32
  accumulation inside the GEMM) while the residual stream h, y and the LN statistics stay fp32.
  Contract: exact in fp32, rounding-level with bf16 GEMMs. The backend selector picks how a step
  runs (op family `fluid_ops.ops.head`): on CUDA tensors (and on CPU tensors when the triton
  backend is forced) a fused head, the CUDA one (bf16 / fp16 GEMMs, where the compiled CUDA
  module has it), else the Triton one (same contract); else the eager GEMM path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fluid_ops import backend
from fluid_ops.ops._checks import FLOAT_DTYPES, check_tensor
from fluid_ops.ops.denoiser import gated_residual, layernorm_modulate
from fluid_ops.ops.head import EagerHeadStep, head_step
from fluid_ops.reference import denoiser as ref

__all__ = ["DenoiserMLP"]

_GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX-BF16 (decided in `fluid_ops.backend.native_bf16`)."""
    return backend.native_bf16("cpu")


def auto_gemm_dtype(device) -> torch.dtype:
    """The GEMM dtype `gemm_dtype="auto"` picks: bf16 where `backend.auto_precision` says bf16 is
    native (CUDA devices that support it, CPUs with native bf16 dot products), else float32."""
    device = torch.device(device)
    if device.type in ("cuda", "cpu") and backend.auto_precision(device) == "bf16":
        return torch.bfloat16
    return torch.float32


class _SamplingWeights:
    """The sampler's weights in the GEMM dtype, built once per (dtype, device) and reused until a
    parameter changes (its storage or version counter)."""

    def __init__(self, net: "DenoiserMLP", gd: torch.dtype):
        def cast(t):
            return t.detach().to(gd).contiguous()

        # Every adaLN linear in one weight: per block [shift; scale; gate], then the final layer's
        # scale, then its shift folded through the output linear: final_linear(n + shift) =
        # final_linear(n) + (W_f W_shift) sy + W_f b_shift, so the final shift costs `out` columns
        # of the big GEMM instead of D (exact up to reassociation; the fold is done in fp64).
        d = net.model_channels
        fa, fl = net.final_layer.adaLN_modulation[1], net.final_layer.linear
        wf64 = fl.weight.detach().double()
        fold_w = wf64 @ fa.weight.detach()[:d].double()
        fold_b = wf64 @ fa.bias.detach()[:d].double() + fl.bias.detach().double()
        blocks = [blk.adaLN_modulation[1] for blk in net.res_blocks]
        self.ada_wt = cast(torch.cat([m.weight.detach() for m in blocks] + [fa.weight.detach()[d:], fold_w.float()])).t()
        self.ada_b = cast(torch.cat([m.bias.detach() for m in blocks] + [fa.bias.detach()[d:], fold_b.float()]))
        self.mlp = [(cast(b.mlp[0].weight).t(), cast(b.mlp[0].bias), cast(b.mlp[2].weight).t(), cast(b.mlp[2].bias))
                    for b in net.res_blocks]  # transposed views: addmm(bias, a, W^T) = linear
        # LN affine parameters stay fp32 (h is fp32).
        self.ln = [(b.in_ln.weight.detach(), b.in_ln.bias.detach(), float(b.in_ln.eps)) for b in net.res_blocks]
        self.final_wt = cast(fl.weight).t()  # (D, out) view for addmm
        self.final_eps = float(net.final_layer.norm_final.eps)
        self.zero_shift = torch.zeros(d, dtype=gd, device=fl.weight.device)


class DenoiserSampler:
    """The per-AR-step state of the sampling fast path: `sampler(x, step)` -> model output.

    Built by `DenoiserMLP.sampler(z, timesteps, gemm_dtype)`. z holds the M rows the net sees
    (M = N, or 2N = [cond; uncond] for guidance); `x` has N rows and is repeated to M when
    M = 2N. `step` indexes `timesteps` (a device tensor), so a step copies nothing from host to
    device. Returns (M, out_channels) in the GEMM dtype."""

    def __init__(self, net: "DenoiserMLP", z: torch.Tensor, timesteps: torch.Tensor, gemm_dtype):
        self.net = net
        self.gd = gd = gemm_dtype
        self.w = w = net._sampling_weights(gemm_dtype, z.device)
        with torch.no_grad():
            self.cemb = net.cond_embed(z.to(net.cond_embed.weight.dtype)).float()  # once per AR step
            self.temb = net.time_embed(timesteps).float()  # (S, D): once for all diffusion steps
        self.rows = m = z.shape[0]
        self.d = d = net.model_channels
        self.in_wt = net.input_proj.weight.detach().float().t()
        self.in_b = net.input_proj.bias.detach().float()
        # Workspaces reused by every step: fresh multi-MB tensors per step cost page faults and
        # zeroing that showed up as a large share of the reference loop's time on CPU.
        dev = z.device
        self.ada = torch.empty(m, w.ada_wt.shape[1], dtype=gd, device=dev)
        self.h = torch.empty(m, d, device=dev)
        self.u = torch.empty(m, d, dtype=gd, device=dev)
        # One step: a fused head (3 + 2 * blocks GEMM launches with LN / SiLU / gates fused in,
        # no workspace beyond the three above) or the eager GEMM path, as the backend selector
        # picks for this device and GEMM dtype (fluid_ops.ops.head).
        self.backend, self.head = head_step(self)

    @property
    def fused(self):
        """The fused head step (CUDA or Triton) this sampler runs, None on the eager path."""
        return None if isinstance(self.head, EagerHeadStep) else self.head

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        return self.head(x, step)


class DenoiserMLP(ref.DenoiserMLP):
    """MAR's SimpleMLPAdaLN on fluid_ops' fused ops: x (N, in), t (N,), c (N, z) -> (N, out).
    See the module docstring for the forward and the sampling fast path."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, *, c_repeats: int = 1,
                num_timesteps: int | None = None) -> torch.Tensor:
        """x (N, in), t (N,), c (N / c_repeats, z) -> (N, out).

        c_repeats R > 1 (the diffusion loss's `diffusion_batch_mul` t-draws per token): row
        j * (N / R) + i of x and t uses condition c[i]; `cond_embed` runs once on the N / R
        distinct rows and is broadcast into the N rows (its backward sums over the repeats), so
        the repeated condition is never materialised. num_timesteps T (integer t in [0, T)):
        when N > T the time embedding runs once on the T possible timesteps and is gathered
        (index_select; its backward sums), instead of on all N rows. Both are exact
        re-arrangements (equal to the plain forward up to summation order)."""
        name = "DenoiserMLP.forward"
        check_tensor(name, "x", x, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,), shape=(None, self.in_channels))
        n = x.shape[0]
        check_tensor(name, "t", t, ndim=1, shape=(n,))
        if isinstance(c_repeats, bool) or not isinstance(c_repeats, int) or c_repeats < 1 or n % c_repeats:
            raise ValueError(f"{name}: c_repeats must be an int >= 1 dividing x's {n} rows, got {c_repeats!r}")
        check_tensor(name, "c", c, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,),
                     shape=(n // c_repeats, self.z_channels))
        if num_timesteps is not None and (isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int)
                                          or num_timesteps < 1):
            raise ValueError(f"{name}: num_timesteps must be None or an int >= 1, got {num_timesteps!r}")
        if num_timesteps is not None and n > num_timesteps and not t.is_floating_point():
            temb = self.time_embed(torch.arange(num_timesteps, device=t.device)).index_select(0, t)
        else:
            temb = self.time_embed(t)
        cemb = self.cond_embed(c)
        if c_repeats == 1:
            y = temb + cemb
        else:
            d = self.model_channels
            y = (temb.view(c_repeats, n // c_repeats, d) + cemb).view(n, d)
        sy = F.silu(y)
        h = self.input_proj(x)
        d = self.model_channels
        for blk in self.res_blocks:
            mod = blk.adaLN_modulation[1](sy)
            shift, scale, gate = mod[:, :d], mod[:, d:2 * d], mod[:, 2 * d:]
            a = layernorm_modulate(h, shift, scale, weight=blk.in_ln.weight, bias=blk.in_ln.bias, eps=blk.in_ln.eps)
            h = gated_residual(h, gate, blk.mlp(a))
        fl = self.final_layer
        mod = fl.adaLN_modulation[1](sy)
        a = layernorm_modulate(h, mod[:, :d], mod[:, d:], eps=fl.norm_final.eps)
        return fl.linear(a)

    # ---- sampling fast path ------------------------------------------------------------------
    def _sampling_weights(self, gemm_dtype: torch.dtype, device: torch.device) -> _SamplingWeights:
        stamp = tuple((p.data_ptr(), p._version) for p in self.parameters())
        cache = self.__dict__.setdefault("_sampling_cache", {})
        key = (gemm_dtype, torch.device(device))
        hit = cache.get(key)
        if hit is None or hit[0] != stamp:
            cache.clear()  # one cached copy at a time: these are the size of the adaLN weights
            with torch.no_grad():
                cache[key] = (stamp, _SamplingWeights(self, gemm_dtype))
        return cache[key][1]

    def sampler(self, z: torch.Tensor, timesteps: torch.Tensor, gemm_dtype: torch.dtype | None = None) -> DenoiserSampler:
        """The sampling fast path for conditions z (M, z_channels) and the schedule's model
        timesteps (S,) (a device tensor); gemm_dtype None means the parameters' dtype, "auto"
        `auto_gemm_dtype(z.device)`."""
        check_tensor("DenoiserMLP.sampler", "z", z, ndim=2, shape=(None, self.z_channels))
        if isinstance(gemm_dtype, str) and gemm_dtype == "auto":
            gemm_dtype = auto_gemm_dtype(z.device)
        gd = gemm_dtype or self.cond_embed.weight.dtype
        if gd not in _GEMM_DTYPES:
            raise TypeError(f"DenoiserMLP.sampler: gemm_dtype must be None, 'auto', float32, bfloat16 or float16, "
                            f"got {gemm_dtype!r}")
        return DenoiserSampler(self, z, timesteps, gd)
