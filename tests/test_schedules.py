"""Random-order machinery (docs/contracts.md §2.4) against its formulas and MAR's behaviour: mask and CFG
schedules, orders, the truncated-normal mask ratio, training masks, label dropout, next_mask."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fluid_ops.reference import schedules as sch


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- mask schedule ------------------------------------------------------------------------
def test_mask_schedule_l256_k64():
    counts = sch.mask_schedule(256, 64)
    k = np.arange(64)
    cosine = np.floor(256 * np.cos(np.pi / 2 * (k + 1) / 64)).astype(int)
    assert len(counts) == 64 and cosine[-1] == 0
    want, before = [], 256
    for f in cosine[:-1]:  # docs/contracts.md: the cosine count, lowered to unmask at least one per step
        before = min(before - 1, int(f))
        want.append(before)
    assert counts == want + [0]
    # early the cosine is flat (255, 255, 255, 254, ...) and the one-per-step rule decides;
    # from step 11 on the cosine falls faster and the counts are the formula itself
    assert cosine[:4].tolist() == [255, 255, 255, 254] and counts[:4] == [255, 254, 253, 252]
    assert counts[11:-1] == cosine[11:-1].tolist() and counts[10] == cosine[10] - 1
    assert counts[31] == 181 and counts[-2] == 6 and counts[-1] == 0


@pytest.mark.parametrize("L,K", [(256, 64), (256, 256), (256, 1), (256, 2), (16, 16), (1, 1), (1024, 64),
                                 (64, 100), (10, 16), (3, 64)])
def test_mask_schedule_rules(L, K):
    counts = sch.mask_schedule(L, K)
    assert len(counts) == K and counts[-1] == 0
    before = [L] + counts[:-1]
    for k in range(K):
        f = math.floor(L * math.cos(math.pi / 2 * (k + 1) / K))
        assert 0 <= counts[k] <= before[k]
        if k < K - 1:
            assert counts[k] <= f or counts[k] == 1  # never more masked than the cosine allows
        if K <= L:  # docs/contracts.md: at least one token unmasked per step
            assert counts[k] <= before[k] - 1
        else:  # one per step cannot last K > L steps: MAR's rule, count held at 1 until the end
            assert counts[k] == (max(1, min(before[k] - 1, f)) if k < K - 1 else 0)


def test_mask_schedule_k_greater_than_l_is_mars_rule():
    # MAR's sample_tokens with L = 10, K = 16: one token per step down to 1, held, then 0
    assert sch.mask_schedule(10, 16) == [9, 8, 7, 6, 5, 4, 3, 2, 1, 1, 1, 1, 1, 1, 1, 0]
    assert sch.mask_schedule(1, 3) == [1, 1, 0]
    assert sch.mask_schedule(5, 1) == [0]


@pytest.mark.parametrize("bad,match", [((0, 64), "seq_len must be >= 1"), ((256, 0), "num_steps must be >= 1"),
                                       ((256.0, 64), "seq_len must be a Python int")])
def test_mask_schedule_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sch.mask_schedule(*bad)


# ---- CFG schedule ---------------------------------------------------------------------------
def test_cfg_schedule_linear_and_constant():
    L, K, w = 256, 64, 3.0
    masked = sch.mask_schedule(L, K)
    lin = sch.cfg_schedule(w, L, K, "linear")
    assert len(lin) == K
    for k in range(K - 1):  # docs/contracts.md: w_k = 1 + (w - 1) (L - masked_after_k) / L
        assert lin[k] == pytest.approx(1 + (w - 1) * (L - masked[k]) / L, abs=1e-12)
    assert lin[0] == pytest.approx(1 + 2.0 / 256)
    # MAR's mask_len on the last step is 1 (its max(1, .)), so the last scale is just under w
    assert lin[-1] == pytest.approx(1 + (w - 1) * 255 / 256)
    assert all(a < b for a, b in zip(lin, lin[1:]))
    assert sch.cfg_schedule(w, L, K, "constant") == [w] * K
    assert sch.cfg_schedule(1.0, L, K) == [1.0] * K
    with pytest.raises(ValueError, match="kind must be 'linear' or 'constant'"):
        sch.cfg_schedule(w, L, K, "cosine")


# ---- orders, ratio, masks -------------------------------------------------------------------
def test_random_orders_are_permutations_and_deterministic():
    o = sch.random_orders(64, 256, generator=_gen(0))
    assert o.shape == (64, 256) and o.dtype == torch.int64
    assert torch.equal(o.sort(1).values, torch.arange(256).expand(64, -1))
    assert torch.equal(o, sch.random_orders(64, 256, generator=_gen(0)))
    assert not torch.equal(o, sch.random_orders(64, 256, generator=_gen(1)))
    assert len({tuple(r) for r in o.tolist()}) == 64  # rows independent
    # every position is about equally likely first: 6400 orders of 8, 800 each expected
    first = sch.random_orders(6400, 8, generator=_gen(2))[:, 0]
    counts = torch.bincount(first, minlength=8).double()
    assert ((counts - 800) ** 2 / 800).sum() < 30  # chi-square, 7 dof
    assert sch.random_orders(0, 5, generator=_gen(0)).shape == (0, 5)


def _truncnorm_stats(lo=0.7, mean=1.0, std=0.25):
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    a, b = (lo - mean) / std, 0.0
    mass = phi(b) - phi(a)
    return mean + std * (pdf(a) - pdf(b)) / mass, (lambda x: (phi((x - mean) / std) - phi(a)) / mass)


def test_mask_ratio_truncated_normal():
    r = sch.mask_ratio(generator=_gen(0), size=20000)
    assert r.dtype == torch.float64 and r.shape == (20000,)
    assert float(r.min()) >= 0.7 and float(r.max()) <= 1.0
    want_mean, cdf = _truncnorm_stats()
    assert want_mean == pytest.approx(0.8670, abs=1e-3)
    # standard error ~0.0006; the untruncated mean (1.0), a half-normal on (-inf, 1] (0.80) and a
    # uniform on [0.7, 1] (0.85) are all far outside
    assert abs(float(r.mean()) - want_mean) < 0.003
    for x in (0.75, 0.8, 0.9, 0.95):  # the shape, not only the mean
        assert abs(float((r < x).double().mean()) - cdf(x)) < 0.015
    one = sch.mask_ratio(generator=_gen(5))
    assert isinstance(one, float) and 0.7 <= one <= 1.0
    assert one == sch.mask_ratio(generator=_gen(5)) != sch.mask_ratio(generator=_gen(6))
    with pytest.raises(ValueError, match="need std > 0"):
        sch.mask_ratio(generator=_gen(0), std=0.0)


@pytest.mark.parametrize("ratio", [0.7, 0.8671, 1.0, 0.0])
def test_training_mask(ratio):
    orders = sch.random_orders(5, 256, generator=_gen(3))
    mask = sch.training_mask(5, 256, ratio, orders)
    num = math.ceil(256 * ratio)
    assert mask.dtype == torch.float32 and mask.shape == (5, 256)
    assert mask.sum(1).tolist() == [num] * 5
    assert bool((mask.gather(1, orders[:, :num]) == 1).all())  # the first positions of each order
    assert bool((mask.gather(1, orders[:, num:]) == 0).all())
    with pytest.raises(ValueError, match="orders must have shape"):
        sch.training_mask(4, 256, ratio, orders)


def test_null_condition_mask():
    m = sch.null_condition_mask(20000, 0.1, generator=_gen(0))
    assert m.dtype == torch.bool and m.shape == (20000,)
    assert abs(float(m.float().mean()) - 0.1) < 0.008  # sd 0.0021
    assert torch.equal(m, sch.null_condition_mask(20000, 0.1, generator=_gen(0)))
    assert not bool(sch.null_condition_mask(100, 0.0, generator=_gen(0)).any())
    assert bool(sch.null_condition_mask(100, 1.0, generator=_gen(0)).all())
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        sch.null_condition_mask(4, 1.5, generator=_gen(0))


# ---- the whole sampling loop ----------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 300), K=st.integers(1, 80), B=st.integers(1, 4), seed=st.integers(0, 1000))
def test_sampling_loop_reveals_every_token_once(L, K, B, seed):
    orders = sch.random_orders(B, L, generator=_gen(seed))
    mask = torch.ones(B, L)
    seen = torch.zeros(B, L, dtype=torch.int64)
    for k, n_after in enumerate(sch.mask_schedule(L, K)):
        nxt = sch.next_mask(mask, orders, n_after)
        assert nxt.dtype == mask.dtype and nxt.sum(1).tolist() == [n_after] * B
        assert bool((nxt <= mask).all())  # a known token never becomes masked again
        pred = (mask.bool() & ~nxt.bool())
        if K <= L:
            assert bool(pred.any(1).all()), f"step {k} unmasks nothing"
        seen += pred.long()
        # the masked set is always a prefix of the order
        assert bool((nxt.gather(1, orders[:, :n_after]) == 1).all())
        mask = nxt
    assert bool((mask == 0).all()) and bool((seen == 1).all())


def test_next_mask_bad_inputs():
    mask, orders = torch.ones(2, 8), sch.random_orders(2, 8, generator=_gen(0))
    with pytest.raises(ValueError, match="num_masked_after must be in"):
        sch.next_mask(mask, orders, 9)
    with pytest.raises(ValueError, match="mask and orders must be"):
        sch.next_mask(mask, orders[:, :4], 2)
