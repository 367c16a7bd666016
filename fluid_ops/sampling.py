"""`fluid_ops.diffusion_sample`: the whole reverse-diffusion loop of MAR's head (docs/contracts.md §2.3).

Same arguments and semantics as `fluid_ops.reference.diffusion.diffusion_sample`; the per-step
update is the fused `fluid_ops.ddpm_step` with the schedule table on the device, the timestep
the model sees is an index into a device tensor, and nothing in the loop copies from host to
device or reads a value back. With a `fluid_ops.nn.DenoiserMLP` the loop runs its sampling fast
path (`DenoiserMLP.sampler`); any other net is called as `net(x, t, z)`.

Numerical contract: exact (fp32) with gemm_dtype None / float32; rounding-level with
gemm_dtype=torch.bfloat16 (the samples then match the fp32 ones in distribution, and per
element to about 1e-2 over 100 steps at MAR-B size).

CUDA graphs (`cuda_graph=`, default on for CUDA tensors): the whole S-step loop -- the sampler's
per-AR-step set-up (`cond_embed(z)`), S head evaluations and S `ddpm_step`s -- is captured once
per shape bucket as one CUDA graph and replayed: one launch instead of S * (3 + 2 * blocks)
kernel launches from Python. The carried rows N are rounded up to a bucket (`graph_bucket`:
powers of two from 16 to 1024, then multiples of 1024); the padding rows hold zeros and, every
op being row-wise, never touch the real rows. A graph is cached per (net, bucket, num_steps,
GEMM dtype, guided or not, dtypes, device) and dropped when any parameter or buffer of the net
changes (its storage or version counter: an optimizer step, load_state_dict, a new Parameter).
Temperature and cfg travel in a device tensor (`fluid_ops.ops.ddpm.ddpm_step_params`), so one
graph serves every value (MAR's linear cfg schedule changes cfg at every AR step). Before a
replay, z and the noise are copied into the graph's input buffers (device-to-device). On CUDA
the eager loop runs the very same kernels (ddpm_step_params included), so replay and eager
loop agree bit for bit on a bucket-sized batch. If capture fails (a host sync or a host-to-device
copy inside the net, an op that cannot be captured), the eager loop runs and a RuntimeWarning
says why (once per cache key).
"""
from __future__ import annotations

import collections
import functools
import itertools
import math
import os
import sys
import warnings

import torch

from fluid_ops.nn.denoiser import DenoiserMLP, auto_gemm_dtype
from fluid_ops.ops._checks import FLOAT_DTYPES, check_finite_scalar, check_tensor
from fluid_ops.ops.ddpm import ddpm_step, ddpm_step_params
from fluid_ops.reference.diffusion import DiffusionSchedule, check_noise_shift, draw_sampling_noise

__all__ = ["SOLVERS", "diffusion_sample", "graph_bucket", "step_schedule"]

OP = "diffusion_sample"


SOLVERS = ("ddpm", "ddim", "dpm++2m")
LOWER_ORDER_FINAL = 0  # dpm++2m: respaced steps <= this take the first-order update


@functools.lru_cache(maxsize=1024)
def _schedule(num_steps: int, noise_shift: float = 1.0) -> DiffusionSchedule:
    """Cached so its device tables (DiffusionSchedule.table) are built once per device."""
    return DiffusionSchedule(num_steps, noise_shift=noise_shift)


class _TextProgress:
    """Fallback when tqdm is not installed: one updating line on stderr."""

    def __init__(self, total):
        self.total, self.n = total, 0

    def update(self, k=1):
        self.n += k
        sys.stderr.write(f"\r{OP}: {self.n}/{self.total} steps")
        if self.n >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self):
        pass


def _progress_bar(total):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextProgress(total)
    return tqdm(total=total, desc=OP, leave=False)


def diffusion_sample(net, z: torch.Tensor, *, num_steps: int = 100, temperature: float = 1.0,
                     cfg: float = 1.0, noise: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, gemm_dtype: torch.dtype | None = None,
                     progress: bool = False, cuda_graph: bool | None = None,
                     clip_denoised: bool = False, noise_shift: float = 1.0, solver: str = "ddpm",
                     eta: float = 0.0) -> torch.Tensor:
    """Sample N tokens from MAR's diffusion head; returns (N, C) float32, C = net.in_channels.

    net: a `fluid_ops.nn.DenoiserMLP` (fast path) or any module with `in_channels` called as
    net(x (M, C), t (M,) int64, z (M, Z)) -> (M, 2C). z: (N, Z), or (2N, Z) = [cond; uncond] when
    cfg != 1 (the loop carries N rows and evaluates 2N per step). noise: (num_steps + 1, N, C),
    [0] = x_T, [i + 1] = the noise of loop iteration i; drawn from `generator` when None.
    gemm_dtype: torch.bfloat16 runs the fast path's GEMMs in bf16 (None: the weights' dtype;
    "auto": bf16 where the hardware has native bf16 GEMMs (CUDA, AVX512_BF16 / AMX CPUs), else
    fp32 -- on AVX2-only CPUs torch's bf16 GEMMs are emulated and slower than fp32).
    progress: show a progress bar (tqdm when installed; with a CUDA graph it advances at the end).
    cuda_graph: None (default) replays a CUDA graph of the loop on CUDA tensors when capture is
    possible (an nn.Module net, not inside another capture; FLUID_OPS_CUDA_GRAPHS=0 turns the
    default off) and runs the eager loop on CPU; True asks for it (an error on CPU tensors; a net
    that is not an nn.Module or a failed capture falls back with a warning); False: eager.
    clip_denoised: clamp each step's predicted x_0 to [-1, 1] (see `fluid_ops.ddpm_step`; for
    tokens in [-1, 1] such as pixel patches; MAR's latents are unbounded and MAR samples without
    it, the default).
    noise_shift: the schedule's SNR divided by noise_shift ** 2 (`fluid_ops.reference.diffusion.
    cosine_alpha_bar`); it must be the value the head was trained with (1: MAR's schedule).
    solver: "ddpm" (default: MAR's ancestral loop, exact), "ddim" (with `eta`: 0 deterministic,
    1 ~ DDPM) or "dpm++2m" (DPM-Solver++(2M), data prediction), on the same respaced schedule and
    with the same CFG; formulas and what temperature means for each in docs/contracts.md §2.3.
    ddim / dpm++2m run the eager loop (no CUDA graph) and read the same noise tensor (rows they do
    not need are drawn but unused, so the generator advances the same way for every solver)."""
    if not isinstance(net, torch.nn.Module) and not callable(net):
        raise TypeError(f"{OP}: net must be a callable module, got {type(net).__name__}")
    c = getattr(net, "in_channels", None)
    if not isinstance(c, int) or c < 1:
        raise TypeError(f"{OP}: net must have an int attribute in_channels (the token width), got {c!r}")
    check_tensor(OP, "z", z, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    zc = getattr(net, "z_channels", None)
    if isinstance(zc, int) and z.shape[1] != zc:
        raise ValueError(f"{OP}: z must have shape (*, {zc}) (net.z_channels), got {tuple(z.shape)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise TypeError(f"{OP}: num_steps must be an int, got {type(num_steps).__name__}")
    if not 1 <= num_steps <= 1000:
        raise ValueError(f"{OP}: num_steps must be in [1, 1000] (respaced from 1000 training steps), got {num_steps}")
    temperature = check_finite_scalar(OP, "temperature", temperature, min_value=0.0)
    cfg = check_finite_scalar(OP, "cfg", cfg)
    if not isinstance(clip_denoised, bool):
        raise TypeError(f"{OP}: clip_denoised must be a bool, got {type(clip_denoised).__name__}")
    noise_shift = check_noise_shift(OP, noise_shift)
    if solver not in SOLVERS:
        raise ValueError(f"{OP}: solver must be one of {SOLVERS}, got {solver!r}")
    eta = check_finite_scalar(OP, "eta", eta, min_value=0.0)
    guided = cfg != 1.0
    if guided and z.shape[0] % 2:
        raise ValueError(f"{OP}: with cfg != 1, z must have an even number of rows ([cond; uncond], 2N), "
                         f"got {z.shape[0]}")
    n = z.shape[0] // 2 if guided else z.shape[0]
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{OP}: generator must be a torch.Generator or None, got {type(generator).__name__} "
                        f"(for a seed, pass torch.Generator().manual_seed(seed))")
    if gemm_dtype is not None:
        if not (isinstance(gemm_dtype, str) and gemm_dtype == "auto") and \
                gemm_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{OP}: gemm_dtype must be None, 'auto', float32, bfloat16 or float16, got {gemm_dtype!r}")
        if not isinstance(net, DenoiserMLP):
            raise ValueError(f"{OP}: gemm_dtype applies to fluid_ops.nn.DenoiserMLP only, "
                             f"got a {type(net).__name__}")
    if noise is not None:
        check_tensor(OP, "noise", noise, dtypes=FLOAT_DTYPES + (torch.float64,), shape=(num_steps + 1, n, c))
        if noise.device != z.device:
            raise ValueError(f"{OP}: noise is on {noise.device} but z is on {z.device}; all tensors must be on one device")
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            if p.device != z.device:
                raise ValueError(f"{OP}: net's parameters are on {p.device} but z is on {z.device}")
            break
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"{OP}: cuda_graph must be None, True or False, got {cuda_graph!r}")
    if cuda_graph and z.device.type != "cuda":
        raise ValueError(f"{OP}: cuda_graph=True needs CUDA tensors, but z is on {z.device}")
    if n == 0:
        return torch.empty(0, c, device=z.device)

    sched = _schedule(num_steps, noise_shift)
    if noise is None:
        noise = draw_sampling_noise(n, c, num_steps, device=z.device, generator=generator)
    noise = noise.float()
    # The fast path keeps an fp32 residual stream; an fp64 module runs its own forward.
    use_fast = isinstance(net, DenoiserMLP) and (gemm_dtype is not None or net.cond_embed.weight.dtype != torch.float64)
    if use_fast and isinstance(gemm_dtype, str):
        gemm_dtype = auto_gemm_dtype(z.device)  # resolved here: the graph cache keys on it
    bar = _progress_bar(num_steps) if progress else None
    with torch.no_grad():
        x = None
        if solver != "ddpm":
            x = _solver_loop(net, z, noise, sched, temperature, cfg, guided, use_fast, gemm_dtype, bar,
                             clip_denoised=clip_denoised, solver=solver, eta=eta)
        elif _want_graph(net, z, cuda_graph):
            x = _sample_with_graph(net, z, noise, sched, n, temperature, cfg, guided, use_fast, gemm_dtype,
                                   clip_denoised)
            if x is not None and bar is not None:
                bar.update(num_steps)
        if x is None:
            table = sched.table(z.device)                # built once per device, stays there
            ts = sched.model_timesteps(z.device)         # (S,) original step indices, on the device
            params = _device_params(temperature, cfg, z.device)
            x = _loop(net, z, noise, table, ts, num_steps, temperature, cfg, params, guided, use_fast,
                      gemm_dtype, bar, clip_denoised=clip_denoised)
    if bar is not None:
        bar.close()
    return x


def _device_params(temperature: float, cfg: float, device: torch.device):
    """On CUDA: [temperature, cfg] as a float32 device tensor, written by two fill kernels (no
    host-to-device copy), read by ddpm_step_params. On CPU: None (the plain ddpm_step)."""
    if device.type != "cuda":
        return None
    params = torch.empty(2, dtype=torch.float32, device=device)
    params[0].fill_(temperature)
    params[1].fill_(cfg)
    return params


def _loop(net, z, noise, table, ts, num_steps, temperature, cfg, params, guided, use_fast, gemm_dtype,
          bar=None, *, clip_denoised=False):
    """The S-step loop (eager, or being captured): returns x_0 (N, C) float32, N = noise.shape[1].
    With `params` (CUDA) the step reads temperature / cfg from it, so a captured loop replays
    with any value and the eager loop runs the same kernels as the graph."""
    fast = net.sampler(z, ts, gemm_dtype) if use_fast else None
    x = noise[0].clone()
    for i, step in enumerate(range(num_steps - 1, -1, -1)):
        if fast is not None:
            model_out = fast(x, step)
        else:
            xin = torch.cat([x, x]) if guided else x
            model_out = net(xin.to(z.dtype), ts[step].expand(xin.shape[0]), z)
            if model_out.dtype == torch.float64:  # an fp64 module (e.g. gradcheck-style runs); the step is fp32
                model_out = model_out.float()
        if params is None:
            x = ddpm_step(x, model_out, noise[i + 1], table, step, temperature=temperature, cfg=cfg,
                          clip_denoised=clip_denoised)
        else:
            x = ddpm_step_params(x, model_out, noise[i + 1], table, step, params, clip_denoised=clip_denoised)
        if bar is not None:
            bar.update(1)
    return x


# ---- DDIM and DPM-Solver++(2M) on the respaced schedule (docs/contracts.md §2.3) ------------
def solver_coefficients(sched: DiffusionSchedule, solver: str, eta: float = 0.0) -> list:
    """Per respaced step i (S-1 .. 0, loop order) the host floats of the update x_i -> x_{i-1}:
    ddim: (sqrt(1/ab), sqrt(1/ab - 1), sqrt(ab_prev), sqrt(1 - ab_prev - sigma^2), sigma);
    dpm++2m: (sqrt(1/ab), sqrt(1/ab - 1), sigma_prev / sigma, alpha_prev * (1 - exp(-h)), h).
    ab_prev = 1 after step 0. Cached on the schedule (built once per (solver, eta))."""
    key = (solver, float(eta))
    cache = sched.__dict__.setdefault("_solver_coefs", {})
    if key in cache:
        return cache[key]
    ab = sched.alphas_cumprod
    out = []
    for i in range(sched.num_steps - 1, -1, -1):
        a, ap = float(ab[i]), (float(ab[i - 1]) if i > 0 else 1.0)
        r1, rm1 = math.sqrt(1.0 / a), math.sqrt(1.0 / a - 1.0)
        if solver == "ddim":
            sig = eta * math.sqrt((1.0 - ap) / (1.0 - a)) * math.sqrt(max(0.0, 1.0 - a / ap))
            out.append((r1, rm1, math.sqrt(ap), math.sqrt(max(0.0, 1.0 - ap - sig * sig)), sig))
        else:
            lam = 0.5 * math.log(a / (1.0 - a))
            if i == 0:  # to ab_prev = 1 (sigma_prev = 0): x_prev = the data prediction itself
                out.append((r1, rm1, 0.0, 1.0, math.inf))
            else:
                lam_p = 0.5 * math.log(ap / (1.0 - ap))
                h = lam_p - lam
                out.append((r1, rm1, math.sqrt((1.0 - ap) / (1.0 - a)), math.sqrt(ap) * -math.expm1(-h), h))
    cache[key] = out
    return out


def _solver_loop(net, z, noise, sched, temperature, cfg, guided, use_fast, gemm_dtype, bar=None, *,
                 clip_denoised=False, solver="ddim", eta=0.0):
    """x_0 (N, C) float32 by DDIM or DPM-Solver++(2M); the net is evaluated as in `_loop`."""
    num_steps = sched.num_steps
    ts = sched.model_timesteps(z.device)
    coefs = solver_coefficients(sched, solver, eta)
    fast = net.sampler(z, ts, gemm_dtype) if use_fast else None
    c = noise.shape[2]
    x = noise[0] * temperature
    x0_last, h_last = None, None
    for i, step in enumerate(range(num_steps - 1, -1, -1)):
        if fast is not None:
            out = fast(x, step)
        else:
            xin = torch.cat([x, x]) if guided else x
            out = net(xin, ts[step].expand(xin.shape[0]), z)
        eps = out[:, :c].float()
        if guided:
            n = x.shape[0]
            eps = eps[n:] + cfg * (eps[:n] - eps[n:])
        r1, rm1, a, b, d = coefs[i]
        x0 = r1 * x - rm1 * eps
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        if solver == "ddim":
            eps_hat = (r1 * x - x0) / rm1  # eps consistent with the (clipped) x0
            x = a * x0 + b * eps_hat
            if d > 0.0 and temperature > 0.0:
                x = x + (d * temperature) * noise[i + 1]
        else:
            if h_last is None or step <= LOWER_ORDER_FINAL:
                dx = x0                     # first order: the first step and the last ones (see §2.3)
            else:
                r = h_last / d
                dx = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_last
            x = a * x + b * dx
            x0_last, h_last = x0, d
        if bar is not None:
            bar.update(1)
    return x


# ---- per-AR-step diffusion step schedules ---------------------------------------------------
def step_schedule(spec, num_iter: int, default: int = 100, *, owner: str = "step_schedule") -> list[int]:
    """Diffusion steps for each of `num_iter` AR steps (docs/contracts.md §2.3, "Step schedules").

    spec: an int (every AR step); ("linear", first, last) or ("cosine", first, last); the names
    "linear" / "cosine" alone (first = default, last = max(1, default // 10)); or a callable
    progress p in [0, 1] -> steps. AR step k has p = k / (num_iter - 1) (0 when num_iter = 1).
    linear: round(first + (last - first) p); cosine: round(last + (first - last) (1 + cos(pi p)) / 2).
    Every count must be an int in [1, 1000]."""
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"{owner}: num_iter must be an int >= 1, got {num_iter!r}")
    if isinstance(spec, str):
        spec = (spec, default, max(1, default // 10))
    ps = [k / (num_iter - 1) if num_iter > 1 else 0.0 for k in range(num_iter)]
    if isinstance(spec, int) and not isinstance(spec, bool):
        out = [spec] * num_iter
    elif isinstance(spec, (tuple, list)) and len(spec) == 3 and spec[0] in ("linear", "cosine"):
        name, first, last = spec
        for v in (first, last):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{owner}: the endpoints of a {name!r} step schedule must be ints, got {spec!r}")
        if name == "linear":
            out = [int(round(first + (last - first) * p)) for p in ps]
        else:
            out = [int(round(last + (first - last) * (1.0 + math.cos(math.pi * p)) / 2.0)) for p in ps]
    elif callable(spec):
        out = [spec(p) for p in ps]
        out = [int(v) if isinstance(v, float) and v == int(v) else v for v in out]
    else:
        raise ValueError(f"{owner}: num_diffusion_steps must be an int, 'linear', 'cosine', (name, first, last) "
                         f"or a callable of progress in [0, 1], got {spec!r}")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1000:
            raise ValueError(f"{owner}: every diffusion step count must be an int in [1, 1000], got {v!r} "
                             f"from {spec!r}")
    return out


# ---- opt-in fast sampling: options and the `fast` preset -------------------------------------
# Chosen from benchmarks/fast_sampling.py (benchmarks/results/README.md). Every key is a keyword
# of Fluid.generate / MAR.sample_tokens; an argument given explicitly wins over the preset.
FAST_PRESET = {"num_diffusion_steps": ("linear", 25, 10), "solver": "dpm++2m", "eta": 0.0, "cache_interval": 1,
               "uncond_cache_interval": None}
PRESETS = {"fast": FAST_PRESET}


def resolve_fast_options(owner: str, preset, num_diffusion_steps, solver, eta, cache_interval,
                         uncond_cache_interval) -> dict:
    """The sampling options after applying `preset` (None or "fast") to the arguments left None,
    checked; defaults: exact sampling (solver "ddpm", eta 0, cache_interval 1, the uncond branch
    refreshed with the cond one)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"{owner}: preset must be None or one of {tuple(PRESETS)}, got {preset!r}")
    p = PRESETS.get(preset, {})
    given = {"num_diffusion_steps": num_diffusion_steps, "solver": solver, "eta": eta,
             "cache_interval": cache_interval, "uncond_cache_interval": uncond_cache_interval}
    o = {k: (p.get(k) if v is None else v) for k, v in given.items()}
    o["solver"] = "ddpm" if o["solver"] is None else o["solver"]
    if o["solver"] not in SOLVERS:
        raise ValueError(f"{owner}: solver must be one of {SOLVERS}, got {o['solver']!r}")
    o["eta"] = check_finite_scalar(owner, "eta", 0.0 if o["eta"] is None else o["eta"], min_value=0.0)
    o["cache_interval"] = 1 if o["cache_interval"] is None else o["cache_interval"]
    if o["uncond_cache_interval"] is None:
        o["uncond_cache_interval"] = o["cache_interval"]
    for k in ("cache_interval", "uncond_cache_interval"):
        v = o[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}: {k} must be an int >= 1 (1: no feature caching), got {v!r}")
    return o


# ---- CUDA graphs of the whole loop ----------------------------------------------------------
GRAPH_CACHE_SIZE = 8  # graphs kept per net (LRU); each holds its bucket's workspaces


def graph_bucket(n: int) -> int:
    """The row count a graph is captured for when the loop carries n rows: powers of two from
    16 to 1024, then multiples of 1024 (at most 2x the work for small n, < 1024 rows above)."""
    if n <= 16:
        return 16
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    return -(-n // 1024) * 1024


def weights_stamp(net) -> tuple:
    """What a captured graph depends on in `net`: identity, storage and version counter of every
    parameter and buffer (an in-place update bumps the version, a new tensor changes the rest)."""
    if not isinstance(net, torch.nn.Module):
        return ()
    return tuple((id(p), p.data_ptr(), p._version) for p in itertools.chain(net.parameters(), net.buffers()))


class _Failed:
    """A cache entry for a key whose capture failed: the eager loop runs, no retry."""

    def __init__(self, reason: str):
        self.reason = reason


class GraphCache:
    """Captured loops of one net, LRU, at most GRAPH_CACHE_SIZE. Kept in the net's __dict__;
    copy.deepcopy and pickling of the net give an empty cache (graphs cannot be copied)."""

    def __init__(self):
        self.entries: collections.OrderedDict = collections.OrderedDict()

    def __deepcopy__(self, memo):
        return GraphCache()

    def __reduce__(self):
        return (GraphCache, ())

    def get(self, key, stamp):
        hit = self.entries.get(key)
        if hit is None:
            return None
        if hit[0] != stamp:  # the weights changed since the capture
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return hit[1]

    def put(self, key, stamp, entry):
        if len(self.entries) >= GRAPH_CACHE_SIZE and key not in self.entries:
            self.entries.popitem(last=False)
        self.entries[key] = (stamp, entry)

    def clear(self):
        self.entries.clear()


def graph_cache(net) -> GraphCache:
    """The net's cache of captured sampling loops (created on first use)."""
    cache = net.__dict__.get("_fluid_graph_cache")
    if cache is None:
        cache = net.__dict__["_fluid_graph_cache"] = GraphCache()
    return cache


def graph_key(z: torch.Tensor, n: int, num_steps: int, gemm_dtype, guided: bool, use_fast: bool,
              clip_denoised: bool = False, noise_shift: float = 1.0) -> tuple:
    """The cache key of the graph that serves this call (the net is the cache's owner)."""
    return (graph_bucket(n), num_steps, gemm_dtype, guided, use_fast, z.dtype, z.shape[1], z.device, clip_denoised,
            noise_shift)


def _want_graph(net, z: torch.Tensor, cuda_graph) -> bool:
    if cuda_graph is False or z.device.type != "cuda":
        return False
    if not isinstance(net, torch.nn.Module):  # its weights cannot be tracked: a graph could go stale
        if cuda_graph:
            warnings.warn(f"{OP}: cuda_graph=True needs net to be a torch.nn.Module (whose parameters tell "
                          f"when a captured graph is stale), got a {type(net).__name__}; running the eager loop",
                          RuntimeWarning, stacklevel=3)
        return False
    if cuda_graph is None and os.environ.get("FLUID_OPS_CUDA_GRAPHS", "1").strip() == "0":
        return False  # the default turned off for the process (e.g. to compare with the eager loop)
    # inside someone else's capture (e.g. a benchmark graphing this call), run eagerly into it
    return not torch.cuda.is_current_stream_capturing()


class _CapturedLoop:
    """One captured S-step loop for `bucket` carried rows: input buffers (z, noise, params), the
    graph, and its output buffer. `capture=False` runs the same buffers through the eager loop
    (for tests of the padding logic on CPU)."""

    def __init__(self, net, z_dtype, z_channels, channels, bucket, sched, guided, use_fast, gemm_dtype, device,
                 capture=True, clip_denoised=False):
        self.bucket, self.guided, self.num_steps = bucket, guided, sched.num_steps
        m = 2 * bucket if guided else bucket
        self.z = torch.zeros(m, z_channels, dtype=z_dtype, device=device)
        self.noise = torch.zeros(sched.num_steps + 1, bucket, channels, device=device)
        self.params = torch.ones(2, dtype=torch.float32, device=device) if device.type == "cuda" else None
        self.table = sched.table(device)          # kept alive here: the graph reads them by address
        self.ts = sched.model_timesteps(device)
        self.args = (net, sched.num_steps, guided, use_fast, gemm_dtype, clip_denoised)
        self.graph = None
        if capture:
            self._capture(device)

    def _run(self, temperature=1.0, cfg=1.0):
        net, steps, guided, use_fast, gd, clip = self.args
        return _loop(net, self.z, self.noise, self.table, self.ts, steps, temperature, cfg, self.params, guided,
                     use_fast, gd, clip_denoised=clip)

    def _capture(self, device):
        with torch.cuda.device(device):
            self._capture_on_current_device(device)

    def _capture_on_current_device(self, device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._run()  # compiles / autotunes every kernel and fills the weight caches, outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # any host sync or pageable host-to-device copy in here fails the capture
            self.out = self._run()
        self.graph = graph

    def fill(self, z, noise, n, temperature, cfg):
        b = self.bucket
        self.z.zero_()
        if self.guided:
            self.z[:n].copy_(z[:n])
            self.z[b:b + n].copy_(z[n:])
        else:
            self.z[:n].copy_(z)
        self.noise[:, n:].zero_()
        self.noise[:, :n].copy_(noise)
        if self.params is not None:
            self.params[0].fill_(temperature)
            self.params[1].fill_(cfg)

    def __call__(self, z, noise, n, temperature, cfg):
        self.fill(z, noise, n, temperature, cfg)
        if self.graph is None:
            return self._run(temperature, cfg)[:n].clone()
        self.graph.replay()
        return self.out[:n].clone()


def _sample_with_graph(net, z, noise, sched, n, temperature, cfg, guided, use_fast, gemm_dtype, clip_denoised=False):
    """The loop as a replayed CUDA graph, or None (after a warning) when it cannot be captured."""
    cache = graph_cache(net)
    key = graph_key(z, n, sched.num_steps, gemm_dtype, guided, use_fast, clip_denoised, sched.noise_shift)
    stamp = weights_stamp(net)
    entry = cache.get(key, stamp)
    if entry is None:
        try:
            entry = _CapturedLoop(net, z.dtype, z.shape[1], noise.shape[2], key[0], sched, guided, use_fast,
                                  gemm_dtype, z.device, clip_denoised=clip_denoised)
        except Exception as e:  # noqa: BLE001 - any failure to capture means: run eagerly
            if z.device.type == "cuda":
                torch.cuda.synchronize(z.device)  # let an invalidated capture settle before the eager loop
            entry = _Failed(f"{type(e).__name__}: {e}")
            warnings.warn(f"{OP}: CUDA graph capture failed, running the eager loop ({entry.reason})",
                          RuntimeWarning, stacklevel=3)
        cache.put(key, weights_stamp(net), entry)  # (capturing may have rebuilt cached weights)
    if isinstance(entry, _Failed):
        return None
    return entry(z, noise, n, temperature, cfg)


