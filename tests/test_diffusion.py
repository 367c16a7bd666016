"""fluid_ops.diffusion_sample (docs/contracts.md §2.3) against the reference loop, its host-to-device
discipline, determinism and bad inputs; and the reference training loss `diffusion_loss`."""
import io
from contextlib import redirect_stderr

import numpy as np
import pytest
import torch

import fluid_ops
from fluid_ops.reference import diffusion as rdiff
from tests.conftest import requires_cuda
from tests.helpers import BLOCKS, C, D, Z
from tests.helpers import RecordOps as _RecordOps, diffusion_inputs as _inputs, eps_net as _eps_net
from tests.helpers import loop_events as _loop_events


@pytest.fixture(scope="module")
def nets():
    ref = _eps_net()
    fast = fluid_ops.nn.DenoiserMLP(C, D, 2 * C, Z, BLOCKS)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def _close(got, want, rel=1e-4):
    scale = want.abs().max().item() + 1.0
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale)


def _both_paths_match(nets, z, noise, want, **kw):
    """fluid_ops.diffusion_sample(**kw) on the fast DenoiserMLP path and on the generic path (the
    reference net called as net(x, t, z)), each against `want`; returns the fast path's samples."""
    ref, fast = nets
    got = fluid_ops.diffusion_sample(fast, z, noise=noise, **kw)
    _close(got, want)
    _close(fluid_ops.diffusion_sample(ref, z, noise=noise, **kw), want, rel=1e-5)
    return got


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_fast_path_fp32_matches_reference_loop(nets, cfg, temperature):
    ref, _ = nets
    z, noise = _inputs(13, cfg, 15)
    with torch.no_grad():
        want = rdiff.diffusion_sample(ref, z, num_steps=15, temperature=temperature, cfg=cfg, noise=noise)
    assert want.abs().max() > 0.5  # the samples are not trivially zero
    # the generic path (any net called as net(x, t, z)) runs the same loop
    got = _both_paths_match(nets, z, noise, want, num_steps=15, temperature=temperature, cfg=cfg)
    assert got.shape == (13, C) and got.dtype == torch.float32


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_clip_denoised_matches_reference_loop_and_bounds_the_samples(nets, cfg):
    ref, _ = nets
    z, noise = _inputs(13, cfg, 15)
    with torch.no_grad():
        want = rdiff.diffusion_sample(ref, z, num_steps=15, temperature=0.9, cfg=cfg, noise=noise,
                                      clip_denoised=True)
        free = rdiff.diffusion_sample(ref, z, num_steps=15, temperature=0.9, cfg=cfg, noise=noise)
    assert free.abs().max() > 1.5  # this net's unclipped samples leave [-1, 1]: the clamp matters
    got = _both_paths_match(nets, z, noise, want, num_steps=15, temperature=0.9, cfg=cfg, clip_denoised=True)
    # the last step returns the clamped x_0 prediction itself
    assert got.abs().max() <= 1.0 and want.abs().max() <= 1.0


def test_temperature_zero_ignores_step_noise(nets):
    _, fast = nets
    z, noise = _inputs(6, 2.0, 12)
    other = noise.clone()
    other[1:] = torch.randn_like(other[1:])
    a = fluid_ops.diffusion_sample(fast, z, num_steps=12, temperature=0.0, cfg=2.0, noise=noise)
    b = fluid_ops.diffusion_sample(fast, z, num_steps=12, temperature=0.0, cfg=2.0, noise=other)
    c = fluid_ops.diffusion_sample(fast, z, num_steps=12, temperature=1.0, cfg=2.0, noise=other)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(b, c)


def test_bf16_gemms_match_fp32_in_distribution(nets):
    _, fast = nets
    z, noise = _inputs(256, 1.0, 20, seed=3)
    s32 = fluid_ops.diffusion_sample(fast, z, num_steps=20, noise=noise)
    s16 = fluid_ops.diffusion_sample(fast, z, num_steps=20, noise=noise, gemm_dtype=torch.bfloat16)
    assert s16.dtype == torch.float32 and torch.isfinite(s16).all()
    std = s32.std().item()
    assert (s16 - s32).abs().mean().item() < 0.05 * std
    assert abs(s16.std().item() / std - 1) < 0.05
    assert abs(s16.mean().item() - s32.mean().item()) < 0.05 * std
    assert not torch.equal(s16, s32)  # bf16 GEMMs really ran


def test_deterministic_for_a_seed_and_noise_drawn_as_reference(nets):
    _, fast = nets
    z, _ = _inputs(5, 1.0, 10)
    run = lambda seed: fluid_ops.diffusion_sample(fast, z, num_steps=10,  # noqa: E731
                                                  generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    noise = rdiff.draw_sampling_noise(5, C, 10, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(fluid_ops.diffusion_sample(fast, z, num_steps=10, noise=noise), a, rtol=0, atol=0)


@pytest.mark.parametrize("fast_path", [True, False])
def test_loop_does_no_host_transfer_or_sync(nets, fast_path):
    ref, fast = nets
    net = fast if fast_path else ref
    counts = {}
    for steps in (3, 9):
        z, noise = _inputs(4, 3.0, steps)
        fluid_ops.diffusion_sample(net, z, num_steps=steps, cfg=3.0, noise=noise)  # warm caches
        counts[steps] = _loop_events(net, z, noise, steps, 3.0)
    # Nothing per step: the same events for 3 and 9 steps, and never a value read back.
    assert counts[3] == counts[9], counts
    assert "aten._local_scalar_dense" not in counts[9], counts
    # The recorder does see such events (so the assertions above can fail).
    probe = _RecordOps()
    with probe:
        torch.ones(2).sum().item()
        torch.tensor([1.0])
    assert "aten._local_scalar_dense" in probe.events and "aten.lift_fresh" in probe.events


def test_empty_batch_and_progress(nets):
    _, fast = nets
    assert fluid_ops.diffusion_sample(fast, torch.empty(0, Z), num_steps=5).shape == (0, C)
    assert fluid_ops.diffusion_sample(fast, torch.empty(0, Z), num_steps=5, cfg=2.0).shape == (0, C)
    z, noise = _inputs(2, 1.0, 4)
    err = io.StringIO()
    with redirect_stderr(err):
        out = fluid_ops.diffusion_sample(fast, z, num_steps=4, noise=noise, progress=True)
    torch.testing.assert_close(out, fluid_ops.diffusion_sample(fast, z, num_steps=4, noise=noise), rtol=0, atol=0)
    assert "4/4" in err.getvalue() or "diffusion_sample" in err.getvalue()

def test_noise_shift_schedule_divides_every_snr_and_one_is_mars_schedule():
    plain = rdiff.DiffusionSchedule(None)
    assert np.array_equal(rdiff.DiffusionSchedule(None, noise_shift=1).betas, rdiff.cosine_betas(1000))
    for k in (0.5, 3.0, 8.0):
        shifted = rdiff.DiffusionSchedule(None, noise_shift=k)
        # the shifted cosine: SNR / k^2 exactly at every s
        grid = np.linspace(0, 1000, 41)
        ab, ab_k = rdiff.cosine_alpha_bar(grid), rdiff.cosine_alpha_bar(grid, 1000, k)
        np.testing.assert_allclose(ab_k / (1 - ab_k), ab / (1 - ab) / k ** 2, rtol=1e-9)
        # IDDPM's alpha_bar_i = prod(1 - beta) = f(i + 1) / f(0), f the shifted cosine (all steps but
        # the last, where max_beta clips)
        i = np.arange(999)
        f = rdiff.cosine_alpha_bar(i + 1, 1000, k) / rdiff.cosine_alpha_bar(0, 1000, k)
        np.testing.assert_allclose(shifted.alphas_cumprod[:-1], f, rtol=1e-9)
        # so the schedule's SNR is SNR / k^2 up to f(0) != 1 (1 - f(0) = k^2 * 1.5e-4: 1% at k = 8), and
        # noising x on it is noising x / k on the plain one, rescaled (same SNR)
        snr, snr_k = (s.alphas_cumprod / (1 - s.alphas_cumprod) for s in (plain, shifted))
        np.testing.assert_allclose(snr_k[:-1], snr[:-1] / k ** 2, rtol=2e-2)
        t = np.array([0, 250, 600, 900])
        a_k, s_k = shifted.sqrt_alphas_cumprod[t], shifted.sqrt_one_minus_alphas_cumprod[t]
        a, s = plain.sqrt_alphas_cumprod[t] / k, plain.sqrt_one_minus_alphas_cumprod[t]
        np.testing.assert_allclose(a_k / s_k, a / s, rtol=1e-2)
    # respaced sampling schedules keep the shift
    r = rdiff.DiffusionSchedule(10, noise_shift=4.0)
    np.testing.assert_allclose(r.alphas_cumprod, rdiff.DiffusionSchedule(None, noise_shift=4.0).alphas_cumprod[r.timesteps],
                               rtol=1e-8)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_noise_shift_sampling_matches_reference_loop_on_the_shifted_schedule(nets, cfg):
    ref, _ = nets
    z, noise = _inputs(13, cfg, 15)
    with torch.no_grad():
        want = rdiff.diffusion_sample(ref, z, num_steps=15, temperature=0.9, cfg=cfg, noise=noise,
                                      schedule=rdiff.DiffusionSchedule(15, noise_shift=4.0))
        plain = rdiff.diffusion_sample(ref, z, num_steps=15, temperature=0.9, cfg=cfg, noise=noise)
    assert (want - plain).abs().max() > 1e-2  # the shift changes the samples
    _both_paths_match(nets, z, noise, want, num_steps=15, temperature=0.9, cfg=cfg, noise_shift=4.0)


@pytest.mark.parametrize("bad,match", [
    (dict(z=torch.randn(4)), "z must have 2 dims"),
    (dict(z=torch.randn(4, Z + 1)), rf"z must have shape \(\*, {Z}\)"),
    (dict(z=torch.randn(5, Z), cfg=2.0), "even number of rows"),
    (dict(num_steps=0), r"num_steps must be in \[1, 1000\]"),
    (dict(num_steps=2.5), "num_steps must be an int"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("inf")), "temperature must be finite"),
    (dict(cfg=float("nan")), "cfg must be finite"),
    (dict(noise=torch.randn(5, 4, C)), rf"noise must have shape \(11, 4, {C}\)"),
    (dict(noise=torch.randn(11, 4, C).long()), "noise must have dtype"),
    (dict(gemm_dtype=torch.int8), "gemm_dtype must be None"),
    (dict(clip_denoised="yes"), "clip_denoised must be a bool"),
    (dict(noise_shift=0.0), "noise_shift must be a finite number > 0"),
    (dict(noise_shift=float("nan")), "noise_shift must be a finite number > 0"),
    (dict(noise_shift=True), "noise_shift must be a finite number > 0"),
    (dict(net=object()), "net must be a callable module"),
    (dict(net=torch.nn.Linear(2, 2)), "net must have an int attribute in_channels"),
])
def test_bad_inputs_name_the_argument(nets, bad, match):
    args = dict(net=nets[1], z=torch.randn(4, Z), num_steps=10, temperature=1.0, cfg=1.0, noise=None, gemm_dtype=None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fluid_ops.diffusion_sample(args.pop("net"), args.pop("z"), **args)


def test_gemm_dtype_needs_the_fast_module(nets):
    with pytest.raises(ValueError, match="gemm_dtype applies to fluid_ops.nn.DenoiserMLP only"):
        fluid_ops.diffusion_sample(nets[0], torch.randn(4, Z), num_steps=3, gemm_dtype=torch.bfloat16)


# ---- the reference training loss --------------------------------------------------------------
def test_diffusion_loss_decreases_with_training():
    torch.manual_seed(0)
    net = fluid_ops.nn.DenoiserMLP(4, 32, 8, 6, 2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 6, generator=g)
    target = torch.tanh(z[:, :4] * 2)  # the condition determines the token
    sched = rdiff.DiffusionSchedule(None)
    eval_t = torch.randint(0, 1000, (64 * 4,), generator=torch.Generator().manual_seed(9))
    eval_noise = torch.randn(64 * 4, 4, generator=torch.Generator().manual_seed(10))

    def eval_loss():
        with torch.no_grad():
            return rdiff.diffusion_loss(net, target, z, t=eval_t, noise=eval_noise, schedule=sched).item()

    first = eval_loss()
    for _ in range(40):
        loss = rdiff.diffusion_loss(net, target, z, generator=g, schedule=sched)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.8 * first


def test_diffusion_loss_mask_and_batch_mul():
    net = _eps_net(cls=fluid_ops.nn.DenoiserMLP)
    g = torch.Generator().manual_seed(4)
    target, z = torch.randn(6, C, generator=g), torch.randn(6, Z, generator=g)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    t = torch.randint(0, 1000, (12,), generator=g)
    noise = torch.randn(12, C, generator=g)
    kw = dict(diffusion_batch_mul=2, t=t, noise=noise)
    base = rdiff.diffusion_loss(net, target, z, mask, **kw)
    moved = target.clone()
    moved[1] += 5.0  # unmasked row: no effect
    torch.testing.assert_close(rdiff.diffusion_loss(net, moved, z, mask, **kw), base)
    moved[2] += 5.0  # masked row: changes the loss
    assert not torch.allclose(rdiff.diffusion_loss(net, moved, z, mask, **kw), base)
    # batch_mul repeats rows (target, z, mask) with their own t / noise: the same as repeating by hand
    rep = rdiff.diffusion_loss(net, target.repeat(2, 1), z.repeat(2, 1), mask.repeat(2), diffusion_batch_mul=1,
                               t=t, noise=noise)
    torch.testing.assert_close(base, rep)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, tt, zz):
            seen.append((x.shape[0], tt.clone(), zz.clone()))
            return net(x, tt, zz)

    rdiff.diffusion_loss(Spy(), target, z, diffusion_batch_mul=4, generator=g)
    rows, tt, zz = seen[0]
    assert rows == 24 and torch.equal(zz, z.repeat(4, 1)) and tt.unique().numel() > 6


# ---- CUDA ------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_cuda_sampling_matches_cpu_and_does_no_host_copy(nets, cfg):
    ref, fast = nets
    fast_cuda = fluid_ops.nn.DenoiserMLP(C, D, 2 * C, Z, BLOCKS)
    fast_cuda.load_state_dict(ref.state_dict())
    fast_cuda.cuda()
    z, noise = _inputs(33, cfg, 12)
    want = rdiff.diffusion_sample(ref, z, num_steps=12, cfg=cfg, noise=noise, temperature=0.9)
    got = fluid_ops.diffusion_sample(fast_cuda, z.cuda(), num_steps=12, cfg=cfg, noise=noise.cuda(), temperature=0.9)
    _close(got.cpu(), want, rel=1e-3)
    events = {}
    for steps in (3, 9):
        zc, nc = (t.cuda() for t in _inputs(8, cfg, steps))
        fluid_ops.diffusion_sample(fast_cuda, zc, num_steps=steps, cfg=cfg, noise=nc)
        events[steps] = _loop_events(fast_cuda, zc, nc, steps, cfg)
    assert events[3] == events[9] and "aten._local_scalar_dense" not in events[9], events
    s16 = fluid_ops.diffusion_sample(fast_cuda, z.cuda(), num_steps=12, cfg=cfg, noise=noise.cuda(),
                                     temperature=0.9, gemm_dtype=torch.bfloat16)
    assert torch.isfinite(s16).all()
