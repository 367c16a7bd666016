"""Saving and loading fluid_ops models as safetensors files: the weights plus one JSON metadata
entry that says what model the file holds and how to build it, so a file alone rebuilds the
model (no pickle, no code executed on load).

    save_safetensors(model, "mar.safetensors", config=model.config, kind="fluid_ops.models.MAR")
    state_dict, meta = load_safetensors("mar.safetensors", kind="fluid_ops.models.MAR")
    meta  # {"kind": "fluid_ops.models.MAR", "config": {...}, "fluid_ops_version": "0.1.0", "format": 1}

Model classes build on these (`MAR.save` / `MAR.load`); `check_state_dict` gives the errors a
loader wants (missing / unexpected tensors, wrong shapes, each named) before anything is copied,
and `build_with_weights` builds a model on the meta device and takes the loaded tensors as its
parameters (no initialisation work, no second copy in memory). A model class needs a JSON-able
`config` (its constructor's arguments) and a way back (`from_config`):

    def save(self, path):
        return io.save_safetensors(self, path, config=self.config, kind=KIND)

    @classmethod
    def load(cls, path):
        state_dict, meta = io.load_safetensors(path, kind=KIND)
        return io.build_with_weights(lambda: cls.from_config(meta["config"]), state_dict, source=f"load({path})")

File layout: a regular safetensors file; its string metadata has one key, "fluid_ops", whose
value is the JSON object above. Writes are atomic: the file is written to a temporary name in
the target folder, flushed to disk, then renamed over the target (os.replace), so a crash or a
full disk never leaves a half-written file under the real name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["save_safetensors", "load_safetensors", "read_metadata", "check_state_dict", "build_with_weights",
           "METADATA_KEY", "FORMAT_VERSION"]

METADATA_KEY = "fluid_ops"
FORMAT_VERSION = 1


def _version() -> str:
    from fluid_ops._version import __version__
    return __version__


def _as_path(op: str, path) -> Path:
    if isinstance(path, bytes):
        path = path.decode()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{op}: path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _state_dict_of(op: str, model) -> dict:
    if isinstance(model, torch.nn.Module):
        sd = model.state_dict()
    elif isinstance(model, dict):
        sd = model
    else:
        raise TypeError(f"{op}: model must be an nn.Module or a state dict, got {type(model).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"{op}: every state-dict entry must map a str name to a tensor; not so for {bad[:5]}")
    return sd


def save_safetensors(model, path, *, config: dict, kind: str) -> Path:
    """Write `model`'s state dict (or a state dict) to `path` as safetensors, with the metadata
    entry {"kind", "config", "fluid_ops_version", "format"}. `config` must be JSON-serialisable
    (it is what the loader passes back to the model's constructor); `kind` names the model class
    (e.g. "fluid_ops.models.MAR") so a loader can refuse another model's file. Tensors are saved
    from the CPU, contiguous; tensors that share memory (tied weights) are stored as one copy
    per name (safetensors refuses shared storage). The write is atomic (temporary file + os.replace). Returns the path."""
    op = "save_safetensors"
    path = _as_path(op, path)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{op}: kind must be a non-empty str, got {kind!r}")
    if not isinstance(config, dict):
        raise TypeError(f"{op}: config must be a dict, got {type(config).__name__}")
    try:
        meta = json.dumps({"kind": kind, "config": config, "fluid_ops_version": _version(),
                           "format": FORMAT_VERSION}, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{op}: config must be JSON-serialisable (plain numbers, strings, lists, dicts): {e}") from None
    sd = _state_dict_of(op, model)
    tensors, seen = {}, set()
    for name, t in sd.items():
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses two names over one storage; store such a tensor as its own copy
        key = t.untyped_storage().data_ptr() if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        tensors[name] = t

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: meta})
        with open(tmp, "rb+") as f:  # the rename must not land before the data does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_metadata(path) -> dict:
    """The fluid_ops metadata entry of a safetensors file, parsed (no tensor is read)."""
    op = "read_metadata"
    path = _as_path(op, path)
    _check_exists(op, path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata()
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError) on bad files
        raise ValueError(f"{op}: {path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return _parse_metadata(op, path, raw)


def _check_exists(op, path):
    if not path.exists():
        raise FileNotFoundError(f"{op}: no such file: {path}")
    if not path.is_file():
        raise IsADirectoryError(f"{op}: {path} is not a file")


def _parse_metadata(op, path, raw) -> dict:
    if not raw or METADATA_KEY not in raw:
        raise ValueError(f"{op}: {path} has no {METADATA_KEY!r} metadata entry: not written by "
                         f"fluid_ops' save_safetensors (metadata keys: {sorted(raw or {})})")
    try:
        meta = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{op}: {path}: the {METADATA_KEY!r} metadata entry is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{op}: {path}: the {METADATA_KEY!r} metadata entry must be an object with a str 'kind' "
                         f"and a dict 'config', got {str(meta)[:200]}")
    if meta.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{op}: {path} has metadata format {meta['format']}, newer than this fluid_ops reads "
                         f"({FORMAT_VERSION}); upgrade fluid_ops")
    return meta


def load_safetensors(path, *, kind: str | None = None, device="cpu") -> tuple[dict, dict]:
    """Read a file written by `save_safetensors`: returns (state_dict, metadata), metadata the
    parsed JSON entry {"kind", "config", "fluid_ops_version", "format"}. kind: when given, a file
    of another kind is refused (ValueError naming both). Errors: FileNotFoundError for a missing
    file; ValueError for a corrupt or truncated file or one without fluid_ops metadata."""
    op = "load_safetensors"
    path = _as_path(op, path)
    if kind is not None and (not isinstance(kind, str) or not kind):
        raise TypeError(f"{op}: kind must be a non-empty str or None, got {kind!r}")
    _check_exists(op, path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw = f.metadata()
            meta = _parse_metadata(op, path, raw)
            if kind is not None and meta["kind"] != kind:
                raise ValueError(f"{op}: {path} holds a {meta['kind']!r}, not a {kind!r}")
            state_dict = {name: f.get_tensor(name) for name in f.keys()}
    except ValueError:
        raise
    except Exception as e:  # SafetensorError / OSError on a corrupt or truncated file
        raise ValueError(f"{op}: {path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return state_dict, meta


def check_state_dict(module: torch.nn.Module, state_dict: dict, *, source: str, strict: bool = True) -> None:
    """Raise before loading if `state_dict` does not fit `module`: ValueError naming every
    tensor whose shape differs (expected vs found), and, when strict, the missing and unexpected
    names (up to 10 each, with the counts). `source` starts the message (e.g. "MAR.load(x.pth)")."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"{source}: the state dict must be a dict, got {type(state_dict).__name__}")
    expected = module.state_dict()
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    wrong = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state_dict[k].shape)}"
             for k in expected if k in state_dict and k not in not_tensors
             and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if not_tensors:
        problems.append(f"{len(not_tensors)} entries are not tensors: {not_tensors[:10]}")
    if wrong:
        problems.append(f"{len(wrong)} tensors have the wrong shape: " + "; ".join(wrong[:10]))
    if strict and missing:
        problems.append(f"{len(missing)} tensors are missing: {missing[:10]}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} tensors are not in the model: {unexpected[:10]}")
    if problems:
        raise ValueError(f"{source}: the weights do not fit the model: " + " | ".join(problems))


def build_with_weights(build, state_dict: dict, *, source: str, strict: bool = True) -> torch.nn.Module:
    """`build()` on the meta device (no initialisation work, no memory), `check_state_dict`, then
    the state dict's tensors become the parameters and buffers (load_state_dict(assign=True):
    their values, dtype and device are kept, requires_grad is the module's). With strict=False a
    tensor the file lacks would be left without a value: that is refused too, naming it.
    The model is returned as `build` left it (train mode for a fresh nn.Module)."""
    if not callable(build):
        raise TypeError(f"{source}: build must be a callable returning the model, got {type(build).__name__}")
    with torch.device("meta"):
        model = build()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{source}: build() must return an nn.Module, got {type(model).__name__}")
    check_state_dict(model, state_dict, source=source, strict=strict)
    model.load_state_dict(state_dict, strict=strict, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{source}: no weights for {left[:10]} ({len(left)} tensors); with strict=False only "
                         f"tensors the model does not have may be left out")
    return model

