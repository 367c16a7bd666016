"""ddpm_step: every backend against the reference, the reference against docs/contracts.md §2.3 formulas
and IDDPM's tables, bad inputs, gradients and the torch.library contract."""
import math

import numpy as np
import pytest
import torch

import fluid_ops
from fluid_ops.reference import diffusion as ref
from tests.conftest import backend_params, requires_cuda


def _inputs(n=7, c=16, guided=True, dtype=torch.float32, mo_dtype=None, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g).to(device, dtype)
    mo = torch.randn(2 * n if guided else n, 2 * c, generator=g).clamp(-1, 1).to(device, mo_dtype or dtype)
    noise = torch.randn(n, c, generator=g).to(device, dtype)
    return x, mo, noise


def test_schedule_matches_spec_formulas():
    s = ref.DiffusionSchedule(None)
    i = np.arange(1000)
    ab = lambda t: np.cos(((t / 1000 + 0.008) / 1.008) * math.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(s.betas, np.minimum(1 - ab(i + 1) / ab(i), 0.999), rtol=1e-12)
    assert s.betas.max() <= 0.999
    kept = ref.space_timesteps(1000, 100)
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    assert kept[:5] == [0, 10, 20, 30, 40] and kept[50] == 505  # IDDPM: round(i * 999 / 99)
    r = ref.DiffusionSchedule(100)
    # respaced alpha_bars are the kept original ones
    np.testing.assert_allclose(r.alphas_cumprod, s.alphas_cumprod[kept], rtol=1e-9)
    assert r.table().shape == (100, 6) and r.table().dtype == torch.float32


def test_reference_step_matches_formula():
    sched = ref.DiffusionSchedule(100)
    x, mo, noise = _inputs(guided=True, dtype=torch.float64)
    step, temp, w = 37, 0.8, 2.5
    out = ref.ddpm_step(x.float(), mo.float(), noise.float(), sched.table(), step, temperature=temp, cfg=w)
    c, n = x.shape[1], x.shape[0]
    eps = mo[n:, :c] + w * (mo[:n, :c] - mo[n:, :c])
    frac = (mo[:n, c:] + 1) / 2
    logvar = frac * sched.log_betas[step] + (1 - frac) * sched.posterior_log_variance_clipped[step]
    x0 = sched.sqrt_recip_alphas_cumprod[step] * x - sched.sqrt_recipm1_alphas_cumprod[step] * eps
    mean = sched.posterior_mean_coef1[step] * x0 + sched.posterior_mean_coef2[step] * x
    want = mean + torch.exp(0.5 * logvar) * temp * noise
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # last step (index 0) adds no noise
    out0 = ref.ddpm_step(x.float(), mo.float(), noise.float() * 1e6, sched.table(), 0, cfg=w)
    assert torch.isfinite(out0).all() and out0.abs().max() < 1e3


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("n,c", [(1, 1), (7, 16), (33, 3), (256, 16)])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("step", [0, 1, 99])
def test_backend_matches_reference_fp32(backend, n, c, guided, step):
    sched = ref.DiffusionSchedule(100)
    x, mo, noise = _inputs(n, c, guided)
    want = ref.ddpm_step(x, mo, noise, sched.table(), step, temperature=0.9, cfg=3.0)
    with fluid_ops.use_backend(backend):
        got = fluid_ops.ddpm_step(x, mo, noise, sched.table(), step, temperature=0.9, cfg=3.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("dtype,mo_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                            (torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_backend_mixed_dtypes(backend, dtype, mo_dtype):
    sched = ref.DiffusionSchedule(100)
    x, mo, noise = _inputs(9, 16, True, dtype=dtype, mo_dtype=mo_dtype)
    want = ref.ddpm_step(x, mo, noise, sched.table(), 10, cfg=2.0)
    with fluid_ops.use_backend(backend):
        got = fluid_ops.ddpm_step(x, mo, noise, sched.table(), 10, cfg=2.0)
    assert got.dtype == dtype
    # same fp32 arithmetic, one rounding to the output dtype: at most one ulp apart
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def _clip_inputs(n, c, guided, step, seed=3):
    """Inputs for which the predicted x_0 falls both inside and well outside [-1, 1] at `step`."""
    x, mo, noise = _inputs(n, c, guided, seed=seed)
    return x * 3.0, mo, noise


def test_reference_clip_denoised_matches_formula():
    sched = ref.DiffusionSchedule(100)
    step, temp, w = 80, 0.8, 2.5
    x, mo, noise = (t.double() for t in _clip_inputs(9, 8, True, step))
    n, c = x.shape
    eps = mo[n:, :c] + w * (mo[:n, :c] - mo[n:, :c])
    x0 = sched.sqrt_recip_alphas_cumprod[step] * x - sched.sqrt_recipm1_alphas_cumprod[step] * eps
    assert (x0.abs() > 1).any() and (x0.abs() < 1).any()  # the clamp is active on some elements only
    frac = (mo[:n, c:] + 1) / 2
    logvar = frac * sched.log_betas[step] + (1 - frac) * sched.posterior_log_variance_clipped[step]
    mean = sched.posterior_mean_coef1[step] * x0.clamp(-1, 1) + sched.posterior_mean_coef2[step] * x
    want = mean + torch.exp(0.5 * logvar) * temp * noise
    got = ref.ddpm_step(x.float(), mo.float(), noise.float(), sched.table(), step, temperature=temp, cfg=w,
                        clip_denoised=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    unclipped = ref.ddpm_step(x.float(), mo.float(), noise.float(), sched.table(), step, temperature=temp, cfg=w)
    assert (got - unclipped).abs().max() > 1e-2
    # the last step is the clamped x_0 itself: every value in [-1, 1]
    last = ref.ddpm_step(x.float(), mo.float(), noise.float(), sched.table(), 0, cfg=w, clip_denoised=True)
    assert last.abs().max() <= 1.0


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("n,c", [(1, 1), (33, 3), (256, 16)])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("step", [0, 1, 99])
def test_backend_clip_denoised_matches_reference(backend, n, c, guided, step):
    sched = ref.DiffusionSchedule(100)
    x, mo, noise = _clip_inputs(n, c, guided, step)
    want = ref.ddpm_step(x, mo, noise, sched.table(), step, temperature=0.9, cfg=3.0, clip_denoised=True)
    with fluid_ops.use_backend(backend):
        got = fluid_ops.ddpm_step(x, mo, noise, sched.table(), step, temperature=0.9, cfg=3.0, clip_denoised=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_clip_denoised_keeps_nan_visible():
    sched = ref.DiffusionSchedule(10)
    x, mo, noise = _inputs(2, 4, False)
    mo[0, 1] = float("nan")
    for backend in ("reference", "cpu"):
        with fluid_ops.use_backend(backend):
            out = fluid_ops.ddpm_step(x, mo, noise, sched.table(), 4, clip_denoised=True)
        assert torch.isnan(out[0, 1]) and torch.isfinite(out[1]).all(), backend


def test_empty_batch_returns_empty():
    sched = ref.DiffusionSchedule(10)
    x = torch.empty(0, 16)
    out = fluid_ops.ddpm_step(x, torch.empty(0, 32), torch.empty(0, 16), sched.table(), 3)
    assert out.shape == (0, 16)


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(4)), "x must have 2 dims"),
    (dict(x=torch.randn(4, 8).long()), "x must have dtype"),
    (dict(model_out=torch.randn(4, 8)), "model_out must have shape"),
    (dict(model_out=torch.randn(12, 16)), "model_out must have shape"),
    (dict(noise=torch.randn(4, 7)), "noise must have shape"),
    (dict(table=torch.randn(10, 5)), "table must have shape"),
    (dict(table=torch.randn(10, 6).double()), "table must have dtype"),
    (dict(step=10), "step must be in"),
    (dict(step=-1), "step must be in"),
    (dict(step=1.5), "step must be a Python int"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(cfg=float("inf")), "cfg must be finite"),
    (dict(clip_denoised=1), "clip_denoised must be a bool"),
])
def test_bad_inputs_name_the_argument(bad, match):
    args = dict(x=torch.randn(4, 8), model_out=torch.randn(8, 16), noise=torch.randn(4, 8),
                table=ref.DiffusionSchedule(10).table(), step=3, temperature=1.0, cfg=2.0, clip_denoised=False)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fluid_ops.ddpm_step(args["x"], args["model_out"], args["noise"], args["table"], args["step"],
                            temperature=args["temperature"], cfg=args["cfg"], clip_denoised=args["clip_denoised"])


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("step", [0, 5])
@pytest.mark.parametrize("clip", [False, True])
def test_backward_matches_autograd_of_formula(guided, step, clip):
    table = ref.DiffusionSchedule(10).table()
    x, mo, noise = (t.double().requires_grad_() for t in _inputs(3, 4, guided, seed=1))
    if clip:  # make the clamp active on part of the elements
        x = (x.detach() * 3.0).requires_grad_()
    # The op computes in fp32, so torch.autograd.gradcheck's fp64 finite differences do not
    # apply; compare its backward with autograd through the fp64 formula instead.
    xs, ms, ns = (t.detach().float().requires_grad_() for t in (x, mo, noise))
    out = fluid_ops.ddpm_step(xs, ms, ns, table, step, cfg=1.7, temperature=0.9, clip_denoised=clip)
    gout = torch.randn_like(out)
    gx, gm, gn = torch.autograd.grad(out, (xs, ms, ns), gout)
    xd, md, nd = (t.detach().double().requires_grad_() for t in (x, mo, noise))
    outd = ref.ddpm_step(xd, md, nd, table.double(), step, cfg=1.7, temperature=0.9, clip_denoised=clip)
    want = torch.autograd.grad(outd.double(), (xd, md, nd), gout.double(), allow_unused=True)
    for got, w in zip((gx, gm, gn), want):
        w = torch.zeros_like(got, dtype=torch.float64) if w is None else w
        torch.testing.assert_close(got.double(), w, rtol=1e-4, atol=1e-5)


def test_opcheck():
    table = ref.DiffusionSchedule(10).table()
    x, mo, noise = _inputs(3, 4, True)
    for step in (0, 4):
        for clip in (False, True):
            torch.library.opcheck(torch.ops.fluid_ops.ddpm_step.default, (x, mo, noise, table, step, 0.9, 2.0, clip))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("guided", [False, True])
def test_cuda_matches_reference(dtype, guided):
    sched = ref.DiffusionSchedule(100)
    x, mo, noise = _inputs(300, 16, guided, dtype=dtype, device="cuda")
    for step in (0, 42):
        for clip in (False, True):
            want = ref.ddpm_step(x * 3, mo, noise, sched.table("cuda"), step, temperature=0.95, cfg=4.0,
                                 clip_denoised=clip)
            with fluid_ops.use_backend("cuda"):
                got = fluid_ops.ddpm_step(x * 3, mo, noise, sched.table("cuda"), step, temperature=0.95, cfg=4.0,
                                          clip_denoised=clip)
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_space_timesteps_matches_iddpm_respacing_for_every_count():
    """Against the MAR stand-in's IDDPM SpacedDiffusion (written separately from MAR's behaviour):
    the same kept steps for every count, including those (21, 23, 31, ...) where rounding
    i * stride would keep others."""
    from tests.mar_standin import SpacedDiffusion
    for count in range(2, 1001):
        assert ref.space_timesteps(1000, count) == SpacedDiffusion(str(count)).timestep_map, count
    assert ref.space_timesteps(1000, 21)[:3] == [0, 50, 100] and ref.space_timesteps(1000, 21)[-1] == 999


# ---- ddpm_step_params: temperature and cfg read from a device tensor (graph-replayable) -----
def _params(temperature, cfg, device="cpu"):
    return torch.tensor([temperature, cfg], dtype=torch.float32, device=device)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("step", [0, 7])
def test_ddpm_step_params_equals_ddpm_step(backend, guided, step):
    from fluid_ops.ops.ddpm import ddpm_step_params
    table = ref.DiffusionSchedule(10).table()
    x, mo, noise = _inputs(33, 5, guided, seed=3)
    for temperature, cfg in ((1.0, 3.0), (0.0, 1.5), (0.75, -0.5)):
        for clip in (False, True):
            with fluid_ops.use_backend(backend):
                want = fluid_ops.ddpm_step(x * 3, mo, noise, table, step, temperature=temperature, cfg=cfg,
                                           clip_denoised=clip)
                got = ddpm_step_params(x * 3, mo, noise, table, step, _params(temperature, cfg), clip_denoised=clip)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ddpm_step_params_bad_inputs():
    from fluid_ops.ops.ddpm import ddpm_step_params
    table = ref.DiffusionSchedule(10).table()
    x, mo, noise = _inputs(4, 8, True)
    with pytest.raises(ValueError, match="params must have shape"):
        ddpm_step_params(x, mo, noise, table, 3, torch.zeros(3))
    with pytest.raises(TypeError, match="params must have dtype"):
        ddpm_step_params(x, mo, noise, table, 3, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="step must be"):
        ddpm_step_params(x, mo, noise, table, 10, _params(1.0, 1.0))
    assert ddpm_step_params(x[:0], mo[:0], noise[:0], table, 3, _params(1.0, 1.0)).shape == (0, 8)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guided", [False, True])
def test_cuda_ddpm_step_params_equals_ddpm_step(backend, dtype, guided):
    """Same kernel with the two scalars from memory: bit-identical to the scalar-argument launch,
    and the device tensor's value (not a captured constant) is what counts."""
    from fluid_ops.ops.ddpm import ddpm_step_params
    table = ref.DiffusionSchedule(100).table("cuda")
    x, mo, noise = _inputs(300, 16, guided, dtype=dtype, device="cuda")
    params = _params(1.0, 1.0, "cuda")
    for step in (0, 42):
        for temperature, cfg in ((0.95, 4.0), (0.0, 2.0), (1.0, 1.0)):
            params[0].fill_(temperature), params[1].fill_(cfg)
            with fluid_ops.use_backend(backend):
                want = fluid_ops.ddpm_step(x, mo, noise, table, step, temperature=temperature, cfg=cfg)
                got = ddpm_step_params(x, mo, noise, table, step, params)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
