"""`FluidConfig`: everything that defines a Fluid model, grouped by concern.

    FluidConfig(token_kind, order,            # the variant: {continuous, discrete} x {random, raster}
                model=ModelConfig(...),       # the image transformer
                image=ImageConfig(...),       # images and their tokenizer
                text=TextConfig(...),         # frozen encoder, aligner, how the caption conditions
                head=HeadConfig(...),         # per-token head; the diffusion loss and its schedule
                masking=MaskingConfig(...),   # random order: how many tokens a training step masks
                sampling=SamplingConfig(...)) # generation defaults

Checkpoints store `dataclasses.asdict(config)` (nested). Overrides (`Fluid(name, **overrides)`,
`resolve_config`, `fluid-ops --set`) take a top-level field, a group (a dict merged into it, or
an instance), or a dotted path such as `text.encoder`.

Deprecated for one release: the old flat field names (`FLAT_NAMES`: `width`, `text_encoder`,
`num_sampling_steps`, ...) as constructor / override keywords and as attributes, and flat
config dicts in checkpoints; each use warns once per call site (DeprecationWarning).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

from fluid_ops.nn.transformer import check_attention_shape
from fluid_ops.reference.diffusion import check_noise_shift

__all__ = ["FluidConfig", "ModelConfig", "ImageConfig", "TextConfig", "HeadConfig", "MaskingConfig",
           "SamplingConfig", "CONFIGS", "PAPER_SAMPLING", "FLAT_NAMES", "validate_config", "resolve_config",
           "config_from_dict"]

# The paper's sampling settings (CFG scale, temperature) per variant (docs/contracts.md §1).
PAPER_SAMPLING = {
    ("continuous", "random"): (5.0, 0.975),
    ("continuous", "raster"): (4.5, 0.975),
    ("discrete", "random"): (1.6, 1.05),
    ("discrete", "raster"): (2.5, 0.95),
}


@dataclass
class ModelConfig:
    """The image transformer."""
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pos_embed: str = "learned"          # "learned" | "sincos" (fixed 2D sin-cos)
    grad_checkpointing: bool = False    # recompute activations in backward: less memory, ~1/3 more compute


@dataclass
class ImageConfig:
    """Images and the tokenizer that turns them into tokens."""
    size: int = 256
    tokenizer: str = "patch"            # "patch" | "kmeans" (discrete) | "vae" (needs vae_path)
    patch_size: int = 16                # in pixels ("patch", "kmeans") or latent pixels ("vae")
    vae_path: str | None = None
    codebook_size: int = 256            # discrete: k-means codebook size


@dataclass
class TextConfig:
    """The caption: frozen encoder -> linear -> trainable aligner -> cross-attention in every
    block; `pool_add` / `adaln` also feed a pooled caption vector to every position / block.

    adaln (no config sets it; tests/test_fluid.py::test_text_adaln_conditions_every_block): use it
    when cross-attention and pool_add leave the caption's global attributes (colour, style) unread."""
    encoder: str = "minilm"             # "minilm" | "hash" | "t5:PATH" | PATH (fluid_ops.nn.text)
    max_length: int = 64
    layer: int = -1                     # which hidden state of a transformers encoder (-1: the last; 0: its
                                        # embeddings; k: block k's output); "hash" has no layers and ignores it
    aligner_depth: int = 6              # text aligner blocks (paper: 6)
    drop_prob: float = 0.1              # training: rows whose caption is replaced by the null text (for CFG)
    pool: str = "aligned"               # what pool_add / adaln pool: "aligned" (the aligner's output) |
                                        # "encoder" (the frozen encoder's output, standardised per feature with
                                        # running statistics of the training captions)
    pool_add: bool = False              # add linear(pooled caption) to every image position. Use on small
                                        # models / short runs: they learn the condition much faster with it
    adaln: bool = False                 # the pooled caption shifts and scales every block's norms (DiT's adaLN,
                                        # zero-initialised). Use when cross-attention and pool_add leave the
                                        # caption's global attributes unread; not set by any config here


@dataclass
class HeadConfig:
    """The per-token head: continuous -> MAR's diffusion head (DiffLoss); discrete -> logits.

    noise_shift (no config sets it; tests/test_fluid.py::test_noise_shift_trains_and_samples_on_the_
    shifted_schedule): use k > 1 for high-resolution or finely patched tokens, whose content the
    plain cosine schedule's noise leaves readable at most steps (SNR / k^2 at every step)."""
    depth: int = 3                      # diffusion head: residual blocks
    width: int = 1024                   # diffusion head: width
    diffusion_batch_mul: int = 4        # t-draws per token in the diffusion loss (MAR: 4)
    noise_shift: float = 1.0            # the cosine schedule's SNR divided by noise_shift ** 2, in training and
                                        # sampling; 1 = MAR's. Use > 1 for tokens with much redundancy (large
                                        # images / fine patches), whose content survives the plain schedule's noise
    pos_embed: bool = False             # add a position embedding to what the head reads (MAR's
                                        # diffusion_pos_embed): the input table if sincos, else learned


@dataclass
class MaskingConfig:
    """Random order, training: ceil(L * r) tokens masked, r ~ truncated normal on [ratio_min, 1]
    (docs/contracts.md §2.4, mean 1, std 0.25)."""
    ratio_min: float = 0.7


@dataclass
class SamplingConfig:
    """Defaults of `Fluid.generate` (each is also its keyword argument).

    clip_denoised (no config sets it; None picks by tokenizer; tests/test_fluid.py::
    test_pixel_tokens_sample_with_the_predicted_x0_clamped): set False only for tokens not bounded
    in [-1, 1]."""
    num_iter: int | None = None         # AR steps; None: 64 (random) / all tokens (raster)
    cfg: float | None = None            # CFG scale; None: the paper's value for the variant
    temperature: float | None = None    # None: the paper's value
    cfg_uncond: str = "text"            # random order: what CFG's unconditional branch drops: "text" (the null
                                        # text, the known tokens kept: MAR, Fluid) | "all" (the null text and every
                                        # known token: the guidance also pulls each new token toward what the
                                        # tokens already drawn imply; that branch runs once per generation)
    num_diffusion_steps: int = 100      # diffusion steps per token (respaced from the 1000 training steps)
    clip_denoised: bool | None = None   # clamp each diffusion step's predicted x_0 to [-1, 1]. None: on for
                                        # pixel-patch tokens (they lie there), off for VAE latents; set False
                                        # only for tokens that are not bounded in [-1, 1]


_GROUPS = {"model": ModelConfig, "image": ImageConfig, "text": TextConfig, "head": HeadConfig,
           "masking": MaskingConfig, "sampling": SamplingConfig}
_TOP = ("token_kind", "order")

# old flat name -> (group or None for a top-level field, field)
FLAT_NAMES = {
    "token_kind": (None, "token_kind"), "order": (None, "order"),
    "image_size": ("image", "size"), "patch_size": ("image", "patch_size"), "tokenizer": ("image", "tokenizer"),
    "vae_path": ("image", "vae_path"), "codebook_size": ("image", "codebook_size"),
    "width": ("model", "width"), "depth": ("model", "depth"), "num_heads": ("model", "num_heads"),
    "mlp_ratio": ("model", "mlp_ratio"), "pos_embed": ("model", "pos_embed"),
    "grad_checkpointing": ("model", "grad_checkpointing"),
    "text_encoder": ("text", "encoder"), "text_max_length": ("text", "max_length"), "text_layer": ("text", "layer"),
    "aligner_depth": ("text", "aligner_depth"), "text_drop_prob": ("text", "drop_prob"),
    "text_pool": ("text", "pool"), "text_pool_add": ("text", "pool_add"), "text_adaln": ("text", "adaln"),
    "head_depth": ("head", "depth"), "head_width": ("head", "width"),
    "diffusion_batch_mul": ("head", "diffusion_batch_mul"), "noise_shift": ("head", "noise_shift"),
    "head_pos_embed": ("head", "pos_embed"),
    "mask_ratio_min": ("masking", "ratio_min"),
    "num_iter": ("sampling", "num_iter"), "cfg": ("sampling", "cfg"), "temperature": ("sampling", "temperature"),
    "cfg_uncond": ("sampling", "cfg_uncond"), "num_sampling_steps": ("sampling", "num_diffusion_steps"),
    "clip_denoised": ("sampling", "clip_denoised"),
}
# removed knobs: old configs may still name them at the only value they now have
REMOVED = {"mask_ratio_kind": "truncnorm"}


def _warn_flat(names, stacklevel):
    new = ", ".join(f"{n} -> {'.'.join(p for p in FLAT_NAMES[n] if p)}" for n in names)
    warnings.warn(f"FluidConfig: flat field names are deprecated ({new}); use the grouped names",
                  DeprecationWarning, stacklevel=stacklevel + 1)


def _group_fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _paths() -> list[str]:
    return [*_TOP, *(f"{g}.{f}" for g, cls in _GROUPS.items() for f in _group_fields(cls))]


@dataclass(init=False)
class FluidConfig:
    """Everything that defines a Fluid model (saved with checkpoints as `dataclasses.asdict`);
    see the module docstring for the groups and `FLAT_NAMES` for the deprecated flat names."""
    token_kind: str = "continuous"      # "continuous" (diffusion head) | "discrete" (codebook logits)
    order: str = "random"               # "random" (bidirectional, MaskGIT/MAR) | "raster" (causal, GPT)
    model: ModelConfig = field(default_factory=ModelConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __init__(self, token_kind: str = "continuous", order: str = "random", model=None, image=None, text=None,
                 head=None, masking=None, sampling=None, **flat):
        object.__setattr__(self, "token_kind", token_kind)
        object.__setattr__(self, "order", order)
        for name, value in (("model", model), ("image", image), ("text", text), ("head", head),
                            ("masking", masking), ("sampling", sampling)):
            object.__setattr__(self, name, _make_group(name, value))
        if flat:
            unknown = sorted(k for k in flat if k not in FLAT_NAMES and k not in REMOVED and "." not in k)
            if unknown:
                raise TypeError(f"FluidConfig: unexpected field(s) {unknown}; valid: {', '.join(_paths())}")
            self._apply(flat, stacklevel=2)

    def _apply(self, overrides: dict, stacklevel: int) -> None:
        """Set fields in place from {top-level name | group name | "group.field" | old flat name: value}."""
        old = [k for k in overrides if k in FLAT_NAMES and k not in _TOP]
        if old:
            _warn_flat(old, stacklevel + 1)
        for key, value in overrides.items():
            if key in REMOVED:
                if value != REMOVED[key]:
                    raise ValueError(f"FluidConfig: {key} was removed; only its old default {REMOVED[key]!r} is "
                                     f"accepted (in old configs), got {value!r}")
                continue
            if key in _TOP:
                object.__setattr__(self, key, value)
            elif key in _GROUPS:
                if isinstance(value, dict):
                    object.__setattr__(self, key, _make_group(key, {**dataclasses.asdict(getattr(self, key)),
                                                                    **value}))
                else:
                    object.__setattr__(self, key, _make_group(key, value))
            else:
                group, name = FLAT_NAMES[key] if key in FLAT_NAMES else key.split(".", 1)
                if group is None:
                    object.__setattr__(self, name, value)
                    continue
                if group not in _GROUPS or name not in _group_fields(_GROUPS[group]):
                    raise ValueError(f"FluidConfig: unknown config field {key!r}; valid: {', '.join(_paths())}")
                setattr(getattr(self, group), name, value)

    def replace(self, **overrides) -> "FluidConfig":
        """A copy with `overrides` applied (the forms of the module docstring); not validated."""
        new = FluidConfig(**{k: (dataclasses.replace(v) if k in _GROUPS else v)
                             for k, v in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))})
        new._apply(overrides, stacklevel=2)
        return new

    def flat_dict(self) -> dict:
        """{old flat name: value}: the keys prepared caches and pre-grouping checkpoints use."""
        return {k: getattr(self, n) if g is None else getattr(getattr(self, g), n)
                for k, (g, n) in FLAT_NAMES.items()}

    # Deprecated: the old flat names as attributes (reads and writes), for one release.
    def __getattr__(self, name):
        if name in FLAT_NAMES and FLAT_NAMES[name][0] is not None:
            _warn_flat([name], 2)
            group, field_name = FLAT_NAMES[name]
            return getattr(object.__getattribute__(self, group), field_name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in FLAT_NAMES and FLAT_NAMES[name][0] is not None:
            _warn_flat([name], 2)
            group, field_name = FLAT_NAMES[name]
            setattr(getattr(self, group), field_name, value)
            return
        object.__setattr__(self, name, value)

    def sampling_defaults(self) -> dict:
        """num_iter, cfg, temperature, cfg_uncond after resolving the None defaults for this variant."""
        s = self.sampling
        cfg, temp = PAPER_SAMPLING[(self.token_kind, self.order)]
        return {"num_iter": s.num_iter, "cfg": cfg if s.cfg is None else s.cfg,
                "temperature": temp if s.temperature is None else s.temperature, "cfg_uncond": s.cfg_uncond}


def _make_group(name, value):
    cls = _GROUPS[name]
    if value is None:
        return cls()
    if isinstance(value, cls):
        return dataclasses.replace(value)  # a copy: configs never share a group
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(_group_fields(cls)))
        if unknown:
            raise ValueError(f"FluidConfig: unknown config field(s) {[f'{name}.{k}' for k in unknown]}; valid "
                             f"fields of {name}: {', '.join(_group_fields(cls))}")
        return cls(**value)
    raise TypeError(f"FluidConfig: {name} must be a {cls.__name__} or a dict, got {type(value).__name__}")


def _paper(depth, width, heads) -> FluidConfig:
    return FluidConfig(model=ModelConfig(depth=depth, width=width, num_heads=heads))


def _tiny(**overrides) -> FluidConfig:
    # The recipe measured to learn fastest in the demo's 15 CPU minutes; why each choice (sizes,
    # positions, pooled block-2 encoder text): see docs/demo.md.
    base = FluidConfig(
        model=ModelConfig(width=128, depth=4, num_heads=2, pos_embed="sincos"),
        image=ImageConfig(size=32, patch_size=4),
        text=TextConfig(max_length=32, layer=2, aligner_depth=1, pool_add=True, pool="encoder"),
        head=HeadConfig(depth=3, width=256, diffusion_batch_mul=1, pos_embed=True),
        sampling=SamplingConfig(num_iter=16))
    return base.replace(**overrides)


CONFIGS: dict[str, FluidConfig] = {
    # docs/contracts.md §1 table; 256x256 pixels in 16x16 patches = 256 tokens (the paper: 256 VAE tokens).
    "fluid-166m": _paper(12, 768, 12),
    "fluid-369m": _paper(16, 1024, 16),
    "fluid-665m": _paper(20, 1280, 16),
    "fluid-1.1b": _paper(24, 1536, 16),
    "fluid-3.1b": _paper(32, 2304, 24),
    "fluid-10.5b": _paper(34, 4096, 64),
    # CPU-sized variants
    # sampled with CFG 3 at temperature 0.7, the unconditional branch seeing no known token
    # (cfg_uncond="all"). On two checkpoints trained as the demo trains (LR decayed over the last
    # 30%), 48 prompts each of single-object / colour: a 1400-step one scored overall 0.50 (0.48 /
    # 0.49 at temperature 0.6 / 0.5; 0.43 at 0.85; CFG 2 / 4: 0.42 / 0.44; a constant CFG schedule
    # at 0.6: 0.38) against 0.29 with the paper's sampling (CFG 5, temperature 0.975, the null text
    # only) and 0.40 with CFG 3 at 0.7 on the null text only; the demo's 1346-step one 0.37 (0.35 at
    # 0.6). Where the caption names no colour, the tokens already drawn are what keeps an object one
    # colour, and guiding on them is what makes it so.
    "tiny": _tiny(sampling={"cfg": 3.0, "temperature": 0.7, "cfg_uncond": "all"}),
    "tiny-raster": _tiny(order="raster", sampling={"num_iter": None}),
    "tiny-discrete": _tiny(token_kind="discrete", image={"tokenizer": "kmeans"}),
    "tiny-raster-discrete": _tiny(token_kind="discrete", order="raster", image={"tokenizer": "kmeans"},
                                  sampling={"num_iter": None}),
}


def _check_choice(name, v, choices):
    if v not in choices:
        raise ValueError(f"FluidConfig: {name} must be one of {choices}, got {v!r}")


def _check_int(name, v, minimum, maximum=None):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum or (maximum is not None and v > maximum):
        rng = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"FluidConfig: {name} must be an int {rng}, got {v!r}")


def _check_number(name, v, lo=None, hi=None, *, allow_none=False):
    if v is None and allow_none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
        raise ValueError(f"FluidConfig: {name} must be a finite number{rng}{' or None' if allow_none else ''}, "
                         f"got {v!r}")


def _check_bool(name, v, allow_none=False):
    if not isinstance(v, bool) and not (allow_none and v is None):
        raise ValueError(f"FluidConfig: {name} must be a bool{' or None' if allow_none else ''}, got {v!r}")


def check_cfg_uncond(where, v, order):
    if v not in ("text", "all"):
        raise ValueError(f"{where}: cfg_uncond must be 'text' (the null text) or 'all' (the null text and no known "
                         f"tokens), got {v!r}")
    if v == "all" and order != "random":
        raise ValueError(f"{where}: cfg_uncond 'all' is for random order (an unconditional branch with every token "
                         f"masked); raster order guides on the null text only ('text'), got order {order!r}")


def _validate_image(c: FluidConfig):
    im = c.image
    _check_choice("image.tokenizer", im.tokenizer, ("patch", "kmeans", "vae"))
    if (c.token_kind == "discrete") != (im.tokenizer == "kmeans"):
        raise ValueError(f"FluidConfig: token_kind 'discrete' goes with tokenizer 'kmeans' and 'continuous' with "
                         f"'patch' or 'vae', got token_kind={c.token_kind!r}, image.tokenizer={im.tokenizer!r}")
    if im.tokenizer == "vae" and not im.vae_path:
        raise ValueError("FluidConfig: image.tokenizer 'vae' needs image.vae_path, a local diffusers AutoencoderKL "
                         "folder")
    _check_int("image.size", im.size, 1)
    _check_int("image.patch_size", im.patch_size, 1)
    _check_int("image.codebook_size", im.codebook_size, 2)


def _validate_model(m: ModelConfig):
    for name in ("width", "num_heads"):
        _check_int(f"model.{name}", getattr(m, name), 1)
    _check_int("model.depth", m.depth, 0)
    check_attention_shape(f"FluidConfig (model.width={m.width}, model.num_heads={m.num_heads})", m.width, m.num_heads)
    _check_number("model.mlp_ratio", m.mlp_ratio, 1e-6)
    _check_choice("model.pos_embed", m.pos_embed, ("learned", "sincos"))
    if m.pos_embed == "sincos" and m.width % 4:
        raise ValueError(f"FluidConfig: model.pos_embed 'sincos' needs model.width divisible by 4, got {m.width}")
    _check_bool("model.grad_checkpointing", m.grad_checkpointing)


def _validate_text(t: TextConfig):
    if not isinstance(t.encoder, str) or not t.encoder:
        raise ValueError(f"FluidConfig: text.encoder must be a non-empty str ('minilm', 'hash', 't5:PATH' or a "
                         f"folder), got {t.encoder!r}")
    _check_int("text.max_length", t.max_length, 1)
    if isinstance(t.layer, bool) or not isinstance(t.layer, int):
        raise ValueError(f"FluidConfig: text.layer must be an int (-1: the encoder's last hidden state), "
                         f"got {t.layer!r}")
    _check_int("text.aligner_depth", t.aligner_depth, 0)
    _check_number("text.drop_prob", t.drop_prob, 0.0, 1.0)
    _check_choice("text.pool", t.pool, ("aligned", "encoder"))
    _check_bool("text.pool_add", t.pool_add)
    _check_bool("text.adaln", t.adaln)


def _validate_head_and_sampling(c: FluidConfig):
    h, s = c.head, c.sampling
    _check_int("head.depth", h.depth, 0)
    _check_int("head.width", h.width, 1)
    _check_int("head.diffusion_batch_mul", h.diffusion_batch_mul, 1)
    check_noise_shift("FluidConfig", h.noise_shift)
    _check_bool("head.pos_embed", h.pos_embed)
    _check_number("masking.ratio_min", c.masking.ratio_min, 0.0, 1.0)
    if c.masking.ratio_min >= 1.0:
        raise ValueError(f"FluidConfig: masking.ratio_min must be < 1, got {c.masking.ratio_min}")
    # respaced from the 1000 training steps
    _check_int("sampling.num_diffusion_steps", s.num_diffusion_steps, 1, 1000)
    _check_bool("sampling.clip_denoised", s.clip_denoised, allow_none=True)
    if s.clip_denoised and c.image.tokenizer == "vae":
        raise ValueError("FluidConfig: sampling.clip_denoised clamps tokens to [-1, 1]; VAE latents are not "
                         "bounded there")
    if s.num_iter is not None:
        _check_int("sampling.num_iter", s.num_iter, 1)
    _check_number("sampling.cfg", s.cfg, allow_none=True)
    _check_number("sampling.temperature", s.temperature, 0.0, allow_none=True)
    check_cfg_uncond("FluidConfig", s.cfg_uncond, c.order)


def validate_config(c: FluidConfig) -> FluidConfig:
    """Raise a ValueError naming the first bad field (by its grouped name); returns c."""
    if not isinstance(c, FluidConfig):
        raise TypeError(f"validate_config: expected a FluidConfig, got {type(c).__name__}")
    _check_choice("token_kind", c.token_kind, ("continuous", "discrete"))
    _check_choice("order", c.order, ("random", "raster"))
    for name, cls in _GROUPS.items():
        if not isinstance(getattr(c, name), cls):
            raise ValueError(f"FluidConfig: {name} must be a {cls.__name__}, got {type(getattr(c, name)).__name__}")
    _validate_image(c)
    _validate_model(c.model)
    _validate_text(c.text)
    _validate_head_and_sampling(c)
    return c


def _known_key(k) -> bool:
    if k in _TOP or k in _GROUPS or k in FLAT_NAMES or k in REMOVED:
        return True
    group, _, name = str(k).partition(".")
    return group in _GROUPS and name in _group_fields(_GROUPS[group])


def resolve_config(config: FluidConfig | str = "tiny", **overrides) -> FluidConfig:
    """A config name from CONFIGS or a FluidConfig, with overrides (a top-level field, a group as
    a dict or instance, "group.field", or a deprecated flat name); validated. A new object."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"Fluid: unknown config {config!r}; valid names: {', '.join(CONFIGS)}")
        config = CONFIGS[config]
    elif not isinstance(config, FluidConfig):
        raise TypeError(f"Fluid: config must be a FluidConfig or one of {list(CONFIGS)}, got {type(config).__name__}")
    unknown = sorted(k for k in overrides if not _known_key(k))
    if unknown:
        raise ValueError(f"Fluid: unknown config field(s) {unknown}; valid fields: {', '.join(_paths())} "
                         f"(deprecated flat names: {', '.join(FLAT_NAMES)})")
    return validate_config(config.replace(**overrides))


def config_from_dict(d: dict) -> FluidConfig:
    """The FluidConfig of a checkpoint's config dict: grouped (`dataclasses.asdict(config)`) or,
    deprecated, the flat dict older checkpoints stored. Validated."""
    if not isinstance(d, dict):
        raise TypeError(f"config_from_dict: expected a dict, got {type(d).__name__}")
    unknown = sorted((k for k in d if not _known_key(k)), key=str)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {', '.join(_paths())}")
    return resolve_config(FluidConfig(), **d)
