"""Argument checks shared by the ops (docs/contracts.md §3): each error names the argument, what was
expected and what came."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fmt_dtypes(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, name: str, t, *, ndim: int | None = None, dtypes=None, shape=None):
    """t must be a tensor of rank `ndim`, a dtype in `dtypes`, and `shape` (None entries: any)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in ({_fmt_dtypes(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")


def check_same_device(op: str, **tensors):
    named = [(n, t) for n, t in tensors.items() if t is not None]
    if not named:
        return
    n0, t0 = named[0]
    for n, t in named[1:]:
        if t.device != t0.device:
            raise ValueError(f"{op}: {n} is on {t.device} but {n0} is on {t0.device}; all tensors must be on one device")


def check_finite_scalar(op: str, name: str, v, *, min_value=None, min_inclusive=True):
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    if min_value is not None and (f < min_value or (f == min_value and not min_inclusive)):
        rel = ">=" if min_inclusive else ">"
        raise ValueError(f"{op}: {name} must be {rel} {min_value}, got {v}")
    return f
