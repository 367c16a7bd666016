"""sample_categorical: the CPU and CUDA kernels against the reference index for index (the CUDA
ones skip without a GPU), the reference
against docs/contracts.md §2.4 (frequencies of softmax(logits / T), argmax at T = 0, top-k / top-p never
pick excluded tokens), bad inputs, and the torch.library contract."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fluid_ops
from fluid_ops import _compiled
from fluid_ops.reference import categorical as ref
from tests.conftest import backend_params
from tests.helpers import assert_same_indices as _assert_same_indices, logits as _logits, uniform as _uniform

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run torch (and so the CPU kernel, which takes torch's thread count) on one thread: on a
    small shared machine OpenMP's spinning makes the reference 100x slower. The kernel's own
    threading is tested under explicit counts in test_backend_threads_and_layout."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _run(backend, logits, u, **kw):
    """The op on `backend`; the cuda backend gets the tensors on the GPU (strides kept) and its
    indices come back to the CPU."""
    dev = "cuda" if backend == "cuda" else "cpu"
    with fluid_ops.use_backend(backend):
        return fluid_ops.sample_categorical(logits.to(dev), uniform=u.to(dev), **kw).cpu()


# ---- backend against the reference ---------------------------------------------------------
GRID = [(1, 1), (7, 2), (300, 17), (7, 1024), (300, 1024), (1, 8192), (7, 8192)]


@pytest.mark.parametrize("backend", backend_params("cpu", "cuda"))
@pytest.mark.parametrize("n,v,dtype", [(n, v, d) for n, v in GRID for d in DTYPES])
def test_backend_matches_reference_grid(backend, n, v, dtype):
    # every temperature x top_k x top_p setting of docs/contracts.md §2.4's grid; small V also with ties
    for ties in (False, True) if v <= 1024 and n < 300 else (v < 1024,):
        logits = _logits(n, v, dtype, seed=n * v, ties=ties)
        u = _uniform(n, seed=v)
        for t in (0.0, 0.5, 1.0, 1.7):
            for k in (None, 1, min(5, v), v):
                for p in (None, 0.3, 0.9, 1.0):
                    kw = dict(temperature=t, top_k=k, top_p=p)
                    got = _run(backend, logits, u, **kw)
                    assert got.dtype == torch.int64 and got.shape == (n,)
                    _assert_same_indices(got, logits, u, **kw)


@pytest.mark.parametrize("backend", backend_params("cpu", "cuda"))
def test_backend_matches_reference_neg_inf_and_extremes(backend):
    logits = _logits(64, 300, neg_inf=True, seed=3)
    u = _uniform(64, seed=4)
    u[:4] = torch.tensor([0.0, 1 - 2**-53, 0.5, 1 - 2**-24], dtype=torch.float64)
    for t in (1e-30, 1e-3, 0.7, 50.0):  # tiny T: all weight on the max; huge T: nearly uniform
        for k, p in ((None, None), (3, None), (None, 0.5), (50, 0.95), (None, 1e-9)):
            kw = dict(temperature=t, top_k=k, top_p=p)
            got = _run(backend, logits, u, **kw)
            _assert_same_indices(got, logits, u, **kw)
            assert bool(torch.isfinite(logits.gather(1, got[:, None])).all()), "a -inf logit was sampled"


@pytest.mark.parametrize("backend", backend_params("cpu", "cuda"))
def test_backend_matches_reference_large_nucleus(backend):
    # more than 2048 top-k survivors: the kernel radix sorts them for top-p. Flat logits, bf16
    # ties, and T near float32's max, where every s underflows to -0.0 or is +0.0 (one key).
    g = torch.Generator().manual_seed(21)
    flat = torch.randn(12, 8192, generator=g) * 0.05
    cases = [(flat, 1.0), (flat.bfloat16(), 0.7), (flat * 1e-6, 3e38), (_logits(12, 8192, ties=True), 1.3)]
    u = _uniform(12, seed=22)
    for logits, t in cases:
        for k, p in ((None, 0.5), (None, 0.97), (5000, 0.9), (None, 1e-6)):
            kw = dict(temperature=t, top_k=k, top_p=p)
            _assert_same_indices(_run(backend, logits, u, **kw), logits, u, **kw)


@pytest.mark.parametrize("backend", backend_params("cpu", "cuda"))
def test_backend_threads_and_layout(backend):
    logits = _logits(17, 300, seed=5).t()  # (300, 17), column-major: not contiguous
    assert not logits.is_contiguous()
    u = _uniform(300).float()  # float32 uniforms are accepted too
    settings_ = [dict(temperature=0.9, top_k=10), dict(temperature=1.3, top_p=0.8), dict(temperature=0.0)]
    wants = [ref.sample_categorical(logits, uniform=u, **kw) for kw in settings_]
    for threads in (2, 3, 7):  # rows split into 2, 3, 7 chunks (7 > cores: threads share them)
        torch.set_num_threads(threads)
        for kw, want in zip(settings_, wants):
            assert torch.equal(_run(backend, logits, u, **kw), want)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 6), v=st.integers(1, 40), t=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
       k=st.one_of(st.none(), st.integers(1, 40)), p=st.one_of(st.none(), st.floats(0.01, 1.0)),
       dtype=st.sampled_from(DTYPES), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_property_cpu_equals_reference_and_stays_in_range(n, v, t, k, p, dtype, ties, seed):
    k = None if k is None else min(k, v)
    logits = _logits(n, v, dtype, seed=seed, ties=ties)
    u = _uniform(n, seed=seed + 1)
    kw = dict(temperature=t, top_k=k, top_p=p)
    want = fluid_ops.sample_categorical(logits, uniform=u, **kw)  # default backend
    assert want.shape == (n,) and want.dtype == torch.int64
    assert bool(((want >= 0) & (want < v)).all())
    if k is not None:  # never outside the top-k (ties at the threshold allowed)
        kth = logits.float().topk(k, dim=1).values[:, -1]
        assert bool((logits.float().gather(1, want[:, None]).squeeze(1) >= kth).all())
    if _compiled.cpu is not None:
        _assert_same_indices(_run("cpu", logits, u, **kw), logits, u, **kw)


# ---- the reference against docs/contracts.md §2.4 --------------------------------------------------------
def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    expected = probs.double() * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return (((counts.double() - expected) ** 2)[keep] / expected[keep]).sum().item()


def _draw(logits_row, n, seed, backend="reference", **kw):
    logits = logits_row.expand(n, -1).contiguous()
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    idx = _run(backend, logits, u, **kw)
    return torch.bincount(idx, minlength=logits.shape[1])


# chi-square with 7 degrees of freedom: P(X > 35) ~ 1e-5, so a correct sampler passes; the
# wrong-temperature statistics asserted below are far above it.
CHI2_LIMIT = 35.0


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("t", [0.5, 1.0, 1.7])
def test_frequencies_match_softmax_over_temperature(backend, t):
    row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.2, 0.7])
    counts = _draw(row, 40000, seed=int(10 * t), backend=backend, temperature=t)
    assert _chi2(counts, torch.softmax(row.double() / t, 0)) < CHI2_LIMIT
    for wrong in (t * 0.8, t * 1.25, 1.0 if t != 1.0 else 1.3):  # the test can tell temperatures apart
        assert _chi2(counts, torch.softmax(row.double() / wrong, 0)) > 4 * CHI2_LIMIT


@pytest.mark.parametrize("k,p", [(3, None), (None, 0.6), (5, 0.8)])
def test_filtered_frequencies_match_renormalised_softmax(k, p):
    row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.2, 0.7])
    t = 1.3
    probs = torch.softmax(row.double() / t, 0)
    order = probs.argsort(descending=True)
    keep = torch.zeros(8, dtype=torch.bool)
    keep[order[: (k or 8)]] = True
    if p is not None:  # smallest set of the most probable (top-k survivors) reaching p
        q = torch.where(keep, probs, 0.0)
        q = q / q.sum()
        cum = q[order].cumsum(0)
        keep = torch.zeros(8, dtype=torch.bool)
        keep[order[: int((cum < p).sum()) + 1]] = True
    want = torch.where(keep, probs, 0.0)
    counts = _draw(row, 30000, seed=7, temperature=t, top_k=k, top_p=p)
    assert bool((counts[~keep] == 0).all()), "an excluded token was drawn"
    assert _chi2(counts, want / want.sum()) < CHI2_LIMIT


def test_temperature_zero_is_argmax_first_on_ties():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, float("-inf"), -0.5, -2.0]])
    for u in (0.0, 0.5, 0.999):
        got = fluid_ops.sample_categorical(logits, temperature=0.0, top_k=2, top_p=0.5,
                                           uniform=torch.full((3,), u))
        assert got.tolist() == [1, 0, 2]
    # a temperature that rounds to 0 in float32 is argmax too, on every backend
    for b in _backends_here():
        assert _run(b, logits, torch.full((3,), 0.7), temperature=1e-50).tolist() == [1, 0, 2]


def test_top_k_and_top_p_never_pick_excluded_tokens():
    logits = _logits(2000, 50, seed=11)
    u = _uniform(2000, seed=12)
    probs = torch.softmax(logits.double() / 0.8, 1)
    srt = probs.sort(1, descending=True).values
    got = fluid_ops.sample_categorical(logits, temperature=0.8, top_k=7, uniform=u)
    assert bool((probs.gather(1, got[:, None]).squeeze(1) >= srt[:, 6] * (1 - 1e-9)).all())
    got = fluid_ops.sample_categorical(logits, temperature=0.8, top_p=0.5, uniform=u)
    p_got = probs.gather(1, got[:, None]).squeeze(1)
    mass_above = torch.where(probs > p_got[:, None], probs, 0.0).sum(1)  # strictly more probable
    assert bool((mass_above < 0.5 + 1e-9).all()), "a token beyond the top-p nucleus was drawn"
    assert len(set(got.tolist())) > 1


def test_tie_rules():
    # top-k keeps every token tied with the k-th; top-p keeps every token tied with the last one
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]]).expand(3000, -1).contiguous()
    u = _uniform(3000, seed=2)
    got = fluid_ops.sample_categorical(logits, top_k=1, uniform=u)
    assert set(got.tolist()) == {1, 2, 4}
    got = fluid_ops.sample_categorical(logits, top_p=0.01, uniform=u)
    assert set(got.tolist()) == {1, 2, 4}


def _backends_here():
    return ("reference", "cpu") if _compiled.cpu is not None else ("reference",)


def test_inverse_cdf_in_index_order():
    # kept tokens of probability 1/4, 1/2, 1/4 after a -inf one: u picks by cumulative sums
    # 0.25, 0.75, 1; u = 0 must skip the zero-probability token (C_j > u Z, strictly)
    logits = torch.log(torch.tensor([[0.0, 1.0, 2.0, 1.0]])).expand(7, -1).contiguous()
    u = torch.tensor([0.0, 0.2499, 0.2501, 0.7499, 0.7501, 0.9999, 1 - 2**-53], dtype=torch.float64)
    for b in _backends_here():
        assert _run(b, logits, u).tolist() == [1, 1, 2, 2, 3, 3, 3]


def test_top_p_stops_where_the_running_sum_reaches_p_exactly():
    # two tokens of weight 1 (s = 0) and three of weight e^-1; p chosen so that p * Z1 equals 2.0
    # exactly: the running sum reaches it at the second s = 0 token, so only those two are kept
    # (c_j >= p Z1; a strict > would take in the e^-1 tokens as well).
    w_b = math.exp(-1.0)
    if torch.tensor(-1.0, dtype=torch.float64).exp().item() != w_b:
        pytest.skip("torch's exp(-1) differs from libm's in the last bit")
    z1 = 0.0
    for w in (1.0, w_b, 1.0, w_b, w_b):  # index order
        z1 += w
    p = 2.0 / z1
    while p * z1 != 2.0:
        p = math.nextafter(p, 1.0 if p * z1 < 2.0 else 0.0)
    logits = torch.tensor([[0.0, -1.0, 0.0, -1.0, -1.0]]).expand(4000, -1).contiguous()
    u = _uniform(4000, seed=3)
    for b in _backends_here():
        assert set(_run(b, logits, u, top_p=p).tolist()) == {0, 2}
        assert set(_run(b, logits, u, top_p=math.nextafter(p, 1.0)).tolist()) == {0, 1, 2, 3, 4}


def test_generator_determinism_and_uniform_draw():
    logits = _logits(40, 30, seed=9)
    a = fluid_ops.sample_categorical(logits, generator=torch.Generator().manual_seed(5))
    b = fluid_ops.sample_categorical(logits, generator=torch.Generator().manual_seed(5))
    c = fluid_ops.sample_categorical(logits, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    u = torch.rand(40, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, ref.sample_categorical(logits, uniform=u))


def test_top_k_accepts_numpy_ints():
    logits, u = _logits(5, 9), _uniform(5)
    assert torch.equal(fluid_ops.sample_categorical(logits, top_k=np.int64(3), uniform=u),
                       fluid_ops.sample_categorical(logits, top_k=3, uniform=u))


def test_empty_batch_and_no_grad():
    out = fluid_ops.sample_categorical(torch.empty(0, 5))
    assert out.shape == (0,) and out.dtype == torch.int64
    out = fluid_ops.sample_categorical(torch.empty(0, 5), uniform=torch.empty(0))
    assert out.shape == (0,)
    x = torch.randn(4, 5, requires_grad=True)
    out = fluid_ops.sample_categorical(x, uniform=_uniform(4))
    assert out.dtype == torch.int64 and not out.requires_grad


def test_opcheck():
    logits = _logits(6, 20, seed=1)
    u = _uniform(6)
    for args in ((1.0, None, None), (0.7, 5, 0.9), (0.0, None, None)):
        torch.library.opcheck(torch.ops.fluid_ops.sample_categorical.default, (logits, u, *args))
    torch.library.opcheck(torch.ops.fluid_ops.sample_categorical.default,
                          (logits.to(torch.bfloat16), u.float(), 1.0, 3, None))


@pytest.mark.parametrize("bad,match", [
    (dict(logits=torch.randn(5)), "logits must have 2 dims"),
    (dict(logits=torch.randn(2, 3, 4)), "logits must have 2 dims"),
    (dict(logits=torch.randn(4, 5).double()), "logits must have dtype"),
    (dict(logits=torch.randint(0, 3, (4, 5))), "logits must have dtype"),
    (dict(logits=torch.empty(4, 0), uniform=torch.rand(4)), r"at least one category \(V >= 1\)"),
    (dict(logits=torch.tensor([[0.0, float("nan")]] * 4)), "row 0 has max nan"),
    (dict(logits=torch.tensor([[0.0, 1.0]] * 3 + [[0.0, float("inf")]])), "row 3 has max inf"),
    (dict(logits=torch.tensor([[0.0, 1.0]] * 2 + [[float("-inf")] * 2] * 2)), "row 2 has max -inf"),
    (dict(uniform=torch.rand(3)), r"uniform must have shape \(4\)"),
    (dict(uniform=torch.rand(4, 1)), r"uniform must have shape \(4\)"),
    (dict(uniform=torch.rand(4).half()), "uniform must have dtype"),
    (dict(uniform=torch.tensor([0.1, 0.2, 1.0, 0.3])), r"uniform values must be in \[0, 1\)"),
    (dict(uniform=torch.tensor([0.1, -0.2, 0.5, 0.3])), r"uniform values must be in \[0, 1\)"),
    (dict(uniform=torch.tensor([0.1, float("nan"), 0.5, 0.3])), r"uniform values must be in \[0, 1\)"),
    (dict(uniform=[0.1, 0.2, 0.3, 0.4]), "uniform must be a torch.Tensor"),
    (dict(uniform=torch.empty(4, device="meta")), "uniform is on meta but logits is on cpu"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(temperature=float("inf")), "temperature must be finite"),
    (dict(temperature=1e39), "temperature must be at most"),
    (dict(temperature="hot"), "temperature must be a real number"),
    (dict(top_k=0), r"top_k must be in \[1, 5\]"),
    (dict(top_k=6), r"top_k must be in \[1, 5\]"),
    (dict(top_k=2.0), "top_k must be None or an int"),
    (dict(top_k=True), "top_k must be None or an int"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), "top_p must be finite"),
])
def test_bad_inputs_name_the_argument(bad, match):
    args = dict(logits=torch.randn(4, 5), uniform=torch.rand(4), temperature=1.0, top_k=None, top_p=None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fluid_ops.sample_categorical(args["logits"], uniform=args["uniform"], temperature=args["temperature"],
                                     top_k=args["top_k"], top_p=args["top_p"])


@pytest.mark.skipif(_compiled.cpu is None, reason=str(_compiled.cpu_error))
def test_kernel_checks_its_own_arguments():
    # the second line of defence: called directly, the kernel raises instead of reading garbage
    # (every tensor is kept in a variable: a view holds only its pointer)
    v, k = _compiled.view, _compiled.cpu.sample_categorical
    out = torch.empty(2, dtype=torch.int64)
    u = torch.full((2,), 0.5, dtype=torch.float64)
    u_one = torch.full((2,), 1.0, dtype=torch.float64)
    u32 = u.float()
    zeros = torch.zeros(2, 2)
    nan_logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])
    with pytest.raises(ValueError, match="finite values or -inf"):
        k(v(nan_logits), v(u), 1.0, 0, 1.0, v(out), 2)
    with pytest.raises(ValueError, match="uniform values must be in"):
        k(v(zeros), v(u_one), 1.0, 0, 1.0, v(out), 1)
    with pytest.raises(ValueError, match="top_k must be in"):
        k(v(zeros), v(u), 1.0, 3, 1.0, v(out), 1)
    with pytest.raises(ValueError, match="uniform must be float64"):
        k(v(zeros), v(u32), 1.0, 0, 1.0, v(out), 1)
    with pytest.raises(ValueError, match="top_p must be in"):
        k(v(zeros), v(u), 1.0, 0, 0.0, v(out), 1)
    with pytest.raises(ValueError, match="temperature must be in"):
        k(v(zeros), v(u), 1e39, 0, 1.0, v(out), 1)


def test_spec_distribution_constant():
    # guard for the chi-square limit above: P(chi2_7 > 35) is about 1.2e-5
    x = CHI2_LIMIT / 2
    # survival function of chi-square with 7 dof, series form: Q(7/2, x)
    s = math.erfc(math.sqrt(x)) + math.exp(-x) / math.sqrt(math.pi) * sum(
        x ** (j + 0.5) / math.prod(i + 0.5 for i in range(j + 1)) for j in range(3))
    assert 1e-6 < s < 1e-4
