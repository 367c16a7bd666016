"""attention / attention_kvcache: the reference against docs/contracts.md §2.1 written naively, every backend
against the reference (awkward shapes, masks, causal, dtypes, strided views), gradients,
torch.library contracts, a property test, bad inputs and the KV cache."""
import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fluid_ops
from fluid_ops import _compiled
from tests.conftest import assert_lowp_close, backend_params
from tests.helpers import attention_inputs as _inputs, naive_attention as _naive
from tests.helpers import naive_attention_autograd_lowp as _naive_autograd_lowp
from tests.helpers import grads_on, ref_grads

ref = importlib.import_module("fluid_ops.reference.attention")
ops_attn = importlib.import_module("fluid_ops.ops.attention")

BACKENDS = backend_params("reference", "cpu")


def _run(backend, *args, **kwargs):
    with fluid_ops.use_backend(backend):
        return fluid_ops.attention(*args, **kwargs)


# ---- the reference against the contract formula (docs/contracts.md) ------------------------------------------------
@pytest.mark.parametrize("b,nq,nk,h,d", [(2, 5, 5, 2, 32), (1, 7, 3, 1, 64), (2, 3, 9, 2, 80)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_matches_spec_formula(b, nq, nk, h, d, causal, masked):
    q, k, v, mask = _inputs(b, nq, nk, h, d, dtype=torch.float64, masked=masked, full_mask_batch=1)
    want = _naive(q, k, v, mask, causal, scale=0.3)
    got = ref.attention(q, k, v, key_padding_mask=mask, causal=causal, softmax_scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(got).all()


def test_reference_causal_is_bottom_right():
    # one query over 5 keys attends all of them (decode step); 5 queries over 3 keys: the first
    # two see nothing and return 0
    q, k, v, _ = _inputs(1, 1, 5, 1, 32, dtype=torch.float64)
    torch.testing.assert_close(ref.attention(q, k, v, causal=True), ref.attention(q, k, v))
    q, k, v, _ = _inputs(1, 5, 3, 1, 32, dtype=torch.float64)
    o = ref.attention(q, k, v, causal=True)
    assert (o[:, :2] == 0).all() and (o[:, 2:].abs().sum(-1) > 0).all()


# ---- every backend against the reference -----------------------------------------------------
SHAPES = [  # (b, nq, nk, h, d)
    (1, 1, 1, 1, 64),
    (2, 17, 17, 3, 32),
    (2, 65, 65, 2, 80),
    (1, 257, 257, 1, 96),
    (2, 33, 7, 2, 128),   # cross-attention, Nq > Nk
    (2, 7, 33, 2, 64),    # Nq < Nk
    (3, 1, 130, 2, 64),   # decode-like
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,nq,nk,h,d", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_backend_matches_reference_fp32(backend, b, nq, nk, h, d, causal, masked):
    q, k, v, mask = _inputs(b, nq, nk, h, d, masked=masked, full_mask_batch=1)
    want = ref.attention(q.double(), k.double(), v.double(), key_padding_mask=mask, causal=causal).float()
    got = _run(backend, q, k, v, key_padding_mask=mask, causal=causal)
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


# avx2_w16: the AVX-512 kernels' 16-lane tiling run on AVX2 registers (checks that geometry here);
# avx512bf16: the AVX-512 kernels plus the native-bf16 forward and backward for bf16 inputs
_ISA_CODES = {"portable": 1, "avx2": 2, "avx512": 3, "avx2_w16": 4, "avx512bf16": 5}
# the CPU flags (as /proc/cpuinfo spells them) each compiled path needs
_ISA_FLAGS = {"portable": (), "avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512dq"),
              "avx2_w16": ("avx2", "fma"), "avx512bf16": ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16")}


def _isa_skip_reason(name):
    have = _compiled.cpu.attention_fwd_isas() if _compiled.cpu is not None else []
    if name in have:
        return None
    missing = [f for f in _ISA_FLAGS[name] if f not in fluid_ops.backend.cpu_flags()]
    if missing:
        return f"the {name} attention path needs CPU flag(s) {', '.join(missing)}, which this CPU lacks"
    return f"the {name} attention path is not in this build"


def _isa_params(names=tuple(_ISA_CODES)):
    return [pytest.param(_ISA_CODES[name], id=name,
                         marks=pytest.mark.skipif(_isa_skip_reason(name) is not None, reason=str(_isa_skip_reason(name))))
            for name in names]


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
@pytest.mark.parametrize("impl", _isa_params())
@pytest.mark.parametrize("b,nq,nk,h,d", SHAPES[1:] + [(2, 300, 129, 1, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_paths_with_lse(impl, b, nq, nk, h, d, causal):
    """Every compiled forward path this CPU has (portable, AVX2, AVX-512), o and lse."""
    q, k, v, mask = _inputs(b, nq, nk, h, d, masked=True, full_mask_batch=0)
    want_o, want_lse = ref.attention_with_lse(q.double(), k.double(), v.double(), key_padding_mask=mask, causal=causal)
    o, lse = ops_attn._cpu_forward(q, k, v, mask, None, causal, d ** -0.5, impl)
    torch.testing.assert_close(o, want_o.float(), rtol=1e-5, atol=2e-6)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin], want_lse[fin].float(), rtol=1e-5, atol=1e-5)


def _assert_cpu_backward(do, q, k, v, o, lse, mask, causal, impl, want):
    """The compiled backward path `impl` (outputs pre-filled with NaN, so every element must be
    written) against `want` = (dq, dk, dv) from the fp64 formula."""
    d = q.shape[-1]
    got = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    vw = _compiled.view
    _compiled.cpu.attention_bwd(vw(do), vw(q), vw(k), vw(v), vw(o), vw(lse), vw(mask), *[vw(t) for t in got],
                                causal, d ** -0.5, 2, impl)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5, msg=f"d{name}")


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
@pytest.mark.parametrize("impl", _isa_params())
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_paths_skip_whole_masked_key_blocks(impl, causal):
    """Masks that empty whole key blocks (the kernels skip them): a padded tail, a hole in the
    middle, a single attendable key far out; forward and backward."""
    b, nq, nk, h, d = 3, 70, 400, 1, 64
    q, k, v, _ = _inputs(b, nq, nk, h, d, seed=7)
    mask = torch.zeros(b, nk, dtype=torch.bool)
    mask[0, :100] = True                        # padded tail: blocks 1..3 empty
    mask[1, :128] = True
    mask[1, 256:] = True                        # hole: block 1 empty
    mask[2, 383] = True                         # one key, in the last block
    want_o, want_lse = ref.attention_with_lse(q.double(), k.double(), v.double(), key_padding_mask=mask, causal=causal)
    o, lse = ops_attn._cpu_forward(q, k, v, mask, None, causal, d ** -0.5, impl)
    torch.testing.assert_close(o, want_o.float(), rtol=1e-5, atol=2e-6)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    want = ref.attention_backward(do.double(), q.double(), k.double(), v.double(), o.double(), lse.double(),
                                  key_padding_mask=mask, causal=causal)
    _assert_cpu_backward(do, q, k, v, o, lse, mask, causal, impl, want)


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
@pytest.mark.parametrize("impl", _isa_params())
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_paths_seqlens_k(impl, causal):
    """Per-batch key lengths (the KV-cache kernel argument): keys past the length are never read."""
    b, nq, nk, h, d = 4, 5, 300, 2, 80
    q, k, v, _ = _inputs(b, nq, nk, h, d, seed=8)
    lens = torch.tensor([0, 3, 129, 300], dtype=torch.int64)
    for bi, n in enumerate(lens.tolist()):  # poison everything past the valid length
        k[bi, n:] = float("nan")
        v[bi, n:] = float("nan")
    o, lse = ops_attn._cpu_forward(q, k, v, None, lens, causal, d ** -0.5, impl)
    for bi, n in enumerate(lens.tolist()):
        want = _naive(q[bi:bi + 1], k[bi:bi + 1, :n], v[bi:bi + 1, :n], causal=causal)
        torch.testing.assert_close(o[bi:bi + 1], want.float(), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,nq,nk,h,d", [(2, 65, 65, 2, 64), (2, 33, 7, 2, 80), (1, 129, 257, 2, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_backend_lowp_flash_rule(backend, dtype, b, nq, nk, h, d, causal):
    q, k, v, mask = _inputs(b, nq, nk, h, d, dtype=dtype, masked=True)
    ref64 = _naive(q, k, v, mask, causal)
    ref_lowp = _naive(q, k, v, mask, causal, dtype=dtype)  # the formula run in the low precision
    got = _run(backend, q, k, v, key_padding_mask=mask, causal=causal)
    assert got.dtype == dtype
    assert_lowp_close(got, ref64, ref_lowp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_of_fused_qkv(backend):
    b, n, h, d = 2, 19, 3, 64
    qkv = torch.randn(b, n, 3, h, d)
    q, k, v = qkv.unbind(2)  # views, strides (n*3*h*d, 3*h*d, d, 1)
    assert not q.is_contiguous()
    want = ref.attention(q.contiguous().double(), k.contiguous().double(), v.contiguous().double(), causal=True)
    torch.testing.assert_close(_run(backend, q, k, v, causal=True), want.float(), rtol=1e-5, atol=2e-6)
    # a view without unit stride along D is copied, not misread
    qt = torch.randn(b, n, d, h).transpose(2, 3)
    torch.testing.assert_close(_run(backend, qt, k, v), ref.attention(qt.contiguous(), k, v), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_with_zero_grad(backend):
    # batch 1: mask all False; causal with Nq > Nk: the first Nq - Nk rows see nothing
    q, k, v, mask = _inputs(2, 9, 4, 2, 32, masked=True, full_mask_batch=1)
    mask[0] = True
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    o = _run(backend, q, k, v, key_padding_mask=mask, causal=True)
    assert torch.isfinite(o).all()
    assert (o[1] == 0).all() and (o[0, :5] == 0).all() and (o[0, 5:].abs().sum(-1) > 0).all()
    with fluid_ops.use_backend(backend):
        gq, gk, gv = torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    for g in (gq, gk, gv):
        assert torch.isfinite(g).all()
    assert (gq[1] == 0).all() and (gk[1] == 0).all() and (gv[1] == 0).all()
    assert (gq[0, :5] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    for shape_q, shape_k in [((0, 5, 2, 32), (0, 5, 2, 32)), ((2, 0, 2, 32), (2, 5, 2, 32))]:
        q, k = torch.randn(shape_q), torch.randn(shape_k)
        o = _run(backend, q, k, k.clone())
        assert o.shape == shape_q
    # no keys at all: every row fully masked -> zeros, and zero gradients
    q = torch.randn(2, 3, 2, 32, requires_grad=True)
    k = torch.randn(2, 0, 2, 32, requires_grad=True)
    o = _run(backend, q, k, k)
    assert o.shape == q.shape and (o == 0).all()
    (gq,) = torch.autograd.grad(o.sum(), (q,))
    assert (gq == 0).all()


# ---- gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,masked,nq,nk", [(False, False, 3, 3), (True, True, 4, 3), (False, True, 2, 4)])
def test_gradcheck_reference_fp64(causal, masked, nq, nk):
    q, k, v, mask = _inputs(2, nq, nk, 1, 32, dtype=torch.float64, masked=masked, full_mask_batch=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with fluid_ops.use_backend("reference"):
        torch.autograd.gradcheck(lambda a, b, c: fluid_ops.attention(a, b, c, key_padding_mask=mask, causal=causal),
                                 (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,nq,nk,h,d", [(2, 17, 17, 2, 64), (2, 33, 7, 1, 80), (1, 5, 70, 2, 128), (2, 65, 65, 1, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_matches_autograd_through_reference(backend, b, nq, nk, h, d, causal):
    q, k, v, mask = _inputs(b, nq, nk, h, d, masked=True, full_mask_batch=1, seed=3)
    do = torch.randn(b, nq, h, d, generator=torch.Generator().manual_seed(9))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(ref.attention(q64, k64, v64, key_padding_mask=mask, causal=causal), (q64, k64, v64),
                               do.double())
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    with fluid_ops.use_backend(backend):
        out = fluid_ops.attention(qs, ks, vs, key_padding_mask=mask, causal=causal)
        got = torch.autograd.grad(out, (qs, ks, vs), do)
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_lowp(backend, dtype):
    q, k, v, mask = _inputs(2, 33, 40, 2, 64, dtype=dtype, masked=True)
    do = torch.randn(q.shape).to(dtype)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(ref.attention(q64, k64, v64, key_padding_mask=mask, causal=True), (q64, k64, v64),
                               do.double())
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    lowp = torch.autograd.grad(_naive_autograd_lowp(ql, kl, vl, mask), (ql, kl, vl), do)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    with fluid_ops.use_backend(backend):
        got = torch.autograd.grad(fluid_ops.attention(qs, ks, vs, key_padding_mask=mask, causal=True), (qs, ks, vs), do)
    for name, g, w, lo in zip("qkv", got, want, lowp):
        assert g.dtype == dtype
        assert_lowp_close(g, w, lo, atol=1e-3, name=f"d{name}")


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
@pytest.mark.parametrize("impl", _isa_params())
@pytest.mark.parametrize("b,nq,nk,h,d", [(2, 17, 17, 2, 64), (2, 100, 33, 1, 80), (1, 5, 300, 2, 128),
                                         (2, 65, 140, 1, 32), (1, 129, 129, 1, 96)])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_backward_paths(impl, b, nq, nk, h, d, causal):
    """Every compiled backward path this CPU has, against the fp64 formula from the saved lse."""
    q, k, v, mask = _inputs(b, nq, nk, h, d, masked=True, full_mask_batch=1, seed=5)
    do = torch.randn(b, nq, h, d, generator=torch.Generator().manual_seed(2))
    o, lse = ref.attention_with_lse(q, k, v, key_padding_mask=mask, causal=causal)
    want = ref.attention_backward(do.double(), q.double(), k.double(), v.double(), o.double(), lse.double(),
                                  key_padding_mask=mask, causal=causal)
    _assert_cpu_backward(do, q, k, v, o, lse, mask, causal, impl, want)


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
def test_cpu_backward_is_deterministic():
    q, k, v, mask = _inputs(2, 40, 50, 2, 64, masked=True)
    do = torch.randn_like(q)
    outs = []
    for _ in range(2):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        with fluid_ops.use_backend("cpu"):
            outs.append(torch.autograd.grad(fluid_ops.attention(qs, ks, vs, key_padding_mask=mask), (qs, ks, vs), do))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---- torch.library contracts -----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v, mask = _inputs(2, 9, 6, 2, 32, masked=True)
    with fluid_ops.use_backend(backend):
        for m, causal in ((None, False), (mask, True)):
            torch.library.opcheck(torch.ops.fluid_ops.attention_fwd.default, (q, k, v, m, causal, 0.2))
            o, lse = torch.ops.fluid_ops.attention_fwd(q, k, v, m, causal, 0.2)
            torch.library.opcheck(torch.ops.fluid_ops.attention_bwd.default,
                                  (torch.randn_like(o), q, k, v, o, lse, m, causal, 0.2))
        kc, vc = torch.randn(2, 12, 2, 32), torch.randn(2, 12, 2, 32)
        torch.library.opcheck(torch.ops.fluid_ops.attention_kvcache.default,
                              (q[:, :3], kc, vc, k[:, :3], v[:, :3], torch.tensor([2, 5]), True, 0.2))


# ---- property test ---------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), nq=st.integers(1, 40), nk=st.integers(1, 40), h=st.integers(1, 2),
       d=st.sampled_from([32, 64, 80, 96, 128]), causal=st.booleans(), masked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_cpu_matches_reference(b, nq, nk, h, d, causal, masked, seed):
    backend = "cpu" if fluid_ops.backends()["cpu"]["available"] else "reference"
    q, k, v, mask = _inputs(b, nq, nk, h, d, masked=masked, seed=seed)
    want = ref.attention(q.double(), k.double(), v.double(), key_padding_mask=mask, causal=causal)
    got = _run(backend, q, k, v, key_padding_mask=mask, causal=causal)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=2e-6)
    # rows with no attendable key are exactly 0
    allowed = ref.allowed_mask(nq, nk, key_padding_mask=mask, causal=causal, batch=b)
    dead = ~allowed.any(-1).squeeze(1)  # (B, Nq)
    assert (got[dead] == 0).all()


# ---- bad inputs ------------------------------------------------------------------------------
def _bad_cases():
    q, k, v = torch.randn(2, 5, 2, 32), torch.randn(2, 6, 2, 32), torch.randn(2, 6, 2, 32)
    m = torch.ones(2, 6, dtype=torch.bool)
    return [
        (dict(q=torch.randn(2, 5, 32)), ValueError, "q must have 4 dims"),
        (dict(k=torch.randn(2, 6, 64)), ValueError, "k must have 4 dims"),
        (dict(q=torch.randn(2, 5, 2, 257), k=torch.randn(2, 6, 2, 257), v=torch.randn(2, 6, 2, 257)), ValueError,
         r"head dim D = q.shape\[3\] must be in 1..256, got 257"),
        (dict(q=torch.randn(2, 5, 2, 0), k=torch.randn(2, 6, 2, 0), v=torch.randn(2, 6, 2, 0)), ValueError,
         r"head dim D = q.shape\[3\] must be in 1..256, got 0"),
        (dict(k=torch.randn(3, 6, 2, 32)), ValueError, r"k must have shape \(2, \*, 2, 32\)"),
        (dict(k=torch.randn(2, 6, 4, 32)), ValueError, r"k must have shape \(2, \*, 2, 32\)"),
        (dict(v=torch.randn(2, 6, 2, 64)), ValueError, r"v must have shape \(2, \*, 2, 32\)"),
        (dict(v=torch.randn(2, 7, 2, 32)), ValueError, r"v must have shape \(2, 6, 2, 32\) \(that of k\)"),
        (dict(q=q.long()), TypeError, "q must have dtype in"),
        (dict(k=k.half()), TypeError, "k must have q's dtype float32, got float16"),
        (dict(v=v.bfloat16()), TypeError, "v must have q's dtype float32, got bfloat16"),
        (dict(key_padding_mask=m.float()), TypeError, "key_padding_mask must have dtype bool"),
        (dict(key_padding_mask=m[:, :5]), ValueError, r"key_padding_mask must have shape \(2, 6\)"),
        (dict(key_padding_mask=[True] * 6), TypeError, "key_padding_mask must be a torch.Tensor"),
        (dict(key_padding_mask=m.to("meta")), ValueError, "key_padding_mask is on meta but q is on cpu"),
        (dict(v=v.to("meta")), ValueError, "v is on meta but q is on cpu"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be finite"),
        (dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be finite"),
        (dict(softmax_scale=0.0), ValueError, "softmax_scale must be > 0"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be > 0"),
        (dict(softmax_scale="big"), TypeError, "softmax_scale must be a real number"),
        (dict(causal=1), TypeError, "causal must be a bool"),
    ], dict(q=q, k=k, v=v, key_padding_mask=None, causal=False, softmax_scale=None)


@pytest.mark.parametrize("idx", range(len(_bad_cases()[0])))
def test_bad_inputs_name_the_argument(idx):
    cases, args = _bad_cases()
    bad, exc, match = cases[idx]
    args.update(bad)
    with pytest.raises(exc, match=match):
        fluid_ops.attention(args["q"], args["k"], args["v"], key_padding_mask=args["key_padding_mask"],
                            causal=args["causal"], softmax_scale=args["softmax_scale"])


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
def test_kernel_rejects_bad_views_itself():
    """The compiled second line of defence: a bad call raises instead of reading out of bounds."""
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 4, 1, 32)
    o, lse = torch.empty_like(q), torch.empty(1, 1, 4)
    vw = _compiled.view
    v5 = torch.randn(1, 5, 1, 32)
    with pytest.raises(ValueError, match="v has a shape"):
        _compiled.cpu.attention_fwd(vw(q), vw(k), vw(v5), None, None, vw(o), vw(lse), False, 0.1, 1)
    with pytest.raises(ValueError, match="impl must be"):
        _compiled.cpu.attention_fwd(vw(q), vw(k), vw(k), None, None, vw(o), vw(lse), False, 0.1, 1, 7)
    with pytest.raises(ValueError, match="unsupported head dim 16"):
        q16 = torch.randn(1, 4, 1, 16)
        o16 = q16.clone()
        _compiled.cpu.attention_fwd(vw(q16), vw(q16), vw(q16), None, None, vw(o16), vw(lse), False, 0.1, 1)


# ---- the native-bf16 forward (AVX512_BF16) ----------------------------------------------------
_BF16_SHAPES = [  # (b, nq, nk, h, d)
    (1, 1, 1, 1, 64),        # N = 1
    (2, 1, 300, 2, 64),      # one query over keys past a block, not a multiple of the tile
    (2, 65, 65, 2, 80),      # D = 80 (a 16-wide remainder of D), N not a multiple of 8 / 32 / 128
    (2, 33, 7, 2, 128),      # Nq > Nk, odd Nk (a zero-weight key pair)
    (1, 129, 257, 2, 96),
    (2, 300, 129, 1, 32),
]


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
@pytest.mark.parametrize("impl", _isa_params(("avx512bf16",)))
@pytest.mark.parametrize("b,nq,nk,h,d", _BF16_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_native_bf16_forward_flash_rule(impl, b, nq, nk, h, d, causal, masked):
    """bf16 inputs on the vdpbf16ps path: o by the 2x rule against fp64, lse close, rows with no
    key (batch 1 fully masked, causal Nq > Nk) exactly 0 with lse -inf."""
    q, k, v, mask = _inputs(b, nq, nk, h, d, dtype=torch.bfloat16, masked=masked, full_mask_batch=1)
    ref64 = _naive(q, k, v, mask, causal)
    ref_lowp = _naive(q, k, v, mask, causal, dtype=torch.bfloat16)
    o, lse = ops_attn._cpu_forward(q, k, v, mask, None, causal, d ** -0.5, impl)
    assert o.dtype == torch.bfloat16
    assert_lowp_close(o, ref64, ref_lowp)
    _, want_lse = ref.attention_with_lse(q.double(), k.double(), v.double(), key_padding_mask=mask, causal=causal)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin].double(), want_lse[fin], rtol=0, atol=2e-2)
    assert (o[torch.isinf(lse).transpose(1, 2)] == 0).all()


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
@pytest.mark.parametrize("impl", _isa_params(("avx512bf16",)))
@pytest.mark.parametrize("causal", [False, True])
def test_native_bf16_forward_seqlens_and_empty_blocks(impl, causal):
    """KV-cache lengths and masks that empty whole key blocks, on the native-bf16 path."""
    b, nq, nk, h, d = 3, 5, 400, 2, 80
    q, k, v, _ = _inputs(b, nq, nk, h, d, dtype=torch.bfloat16, seed=8)
    lens = torch.tensor([1, 129, 400])
    o, _ = ops_attn._cpu_forward(q, k, v, None, lens, causal, d ** -0.5, impl)
    for bi, n in enumerate(lens.tolist()):
        sl = slice(bi, bi + 1)
        want = _naive(q[sl], k[sl, :n], v[sl, :n], causal=causal)
        want_lowp = _naive(q[sl], k[sl, :n], v[sl, :n], causal=causal, dtype=torch.bfloat16)
        assert_lowp_close(o[sl], want, want_lowp, name=f"batch {bi}")
    mask = torch.zeros(b, nk, dtype=torch.bool)
    mask[0, :100] = True
    mask[1, :128] = True
    mask[1, 256:] = True
    mask[2, 383] = True
    o, _ = ops_attn._cpu_forward(q, k, v, mask, None, causal, d ** -0.5, impl)
    assert_lowp_close(o, _naive(q, k, v, mask, causal), _naive(q, k, v, mask, causal, dtype=torch.bfloat16))


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
def test_native_bf16_dispatch(monkeypatch):
    """impl 0 takes the native-bf16 forward exactly where the CPU has AVX512_BF16; forcing the
    plain avx512 path runs bf16 inputs in fp32 arithmetic (a different rounding); the env override
    names each path, and asking for one the CPU lacks is an error."""
    have = _compiled.cpu.attention_fwd_isas()
    flags = fluid_ops.backend.cpu_flags()
    native = {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16"} <= flags
    assert ("avx512bf16" in have) == native
    assert (_compiled.cpu.attention_fwd_isa() == "avx512bf16") == native
    monkeypatch.setenv("FLUID_OPS_CPU_ATTENTION_ISA", "avx512bf16")
    assert ops_attn._cpu_impl() == 5
    q, k, v, _ = _inputs(2, 64, 200, 2, 64, dtype=torch.bfloat16)
    if not native:
        with pytest.raises(ValueError, match="avx512bf16 attention kernels are not available"):
            _run("cpu", q, k, v)
        return
    got = _run("cpu", q, k, v)
    monkeypatch.setenv("FLUID_OPS_CPU_ATTENTION_ISA", "")
    torch.testing.assert_close(got, _run("cpu", q, k, v), rtol=0, atol=0)  # auto = the native path
    monkeypatch.setenv("FLUID_OPS_CPU_ATTENTION_ISA", "avx512")
    fp32_path = _run("cpu", q, k, v)
    assert not torch.equal(got, fp32_path)  # P rounded to bf16 on the native path
    assert_lowp_close(got, _naive(q, k, v), _naive(q, k, v, dtype=torch.bfloat16))
    # fp32 / fp16 inputs under avx512bf16 run the AVX-512 fp32 kernels
    q32, k32, v32 = q.float(), k.float(), v.float()
    monkeypatch.setenv("FLUID_OPS_CPU_ATTENTION_ISA", "avx512bf16")
    torch.testing.assert_close(_run("cpu", q32, k32, v32), ref.attention(q32, k32, v32), rtol=1e-5, atol=2e-6)


# ---- the native-bf16 backward (AVX512_BF16) ---------------------------------------------------
def _bf16_backward_bound(do, q, k, v, o, lse, mask, causal, scale, want):
    """Elementwise error bound (dq, dk, dv) of a bf16 backward against the fp32 formula on the same
    bf16 inputs: P and dS rounded to bf16 as product operands (relative 2^-9 each) and each output
    once (2^-9) give 2^-8 (|want| + |dS||K|, |dS|ᵀ|Q|, |P|ᵀ|dO|); plus fp32 dot-product noise in
    dP - delta (<= 2^-16 of |dO||V| + |dO||O| for D <= 256), which a row that attends one key
    cancels to ~0 on both sides."""
    qf, kf, vf, of, dof = (t.double().transpose(1, 2) for t in (q, k, v, o, do))
    nq, nk = q.shape[1], k.shape[1]
    allowed = ref.allowed_mask(nq, nk, key_padding_mask=mask, causal=causal, batch=q.shape[0], device=q.device)
    lse_f = lse.double().unsqueeze(-1)
    p = torch.exp((qf @ kf.transpose(-1, -2)) * scale - lse_f.masked_fill(torch.isinf(lse_f), 0.0))
    p = p.masked_fill(~allowed | torch.isinf(lse_f), 0.0)
    ds = (p * (dof @ vf.transpose(-1, -2) - (dof * of).sum(-1, keepdim=True))).abs() * scale
    noise = p * (dof.abs() @ vf.abs().transpose(-1, -2) + (dof * of).abs().sum(-1, keepdim=True)) * scale * 2.0 ** -16
    absprod = (ds @ kf.abs(), ds.transpose(-1, -2) @ qf.abs(), p.transpose(-1, -2) @ dof.abs())
    fp32 = (noise @ kf.abs(), noise.transpose(-1, -2) @ qf.abs(), torch.zeros_like(vf))
    return tuple((2.0 ** -8 * (w.double().abs() + a.transpose(1, 2)) + n.transpose(1, 2) + 1e-6)
                 for w, a, n in zip(want, absprod, fp32))


def _check_native_bf16_backward(q, k, v, mask, causal, impl, seed=1):
    """The compiled backward `impl` on bf16 inputs (outputs pre-filled with NaN: every element must
    be written): (1) against the fp32 formula of fluid_ops/reference on the same bf16 inputs, o and
    lse, within the bf16 rounding bound above; (2) the contract's 2x rule against fp64 autograd,
    with the formula run in bf16 autograd as the baseline; (3) masked keys and rows that attend
    nothing get exactly 0."""
    d = q.shape[-1]
    scale = d ** -0.5
    o, lse = ops_attn._cpu_forward(q, k, v, mask, None, causal, scale, impl)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    got = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    vw = _compiled.view
    _compiled.cpu.attention_bwd(vw(do), vw(q), vw(k), vw(v), vw(o), vw(lse), vw(mask), *[vw(t) for t in got],
                                causal, scale, 2, impl)
    want = ref.attention_backward(do.float(), q.float(), k.float(), v.float(), o.float(), lse,
                                  key_padding_mask=mask, causal=causal, softmax_scale=scale)
    bound = _bf16_backward_bound(do, q, k, v, o, lse, mask, causal, scale, want)
    for name, g, w, lim in zip("qkv", got, want, bound):
        assert g.dtype == torch.bfloat16 and not torch.isnan(g).any(), f"d{name} not fully written"
        err = (g.double() - w.double()).abs()
        worst = (err - lim).argmax()
        assert (err <= lim).all(), (f"d{name}: error {err.flatten()[worst]:.3e} > bound {lim.flatten()[worst]:.3e} "
                                    f"at flat index {worst.item()}")
    # the contract (docs/contracts.md §2): the 2x rule against fp64, atol 1e-3 for attention gradients
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    w64 = torch.autograd.grad(ref.attention(q64, k64, v64, key_padding_mask=mask, causal=causal), (q64, k64, v64),
                              do.double())
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    lowp = torch.autograd.grad(_naive_autograd_lowp(ql, kl, vl, mask, causal), (ql, kl, vl), do)
    for name, g, w, lo in zip("qkv", got, w64, lowp):
        assert_lowp_close(g, w, lo, atol=1e-3, name=f"d{name}")
    if mask is not None:
        dead = ~mask.view(mask.shape[0], -1, 1, 1).expand_as(got[1])
        assert (got[1][dead] == 0).all() and (got[2][dead] == 0).all()
    assert (got[0][torch.isinf(lse).transpose(1, 2)] == 0).all()
    return got


_BF16_BWD_SHAPES = _BF16_SHAPES + [
    (2, 17, 17, 2, 64),      # odd N, one partial row tile and key pair
    (1, 67, 130, 1, 96),     # odd Nq: the last row pairs with a zero row; Nk past a block
    (2, 129, 33, 2, 32),     # more queries than a row group (64), odd
]


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
@pytest.mark.parametrize("impl", _isa_params(("avx512bf16",)))
@pytest.mark.parametrize("b,nq,nk,h,d", _BF16_BWD_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_native_bf16_backward(impl, b, nq, nk, h, d, causal, masked):
    """The vdpbf16ps backward on bf16 inputs (batch 1 fully masked when masked; causal Nq > Nk has
    rows that attend nothing)."""
    q, k, v, mask = _inputs(b, nq, nk, h, d, dtype=torch.bfloat16, masked=masked, full_mask_batch=1)
    _check_native_bf16_backward(q, k, v, mask, causal, impl)


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
@pytest.mark.parametrize("impl", _isa_params(("avx512bf16",)))
@pytest.mark.parametrize("causal", [False, True])
def test_native_bf16_backward_empty_key_blocks(impl, causal):
    """Masks that empty whole key blocks (skipped), a hole, a single key far out, on the native path."""
    b, nq, nk, h, d = 3, 70, 400, 1, 80
    q, k, v, _ = _inputs(b, nq, nk, h, d, dtype=torch.bfloat16, seed=7)
    mask = torch.zeros(b, nk, dtype=torch.bool)
    mask[0, :100] = True
    mask[1, :128] = True
    mask[1, 256:] = True
    mask[2, 383] = True
    _check_native_bf16_backward(q, k, v, mask, causal, impl)


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
def test_native_bf16_backward_dispatch(monkeypatch):
    """attention_bwd_isa names the backward a call takes: the native one only for bf16 inputs under
    the avx512bf16 set (impl 0 on a CPU with AVX512_BF16); forcing avx512 runs bf16 inputs in fp32
    arithmetic (different rounding, also within the contract); fp32 inputs under avx512bf16 run
    the fp32 kernel bit for bit; forcing avx512bf16 on a CPU without it is an error."""
    flags = fluid_ops.backend.cpu_flags()
    native = {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16"} <= flags
    isa = _compiled.cpu.attention_bwd_isa
    q, k, v, mask = _inputs(2, 40, 150, 2, 64, dtype=torch.bfloat16, masked=True)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)

    def grads(xq, xk, xv, xdo):
        return grads_on("cpu", xq, xk, xv, mask, True, xdo)[1]

    monkeypatch.setenv("FLUID_OPS_CPU_ATTENTION_ISA", "avx512bf16")
    if not native:
        with pytest.raises(ValueError, match="avx512bf16 attention kernels are not available"):
            isa("bfloat16", 64, 5)
        with pytest.raises(ValueError, match="avx512bf16 attention kernels are not available"):
            grads(q, k, v, do)
        assert isa("bfloat16", 64, 0) != "avx512bf16"
        return
    assert isa("bfloat16", 64, 0) == "avx512bf16" and isa("bfloat16", 80, 5) == "avx512bf16"
    assert isa("float32", 64, 0) == "avx512" and isa("float16", 64, 5) == "avx512"
    assert isa("bfloat16", 64, 3) == "avx512" and isa("bfloat16", 64, 1) == "portable"
    with pytest.raises(ValueError, match="unsupported head dim 16"):
        isa("bfloat16", 16, 5)
    native_g = grads(q, k, v, do)
    monkeypatch.setenv("FLUID_OPS_CPU_ATTENTION_ISA", "")
    for a, b_ in zip(native_g, grads(q, k, v, do)):  # auto = the native path
        assert torch.equal(a, b_)
    monkeypatch.setenv("FLUID_OPS_CPU_ATTENTION_ISA", "avx512")
    fp32_arith = grads(q, k, v, do)
    assert any(not torch.equal(a, b_) for a, b_ in zip(native_g, fp32_arith))  # P, dS rounded on the native path
    _, w64 = ref_grads(q, k, v, mask, True, do)
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    lowp = torch.autograd.grad(_naive_autograd_lowp(ql, kl, vl, mask, True), (ql, kl, vl), do)
    for name, a, b_, w, lo in zip("qkv", native_g, fp32_arith, w64, lowp):
        assert_lowp_close(a, w, lo, atol=1e-3, name=f"native d{name}")
        assert_lowp_close(b_, w, lo, atol=1e-3, name=f"fp32-arithmetic d{name}")
    # fp32 inputs under avx512bf16 run the AVX-512 fp32 backward: identical to forcing avx512
    q32, k32, v32, do32 = (t.float() for t in (q, k, v, do))
    want = grads(q32, k32, v32, do32)
    monkeypatch.setenv("FLUID_OPS_CPU_ATTENTION_ISA", "avx512bf16")
    for a, b_ in zip(grads(q32, k32, v32, do32), want):
        assert torch.equal(a, b_)


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
@pytest.mark.parametrize("d", [5, 17, 40, 100])
def test_native_bf16_backward_padded_head_dims(monkeypatch, d):
    """Head dims the kernels lack reach them zero-padded to the next compiled dim (exact), through
    the public op's autograd, under the forced native set; the 2x rule against fp64."""
    if "avx512bf16" not in _compiled.cpu.attention_fwd_isas():
        pytest.skip(str(_isa_skip_reason("avx512bf16")))
    monkeypatch.setenv("FLUID_OPS_CPU_ATTENTION_ISA", "avx512bf16")
    q, k, v, mask = _inputs(2, 21, 37, 2, d, dtype=torch.bfloat16, masked=True)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    _, got = grads_on("cpu", q, k, v, mask, False, do)
    _, w64 = ref_grads(q, k, v, mask, False, do)
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    lowp = torch.autograd.grad(_naive_autograd_lowp(ql, kl, vl, mask, False), (ql, kl, vl), do)
    for name, g, w, lo, x in zip("qkv", got, w64, lowp, (q, k, v)):
        assert g.dtype == torch.bfloat16 and g.shape == x.shape
        assert_lowp_close(g, w, lo, atol=1e-3, name=f"d{name}")


@pytest.mark.skipif(_compiled.cpu is None, reason="fluid_ops._C not built")
def test_isa_override_env(monkeypatch):
    q, k, v, mask = _inputs(1, 9, 9, 1, 32, masked=True)
    want = ref.attention(q, k, v, key_padding_mask=mask)
    monkeypatch.setenv("FLUID_OPS_CPU_ATTENTION_ISA", "portable")
    torch.testing.assert_close(_run("cpu", q, k, v, key_padding_mask=mask), want, rtol=1e-5, atol=2e-6)
    monkeypatch.setenv("FLUID_OPS_CPU_ATTENTION_ISA", "sse9")
    with pytest.raises(ValueError, match="FLUID_OPS_CPU_ATTENTION_ISA must be one of"):
        _run("cpu", q, k, v)


# ---- KV cache --------------------------------------------------------------------------------
def _kv_inputs(b=3, nmax=40, h=2, d=64, nnew=4, nq=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(b, nmax, h, d, generator=g).to(dtype)
    vc = torch.randn(b, nmax, h, d, generator=g).to(dtype)
    kn = torch.randn(b, nnew, h, d, generator=g).to(dtype)
    vn = torch.randn(b, nnew, h, d, generator=g).to(dtype)
    q = torch.randn(b, nq, h, d, generator=g).to(dtype)
    lens = torch.tensor([0, 17, 36][:b], dtype=torch.int32)
    return q, kc, vc, kn, vn, lens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nnew", [(4, 4), (1, 1), (2, 0), (1, 3)])
def test_kvcache_appends_and_attends_valid_prefix(backend, causal, nq, nnew):
    q, kc, vc, kn, vn, lens = _kv_inputs(nnew=nnew, nq=nq)
    want_k, want_v = kc.clone(), vc.clone()
    for bi in range(q.shape[0]):
        idx = torch.arange(int(lens[bi]), int(lens[bi]) + nnew)
        want_k[bi].index_put_((idx,), kn[bi])
        want_v[bi].index_put_((idx,), vn[bi])
    with fluid_ops.use_backend(backend):
        o = fluid_ops.attention_kvcache(q, kc, vc, kn if nnew else None, vn if nnew else None,
                                        cache_seqlens=lens, causal=causal)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    for bi in range(q.shape[0]):
        n = int(lens[bi]) + nnew
        want = _naive(q[bi:bi + 1], want_k[bi:bi + 1, :n], want_v[bi:bi + 1, :n], causal=causal)
        torch.testing.assert_close(o[bi:bi + 1], want.float(), rtol=1e-5, atol=2e-6)
    if lens[0] + nnew == 0:  # an empty cache and nothing appended: nothing to attend, output 0
        assert (o[0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_decode_loop_matches_full_causal(backend):
    """Prefill 5 tokens then decode 3 one at a time: each step equals causal attention over all."""
    b, h, d, n = 2, 2, 32, 8
    q, k, v, _ = _inputs(b, n, n, h, d, seed=4)
    want = ref.attention(q, k, v, causal=True)
    kc, vc = torch.zeros(b, 16, h, d), torch.zeros(b, 16, h, d)
    lens = torch.zeros(b, dtype=torch.int64)
    outs = []
    with fluid_ops.use_backend(backend):
        for s0, s1 in [(0, 5), (5, 6), (6, 7), (7, 8)]:
            outs.append(fluid_ops.attention_kvcache(q[:, s0:s1], kc, vc, k[:, s0:s1], v[:, s0:s1], cache_seqlens=lens))
            lens += s1 - s0
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(cache_seqlens=torch.tensor([0, 17, 37], dtype=torch.int32)), ValueError, "would overflow the cache"),
    (dict(cache_seqlens=torch.tensor([0, -1, 3])), ValueError, "cache_seqlens must be >= 0"),
    (dict(cache_seqlens=torch.tensor([0.0, 1.0, 2.0])), TypeError, "cache_seqlens must have dtype"),
    (dict(cache_seqlens=torch.tensor([0, 1])), ValueError, r"cache_seqlens must have shape \(3\)"),
    (dict(v_new=None), ValueError, "k_new and v_new must both be given"),
    (dict(k_new=torch.randn(3, 4, 2, 32)), ValueError, r"k_new must have shape \(3, \*, 2, 64\)"),
    (dict(v_new=torch.randn(3, 5, 2, 64)), ValueError, r"v_new must have shape \(3, 4, 2, 64\) \(that of k_new\)"),
    (dict(k_cache=torch.randn(3, 40, 2, 64).half()), TypeError, "k_cache must have q's dtype"),
])
def test_kvcache_bad_inputs(bad, exc, match):
    q, kc, vc, kn, vn, lens = _kv_inputs()
    args = dict(q=q, k_cache=kc, v_cache=vc, k_new=kn, v_new=vn, cache_seqlens=lens)
    args.update(bad)
    before = kc.clone()
    with pytest.raises(exc, match=match):
        fluid_ops.attention_kvcache(args["q"], args["k_cache"], args["v_cache"], args["k_new"], args["v_new"],
                                    cache_seqlens=args["cache_seqlens"])
    assert torch.equal(kc, before)  # nothing written when the call is refused


# ---- head dims the kernels are not compiled for (docs/contracts.md §2.1: every D in 1..256) ----------------------
ODD_HEAD_DIMS = [8, 16, 48, 160, 256]


def _takes(backend, d):
    """Whether `backend` runs head dim d itself (the compiled ones: d <= 128, zero-padded to a kernel dim)."""
    return backend == "reference" or d <= ops_attn.HEAD_DIMS[-1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", ODD_HEAD_DIMS)
@pytest.mark.parametrize("causal,masked", [(False, False), (True, True), (False, True)])
def test_odd_head_dims_fp32(backend, d, causal, masked):
    b, nq, nk, h = 2, 19, 23, 2
    q, k, v, mask = _inputs(b, nq, nk, h, d, masked=masked, full_mask_batch=1 if masked else None, seed=d)
    want = _naive(q, k, v, mask, causal).float()
    if not _takes(backend, d):
        with pytest.raises(RuntimeError, match=f"head dim {d} > 128 has no compiled kernel"):
            _run(backend, q, k, v, key_padding_mask=mask, causal=causal)
        return
    got = _run(backend, q, k, v, key_padding_mask=mask, causal=causal)
    assert got.shape == q.shape and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    # an explicit softmax scale is that of the caller, not of the padded kernel dim
    got = _run(backend, q, k, v, key_padding_mask=mask, causal=causal, softmax_scale=0.3)
    torch.testing.assert_close(got, ref.attention(q, k, v, key_padding_mask=mask, causal=causal, softmax_scale=0.3),
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("d", ODD_HEAD_DIMS)
def test_odd_head_dims_automatic_choice(d):
    """Unforced, every D in 1..256 runs: the cpu kernels (padded) up to 128, the reference above."""
    q, k, v, mask = _inputs(1, 9, 9, 2, d, masked=True, seed=1)
    torch.testing.assert_close(fluid_ops.attention(q, k, v, key_padding_mask=mask), _naive(q, k, v, mask, False).float(),
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", ODD_HEAD_DIMS)
def test_odd_head_dims_lowp_flash_rule(backend, dtype, d):
    if not _takes(backend, d):
        pytest.skip(f"{backend} declines head dim {d} (tested in test_odd_head_dims_fp32)")
    q, k, v, mask = _inputs(2, 33, 17, 2, d, dtype=dtype, masked=True)
    got = _run(backend, q, k, v, key_padding_mask=mask, causal=True)
    assert got.dtype == dtype and got.shape == q.shape
    assert_lowp_close(got, _naive(q, k, v, mask, True), _naive(q, k, v, mask, True, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", ODD_HEAD_DIMS)
def test_odd_head_dims_backward(backend, d):
    if not _takes(backend, d):
        pytest.skip(f"{backend} declines head dim {d}")
    b, nq, nk, h = 2, 13, 17, 2
    q, k, v, mask = _inputs(b, nq, nk, h, d, masked=True, full_mask_batch=1, seed=5)
    do = torch.randn(b, nq, h, d, generator=torch.Generator().manual_seed(9))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(ref.attention(q64, k64, v64, key_padding_mask=mask, causal=True), (q64, k64, v64),
                               do.double())
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    with fluid_ops.use_backend(backend):
        got = torch.autograd.grad(fluid_ops.attention(qs, ks, vs, key_padding_mask=mask, causal=True), (qs, ks, vs), do)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape and g.dtype == torch.float32
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", ODD_HEAD_DIMS)
def test_odd_head_dims_kvcache(backend, d):
    """The cache of a padded head dim is still written in place, and attention reads it."""
    if not _takes(backend, d):
        pytest.skip(f"{backend} declines head dim {d}")
    g = torch.Generator().manual_seed(d)
    b, h, nmax, nnew = 3, 2, 12, 2
    q = torch.randn(b, nnew, h, d, generator=g)
    kc, vc = torch.randn(b, nmax, h, d, generator=g), torch.randn(b, nmax, h, d, generator=g)
    kn, vn = torch.randn(b, nnew, h, d, generator=g), torch.randn(b, nnew, h, d, generator=g)
    lens = torch.tensor([0, 3, 10])
    want_k, want_v = kc.clone(), vc.clone()
    for bi in range(b):
        want_k[bi, int(lens[bi]):int(lens[bi]) + nnew] = kn[bi]
        want_v[bi, int(lens[bi]):int(lens[bi]) + nnew] = vn[bi]
    with fluid_ops.use_backend(backend):
        o = fluid_ops.attention_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v) and o.shape == q.shape
    for bi in range(b):
        n = int(lens[bi]) + nnew
        want = _naive(q[bi:bi + 1], want_k[bi:bi + 1, :n], want_v[bi:bi + 1, :n], causal=True)
        torch.testing.assert_close(o[bi:bi + 1], want.float(), rtol=1e-5, atol=2e-6)


def test_attention_head_dims_report():
    dims = fluid_ops.attention_head_dims()
    assert set(dims) == {"cuda", "triton", "cpu", "reference"}
    for name in ("cuda", "triton", "cpu"):
        assert dims[name]["native"] == (32, 64, 80, 96, 128) and dims[name]["max"] == 128
    assert dims["reference"]["max"] == 256
    # backends() says the same, per backend, under "limits"
    report = fluid_ops.backends()
    assert all(report[name]["limits"]["attention_head_dims"] == dims[name] for name in dims)
