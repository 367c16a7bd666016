"""The CUDA fused head (csrc/cuda/head.cu, fluid_ops/ops/head_cuda.py) against the reference.

The same checks as tests/test_triton_head.py's GEMM / head tests, on CUDA tensors: the plain
tensor-core GEMM first (it pins the mma / ldmatrix fragment mapping), then each prologue /
epilogue in one chain, the whole head against fluid_ops.reference.DenoiserMLP (MAR-B-like widths
and tiny ones, rows that are not multiples of the 64 / 128-row tiles, CFG rows, both prologue
modes), the sampler's choice of head, a full diffusion_sample against the reference loop at
temperature 0 and a CUDA-graph replay. bf16 / fp16 only (the CUDA head declines fp32 GEMMs), held
to the flash-attn rule of tests/conftest.py. They skip without a GPU (`requires_cuda`).

The host-side tests at the top run everywhere: the choice of head, the prologue-mode rule, and
the C++ argument validation of the kernels (it throws before any launch, so it runs on a
machine without a GPU, on CPU tensors' pointers that are never dereferenced).
"""
import importlib.util

import pytest
import torch

import fluid_ops
from fluid_ops import _compiled
from fluid_ops.ops import head_cuda
from fluid_ops.reference import denoiser as rden
from fluid_ops.reference import diffusion as rdiff
from tests.conftest import assert_lowp_close, requires_cuda
from tests.helpers import randomize as _randomize

HAVE_KERNELS = _compiled.cuda is not None and hasattr(_compiled.cuda, "head_linear")
NO_DEVICE = _compiled.cuda_device_status()[0] == 0
LOWP = [torch.bfloat16, torch.float16]
v = _compiled.view


# ---- host logic (runs everywhere) -------------------------------------------------------------
def test_head_choice_rules(monkeypatch):
    monkeypatch.delenv("FLUID_OPS_BACKEND", raising=False)
    assert "CUDA tensors" in head_cuda.cuda_head_unusable(torch.device("cpu"), torch.bfloat16)
    assert "fp32" in head_cuda.cuda_head_unusable(torch.device("cuda"), torch.float32)
    with fluid_ops.use_backend("triton"):
        assert "forced" in head_cuda.cuda_head_unusable(torch.device("cuda"), torch.bfloat16)
    monkeypatch.setenv("FLUID_OPS_BACKEND", "reference")
    assert "forced" in head_cuda.cuda_head_unusable(torch.device("cuda"), torch.bfloat16)
    monkeypatch.delenv("FLUID_OPS_BACKEND")
    if fluid_ops.backends()["cuda"]["available"] and HAVE_KERNELS:
        assert head_cuda.cuda_head_unusable(torch.device("cuda"), torch.bfloat16, 1024) is None
        assert "multiple of 8" in head_cuda.cuda_head_unusable(torch.device("cuda"), torch.bfloat16, 100)
    else:  # says why: no device / not built
        assert head_cuda.cuda_head_unusable(torch.device("cuda"), torch.bfloat16) is not None


def test_cpu_sampler_never_picks_cuda_head():
    net = fluid_ops.nn.DenoiserMLP(4, 16, 8, 6, 1)
    s = net.sampler(torch.randn(3, 6), torch.arange(4))
    assert not isinstance(s.fused, head_cuda.CudaHeadStep)


def test_prologue_mode_choice(monkeypatch):
    monkeypatch.delenv("FLUID_OPS_HEAD_PROLOGUE", raising=False)
    big = head_cuda.SPLIT_PROLOGUE_MIN_ROWS
    assert head_cuda.prologue_mode(big - 1) == "fused"
    assert head_cuda.prologue_mode(big) == "split"
    assert head_cuda.prologue_mode(big, "fused") == "fused"
    monkeypatch.setenv("FLUID_OPS_HEAD_PROLOGUE", "split")
    assert head_cuda.prologue_mode(1) == "split"
    monkeypatch.setenv("FLUID_OPS_HEAD_PROLOGUE", "sometimes")
    with pytest.raises(ValueError, match="prologue mode must be one of"):
        head_cuda.prologue_mode(1)


def test_adaln_buffer_rows_are_16_byte_aligned():
    for width in (1, 7, 8, 19488, 3 * 48 * 2 + 48 + 12):
        b = head_cuda.adaln_buffer(5, width, torch.bfloat16, "cpu")
        assert b.shape == (5, width) and b.stride(0) % 8 == 0 and b.stride(1) == 1


needs_module = pytest.mark.skipif(not HAVE_KERNELS, reason="fluid_ops._C_cuda is not built with the head kernels "
                                  "(install with FLUID_OPS_CUDA=1)")


def _call(a, w, out, *, c=None, lnw=None, lnb=None, shift=None, scale=None, eps=1e-6, bias=None, rbias=None,
          silu=False, gate=None, stream=0):
    _compiled.cuda.head_linear(v(a), v(c), v(lnw), v(lnb), v(shift), v(scale), eps, v(w), v(bias), v(rbias), silu,
                               v(gate), v(out), stream)


@needs_module
def test_tile_choice():
    assert _compiled.cuda.head_gemm_tile(1) == (64, 64, 4)
    assert _compiled.cuda.head_gemm_tile(1024) == (64, 64, 4)
    assert _compiled.cuda.head_gemm_tile(1025) == (128, 128, 8)


M_, N_, K_ = 33, 40, 64


@needs_module
def test_kernel_argument_validation():
    """Every bad call raises a ValueError naming the argument before anything is launched (so
    CPU tensors' pointers are safe here, with or without a GPU)."""
    m, n, k = M_, N_, K_
    bf = torch.bfloat16
    a, w, out = torch.zeros(m, k, dtype=bf), torch.zeros(n, k, dtype=bf), torch.zeros(m, n, dtype=bf)
    err = _compiled.cuda.KernelArgumentError
    assert issubclass(err, ValueError)
    cases = [
        (dict(w=torch.zeros(n, k)), "w must be bfloat16 or float16"),
        (dict(w=torch.zeros(n, 60, dtype=bf), a=torch.zeros(m, 60, dtype=bf)), "multiple of 8"),
        (dict(a=torch.zeros(m, k + 8, dtype=bf)), "a must have shape"),
        (dict(a=torch.zeros(m, k)), "a must be bfloat16"),
        (dict(a=torch.zeros(m, k + 1, dtype=bf)[:, 1:]), "a: "),  # misaligned base / stride
        (dict(a=torch.zeros(k, m, dtype=bf).t()), "unit column stride"),
        (dict(out=torch.zeros(m, n + 1, dtype=bf)), "out must have shape"),
        (dict(out=torch.zeros(m, n)), "out must be bfloat16"),
        (dict(bias=torch.zeros(n + 1, dtype=bf)), "bias must have shape"),
        (dict(rbias=torch.zeros(m, n)), "rbias must be bfloat16"),
        (dict(gate=torch.zeros(m, n, dtype=bf)), "out must be float32"),
        (dict(a=torch.zeros(m, k), c=torch.zeros(2, k)), "c must have shape"),
        (dict(a=torch.zeros(m, k), c=torch.zeros(1, k), scale=torch.zeros(m, k, dtype=bf)), "not both"),
        (dict(shift=torch.zeros(m, k, dtype=bf)), "scale is missing"),
        (dict(a=torch.zeros(m, k), scale=torch.zeros(m, k, dtype=bf), lnw=torch.zeros(k, dtype=bf)),
         "lnw must be float32"),
        (dict(a=torch.zeros(m, k), scale=torch.zeros(m, k, dtype=bf), out=torch.zeros(m, n),
              gate=torch.zeros(m, n, dtype=bf)), "gated-residual epilogue"),
        (dict(a=torch.zeros(m, k), scale=torch.zeros(m, 2 * k + 4, dtype=bf)[:, 4:k + 4]), "scale: "),
    ]
    for kw, match in cases:
        args = dict(a=a, w=w, out=out)
        args.update(kw)
        with pytest.raises(err, match=match):
            _call(**args)
    _call(a[:0], w, out[:0])  # no rows: validated, nothing launched
    with pytest.raises(err, match="w must have shape"):
        _compiled.cuda.head_input_proj(v(torch.zeros(m, 4)), v(torch.zeros(n, 5)), None, v(torch.zeros(m, n)), 0)
    with pytest.raises(err, match="c must have shape"):
        _compiled.cuda.head_silu_add(v(torch.zeros(m, k)), v(torch.zeros(3, k)), v(torch.zeros(m, k, dtype=bf)), 0)


@needs_module
@pytest.mark.skipif(not NO_DEVICE, reason="passes CPU pointers to a launch: only where no CUDA device could read them")
def test_valid_calls_pass_validation_and_fail_only_at_the_launch():
    m, n, k = M_, N_, K_
    bf = torch.bfloat16
    a, w, out = torch.zeros(m, k, dtype=bf), torch.zeros(n, k, dtype=bf), torch.zeros(m, n, dtype=bf)
    for good in (dict(), dict(bias=torch.zeros(n, dtype=bf), silu=True),
                 dict(a=torch.zeros(m, k), c=torch.zeros(1, k)),
                 dict(a=torch.zeros(m, k), scale=torch.zeros(m, 3 * k, dtype=bf)[:, k:2 * k], lnw=torch.zeros(k)),
                 dict(gate=torch.zeros(m, n, dtype=bf), out=torch.zeros(m, n))):
        args = dict(a=a, w=w, out=out)
        args.update(good)
        with pytest.raises(RuntimeError, match="CUDA launch failed"):
            _call(**args)


# ---- host logic: the launch sequence, on CPU tensors with emulated kernels -------------------------
class _View(tuple):
    """What _compiled.view returns, carrying its tensor along (the binding sees a plain tuple)."""


def _emulated_kernels(real):
    """Stand-ins for the CUDA head's kernels that first call the real binding (its C++ validation
    must accept the views; the launch then fails: no driver here) and then compute the documented
    contract of csrc/cuda/head.h with torch, on the tensors behind the views."""
    F = torch.nn.functional

    def validated(name, *args):
        with pytest.raises(RuntimeError, match="CUDA launch failed"):
            getattr(real, name)(*args)

    def t(view):
        return None if view is None else view.t

    class Fake:
        def head_linear(self, a, c, lnw, lnb, shift, scale, eps, w, bias, rbias, silu, gate, out, stream):
            validated("head_linear", a, c, lnw, lnb, shift, scale, eps, w, bias, rbias, silu, gate, out, stream)
            a, c, lnw, lnb, shift, scale, w, bias, rbias, gate, out = map(
                t, (a, c, lnw, lnb, shift, scale, w, bias, rbias, gate, out))
            x = a.float()
            if c is not None:
                x = F.silu(x + c.float())
            if scale is not None:
                x = F.layer_norm(x, (x.shape[1],), lnw, lnb, eps) * (1 + scale.float())
                x = x + (0 if shift is None else shift.float())
            acc = x.to(w.dtype).float() @ w.float().t()
            acc = acc + (0 if bias is None else bias.float()) + (0 if rbias is None else rbias.float())
            acc = F.silu(acc) if silu else acc
            out.copy_(out + gate.float() * acc if gate is not None else acc)

        def head_input_proj(self, x, w, bias, out, stream):
            validated("head_input_proj", x, w, bias, out, stream)
            rows = torch.arange(out.t.shape[0]) % x.t.shape[0]
            out.t.copy_(x.t[rows] @ w.t.t() + bias.t)

        def head_silu_add(self, a, c, out, stream):
            validated("head_silu_add", a, c, out, stream)
            out.t.copy_(F.silu(a.t + c.t))

        def layernorm_modulate(self, x, lnw, lnb, shift, scale, eps, out, stream):
            validated("layernorm_modulate", x, lnw, lnb, shift, scale, eps, out, stream)
            out.t.copy_(F.layer_norm(x.t, (x.t.shape[1],), t(lnw), t(lnb), eps) * (1 + scale.t.float())
                        + shift.t.float())

    return Fake()


@needs_module
@pytest.mark.skipif(not NO_DEVICE, reason="passes CPU pointers to the real bindings: only where no CUDA device is")
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("mode", ["fused", "split"])
@pytest.mark.parametrize("dtype", LOWP)
def test_launch_sequence_on_emulated_kernels(monkeypatch, guided, mode, dtype):
    """CudaHeadStep / head_forward's sequencing (which weights, adaLN column chunks, the folded
    final shift as a row bias, eps, CFG rows) on CPU tensors, with every view passing the real
    C++ validation; the kernels themselves are emulated here, so this proves the wiring only."""
    real = _compiled.cuda
    monkeypatch.setattr(_compiled, "cuda", _emulated_kernels(real))
    orig_view = v

    def view_with_tensor(x):
        if x is None:
            return None
        out = _View(orig_view(x))
        out.t = x
        return out

    monkeypatch.setattr(_compiled, "view", view_with_tensor)
    monkeypatch.setattr(_compiled, "cuda_stream", lambda device: 0)
    refnet, net = _head(6, 48, 10, 2, seed=11)  # out 12: the adaLN width is not a multiple of 8
    n = 9
    z = torch.randn(2 * n if guided else n, 10, generator=_g(2))
    x = torch.randn(n, 6, generator=_g(3))
    ts = rdiff.DiffusionSchedule(10).model_timesteps()
    with fluid_ops.use_backend("reference"):
        sampler = net.sampler(z, ts, dtype)
        step = head_cuda.CudaHeadStep(sampler, mode=mode)
        assert step.mode == mode and step.ada.stride(0) % 8 == 0
        xin = torch.cat([x, x]) if guided else x
        for i in (0, 7):
            got = step(x, i)
            with torch.no_grad():
                want64 = refnet.double()(xin.double(), ts[i].expand(xin.shape[0]), z.double())
            assert_lowp_close(got, want64, sampler(x, i), atol=1e-3 * (1 + want64.abs().max().item()),
                              name=f"emulated CUDA head step {i}")
        monkeypatch.setattr(head_cuda, "cuda_head_unusable", lambda *a: None)
        t = ts[3].expand(xin.shape[0])
        got = head_cuda.head_forward(net, xin, t, z, gemm_dtype=dtype, prologue=mode)
        with torch.no_grad():
            want64 = refnet.double()(xin.double(), t, z.double())
        assert_lowp_close(got, want64, sampler(x, 3), atol=1e-3 * (1 + want64.abs().max().item()),
                          name="emulated head_forward")


# ---- GPU: the kernels one by one ------------------------------------------------------------------
def _stream():
    return _compiled.cuda_stream(torch.device("cuda"))


def _g(seed):
    return torch.Generator().manual_seed(seed)


@requires_cuda
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("m,n,k", [(1, 8, 16), (37, 70, 48), (64, 64, 32), (130, 200, 96), (257, 1024, 1024),
                                   (1025, 130, 1024), (1100, 1536, 1536)])
def test_plain_gemm_matches_torch(dtype, m, n, k):
    """out = a @ w^T + bias (no prologue): the mma fragments, the tile bounds (rows / columns not
    multiples of the tile, K ending inside a stage), both tile configs; nothing written outside."""
    g = _g(m + n + k)
    a = torch.randn(m, k, generator=g).to("cuda", dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to("cuda", dtype)
    bias = torch.randn(n, generator=g).to("cuda", dtype)
    buf = torch.full((m + 2, n + 16), float("nan"), device="cuda", dtype=dtype)
    out = buf[1:m + 1, 8:n + 8]
    _call(a, w, out, bias=bias, stream=_stream())
    ref64 = a.double() @ w.double().t() + bias.double()
    ref_lowp = torch.addmm(bias, a, w.t())
    assert_lowp_close(out, ref64, ref_lowp, atol=1e-3, name=f"plain GEMM {dtype} {m}x{n}x{k}")
    assert buf[0].isnan().all() and buf[m + 1].isnan().all()
    assert buf[:, :8].isnan().all() and buf[:, n + 8:].isnan().all()
    # and not merely "close under a loose rule": a swapped fragment half is gross
    assert (out.double() - ref64).abs().max() < 0.05 * (1 + ref64.abs().max())


@requires_cuda
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("m,d", [(1, 48), (33, 48), (70, 96), (130, 1024), (1100, 256)])
def test_head_linear_chain(dtype, m, d):
    """Each prologue / epilogue in the chain the head runs:
    h = x[r % n] W_in^T + b, ada = SiLU(c + t) W_a^T + b_a,
    u = SiLU((LN(h) w + b)(1 + scale) + shift) W_1^T + b_1, h' = h + gate * (u W_2^T + b_2),
    out = (LN(h')(1 + scale)) W_f^T + rowbias."""
    g = _g(m + d)
    n_x = (m + 1) // 2 if m > 1 else 1  # CFG-style: rows past n_x repeat x's rows
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).cuda()  # noqa: E731
    x, w_in, b_in = r(n_x, 7), r(d, 7, std=0.5), r(d, std=5.0)  # an offset residual stream
    c, t = r(m, d), r(1, d)
    w_a, b_a = r(3 * d, d, std=d ** -0.5), r(3 * d, std=0.3)
    lnw, lnb = r(d) + 1, r(d, std=0.3)
    w1, b1, w2, b2 = r(d, d, std=d ** -0.5), r(d, std=0.1), r(d, d, std=d ** -0.5), r(d, std=0.1)
    wf, rb = r(5, d, std=d ** -0.5), r(m, 5)

    def torch_chain(p):
        f = torch.float64 if p == torch.float64 else torch.float32

        def lin(a, wt, b=None):
            y = (a.to(p) @ wt.to(p).t()).to(f)
            return y if b is None else y + b.to(p).to(f)

        rows = torch.arange(m, device="cuda") % n_x
        h = x.to(f)[rows] @ w_in.to(f).t() + b_in.to(f)
        ada = lin(torch.nn.functional.silu(c.to(f) + t.to(f)), w_a, b_a)
        shift, scale, gate = ada.chunk(3, 1)
        if p != torch.float64:  # the kernels read the adaLN output in the GEMM dtype
            shift, scale, gate = (z.to(p).to(f) for z in (shift, scale, gate))
        a = torch.nn.functional.layer_norm(h, (d,), lnw.to(f), lnb.to(f), 1e-6) * (1 + scale) + shift
        u = torch.nn.functional.silu(lin(a, w1, b1))
        h2 = h + gate * lin(u, w2, b2)
        out = lin(torch.nn.functional.layer_norm(h2, (d,), None, None, 1e-6) * (1 + scale), wf) + rb.to(p).to(f)
        return h, ada, u, h2, out

    s = _stream()
    h = torch.empty(m, d, device="cuda")
    _compiled.cuda.head_input_proj(v(x), v(w_in), v(b_in), v(h), s)
    h_in = h.clone()
    ada = head_cuda.adaln_buffer(m, 3 * d, dtype, "cuda")
    _call(c, w_a.to(dtype), ada, c=t, bias=b_a.to(dtype), stream=s)
    u = torch.empty(m, d, dtype=dtype, device="cuda")
    _call(h, w1.to(dtype), u, lnw=lnw, lnb=lnb, shift=ada[:, :d], scale=ada[:, d:2 * d], bias=b1.to(dtype), silu=True,
          stream=s)
    _call(u, w2.to(dtype), h, bias=b2.to(dtype), gate=ada[:, 2 * d:], stream=s)
    out = torch.empty(m, 5, dtype=dtype, device="cuda")
    _call(h, wf.to(dtype), out, scale=ada[:, d:2 * d], rbias=rb.to(dtype), stream=s)

    ref64, ref_lowp = torch_chain(torch.float64), torch_chain(dtype)
    torch.testing.assert_close(h_in.double(), ref64[0], rtol=1e-5, atol=1e-5, msg="input projection (fp32)")
    names = ("adaLN GEMM (SiLU(c + t) prologue)", "fc1 (LN-modulate prologue, SiLU epilogue)",
             "fc2 (gated residual epilogue, in place)", "final (LN prologue without affine / shift, row bias)")
    for got, want, lp, name in zip((ada, u, h, out), ref64[1:], ref_lowp[1:], names):
        assert_lowp_close(got, want, lp, atol=1e-3 * (1 + want.abs().max().item()), name=f"{name} {dtype}")


# ---- GPU: the whole head ----------------------------------------------------------------------------
def _head(cin, d, z, blocks, seed=4, std=0.15):
    refnet = _randomize(rden.DenoiserMLP(cin, d, 2 * cin, z, blocks), seed=seed, std=std)
    net = fluid_ops.nn.DenoiserMLP(cin, d, 2 * cin, z, blocks)
    net.load_state_dict(refnet.state_dict(), strict=True)
    return refnet, net


@requires_cuda
@pytest.mark.parametrize("n,cin,d,z,blocks,prologue", [
    (1, 6, 48, 10, 1, "fused"), (33, 6, 48, 10, 2, "fused"), (70, 6, 96, 10, 1, "split"), (5, 6, 48, 10, 0, "fused"),
    (0, 6, 48, 10, 1, "fused"), (1, 6, 48, 10, 0, "split"),
    (300, 16, 1024, 768, 2, "fused"), (300, 16, 1024, 768, 2, "split"),   # MAR-B width, rows off the tile
    (64, 16, 1280, 1024, 1, "fused"), (130, 16, 1536, 1280, 1, "fused"),  # MAR-L / MAR-H widths
    (1100, 16, 1024, 768, 1, "fused"),                                    # the 128-row tile
])
def test_head_forward_matches_reference(n, cin, d, z, blocks, prologue):
    refnet, net = _head(cin, d, z, blocks, std=0.15 if d < 512 else 0.03)
    net.cuda()
    g = _g(9 + n)
    x, c = torch.randn(n, cin, generator=g), torch.randn(n, z, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    with torch.no_grad():
        ref64 = refnet.double()(x.double(), t, c.double())
    for dtype in LOWP:
        got = head_cuda.head_forward(net, x.cuda(), t.cuda(), c.cuda(), gemm_dtype=dtype, prologue=prologue)
        assert got.shape == (n, 2 * cin) and got.dtype == dtype
        lowp = rden.DenoiserMLP(cin, d, 2 * cin, z, blocks).to("cuda", dtype)
        lowp.load_state_dict(refnet.state_dict())
        with torch.no_grad():
            ref_lowp = lowp(x.cuda().to(dtype), t.cuda(), c.cuda().to(dtype))
        scale = 1 + ref64.abs().max().item() if n else 1.0
        assert_lowp_close(got.cpu(), ref64, ref_lowp.cpu(), atol=1e-3 * scale, name=f"CUDA head forward {dtype}")


@requires_cuda
def test_head_forward_bad_calls():
    _, net = _head(6, 48, 10, 1)
    net.cuda()
    x, t, c = torch.randn(3, 6).cuda(), torch.zeros(3).cuda(), torch.randn(3, 10).cuda()
    with pytest.raises(RuntimeError, match="fp32"):
        head_cuda.head_forward(net, x, t, c)  # fp32 parameters, no gemm_dtype
    with pytest.raises(ValueError, match="c"):
        head_cuda.head_forward(net, x, t, c[:2], gemm_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="net's parameters"):
        head_cuda.head_forward(net.cpu(), x, t, c, gemm_dtype=torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("dtype", LOWP)
def test_sampler_picks_cuda_head_and_matches_op_path(guided, dtype):
    refnet, net = _head(6, 48, 10, 2, seed=11)
    net.cuda()
    n = 9
    z = torch.randn(2 * n if guided else n, 10, generator=_g(2))
    x = torch.randn(n, 6, generator=_g(3))
    ts = rdiff.DiffusionSchedule(10).model_timesteps("cuda")
    fused = net.sampler(z.cuda(), ts, dtype)
    assert isinstance(fused.fused, head_cuda.CudaHeadStep)
    assert not isinstance(net.sampler(z.cuda(), ts).fused, head_cuda.CudaHeadStep)  # fp32 GEMMs: not this head
    if importlib.util.find_spec("triton") is not None:
        with fluid_ops.use_backend("triton"):
            from fluid_ops.triton.denoiser import FusedHeadStep
            assert isinstance(net.sampler(z.cuda(), ts, dtype).fused, FusedHeadStep)
    with fluid_ops.use_backend("reference"):
        plain = net.sampler(z.cuda(), ts, dtype)  # the op path with the same GEMM dtype
    assert plain.fused is None
    split = head_cuda.CudaHeadStep(fused, mode="split")
    assert split.mode == "split" and fused.fused.mode == "fused"
    ref64 = refnet.double()
    xin = torch.cat([x, x]) if guided else x
    for step in (0, 7):
        with torch.no_grad():
            want64 = ref64(xin.double(), ts[step].cpu().expand(xin.shape[0]), z.double())
        with fluid_ops.use_backend("reference"):
            want = plain(x.cuda(), step)
        for mode, got in (("fused", fused(x.cuda(), step)), ("split", split(x.cuda(), step))):
            assert got.dtype == dtype and got.shape == want.shape
            assert_lowp_close(got.cpu(), want64, want.cpu(), atol=1e-3 * (1 + want64.abs().max().item()),
                              name=f"sampler step {step} ({mode})")


def _eps_net_pair():
    from tests.helpers import eps_net as _eps_net
    ref = _eps_net()
    fast = fluid_ops.nn.DenoiserMLP(ref.in_channels, ref.model_channels, ref.out_channels, ref.z_channels,
                                    ref.num_res_blocks)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast.cuda()


@requires_cuda
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("dtype", LOWP)
def test_diffusion_sample_with_cuda_head_matches_reference_loop(cfg, dtype):
    """The whole loop at temperature 0 (deterministic): ours with bf16 / fp16 GEMMs against the
    reference loop in fp32 (its error is far below either low precision), no worse than 2x the
    reference loop run under autocast in that dtype (as MAR runs it)."""
    from tests.helpers import diffusion_inputs as _inputs
    ref, fast = _eps_net_pair()
    steps = 8
    z, noise = _inputs(37, cfg, steps)
    kw = dict(num_steps=steps, temperature=0.0, cfg=cfg)
    with torch.no_grad():
        want = rdiff.diffusion_sample(ref, z, noise=noise, **kw)
        ref_cuda = _eps_net_pair()[0].cuda()
        with torch.autocast("cuda", dtype=dtype):
            want_lowp = rdiff.diffusion_sample(ref_cuda, z.cuda(), noise=noise.cuda(), **kw)
    sampler = fast.sampler(z.cuda(), rdiff.DiffusionSchedule(steps).model_timesteps("cuda"), dtype)
    assert isinstance(sampler.fused, head_cuda.CudaHeadStep)
    got = fluid_ops.diffusion_sample(fast, z.cuda(), noise=noise.cuda(), gemm_dtype=dtype, **kw)
    assert torch.isfinite(got).all() and want.abs().max() > 0.5
    scale = want.abs().max().item() + 1.0
    assert_lowp_close(got.cpu(), want, want_lowp.float().cpu(), atol=1e-3 * scale, name=f"diffusion_sample {dtype}")


@requires_cuda
def test_sampling_loop_with_cuda_head_replays_as_a_cuda_graph():
    _, fast = _eps_net_pair()
    steps, n = 6, 16
    g = _g(12)
    z = torch.randn(2 * n, fast.z_channels, generator=g).cuda()
    noise = torch.randn(steps + 1, n, fast.in_channels, generator=g).cuda()
    sched = rdiff.DiffusionSchedule(steps)
    table, ts = sched.table("cuda"), sched.model_timesteps("cuda")
    sampler = fast.sampler(z, ts, torch.bfloat16)
    assert isinstance(sampler.fused, head_cuda.CudaHeadStep)

    def loop(x):
        for i, step in enumerate(range(steps - 1, -1, -1)):
            x = fluid_ops.ddpm_step(x, sampler(x, step), noise[i + 1], table, step, temperature=0.9, cfg=3.0)
        return x

    eager = loop(noise[0].clone())
    x0 = noise[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loop(x0)
    graph.replay()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    torch.testing.assert_close(eager, fluid_ops.diffusion_sample(fast, z, num_steps=steps, cfg=3.0, noise=noise,
                                                                 temperature=0.9, gemm_dtype=torch.bfloat16),
                               rtol=0, atol=0)
