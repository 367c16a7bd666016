"""The fused diffusion-head forward on the CUDA backend (docs/contracts.md §2.2): the compiled counterpart of
`fluid_ops.triton.denoiser.FusedHeadStep` / `head_forward`, on the hand-written tensor-core GEMMs
of csrc/cuda/head.cu (their header comment has the design; this file only sequences them).

* `CudaHeadStep(sampler, mode=None)`: one step of a `DenoiserSampler` ((x, step) -> (M, out) in
  the GEMM dtype): the cuda implementation of the head-step op family (`fluid_ops.ops.head`),
  which the backend selector takes when `cuda_head_unusable` returns None.
* `head_forward(net, x, t, c, gemm_dtype=None, prologue=None)`: `net(x, t, c)` of a
  fluid_ops.nn.DenoiserMLP through the same kernels, for any (x, t, c) (inference, no autograd).

One evaluation (mode "fused") is 3 + 2 * blocks launches: ALL adaLN linears as one GEMM with the
SiLU(cemb + temb) prologue (the final shift folded through the output linear, as
`_SamplingWeights` lays the weights out), the input projection (fp32, CFG's [x; x] read modulo
N), per block fc1 (LN-modulate prologue, statistics computed in the kernel; bias + SiLU epilogue)
and fc2 (bias + in-place gated residual on the fp32 stream h), and the final linear (LN-modulate
prologue without affine / shift; the folded shift + bias as a row bias). Mode "split" (from
SPLIT_PROLOGUE_MIN_ROWS rows on, or FLUID_OPS_HEAD_PROLOGUE): SiLU(c + t) and LN-modulate run
once per row as row kernels into a GEMM-dtype buffer, then plain GEMMs (4 + 3 * blocks launches).

GEMM dtypes bf16 / fp16 only (tensor cores; fp32 GEMMs are declined and run on the Triton head).
Contract: rounding-level (bf16 / fp16 GEMM operands, fp32 accumulation, fp32 residual stream
and LN statistics). UNPROVEN until tests/test_cuda_head.py has run on a GPU.
"""
from __future__ import annotations

import os

import torch

from fluid_ops import _compiled, backend
from fluid_ops.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor

__all__ = ["CudaHeadStep", "head_forward", "cuda_head_unusable", "prologue_mode", "SPLIT_PROLOGUE_MIN_ROWS"]

GEMM_DTYPES = (torch.bfloat16, torch.float16)

# From this many rows on the prologues run as row kernels (see the module docstring). The Triton
# head's threshold, not a measurement for these kernels: tune on a GPU with benchmarks/denoiser.py
# (which times both modes) or override with FLUID_OPS_HEAD_PROLOGUE.
SPLIT_PROLOGUE_MIN_ROWS = 2048
PROLOGUE_MODES = ("fused", "split")


def prologue_mode(m: int, mode: str | None = None) -> str:
    """"fused" or "split" for an M-row evaluation: `mode`, else FLUID_OPS_HEAD_PROLOGUE, else split
    from SPLIT_PROLOGUE_MIN_ROWS rows on."""
    mode = mode or os.environ.get("FLUID_OPS_HEAD_PROLOGUE") or None
    if mode is None:
        return "split" if m >= SPLIT_PROLOGUE_MIN_ROWS else "fused"
    if mode not in PROLOGUE_MODES:
        raise ValueError(f"CUDA head: prologue mode must be one of {PROLOGUE_MODES} (FLUID_OPS_HEAD_PROLOGUE), "
                         f"got {mode!r}")
    return mode


def cuda_head_unusable(device, gemm_dtype: torch.dtype, model_channels: int | None = None) -> str | None:
    """Why the CUDA head cannot serve an evaluation on `device` with `gemm_dtype` GEMMs (None: it
    can). Same rule as the op backends: not when another backend is forced."""
    forced = backend.forced_backend()
    if forced not in (None, "cuda"):
        return f"backend {forced!r} is forced"
    device = torch.device(device)
    if device.type != "cuda":
        return f"the CUDA head runs on CUDA tensors, got {device.type} tensors"
    if gemm_dtype not in GEMM_DTYPES:
        return (f"the CUDA head's GEMMs are bf16 / fp16 tensor-core kernels, got gemm dtype {gemm_dtype} "
                "(fp32 GEMMs run on the Triton head)")
    why = backend._status("cuda")
    if why is not None:
        return why
    if not hasattr(_compiled.cuda, "head_linear"):
        return "this build of fluid_ops._C_cuda has no head_linear kernel"
    if model_channels is not None and model_channels % 8:
        return f"the CUDA head needs model_channels to be a multiple of 8 (16-byte vector loads), got {model_channels}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the CUDA head's bf16 / fp16 mma.sync needs compute capability 8.0 or newer"
    return None


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def adaln_buffer(m: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(m, width) view of a buffer whose row stride is a multiple of 8 elements, so that every
    column chunk at a multiple of 8 starts 16-byte aligned (the kernels' vector loads)."""
    return torch.empty(m, _pad8(width), dtype=dtype, device=device)[:, :width]


def _rows_major(t: torch.Tensor) -> torch.Tensor:
    """A weight as the kernels read it, (N, K) row-major: the transpose of `_SamplingWeights`'
    (K, N) views, free when those are views of contiguous (N, K) weights."""
    w = t.t()
    return w if w.is_contiguous() else w.contiguous()


class _CudaChain:
    """The launch sequence of one head evaluation for M rows (see the module docstring); `run`
    fills ada, h, u and returns out (M, out_channels) in the GEMM dtype."""

    def __init__(self, weights, in_w: torch.Tensor, in_b: torch.Tensor, m: int, device, mode: str | None = None):
        w = weights
        self.w, self.m = w, m
        self.d = d = w.ada_wt.shape[0]
        gd = w.ada_wt.dtype
        self.mode = prologue_mode(m, mode)
        self.a = torch.empty(m, d, dtype=gd, device=device) if self.mode == "split" else None
        self.ada_w = _rows_major(w.ada_wt)
        self.mlp = [(_rows_major(w0t), b0, _rows_major(w2t), b2) for (w0t, b0, w2t, b2) in w.mlp]
        f32 = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731
        self.ln = [(f32(lw), f32(lb), eps) for (lw, lb, eps) in w.ln]
        self.final_w = _rows_major(w.final_wt)
        self.in_w, self.in_b = in_w.float(), in_b.float()
        self.zero_shift = w.zero_shift.expand(m, d)  # split mode: the final LN has no shift

    def run(self, x, cemb, temb, ada, h, u, out):
        """x (n, in) fp32 (rows repeated to M when M = 2n), cemb (M, D) fp32, temb (1 or M, D) fp32;
        ada (M, adaLN width) with a row stride that is a multiple of 8 (`adaln_buffer`)."""
        cu, v = _compiled.cuda, _compiled.view
        stream = _compiled.cuda_stream(h.device)
        w, d, split, a = self.w, self.d, self.mode == "split", self.a
        # all adaLN linears: SiLU(cemb + temb) @ W_ada^T + b
        if split:
            cu.head_silu_add(v(cemb), v(temb), v(a), stream)
            cu.head_linear(v(a), None, None, None, None, None, 0.0, v(self.ada_w), v(w.ada_b), None, False, None,
                           v(ada), stream)
        else:
            cu.head_linear(v(cemb), v(temb), None, None, None, None, 0.0, v(self.ada_w), v(w.ada_b), None, False,
                           None, v(ada), stream)
        cu.head_input_proj(v(x), v(self.in_w), v(self.in_b), v(h), stream)
        for i, ((w0, b0, w2, b2), (lw, lb, eps)) in enumerate(zip(self.mlp, self.ln)):
            base = 3 * d * i
            shift, scale, gate = ada[:, base:base + d], ada[:, base + d:base + 2 * d], ada[:, base + 2 * d:base + 3 * d]
            if split:
                cu.layernorm_modulate(v(h), v(lw), v(lb), v(shift), v(scale), eps, v(a), stream)
                cu.head_linear(v(a), None, None, None, None, None, 0.0, v(w0), v(b0), None, True, None, v(u), stream)
            else:
                cu.head_linear(v(h), None, v(lw), v(lb), v(shift), v(scale), eps, v(w0), v(b0), None, True, None,
                               v(u), stream)
            cu.head_linear(v(u), None, None, None, None, None, 0.0, v(w2), v(b2), None, False, v(gate), v(h), stream)
        base = 3 * d * len(self.mlp)
        scale, rbias = ada[:, base:base + d], ada[:, base + d:]  # rbias: the folded final shift + bias
        if split:
            cu.layernorm_modulate(v(h), None, None, v(self.zero_shift), v(scale), w.final_eps, v(a), stream)
            cu.head_linear(v(a), None, None, None, None, None, 0.0, v(self.final_w), None, v(rbias), False, None,
                           v(out), stream)
        else:
            cu.head_linear(v(h), None, None, None, None, v(scale), w.final_eps, v(self.final_w), None, v(rbias),
                           False, None, v(out), stream)
        return out


def _x_rows(x: torch.Tensor) -> torch.Tensor:
    return x.float()  # the input projection kernel takes any strides


class CudaHeadStep:
    """The fused CUDA evaluation of `DenoiserSampler` (same call as the Triton FusedHeadStep:
    (x, step) -> (M, out) in the GEMM dtype), reusing the sampler's embeddings, cached weights and
    workspaces (its adaLN buffer too, unless that one's row stride is not a multiple of 8)."""

    def __init__(self, sampler, mode: str | None = None):
        self.s = s = sampler
        self.chain = _CudaChain(s.w, s.in_wt.t(), s.in_b, s.rows, s.h.device, mode)
        self.ada = s.ada if s.ada.stride(0) % 8 == 0 else adaln_buffer(s.rows, s.ada.shape[1], s.gd, s.h.device)

    @property
    def mode(self) -> str:
        return self.chain.mode

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        s = self.s
        out = torch.empty(s.rows, s.net.out_channels, dtype=s.gd, device=s.h.device)  # fresh: callers keep it
        return self.chain.run(_x_rows(x), s.cemb, s.temb[step:step + 1], self.ada, s.h, s.u, out)


@torch.no_grad()
def head_forward(net, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, gemm_dtype: torch.dtype | None = None,
                 prologue: str | None = None) -> torch.Tensor:
    """`net(x, t, c)` of a fluid_ops.nn.DenoiserMLP through the CUDA head (inference, no autograd):
    x (N, in), t (N,), c (N, z) CUDA tensors -> (N, out) in the GEMM dtype (default: the
    parameters' dtype, which must then be bf16 / fp16). `prologue`: "fused" / "split" (default
    `prologue_mode`). Contract: rounding-level."""
    name = "cuda head_forward"
    gd = gemm_dtype or net.cond_embed.weight.dtype
    check_tensor(name, "x", x, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, net.in_channels))
    n = x.shape[0]
    check_tensor(name, "t", t, ndim=1, shape=(n,))
    check_tensor(name, "c", c, ndim=2, dtypes=FLOAT_DTYPES, shape=(n, net.z_channels))
    check_same_device(name, x=x, t=t, c=c)
    p = net.cond_embed.weight
    if p.device != x.device:
        raise ValueError(f"{name}: net's parameters are on {p.device} but x is on {x.device}")
    why = cuda_head_unusable(x.device, gd, net.model_channels)
    if why is not None:
        raise RuntimeError(f"{name}: the CUDA head cannot run this call: {why}")
    w = net._sampling_weights(gd, x.device)
    d = net.model_channels
    # the embeddings are plain Linear layers: torch runs them, in the GEMM dtype
    with torch.autocast(x.device.type, dtype=gd, enabled=x.device.type == "cuda"):
        temb = net.time_embed(t).float().contiguous()
        cemb = net.cond_embed(c.to(net.cond_embed.weight.dtype)).float().contiguous()
    in_w = net.input_proj.weight.detach().float()
    in_b = net.input_proj.bias.detach().float()
    chain = _CudaChain(w, in_w, in_b, n, x.device, prologue)
    dev = x.device
    ada = adaln_buffer(n, w.ada_wt.shape[1], gd, dev)
    h = torch.empty(n, d, device=dev)
    u = torch.empty(n, d, dtype=gd, device=dev)
    out = torch.empty(n, net.out_channels, dtype=gd, device=dev)
    if n == 0:
        return out
    return chain.run(_x_rows(x), cemb, temb, ada, h, u, out)
