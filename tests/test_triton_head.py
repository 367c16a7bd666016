"""The Triton kernels of the diffusion head and the sampling ops (fluid_ops/triton/denoiser.py,
fluid_ops/triton/sampling.py) against the reference.

Where there is no GPU (CI) they run on CPU tensors in Triton's interpreter: this module sets
TRITON_INTERPRET=1 for its own tests only (a module fixture, restored afterwards), before the
kernel modules are first imported (that is when @triton.jit decides between compiling and
interpreting). The interpreter computes tl.dot wrongly on bf16 inputs, so bf16 GEMMs run only on
the `cuda` params (a GPU machine); the elementwise / row kernels are checked in bf16 here too.
Shapes are small (the interpreter is slow) but cross its tiles (32 rows, up to 64 columns):
1 row, rows not a multiple of the tile, 0 rows, widths 48 / 80 / 96.
"""
import importlib
import importlib.util
import os

import pytest
import torch

import fluid_ops
from fluid_ops import backend
from fluid_ops.reference import categorical as rcat
from fluid_ops.reference import denoiser as rden
from fluid_ops.reference import diffusion as rdiff
from tests.conftest import assert_lowp_close
from tests.helpers import assert_same_indices as _assert_same_indices, logits as _logits, uniform as _uniform
from tests.helpers import gr_inputs as _gr_inputs, lnm_inputs as _lnm_inputs
from tests.helpers import randomize as _randomize, ref_lnm as _ref_lnm

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_GPU = torch.cuda.is_available()
# On a GPU machine the kernels are compiled for the GPU; the interpreter (CPU tensors) runs here
# only where there is no GPU, or when the caller set TRITON_INTERPRET=1 for the whole process.
USE_INTERPRETER = HAVE_TRITON and (not HAVE_GPU or os.environ.get("TRITON_INTERPRET") == "1")


def _device_params():
    # Without triton the tests run and fail: ./run test installs it, so its absence is a defect.
    cpu_skip = (None if USE_INTERPRETER or not HAVE_TRITON else "a GPU is present: the kernels are compiled for it "
                "(CPU tensors need TRITON_INTERPRET=1 for the whole process)")
    cuda_skip = None if HAVE_GPU and not USE_INTERPRETER else "no CUDA device (these run on a GPU machine)"
    return [pytest.param("cpu", marks=pytest.mark.skipif(cpu_skip is not None, reason=str(cpu_skip))),
            pytest.param("cuda", marks=pytest.mark.skipif(cuda_skip is not None, reason=str(cuda_skip)))]


DEVICES = _device_params()


@pytest.fixture(scope="module", autouse=True)
def _interpreter_for_this_module():
    old = os.environ.get("TRITON_INTERPRET")
    if USE_INTERPRETER:
        os.environ["TRITON_INTERPRET"] = "1"
        for name in ("fluid_ops.triton.denoiser", "fluid_ops.triton.sampling"):
            mod = importlib.import_module(name)
            if not mod.INTERPRETED:
                pytest.skip(f"{name} was imported (compiled for a GPU) before this module set TRITON_INTERPRET=1")
    backend._STATUS_CACHE.pop("triton", None)  # the status may have been taken before the variable was set
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        backend._STATUS_CACHE.pop("triton", None)


def _kd():
    return importlib.import_module("fluid_ops.triton.denoiser")


def _ks():
    return importlib.import_module("fluid_ops.triton.sampling")


def _lowp(device):
    """Low-precision dtypes the GEMM kernels are checked in on `device`."""
    return [torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def _skip_bf16_store(device, dtype):
    """The interpreter converts fp32 to bf16 by truncation (its round-to-nearest path drops the
    carry), so kernels that store bf16 are held to the 2x rule on a GPU only."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 stores truncate under the Triton interpreter (checked on the cuda params)")


def _to(device, *ts):
    return tuple(None if t is None else t.to(device) for t in ts)


# ---- backend rules ------------------------------------------------------------------------------
def test_triton_on_cpu_only_when_forced():
    x, mo, noise = torch.randn(3, 4), torch.randn(3, 8), torch.randn(3, 4)
    args = (x, mo, noise, rdiff.DiffusionSchedule(10).table(), 2, 1.0, 1.0)
    assert backend.select("ddpm_step", torch.device("cpu"), *args)[0] != "triton"
    if USE_INTERPRETER:
        with fluid_ops.use_backend("triton"):
            assert backend.select("ddpm_step", torch.device("cpu"), *args)[0] == "triton"
    ops = set(fluid_ops.backends()["triton"]["ops"])
    assert {"ddpm_step", "sample_categorical", "layernorm_modulate", "layernorm_modulate_into",
            "layernorm_modulate_backward", "gated_residual", "gated_residual_", "gated_residual_backward"} <= ops


# ---- ddpm_step ----------------------------------------------------------------------------------
def _step_inputs(n, c, guided, dtype=torch.float32, mo_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g).to(dtype)
    mo = torch.randn(2 * n if guided else n, 2 * c, generator=g).clamp(-1, 1).to(mo_dtype or dtype)
    return x, mo, torch.randn(n, c, generator=g).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,c", [(1, 1), (33, 16), (300, 3)])
@pytest.mark.parametrize("guided", [False, True])
def test_ddpm_step_matches_reference(device, n, c, guided):
    table = rdiff.DiffusionSchedule(100).table(device)
    x, mo, noise = _to(device, *_step_inputs(n, c, guided))
    for step in (0, 1, 99):
        for temperature, cfg in ((0.9, 3.0), (0.0, 1.5), (1.0, 1.0)):
            want = rdiff.ddpm_step(x, mo, noise, table, step, temperature=temperature, cfg=cfg)
            with fluid_ops.use_backend("triton"):
                got = fluid_ops.ddpm_step(x, mo, noise, table, step, temperature=temperature, cfg=cfg)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            # the step index read from a device tensor (graph replay) gives the same
            step_t = torch.tensor([step], device=device, dtype=torch.int32)
            got_t = _ks().ddpm_step(x, mo, noise, table, step_t, temperature, cfg)
            torch.testing.assert_close(got_t, got, rtol=0, atol=0)
            # temperature and cfg read from a device tensor (one graph for every value): the same
            from fluid_ops.ops.ddpm import ddpm_step_params
            params = torch.tensor([temperature, cfg], dtype=torch.float32, device=device)
            with fluid_ops.use_backend("triton"):
                got_p = ddpm_step_params(x, mo, noise, table, step, params)
            torch.testing.assert_close(got_p, got, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("guided", [False, True])
def test_ddpm_step_clip_denoised_matches_reference(device, guided):
    table = rdiff.DiffusionSchedule(100).table(device)
    x, mo, noise = _to(device, *_step_inputs(33, 16, guided, seed=3))
    x = x * 3.0  # predicted x_0 partly inside, partly outside [-1, 1]
    for step in (0, 1, 80):
        want = rdiff.ddpm_step(x, mo, noise, table, step, temperature=0.9, cfg=3.0, clip_denoised=True)
        with fluid_ops.use_backend("triton"):
            got = fluid_ops.ddpm_step(x, mo, noise, table, step, temperature=0.9, cfg=3.0, clip_denoised=True)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert (want - rdiff.ddpm_step(x, mo, noise, table, step, temperature=0.9, cfg=3.0)).abs().max() > 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,mo_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                            (torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_ddpm_step_mixed_dtypes(device, dtype, mo_dtype):
    table = rdiff.DiffusionSchedule(100).table(device)
    x, mo, noise = _to(device, *_step_inputs(37, 16, True, dtype, mo_dtype))
    want = rdiff.ddpm_step(x, mo, noise, table, 10, cfg=2.0)
    with fluid_ops.use_backend("triton"):
        got = fluid_ops.ddpm_step(x, mo, noise, table, 10, cfg=2.0)
    assert got.dtype == dtype
    # the same fp32 arithmetic and one rounding to the output dtype: at most an ulp apart
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp(min=1.0)
    assert bool(((got.float() - want.float()).abs() <= ulp).all())


@pytest.mark.parametrize("device", DEVICES)
def test_ddpm_step_empty_and_output_buffer(device):
    table = rdiff.DiffusionSchedule(10).table(device)
    with fluid_ops.use_backend("triton"):
        assert fluid_ops.ddpm_step(*_to(device, torch.empty(0, 4), torch.empty(0, 8), torch.empty(0, 4)),
                                   table, 3).shape == (0, 4)
    x, mo, noise = _to(device, *_step_inputs(5, 4, False))
    buf = torch.full_like(x, float("nan"))
    ret = _ks().ddpm_step(x, mo, noise, table, 4, 1.0, 1.0, out=buf)
    assert ret is buf
    torch.testing.assert_close(buf, rdiff.ddpm_step(x, mo, noise, table, 4), rtol=1e-6, atol=1e-6)


# ---- sample_categorical -------------------------------------------------------------------------
CAT_SETTINGS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                dict(temperature=1.3, top_p=0.9), dict(temperature=1.0, top_k=7, top_p=0.3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,v,dtype,ties", [(1, 1, torch.float32, False), (7, 17, torch.float32, True),
                                            (5, 300, torch.float16, False), (3, 1024, torch.bfloat16, True),
                                            (2, 3000, torch.float32, False)])
def test_sample_categorical_matches_reference(device, n, v, dtype, ties):
    logits = _logits(n, v, dtype, seed=n * v, ties=ties).to(device)
    u = _uniform(n, seed=v).to(device)
    for kw in CAT_SETTINGS:
        kw = dict(kw, top_k=min(kw["top_k"], v)) if "top_k" in kw else kw
        with fluid_ops.use_backend("triton"):
            got = fluid_ops.sample_categorical(logits, uniform=u, **kw)
        assert got.dtype == torch.int64 and got.shape == (n,)
        _assert_same_indices(got.cpu(), logits.cpu(), u.cpu(), **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_categorical_streamed_rows_neg_inf_and_extremes(device):
    """Rows longer than one chunk (block_v=64 over V=300: the streaming path of every pass),
    -inf logits, uniforms at 0 and just below 1, tiny and huge temperatures."""
    logits = _logits(9, 300, neg_inf=True, seed=3).to(device)
    u = _uniform(9, seed=4)
    u[:3] = torch.tensor([0.0, 1 - 2**-53, 1 - 2**-24], dtype=torch.float64)
    u = u.to(device)
    for t, k, p, block_v in ((1.0, None, None, 128), (0.0, None, None, 128), (0.8, 50, 0.95, 128),
                             (50.0, None, 0.5, 128), (1e-30, 3, None, None), (1.0, None, 1e-9, None)):
        got = _ks().sample_categorical(logits, u, t, k, p, block_v=block_v)
        kw = dict(temperature=t, top_k=k, top_p=p)
        _assert_same_indices(got.cpu(), logits.cpu(), u.cpu(), **kw)
        assert bool(torch.isfinite(logits.gather(1, got[:, None])).all()), "a -inf logit was sampled"
        if block_v is not None:  # streamed in 3 chunks or held in one: the same indices
            torch.testing.assert_close(got, _ks().sample_categorical(logits, u, t, k, p), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_categorical_frequencies(device):
    """Enough draws of one row that a wrong distribution would show (the index-level checks
    above already pin the algorithm; this guards the test against a shared mistake)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, float("-inf")]], device=device).expand(4000, 5)
    u = torch.rand(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(device)
    with fluid_ops.use_backend("triton"):
        got = fluid_ops.sample_categorical(logits, uniform=u, temperature=0.8, top_k=3)
    assert torch.equal(got.cpu(), rcat.sample_categorical(logits.cpu(), uniform=u.cpu(), temperature=0.8, top_k=3))
    freq = torch.bincount(got.cpu(), minlength=5).double() / 4000
    w = torch.softmax(torch.tensor([0.0, 1.0, 2.0]) / 0.8, 0).double()
    torch.testing.assert_close(freq[:3], w, rtol=0, atol=0.03)
    assert freq[3] == 0 and freq[4] == 0


# ---- layernorm_modulate / gated_residual --------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r,d", [(1, 48), (33, 96), (70, 80), (3, 1536)])
@pytest.mark.parametrize("layout", ["contiguous", "chunk", "broadcast"])
@pytest.mark.parametrize("affine", [False, True])
def test_layernorm_modulate_fp32(device, r, d, layout, affine):
    x, shift, scale, w, b = _to(device, *_lnm_inputs(r, d, layout, affine=affine))
    want = _ref_lnm(x.double(), shift.double(), scale.double(), None if w is None else w.double(),
                    None if b is None else b.double())
    with fluid_ops.use_backend("triton"):
        got = fluid_ops.layernorm_modulate(x, shift, scale, weight=w, bias=b)
        buf = torch.full((r, d + 5), float("nan"), device=device)
        fluid_ops.ops.denoiser.layernorm_modulate_into(x, shift, scale, buf[:, 2:d + 2], weight=w, bias=b)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(buf[:, 2:d + 2], got, rtol=0, atol=0)
    assert buf[:, :2].isnan().all() and buf[:, d + 2:].isnan().all()  # nothing written outside


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_layernorm_modulate_low_precision(device, dtype, out_dtype):
    od = out_dtype or dtype
    _skip_bf16_store(device, od)
    x, shift, scale, w, b = _to(device, *_lnm_inputs(67, 80, "chunk", dtype=dtype))
    ref64 = _ref_lnm(x.double(), shift.double(), scale.double(), w.double(), b.double())
    ref_lowp = _ref_lnm(x, shift, scale, w, b, out_dtype=od if od != torch.float32 else torch.bfloat16)
    with fluid_ops.use_backend("triton"):
        got = fluid_ops.layernorm_modulate(x, shift, scale, weight=w, bias=b, out_dtype=out_dtype)
    assert got.dtype == od
    assert_lowp_close(got, ref64, ref_lowp, name=f"layernorm_modulate {dtype}->{od}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r,d", [(1, 1), (33, 96), (300, 48)])
@pytest.mark.parametrize("layout", ["contiguous", "chunk", "broadcast"])
def test_gated_residual_fp32_and_in_place(device, r, d, layout):
    h, gate, y = _to(device, *_gr_inputs(r, d, layout))
    want = h.double() + gate.double() * y.double()
    with fluid_ops.use_backend("triton"):
        got = fluid_ops.gated_residual(h, gate, y)
        h2 = h.clone()
        fluid_ops.gated_residual_(h2, gate, y)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2, got, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,gdtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16), (torch.float16, torch.float32)])
def test_gated_residual_low_precision(device, dtype, gdtype):
    _skip_bf16_store(device, dtype)
    h, gate, y = _to(device, *_gr_inputs(33, 80, "chunk", dtype, gdtype))
    ref64 = rden.gated_residual(h.double(), gate.double(), y.double())
    ref_lowp = rden.gated_residual(h, gate, y) if dtype != torch.float32 else rden.gated_residual(h.bfloat16(), gate, y)
    with fluid_ops.use_backend("triton"):
        got = fluid_ops.gated_residual(h, gate, y)
    assert got.dtype == dtype
    assert_lowp_close(got, ref64, ref_lowp, name="gated_residual")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("layout", ["chunk", "broadcast"])
def test_backward_matches_autograd_through_reference(device, affine, layout):
    x, shift, scale, w, b = _lnm_inputs(37, 80, layout, affine=affine, seed=5)
    _, gate, y = _gr_inputs(37, 80, layout, seed=6)
    leaves = [t.detach().clone().to(device).requires_grad_() for t in (x, shift, scale, gate, y)]
    params = [t.detach().clone().to(device).requires_grad_() for t in (w, b)] if affine else [None, None]
    gout = torch.randn(37, 80, generator=torch.Generator().manual_seed(7))

    def run(lnm, gr, xs, sh, sc, gt, yy, ww, bb):
        a = lnm(xs, sh, sc, ww, bb)
        return gr(a, gt, yy * a)

    with fluid_ops.use_backend("triton"):
        out = run(lambda *a: fluid_ops.layernorm_modulate(*a[:3], weight=a[3], bias=a[4]), fluid_ops.gated_residual,
                  *leaves, *params)
        inputs = leaves + [p for p in params if p is not None]
        got = torch.autograd.grad(out, inputs, gout.to(device))
    rl = [t.detach().cpu().double().requires_grad_() for t in inputs]
    rw, rb = (rl[5], rl[6]) if affine else (None, None)
    outr = run(lambda xs, sh, sc, ww, bb: _ref_lnm(xs, sh, sc, ww, bb), rden.gated_residual, *rl[:5], rw, rb)
    want = torch.autograd.grad(outr, rl, gout.double())
    for i, (gg, ww) in enumerate(zip(got, want)):
        assert gg.shape == inputs[i].shape
        torch.testing.assert_close(gg.cpu().double(), ww, rtol=1e-4, atol=1e-4, msg=f"grad of input {i}")


# ---- the fused GEMM kernel, piece by piece --------------------------------------------------------
def _cfg(kd, m, n, k, dtype, device):
    cfg = kd.gemm_config(m, n, k, dtype)
    if device == "cpu":
        assert cfg["BLOCK_M"] == 32  # the awkward row counts below straddle it
    return cfg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,d", [(1, 48), (33, 48), (70, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_linear_prologues_and_epilogues(device, m, d, dtype):
    """Each prologue / epilogue of `_head_linear_kernel` against torch, on one chain:
    h = x[r % n] W_in^T + b (+ LN partials), ada = SiLU(c + t) W_a^T + b_a,
    u = SiLU((LN(h) w + b)(1 + scale) + shift) W_1^T + b_1, h' = h + gate * (u W_2^T + b_2) (+ partials),
    out = (LN(h')(1 + scale)) W_f^T + rowbias."""
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 tl.dot is wrong under the Triton interpreter (checked on the cuda params)")
    kd = _kd()
    g = torch.Generator().manual_seed(m + d)
    n_x = (m + 1) // 2 if m > 1 else 1  # CFG-style: rows past n_x repeat x's rows
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device)  # noqa: E731
    x, w_in, b_in = r(n_x, 7), r(d, 7, std=0.5), r(d, std=5.0)  # an offset residual stream
    c, t = r(m, d), r(1, d)
    w_a, b_a = r(3 * d, d, std=d ** -0.5), r(3 * d, std=0.3)
    lnw, lnb = r(d) + 1, r(d, std=0.3)
    w1, b1, w2, b2 = r(d, d, std=d ** -0.5), r(d, std=0.1), r(d, d, std=d ** -0.5), r(d, std=0.1)
    wf, rb = r(5, d, std=d ** -0.5), r(m, 5)

    def torch_chain(p):
        """The same chain in torch with GEMM operands and outputs in dtype p, the rest in fp32
        (fp64 when p is)."""
        f = torch.float64 if p == torch.float64 else torch.float32

        def lin(a, wt, b=None):
            y = (a.to(p) @ wt.to(p).t()).to(f)
            return y if b is None else y + b.to(f)

        rows = torch.arange(m, device=device) % n_x
        h = lin(x.to(f)[rows], w_in.to(f), b_in.to(f))
        ada = lin(torch.nn.functional.silu(c.to(f) + t.to(f)), w_a, b_a)
        shift, scale, gate = ada.chunk(3, 1)
        a = torch.nn.functional.layer_norm(h, (d,), lnw.to(f), lnb.to(f), 1e-6) * (1 + scale) + shift
        u = torch.nn.functional.silu(lin(a, w1, b1))
        h2 = h + gate * lin(u, w2, b2)
        out = lin(torch.nn.functional.layer_norm(h2, (d,), None, None, 1e-6) * (1 + scale), wf) + rb.to(f)
        return ada, u, h2, out

    lin_t = lambda wt: wt.to(dtype).t()  # noqa: E731  (transposed views, as _SamplingWeights holds them)
    h = torch.empty(m, d, device=device)
    cfg_h = dict(_cfg(kd, m, d, d, dtype, device), BLOCK_N=32)  # LN partials of 2 or 3 tiles
    tiles = -(-d // cfg_h["BLOCK_N"])
    stats = torch.full((m, tiles, 2), float("nan"), device=device)
    ada = torch.empty(m, 3 * d, dtype=dtype, device=device)
    u = torch.empty(m, d, dtype=dtype, device=device)
    out = torch.empty(m, 5, dtype=dtype, device=device)
    kd._linear(x, w_in.t(), h, cfg=dict(_cfg(kd, m, d, 7, torch.float32, device), BLOCK_N=cfg_h["BLOCK_N"]),
               a_rows=n_x, bias=b_in, out_stats=stats)
    want_h = h.double()
    # the partials describe what was stored: combined, they give each row's mean and variance
    cnt = torch.tensor([min(cfg_h["BLOCK_N"], d - i * cfg_h["BLOCK_N"]) for i in range(tiles)], device=device)
    mean = (stats[..., 0] * cnt).sum(1) / d
    var = (stats[..., 1] + cnt * (stats[..., 0] - mean[:, None]) ** 2).sum(1) / d
    torch.testing.assert_close(mean.double(), want_h.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), want_h.var(1, unbiased=False), rtol=1e-4, atol=1e-5)
    kd._linear(c, lin_t(w_a), ada, cfg=_cfg(kd, m, 3 * d, d, dtype, device), silu_add=t, bias=b_a)
    ln = dict(stats=stats, stat_bn=cfg_h["BLOCK_N"], eps=1e-6, weight=lnw, bias=lnb, shift=ada[:, :d],
              scale=ada[:, d:2 * d])
    kd._linear(h, lin_t(w1), u, cfg=cfg_h, ln=ln, bias=b1, silu_out=True)
    kd._linear(u, lin_t(w2), h, cfg=cfg_h, bias=b2, gated_residual=(ada[:, 2 * d:], h), out_stats=stats)
    ln = dict(stats=stats, stat_bn=cfg_h["BLOCK_N"], eps=1e-6, scale=ada[:, d:2 * d])
    kd._linear(h, lin_t(wf), out, cfg=_cfg(kd, m, 5, d, dtype, device), ln=ln, row_bias=rb)

    ref64 = torch_chain(torch.float64)
    got = (ada, u, h, out)
    names = ("adaLN GEMM (SiLU(c + t) prologue)", "fc1 (LN-modulate prologue, SiLU epilogue)",
             "fc2 (gated residual epilogue)", "final (LN prologue from fc2's partials, row bias)")
    if dtype == torch.float32:
        for a, b, name in zip(got, ref64, names):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * (1 + b.abs().max().item()), msg=name)
    else:
        ref_lowp = torch_chain(dtype)
        for a, b, lp, name in zip(got, ref64, ref_lowp, names):
            assert_lowp_close(a, b, lp, atol=1e-3 * (1 + b.abs().max().item()), name=name)


# ---- the fused head ----------------------------------------------------------------------------------
def _head(cin, d, z, blocks, seed=4, std=0.15):
    refnet = _randomize(rden.DenoiserMLP(cin, d, 2 * cin, z, blocks), seed=seed, std=std)
    net = fluid_ops.nn.DenoiserMLP(cin, d, 2 * cin, z, blocks)
    net.load_state_dict(refnet.state_dict(), strict=True)
    return refnet, net


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d,blocks,prologue", [(1, 48, 1, "fused"), (33, 48, 2, "fused"), (70, 96, 1, "fused"),
                                                 (5, 48, 0, "fused"), (0, 48, 1, "fused"), (33, 96, 2, "split"),
                                                 (1, 48, 0, "split")])
def test_head_forward_fp32_matches_denoiser_forward(device, n, d, blocks, prologue):
    refnet, net = _head(6, d, 10, blocks)
    net.to(device)
    g = torch.Generator().manual_seed(8)
    x, c = torch.randn(n, 6, generator=g), torch.randn(n, 10, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    got = _kd().head_forward(net, *_to(device, x, t, c), prologue=prologue)
    assert got.shape == (n, 12) and got.dtype == torch.float32
    with torch.no_grad():
        want = net(*_to(device, x, t, c)).cpu()  # fluid_ops' own forward
        want_ref = refnet(x, t, c)
    torch.testing.assert_close(want, want_ref, rtol=1e-5, atol=1e-5)
    scale = 1 + want.abs().max().item() if n else 1.0
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d,prologue", [(33, 48, "fused"), (70, 96, "fused"), (70, 96, "split")])
def test_head_forward_low_precision(device, n, d, prologue):
    refnet, net = _head(6, d, 10, 2)
    net.to(device)
    g = torch.Generator().manual_seed(9)
    x, c = torch.randn(n, 6, generator=g), torch.randn(n, 10, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    with torch.no_grad():
        ref64 = refnet.double()(x.double(), t, c.double())
        for dtype in _lowp(device):
            got = _kd().head_forward(net, *_to(device, x, t, c), gemm_dtype=dtype, prologue=prologue)
            assert got.dtype == dtype
            # the reference run in that precision: every weight and activation in `dtype`
            lowp = rden.DenoiserMLP(6, d, 12, 10, 2).to(device, dtype)
            lowp.load_state_dict(refnet.state_dict())
            ref_lowp = lowp(*_to(device, x.to(dtype), t, c.to(dtype)))
            assert_lowp_close(got.cpu(), ref64, ref_lowp.cpu(), atol=1e-3, name=f"head forward {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("guided", [False, True])
def test_sampler_uses_fused_head_when_triton_runs(device, guided):
    """DenoiserSampler runs the fused head on the triton backend (forced on CPU, default on
    CUDA) and gives what its op path gives."""
    _, net = _head(6, 48, 10, 2, seed=11)
    net.to(device)
    n = 9
    z = torch.randn(2 * n if guided else n, 10, generator=torch.Generator().manual_seed(2)).to(device)
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(3)).to(device)
    ts = rdiff.DiffusionSchedule(10).model_timesteps(device)
    with fluid_ops.use_backend("triton" if device == "cpu" else None):
        fused = net.sampler(z, ts)
        if device == "cpu":  # bf16 GEMMs under the interpreter fall back to the op path
            assert net.sampler(z, ts, torch.bfloat16).fused is None
    assert fused.fused is not None
    with fluid_ops.use_backend("reference"):
        plain = net.sampler(z, ts)
    assert plain.fused is None
    split = _kd().FusedHeadStep(fused, mode="split")  # the large-batch mode, on the same sampler state
    for step in (0, 7):
        want = plain(x, step)
        torch.testing.assert_close(fused(x, step), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(split(x, step), want, rtol=1e-5, atol=1e-5)


def test_prologue_mode_choice(monkeypatch):
    kd = _kd()
    monkeypatch.delenv("FLUID_OPS_HEAD_PROLOGUE", raising=False)
    big = kd.SPLIT_PROLOGUE_MIN_ROWS
    assert kd.prologue_mode(big - 1, torch.bfloat16) == "fused"
    assert kd.prologue_mode(big, torch.bfloat16) == "split"
    assert kd.prologue_mode(big, torch.float32) == "fused"  # CUDA-core GEMMs: the prologue is cheap beside them
    assert kd.prologue_mode(big, torch.bfloat16, "fused") == "fused"
    monkeypatch.setenv("FLUID_OPS_HEAD_PROLOGUE", "split")
    assert kd.prologue_mode(1, torch.bfloat16) == "split"
    monkeypatch.setenv("FLUID_OPS_HEAD_PROLOGUE", "sometimes")
    with pytest.raises(ValueError, match="prologue mode must be one of"):
        kd.prologue_mode(1, torch.bfloat16)


def _eps_net_pair(device):
    from tests.helpers import eps_net as _eps_net
    ref = _eps_net()
    fast = fluid_ops.nn.DenoiserMLP(ref.in_channels, ref.model_channels, ref.out_channels, ref.z_channels,
                                    ref.num_res_blocks)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_diffusion_sample_on_triton_matches_reference_loop(device, cfg):
    from tests.helpers import diffusion_inputs as _inputs
    ref, fast = _eps_net_pair(device)
    steps = 4
    z, noise = _inputs(13, cfg, steps)
    with torch.no_grad():
        want = rdiff.diffusion_sample(ref, z, num_steps=steps, temperature=0.9, cfg=cfg, noise=noise)
    with fluid_ops.use_backend("triton" if device == "cpu" else None):
        got = fluid_ops.diffusion_sample(fast, z.to(device), num_steps=steps, temperature=0.9, cfg=cfg,
                                         noise=noise.to(device))
    assert want.abs().max() > 0.5
    scale = want.abs().max().item() + 1.0
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_diffusion_sample_on_triton_does_no_host_transfer_per_step(device):
    from tests.helpers import diffusion_inputs as _inputs, loop_events as _loop_events
    _, fast = _eps_net_pair(device)
    counts = {}
    with fluid_ops.use_backend("triton" if device == "cpu" else None):
        for steps in (1, 3):
            z, noise = _to(device, *_inputs(4, 3.0, steps))
            fluid_ops.diffusion_sample(fast, z, num_steps=steps, cfg=3.0, noise=noise)  # warm the schedule caches
            counts[steps] = _loop_events(fast, z, noise, steps, 3.0)
    assert counts[1] == counts[3], counts
    assert "aten._local_scalar_dense" not in counts[3], counts


# ---- the GPU build, checked without a GPU (opt-in: about a minute of compiling) -------------------
@pytest.mark.skipif(os.environ.get("FLUID_OPS_TRITON_AOT") != "1" or not HAVE_TRITON,
                    reason="set FLUID_OPS_TRITON_AOT=1 to compile every kernel for sm_90 / sm_80 (no GPU needed)")
def test_kernels_compile_for_gpus():
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "triton_aot_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]


# ---- GPU only ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES[1:])
def test_sampling_loop_replays_as_a_cuda_graph(device):
    """The whole loop (fused head + ddpm_step per step) captured as one CUDA graph and replayed
    gives the eager result: nothing in it syncs with or copies from the host."""
    _, fast = _eps_net_pair(device)
    steps, n = 6, 16
    g = torch.Generator().manual_seed(12)
    z = torch.randn(2 * n, fast.z_channels, generator=g).to(device)
    noise = torch.randn(steps + 1, n, fast.in_channels, generator=g).to(device)
    sched = rdiff.DiffusionSchedule(steps)
    table, ts = sched.table(device), sched.model_timesteps(device)
    sampler = fast.sampler(z, ts)
    assert sampler.fused is not None

    def loop(x):
        for i, step in enumerate(range(steps - 1, -1, -1)):
            x = fluid_ops.ddpm_step(x, sampler(x, step), noise[i + 1], table, step, temperature=0.9, cfg=3.0)
        return x

    eager = loop(noise[0].clone())  # also compiles every kernel before the capture
    x0 = noise[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loop(x0)
    graph.replay()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    torch.testing.assert_close(eager, fluid_ops.diffusion_sample(fast, z, num_steps=steps, cfg=3.0, noise=noise,
                                                                 temperature=0.9), rtol=0, atol=0)
