"""The CUDA tensor-core attention kernels (csrc/cuda/attention_*.cu, backend "cuda") against the
reference, with the checks every other backend gets (tests/test_attention.py,
tests/test_attention_triton.py), on CUDA tensors.

The kernels take fp16 / bf16 (mma.sync, fp32 accumulate); fp32 is declined by the backend's
supports hook and runs on Triton. So every numerical check here is the flash-attn 2x rule
(tests/conftest.py assert_lowp_close) against an fp64 reference, with the reference run in the
same low precision as the baseline: N = 1, 17, 65, 257, Nq != Nk, D = 32 / 64 / 80 / 96 / 128,
fully masked rows and batches, causal with Nq < Nk and Nq > Nk, padding that empties whole key
tiles (their K / V are NaN: they must never be read), strided views of a fused QKV, forward and
backward (the backward bitwise repeatable), KV-cache appends and decode steps, B = 0.

GPU tests carry `requires_cuda` (skipped with its reason where torch sees no GPU or the cuda
backend is unavailable): a GPU run switches them on with no edits. Without a GPU, what runs is
that the compiled module exports the kernels, the kernels' own argument checks (they throw
before any launch, so no device is touched) and the supports hook's reasons.
"""
import functools
import importlib

import pytest
import torch

import fluid_ops
from fluid_ops import _compiled, backend
from tests.conftest import assert_lowp_close, requires_cuda
from tests.helpers import attention_inputs as _inputs, fwd_on, grads_on
from tests.helpers import naive_attention as _naive, ref_grads as _ref_grads

ref = importlib.import_module("fluid_ops.reference.attention")
ops_attn = importlib.import_module("fluid_ops.ops.attention")

HAVE_KERNELS = _compiled.cuda is not None and hasattr(_compiled.cuda, "attention_fwd")
requires_kernels = pytest.mark.skipif(not HAVE_KERNELS, reason="fluid_ops._C_cuda is not built "
                                      "(or was built without the attention kernels)")
gpu = [requires_cuda, pytest.mark.gpu]
DTYPES = [torch.float16, torch.bfloat16]


def _dev(*ts):
    return tuple(None if t is None else t.cuda() for t in ts)


_fwd = functools.partial(fwd_on, "cuda")
_grads = functools.partial(grads_on, "cuda")


def _lowp_autograd(q, k, v, mask, causal):
    """The contract formula (docs/contracts.md) in the inputs' low precision, differentiable, finite on rows that see no
    key (their scores are replaced before the softmax, their probabilities zeroed after): the
    baseline of the 2x rule for gradients."""
    b, nq, h, d = q.shape
    nk = k.shape[1]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    s = (qt @ kt.transpose(-1, -2)) * d ** -0.5
    allowed = ref.allowed_mask(nq, nk, key_padding_mask=mask, causal=causal, batch=b)
    dead = ~allowed.any(-1, keepdim=True)
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(dead, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(~allowed, 0.0)
    return (p @ vt).transpose(1, 2)


def _lowp_grads(q, k, v, mask, causal, do):
    ql, kl, vl = (t.detach().cpu().clone().requires_grad_() for t in (q, k, v))
    m = None if mask is None else mask.cpu()
    return torch.autograd.grad(_lowp_autograd(ql, kl, vl, m, causal), (ql, kl, vl), do.cpu())


def _check_grads(got, want, lowp, dtype, what=""):
    for name, g, w, lo in zip("qkv", got, want, lowp):
        assert g.dtype == dtype
        assert torch.isfinite(g).all(), f"{what} d{name} is not finite"
        assert_lowp_close(g.cpu(), w, lo, atol=1e-3, name=f"{what} {dtype} d{name}")


# ---- what runs without a GPU ---------------------------------------------------------------------
def test_supports_hook_declines_with_reasons():
    q = torch.zeros(1, 4, 1, 32)
    why = ops_attn._cuda_supports(q)
    assert "float32" in why and "triton" in why
    why16 = ops_attn._cuda_supports(q.half())
    assert why16 is not None and ("not cuda" in why16 or "no attention kernels" in why16)


@requires_kernels
def test_module_exports_the_kernels():
    assert _compiled.cuda.attention_tile_n == 64
    for name in ("attention_fwd", "attention_bwd"):
        assert callable(getattr(_compiled.cuda, name))


def _bad_fwd_cases():
    h = torch.float16
    q = torch.zeros(1, 4, 1, 32, dtype=h)
    lse = torch.zeros(1, 1, 4)
    unaligned = torch.zeros(4 * 32 + 1, dtype=h)[1:].view(1, 4, 1, 32)
    stride36 = torch.zeros(1, 4, 1, 36, dtype=h)[..., :32]
    m = torch.ones(1, 4, dtype=torch.bool)
    base = dict(q=q, k=q, v=q, mask=None, tiles=None, seqlens=None, o=q.clone(), lse=lse)
    return base, [
        (dict(v=torch.zeros(1, 5, 1, 32, dtype=h)), "v has a shape different from k"),
        (dict(q=q.float(), k=q.float(), v=q.float(), o=q.float()), "must be float16 or bfloat16"),
        (dict(k=q.bfloat16()), "k and v must have q's dtype"),
        (dict(q=torch.zeros(1, 4, 1, 48, dtype=h), k=torch.zeros(1, 4, 1, 48, dtype=h),
              v=torch.zeros(1, 4, 1, 48, dtype=h), o=torch.zeros(1, 4, 1, 48, dtype=h)), "unsupported head dim 48"),
        (dict(k=torch.zeros(1, 4, 2, 32, dtype=h)), "must have q's batch, heads and head dim"),
        (dict(q=unaligned), "q must be 16-byte aligned"),
        (dict(k=stride36), "multiples of 8 elements"),
        (dict(v=torch.zeros(1, 4, 1, 64, dtype=h)[..., ::2]), "v must have unit stride along D"),
        (dict(o=torch.zeros(1, 3, 1, 32, dtype=h)), "o has a shape different"),
        (dict(lse=torch.zeros(1, 4)), r"lse must be a contiguous \(B, H, Nq\)"),
        (dict(lse=torch.zeros(1, 1, 4, dtype=torch.float64)), "lse must be float32"),
        (dict(mask=torch.ones(1, 5, dtype=torch.bool)), r"key_padding_mask must have shape \(1, 4\)"),
        (dict(mask=m.float()), "key_padding_mask must be bool"),
        (dict(mask=m, tiles=torch.ones(1, 2, dtype=torch.bool)), r"tile_any must have shape \(1, 1\)"),
        (dict(tiles=torch.ones(1, 1, dtype=torch.bool)), "tile_any is given without key_padding_mask"),
        (dict(seqlens=torch.zeros(1, dtype=torch.int64)), "seqlens_k must be int32"),
        (dict(seqlens=torch.zeros(2, dtype=torch.int32)), r"seqlens_k must be a contiguous \(B,\) int32"),
    ]


@requires_kernels
@pytest.mark.parametrize("idx", range(len(_bad_fwd_cases()[1])))
def test_kernel_rejects_bad_forward_views_itself(idx):
    """The compiled second line of defence throws before launching (so these host tensors are
    never dereferenced): a bad call cannot read or write out of bounds."""
    args, cases = _bad_fwd_cases()
    bad, match = cases[idx]
    args.update(bad)
    vw = _compiled.view
    with pytest.raises(ValueError, match=match):
        _compiled.cuda.attention_fwd(vw(args["q"]), vw(args["k"]), vw(args["v"]), vw(args["mask"]),
                                     vw(args["tiles"]), vw(args["seqlens"]), vw(args["o"]), vw(args["lse"]),
                                     False, 0.1, 0)
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        a, _ = _bad_fwd_cases()
        _compiled.cuda.attention_fwd(vw(a["q"]), vw(a["k"]), vw(a["v"]), None, None, None, vw(a["o"]),
                                     vw(a["lse"]), False, float("nan"), 0)


@requires_kernels
def test_kernel_rejects_bad_backward_views_itself():
    h = torch.float16
    q = torch.zeros(2, 4, 1, 32, dtype=h)
    lse = torch.zeros(2, 1, 4)
    vw = _compiled.view

    def call(**kw):
        a = dict(dout=q, q=q, k=q, v=q, o=q, lse=lse, dq=q.clone(), dk=q.clone(), dv=q.clone(),
                 delta=lse.clone(), lse2=lse.clone())
        a.update(kw)
        _compiled.cuda.attention_bwd(vw(a["dout"]), vw(a["q"]), vw(a["k"]), vw(a["v"]), vw(a["o"]), vw(a["lse"]),
                                     None, None, vw(a["dq"]), vw(a["dk"]), vw(a["dv"]), vw(a["delta"]),
                                     vw(a["lse2"]), vw(a.get("dq_accum")), True, 0.1, 0)

    for kw, match in [(dict(dq=torch.zeros(2, 3, 1, 32, dtype=h)), "dq has a shape different"),
                      (dict(dk=torch.zeros(2, 4, 1, 32)), "dk must be float16|dk must have the dtype"),
                      (dict(dout=torch.zeros(2, 4, 1, 32, dtype=torch.bfloat16)), "dout must have the dtype"),
                      (dict(delta=torch.zeros(2, 1, 3)), r"delta must be a contiguous \(B, H, Nq\)"),
                      (dict(lse2=torch.zeros(2, 1, 8)[..., ::2]), r"lse2 must be a contiguous"),
                      (dict(lse=torch.zeros(2, 1, 4, dtype=h)), "lse must be float32"),
                      (dict(dq_accum=torch.zeros(2, 4, 1, 32, dtype=h)), "dq_accum must be float32"),
                      (dict(dq_accum=torch.zeros(2, 4, 1, 64)[..., :32]), "dq_accum must be a contiguous")]:
        with pytest.raises(ValueError, match=match):
            call(**kw)


# ---- backend choice ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@requires_cuda
def test_cuda_backend_is_chosen_first(dtype):
    q, k, v, mask = _dev(*_inputs(2, 5, 6, 1, 64, dtype=dtype, masked=True))
    assert backend.select("attention_fwd", q.device, q, k, v, mask, False, 0.2)[0] == "cuda"
    assert backend.select("attention_kvcache", q.device, q, k, v, None, None,
                          torch.zeros(2, dtype=torch.int32, device="cuda"), True, 0.2)[0] == "cuda"


@requires_cuda
def test_fp32_goes_elsewhere_and_forcing_says_why():
    q, k, v, _ = _dev(*_inputs(1, 5, 6, 1, 64))
    assert backend.select("attention_fwd", q.device, q, k, v, None, False, 0.2)[0] != "cuda"
    with fluid_ops.use_backend("cuda"), pytest.raises(RuntimeError, match="float32 runs on the triton backend"):
        fluid_ops.attention(q, k, v)


# ---- forward -------------------------------------------------------------------------------------
FWD_CASES = [  # (b, nq, nk, h, d, causal, masked); masked cases have batch 1 fully masked
    (1, 1, 1, 1, 64, False, False),     # N = 1
    (2, 1, 1, 1, 32, True, True),       # N = 1, a fully masked batch
    (2, 17, 17, 2, 32, True, True),
    (2, 65, 65, 2, 80, True, True),     # D = 80, one query / key past a 64 tile
    (2, 257, 257, 1, 96, False, True),  # D = 96, N = 257
    (2, 33, 7, 1, 128, True, False),    # cross, Nq > Nk, causal: the first 26 rows see nothing
    (2, 7, 70, 1, 64, True, True),      # Nq < Nk
    (2, 1, 100, 2, 64, False, True),    # decode-like
    (1, 129, 257, 2, 128, True, False),
    (2, 65, 17, 2, 96, False, True),    # Nq > Nk, not causal
    (3, 100, 300, 1, 80, False, True),  # cross-attention to padded text keys
    (1, 300, 300, 2, 64, True, False),  # MAR-like self-attention length, causal
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,nq,nk,h,d,causal,masked", FWD_CASES)
@requires_cuda
def test_forward_flash_rule(dtype, b, nq, nk, h, d, causal, masked):
    q, k, v, mask = _inputs(b, nq, nk, h, d, dtype=dtype, masked=masked, full_mask_batch=1)
    ref64 = _naive(q, k, v, mask, causal)
    lowp = _naive(q, k, v, mask, causal, dtype=dtype)
    o, lse = _fwd(*_dev(q, k, v, mask), causal)
    assert o.dtype == dtype and o.shape == q.shape and o.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (b, h, nq)
    o, lse = o.cpu(), lse.cpu()
    assert torch.isfinite(o).all()
    assert_lowp_close(o, ref64, lowp, name=f"{dtype} o")
    _, want_lse = ref.attention_with_lse(q.double(), k.double(), v.double(), key_padding_mask=mask, causal=causal)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), "lse must be -inf exactly on rows that see no key"
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin].double(), want_lse[fin], rtol=1e-4, atol=1e-4)
    dead = torch.isinf(want_lse).transpose(1, 2)  # (B, Nq, H)
    assert (o[dead] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@requires_cuda
def test_forward_softmax_scale(dtype):
    q, k, v, mask = _inputs(2, 40, 50, 2, 64, dtype=dtype, masked=True)
    o, _ = _fwd(*_dev(q, k, v, mask), False, scale=0.37)
    assert_lowp_close(o.cpu(), _naive(q, k, v, mask, scale=0.37), _naive(q, k, v, mask, scale=0.37, dtype=dtype))


def _tile_emptying_mask(b, nk, tile):
    mask = torch.zeros(b, nk, dtype=torch.bool)
    mask[0, :tile + 5] = True           # tiles 2.. empty
    mask[1, :tile] = True
    mask[1, 2 * tile:] = True           # tile 1 empty
    mask[2, nk - 1] = True              # all but the last tile empty
    return mask


@pytest.mark.parametrize("causal", [False, True])
@requires_cuda
def test_padding_tiles_are_skipped(causal):
    """Key tiles that are all padding are never read: their K / V are NaN here, which would poison
    any output or gradient they were multiplied into."""
    tile = _compiled.cuda.attention_tile_n
    dtype = torch.float16
    b, nq, nk, h, d = 3, 70, 3 * tile + 9, 1, 64
    q, k, v, _ = _inputs(b, nq, nk, h, d, dtype=dtype, seed=7)
    mask = _tile_emptying_mask(b, nk, tile)
    n_tiles = -(-nk // tile)
    padded = mask.new_zeros(b, n_tiles * tile)
    padded[:, :nk] = mask
    tile_has_key = padded.view(b, n_tiles, tile).any(-1)
    assert torch.equal(ops_attn._cuda_tile_any(mask.cuda()).cpu(), tile_has_key)
    kp, vp = k.clone(), v.clone()
    for bi in range(b):
        for t in range(n_tiles):
            if not tile_has_key[bi, t]:
                kp[bi, t * tile:(t + 1) * tile] = float("nan")
                vp[bi, t * tile:(t + 1) * tile] = float("nan")
    assert torch.isnan(vp).any()
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    want_o, want_g = _ref_grads(q, k, v, mask, causal, do)
    lowp_o = _naive(q, k, v, mask, causal, dtype=dtype)
    lowp_g = _lowp_grads(q, k, v, mask, causal, do)
    o, got_g = _grads(*_dev(q, kp, vp, mask), causal, do.cuda())
    assert torch.isfinite(o).all()
    assert_lowp_close(o.cpu(), want_o, lowp_o, name="o")
    _check_grads(got_g, want_g, lowp_g, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@requires_cuda
def test_strided_views_of_fused_qkv(dtype):
    b, n, h, d = 2, 37, 2, 64
    qkv = torch.randn(b, n, 3, h, d, generator=torch.Generator().manual_seed(3)).to(dtype).cuda()
    q, k, v = qkv.unbind(2)  # strides (n*3*h*d, 3*h*d, d, 1): read in place
    assert not q.is_contiguous()
    do = torch.randn(b, n, h, d).to(dtype)
    want_o, want_g = _ref_grads(q, k, v, None, True, do)
    o, got_g = _grads(q, k, v, None, True, do.cuda())
    assert_lowp_close(o.cpu(), want_o, _naive(q.cpu(), k.cpu(), v.cpu(), None, True, dtype=dtype), name="o")
    _check_grads(got_g, want_g, _lowp_grads(q, k, v, None, True, do), dtype, "fused qkv")
    # the same values behind a pointer that is not 16-byte aligned: copied, then the same result
    flat = torch.empty(q.numel() + 1, dtype=dtype, device="cuda")
    q_odd = flat[1:].view(q.shape)
    q_odd.copy_(q)
    assert q_odd.data_ptr() % 16 != 0
    o_odd, _ = _fwd(q_odd, k, v, None, True)
    o_ref, _ = _fwd(q.contiguous(), k.contiguous(), v.contiguous(), None, True)
    assert torch.equal(o_odd, o_ref)
    assert torch.equal(o_ref, o.detach())


# ---- backward ------------------------------------------------------------------------------------
BWD_CASES = [  # (b, nq, nk, h, d, causal, masked)
    (2, 65, 65, 1, 64, True, True),
    (2, 33, 7, 1, 80, True, True),     # cross, Nq > Nk, causal: dead rows
    (1, 5, 70, 2, 128, False, True),   # Nq < Nk
    (2, 40, 40, 1, 96, False, False),
    (1, 1, 1, 1, 32, True, False),     # N = 1
    (2, 257, 129, 2, 64, False, True),
    (1, 17, 300, 1, 32, True, True),   # causal, Nq < Nk: every query sees the long prefix
    (2, 100, 100, 2, 128, True, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,nq,nk,h,d,causal,masked", BWD_CASES)
@requires_cuda
def test_backward_flash_rule(dtype, b, nq, nk, h, d, causal, masked):
    q, k, v, mask = _inputs(b, nq, nk, h, d, dtype=dtype, masked=masked, full_mask_batch=1, seed=3)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    _, want = _ref_grads(q, k, v, mask, causal, do)
    lowp = _lowp_grads(q, k, v, mask, causal, do)
    _, got = _grads(*_dev(q, k, v, mask), causal, do.cuda())
    _check_grads(got, want, lowp, dtype)


@requires_cuda
def test_backward_is_bitwise_repeatable(monkeypatch):
    """The deterministic backward (no atomics): two runs give identical bits, and so does the op
    with FLUID_OPS_CUDA_ATTENTION_BWD=atomic while torch's deterministic algorithms are on (they
    force the deterministic passes)."""
    dtype = torch.bfloat16
    q, k, v, mask = _dev(*_inputs(2, 200, 333, 2, 64, dtype=dtype, masked=True, full_mask_batch=1, seed=5))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(dtype).cuda()
    o, lse = _fwd(q, k, v, mask, True)
    first = ops_attn._cuda_backward(do, q, k, v, o, lse, mask, True, 0.125, deterministic=True)
    second = ops_attn._cuda_backward(do, q, k, v, o, lse, mask, True, 0.125, deterministic=True)
    monkeypatch.setenv("FLUID_OPS_CUDA_ATTENTION_BWD", "atomic")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with fluid_ops.use_backend("cuda"):
            third = torch.ops.fluid_ops.attention_bwd(do, q, k, v, o, lse, mask, True, 0.125)
    finally:
        torch.use_deterministic_algorithms(before)
    for name, a, b2, c in zip("qkv", first, second, third):
        assert torch.equal(a, b2) and torch.equal(a, c), f"d{name} differs between runs"


def test_backward_mode_env(monkeypatch):
    monkeypatch.delenv("FLUID_OPS_CUDA_ATTENTION_BWD", raising=False)
    assert ops_attn._cuda_deterministic_backward()
    monkeypatch.setenv("FLUID_OPS_CUDA_ATTENTION_BWD", "atomic")
    assert ops_attn._cuda_deterministic_backward() == torch.are_deterministic_algorithms_enabled()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert ops_attn._cuda_deterministic_backward()  # torch's switch forces the deterministic passes
    finally:
        torch.use_deterministic_algorithms(before)
    monkeypatch.setenv("FLUID_OPS_CUDA_ATTENTION_BWD", "fast")
    with pytest.raises(ValueError, match="FLUID_OPS_CUDA_ATTENTION_BWD must be"):
        ops_attn._cuda_deterministic_backward()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,nq,nk,h,d,causal,masked", [BWD_CASES[0], BWD_CASES[1], BWD_CASES[2], BWD_CASES[5],
                                                       (2, 100, 100, 2, 80, True, False)])
@requires_cuda
def test_backward_atomic_mode(dtype, b, nq, nk, h, d, causal, masked):
    """The atomic-dq mode against the reference (2x rule) and against the deterministic mode
    (dk / dv are computed identically; dq only differs by summation order)."""
    q, k, v, mask = _inputs(b, nq, nk, h, d, dtype=dtype, masked=masked, full_mask_batch=1, seed=3)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    _, want = _ref_grads(q, k, v, mask, causal, do)
    lowp = _lowp_grads(q, k, v, mask, causal, do)
    qd, kd, vd, md, dod = _dev(q, k, v, mask, do)
    o, lse = _fwd(qd, kd, vd, md, causal)
    scale = d ** -0.5
    atomic = ops_attn._cuda_backward(dod, qd, kd, vd, o, lse, md, causal, scale, deterministic=False)
    det = ops_attn._cuda_backward(dod, qd, kd, vd, o, lse, md, causal, scale, deterministic=True)
    _check_grads(atomic, want, lowp, dtype, "atomic")
    assert torch.equal(atomic[1], det[1]) and torch.equal(atomic[2], det[2])
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(atomic[0].float(), det[0].float(), rtol=tol, atol=tol)


@requires_cuda
def test_fully_masked_rows_are_zero_with_zero_grad():
    # batch 1: mask all False; causal with Nq > Nk: the first Nq - Nk rows see nothing
    q, k, v, mask = _inputs(2, 9, 4, 2, 32, dtype=torch.float16, masked=True, full_mask_batch=1)
    mask[0] = True
    o, (gq, gk, gv) = _grads(*_dev(q, k, v, mask), True, torch.randn(q.shape).half().cuda())
    o, gq, gk, gv = (t.cpu() for t in (o, gq, gk, gv))
    assert torch.isfinite(o).all()
    assert (o[1] == 0).all() and (o[0, :5] == 0).all() and (o[0, 5:].abs().sum(-1) > 0).all()
    for g in (gq, gk, gv):
        assert torch.isfinite(g).all()
    assert (gq[1] == 0).all() and (gk[1] == 0).all() and (gv[1] == 0).all()
    assert (gq[0, :5] == 0).all()


@requires_cuda
def test_empty_inputs():
    with fluid_ops.use_backend("cuda"):
        for shape_q, shape_k in [((0, 5, 2, 32), (0, 5, 2, 32)), ((2, 0, 2, 32), (2, 5, 2, 32))]:
            q = torch.randn(shape_q, device="cuda", dtype=torch.float16)
            k = torch.randn(shape_k, device="cuda", dtype=torch.float16)
            assert fluid_ops.attention(q, k, k.clone()).shape == shape_q
        q = torch.randn(2, 3, 2, 32, device="cuda", dtype=torch.float16, requires_grad=True)
        k = torch.randn(2, 0, 2, 32, device="cuda", dtype=torch.float16, requires_grad=True)
        o = fluid_ops.attention(q, k, k)
        assert o.shape == q.shape and (o == 0).all()
        (gq,) = torch.autograd.grad(o.float().sum(), (q,))
        assert (gq == 0).all()


@requires_cuda
def test_opcheck():
    utils = ("test_autograd_registration", "test_faketensor")
    q, k, v, mask = _dev(*_inputs(2, 9, 6, 2, 32, dtype=torch.float16, masked=True))
    with fluid_ops.use_backend("cuda"):
        torch.library.opcheck(torch.ops.fluid_ops.attention_fwd.default, (q, k, v, mask, True, 0.2), test_utils=utils)
        o, lse = torch.ops.fluid_ops.attention_fwd(q, k, v, mask, True, 0.2)
        torch.library.opcheck(torch.ops.fluid_ops.attention_bwd.default,
                              (torch.randn_like(o), q, k, v, o, lse, mask, True, 0.2), test_utils=utils)
        kc = torch.randn(2, 12, 2, 32, device="cuda", dtype=torch.float16)
        vc = torch.randn_like(kc)
        torch.library.opcheck(torch.ops.fluid_ops.attention_kvcache.default,
                              (q[:, :3], kc, vc, k[:, :3], v[:, :3], torch.tensor([2, 5], device="cuda"), True, 0.2),
                              test_utils=utils)


# ---- KV cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("nq,nnew,causal", [(4, 4, True), (1, 1, True), (2, 0, False), (1, 3, False), (70, 70, True)])
@requires_cuda
def test_kvcache_appends_and_attends_valid_prefix(nq, nnew, causal):
    """Rows past each batch's valid length hold NaN: they must be neither read nor overwritten."""
    dtype = torch.float16
    b, nmax, h, d = 3, 140, 2, 80
    g = torch.Generator().manual_seed(5)
    kc, vc = (torch.randn(b, nmax, h, d, generator=g).to(dtype) for _ in range(2))
    kn, vn = (torch.randn(b, nnew, h, d, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(b, nq, h, d, generator=g).to(dtype)
    lens = torch.tensor([0, 17, 136 - nnew], dtype=torch.int32)
    for bi, n in enumerate(lens.tolist()):
        kc[bi, n:] = float("nan")
        vc[bi, n:] = float("nan")
    want_k, want_v = kc.clone(), vc.clone()
    for bi in range(b):
        idx = torch.arange(int(lens[bi]), int(lens[bi]) + nnew)
        want_k[bi].index_put_((idx,), kn[bi])
        want_v[bi].index_put_((idx,), vn[bi])
    kc_d, vc_d, q_d, kn_d, vn_d, lens_d = _dev(kc.clone(), vc.clone(), q.clone(), kn.clone(), vn.clone(), lens.clone())
    with fluid_ops.use_backend("cuda"):
        o = fluid_ops.attention_kvcache(q_d, kc_d, vc_d, kn_d if nnew else None, vn_d if nnew else None,
                                        cache_seqlens=lens_d, causal=causal)
    for name, before, after in (("q", q, q_d), ("k_new", kn, kn_d), ("v_new", vn, vn_d), ("cache_seqlens", lens, lens_d)):
        assert torch.equal(before, after.cpu()), f"{name} was modified"
    assert torch.equal(kc_d.cpu().nan_to_num(), want_k.nan_to_num())
    assert torch.equal(vc_d.cpu().nan_to_num(), want_v.nan_to_num())
    assert torch.equal(torch.isnan(kc_d.cpu()), torch.isnan(want_k))
    o = o.cpu()
    assert torch.isfinite(o).all()
    for bi in range(b):
        n = int(lens[bi]) + nnew
        args = (q[bi:bi + 1], want_k[bi:bi + 1, :n], want_v[bi:bi + 1, :n])
        assert_lowp_close(o[bi:bi + 1], _naive(*args, causal=causal), _naive(*args, causal=causal, dtype=dtype),
                          name=f"batch {bi}")
    if nnew == 0:
        assert (o[0] == 0).all()  # empty cache, nothing appended: nothing to attend


@pytest.mark.parametrize("dtype", DTYPES)
@requires_cuda
def test_kvcache_decode_loop_matches_full_causal(dtype):
    """Prefill 5 tokens, then decode 3 one at a time, int64 lengths, a strided (head-major) cache."""
    b, h, d, n = 2, 2, 64, 8
    q, k, v, _ = _inputs(b, n, n, h, d, dtype=dtype, seed=4)
    ref64, lowp = _naive(q, k, v, causal=True), _naive(q, k, v, causal=True, dtype=dtype)
    q, k, v = _dev(q, k, v)
    kc = torch.zeros(b, h, 16, d, device="cuda", dtype=dtype).transpose(1, 2)  # (B, Nmax, H, D) view
    vc = torch.zeros(b, 16, h, d, device="cuda", dtype=dtype)
    lens = torch.zeros(b, dtype=torch.int64, device="cuda")
    outs = []
    with fluid_ops.use_backend("cuda"):
        for s0, s1 in [(0, 5), (5, 6), (6, 7), (7, 8)]:
            outs.append(fluid_ops.attention_kvcache(q[:, s0:s1], kc, vc, k[:, s0:s1], v[:, s0:s1], cache_seqlens=lens))
            lens += s1 - s0
    assert_lowp_close(torch.cat(outs, 1).cpu(), ref64, lowp)
    assert torch.equal(kc[:, :n].cpu(), k.cpu())


# ---- head dims the kernels are not compiled for (docs/contracts.md §2.1) -----------------------
def test_supports_hook_declines_large_head_dims():
    """D > 128 has no CUDA kernel: declined with the reason (checked before the device)."""
    why = ops_attn._cuda_supports(torch.zeros(1, 4, 1, 160, dtype=torch.float16))
    assert why is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [8, 16, 48, 160, 256])
@requires_cuda
def test_odd_head_dims(dtype, d):
    """D < 128 not compiled: zero-padded to the next kernel dim (forward, backward, KV cache);
    D > 128: declined with its reason (the reference runs it when not forced)."""
    b, nq, nk, h = 2, 33, 40, 2
    q, k, v, mask = _inputs(b, nq, nk, h, d, dtype=dtype, masked=True, full_mask_batch=1, seed=d)
    if d > 128:
        with pytest.raises(RuntimeError, match=f"head dim {d} > 128 has no compiled kernel"):
            _fwd(*_dev(q, k, v, mask), True)
        o = fluid_ops.attention(*_dev(q, k, v), key_padding_mask=mask.cuda(), causal=True)  # automatic choice
        assert_lowp_close(o.cpu(), _naive(q, k, v, mask, True), _naive(q, k, v, mask, True, dtype=dtype))
        return
    o, _ = _fwd(*_dev(q, k, v, mask), True)
    assert o.shape == q.shape and o.is_contiguous()
    assert_lowp_close(o.cpu(), _naive(q, k, v, mask, True), _naive(q, k, v, mask, True, dtype=dtype),
                      name=f"{dtype} o")
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    _, want = _ref_grads(q, k, v, mask, True, do)
    _, got = _grads(*_dev(q, k, v, mask), True, do.cuda())
    _check_grads(got, want, _lowp_grads(q, k, v, mask, True, do), dtype)
    kc, vc = torch.zeros(b, 12, h, d, dtype=dtype).cuda(), torch.zeros(b, 12, h, d, dtype=dtype).cuda()
    lens = torch.tensor([0, 4]).cuda()
    with fluid_ops.use_backend("cuda"):
        o = fluid_ops.attention_kvcache(*_dev(q[:, :3]), kc, vc, *_dev(k[:, :3], v[:, :3]), cache_seqlens=lens)
    assert torch.equal(kc[1, 4:7].cpu(), k[1, :3]) and torch.equal(vc[0, :3].cpu(), v[0, :3])
    for bi in range(b):
        n = int(lens[bi]) + 3
        kk, vv = kc[bi:bi + 1, :n].cpu(), vc[bi:bi + 1, :n].cpu()
        qq = q[bi:bi + 1, :3]
        assert_lowp_close(o[bi:bi + 1].cpu(), _naive(qq, kk, vv, causal=True), _naive(qq, kk, vv, causal=True, dtype=dtype))
