"""fluid_ops.diffusion_sample(cuda_graph=...): the shape buckets, cache keys and invalidation on
CPU; the padded buffers of a captured loop run eagerly on CPU against the plain loop; the
fallback when a capture fails; and on a GPU (skipped here) graph replay against the eager loop
bit for bit, one graph for every temperature / cfg, re-capture after a weight update, MAR's
sampling through graphs."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import fluid_ops
from fluid_ops import sampling
from fluid_ops.nn import DenoiserMLP
from fluid_ops.reference import diffusion as rdiff
from tests.conftest import requires_cuda

C, Z, D = 4, 12, 32


def gen(seed):
    return torch.Generator().manual_seed(seed)


def head(blocks=2, seed=0):
    torch.manual_seed(seed)
    net = DenoiserMLP(C, D, 2 * C, Z, blocks)
    g = gen(seed + 1)
    with torch.no_grad():  # MAR zero-inits adaLN and the output layer: make every path non-trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def inputs(n, steps, guided, seed=2, device="cpu"):
    g = gen(seed)
    z = torch.randn(2 * n if guided else n, Z, generator=g)
    noise = torch.randn(steps + 1, n, C, generator=g)
    return z.to(device), noise.to(device)


# ---- buckets, keys, stamps, the cache (CPU) ---------------------------------------------------
def test_bucket_rounds_up_to_powers_of_two_then_multiples_of_1024():
    want = {1: 16, 15: 16, 16: 16, 17: 32, 100: 128, 512: 512, 513: 1024, 1024: 1024, 1025: 2048,
            2048: 2048, 3000: 3072, 4097: 5120}
    assert {n: sampling.graph_bucket(n) for n in want} == want
    prev = 0
    for n in range(1, 5000):
        b = sampling.graph_bucket(n)
        assert n <= b and b >= prev and (b <= max(16, 2 * n - 1) or b - n < 1024)
        prev = b


def test_graph_key_same_within_a_bucket_and_differs_by_each_field():
    z = torch.randn(10, Z)
    base = sampling.graph_key(z, 20, 100, None, False, True)
    assert sampling.graph_key(z, 30, 100, None, False, True) == base  # 20 and 30 share bucket 32
    others = [sampling.graph_key(z, 40, 100, None, False, True), sampling.graph_key(z, 20, 50, None, False, True),
              sampling.graph_key(z, 20, 100, torch.bfloat16, False, True),
              sampling.graph_key(z, 20, 100, None, True, True), sampling.graph_key(z, 20, 100, None, False, False),
              sampling.graph_key(z.double(), 20, 100, None, False, True),
              sampling.graph_key(torch.randn(10, Z + 1), 20, 100, None, False, True),
              sampling.graph_key(z, 20, 100, None, False, True, True),  # clip_denoised
              sampling.graph_key(z, 20, 100, None, False, True, False, 4.0)]  # noise_shift
    assert all(k != base for k in others) and len(set(others)) == len(others)


def test_weights_stamp_changes_with_every_kind_of_weight_update():
    net = head()
    s0 = sampling.weights_stamp(net)
    with torch.no_grad():
        net(torch.randn(3, C), torch.tensor([1, 2, 3]), torch.randn(3, Z))
    assert sampling.weights_stamp(net) == s0  # a forward changes nothing
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.randn(3, C), torch.tensor([1, 2, 3]), torch.randn(3, Z)).square().sum()
    loss.backward()
    opt.step()
    s1 = sampling.weights_stamp(net)
    assert s1 != s0  # in-place optimizer update: version counters
    net.load_state_dict(head(seed=5).state_dict())
    s2 = sampling.weights_stamp(net)
    assert s2 != s1  # load_state_dict copies in place
    net.final_layer.linear.weight = torch.nn.Parameter(net.final_layer.linear.weight.detach().clone())
    assert sampling.weights_stamp(net) != s2  # a new Parameter


def test_graph_cache_lru_invalidation_and_copies():
    cache = sampling.GraphCache()
    cache.put("a", (1,), "A")
    assert cache.get("a", (1,)) == "A"
    assert cache.get("a", (2,)) is None and "a" not in cache.entries  # stale: dropped
    for i in range(sampling.GRAPH_CACHE_SIZE + 2):
        cache.put(i, (), i)
        cache.get(0, ())  # keep 0 the most recently used
    assert len(cache.entries) == sampling.GRAPH_CACHE_SIZE
    assert 0 in cache.entries and 1 not in cache.entries and 2 not in cache.entries
    # a net holding a cache can be deep-copied (EMA) and saved: the copy starts empty
    net = head()
    sampling.graph_cache(net).put("k", (), object())
    twin = copy.deepcopy(net)
    assert sampling.graph_cache(twin) is not sampling.graph_cache(net)
    assert not sampling.graph_cache(twin).entries and sampling.graph_cache(net).entries
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    assert not sampling.graph_cache(torch.load(buf, weights_only=False)).entries


def test_cpu_path_unchanged_and_cuda_graph_argument_checked():
    net = head()
    z, noise = inputs(5, 6, True)
    want = rdiff.diffusion_sample(net, z, num_steps=6, cfg=2.0, noise=noise, temperature=0.8)
    for flag in (None, False):
        got = fluid_ops.diffusion_sample(net, z, num_steps=6, cfg=2.0, noise=noise, temperature=0.8, cuda_graph=flag)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "_fluid_graph_cache" not in net.__dict__  # CPU never captures
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors"):
        fluid_ops.diffusion_sample(net, z, num_steps=6, cfg=2.0, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be None, True or False"):
        fluid_ops.diffusion_sample(net, z, num_steps=6, cfg=2.0, cuda_graph="yes")


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("use_fast", [True, False])
def test_padded_buffers_give_the_unpadded_samples(guided, use_fast):
    """The captured loop's buffers (rows padded to the bucket, [cond; pad; uncond; pad] for CFG),
    run eagerly on CPU: the real rows equal the plain loop's, for a smaller batch after a larger
    one too (stale rows are cleared)."""
    net, steps = head(), 7
    sched = rdiff.DiffusionSchedule(steps)
    loop = sampling._CapturedLoop(net, torch.float32, Z, C, 16, sched, guided, use_fast, None, torch.device("cpu"),
                                  capture=False)
    cfg = 2.5 if guided else 1.0
    for n in (11, 3, 16):
        z, noise = inputs(n, steps, guided, seed=n)
        want = fluid_ops.diffusion_sample(net if use_fast else _Generic(net), z, num_steps=steps, cfg=cfg,
                                          noise=noise, temperature=0.9)
        got = loop(z, noise, n, 0.9, cfg)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Generic(torch.nn.Module):
    """A net that is not a DenoiserMLP (the loop calls net(x, t, z))."""

    def __init__(self, net):
        super().__init__()
        self.net, self.in_channels, self.z_channels = net, net.in_channels, net.z_channels

    def forward(self, x, t, z):
        return self.net(x, t, z)


def test_failed_capture_warns_once_and_runs_the_eager_loop(monkeypatch):
    net = head()
    z, noise = inputs(5, 4, True)

    class Boom(sampling._CapturedLoop):
        calls = 0

        def __init__(self, *a, **k):
            Boom.calls += 1
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(sampling, "_CapturedLoop", Boom)
    monkeypatch.setattr(sampling, "_want_graph", lambda net, z, flag: flag is not False)
    want = fluid_ops.diffusion_sample(net, z, num_steps=4, cfg=2.0, noise=noise, cuda_graph=False)
    with pytest.warns(RuntimeWarning, match="capture failed, running the eager loop.*not permitted"):
        got = fluid_ops.diffusion_sample(net, z, num_steps=4, cfg=2.0, noise=noise)
    assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is cached: no second warning, no retry
        assert torch.equal(fluid_ops.diffusion_sample(net, z, num_steps=4, cfg=2.0, noise=noise), want)
    assert Boom.calls == 1
    with torch.no_grad():
        net.cond_embed.bias.add_(0.1)  # new weights: capture is tried again
    with pytest.warns(RuntimeWarning):
        fluid_ops.diffusion_sample(net, z, num_steps=4, cfg=2.0, noise=noise)
    assert Boom.calls == 2


# ---- on a GPU -------------------------------------------------------------------------------
def _entry(net, z, n, steps, gd, guided):
    key = sampling.graph_key(z, n, steps, gd, guided, True)
    hit = sampling.graph_cache(net).entries.get(key)
    return None if hit is None else hit[1]


@requires_cuda
@pytest.mark.parametrize("gemm_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("n", [16, 64])
def test_cuda_graph_replay_equals_eager_loop_bit_for_bit(gemm_dtype, cfg, n):
    net, steps = head().cuda(), 20
    guided = cfg != 1.0
    z, noise = inputs(n, steps, guided, device="cuda")
    for temperature in (0.0, 1.0, 0.0):
        kw = dict(num_steps=steps, cfg=cfg, noise=noise, temperature=temperature, gemm_dtype=gemm_dtype)
        eager = fluid_ops.diffusion_sample(net, z, cuda_graph=False, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed capture would warn and fall back: not here
            graph = fluid_ops.diffusion_sample(net, z, cuda_graph=True, **kw)
        entry = _entry(net, z, n, steps, gemm_dtype, guided)
        assert isinstance(entry, sampling._CapturedLoop) and entry.graph is not None
        assert torch.equal(graph, eager), (temperature, (graph - eager).abs().max().item())
    assert len(sampling.graph_cache(net).entries) == 1  # one graph served every temperature


@requires_cuda
def test_cuda_graph_one_capture_serves_every_cfg_and_temperature_no_sync_no_allocation():
    net, steps, n = head().cuda(), 12, 32
    z, noise = inputs(n, steps, True, device="cuda")
    fluid_ops.diffusion_sample(net, z, num_steps=steps, cfg=2.0, noise=noise)  # captures
    entry = _entry(net, z, n, steps, None, True)
    assert isinstance(entry, sampling._CapturedLoop)
    for cfg, temperature in ((1.5, 0.7), (4.0, 1.0), (-0.5, 0.0)):
        eager = fluid_ops.diffusion_sample(net, z, num_steps=steps, cfg=cfg, noise=noise, temperature=temperature,
                                           cuda_graph=False)
        graph = fluid_ops.diffusion_sample(net, z, num_steps=steps, cfg=cfg, noise=noise, temperature=temperature)
        assert torch.equal(graph, eager)
    assert list(sampling.graph_cache(net).entries.values())[0][1] is entry  # no re-capture
    # A warm call: no host sync at all (torch raises on any synchronising call in "error" mode;
    # the capture itself would have failed on one) and one allocation, the returned samples
    # (the eager loop allocates every step's tensors).
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fluid_ops.diffusion_sample(net, z, num_steps=steps, cfg=2.5, noise=noise, temperature=0.9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] - before == 1
    assert torch.equal(out, fluid_ops.diffusion_sample(net, z, num_steps=steps, cfg=2.5, noise=noise, temperature=0.9,
                                                       cuda_graph=False))


@requires_cuda
def test_cuda_graph_padded_bucket_and_weight_update():
    net, steps, n = head().cuda(), 10, 5  # 5 rows run in the 16-row graph
    z, noise = inputs(n, steps, True, device="cuda")
    kw = dict(num_steps=steps, cfg=3.0, noise=noise, temperature=1.0)
    graph = fluid_ops.diffusion_sample(net, z, **kw)
    # bit for bit against the eager loop on the same padded rows
    zp = torch.zeros(32, Z, device="cuda")
    zp[:n], zp[16:16 + n] = z[:n], z[n:]
    npad = torch.zeros(steps + 1, 16, C, device="cuda")
    npad[:, :n] = noise
    eager_padded = fluid_ops.diffusion_sample(net, zp, num_steps=steps, cfg=3.0, noise=npad, temperature=1.0,
                                              cuda_graph=False)[:n]
    assert torch.equal(graph, eager_padded)
    torch.testing.assert_close(graph, fluid_ops.diffusion_sample(net, z, cuda_graph=False, **kw), rtol=1e-5, atol=1e-5)
    first = _entry(net, z, n, steps, None, True)
    with torch.no_grad():
        net.res_blocks[0].mlp[0].weight.mul_(1.5)  # in place: the graph must not replay stale weights
    graph2 = fluid_ops.diffusion_sample(net, z, **kw)
    assert _entry(net, z, n, steps, None, True) is not first
    eager2 = fluid_ops.diffusion_sample(net, z, cuda_graph=False, **kw)
    torch.testing.assert_close(graph2, eager2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(graph2, graph)


@requires_cuda
def test_cuda_graph_inside_an_outer_capture_runs_eagerly():
    net, steps, n = head().cuda(), 4, 16
    z, noise = inputs(n, steps, False, device="cuda")
    want = fluid_ops.diffusion_sample(net, z, num_steps=steps, noise=noise, cuda_graph=False)
    fluid_ops.diffusion_sample(net, z, num_steps=steps, noise=noise, cuda_graph=False)  # warm kernels
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fluid_ops.diffusion_sample(net, z, num_steps=steps, noise=noise)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@requires_cuda
def test_mar_sample_tokens_uses_graphs_and_matches_the_eager_loop(monkeypatch):
    from fluid_ops.models import MAR
    torch.manual_seed(0)
    m = MAR(img_size=64, vae_stride=16, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
            decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2, buffer_size=4, class_num=10,
            diffloss_d=2, diffloss_w=64, num_sampling_steps="8").cuda().eval()
    with torch.no_grad():
        for p in m.diffloss.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    labels = torch.tensor([1, 2, 3], device="cuda")
    run = lambda: m.sample_tokens(3, num_iter=4, cfg=2.0, labels=labels, temperature=1.0,  # noqa: E731
                                  generator=torch.Generator("cuda").manual_seed(5))
    graphed = run()
    entries = sampling.graph_cache(m.diffloss.net).entries
    assert entries and all(isinstance(e, sampling._CapturedLoop) for _, e in entries.values())
    monkeypatch.setenv("FLUID_OPS_CUDA_GRAPHS", "0")
    eager = run()
    scale = eager.abs().max().item()
    assert (graphed - eager).abs().max().item() <= 1e-4 * scale + 1e-5
