"""Fast sampling (issue 24): the DDIM and DPM-Solver++(2M) head solvers against a plain written-out
loop of the formulas of docs/contracts.md §2.3, distribution properties on an analytic Gaussian
eps-predictor, per-AR-step step schedules, feature caching (exact at interval 1) and the `fast`
preset, in fluid_ops.diffusion_sample, Fluid.generate, MAR.sample_tokens and fluid_ops.accelerate."""
from __future__ import annotations

import copy
import importlib
import math

import numpy as np
import pytest
import torch

import fluid_ops
from fluid_ops import sampling
from fluid_ops.nn import DenoiserMLP
from fluid_ops.reference.diffusion import DiffusionSchedule


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_net(c=4, z=6, width=32, depth=2, seed=0):
    torch.manual_seed(seed)
    net = DenoiserMLP(c, width, 2 * c, z, depth).eval()
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen(seed + 1)))
    return net


def written_out(net, z, noise, num_steps, solver, temperature=1.0, cfg=1.0, eta=0.0, clip=False):
    """The formulas of docs/contracts.md §2.3 ("Other head solvers"), float64, one line each."""
    s = DiffusionSchedule(num_steps)
    ab = s.alphas_cumprod
    c = net.in_channels
    guided = cfg != 1.0
    x = noise[0].double() * temperature
    prev_x0, prev_h = None, None
    for j, i in enumerate(range(num_steps - 1, -1, -1)):
        a_t, a_p = ab[i], (ab[i - 1] if i > 0 else 1.0)
        xin = torch.cat([x, x]) if guided else x
        t = torch.full((xin.shape[0],), int(s.timesteps[i]), dtype=torch.long)
        out = net(xin.float(), t, z).double()
        eps = out[:, :c]
        if guided:
            n = x.shape[0]
            eps = eps[n:] + cfg * (eps[:n] - eps[n:])
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip:
            x0 = x0.clamp(-1, 1)
        if solver == "ddim":
            e = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            sig = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
            x = math.sqrt(a_p) * x0 + math.sqrt(max(0.0, 1 - a_p - sig ** 2)) * e + sig * temperature * noise[j + 1].double()
        else:  # dpm++2m
            if i == 0:
                x = x0
                continue
            lam = lambda a: 0.5 * math.log(a / (1 - a))  # noqa: E731
            h = lam(a_p) - lam(a_t)
            d = x0 if prev_x0 is None else (1 + 1 / (2 * prev_h / h)) * x0 - 1 / (2 * prev_h / h) * prev_x0
            x = math.sqrt((1 - a_p) / (1 - a_t)) * x - math.sqrt(a_p) * math.expm1(-h) * d
            prev_x0, prev_h = x0, h
    return x.float()


@pytest.mark.parametrize("solver,eta,cfg,temp,clip", [
    ("ddim", 0.0, 1.0, 1.0, False), ("ddim", 0.5, 3.0, 0.7, False), ("ddim", 1.0, 1.0, 1.0, True),
    ("dpm++2m", 0.0, 1.0, 1.0, False), ("dpm++2m", 0.0, 3.0, 0.7, True), ("dpm++2m", 0.0, 2.0, 0.0, False)])
@pytest.mark.parametrize("steps", [1, 2, 7, 25])
def test_solvers_match_the_written_out_formulas(solver, eta, cfg, temp, clip, steps):
    net = random_net()
    n = 5
    z = torch.randn(2 * n if cfg != 1 else n, 6, generator=gen(2))
    noise = torch.randn(steps + 1, n, 4, generator=gen(3))
    want = written_out(net, z, noise, steps, solver, temp, cfg, eta, clip)
    for fast_path in (True, False):  # DenoiserMLP's sampler, and a plain net(x, t, z)
        m = net if fast_path else (lambda x, t, c: net(x, t, c))
        if not fast_path:
            m.in_channels = 4
        got = fluid_ops.diffusion_sample(m, z, num_steps=steps, noise=noise, solver=solver, eta=eta, cfg=cfg,
                                         temperature=temp, clip_denoised=clip)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * (1 + want.abs().max().item()))


class GaussianEps(torch.nn.Module):
    """The exact eps-predictor of data N(mu, s^2) per channel on the 1000-step cosine schedule, with
    the variance channel at v = -1 (the posterior variance): DDPM, DDIM and DPM++ sample N(mu, s^2)."""

    def __init__(self, mu, s):
        super().__init__()
        self.in_channels = mu.numel()
        self.mu, self.s = mu, s
        self.ab = torch.tensor(DiffusionSchedule().alphas_cumprod, dtype=torch.float32)

    def forward(self, x, t, z):
        a = self.ab[t][:, None]
        eps = (x - a.sqrt() * self.mu) * (1 - a).sqrt() / (a * self.s ** 2 + 1 - a)
        return torch.cat([eps, -torch.ones_like(eps)], 1)


def _moments(x):
    return x.mean(0), x.std(0)


@pytest.mark.parametrize("solver,eta,steps", [("ddim", 1.0, 1000), ("ddim", 0.0, 200),
                                              ("dpm++2m", 0.0, 50)])
def test_solvers_sample_the_data_distribution(solver, eta, steps):
    """DDIM eta=1 with 1000 steps is DDPM in distribution (both N(mu, s^2) here); the ODE solvers
    reach it in fewer (on the respaced cosine schedule the narrow channel, s = 0.05, is the slowest to
    converge: DDIM undershoots its std by 8% at 200 steps, DPM++(2M) overshoots by 9% at 50).
    4000 samples: the mean's SE is s / 63, the std's s / 89."""
    mu, s = torch.tensor([0.5, -0.3, 0.0]), torch.tensor([0.2, 0.5, 0.05])
    net = GaussianEps(mu, s)
    x = fluid_ops.diffusion_sample(net, torch.zeros(4000, 1), num_steps=steps, solver=solver, eta=eta,
                                   generator=gen(7))
    m, sd = _moments(x)
    torch.testing.assert_close(m, mu, rtol=0, atol=float(5 * s.max() / 63))
    torch.testing.assert_close(sd, s, rtol=0.1, atol=0.003)


def test_ddim_eta1_and_ddpm_agree_in_distribution_at_1000_steps():
    mu, s = torch.tensor([0.3, -0.6]), torch.tensor([0.3, 0.1])
    net = GaussianEps(mu, s)
    a = fluid_ops.diffusion_sample(net, torch.zeros(2000, 1), num_steps=1000, solver="ddpm", generator=gen(1))
    b = fluid_ops.diffusion_sample(net, torch.zeros(2000, 1), num_steps=1000, solver="ddim", eta=1.0, generator=gen(2))
    torch.testing.assert_close(a.mean(0), b.mean(0), rtol=0, atol=0.03)
    torch.testing.assert_close(a.std(0), b.std(0), rtol=0.1, atol=0)


def test_deterministic_solvers_are_reproducible_and_temperature_scales_x_T():
    net = random_net()
    z = torch.randn(6, 6, generator=gen(2))
    for solver in ("ddim", "dpm++2m"):
        a = fluid_ops.diffusion_sample(net, z, num_steps=10, solver=solver, generator=gen(1))
        b = fluid_ops.diffusion_sample(net, z, num_steps=10, solver=solver, generator=gen(1))
        assert torch.equal(a, b)
        # deterministic: only x_T = temperature * noise[0] matters, not the other noise rows
        noise = torch.randn(11, 6, 4, generator=gen(4))
        other = noise.clone()
        other[1:] = torch.randn(10, 6, 4, generator=gen(5))
        r1 = fluid_ops.diffusion_sample(net, z, num_steps=10, solver=solver, noise=noise, temperature=0.5)
        r2 = fluid_ops.diffusion_sample(net, z, num_steps=10, solver=solver, noise=other, temperature=0.5)
        assert torch.equal(r1, r2)
        halved = noise.clone()
        halved[0] *= 0.5
        r3 = fluid_ops.diffusion_sample(net, z, num_steps=10, solver=solver, noise=halved)
        torch.testing.assert_close(r1, r3)


def test_solver_arguments_are_checked():
    net = random_net()
    z = torch.randn(2, 6)
    with pytest.raises(ValueError, match="solver must be one of"):
        fluid_ops.diffusion_sample(net, z, solver="euler")
    with pytest.raises(ValueError, match="eta"):
        fluid_ops.diffusion_sample(net, z, solver="ddim", eta=-1.0)
    # the default stays exact DDPM: solver="ddpm" is the same call
    a = fluid_ops.diffusion_sample(net, z, num_steps=5, generator=gen(0))
    assert torch.equal(a, fluid_ops.diffusion_sample(net, z, num_steps=5, generator=gen(0), solver="ddpm"))


# ---- step schedules ---------------------------------------------------------------------------
def test_step_schedule_forms():
    ss = sampling.step_schedule
    assert ss(50, 4) == [50] * 4
    assert ss(("linear", 100, 10), 4) == [100, 70, 40, 10]
    assert ss(("linear", 100, 10), 1) == [100]
    assert ss(("cosine", 100, 10), 3) == [100, 55, 10]
    assert ss("linear", 3, default=100) == [100, 55, 10]
    assert ss("cosine", 2, default=40) == [40, 4]
    assert ss(lambda p: 1 + int(9 * (1 - p)), 4) == [10, 7, 4, 1]
    for bad in (0, 1001, ("linear", 100, 0), ("quadratic", 1, 2), lambda p: 2.5, "fast", True):
        with pytest.raises(ValueError):
            ss(bad, 4)


def test_respaced_schedules_are_built_once():
    a = sampling._schedule(37, 1.0)
    assert sampling._schedule(37, 1.0) is a
    assert a.table("cpu") is a.table("cpu")
    assert sampling.solver_coefficients(a, "dpm++2m") is sampling.solver_coefficients(a, "dpm++2m")


# ---- models -----------------------------------------------------------------------------------
def _randomize_zeros(module, seed=123, scale=0.05):
    """MAR-style zero inits (adaLN, output layers) get small random values, so outputs depend on z."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return module


def _fluid(name="tiny", **kw):
    from fluid_ops.models import Fluid
    small = {"text.encoder": "hash", "image.size": 16, "image.patch_size": 4, "model.width": 64, "model.depth": 2,
             "model.num_heads": 2, "text.aligner_depth": 1, "head.depth": 2, "head.width": 64,
             "sampling.num_diffusion_steps": 5}
    if "raster" not in name:
        kw.setdefault("sampling.num_iter", 4)
    torch.manual_seed(0)
    m = Fluid(name, **{**small, **kw})
    _randomize_zeros(m.head)
    return m


CAPS = ["a red circle at the top left", "a blue square", "a green triangle at the bottom"]


@pytest.mark.parametrize("name", ["tiny", "tiny-raster"])
def test_fluid_step_schedule_feeds_each_ar_step_its_count(name, monkeypatch):
    m = _fluid(name)
    seen = []
    real = sampling.diffusion_sample
    monkeypatch.setattr(sampling, "diffusion_sample",
                        lambda *a, **k: seen.append((k["num_steps"], k["solver"])) or real(*a, **k))
    img = m.generate(CAPS, generator=gen(0), num_diffusion_steps=("linear", 9, 3), solver="dpm++2m")
    assert img.shape[0] == 3 and torch.isfinite(img).all()
    k = len(seen)
    want = sampling.step_schedule(("linear", 9, 3), 4 if name == "tiny" else m.seq_len)
    assert [s for s, _ in seen] == want[:k] and all(s == "dpm++2m" for _, s in seen)


@pytest.mark.parametrize("cfg_uncond", ["text", "all"])
def test_fluid_feature_cache_interval_1_is_exact_and_k_skips_passes(cfg_uncond, monkeypatch):
    m = _fluid("tiny", **{"sampling.num_iter": 6})
    kw = dict(generator=None, cfg=3.0, cfg_uncond=cfg_uncond)
    a = m.generate(CAPS, **{**kw, "generator": gen(0)})
    b = m.generate(CAPS, **{**kw, "generator": gen(0)}, cache_interval=1, uncond_cache_interval=1)
    assert torch.equal(a, b)
    rows = []
    real = m.transformer.forward
    monkeypatch.setattr(m.transformer, "forward", lambda x, *a, **k: rows.append(x.shape[0]) or real(x, *a, **k))
    c = m.generate(CAPS, **{**kw, "generator": gen(0)}, cache_interval=3)
    assert torch.isfinite(c).all() and not torch.equal(a, c)
    extra = [3] if cfg_uncond == "all" else []  # the once-per-generation uncond pass (B rows)
    assert rows == extra + ([6, 6] if cfg_uncond == "text" else [3, 3])
    rows.clear()
    m.generate(CAPS, **{**kw, "generator": gen(0)}, cache_interval=1, uncond_cache_interval=3)
    if cfg_uncond == "text":  # cond every step, uncond every third: 2B rows at steps 0 and 3
        assert rows == [6, 3, 3, 6, 3, 3]


def test_fluid_preset_fast_and_explicit_arguments_win(monkeypatch):
    m = _fluid()
    seen = []
    real = sampling.diffusion_sample
    monkeypatch.setattr(sampling, "diffusion_sample", lambda *a, **k: seen.append(k) or real(*a, **k))
    m.generate(CAPS, generator=gen(0), preset="fast")
    p = sampling.FAST_PRESET
    assert seen[0]["solver"] == p["solver"]
    assert [k["num_steps"] for k in seen] == sampling.step_schedule(p["num_diffusion_steps"], 4)[:len(seen)]
    seen.clear()
    m.generate(CAPS, generator=gen(0), preset="fast", solver="ddpm", num_diffusion_steps=3)
    assert {(k["solver"], k["num_steps"]) for k in seen} == {("ddpm", 3)}
    with pytest.raises(ValueError, match="preset"):
        m.generate(CAPS, preset="fastest")
    with pytest.raises(ValueError, match="cache_interval"):
        m.generate(CAPS, cache_interval=0)


def _mar():
    from fluid_ops.models.mar import MAR
    torch.manual_seed(0)
    m = MAR(img_size=64, vae_stride=16, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
            decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2, buffer_size=4, class_num=10, diffloss_d=2,
            diffloss_w=64, num_sampling_steps="8", attn_dropout=0.0, proj_dropout=0.0).eval()
    return _randomize_zeros(m, scale=0.02)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_mar_fast_options(cfg, monkeypatch):
    m = _mar()
    lab = torch.tensor([1, 2, 3])
    kw = dict(num_iter=4, cfg=cfg, labels=lab)
    a = m.sample_tokens(3, generator=gen(0), **kw)
    assert torch.equal(a, m.sample_tokens(3, generator=gen(0), **kw, cache_interval=1, solver="ddpm"))
    seen = []
    real = m.diffloss.sample
    monkeypatch.setattr(m.diffloss, "sample", lambda *x, **k: seen.append(k.get("num_steps")) or real(*x, **k))
    b = m.sample_tokens(3, generator=gen(0), **kw, num_diffusion_steps=("linear", 8, 2), solver="ddim",
                        cache_interval=2)
    assert torch.isfinite(b).all() and seen == [8, 6, 4, 2]
    c = m.sample_tokens(3, generator=gen(0), **kw, preset="fast")
    assert torch.isfinite(c).all()


def test_mar_clip_denoised_is_opt_in():
    """Off (MAR's behaviour) by default; on, every step's x_0 is clamped, so the tokens lie in
    [-1, 1] while the untrained head's unclipped samples do not."""
    m = _mar()
    with torch.no_grad():  # a head whose x_0 predictions leave [-1, 1]
        m.diffloss.net.final_layer.linear.bias.fill_(3.0)
    kw = dict(num_iter=2, cfg=3.0, labels=torch.tensor([1, 2]))
    a = m.sample_tokens(2, generator=gen(0), **kw)
    assert torch.equal(a, m.sample_tokens(2, generator=gen(0), **kw, clip_denoised=False))
    assert a.abs().max() > 1.5
    b = m.sample_tokens(2, generator=gen(0), **kw, clip_denoised=True)
    assert b.abs().max() <= 1.0 + 1e-6
    with pytest.raises(TypeError, match="clip_denoised"):
        m.sample_tokens(2, generator=gen(0), **kw, clip_denoised=1)


def test_accelerate_solver_and_step_schedule():
    from tests import mar_standin as mar
    acc = importlib.import_module("fluid_ops.accelerate")
    torch.manual_seed(0)
    ref = mar.randomize_head(mar.MAR(attn_dropout=0.0, proj_dropout=0.0, num_sampling_steps="10"), seed=0).eval()
    fast = acc.accelerate(copy.deepcopy(ref), num_diffusion_steps=("linear", 10, 4), solver="dpm++2m")
    steps = []
    real = acc.diffusion_sample
    try:
        acc.diffusion_sample = lambda *a, **k: steps.append((k["num_steps"], k["solver"])) or real(*a, **k)
        torch.manual_seed(1)
        out = fast.sample_tokens(2, num_iter=4, cfg=2.0, labels=torch.tensor([1, 2]))
    finally:
        acc.diffusion_sample = real
    assert torch.isfinite(out).all()
    assert steps == [(10, "dpm++2m"), (8, "dpm++2m"), (6, "dpm++2m"), (4, "dpm++2m")]
    assert fast.diffloss.__dict__.get(acc._AR_KEY) is None
    # plain accelerate (no options) stays exact; undo removes the sample_tokens swap
    acc.accelerate(fast)
    assert "sample_tokens" not in fast.__dict__
    acc.accelerate(fast, num_diffusion_steps="cosine")
    assert "sample_tokens" in fast.__dict__
    acc.accelerate(fast, undo=True)
    assert "sample_tokens" not in fast.__dict__ and "sample" not in fast.diffloss.__dict__
    with pytest.raises(ValueError, match="solver"):
        acc.accelerate(fast, solver="heun")


def test_cli_fast_flag_and_solver():
    from fluid_ops import cli
    p = cli.build_parser()
    for cmd in (["generate", "--ckpt", "x", "--prompt", "a red circle"], ["evaluate", "--ckpt", "x"]):
        auto = {"precision": "auto"}  # --precision's default, always passed
        args = p.parse_args(cmd + ["--fast"])
        assert cli._sampling_kwargs(args) == {"preset": "fast", **auto}
        args = p.parse_args(cmd + ["--fast", "--solver", "ddim", "--num-diffusion-steps", "30"])
        assert cli._sampling_kwargs(args) == {"preset": "fast", "solver": "ddim", "num_diffusion_steps": 30, **auto}
        assert cli._sampling_kwargs(p.parse_args(cmd)) == auto


def test_benchmark_script_quick(tmp_path):
    """benchmarks/fast_sampling.py --quick on tiny random models (every option, all three parts)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "benchmarks/fast_sampling.py", "--quick", "--out", str(tmp_path)], cwd=root,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((tmp_path / "fast_sampling_quick.json").read_text())
    assert set(data["parts"]) == {"a", "b", "c"} and (tmp_path / "fast_sampling_quick.png").exists()
    rows = {r["option"]: r for r in data["parts"]["a"]["rows"]}
    assert set(rows) == set(__import__("benchmarks.fast_sampling", fromlist=["OPTIONS"]).OPTIONS)
    assert rows["exact"]["speedup"] == 1.0 and rows["dpm++2m 10"]["head_nfe"] == 40  # 4 AR steps x 10
    assert {"cpu", "cpu_flags", "load_average_1_5_15", "threads"} <= set(data["machine"])
    assert data["parts"]["b"]["train_recipe"]["layout"] == "middle" and data["parts"]["b"]["train_steps"] == 20


def test_benchmark_mar_data_layouts():
    """Part (b)'s data: "middle" centres every object on the middle cell, "any" spreads them over the grid;
    the label names the object's colour."""
    from benchmarks.fast_sampling import _mar_data
    from fluid_ops.data.shapes import BACKGROUND, COLOURS
    for layout in ("middle", "any"):
        imgs, labels = _mar_data(36, seed=3, layout=layout)
        fg = (imgs - torch.tensor(BACKGROUND).view(1, 3, 1, 1)).abs().amax(1) > 0.2  # (B, H, W) object pixels
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        cy = (fg * ys).sum((1, 2)) / fg.sum((1, 2))
        cx = (fg * xs).sum((1, 2)) / fg.sum((1, 2))
        centred = ((cy - 15.5).abs() < 4) & ((cx - 15.5).abs() < 4)  # cells are ~11 px apart
        if layout == "middle":
            assert bool(centred.all()), (cy, cx)
        else:
            assert int(centred.sum()) < 12 and len({(int(y) // 11, int(x) // 11) for y, x in zip(cy, cx)}) >= 6
        for img, m, y in zip(imgs, fg, labels):
            want = torch.tensor(list(COLOURS.values())[int(y) // 3])
            assert torch.allclose(img[:, m].median(1).values, want, atol=0.05)  # median: edges are anti-aliased
