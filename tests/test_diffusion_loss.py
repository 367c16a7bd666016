"""fluid_ops.nn.diffusion_loss (masked rows only, z embedded once and broadcast to the
diffusion_batch_mul t-draws) against the reference `diffusion_loss` (which repeats target and z and
runs the head on every row): same value, same gradients w.r.t. z, target and every parameter."""
from __future__ import annotations

import pytest
import torch

import fluid_ops
from fluid_ops.nn import DenoiserMLP, diffusion_loss
from fluid_ops.reference import diffusion as rdiff
from tests.conftest import requires_cuda

C, Z, D = 4, 12, 32


def gen(seed):
    return torch.Generator().manual_seed(seed)


def head(cls=DenoiserMLP, blocks=2, dtype=torch.float32):
    torch.manual_seed(0)
    net = cls(C, D, 2 * C, Z, blocks).to(dtype)
    g = gen(1)
    with torch.no_grad():  # MAR zero-inits adaLN and the output layer: make every path non-trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=dtype))
    return net


def inputs(m, seed=2, masked=None, dtype=torch.float32):
    g = gen(seed)
    target = torch.randn(m, C, generator=g, dtype=dtype)
    z = torch.randn(m, Z, generator=g, dtype=dtype)
    mask = None
    if masked is not None:
        mask = torch.zeros(m, dtype=dtype)
        mask[masked] = 1.0
    return target, z, mask


def loss_and_grads(fn, net, target, z):
    net.zero_grad()
    target = target.clone().requires_grad_(True)
    z = z.clone().requires_grad_(True)
    loss = fn(net, target, z)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    return loss.detach(), z.grad, target.grad, grads


def assert_same(got, want, rtol, atol):
    (lg, zg, tg, pg), (lw, zw, tw, pw) = got, want
    torch.testing.assert_close(lg, lw, rtol=rtol, atol=atol)
    torch.testing.assert_close(zg, zw, rtol=rtol, atol=atol)
    torch.testing.assert_close(tg, tw, rtol=rtol, atol=atol)
    assert pg.keys() == pw.keys()
    for n in pw:
        torch.testing.assert_close(pg[n], pw[n], rtol=rtol, atol=atol, msg=lambda s, n=n: f"{n}: {s}")


MASKED = torch.tensor([7, 0, 3, 12, 5, 9, 16])  # not sorted, includes the first and the last row


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 2e-5, 2e-6)])
@pytest.mark.parametrize("mul", [1, 3])
@pytest.mark.parametrize("how", ["no-mask", "mask", "mask+index", "index"])
def test_equals_reference_loss_and_gradients(dtype, rtol, atol, mul, how):
    m = 17
    net = head(dtype=dtype)
    target, z, mask = inputs(m, masked=None if how == "no-mask" else MASKED, dtype=dtype)
    kw = dict(diffusion_batch_mul=mul)
    if how == "index":  # index alone: the mean over those rows == the reference with a 0/1 mask
        want = loss_and_grads(lambda n, tt, zz: rdiff.diffusion_loss(n, tt, zz, mask, generator=gen(4), **kw),
                              net, target, z)
        got = loss_and_grads(lambda n, tt, zz: diffusion_loss(n, tt, zz, index=MASKED, generator=gen(4), **kw),
                             net, target, z)
    else:
        index = MASKED if how == "mask+index" else None
        want = loss_and_grads(lambda n, tt, zz: rdiff.diffusion_loss(n, tt, zz, mask, generator=gen(4), **kw),
                              net, target, z)
        got = loss_and_grads(lambda n, tt, zz: diffusion_loss(n, tt, zz, mask, index=index, generator=gen(4), **kw),
                             net, target, z)
    assert_same(got, want, rtol, atol)
    if how != "no-mask":  # rows that do not count get no gradient at all
        unmasked = torch.ones(m, dtype=torch.bool)
        unmasked[MASKED] = False
        assert not got[1][unmasked].any() and not got[2][unmasked].any()


def test_given_t_and_noise_fractional_mask_and_reference_head():
    """t / noise given (all M * mul rows, as the reference takes them), a mask with non-0/1
    weights, and MAR's plain head (fluid_ops.reference.DenoiserMLP: no c_repeats, z repeated)."""
    m, mul = 11, 2
    g = gen(9)
    t = torch.randint(0, 1000, (m * mul,), generator=g)
    noise = torch.randn(m * mul, C, generator=g)
    target, z, _ = inputs(m)
    mask = torch.zeros(m)
    mask[[1, 4, 5, 10]] = torch.tensor([1.0, 0.5, 2.0, 1.0])
    for net in (head(), head(cls=fluid_ops.reference.DenoiserMLP)):
        kw = dict(diffusion_batch_mul=mul, t=t, noise=noise)
        want = loss_and_grads(lambda n, tt, zz: rdiff.diffusion_loss(n, tt, zz, mask, **kw), net, target, z)
        got = loss_and_grads(lambda n, tt, zz: diffusion_loss(n, tt, zz, mask, **kw), net, target, z)
        assert_same(got, want, 2e-5, 2e-6)


def test_time_embedding_table_path_equals_reference():
    """K * mul > T rows: the time embedding runs on the T timesteps once and is gathered."""
    m, mul = 600, 4  # 300 masked rows x 4 draws = 1200 > 1000
    net = head(blocks=1)
    idx = torch.arange(0, m, 2)
    target, z, mask = inputs(m, masked=idx)
    calls = []
    h = net.time_embed.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    got = loss_and_grads(lambda n, tt, zz: diffusion_loss(n, tt, zz, mask, index=idx, generator=gen(5),
                                                          diffusion_batch_mul=mul), net, target, z)
    h.remove()
    assert calls == [1000]
    want = loss_and_grads(lambda n, tt, zz: rdiff.diffusion_loss(n, tt, zz, mask, generator=gen(5),
                                                                 diffusion_batch_mul=mul), net, target, z)
    assert_same(got, want, 2e-5, 2e-6)


def test_head_runs_on_masked_rows_and_embeds_z_once():
    m, mul = 17, 4
    net = head()
    target, z, mask = inputs(m, masked=MASKED)
    seen = {"net": [], "cond": [], "time": []}
    hooks = [net.register_forward_hook(lambda mod, a, o: seen["net"].append((a[0].shape[0], a[2].shape[0]))),
             net.cond_embed.register_forward_hook(lambda mod, a, o: seen["cond"].append(a[0].shape[0])),
             net.time_embed.register_forward_hook(lambda mod, a, o: seen["time"].append(a[0].shape[0]))]
    diffusion_loss(net, target, z, mask, index=MASKED, diffusion_batch_mul=mul, generator=gen(0))
    for h in hooks:
        h.remove()
    k = len(MASKED)
    assert seen == {"net": [(k * mul, k)], "cond": [k], "time": [k * mul]}


def test_same_draws_as_reference_and_generator_advance():
    """A seed gives the reference's loss, and the generator ends in the same state."""
    m = 9
    net = head()
    target, z, mask = inputs(m, masked=torch.tensor([2, 3, 8]))
    g1, g2 = gen(6), gen(6)
    with torch.no_grad():
        a = rdiff.diffusion_loss(net, target, z, mask, generator=g1)
        b = diffusion_loss(net, target, z, mask, generator=g2)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_checkpoint_gives_same_loss_and_grads():
    m = 10
    net = head()
    target, z, mask = inputs(m, masked=torch.tensor([0, 4, 9]))
    idx = torch.tensor([0, 4, 9])
    plain = loss_and_grads(lambda n, tt, zz: diffusion_loss(n, tt, zz, mask, index=idx, generator=gen(3)), net, target, z)
    ckpt = loss_and_grads(lambda n, tt, zz: diffusion_loss(n, tt, zz, mask, index=idx, generator=gen(3),
                                                           checkpoint=True), net, target, z)
    assert_same(ckpt, plain, 0, 0)


def test_forward_c_repeats_equals_repeated_condition():
    net = head()
    g = gen(8)
    x, c = torch.randn(12, C, generator=g), torch.randn(4, Z, generator=g)
    t = torch.randint(0, 1000, (12,), generator=g)
    with torch.no_grad():
        want = net(x, t, c.repeat(3, 1))
        torch.testing.assert_close(net(x, t, c, c_repeats=3), want, rtol=1e-6, atol=1e-6)
        t10 = t % 10  # 12 rows > 10 timesteps: the table path
        torch.testing.assert_close(net(x, t10, c, c_repeats=3, num_timesteps=10), net(x, t10, c.repeat(3, 1)),
                                   rtol=1e-6, atol=1e-6)
        assert net(x[:0], t[:0], c[:0], c_repeats=3).shape == (0, 2 * C)
    with pytest.raises(ValueError, match="c_repeats"):
        net(x, t, c, c_repeats=5)
    with pytest.raises(ValueError, match="c must have shape"):
        net(x, t, c, c_repeats=2)


def test_empty_selection_and_bad_arguments():
    net = head()
    target, z, mask = inputs(5, masked=torch.tensor([], dtype=torch.int64))
    # nothing to predict: 0 with a zero gradient (docs/contracts.md §3), not 0 / 0 = NaN
    for kw in (dict(mask=mask), dict(index=torch.tensor([], dtype=torch.int64)),
               dict(mask=mask, index=torch.tensor([1, 2]))):   # index rows whose mask is 0
        net.zero_grad(set_to_none=True)
        loss = diffusion_loss(net, target, z, generator=gen(0), **kw)
        assert loss.item() == 0.0
        loss.backward()
        assert all(p.grad is None or bool((p.grad == 0).all()) for p in net.parameters())
    net.zero_grad(set_to_none=True)
    ref_loss = rdiff.diffusion_loss(net, target, z, mask, generator=gen(0))   # the oracle agrees
    assert ref_loss.item() == 0.0
    ref_loss.backward()
    assert all(p.grad is None or bool((p.grad == 0).all()) for p in net.parameters())
    for bad_t in (torch.full((5,), -1), torch.full((5,), 1000)):
        with pytest.raises(ValueError, match=r"t must hold timesteps in \[0, 1000\)"):
            diffusion_loss(net, target, z, diffusion_batch_mul=1, t=bad_t)
    with pytest.raises(TypeError, match="t must have dtype"):
        diffusion_loss(net, target, z, diffusion_batch_mul=1, t=torch.zeros(5))
    with pytest.raises(ValueError, match=r"index must hold row numbers in \[0, 5\)"):
        diffusion_loss(net, target, z, index=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="z must have shape"):
        diffusion_loss(net, target, z[:4])
    with pytest.raises(ValueError, match="mask must have shape"):
        diffusion_loss(net, target, z, mask[:3])
    with pytest.raises(ValueError, match="diffusion_batch_mul"):
        diffusion_loss(net, target, z, diffusion_batch_mul=0)
    with pytest.raises(ValueError, match="t must have shape"):
        diffusion_loss(net, target, z, diffusion_batch_mul=2, t=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="noise must have shape"):
        diffusion_loss(net, target, z, diffusion_batch_mul=1, noise=torch.zeros(4, C))
    with pytest.raises(TypeError, match="index must have dtype"):
        diffusion_loss(net, target, z, index=torch.tensor([0.0]))


@requires_cuda
@pytest.mark.parametrize("mul", [1, 4])
def test_cuda_equals_reference_loss_and_gradients(mul):
    """On CUDA tensors (fused LN-modulate / gated-residual kernels, atomics in the index_select
    backwards): the same loss and gradients as the reference, to fp32 summation order."""
    m = 600  # 300 masked rows x 4 draws > 1000: the time-embedding table path too
    net = head().cuda()
    idx = torch.arange(0, m, 2)
    target, z, mask = inputs(m, masked=idx)
    target, z, mask, idx = target.cuda(), z.cuda(), mask.cuda(), idx.cuda()
    g = torch.Generator("cuda")
    want = loss_and_grads(lambda n, tt, zz: rdiff.diffusion_loss(n, tt, zz, mask, diffusion_batch_mul=mul,
                                                                 generator=g.manual_seed(3)), net, target, z)
    got = loss_and_grads(lambda n, tt, zz: diffusion_loss(n, tt, zz, mask, index=idx, diffusion_batch_mul=mul,
                                                          generator=g.manual_seed(3)), net, target, z)
    assert_same(got, want, 1e-4, 1e-5)
