"""Reading MAR's own checkpoints (LTH14/mar's `.pth` files): the weights, MAR's training args,
and the constructor arguments inferred from them (`MAR.from_checkpoint`,
`MAR.load_mar_checkpoint`). Kept apart from the model so `models/mar.py` holds the model only."""
from __future__ import annotations

import argparse
import math
import os
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from fluid_ops.models import io as model_io

__all__ = ["from_checkpoint", "load_mar_checkpoint", "read_mar_checkpoint"]


def load_mar_checkpoint(model, checkpoint, *, ema: bool = True, strict: bool = True):
    """`MAR.load_mar_checkpoint`: a published MAR checkpoint into `model`, every bad shape named
    before anything is copied."""
    state_dict, _ = _read_mar_checkpoint("MAR.load_mar_checkpoint", checkpoint, ema)
    model_io.check_state_dict(model, state_dict, source=f"MAR.load_mar_checkpoint({_describe(checkpoint)})",
                              strict=strict)
    return model.load_state_dict(state_dict, strict=strict)


def from_checkpoint(cls, checkpoint, ema: bool = True, model: str | None = None, *, strict: bool = True,
                    **mar_kwargs):
    """`MAR.from_checkpoint` (see its docstring): the model class `cls` built from a checkpoint."""
    from fluid_ops.models.mar import FACTORIES
    op = "MAR.from_checkpoint"
    state_dict, ckpt_args = _read_mar_checkpoint(op, checkpoint, ema)
    if model is not None and model not in FACTORIES:
        raise ValueError(f"{op}: model must be one of {sorted(FACTORIES)} or None, got {model!r}")
    kwargs = _infer_mar_kwargs(op, state_dict, ckpt_args, mar_kwargs)
    name = model or (ckpt_args.get("model") if ckpt_args.get("model") in FACTORIES else None) \
        or _factory_of_shapes(state_dict)
    if name is not None:
        build = partial(FACTORIES[name], **kwargs)
    else:
        kwargs = {**_size_from_shapes(state_dict), **kwargs}
        missing = [k for k in ("encoder_num_heads", "decoder_num_heads") if k not in kwargs]
        if missing:
            raise ValueError(f"{op}: the weights are none of {sorted(FACTORIES)} (encoder width "
                             f"{kwargs['encoder_embed_dim']}, depth {kwargs['encoder_depth']}): pass "
                             f"{' and '.join(missing)} (the number of heads is not in the weights) or model=")
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))  # as MAR's factories
        build = partial(cls, **kwargs)
    if not isinstance(checkpoint, (str, bytes, os.PathLike)):
        state_dict = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
    return model_io.build_with_weights(build, state_dict, source=f"{op}({_describe(checkpoint)})",
                                       strict=strict).eval()


# name -> (width, depth) of encoder and decoder, to recognise a checkpoint's size by its weights
_FACTORY_SIZES = {"mar_base": (768, 12), "mar_large": (1024, 16), "mar_huge": (1280, 20), "mar_tiny": (64, 2)}

# MAR's training arguments (main_mar.py) that its factories take
_CKPT_ARG_KEYS = ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "mask_ratio_min", "label_drop_prob",
                  "class_num", "attn_dropout", "proj_dropout", "buffer_size", "diffloss_d", "diffloss_w",
                  "num_sampling_steps", "diffusion_batch_mul", "grad_checkpointing")


def _describe(checkpoint) -> str:
    if isinstance(checkpoint, (str, bytes, os.PathLike)):
        return str(checkpoint)
    return f"<{type(checkpoint).__name__}>"


def _read_mar_checkpoint(op, checkpoint, ema):
    """(state dict, MAR's training args as a dict or {}) from a path or a loaded checkpoint."""
    if isinstance(checkpoint, bytes):
        checkpoint = checkpoint.decode()
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{op}: no such file: {path}")
        # MAR's training checkpoints carry its argparse Namespace as 'args': plain data, allowed
        # explicitly so that weights_only loading (no arbitrary code) still reads them.
        safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        try:
            if safe is not None:
                with safe([argparse.Namespace]):
                    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            else:  # torch 2.4: only the process-wide allow-list exists
                torch.serialization.add_safe_globals([argparse.Namespace])
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # zip / pickle errors on a corrupt file, refused globals, ...
            raise ValueError(f"{op}: cannot read {path} as a torch checkpoint with weights_only=True "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(checkpoint, dict):
        raise TypeError(f"{op}: checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    args = {}
    if "model" in checkpoint or "model_ema" in checkpoint:
        key = "model_ema" if ema else "model"
        if checkpoint.get(key) is None:
            why = "no" if key not in checkpoint else "a None"
            raise KeyError(f"{op}: the checkpoint has {why} {key!r} entry (keys: {sorted(checkpoint)}); "
                           f"pass ema={not ema}")
        raw_args = checkpoint.get("args")
        if isinstance(raw_args, argparse.Namespace):
            args = vars(raw_args)
        elif isinstance(raw_args, dict):
            args = raw_args
        checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"{op}: the checkpoint holds no weights (expected a state dict, got "
                         f"{type(checkpoint).__name__} of length {len(checkpoint) if hasattr(checkpoint, '__len__') else '?'})")
    return checkpoint, args


def _shape(state_dict, name, op="MAR.from_checkpoint"):
    t = state_dict.get(name)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: the weights have no tensor {name!r}: not a MAR state dict")
    return tuple(t.shape)


def _count_blocks(state_dict, prefix):
    """Number of blocks `prefix.{i}.` in the state dict (max index + 1)."""
    idx = [int(k[len(prefix):].split(".", 1)[0]) for k in state_dict
           if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()]
    return max(idx) + 1 if idx else 0


def _factory_of_shapes(state_dict):
    width = _shape(state_dict, "class_emb.weight")[1]
    dec_width = _shape(state_dict, "mask_token")[2]
    enc, dec = _count_blocks(state_dict, "encoder_blocks."), _count_blocks(state_dict, "decoder_blocks.")
    for name, (w, d) in _FACTORY_SIZES.items():
        if (width, enc, dec_width, dec) == (w, d, w, d):
            return name
    return None


def _size_from_shapes(state_dict):
    """Width / depth / mlp_ratio arguments of a MAR of no published size, read from its weights."""
    width = _shape(state_dict, "class_emb.weight")[1]
    out = dict(encoder_embed_dim=width, encoder_depth=_count_blocks(state_dict, "encoder_blocks."),
               decoder_embed_dim=_shape(state_dict, "mask_token")[2],
               decoder_depth=_count_blocks(state_dict, "decoder_blocks."))
    fc1 = state_dict.get("encoder_blocks.0.mlp.fc1.weight", state_dict.get("decoder_blocks.0.mlp.fc1.weight"))
    if isinstance(fc1, torch.Tensor):
        out["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    return out


def _infer_mar_kwargs(op, state_dict, ckpt_args, mar_kwargs):
    """Factory keyword arguments: mar_kwargs, then the checkpoint's args, then the weights' shapes."""
    kw = {k: ckpt_args[k] for k in _CKPT_ARG_KEYS if k in ckpt_args}
    kw.update(mar_kwargs)
    class_num, _ = _shape(state_dict, "class_emb.weight")
    seq_len = _shape(state_dict, "diffusion_pos_embed_learned")[1]
    token_dim = _shape(state_dict, "z_proj.weight")[1]
    kw.setdefault("class_num", class_num)
    kw.setdefault("buffer_size", _shape(state_dict, "encoder_pos_embed_learned")[1] - seq_len)
    kw.setdefault("diffloss_d", _count_blocks(state_dict, "diffloss.net.res_blocks."))
    kw.setdefault("diffloss_w", _shape(state_dict, "diffloss.net.input_proj.weight")[0])
    patch = kw.get("patch_size", 1)
    side = math.isqrt(seq_len)
    if "img_size" not in kw:
        if side * side != seq_len:
            raise ValueError(f"{op}: the weights have {seq_len} tokens, not a square grid: pass img_size, "
                             f"vae_stride and patch_size")
        kw["img_size"] = side * patch * kw.get("vae_stride", 16)
    if "vae_embed_dim" not in kw:
        if not isinstance(patch, int) or patch < 1 or token_dim % (patch * patch):
            raise ValueError(f"{op}: token width {token_dim} is not vae_embed_dim * patch_size^2 for "
                             f"patch_size={patch!r}: pass vae_embed_dim and patch_size")
        kw["vae_embed_dim"] = token_dim // (patch * patch)
    return kw



read_mar_checkpoint = _read_mar_checkpoint
