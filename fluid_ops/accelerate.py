"""`fluid_ops.accelerate(model)`: put fluid_ops' kernels into an instance of MAR's OWN class
(LTH14/mar's `models.mar.MAR`, built on timm), in place, without changing its parameters,
state dict, module tree or module types.

    model = mar_base(...); model.load_state_dict(ckpt["model_ema"])
    fluid_ops.accelerate(model)              # validates everything first, then swaps
    model.sample_tokens(...)                 # same code, fluid_ops underneath
    fluid_ops.accelerate(model, undo=True)   # back to MAR's own forward / sample

What is swapped
---------------
(a) Attention. For every `blk` in `model.encoder_blocks` and `model.decoder_blocks`, `blk.attn`
    (timm's `Attention`, any release from 0.9.12, the one MAR pins, to 1.0.x) gets an
    instance-level `forward` (a `functools.partial` of a function of
    this module, so deepcopy / pickle keep working) that computes timm's forward with
    `fluid_ops.attention` on the (B, N, H, D) views of the fused qkv output ((B, N, 3, H, D), no
    transposes): q_norm / k_norm (when not Identity; they normalise the last dim, so the layout
    does not matter), softmax scale D ** -0.5 when `fused_attn` (what timm's SDPA path uses) else
    `attn.scale`, `norm` (timm >= 1.0 `scale_norm`) when present and not Identity, the sigmoid
    `gate` (timm >= 1.0.2x `gated=True`) when present, then `proj` and `proj_drop` (same dropout
    draws on the global RNG as timm). Every head dim up to 256 runs (fluid_ops.attention pads the
    ones it has no kernel for). The keywords timm passes to `Attention.forward` are taken:
    `attn_mask` (timm >= 1.0) and `is_causal` (timm 1.0.2x; `causal=True` here); an
    Attention class whose forward takes any other argument is REFUSED by accelerate (so a new
    timm keyword is an error at accelerate time, not a silent slow path). It falls back to the
    class's own forward (timm's) only where fluid_ops cannot compute the same thing:
      * training with attention dropout (`attn.training and attn.attn_drop.p > 0`; MAR's
        default attn_dropout is 0.1, so MAR's default training runs timm's attention);
      * an `attn_mask` that is not a boolean key mask of shape (B, 1, 1, N) on the SDPA path
        (a boolean key mask becomes `key_padding_mask`; a query row with no key allowed
        returns 0 here where SDPA returns NaN), or `attn_mask` together with `is_causal`.
    MAR's own code (eval, sampling, and training with attn_dropout=0) hits none of these: one
    `fluid_ops.attention` call per block per pass.
(b) Diffusion sampling. `model.diffloss.sample(z, temperature=1.0, cfg=1.0)` (an instance
    attribute, same signature and return shape as MAR's) runs `fluid_ops.diffusion_sample` with
    a `fluid_ops.nn.DenoiserMLP` that SHARES the Parameter objects of `model.diffloss.net`
    (MAR's SimpleMLPAdaLN): optimizer steps, `load_state_dict`, EMA swaps and `.to()` are seen
    at once (no copy; if a parameter object is replaced, the next `sample` call re-binds). The
    DenoiserMLP lives outside the module tree (in `diffloss.__dict__`), so `state_dict()`,
    `parameters()` and `modules()` are unchanged. The number of steps is
    `model.diffloss.gen_diffusion.num_timesteps` (MAR builds gen_diffusion from
    `num_sampling_steps`, e.g. "100").
    Noise: drawn from torch's GLOBAL RNG in exactly MAR's order and shapes, so a
    `torch.manual_seed` gives the same tokens as MAR's own sample (within fp32 tolerance):
    x_T = torch.randn(N, C) on the CPU generator then moved to z's device (MAR:
    `torch.randn(...).cuda()`), then one `torch.randn(M, C, device=z.device)` per step
    (IDDPM's `randn_like(x)`, M = rows MAR carries: N, or 2N with guidance, of which the first
    N are used). With cfg != 1 the result has 2N rows like MAR's; both halves are the guided
    (cond) samples, where MAR's second half is a discarded by-product (MAR's sample_tokens
    keeps only the first half).
    The training loss (`diffloss.forward`) is MAR's own code, untouched.

Attributes relied on (anything else is not read)
-----------------------------------------------
model: `encoder_blocks`, `decoder_blocks` (iterables of modules with `.attn`), `diffloss`.
blk.attn: `qkv` (nn.Linear, out = 3 * H * D), `proj` (nn.Linear, in = H * D), `num_heads` (int),
  `attn_drop` (nn.Dropout or nn.Identity), `proj_drop` (module); optional: `head_dim` (must be
  D), `scale`, `fused_attn`, `q_norm` / `k_norm` (Identity, or a norm with normalized_shape
  (D,)), `norm` (Identity or a module), `gate` (None or a module), `rope` (must be None or
  absent); `type(attn).forward` must take (x) plus at most `attn_mask` and `is_causal`. D must be
  at most 256.
diffloss: `net`, `gen_diffusion`, `sample`; net: `in_channels`, `model_channels`,
  `out_channels` (= 2 * in_channels), `time_embed`, `cond_embed`, `input_proj`, `res_blocks`,
  `final_layer` with SimpleMLPAdaLN's submodule names, types (Linear / LayerNorm / SiLU) and
  parameter shapes; gen_diffusion: `num_timesteps`, `timestep_map` and `betas` (must be IDDPM's
  respaced cosine schedule: the same kept steps and betas as fluid_ops'), and, if present,
  `model_mean_type.name == "EPSILON"`, `model_var_type.name == "LEARNED_RANGE"`.
On every call each attention and the head are also PROBED: the original and the swapped forward
run on a small random input (private generator, eval semantics, no hooks, no global RNG draws;
for attention also with a boolean key mask and with is_causal=True where the class takes them)
and must agree; a module that only looks like timm's / MAR's is refused.

What was done is reported: `accelerate` returns the model with `model.fluid_ops_report` (an
`AccelerateReport`: attention modules and heads now served by fluid_ops, their head dims, which
of them run zero-padded or on the reference, the timm keywords the swapped forward takes, whether
diffusion sampling was swapped) and logs its one-line summary on the `fluid_ops.accelerate`
logger (INFO); `verbose=True` also prints it. A model with no attention module to swap is an
error (ValueError), never a silent no-op.

Refusals raise TypeError (wrong kind of object) or ValueError (recognised kind, unsupported
configuration) naming the attribute, and change nothing: everything is validated before the
first swap. Calling accelerate again is a no-op (it re-validates, keeps the attention swaps
and the bound DenoiserMLP, and sets sample's gemm_dtype to the new call's);
`accelerate(model, undo=True)` removes the swaps and the DenoiserMLP. `gemm_dtype` is passed to
`fluid_ops.diffusion_sample` (None: exact fp32; torch.bfloat16 / "auto": rounding-level).
The swaps are instance attributes holding `functools.partial`s of this module's functions:
`copy.deepcopy` and `torch.save(model)` / `torch.load` keep them, bound to the copy.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging

import torch
import torch.nn as nn

from fluid_ops import backend
from fluid_ops.nn.denoiser import DenoiserMLP
from fluid_ops.ops.attention import HEAD_DIMS, MAX_HEAD_DIM, attention
from fluid_ops.reference.diffusion import DiffusionSchedule
from fluid_ops.sampling import SOLVERS, diffusion_sample, step_schedule

__all__ = ["accelerate", "AccelerateReport"]

NAME = "accelerate"
_log = logging.getLogger("fluid_ops.accelerate")
_KEYWORDS = ("attn_mask", "is_causal")  # what timm's Block passes to Attention.forward (0.9.12: none)


@dataclasses.dataclass(frozen=True)
class AccelerateReport:
    """What `accelerate(model)` swapped (also `model.fluid_ops_report`)."""
    attention_modules: int          # timm Attention modules whose forward now runs fluid_ops.attention
    heads: int                      # attention heads served, summed over those modules
    encoder_modules: int
    decoder_modules: int
    head_dims: tuple                # distinct head dims
    padded_head_dims: tuple         # of those, run zero-padded to a kernel head dim (fluid_ops.attention_head_dims)
    reference_head_dims: tuple      # of those, with no compiled kernel (> 128): the reference backend runs them
    keywords: tuple                 # Attention.forward keywords the swapped forward takes (timm's, per class)
    fused_attn: tuple               # distinct `fused_attn` flags seen (timm's SDPA path or not)
    diffusion_sample: bool          # model.diffloss.sample runs fluid_ops.diffusion_sample
    gemm_dtype: object = None

    def __str__(self):
        dims = ", ".join(str(d) for d in self.head_dims)
        extra = []
        if self.padded_head_dims:
            extra.append(f"zero-padded: {', '.join(map(str, self.padded_head_dims))}")
        if self.reference_head_dims:
            extra.append(f"reference backend: {', '.join(map(str, self.reference_head_dims))}")
        kw = ", ".join(self.keywords) or "none"
        return (f"fluid_ops.accelerate: {self.attention_modules} attention modules ({self.encoder_modules} encoder + "
                f"{self.decoder_modules} decoder), {self.heads} heads, head dim {dims}"
                f"{' (' + '; '.join(extra) + ')' if extra else ''}, timm keywords taken: {kw}; "
                f"diffusion sampling {'swapped' if self.diffusion_sample else 'not swapped'}"
                f"{'' if self.gemm_dtype is None else f' (gemm_dtype {self.gemm_dtype})'}")
_NET_KEY = "_fluid_ops_denoiser"  # diffloss.__dict__ entry: (param ids, DenoiserMLP)
_AR_KEY = "_fluid_ops_ar_steps"   # diffloss.__dict__ entry while a swapped sample_tokens runs


# ---- (a) attention ------------------------------------------------------------------------
def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _head_dim(attn) -> int:
    return attn.qkv.out_features // (3 * attn.num_heads)


def _key_padding(mask, b, n):
    """A boolean key mask (B, 1, 1, N) (or broadcastable batch 1) -> (B, N); else None."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        return None
    if mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != n or mask.shape[0] not in (1, b):
        return None
    return mask[:, 0, 0, :].expand(b, n)


def _fast_attention_forward(attn, x, attn_mask=None, is_causal=False):
    """timm's Attention.forward on fluid_ops.attention (see the module docstring). The signature
    is the union of timm's releases: forward(x) (0.9.12), forward(x, attn_mask=None) (1.0),
    forward(x, attn_mask=None, is_causal=False) (1.0.2x); accelerate checks that the class takes
    no other argument."""
    drop = attn.attn_drop
    if attn.training and not _is_identity(drop) and drop.p > 0:
        return _timm_forward(attn, x, attn_mask, is_causal)
    fused = bool(getattr(attn, "fused_attn", True))
    b, n, _ = x.shape
    kpm = None
    if attn_mask is not None:
        kpm = _key_padding(attn_mask, b, n) if fused and not is_causal else None
        if kpm is None:
            return _timm_forward(attn, x, attn_mask, is_causal)
    gate_mod = getattr(attn, "gate", None)
    gate = gate_mod(x).sigmoid() if gate_mod is not None else None
    h = attn.num_heads
    d = _head_dim(attn)
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, d).unbind(2)  # (B, N, H, D) views
    qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if not _is_identity(qn):
        q = qn(q)
    if not _is_identity(kn):
        k = kn(k)
    scale = None if fused else float(attn.scale)
    o = attention(q, k, v, key_padding_mask=kpm, causal=bool(is_causal), softmax_scale=scale).reshape(b, n, h * d)
    norm = getattr(attn, "norm", None)
    if not _is_identity(norm):
        o = norm(o)
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o))


def _timm_forward(attn, x, attn_mask, is_causal):
    """The class's own forward with only the arguments given (timm 0.9.12 takes x alone)."""
    kw = {}
    if attn_mask is not None:
        kw["attn_mask"] = attn_mask
    if is_causal:
        kw["is_causal"] = is_causal
    return type(attn).forward(attn, x, **kw)


def _forward_keywords(path: str, attn) -> tuple:
    """The extra parameters of type(attn).forward; anything but attn_mask / is_causal is refused."""
    try:
        params = list(inspect.signature(type(attn).forward).parameters.values())[2:]  # self, x
    except (TypeError, ValueError):
        return ()
    names = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name not in _KEYWORDS:
            raise ValueError(f"{NAME}: {path}: {type(attn).__name__}.forward takes {p}, which fluid_ops' attention "
                             f"does not implement (it takes x, attn_mask, is_causal: timm 0.9.12 to 1.0.x)")
        names.append(p.name)
    return tuple(names)


def _is_ours(fn, func) -> bool:
    return isinstance(fn, functools.partial) and fn.func is func


def _check_attention(path: str, attn) -> None:
    if not isinstance(attn, nn.Module):
        raise TypeError(f"{NAME}: {path} must be a timm Attention module, got {type(attn).__name__}")
    for name in ("qkv", "proj"):
        m = getattr(attn, name, None)
        if not isinstance(m, nn.Linear):
            raise TypeError(f"{NAME}: {path}.{name} must be an nn.Linear (timm's Attention), "
                            f"got {type(m).__name__ if m is not None else 'nothing'}")
    h = getattr(attn, "num_heads", None)
    if isinstance(h, bool) or not isinstance(h, int) or h < 1:
        raise TypeError(f"{NAME}: {path}.num_heads must be a positive int, got {h!r}")
    if attn.qkv.out_features % (3 * h):
        raise ValueError(f"{NAME}: {path}.qkv has {attn.qkv.out_features} outputs, not 3 * num_heads * head_dim "
                         f"with num_heads={h}")
    d = _head_dim(attn)
    if getattr(attn, "head_dim", d) != d:
        raise ValueError(f"{NAME}: {path}.head_dim is {attn.head_dim} but qkv gives {d} per head")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{NAME}: {path} has head dim {d}; fluid_ops.attention takes head dims up to {MAX_HEAD_DIM}")
    if attn.proj.in_features != h * d:
        raise ValueError(f"{NAME}: {path}.proj takes {attn.proj.in_features} features, expected num_heads * head_dim "
                         f"= {h * d}")
    drop = getattr(attn, "attn_drop", None)
    if not (isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout))):
        raise TypeError(f"{NAME}: {path}.attn_drop must be an nn.Dropout or nn.Identity, got "
                        f"{type(drop).__name__ if drop is not None else 'nothing'}")
    if not isinstance(getattr(attn, "proj_drop", None), nn.Module):
        raise TypeError(f"{NAME}: {path}.proj_drop must be a module (timm: nn.Dropout)")
    for name in ("q_norm", "k_norm"):
        m = getattr(attn, name, None)
        if not _is_identity(m) and tuple(getattr(m, "normalized_shape", ()) or ()) != (d,):
            raise ValueError(f"{NAME}: {path}.{name} is a {type(m).__name__}; only Identity or a norm over the "
                             f"head dim (normalized_shape ({d},)) is supported")
    norm = getattr(attn, "norm", None)
    if norm is not None and not isinstance(norm, nn.Module):
        raise TypeError(f"{NAME}: {path}.norm must be a module, got {type(norm).__name__}")
    gate = getattr(attn, "gate", None)
    if gate is not None and not isinstance(gate, nn.Module):
        raise TypeError(f"{NAME}: {path}.gate must be None or a module (timm's gated attention)")
    if getattr(attn, "rope", None) is not None:
        raise ValueError(f"{NAME}: {path}.rope is set; rotary embeddings are not supported")
    if not getattr(attn, "fused_attn", True) and not isinstance(getattr(attn, "scale", None), (int, float)):
        raise TypeError(f"{NAME}: {path}.scale must be a number when fused_attn is False")
    own = attn.__dict__.get("forward")
    if own is not None and not _is_ours(own, _fast_attention_forward):
        raise ValueError(f"{NAME}: {path}.forward is already overridden on the instance by something other than "
                         f"fluid_ops; refusing to replace it")
    _forward_keywords(path, attn)


class _EvalProbe:
    """Run a module's code in eval mode for a probe and put every training flag back."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.train(False)

    def __exit__(self, *exc):
        for m, f in self.flags:
            m.training = f


def _tolerance(dtype):
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _probe_attention(path: str, attn) -> None:
    w = attn.qkv.weight
    if w.device.type == "meta":
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, attn.qkv.in_features, generator=g).to(w.device, w.dtype)
    keywords = _forward_keywords(path, attn)
    cases = [{}]
    if "attn_mask" in keywords:  # a boolean key mask (every query sees a key)
        cases.append({"attn_mask": torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]], dtype=torch.bool,
                                                device=w.device)[:, None, None, :]})
    if "is_causal" in keywords:
        cases.append({"is_causal": True})
    for kw in cases:
        with torch.no_grad(), _EvalProbe(attn):
            try:
                ref = type(attn).forward(attn, x, **kw)
                got = _fast_attention_forward(attn, x, **kw)
            except Exception as e:  # noqa: BLE001 - reported as "not recognised"
                raise ValueError(f"{NAME}: {path}: probing its forward{_probe_name(kw)} failed "
                                 f"({type(e).__name__}: {e})") from e
        err = (ref.float() - got.float()).abs().max().item() if ref.shape == got.shape else float("inf")
        if not err <= _tolerance(w.dtype) * (1.0 + ref.float().abs().max().item()):
            raise ValueError(f"{NAME}: {path}: its forward{_probe_name(kw)} does not compute timm's attention "
                             f"(max difference {err:.3g} on a probe); not recognised")


def _probe_name(kw):
    return f" with {', '.join(kw)}" if kw else ""


def _attention_modules(model):
    out = []
    for group in ("encoder_blocks", "decoder_blocks"):
        blocks = getattr(model, group, None)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"{NAME}: model.{group} must be an nn.ModuleList of timm Blocks (MAR), got "
                            f"{type(blocks).__name__ if blocks is not None else 'nothing'}")
        for i, blk in enumerate(blocks):
            if not hasattr(blk, "attn"):
                raise TypeError(f"{NAME}: model.{group}.{i} ({type(blk).__name__}) has no attribute attn")
            out.append((f"model.{group}.{i}.attn", blk.attn))
    return out


# ---- (b) diffusion sampling -------------------------------------------------------------
def _denoiser_shell(net) -> DenoiserMLP:
    """A DenoiserMLP built on the meta device (no memory, no init) with net's sizes."""
    with torch.device("meta"):
        return DenoiserMLP(net.in_channels, net.model_channels, net.out_channels,
                           net.cond_embed.in_features, len(net.res_blocks))


def _share(net, fast: DenoiserMLP) -> DenoiserMLP:
    """Make fast's parameters the very Parameter objects of net; copy the LayerNorm eps."""
    for name, p in net.named_parameters():
        mod, _, leaf = name.rpartition(".")
        fast.get_submodule(mod)._parameters[leaf] = p
    for name, m in fast.named_modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = net.get_submodule(name).eps
    return fast


def _param_ids(net):
    return tuple(id(p) for p in net.parameters())


def _bound_denoiser(diffloss) -> DenoiserMLP:
    net = diffloss.net
    ids = _param_ids(net)
    entry = diffloss.__dict__.get(_NET_KEY)
    if entry is None or entry[0] != ids:  # first call, or a parameter object was replaced
        entry = (ids, _share(net, _denoiser_shell(net)))
        object.__setattr__(diffloss, _NET_KEY, entry)  # not a submodule: state_dict unchanged
    return entry[1]


def _to_float(name, v):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"diffloss.sample: {name} must be a number or a one-element tensor, got shape "
                             f"{tuple(v.shape)}")
        return float(v.item())
    return float(v)


def _fast_sample(diffloss, z, temperature=1.0, cfg=1.0, *, gemm_dtype=None, num_steps=None, solver="ddpm", eta=0.0):
    """MAR's DiffLoss.sample on fluid_ops.diffusion_sample (see the module docstring)."""
    cfg = _to_float("cfg", cfg)
    temperature = _to_float("temperature", temperature)
    fast = _bound_denoiser(diffloss)
    steps = int(diffloss.gen_diffusion.num_timesteps) if num_steps is None else num_steps
    ar = diffloss.__dict__.get(_AR_KEY)
    if ar is not None:  # inside the swapped sample_tokens: this AR step's entry of the step schedule
        steps = ar["steps"][min(ar["k"], len(ar["steps"]) - 1)]
        ar["k"] += 1
    c = fast.in_channels
    guided = cfg != 1.0
    m = z.shape[0]
    n = m // 2 if guided else m
    # MAR's draws, in MAR's order: x_T on the CPU generator, then randn_like(x) per step.
    draws = [torch.randn(n, c).to(z.device)]
    draws += [torch.randn(m, c, device=z.device)[:n] for _ in range(steps)]
    if gemm_dtype is None and torch.is_autocast_enabled(z.device.type) and \
            torch.get_autocast_dtype(z.device.type) == torch.bfloat16:
        gemm_dtype = torch.bfloat16  # the caller's bf16 autocast: MAR's own head would run its GEMMs in bf16
    with torch.autocast(z.device.type, enabled=False):  # the head's GEMM dtype is gemm_dtype's
        x = diffusion_sample(fast, z.float(), num_steps=steps, temperature=temperature, cfg=cfg,
                             noise=torch.stack(draws), gemm_dtype=gemm_dtype, solver=solver, eta=eta)
    return torch.cat([x, x]) if guided else x


_NET_LEAVES = (nn.Linear, nn.LayerNorm, nn.SiLU)


def _check_diffloss(diffloss) -> None:
    if not isinstance(diffloss, nn.Module):
        raise TypeError(f"{NAME}: model.diffloss must be MAR's DiffLoss module, got "
                        f"{type(diffloss).__name__ if diffloss is not None else 'nothing'}")
    if not callable(getattr(diffloss, "sample", None)):
        raise TypeError(f"{NAME}: model.diffloss has no sample method (MAR's DiffLoss.sample)")
    own = diffloss.__dict__.get("sample")
    if own is not None and not _is_ours(own, _fast_sample):
        raise ValueError(f"{NAME}: model.diffloss.sample is already overridden on the instance by something other "
                         f"than fluid_ops; refusing to replace it")
    net = getattr(diffloss, "net", None)
    if not isinstance(net, nn.Module):
        raise TypeError(f"{NAME}: model.diffloss.net must be MAR's SimpleMLPAdaLN, got "
                        f"{type(net).__name__ if net is not None else 'nothing'}")
    for name in ("in_channels", "model_channels", "out_channels"):
        v = getattr(net, name, None)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TypeError(f"{NAME}: model.diffloss.net.{name} must be a positive int, got {v!r}")
    if net.out_channels != 2 * net.in_channels:
        raise ValueError(f"{NAME}: model.diffloss.net.out_channels is {net.out_channels}; MAR's learned-range "
                         f"head has 2 * in_channels = {2 * net.in_channels}")
    if not isinstance(getattr(net, "cond_embed", None), nn.Linear):
        raise TypeError(f"{NAME}: model.diffloss.net.cond_embed must be an nn.Linear (SimpleMLPAdaLN)")
    if not isinstance(getattr(net, "res_blocks", None), nn.ModuleList):
        raise TypeError(f"{NAME}: model.diffloss.net.res_blocks must be an nn.ModuleList (SimpleMLPAdaLN)")
    if getattr(getattr(net, "time_embed", None), "frequency_embedding_size", 256) != 256:
        raise ValueError(f"{NAME}: model.diffloss.net.time_embed.frequency_embedding_size must be 256")
    shell = _denoiser_shell(net)
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if want != have:
        missing = sorted(set(want) - set(have))[:4]
        extra = sorted(set(have) - set(want))[:4]
        shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])[:4]
        raise ValueError(f"{NAME}: model.diffloss.net is not recognised as MAR's SimpleMLPAdaLN "
                         f"(missing {missing}, unexpected {extra}, other shapes {shapes})")
    for name, m in shell.named_modules():
        if isinstance(m, _NET_LEAVES):
            theirs = net.get_submodule(name)
            if type(theirs) is not type(m):
                raise ValueError(f"{NAME}: model.diffloss.net.{name} is a {type(theirs).__name__}, "
                                 f"SimpleMLPAdaLN has an nn.{type(m).__name__} there")
    if net.final_layer.norm_final.elementwise_affine:
        raise ValueError(f"{NAME}: model.diffloss.net.final_layer.norm_final must have no affine parameters")
    gd = getattr(diffloss, "gen_diffusion", None)
    s = getattr(gd, "num_timesteps", None)
    if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 1000:
        raise TypeError(f"{NAME}: model.diffloss.gen_diffusion.num_timesteps must be an int in [1, 1000] "
                        f"(IDDPM's SpacedDiffusion), got {s!r}")
    sched = DiffusionSchedule(s)
    tmap, betas = getattr(gd, "timestep_map", None), getattr(gd, "betas", None)
    if tmap is None or betas is None:
        raise TypeError(f"{NAME}: model.diffloss.gen_diffusion needs timestep_map and betas (IDDPM's SpacedDiffusion)")
    if [int(t) for t in tmap] != [int(t) for t in sched.timesteps]:
        raise ValueError(f"{NAME}: model.diffloss.gen_diffusion.timestep_map is not IDDPM's even respacing of "
                         f"1000 steps to {s}")
    b = torch.as_tensor(betas, dtype=torch.float64)
    if b.shape != (s,) or not torch.allclose(b, torch.as_tensor(sched.betas), rtol=1e-6, atol=1e-9):
        raise ValueError(f"{NAME}: model.diffloss.gen_diffusion.betas are not the respaced cosine schedule")
    for attr, want_name in (("model_mean_type", "EPSILON"), ("model_var_type", "LEARNED_RANGE")):
        v = getattr(gd, attr, None)
        if v is not None and getattr(v, "name", None) != want_name:
            raise ValueError(f"{NAME}: model.diffloss.gen_diffusion.{attr} is {v!r}; only {want_name} is supported")


def _probe_denoiser(diffloss) -> None:
    net = diffloss.net
    w = net.cond_embed.weight
    if w.device.type == "meta":
        return
    fast = _share(net, _denoiser_shell(net))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, net.in_channels, generator=g).to(w.device, w.dtype)
    c = torch.randn(3, net.cond_embed.in_features, generator=g).to(w.device, w.dtype)
    t = torch.tensor([0, 17, 999], device=w.device)
    with torch.no_grad(), _EvalProbe(net):
        try:
            ref, got = net.forward(x, t, c), fast.forward(x, t, c)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{NAME}: model.diffloss.net: probing its forward failed ({type(e).__name__}: {e})") from e
    err = (ref.float() - got.float()).abs().max().item() if ref.shape == got.shape else float("inf")
    if not err <= _tolerance(w.dtype) * (1.0 + ref.float().abs().max().item()):
        raise ValueError(f"{NAME}: model.diffloss.net does not compute MAR's SimpleMLPAdaLN "
                         f"(max difference {err:.3g} on a probe); not recognised")


# ---- entry point ------------------------------------------------------------------------
def _undo(model):
    for group in ("encoder_blocks", "decoder_blocks"):
        for blk in getattr(model, group, None) or ():
            attn = getattr(blk, "attn", None)
            if isinstance(attn, nn.Module) and _is_ours(attn.__dict__.get("forward"), _fast_attention_forward):
                del attn.__dict__["forward"]
    model.__dict__.pop("fluid_ops_report", None)
    diffloss = getattr(model, "diffloss", None)
    if isinstance(diffloss, nn.Module):
        if _is_ours(diffloss.__dict__.get("sample"), _fast_sample):
            del diffloss.__dict__["sample"]
        diffloss.__dict__.pop(_NET_KEY, None)
        diffloss.__dict__.pop(_AR_KEY, None)
    if _is_ours(model.__dict__.get("sample_tokens"), _bf16_sample_tokens) or \
            _is_ours(model.__dict__.get("sample_tokens"), _scheduled_sample_tokens):
        del model.__dict__["sample_tokens"]
    return model


def _bf16_sample_tokens(model, spec, *args, **kwargs):
    """MAR's own sample_tokens under bf16 autocast (accelerate's precision resolving to bf16), with
    a per-AR-step step schedule `spec` when one was given."""
    dev = next(model.parameters()).device
    with torch.autocast(dev.type, torch.bfloat16):
        if spec is not None:
            return _scheduled_sample_tokens(model, spec, *args, **kwargs)
        return type(model).sample_tokens(model, *args, **kwargs)


def _scheduled_sample_tokens(model, spec, *args, **kwargs):
    """MAR's own sample_tokens with a per-AR-step diffusion step schedule: each diffloss.sample
    call (one per AR step in MAR's loop) takes the next count of `spec` over num_iter steps."""
    import inspect
    method = type(model).sample_tokens
    bound = inspect.signature(method).bind(model, *args, **kwargs)
    bound.apply_defaults()
    num_iter = int(bound.arguments.get("num_iter", 64))
    default = int(model.diffloss.gen_diffusion.num_timesteps)
    steps = step_schedule(spec, num_iter, default, owner=NAME)
    model.diffloss.__dict__[_AR_KEY] = {"steps": steps, "k": 0}
    try:
        return method(model, *args, **kwargs)
    finally:
        model.diffloss.__dict__.pop(_AR_KEY, None)


def accelerate(model, *, undo: bool = False, gemm_dtype=None, precision: str | None = None,
               num_diffusion_steps=None, solver: str = "ddpm", eta: float = 0.0, verbose: bool = False):
    """Swap fluid_ops' attention and diffusion sampling into `model` (MAR's own class, timm
    Blocks) in place and return it, with `model.fluid_ops_report` (an AccelerateReport: modules
    and heads served) set and its summary logged (printed too with verbose=True); `undo=True`
    restores MAR's own code. See the module docstring for exactly what is swapped, what it
    relies on and how noise is drawn.
    precision None (default): MAR's numbers, the caller's own autocast followed (under bf16
    autocast the head's GEMMs run in bf16 too); "auto" / "bf16" / "fp32": decided here
    (`fluid_ops.backend.resolve_precision`); bf16 runs `model.sample_tokens` under bf16 autocast
    with bf16 head GEMMs (unless gemm_dtype says otherwise).

    Faster sampling, opt-in (docs/contracts.md §2.3, "Fast sampling"): solver / eta for the head
    ("ddpm" default, "ddim", "dpm++2m"); num_diffusion_steps an int (every AR step) or a per-AR-step
    schedule (("linear", first, last), ("cosine", first, last), a name, a callable of progress):
    a schedule also swaps `model.sample_tokens` for a wrapper that runs MAR's own loop and hands
    each AR step's diffloss.sample its count. Feature caching needs our own loop (MAR.sample_tokens)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{NAME}: model must be an nn.Module (MAR), got {type(model).__name__}")
    if undo:
        return _undo(model)
    if gemm_dtype is not None and not (isinstance(gemm_dtype, str) and gemm_dtype == "auto") and \
            gemm_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{NAME}: gemm_dtype must be None, 'auto', float32, bfloat16 or float16, got {gemm_dtype!r}")
    prec = None
    if precision is not None:
        params = next(model.parameters(), None)
        prec = backend.resolve_precision(precision, params.device if params is not None else "cpu")
        if prec == "bf16" and gemm_dtype is None:
            gemm_dtype = torch.bfloat16
    if solver not in SOLVERS:
        raise ValueError(f"{NAME}: solver must be one of {SOLVERS}, got {solver!r}")
    scheduled = num_diffusion_steps is not None and not (isinstance(num_diffusion_steps, int)
                                                           and not isinstance(num_diffusion_steps, bool))
    step_schedule(num_diffusion_steps if num_diffusion_steps is not None else 1, 2, 100, owner=NAME)  # checks it
    if scheduled and not callable(getattr(type(model), "sample_tokens", None)):
        raise TypeError(f"{NAME}: a per-AR-step num_diffusion_steps needs model.sample_tokens (MAR's)")
    # 1. validate everything (structure, then numerical probes); nothing is changed before 2.
    attns = _attention_modules(model)
    if not attns:
        raise ValueError(f"{NAME}: model.encoder_blocks and model.decoder_blocks hold no block: no attention to "
                         f"swap (refusing a silent no-op)")
    diffloss = getattr(model, "diffloss", None)
    if diffloss is None:
        raise TypeError(f"{NAME}: model has no attribute diffloss (MAR's DiffLoss)")
    for path, attn in attns:
        _check_attention(path, attn)
    _check_diffloss(diffloss)
    for path, attn in attns:
        _probe_attention(path, attn)
    _probe_denoiser(diffloss)
    # 2. swap (plain attribute assignments that cannot fail)
    for _, attn in attns:
        if not _is_ours(attn.__dict__.get("forward"), _fast_attention_forward):
            attn.__dict__["forward"] = functools.partial(_fast_attention_forward, attn)
    diffloss.__dict__["sample"] = functools.partial(
        _fast_sample, diffloss, gemm_dtype=gemm_dtype, solver=solver, eta=float(eta),
        num_steps=None if scheduled else num_diffusion_steps)
    spec = num_diffusion_steps if scheduled else None
    if prec == "bf16" and hasattr(type(model), "sample_tokens"):
        model.__dict__["sample_tokens"] = functools.partial(_bf16_sample_tokens, model, spec)
    elif scheduled:
        model.__dict__["sample_tokens"] = functools.partial(_scheduled_sample_tokens, model, spec)
    elif _is_ours(model.__dict__.get("sample_tokens"), _bf16_sample_tokens) or \
            _is_ours(model.__dict__.get("sample_tokens"), _scheduled_sample_tokens):
        del model.__dict__["sample_tokens"]
    report = _report(attns, gemm_dtype)
    model.__dict__["fluid_ops_report"] = report  # a plain attribute: no module, parameter or buffer
    _log.info("%s", report)
    if verbose:
        print(report)
    return model


def _report(attns, gemm_dtype) -> AccelerateReport:
    dims = sorted({_head_dim(a) for _, a in attns})
    keywords = sorted({k for p, a in attns for k in _forward_keywords(p, a)}, key=_KEYWORDS.index)
    return AccelerateReport(
        attention_modules=len(attns), heads=sum(a.num_heads for _, a in attns),
        encoder_modules=sum(p.startswith("model.encoder_blocks.") for p, _ in attns),
        decoder_modules=sum(p.startswith("model.decoder_blocks.") for p, _ in attns),
        head_dims=tuple(dims), padded_head_dims=tuple(d for d in dims if d not in HEAD_DIMS and d < HEAD_DIMS[-1]),
        reference_head_dims=tuple(d for d in dims if d > HEAD_DIMS[-1]), keywords=tuple(keywords),
        fused_attn=tuple(sorted({bool(getattr(a, "fused_attn", True)) for _, a in attns})),
        diffusion_sample=True, gemm_dtype=gemm_dtype)
