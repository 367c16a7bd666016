"""One step of `DenoiserSampler` (MAR's diffusion head on the sampling fast path, docs/contracts.md
§2.2) as an op family, chosen by `fluid_ops.backend` like every other op:

* cuda: the compiled fused head (`fluid_ops.ops.head_cuda.CudaHeadStep`; bf16 / fp16 GEMMs);
* triton: the fused Triton head (`fluid_ops.triton.denoiser.FusedHeadStep`; on CPU tensors only
  when forced, and not with bf16 GEMMs there);
* cpu, reference: `EagerHeadStep`, torch GEMMs with the fused row ops (`layernorm_modulate_into`,
  `gated_residual_`), which pick their own backends; it is also the op's composite, so a forced
  backend that cannot run the fused head gets it instead of an error. The cpu backend's
  `CpuHeadStep` runs bf16 GEMMs as oneDNN fused linears (bias and SiLU in the epilogue).

An implementation takes the sampler and returns the step: `(x, step) -> (M, out)` in the GEMM
dtype. `head_step(sampler)` asks the selector once (once per AR step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fluid_ops import backend
from fluid_ops.ops.denoiser import gated_residual_, layernorm_modulate_into
from fluid_ops.ops.head_cuda import CudaHeadStep, cuda_head_unusable

__all__ = ["head_step", "EagerHeadStep", "triton_head_unusable", "HEAD_STEP"]

HEAD_STEP = "denoiser_head_step"


def triton_head_unusable(device: torch.device, gemm_dtype: torch.dtype) -> str | None:
    """Why the fused Triton head cannot serve `DenoiserSampler` on `device` (None: it can): the
    same rule as the op backends (CUDA: unless another backend is forced; CPU: only when triton is
    forced, and then under the interpreter, which computes tl.dot wrongly on bf16 inputs)."""
    forced = backend.forced_backend()
    if forced not in (None, "triton"):
        return f"backend {forced!r} is forced"
    if device.type not in ("cuda", "cpu"):
        return f"triton does not run on {device.type} tensors"
    if device.type == "cpu":
        why = backend.triton_cpu_rule(torch.empty(0))
        if why is not None:
            return why
        if gemm_dtype == torch.bfloat16:
            return "the Triton interpreter computes tl.dot wrongly on bf16 inputs"
    return backend._status("triton")


@backend.register(HEAD_STEP, "cuda", supports=lambda s: cuda_head_unusable(s.h.device, s.gd, s.d))
def _cuda_step(sampler):
    return CudaHeadStep(sampler)


@backend.register(HEAD_STEP, "triton", supports=lambda s: triton_head_unusable(s.h.device, s.gd))
def _triton_step(sampler):
    from fluid_ops.triton.denoiser import FusedHeadStep  # imports triton: only when it runs
    return FusedHeadStep(sampler)


class EagerHeadStep:
    """The head evaluation as torch GEMMs (every adaLN linear in one) and the fused row ops, on
    the sampler's embeddings, cached weights and workspaces (plus four of its own)."""

    def __init__(self, sampler):
        self.s = s = sampler
        m, d, gd, dev = s.rows, s.d, s.gd, s.h.device
        self.y = torch.empty(m, d, device=dev)
        self.sy = self.y if gd == torch.float32 else torch.empty(m, d, dtype=gd, device=dev)
        self.a = torch.empty(m, d, dtype=gd, device=dev)
        self.v = torch.empty(m, d, dtype=gd, device=dev)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        s = self.s
        w, d = s.w, s.d
        torch.add(s.temb[step], s.cemb, out=self.y)  # (M, D) fp32; one temb row for all rows
        F.silu(self.y, inplace=True)
        if self.sy is not self.y:
            self.sy.copy_(self.y)
        ada = torch.addmm(w.ada_b, self.sy, w.ada_wt, out=s.ada)  # every adaLN linear at once
        n = x.shape[0]
        h = s.h
        torch.addmm(s.in_b, x.float(), s.in_wt, out=h[:n])
        if s.rows != n:
            h[n:].copy_(h[:n])  # [x; x] for guidance, projected once
        a, u, v = self.a, s.u, self.v
        for i, ((w0t, b0, w2t, b2), (lw, lb, eps)) in enumerate(zip(w.mlp, w.ln)):
            base = 3 * d * i
            layernorm_modulate_into(h, ada[:, base:base + d], ada[:, base + d:base + 2 * d], a,
                                    weight=lw, bias=lb, eps=eps)
            F.silu(torch.addmm(b0, a, w0t, out=u), inplace=True)
            gated_residual_(h, ada[:, base + 2 * d:base + 3 * d], torch.addmm(b2, u, w2t, out=v))
        base = 3 * d * len(w.mlp)
        layernorm_modulate_into(h, w.zero_shift, ada[:, base:base + d], a, eps=w.final_eps)
        # final linear + (folded final shift and bias, from the adaLN GEMM); a fresh (M, out)
        # tensor so callers may keep it across steps
        return torch.addmm(ada[:, base + d:], a, w.final_wt)


_LINEAR_POINTWISE = None


def _linear_pointwise():
    """oneDNN's fused linear (+ bias + pointwise) for CPU bf16, or None where this torch lacks it
    (probed once on a tiny input)."""
    global _LINEAR_POINTWISE
    if _LINEAR_POINTWISE is None:
        fn = False
        try:
            if torch.backends.mkldnn.is_available():
                f = torch.ops.mkldnn._linear_pointwise
                x = torch.ones(2, 4, dtype=torch.bfloat16)
                y = f(x, torch.ones(3, 4, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16), "swish", [], "")
                if y.shape == (2, 3) and torch.allclose(y.float(), F.silu(torch.full((2, 3), 4.0)), rtol=1e-2):
                    fn = f
        except (AttributeError, RuntimeError):
            pass
        _LINEAR_POINTWISE = fn
    return _LINEAR_POINTWISE or None


class CpuHeadStep(EagerHeadStep):
    """The cpu backend's step: with bf16 GEMMs on a CPU, each head MLP's two linears run as oneDNN
    fused linears (bias, and SiLU after the first, applied in the GEMM's epilogue) and the adaLN
    GEMM takes its bias the same way. Measured on the Zen 4 machine (2026-12-07, MAR-B head,
    300 rows): addmm into a workspace plus an in-place SiLU spent about as long broadcasting the
    bias into the output and in the separate SiLU pass as in the GEMM (docs/measured.md).
    Otherwise (fp32, no oneDNN) the eager step."""

    def __init__(self, sampler):
        super().__init__(sampler)
        self.lp = _linear_pointwise() if sampler.gd == torch.bfloat16 and sampler.h.device.type == "cpu" else None
        if self.lp is not None:
            w = sampler.w
            # (out, in) weights as oneDNN takes them: the sampler's transposed views, transposed back
            self.mlp_w = [(w0t.t(), b0, w2t.t(), b2) for (w0t, b0, w2t, b2) in w.mlp]
            self.ada_w = w.ada_wt.t()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if self.lp is None:
            return super().__call__(x, step)
        s, lp = self.s, self.lp
        w, d = s.w, s.d
        torch.add(s.temb[step], s.cemb, out=self.y)
        F.silu(self.y, inplace=True)
        self.sy.copy_(self.y)
        ada = lp(self.sy, self.ada_w, w.ada_b, "none", [], "")
        n = x.shape[0]
        h = s.h
        torch.addmm(s.in_b, x.float(), s.in_wt, out=h[:n])
        if s.rows != n:
            h[n:].copy_(h[:n])
        a = self.a
        for i, ((w0, b0, w2, b2), (lw, lb, eps)) in enumerate(zip(self.mlp_w, w.ln)):
            base = 3 * d * i
            layernorm_modulate_into(h, ada[:, base:base + d], ada[:, base + d:base + 2 * d], a,
                                    weight=lw, bias=lb, eps=eps)
            u = lp(a, w0, b0, "swish", [], "")
            gated_residual_(h, ada[:, base + 2 * d:base + 3 * d], lp(u, w2, b2, "none", [], ""))
        base = 3 * d * len(w.mlp)
        layernorm_modulate_into(h, w.zero_shift, ada[:, base:base + d], a, eps=w.final_eps)
        return torch.addmm(ada[:, base + d:], a, w.final_wt)


backend.register(HEAD_STEP, "cpu")(CpuHeadStep)
backend.register(HEAD_STEP, "reference")(EagerHeadStep)
backend.register_composite(HEAD_STEP)(EagerHeadStep)


def head_step(sampler):
    """(backend name, step) for a `DenoiserSampler`: the first backend, in the selector's order,
    whose head takes the sampler's device and GEMM dtype; the eager step when none does."""
    name, make = backend.select(HEAD_STEP, sampler.h.device, sampler)
    return name, make(sampler)
