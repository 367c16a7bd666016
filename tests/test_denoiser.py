"""DenoiserMLP (docs/contracts.md §2.2): the reference against the formulas and MAR's parameter names, the
fused ops (layernorm_modulate, gated_residual) on every backend against the reference, their
gradients and torch.library contracts, bad inputs, and nn.DenoiserMLP against the reference."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fluid_ops
from fluid_ops.ops.denoiser import layernorm_modulate_into
from fluid_ops.reference import denoiser as ref
from tests.conftest import assert_lowp_close, backend_params, requires_cuda
from tests.helpers import gr_inputs as _gr_inputs, lnm_inputs as _lnm_inputs
from tests.helpers import randomize as _randomize, ref_lnm as _ref_lnm

DATA = Path(__file__).parent / "data"
MAR_B = dict(in_channels=16, model_channels=1024, out_channels=32, z_channels=768, num_res_blocks=6)


# ---- reference against docs/contracts.md §2.2 ----------------------------------------------------------------
def test_timestep_embedding_matches_formula():
    t = torch.tensor([0, 1, 37, 500, 999])
    got = ref.timestep_embedding(t, 256).double().numpy()
    i = np.arange(128)
    f = np.exp(-math.log(10000.0) * i / 128)
    args = t.double().numpy()[:, None] * f[None]
    want = np.concatenate([np.cos(args), np.sin(args)], 1)  # cos first, as MAR / DiT
    assert got.shape == (5, 256)
    np.testing.assert_allclose(got, want, atol=3e-4)  # fp32 arguments up to t * f = 999
    np.testing.assert_array_equal(got[0], np.r_[np.ones(128), np.zeros(128)])
    assert ref.timestep_embedding(torch.tensor([3.5]), 7).shape == (1, 7)  # odd dim: zero pad


def _spec_forward(sd, x, t, c, blocks):
    """docs/contracts.md §2.2 written out by hand in fp64 from a state dict."""
    sd = {k: v.double() for k, v in sd.items()}
    lin = lambda p, v: v @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    silu = lambda v: v * torch.sigmoid(v)  # noqa: E731

    def ln(v, w=None, b=None):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        out = (v - mu) / torch.sqrt(var + 1e-6)
        return out * w + b if w is not None else out

    i = torch.arange(128, dtype=torch.float64)
    args = t.double()[:, None] * torch.exp(-math.log(10000.0) * i / 128)[None]
    temb = lin("time_embed.mlp.2", silu(lin("time_embed.mlp.0", torch.cat([torch.cos(args), torch.sin(args)], 1))))
    y = temb + lin("cond_embed", c.double())
    h = lin("input_proj", x.double())
    for b in range(blocks):
        p = f"res_blocks.{b}."
        shift, scale, gate = lin(p + "adaLN_modulation.1", silu(y)).chunk(3, -1)
        a = ln(h, sd[p + "in_ln.weight"], sd[p + "in_ln.bias"]) * (1 + scale) + shift
        h = h + gate * lin(p + "mlp.2", silu(lin(p + "mlp.0", a)))
    shift, scale = lin("final_layer.adaLN_modulation.1", silu(y)).chunk(2, -1)
    return lin("final_layer.linear", ln(h) * (1 + scale) + shift)


def test_reference_forward_matches_spec_by_hand():
    net = _randomize(ref.DenoiserMLP(5, 24, 10, 7, 3), std=0.2).double()
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(9, 5, generator=g), torch.randn(9, 7, generator=g)
    t = torch.randint(0, 1000, (9,), generator=g)
    want = _spec_forward(net.state_dict(), x, t, c, 3)
    got = net(x.double(), t, c.double())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # fp32 sinusoid inside


def _tsv_shapes():
    out = {}
    for line in (DATA / "mar_b_diffloss_state_dict.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _ = line.split("\t")
        out[name.removeprefix("diffloss.net.")] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


@pytest.mark.parametrize("cls", [ref.DenoiserMLP, fluid_ops.nn.DenoiserMLP])
def test_state_dict_names_and_shapes_are_mar_b(cls):
    with torch.device("meta"):
        net = cls(**MAR_B)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    want = _tsv_shapes()
    assert len(want) == 60
    assert got == want
    for k, v in MAR_B.items():
        assert getattr(net, k) == v


def test_mar_init_starts_from_identity():
    net = ref.DenoiserMLP(4, 32, 8, 6, 2)
    for blk in net.res_blocks:
        assert not blk.adaLN_modulation[1].weight.any() and not blk.adaLN_modulation[1].bias.any()
    fl = net.final_layer
    assert not fl.linear.weight.any() and not fl.adaLN_modulation[1].weight.any()
    assert net.input_proj.weight.any() and net.input_proj.bias.abs().sum() == 0  # xavier, zero bias
    assert abs(net.time_embed.mlp[0].weight.std().item() - 0.02) < 0.002
    out = net(torch.randn(3, 4), torch.tensor([1, 2, 3]), torch.randn(3, 6))
    assert out.shape == (3, 8) and not out.any()


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="model_channels must be a positive int"):
        ref.DenoiserMLP(4, 0, 8, 6, 2)
    with pytest.raises(ValueError, match="num_res_blocks must be an int >= 0"):
        fluid_ops.nn.DenoiserMLP(4, 8, 8, 6, -1)


# ---- fused ops against the reference ------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_layernorm_modulate_half_affine(backend, dtype, which):
    """Only one of weight / bias given (a branch of its own in the kernels), fp32 and mixed."""
    x, shift, scale, w, b = _lnm_inputs(33, 80, "chunk", affine=True, seed=3)
    w, b = (w, None) if which == "weight" else (None, b)
    with fluid_ops.use_backend(backend):
        got = fluid_ops.layernorm_modulate(x, shift.to(dtype), scale.to(dtype), weight=w, bias=b)
    want = _ref_lnm(x.double(), shift.to(dtype).double(), scale.to(dtype).double(),
                    None if w is None else w.double(), None if b is None else b.double())
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("r,d", [(1, 1), (3, 16), (257, 80), (3, 1024), (257, 1024)])
@pytest.mark.parametrize("layout", ["contiguous", "chunk", "broadcast"])
@pytest.mark.parametrize("affine", [False, True])
def test_layernorm_modulate_fp32(backend, r, d, layout, affine):
    x, shift, scale, w, b = _lnm_inputs(r, d, layout, affine=affine)
    want = _ref_lnm(x.double(), shift.double(), scale.double(), None if w is None else w.double(),
                    None if b is None else b.double())
    with fluid_ops.use_backend(backend):
        got = fluid_ops.layernorm_modulate(x, shift, scale, weight=w, bias=b)
    assert got.dtype == torch.float32 and got.shape == (r, d)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    # the workspace variant writes the same values into a preallocated (row-strided) buffer
    buf = torch.full((r, d + 5), float("nan"))
    with fluid_ops.use_backend(backend):
        ret = layernorm_modulate_into(x, shift, scale, buf[:, 2:d + 2], weight=w, bias=b)
    torch.testing.assert_close(ret, got, rtol=0, atol=0)
    assert buf[:, :2].isnan().all() and buf[:, d + 2:].isnan().all()  # nothing written outside


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("layout", ["contiguous", "chunk"])
def test_layernorm_modulate_low_precision(backend, dtype, out_dtype, layout):
    x, shift, scale, w, b = _lnm_inputs(67, 80, layout, dtype=dtype)
    od = out_dtype or dtype
    ref64 = _ref_lnm(x.double(), shift.double(), scale.double(), w.double(), b.double())
    ref_lowp = _ref_lnm(x, shift, scale, w, b, out_dtype=od) if od != torch.float32 else \
        _ref_lnm(x, shift, scale, w, b, out_dtype=torch.bfloat16)
    with fluid_ops.use_backend(backend):
        got = fluid_ops.layernorm_modulate(x, shift, scale, weight=w, bias=b, out_dtype=out_dtype)
    assert got.dtype == od
    assert_lowp_close(got, ref64, ref_lowp, name=f"layernorm_modulate {dtype}->{od}")


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("r,d", [(1, 1), (3, 16), (257, 80), (257, 1024)])
@pytest.mark.parametrize("layout", ["contiguous", "chunk", "broadcast"])
def test_gated_residual_fp32_and_in_place(backend, r, d, layout):
    h, gate, y = _gr_inputs(r, d, layout)
    want = h.double() + gate.double() * y.double()
    with fluid_ops.use_backend(backend):
        got = fluid_ops.gated_residual(h, gate, y)
        h2 = h.clone()
        ret = fluid_ops.gated_residual_(h2, gate, y)
    assert ret is h2
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2, got, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("dtype,gdtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16), (torch.float16, torch.float32)])
def test_gated_residual_low_precision(backend, dtype, gdtype):
    h, gate, y = _gr_inputs(33, 80, "chunk", dtype, gdtype)
    ref64 = ref.gated_residual(h.double(), gate.double(), y.double())
    ref_lowp = ref.gated_residual(h, gate, y) if dtype != torch.float32 else ref.gated_residual(h.bfloat16(), gate, y)
    with fluid_ops.use_backend(backend):
        got = fluid_ops.gated_residual(h, gate, y)
    assert got.dtype == dtype
    assert_lowp_close(got, ref64, ref_lowp, name="gated_residual")


def test_empty_rows_return_empty():
    x = torch.empty(0, 16)
    assert fluid_ops.layernorm_modulate(x, torch.empty(0, 16), torch.empty(16)).shape == (0, 16)
    assert fluid_ops.gated_residual(x, torch.empty(16), torch.empty(0, 16)).shape == (0, 16)


# ---- gradients and torch.library contracts -----------------------------------------------------
def test_gradcheck_fp64_reference_backend():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ada = torch.randn(4, 18, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    with fluid_ops.use_backend("reference"):
        assert torch.autograd.gradcheck(
            lambda x, ada, w, b: fluid_ops.layernorm_modulate(x, ada[:, :6], ada[:, 6:12], weight=w, bias=b),
            (x, ada, w, b))
        assert torch.autograd.gradcheck(lambda x, ada: fluid_ops.layernorm_modulate(x, ada[:1, :6], ada[0, 6:12]),
                                        (x, ada))
        assert torch.autograd.gradcheck(lambda h, ada, y: fluid_ops.gated_residual(h, ada[:, 12:], y), (x, ada, y))


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("layout", ["chunk", "broadcast"])
def test_backward_matches_autograd_through_reference(backend, affine, layout):
    x, shift, scale, w, b = _lnm_inputs(37, 80, layout, affine=affine, seed=5)
    _, gate, y = _gr_inputs(37, 80, layout, seed=6)
    leaves = [t.detach().clone().requires_grad_() for t in (x, shift, scale, gate, y)]
    params = [t.detach().clone().requires_grad_() for t in (w, b)] if affine else [None, None]
    gout = torch.randn(37, 80, generator=torch.Generator().manual_seed(7))

    def run(lnm, gr, xs, sh, sc, gt, yy, ww, bb):
        a = lnm(xs, sh, sc, ww, bb)
        return gr(a, gt, yy * a)

    with fluid_ops.use_backend(backend):
        out = run(lambda *a: fluid_ops.layernorm_modulate(*a[:3], weight=a[3], bias=a[4]), fluid_ops.gated_residual,
                  *leaves, *params)
    inputs = leaves + [p for p in params if p is not None]
    got = torch.autograd.grad(out, inputs, gout)
    rl = [t.detach().double().requires_grad_() for t in inputs]
    rw, rb = (rl[5], rl[6]) if affine else (None, None)
    outr = run(lambda xs, sh, sc, ww, bb: _ref_lnm(xs, sh, sc, ww, bb), ref.gated_residual, *rl[:5], rw, rb)
    want = torch.autograd.grad(outr, rl, gout.double())
    for i, (gg, ww) in enumerate(zip(got, want)):
        assert gg.shape == inputs[i].shape
        torch.testing.assert_close(gg.double(), ww, rtol=1e-4, atol=1e-4, msg=f"grad of input {i}")


def test_opcheck_custom_ops():
    x, shift, scale, w, b = _lnm_inputs(5, 16, "chunk", seed=2)
    for args in [(x, shift, scale, w, b, 1e-6, torch.float32), (x, shift, scale, None, None, 1e-5, torch.bfloat16)]:
        rg = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
              for a in args]
        torch.library.opcheck(torch.ops.fluid_ops.layernorm_modulate.default, tuple(rg))
    g = torch.randn(5, 16)
    torch.library.opcheck(torch.ops.fluid_ops.layernorm_modulate_backward.default, (x, scale, g, w, b, 1e-6))
    h, gate, y = _gr_inputs(5, 16, "chunk")
    torch.library.opcheck(torch.ops.fluid_ops.gated_residual.default,
                          (h.requires_grad_(), gate.detach().requires_grad_(), y.requires_grad_()))
    torch.library.opcheck(torch.ops.fluid_ops.gated_residual_backward.default, (g, gate.detach(), y.detach()))
    torch.library.opcheck(torch.ops.fluid_ops.gated_residual_.default, (h.detach().clone(), gate.detach(), y.detach()))
    torch.library.opcheck(torch.ops.fluid_ops.layernorm_modulate_into.default,
                          (x, shift, scale, w, b, 1e-6, torch.empty(5, 16, dtype=torch.bfloat16)))


def test_layernorm_modulate_into_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"out must have shape \(4, 8\)"):
        layernorm_modulate_into(x, x, x, torch.empty(4, 9))
    with pytest.raises(ValueError, match="out must have unit column stride"):
        layernorm_modulate_into(x, x, x, torch.empty(8, 4).t())
    with pytest.raises(RuntimeError, match="without autograd"):
        layernorm_modulate_into(x.requires_grad_(), x, x, torch.empty(4, 8))


# ---- bad inputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(4)), "x must have 2 dims"),
    (dict(x=torch.randn(4, 8).long()), "x must have dtype"),
    (dict(shift=torch.randn(3, 8)), r"shift must have shape \(4, 8\), \(1, 8\) or \(8,\)"),
    (dict(scale=torch.randn(4, 7)), "scale must have shape"),
    (dict(scale=torch.randn(4, 8).half()), "scale must have dtype"),
    (dict(weight=torch.randn(7)), r"weight must have shape \(8\)"),
    (dict(bias=torch.randn(8, 1)), "bias must have 1 dims"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=float("nan")), "eps must be finite"),
    (dict(out_dtype=torch.int32), "out_dtype must be None or one of"),
    (dict(shift=torch.randn(4, 8, device="meta")), "shift is on meta but x is on cpu"),
])
def test_layernorm_modulate_bad_inputs(bad, match):
    args = dict(x=torch.randn(4, 8), shift=torch.randn(4, 8), scale=torch.randn(4, 8), weight=None, bias=None,
                eps=1e-6, out_dtype=None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fluid_ops.layernorm_modulate(args.pop("x"), args.pop("shift"), args.pop("scale"), **args)


@pytest.mark.parametrize("fn", [fluid_ops.gated_residual, fluid_ops.gated_residual_])
@pytest.mark.parametrize("bad,match", [
    (dict(h=torch.randn(4, 8, 1)), "h must have 2 dims"),
    (dict(gate=torch.randn(2, 8)), "gate must have shape"),
    (dict(y=torch.randn(4, 9)), r"y must have shape \(4, 8\)"),
    (dict(y=torch.randn(4, 8).int()), "y must have dtype"),
    (dict(h="x"), "h must be a torch.Tensor"),
])
def test_gated_residual_bad_inputs(fn, bad, match):
    args = dict(h=torch.randn(4, 8), gate=torch.randn(4, 8), y=torch.randn(4, 8))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fn(args["h"], args["gate"], args["y"])


def test_gated_residual_inplace_refuses_unsafe_targets():
    with pytest.raises(ValueError, match="rows must not overlap"):
        fluid_ops.gated_residual_(torch.randn(1, 8).expand(4, 8), torch.randn(8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="unit stride along its last dim"):
        fluid_ops.gated_residual_(torch.randn(8, 4).t(), torch.randn(8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="no autograd"):
        fluid_ops.gated_residual_(torch.randn(4, 8, requires_grad=True), torch.randn(8), torch.randn(4, 8))


def test_denoiser_forward_bad_inputs():
    net = fluid_ops.nn.DenoiserMLP(4, 16, 8, 6, 1)
    x, t, c = torch.randn(3, 4), torch.tensor([1, 2, 3]), torch.randn(3, 6)
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 4\)"):
        net(torch.randn(3, 5), t, c)
    with pytest.raises(ValueError, match=r"t must have shape \(3\)"):
        net(x, torch.tensor([1, 2]), c)
    with pytest.raises(ValueError, match=r"c must have shape \(3, 6\)"):
        net(x, t, torch.randn(3, 7))


# ---- nn.DenoiserMLP against the reference -------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_nn_denoiser_loads_reference_and_matches(backend):
    refnet = _randomize(ref.DenoiserMLP(6, 48, 12, 10, 3), seed=4, std=0.15)
    net = fluid_ops.nn.DenoiserMLP(6, 48, 12, 10, 3)
    net.load_state_dict(refnet.state_dict(), strict=True)
    g = torch.Generator().manual_seed(8)
    x, c = torch.randn(33, 6, generator=g), torch.randn(33, 10, generator=g)
    t = torch.randint(0, 1000, (33,), generator=g)
    with fluid_ops.use_backend(backend):
        out = net(x, t, c)
        want = refnet(x, t, c)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        gout = torch.randn(out.shape, generator=g)
        got = torch.autograd.grad(out, list(net.parameters()), gout)
    wants = torch.autograd.grad(want, list(refnet.parameters()), gout)
    for (name, _), a, b in zip(net.named_parameters(), got, wants):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    # and the other way: nn's state dict loads into the reference
    ref.DenoiserMLP(6, 48, 12, 10, 3).load_state_dict(net.state_dict(), strict=True)


def test_sampler_fp32_matches_forward_and_caches_weights():
    refnet = _randomize(ref.DenoiserMLP(6, 32, 12, 10, 2), seed=9, std=0.2)
    net = fluid_ops.nn.DenoiserMLP(6, 32, 12, 10, 2)
    net.load_state_dict(refnet.state_dict())
    z, x = torch.randn(8, 10), torch.randn(4, 6)
    ts = torch.tensor([0, 10, 500, 999])
    s = net.sampler(z, ts)
    for step in range(4):
        want = refnet(torch.cat([x, x]), ts[step].expand(8), z)
        torch.testing.assert_close(s(x, step), want, rtol=1e-5, atol=1e-5)  # [x; x] against 2N rows of z
    w1 = net._sampling_weights(torch.bfloat16, torch.device("cpu"))
    assert net._sampling_weights(torch.bfloat16, torch.device("cpu")) is w1  # cached
    with torch.no_grad():
        net.res_blocks[0].adaLN_modulation[1].weight.add_(1.0)  # a parameter change invalidates
    w2 = net._sampling_weights(torch.bfloat16, torch.device("cpu"))
    assert w2 is not w1 and w2.ada_wt.dtype == torch.bfloat16
    torch.testing.assert_close(w2.ada_wt.t()[:32].float(), net.res_blocks[0].adaLN_modulation[1].weight.detach()[:32],
                               rtol=1e-2, atol=1e-2)
    lowp = net.sampler(z, ts, torch.bfloat16)(x, 2)
    assert lowp.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="gemm_dtype must be None, 'auto', float32, bfloat16 or float16"):
        net.sampler(z, ts, torch.int8)
    # "auto": bf16 only where the CPU has native bf16 dot products (else emulated and slower)
    from fluid_ops.nn.denoiser import _cpu_has_native_bf16, auto_gemm_dtype
    assert auto_gemm_dtype("cpu") == (torch.bfloat16 if _cpu_has_native_bf16() else torch.float32)
    torch.testing.assert_close(net.sampler(z, ts, "auto")(x, 1), net.sampler(z, ts, auto_gemm_dtype("cpu"))(x, 1),
                               rtol=0, atol=0)


# ---- CUDA (run on a GPU machine; skipped here with the reason) ------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "chunk", "broadcast"])
def test_cuda_layernorm_modulate_and_gated_residual(dtype, layout):
    x, shift, scale, w, b = (None if t is None else t.cuda() for t in _lnm_inputs(257, 1024, layout, dtype=dtype))
    ref64 = _ref_lnm(x.double(), shift.double(), scale.double(), w.double(), b.double())
    with fluid_ops.use_backend("cuda"):
        got = fluid_ops.layernorm_modulate(x, shift, scale, weight=w, bias=b)
        got_bf = fluid_ops.layernorm_modulate(x, shift, scale, weight=w, bias=b, out_dtype=torch.bfloat16)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref64, rtol=2e-5, atol=2e-5)
    else:
        assert_lowp_close(got, ref64, _ref_lnm(x, shift, scale, w, b), name="cuda layernorm_modulate")
    assert_lowp_close(got_bf, ref64, _ref_lnm(x, shift, scale, w, b, out_dtype=torch.bfloat16), name="bf16 out")
    h, gate, y = (t.cuda() for t in _gr_inputs(257, 1024, layout, dtype))
    with fluid_ops.use_backend(None):  # the CUDA kernel when built in, else torch on the device
        got = fluid_ops.gated_residual(h, gate, y)
        h2 = h.clone()
        fluid_ops.gated_residual_(h2, gate, y)
    ref64 = ref.gated_residual(h.double(), gate.double(), y.double())
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref64, rtol=1e-6, atol=1e-6)
    else:
        assert_lowp_close(got, ref64, ref.gated_residual(h, gate, y), name="cuda gated_residual")
    torch.testing.assert_close(h2, got, rtol=0, atol=0)


@requires_cuda
def test_cuda_nn_denoiser_forward_backward():
    refnet = _randomize(ref.DenoiserMLP(16, 256, 32, 64, 3), seed=4, std=0.05)
    net = fluid_ops.nn.DenoiserMLP(16, 256, 32, 64, 3)
    net.load_state_dict(refnet.state_dict(), strict=True)
    net.cuda()
    g = torch.Generator().manual_seed(8)
    x, c = torch.randn(300, 16, generator=g), torch.randn(300, 64, generator=g)
    t = torch.randint(0, 1000, (300,), generator=g)
    out = net(x.cuda(), t.cuda(), c.cuda())
    want = refnet(x, t, c)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-3, atol=1e-3)  # TF32-free fp32 GEMMs differ in order
    gout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, list(net.parameters()), gout.cuda())
    wants = torch.autograd.grad(want, list(refnet.parameters()), gout)
    for (name, _), a, b in zip(net.named_parameters(), got, wants):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-3, atol=2e-3, msg=name)


def test_cpu_head_step_fused_linears_match_the_eager_step():
    """The cpu backend's head step with bf16 GEMMs (oneDNN fused linears: bias and SiLU in the
    epilogue) against the eager step (addmm + in-place SiLU): the same math, bf16 rounding apart;
    fp32 GEMMs take the eager step exactly."""
    import importlib
    from fluid_ops.nn import DenoiserMLP
    head = importlib.import_module("fluid_ops.ops.head")
    torch.manual_seed(0)
    net = DenoiserMLP(16, 64, 32, 24, 2).eval()
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn_like(p))
    z, x = torch.randn(6, 24), torch.randn(6, 16)
    ts = torch.tensor([999, 500, 0])
    for gd in (torch.bfloat16, torch.float32):
        s = net.sampler(z, ts, gd)
        fused, eager = head.CpuHeadStep(s), head.EagerHeadStep(s)
        assert (fused.lp is not None) == (gd == torch.bfloat16 and head._linear_pointwise() is not None)
        for step in range(3):
            a, b = fused(x, step).float(), eager(x, step).float()
            if gd == torch.float32:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=0.05 * b.abs().max().item())
