"""The Triton attention kernels (fluid_ops/triton/attention.py) against the reference.

Where there is no GPU (CI) they run on CPU tensors in Triton's interpreter. TRITON_INTERPRET=1
must be in the environment before triton itself is first imported (its @jit library functions,
tl.max and co., are made interpretable or not then) and before the kernel module is: tests of
other files import triton too (torch.compile / opcheck do), so this module sets it when pytest
collects it, before any test runs, and removes it after its own tests. Other files' backend
choices do not change: the triton backend is never chosen automatically for CPU tensors.
The interpreter mishandles tl.dot on bf16, so bf16 runs only on the `cuda` params, which run
where a GPU is (there this module sets FLUID_OPS_TRITON_AUTOTUNE=0 instead). Shapes are small
(the interpreter is slow) but cross the interpreter's 32-wide tiles: N = 1, N not a multiple of the tile, Nq != Nk, D = 80 / 96, fully
masked rows, padding that empties whole key tiles, B = 0.
"""
import functools
import importlib
import importlib.util
import os

import pytest
import torch

import fluid_ops
from fluid_ops import backend
from tests.conftest import assert_lowp_close
from tests.helpers import attention_inputs as _inputs, fwd_on, grads_on, naive_attention as _naive
from tests.helpers import naive_attention_autograd_lowp as _naive_autograd_lowp, ref_grads as _ref_grads

ref = importlib.import_module("fluid_ops.reference.attention")

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_GPU = torch.cuda.is_available()
# On a GPU machine the kernels are compiled for the GPU; the interpreter (CPU tensors) runs here
# only where there is no GPU, or when the caller set TRITON_INTERPRET=1 for the whole process.
USE_INTERPRETER = HAVE_TRITON and (not HAVE_GPU or os.environ.get("TRITON_INTERPRET") == "1")


def _device_params():
    # Without triton the tests run and fail: ./run test installs it, so its absence is a defect.
    cpu_skip = (None if USE_INTERPRETER or not HAVE_TRITON else "a GPU is present: the kernels are compiled for it "
                "(CPU tensors need TRITON_INTERPRET=1 for the whole process)")
    cuda_skip = ("triton is not installed" if not HAVE_TRITON else
                 None if HAVE_GPU else "no CUDA device (these run on a GPU machine)")
    return [pytest.param("cpu", marks=pytest.mark.skipif(cpu_skip is not None, reason=str(cpu_skip))),
            pytest.param("cuda", marks=pytest.mark.skipif(cuda_skip is not None, reason=str(cuda_skip)))]


DEVICES = _device_params()

# at collection (see the module docstring); on a GPU: FLUID_OPS_TRITON_AUTOTUNE=0, each of the many
# shapes here compiles one config instead of tuning over all (test_autotuned_launch tunes)
_ENV = {"TRITON_INTERPRET": "1"} if USE_INTERPRETER else {"FLUID_OPS_TRITON_AUTOTUNE": "0"}
_ENV_BEFORE = {k: os.environ.get(k) for k in _ENV}
os.environ.update(_ENV)


@pytest.fixture(scope="module", autouse=True)
def _environment_for_this_module():
    os.environ.update(_ENV)
    try:
        yield
    finally:
        for k, v in _ENV_BEFORE.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kernels():
    return importlib.import_module("fluid_ops.triton.attention")


def _lowp_dtypes(device):
    return [torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def _to(device, *ts):
    return tuple(None if t is None else t.to(device) for t in ts)


_fwd = functools.partial(fwd_on, "triton")
_grads = functools.partial(grads_on, "triton")


# ---- the interpreter really runs here (these tests cannot silently skip where no GPU is) ------
def test_triton_backend_runs_here():
    if USE_INTERPRETER:
        from fluid_ops import triton as fluid_triton
        assert fluid_triton.triton_library_interpretable(), (
            "triton was imported before TRITON_INTERPRET=1 was set (by a module collected before this one?): "
            "the interpreter tests cannot run; set TRITON_INTERPRET=1 in the environment")
    q, k, v, _ = _inputs(1, 3, 3, 1, 32)
    dev = "cuda" if HAVE_GPU and not USE_INTERPRETER else "cpu"
    o, _ = _fwd(*_to(dev, q, k, v), None, False)
    assert fluid_ops.backends()["triton"]["available"]
    assert _kernels().INTERPRETED == USE_INTERPRETER
    torch.testing.assert_close(o.cpu(), ref.attention(q, k, v), rtol=1e-5, atol=2e-6)


@pytest.mark.skipif(not USE_INTERPRETER, reason="interpreter only")
def test_cpu_tensors_use_triton_only_when_forced():
    q, k, v, mask = _inputs(2, 5, 6, 1, 32, masked=True)
    args = (q, k, v, mask, False, 0.2)
    assert backend.select("attention_fwd", q.device, *args)[0] == "cpu"
    with fluid_ops.use_backend("triton"):
        assert backend.select("attention_fwd", q.device, *args)[0] == "triton"
        with pytest.raises(RuntimeError, match="bfloat16 under the Triton interpreter"):
            fluid_ops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        big = torch.zeros(65536, 1, 1, 32)  # B·H past the grid's second axis: refused, not launched
        with pytest.raises(RuntimeError, match="grid limit"):
            fluid_ops.attention(big, big, big)


@pytest.mark.skipif(not (HAVE_GPU and HAVE_TRITON), reason="no CUDA device")
def test_cuda_tensors_choose_triton_after_cuda():
    q, k, v, mask = _to("cuda", *_inputs(2, 5, 6, 1, 32, dtype=torch.float16, masked=True))
    name = backend.select("attention_fwd", q.device, q, k, v, mask, False, 0.2)[0]
    cuda_has_it = "attention_fwd" in fluid_ops.backends()["cuda"]["ops"] and fluid_ops.backends()["cuda"]["available"]
    assert name == ("cuda" if cuda_has_it else "triton")


# ---- forward -----------------------------------------------------------------------------------
FWD_CASES = [  # (b, nq, nk, h, d, causal, masked)
    (1, 1, 1, 1, 64, False, False),    # N = 1
    (2, 1, 1, 1, 32, True, True),      # N = 1, batch 1 fully masked
    (2, 65, 65, 2, 80, True, True),    # D = 80, N not a multiple of the tile, causal + padding
    (1, 40, 40, 1, 96, False, True),   # D = 96
    (2, 33, 7, 1, 128, True, False),   # cross, Nq > Nk: the first 26 causal rows see nothing
    (2, 7, 70, 1, 64, True, True),     # Nq < Nk
    (2, 1, 100, 2, 64, False, True),   # decode-like
    (1, 65, 65, 1, 32, False, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,nq,nk,h,d,causal,masked", FWD_CASES)
def test_forward_fp32_matches_reference(device, b, nq, nk, h, d, causal, masked):
    q, k, v, mask = _inputs(b, nq, nk, h, d, masked=masked, full_mask_batch=1)
    want_o, want_lse = ref.attention_with_lse(q.double(), k.double(), v.double(), key_padding_mask=mask, causal=causal)
    o, lse = _fwd(*_to(device, q, k, v, mask), causal)
    assert o.dtype == torch.float32 and o.shape == q.shape and lse.shape == (b, h, nq)
    torch.testing.assert_close(o.cpu(), want_o.float(), rtol=1e-5, atol=2e-6)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(want_lse))  # -inf exactly where a row sees nothing
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.cpu()[fin], want_lse[fin].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,nq,nk,h,d,causal", [(2, 65, 65, 2, 64, True), (2, 33, 7, 1, 80, False),
                                                (1, 40, 70, 1, 128, True)])
def test_forward_lowp_flash_rule(device, b, nq, nk, h, d, causal):
    for dtype in _lowp_dtypes(device):
        q, k, v, mask = _inputs(b, nq, nk, h, d, dtype=dtype, masked=True)
        ref64 = _naive(q, k, v, mask, causal)
        ref_lowp = _naive(q, k, v, mask, causal, dtype=dtype)
        o, _ = _fwd(*_to(device, q, k, v, mask), causal)
        assert o.dtype == dtype
        assert_lowp_close(o.cpu(), ref64, ref_lowp, name=str(dtype))


def _tile_emptying_mask(b, nk, tile):
    """Masks whose padding covers whole key tiles of width `tile`: a padded tail, a hole in the
    middle, a single attendable key in the last tile."""
    mask = torch.zeros(b, nk, dtype=torch.bool)
    mask[0, :tile + 5] = True                  # tiles 2.. empty
    mask[1, :tile] = True
    mask[1, 2 * tile:] = True                  # tile 1 empty
    mask[2, nk - 1] = True                     # all but the last tile empty
    return mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_padding_tiles_are_skipped(device, causal):
    """Key tiles that are all padding are never read: their keys and values are NaN here, which
    would poison any output they were multiplied into; forward and backward match the reference
    computed on clean inputs, and the block list names exactly the non-empty tiles."""
    ta = _kernels()
    tile = ta.MASK_BLOCK_N
    b, nq, nk, h, d = 3, 40, 3 * tile + 9, 1, 64
    q, k, v, _ = _inputs(b, nq, nk, h, d, seed=7)
    mask = _tile_emptying_mask(b, nk, tile)
    n_tiles = -(-nk // tile)
    tile_has_key = mask.new_zeros(b, n_tiles * tile)
    tile_has_key[:, :nk] = mask
    tile_has_key = tile_has_key.view(b, n_tiles, tile).any(-1)
    kp, vp = k.clone(), v.clone()
    for bi in range(b):
        for t in range(n_tiles):
            if not tile_has_key[bi, t]:
                kp[bi, t * tile:(t + 1) * tile] = float("nan")
                vp[bi, t * tile:(t + 1) * tile] = float("nan")
    assert torch.isnan(vp).any()

    block_idx, block_cnt = ta.mask_block_list(mask.to(device))
    for bi in range(b):
        listed = tile_has_key[bi].nonzero().flatten().tolist()
        assert block_idx[bi, :len(listed)].tolist() == listed
        assert block_cnt[bi].tolist() == tile_has_key[bi].cumsum(0).tolist()

    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    want_o, want_g = _ref_grads(q, k, v, mask, causal, do)
    o, got_g = _grads(*_to(device, q, kp, vp, mask), causal, do.to(device))
    torch.testing.assert_close(o.cpu(), want_o.float(), rtol=1e-5, atol=2e-6)
    for name, g, w in zip("qkv", got_g, want_g):
        torch.testing.assert_close(g.cpu(), w.float(), rtol=1e-4, atol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_of_fused_qkv(device):
    b, n, h, d = 2, 37, 2, 64
    qkv = torch.randn(b, n, 3, h, d).to(device)
    q, k, v = qkv.unbind(2)  # strides (n*3*h*d, 3*h*d, d, 1): read in place
    assert not q.is_contiguous()
    do = torch.randn(b, n, h, d)
    want_o, want_g = _ref_grads(q, k, v, None, True, do)
    o, got_g = _grads(q, k, v, None, True, do.to(device))
    torch.testing.assert_close(o.cpu(), want_o.float(), rtol=1e-5, atol=2e-6)
    for name, g, w in zip("qkv", got_g, want_g):
        torch.testing.assert_close(g.cpu(), w.float(), rtol=1e-4, atol=1e-5, msg=f"d{name}")


# ---- backward ----------------------------------------------------------------------------------
BWD_CASES = [  # (b, nq, nk, h, d, causal)
    (2, 65, 65, 1, 64, True),
    (2, 33, 7, 1, 80, True),   # cross, Nq > Nk, causal: dead rows
    (1, 5, 70, 2, 128, False),
    (2, 40, 40, 1, 96, False),
    (1, 1, 1, 1, 32, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,nq,nk,h,d,causal", BWD_CASES)
def test_backward_fp32_matches_autograd_through_reference(device, b, nq, nk, h, d, causal):
    q, k, v, mask = _inputs(b, nq, nk, h, d, masked=True, full_mask_batch=1, seed=3)
    do = torch.randn(b, nq, h, d, generator=torch.Generator().manual_seed(9))
    _, want = _ref_grads(q, k, v, mask, causal, do)
    _, got = _grads(*_to(device, q, k, v, mask), causal, do.to(device))
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.cpu(), w.float(), rtol=1e-4, atol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,nq,nk,h,d,causal", [BWD_CASES[0], BWD_CASES[1]])
def test_backward_atomic_mode_matches_deterministic(device, b, nq, nk, h, d, causal):
    ta = _kernels()
    q, k, v, mask = _to(device, *_inputs(b, nq, nk, h, d, masked=True, full_mask_batch=1, seed=4))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device)
    o, lse = _fwd(q, k, v, mask, causal)
    det = ta.backward(do, q, k, v, o, lse, mask, causal, d ** -0.5, deterministic=True)
    det2 = ta.backward(do, q, k, v, o, lse, mask, causal, d ** -0.5, deterministic=True)
    atomic = ta.backward(do, q, k, v, o, lse, mask, causal, d ** -0.5, deterministic=False)
    for name, a, a2, c in zip("qkv", det, det2, atomic):
        assert torch.equal(a, a2), f"d{name}: the deterministic mode differs between two runs"
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6, msg=f"d{name}")


def test_backward_mode_env(monkeypatch):
    ta = _kernels()
    monkeypatch.delenv("FLUID_OPS_TRITON_ATTENTION_BWD", raising=False)
    assert ta.deterministic_backward_default()
    monkeypatch.setenv("FLUID_OPS_TRITON_ATTENTION_BWD", "atomic")
    assert ta.deterministic_backward_default() == torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("FLUID_OPS_TRITON_ATTENTION_BWD", "fast")
    with pytest.raises(ValueError, match="FLUID_OPS_TRITON_ATTENTION_BWD must be"):
        ta.deterministic_backward_default()


@pytest.mark.parametrize("device", DEVICES)
def test_backward_lowp_flash_rule(device):
    for dtype in _lowp_dtypes(device):
        q, k, v, mask = _inputs(2, 33, 40, 2, 64, dtype=dtype, masked=True)
        do = torch.randn(q.shape).to(dtype)
        _, want = _ref_grads(q, k, v, mask, True, do)
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        lowp = torch.autograd.grad(_naive_autograd_lowp(ql, kl, vl, mask), (ql, kl, vl), do)
        _, got = _grads(*_to(device, q, k, v, mask), True, do.to(device))
        for name, g, w, lo in zip("qkv", got, want, lowp):
            assert g.dtype == dtype
            assert_lowp_close(g.cpu(), w, lo, atol=1e-3, name=f"{dtype} d{name}")


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_are_zero_with_zero_grad(device):
    # batch 1: mask all False; causal with Nq > Nk: the first Nq - Nk rows see nothing
    q, k, v, mask = _inputs(2, 9, 4, 2, 32, masked=True, full_mask_batch=1)
    mask[0] = True
    o, (gq, gk, gv) = _grads(*_to(device, q, k, v, mask), True, torch.randn(q.shape).to(device))
    o, gq, gk, gv = (t.cpu() for t in (o, gq, gk, gv))
    assert torch.isfinite(o).all()
    assert (o[1] == 0).all() and (o[0, :5] == 0).all() and (o[0, 5:].abs().sum(-1) > 0).all()
    for g in (gq, gk, gv):
        assert torch.isfinite(g).all()
    assert (gq[1] == 0).all() and (gk[1] == 0).all() and (gv[1] == 0).all()
    assert (gq[0, :5] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    with fluid_ops.use_backend("triton"):
        for shape_q, shape_k in [((0, 5, 2, 32), (0, 5, 2, 32)), ((2, 0, 2, 32), (2, 5, 2, 32))]:
            q, k = torch.randn(shape_q, device=device), torch.randn(shape_k, device=device)
            assert fluid_ops.attention(q, k, k.clone()).shape == shape_q
        q = torch.randn(2, 3, 2, 32, device=device, requires_grad=True)
        k = torch.randn(2, 0, 2, 32, device=device, requires_grad=True)
        o = fluid_ops.attention(q, k, k)
        assert o.shape == q.shape and (o == 0).all()
        (gq,) = torch.autograd.grad(o.sum(), (q,))
        assert (gq == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """The triton implementations against the ops' fake kernels. (test_schema and
    test_aot_dispatch_dynamic check the op definitions, not a backend, and take seconds under the
    interpreter: test_attention.py runs them on the cpu backend; that the triton kvcache mutates
    only its caches is checked in the kvcache test below.)"""
    utils = ("test_autograd_registration", "test_faketensor")
    q, k, v, mask = _to(device, *_inputs(2, 9, 6, 2, 32, masked=True))
    with fluid_ops.use_backend("triton"):
        torch.library.opcheck(torch.ops.fluid_ops.attention_fwd.default, (q, k, v, mask, True, 0.2), test_utils=utils)
        o, lse = torch.ops.fluid_ops.attention_fwd(q, k, v, mask, True, 0.2)
        torch.library.opcheck(torch.ops.fluid_ops.attention_bwd.default,
                              (torch.randn_like(o), q, k, v, o, lse, mask, True, 0.2), test_utils=utils)
        kc, vc = torch.randn(2, 12, 2, 32, device=device), torch.randn(2, 12, 2, 32, device=device)
        torch.library.opcheck(torch.ops.fluid_ops.attention_kvcache.default,
                              (q[:, :3], kc, vc, k[:, :3], v[:, :3], torch.tensor([2, 5], device=device), True, 0.2),
                              test_utils=utils)


# ---- KV cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nq,nnew,causal", [(4, 4, True), (1, 1, True), (2, 0, False), (1, 3, False)])
def test_kvcache_appends_and_attends_valid_prefix(device, nq, nnew, causal):
    """Rows past each batch's valid length hold NaN: they must be neither read nor overwritten."""
    b, nmax, h, d = 3, 70, 2, 80
    g = torch.Generator().manual_seed(5)
    kc, vc = torch.randn(b, nmax, h, d, generator=g), torch.randn(b, nmax, h, d, generator=g)
    kn, vn = torch.randn(b, nnew, h, d, generator=g), torch.randn(b, nnew, h, d, generator=g)
    q = torch.randn(b, nq, h, d, generator=g)
    lens = torch.tensor([0, 17, 66 - nnew], dtype=torch.int32)
    for bi, n in enumerate(lens.tolist()):
        kc[bi, n:] = float("nan")
        vc[bi, n:] = float("nan")
    want_k, want_v = kc.clone(), vc.clone()
    for bi in range(b):
        idx = torch.arange(int(lens[bi]), int(lens[bi]) + nnew)
        want_k[bi].index_put_((idx,), kn[bi])
        want_v[bi].index_put_((idx,), vn[bi])
    kc_d, vc_d, q_d, kn_d, vn_d, lens_d = _to(device, kc.clone(), vc.clone(), q.clone(), kn.clone(), vn.clone(),
                                              lens.clone())
    with fluid_ops.use_backend("triton"):
        o = fluid_ops.attention_kvcache(q_d, kc_d, vc_d, kn_d if nnew else None, vn_d if nnew else None,
                                        cache_seqlens=lens_d, causal=causal)
    for name, before, after in (("q", q, q_d), ("k_new", kn, kn_d), ("v_new", vn, vn_d), ("cache_seqlens", lens, lens_d)):
        assert torch.equal(before, after.cpu()), f"{name} was modified"
    assert torch.equal(kc_d.cpu().nan_to_num(), want_k.nan_to_num())
    assert torch.equal(vc_d.cpu().nan_to_num(), want_v.nan_to_num())
    assert torch.equal(torch.isnan(kc_d.cpu()), torch.isnan(want_k))
    for bi in range(b):
        n = int(lens[bi]) + nnew
        want = _naive(q[bi:bi + 1], want_k[bi:bi + 1, :n], want_v[bi:bi + 1, :n], causal=causal)
        torch.testing.assert_close(o[bi:bi + 1].cpu(), want.float(), rtol=1e-5, atol=2e-6)
    if nnew == 0:
        assert (o[0] == 0).all()  # empty cache, nothing appended: nothing to attend


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_decode_loop_matches_full_causal(device):
    """Prefill 5 tokens, then decode 3 one at a time, int64 lengths, a strided (non-contiguous) cache."""
    b, h, d, n = 2, 2, 32, 8
    q, k, v, _ = _to(device, *_inputs(b, n, n, h, d, seed=4))
    want = ref.attention(q.cpu(), k.cpu(), v.cpu(), causal=True)
    kc = torch.zeros(b, h, 16, d, device=device).transpose(1, 2)  # (B, Nmax, H, D) view, head-major storage
    vc = torch.zeros(b, 16, h, d, device=device)
    lens = torch.zeros(b, dtype=torch.int64, device=device)
    outs = []
    with fluid_ops.use_backend("triton"):
        for s0, s1 in [(0, 5), (5, 6), (6, 7), (7, 8)]:
            outs.append(fluid_ops.attention_kvcache(q[:, s0:s1], kc, vc, k[:, s0:s1], v[:, s0:s1], cache_seqlens=lens))
            lens += s1 - s0
    torch.testing.assert_close(torch.cat(outs, 1).cpu(), want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(kc[:, :n].cpu(), k.cpu())


# ---- tuning ------------------------------------------------------------------------------------
@pytest.mark.skipif(not (HAVE_GPU and HAVE_TRITON) or USE_INTERPRETER, reason="autotuning runs on a GPU only")
@pytest.mark.parametrize("masked", [False, True])
def test_autotuned_launch(monkeypatch, masked):
    monkeypatch.setenv("FLUID_OPS_TRITON_AUTOTUNE", "1")
    q, k, v, mask = _inputs(4, 200, 300, 2, 64, dtype=torch.float16, masked=masked, full_mask_batch=1)
    do = torch.randn(q.shape).to(torch.float16)
    want_o, want_g = _ref_grads(q, k, v, mask, False, do)
    o, got = _grads(*_to("cuda", q, k, v, mask), False, do.to("cuda"))
    torch.testing.assert_close(o.cpu().double(), want_o, rtol=0, atol=5e-3)
    for name, g, w in zip("qkv", got, want_g):
        torch.testing.assert_close(g.cpu().double(), w, rtol=0, atol=2e-2, msg=f"d{name}")
    report = _kernels().tuning_report()
    assert {"forward", "backward_dkdv", "backward_dq"} <= set(report), report


def test_autotune_pruning():
    ta = _kernels()
    prune = ta._prune(True, "q_bucket", "BLOCK_M")
    masked = prune(ta.FWD_CONFIGS, {"q_bucket": 256}, HAS_MASK=True)
    assert masked and all(c.kwargs["BLOCK_N"] == ta.MASK_BLOCK_N for c in masked)
    long_rows = prune(ta.FWD_CONFIGS, {"q_bucket": 256}, HAS_MASK=False)
    assert long_rows == [c for c in ta.FWD_CONFIGS if c.kwargs["BLOCK_M"] >= 64]
    decode = prune(ta.FWD_CONFIGS, {"q_bucket": 16}, HAS_MASK=False)
    assert decode and all(c.kwargs["BLOCK_M"] <= 32 for c in decode)
    # the dk/dv pass prunes on the key count: every candidate has a 64- or 128-key tile
    dkdv = ta._prune(False, "k_bucket", "BLOCK_N")
    assert dkdv(ta.BWD_DKDV_CONFIGS, {"k_bucket": 512}, HAS_MASK=True) == ta.BWD_DKDV_CONFIGS
    assert ta._bucket(1) == 16 and ta._bucket(257) == 512 and ta._bucket(10 ** 6) == 16384


# ---- head dims the kernels are not compiled for (docs/contracts.md §2.1) -----------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [8, 16, 48, 160, 256])
def test_odd_head_dims(device, d):
    """D < 128 not a kernel dim: zero-padded to the next one (exact), forward, backward, fp32 and
    fp16 (bf16 on a GPU); D > 128: the triton backend declines it with its reason."""
    b, nq, nk, h = 2, 19, 23, 2
    q, k, v, mask = _inputs(b, nq, nk, h, d, masked=True, full_mask_batch=1, seed=d)
    if d > 128:
        with pytest.raises(RuntimeError, match=f"head dim {d} > 128 has no compiled kernel"):
            _fwd(*_to(device, q, k, v, mask), True)
        return
    want_o, _ = ref.attention_with_lse(q.double(), k.double(), v.double(), key_padding_mask=mask, causal=True)
    o, lse = _fwd(*_to(device, q, k, v, mask), True)
    assert o.shape == q.shape and lse.shape == (b, h, nq)
    torch.testing.assert_close(o.cpu(), want_o.float(), rtol=1e-5, atol=2e-6)
    do = torch.randn(b, nq, h, d, generator=torch.Generator().manual_seed(9))
    _, want = _ref_grads(q, k, v, mask, True, do)
    _, got = _grads(*_to(device, q, k, v, mask), True, do.to(device))
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g.cpu(), w.float(), rtol=1e-4, atol=1e-5, msg=f"d{name}")
    for dtype in _lowp_dtypes(device):
        ql, kl, vl = (t.to(dtype) for t in (q, k, v))
        o, _ = _fwd(*_to(device, ql, kl, vl, mask), True)
        assert o.dtype == dtype
        assert_lowp_close(o.cpu(), _naive(ql, kl, vl, mask, True), _naive(ql, kl, vl, mask, True, dtype=dtype),
                          name=str(dtype))
    # the KV cache: written in place, then read through the padded kernel
    kc, vc = torch.zeros(b, 12, h, d), torch.zeros(b, 12, h, d)
    lens = torch.tensor([0, 4])
    with fluid_ops.use_backend("triton"):
        qd, kc, vc, kn, vn, lens = _to(device, q[:, :3], kc, vc, k[:, :3], v[:, :3], lens)
        o = fluid_ops.attention_kvcache(qd, kc, vc, kn, vn, cache_seqlens=lens)
    assert torch.equal(kc[1, 4:7].cpu(), k[1, :3]) and torch.equal(vc[0, :3].cpu(), v[0, :3])
    for bi in range(b):
        n = int(lens[bi]) + 3
        kk = torch.zeros(1, n, h, d)
        kk[0, int(lens[bi]):] = k[bi, :3]
        vv = torch.zeros(1, n, h, d)
        vv[0, int(lens[bi]):] = v[bi, :3]
        torch.testing.assert_close(o[bi:bi + 1].cpu(), _naive(q[bi:bi + 1, :3], kk, vv, causal=True).float(),
                                   rtol=1e-5, atol=2e-6)
