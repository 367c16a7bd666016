"""Backends and how an op picks one.

Each op family registers one implementation per backend with `register(op, backend)`. A call
picks, in order of preference, the first backend that is available, handles the tensors' device
and accepts the arguments (its `supports` hook returns None); `FLUID_OPS_BACKEND=name` or
`with fluid_ops.use_backend(name):` forces one, and then an unsupported case is an error that
says why instead of a silent fallback. An op may also have a composite implementation
(`register_composite`), built from other ops that pick their own backends: it runs when no
backend's own implementation takes a call, forced or not, instead of the error.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from fluid_ops import _compiled
from fluid_ops import triton as _triton
from fluid_ops.triton import _util as _triton_util

BACKENDS = ("cuda", "triton", "cpu", "reference")
# Which devices each backend runs on.
_DEVICES = {"cuda": ("cuda",), "triton": ("cuda", "cpu"), "cpu": ("cpu",), "reference": ("cuda", "cpu")}
# (backend, device) pairs taken only when forced: Triton on CPU tensors runs in its interpreter
# (TRITON_INTERPRET=1), ~1000x slower than the cpu backend: there for tests, never a default.
_FORCED_ONLY = {("triton", "cpu")}


@dataclass
class _Impl:
    fn: Callable
    supports: Callable | None  # (*args, **kwargs) -> None if fine, else a reason string


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_COMPOSITE: dict[str, Callable] = {}
_forced = threading.local()


def register(op: str, backend: str, supports: Callable | None = None):
    """Decorator: `fn` implements `op` on `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, supports)
        return fn

    return deco


def register_composite(op: str):
    """Decorator: `fn` computes `op` from other ops (each choosing its own backend); `select`
    returns it, as backend "composite", when no backend's own implementation takes the call."""

    def deco(fn):
        _COMPOSITE[op] = fn
        return fn

    return deco


_TRITON_INSTALLED: bool | None = None


def _triton_status() -> str | None:
    # not cached as a whole: TRITON_INTERPRET may be set after the first call (tests do)
    global _TRITON_INSTALLED
    if _TRITON_INSTALLED is None:
        _TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if not torch.cuda.is_available():
        interpreted = _triton.kernels_interpreted()
        if not (interpreted or (interpreted is None and _triton.interpreter_requested())):
            return "no CUDA device for Triton (set TRITON_INTERPRET=1 to run its kernels on CPU tensors)"
    return None


def triton_cpu_rule(*tensors) -> str | None:
    """The backend rule for Triton on CPU tensors: it runs there (under the interpreter) only when
    forced with `use_backend("triton")` / FLUID_OPS_BACKEND=triton, never by automatic choice,
    because the interpreter is orders of magnitude slower than the compiled CPU kernels."""
    t = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if t is None or t.device.type != "cpu":
        return None
    if forced_backend() != "triton":
        return "on CPU tensors triton runs (interpreted) only when forced with use_backend('triton')"
    if not _triton_util.kernels_interpreted():
        return ("CPU tensors need Triton's interpreter, but the kernels are compiled for the GPU "
                "(set TRITON_INTERPRET=1 before the first Triton call)")
    return None


def _unavailable_reason(backend: str) -> str | None:
    if backend == "reference":
        return None
    if backend == "cpu":
        return _compiled.cpu_error
    if backend == "cuda":
        count, msg = _compiled.cuda_device_status()
        if count == 0:
            return msg
        if not torch.cuda.is_available():
            return "the CUDA module sees a device but this torch build has no CUDA support"
        return None
    if backend == "triton":
        return _triton_status()
    raise ValueError(f"unknown backend {backend!r}")


_STATUS_CACHE: dict[str, str | None] = {}


def _status(backend: str) -> str | None:
    if backend == "triton":
        return _triton_status()
    if backend not in _STATUS_CACHE:
        _STATUS_CACHE[backend] = _unavailable_reason(backend)
    return _STATUS_CACHE[backend]


_LIMITS: dict[str, dict[str, object]] = {}


def declare_limits(what: str, per_backend: dict[str, object]) -> None:
    """An op family states what each backend takes (e.g. attention's head dims), for backends()."""
    for b, value in per_backend.items():
        _LIMITS.setdefault(b, {})[what] = value


def backends() -> dict[str, dict]:
    """What is available and why not: {name: {"available": bool, "reason": str|None, "ops": [...],
    "limits": {what: value}}}, limits as the op families declare them (`declare_limits`)."""
    out = {}
    for b in BACKENDS:
        reason = _status(b)
        ops = sorted(op for op, impls in _REGISTRY.items() if b in impls)
        if reason is None and not ops:
            reason = "no kernels registered for this backend yet"
        out[b] = {"available": reason is None, "reason": reason, "ops": ops, "limits": dict(_LIMITS.get(b, {}))}
    return out


def forced_backend() -> str | None:
    name = getattr(_forced, "name", None) or os.environ.get("FLUID_OPS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"FLUID_OPS_BACKEND / use_backend: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force backend `name` for every op called inside the block (None: back to automatic)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; expected one of {BACKENDS}")
    prev = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = prev


def select(op: str, device: torch.device, *args, **kwargs) -> tuple[str, Callable]:
    """The (backend name, implementation) that runs `op` for these arguments."""
    impls = _REGISTRY.get(op, {})
    forced = forced_backend()
    candidates = [forced] if forced else list(BACKENDS)
    reasons = []
    for b in candidates:
        impl = impls.get(b)
        if impl is None:
            reasons.append(f"{b}: does not implement {op}")
            continue
        if device.type not in _DEVICES[b]:
            reasons.append(f"{b}: does not run on {device.type} tensors")
            continue
        if not forced and (b, device.type) in _FORCED_ONLY:
            reasons.append(f"{b}: runs on {device.type} tensors only when forced")
            continue
        why = _status(b)
        if why is None and impl.supports is not None:
            why = impl.supports(*args, **kwargs)
        if why is not None:
            reasons.append(f"{b}: {why}")
            continue
        return b, impl.fn
    if op in _COMPOSITE:
        return "composite", _COMPOSITE[op]
    if forced:
        raise RuntimeError(f"{op}: the forced backend cannot run this call ({'; '.join(reasons)})")
    raise RuntimeError(f"{op}: no backend can run this call ({'; '.join(reasons)})")


def dispatch(op: str, device: torch.device, *args, **kwargs):
    return select(op, device, *args, **kwargs)[1](*args, **kwargs)


# ---- precision chosen by the hardware ---------------------------------------------------------
# One place decides where bf16 is native (docs/design.md, "Precision"): the diffusion head's
# gemm_dtype="auto", sampling's and training's precision="auto", and the benchmarks' records.

PRECISIONS = ("auto", "bf16", "fp32")
# The flags that make bf16 arithmetic native on a CPU (vdpbf16ps / AMX tiles). Without them
# (AVX2-only CPUs) oneDNN emulates bf16 and a bf16 GEMM is several times slower than fp32.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _read_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


_CPU_FLAGS: frozenset[str] | None = None


def cpu_flags() -> frozenset[str]:
    """The CPU's flags as /proc/cpuinfo spells them (empty where it cannot be read); read once.
    Tests monkeypatch `_read_cpu_flags` and reset `_CPU_FLAGS` to act as another CPU."""
    global _CPU_FLAGS
    if _CPU_FLAGS is None:
        _CPU_FLAGS = _read_cpu_flags()
    return _CPU_FLAGS


def cpu_simd_flags() -> list[str]:
    """The flags a benchmark record needs (AVX*, AMX*, FMA, F16C), sorted."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))


def native_bf16(device) -> bool:
    """Whether bf16 arithmetic is native on `device`: CUDA devices with bf16 support, CPUs with
    AVX512_BF16 or AMX-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(f in cpu_flags() for f in NATIVE_BF16_CPU_FLAGS)
    return False


def auto_precision(device) -> str:
    """What precision="auto" means on `device`: "bf16" where bf16 is native, else "fp32"."""
    return "bf16" if native_bf16(device) else "fp32"


def resolve_precision(precision: str, device) -> str:
    """"auto" | "bf16" | "fp32" -> "bf16" | "fp32" for `device` (ValueError for anything else).
    FLUID_OPS_PRECISION=fp32|bf16 makes "auto" mean that for the process (the test suite pins
    fp32 so that its exactness checks hold on every CPU); an explicit precision always wins."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    forced = os.environ.get("FLUID_OPS_PRECISION", "").strip().lower()
    if forced in ("fp32", "bf16"):
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"FLUID_OPS_PRECISION must be auto, bf16 or fp32 (or unset), got {forced!r}")
    return auto_precision(device)


def precision_record(precision: str, device) -> dict:
    """What a checkpoint's run metadata or a benchmark JSON records about a precision choice."""
    return {"precision": precision, "resolved": resolve_precision(precision, device),
            "device": str(torch.device(device)), "cpu_native_bf16": native_bf16("cpu"),
            "cpu_simd_flags": cpu_simd_flags()}
