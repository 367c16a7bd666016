"""The training loop: AdamW + warmup (+ an optional final linear decay), EMA, bf16 autocast, atomic
checkpoints, exact resume.

    from fluid_ops.training import train, load_ema
    result = train(model, dataset, out_dir="runs/a", minutes=10)   # or steps=..., or both
    ema_model = load_ema(copy.deepcopy(model), result)             # or load_ema(model, "runs/a")

The model contract: `model(images, captions, *, generator) -> scalar loss`, drawing all of its
randomness (text dropout, masks, noise) from `generator`; `model.config` a dataclass (or dict);
optionally `needs_tokenizer_fit` + `fit_tokenizer(images)` (discrete variant: fitted once,
before step 0, on training images). Parameters with `requires_grad=False` (a frozen text
encoder) are neither optimised nor averaged.

Why a resumed run is bit-identical to an uninterrupted one (fp32, deterministic kernels):
* the model's randomness at step s comes from a generator seeded from (seed, s), so nothing
  about it needs saving;
* the data order is a fixed stream, one seeded permutation per epoch, and the checkpoint stores
  the position (epoch, index) in it: the resumed run reads exactly the batches not yet seen;
* model, EMA, optimizer moments, step, and the global RNG states (torch, CUDA, numpy, python,
  for any module that still uses them, e.g. dropout) are restored as they were at that step;
* the DataLoader gets its own generator, so creating one does not advance the global RNG.
A run killed at any moment resumes from its last checkpoint: at most `ckpt_every` steps lost.

Under `torchrun` the same loop runs data-parallel (DDP, or FSDP2 with `fsdp=True`): `batch_size`
is then the global batch, split evenly over the ranks; see `fluid_ops.distributed` for why N
ranks give the one-process run and how checkpoints are written there.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fluid_ops import backend
from fluid_ops import distributed as D
from fluid_ops.checkpoint import (CheckpointError, RunInUseError, RunLock, _check_payload, load_checkpoint, previous_path,
                                  remove_stale_temporaries, save_checkpoint)

__all__ = ["train", "TrainResult", "StepInfo", "load_ema", "default_collate", "param_groups",
           "lr_at", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
TOKENIZER_FIT_IMAGES = 2048
_HISTORY_KEYS = ("step", "loss", "lr", "time", "grad_norm")


# ---- small pieces, public for tests and scripts -----------------------------------------
def lr_at(step: int, lr: float, warmup_steps: int, decay: float = 0.0, progress: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over `warmup_steps`
    (lr/warmup at step 0, lr at step warmup-1), then constant; with `decay` > 0 (a fraction of
    the run), linear to 0 over the last `decay` of the run: `progress` is the fraction of the
    run done before this step (in [0, 1]), and the warmup factor and the decay factor multiply
    (warmup-stable-decay)."""
    f = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        f = (step + 1) / warmup_steps
    if decay > 0 and progress > 1.0 - decay:
        f *= max(0.0, 1.0 - progress) / decay
    return lr * f


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: decay on matrices (ndim >= 2) only; biases,
    norm weights and other 1-D parameters, and the names the model lists in
    `no_weight_decay()` (timm's convention), get none."""
    skip = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and not name.endswith(".bias") and name not in skip:
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    return [{"params": decay, "weight_decay": weight_decay, "names": decay_names},
            {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names}]


def default_collate(items):
    """[(image (3,H,W), caption str), ...] -> (images (B,3,H,W), [captions])."""
    images, captions = [], []
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"dataset item {i} of the batch: expected (image, caption), got {type(item).__name__}"
                            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))
        img, cap = item
        images.append(torch.as_tensor(img))
        captions.append(cap)
    return torch.stack(images), captions


def _derive_seed(seed: int, purpose: str, n: int) -> int:
    """A 63-bit seed for (seed, purpose, n): independent streams without stored generator state."""
    digest = hashlib.blake2b(f"{seed}/{purpose}/{n}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_derive_seed(seed, "epoch", epoch))
    return torch.randperm(n, generator=g)


class _BatchStream:
    """Batch sampler over the endless stream perm(epoch 0) ++ perm(epoch 1) ++ ..., starting at
    (epoch, index). Every batch is full; a batch may straddle two epochs."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, index: int):
        self.n, self.batch_size, self.seed, self.epoch, self.index = n, batch_size, seed, epoch, index

    def __iter__(self):
        epoch, index = self.epoch, self.index
        perm = _epoch_permutation(self.n, self.seed, epoch).tolist()
        while True:
            batch = []
            while len(batch) < self.batch_size:
                take = min(self.batch_size - len(batch), self.n - index)
                batch.extend(perm[index:index + take])
                index += take
                if index == self.n:
                    epoch, index = epoch + 1, 0
                    perm = _epoch_permutation(self.n, self.seed, epoch).tolist()
            yield batch


# ---- results ------------------------------------------------------------------------------
@dataclass
class StepInfo:
    """What `callback` receives every `log_every` steps (and at checkpoints). Return True from
    the callback to stop training cleanly (a checkpoint is written)."""
    step: int            # optimizer steps done
    loss: float          # mean loss of the steps since the last call
    lr: float
    elapsed_s: float     # training time, summed over resumed runs
    model: nn.Module
    # trainable parameter name -> EMA tensor (fp32), live: copy what you keep (under FSDP, this
    # rank's shards)
    ema: dict | None = None


@dataclass
class TrainResult:
    model: nn.Module                 # the trained model (raw weights, not the EMA)
    step: int                        # optimizer steps done in total
    epoch: int                       # data position: the next sample is perm(epoch)[index]
    index: int
    history: dict                    # columns: step, loss, lr, time, grad_norm (one entry per step)
    ema: dict                        # trainable parameter name -> EMA tensor (fp32)
    out_dir: Path
    checkpoint_path: Path | None
    elapsed_s: float                 # training time, summed over resumed runs
    stopped_by: str                  # "steps", "minutes", "callback", or "already_done"

    @property
    def final_loss(self) -> float | None:
        return self.history["loss"][-1] if self.history["loss"] else None

    def ema_state_dict(self) -> dict:
        """The model's state dict with the EMA in place of each trainable parameter."""
        return _ema_state_dict(self.model, self.ema)


def _ema_state_dict(model: nn.Module, ema: dict) -> dict:
    sd = model.state_dict()
    for name, t in ema.items():
        sd[name] = t
    return sd


def load_ema(model: nn.Module, source, *, copy_model: bool = False) -> nn.Module:
    """Loads EMA weights into `model` (in place; a deep copy first with `copy_model=True`) and
    returns it. `source`: a TrainResult, a checkpoint file or run folder, or a loaded checkpoint."""
    if copy_model:
        model = copy.deepcopy(model)
    if isinstance(source, TrainResult):
        sd = source.ema_state_dict()
    elif isinstance(source, (str, os.PathLike)):
        sd = load_checkpoint(source)["ema"]
    elif isinstance(source, dict) and "ema" in source:
        sd = source["ema"]
    else:
        raise TypeError(f"load_ema: source must be a TrainResult, a checkpoint path or a loaded checkpoint "
                        f"dict with an 'ema' entry; got {type(source).__name__}")
    model.load_state_dict(sd, strict=True)
    return model


# ---- validation ---------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _validate(model, dataset, *, steps, minutes, batch_size, lr, warmup_steps, lr_decay, weight_decay, betas,
              grad_clip, ema_decay, ckpt_every, seed, amp, num_workers, log_every, callback):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if steps is None and minutes is None:
        raise ValueError("steps and minutes are both None: give a number of optimizer steps and/or a "
                         "wall-clock budget in minutes")
    if steps is not None and (not _is_int(steps) or steps < 1):
        raise ValueError(f"steps: expected an int >= 1 (total optimizer steps) or None, got {steps!r}")
    if minutes is not None and (not _is_real(minutes) or minutes <= 0):
        raise ValueError(f"minutes: expected a finite number > 0 or None, got {minutes!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if not _is_real(lr) or lr <= 0:
        raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
    if not _is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected an int >= 0, got {warmup_steps!r}")
    if not _is_real(lr_decay) or not 0 <= lr_decay <= 1:
        raise ValueError(f"lr_decay: expected a fraction of the run in [0, 1] (0: constant LR after the warmup), "
                         f"got {lr_decay!r}")
    if not _is_real(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay: expected a finite number >= 0, got {weight_decay!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(_is_real(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
    if grad_clip is not None and (not _is_real(grad_clip) or grad_clip <= 0):
        raise ValueError(f"grad_clip: expected a finite number > 0 or None (no clipping), got {grad_clip!r}")
    if not _is_real(ema_decay) or not 0 <= ema_decay <= 1:
        raise ValueError(f"ema_decay: expected a number in [0, 1], got {ema_decay!r}")
    if not _is_int(ckpt_every) or ckpt_every < 1:
        raise ValueError(f"ckpt_every: expected an int >= 1 (steps between checkpoints), got {ckpt_every!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if amp not in ("auto", "bf16", "none", "fp32"):
        raise ValueError(f"amp: expected 'auto', 'bf16' or 'none' (= 'fp32'), got {amp!r}")
    if not _is_int(num_workers) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")
    if not _is_int(log_every) or log_every < 1:
        raise ValueError(f"log_every: expected an int >= 1, got {log_every!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable or None, got {type(callback).__name__}")
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"dataset: expected a map-style dataset (__len__ and __getitem__), "
                        f"got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty (len 0): nothing to train on")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no parameter with requires_grad=True: nothing to train")


def _config_dict(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, dict):
        return dict(cfg)
    raise TypeError(f"model.config: expected a dataclass instance or a dict, got {type(cfg).__name__}")


def _normalized_config(model, stored):
    """The checkpoint's config in the model's current form (`model.normalize_config_dict`, when
    it has one: e.g. an older flat Fluid config); unchanged when it cannot be read that way."""
    normalize = getattr(model, "normalize_config_dict", None)
    if not callable(normalize) or not isinstance(stored, dict):
        return stored
    try:
        return normalize(stored)
    except (TypeError, ValueError):  # reported as a config mismatch by _check_config
        return stored


def _plain(x):
    """Tuples -> lists, recursively: configs compare equal however they went through pickling."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _check_config(stored, current, path):
    a, b = _plain(stored), _plain(current)
    if a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{k}: checkpoint {a.get(k, '<absent>')!r}, model {b.get(k, '<absent>')!r}"
                 for k in sorted(set(a) | set(b), key=str) if a.get(k, ...) != b.get(k, ...)]
        detail = "; ".join(diffs)
    else:
        detail = f"checkpoint {a!r}, model {b!r}"
    raise ValueError(f"cannot resume from {path}: the model's config differs from the checkpoint's ({detail}). "
                     "Build the model with the checkpoint's config, or train in another out_dir.")


# ---- RNG state (kept to tensors, lists and numbers for weights_only loading) ------------------
def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda_states)} devices, this machine has "
                          f"{torch.cuda.device_count()}: CUDA RNG not restored", stacklevel=3)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


# ---- outputs ------------------------------------------------------------------------------
def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _smooth(values: list[float], span: float) -> list[float]:
    """Bias-corrected exponential moving average."""
    a = 2.0 / (span + 1.0)
    out, m, w = [], 0.0, 0.0
    for v in values:
        m = (1 - a) * m + a * v
        w = (1 - a) * w + a
        out.append(m / w)
    return out


def _write_loss_plot(history: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # a core dependency: every run has loss.png
    from matplotlib.figure import Figure
    steps, losses = history["step"], history["loss"]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)  # Figure + Agg canvas directly: pyplot's global state stays untouched
    ax = fig.add_subplot(1, 1, 1)
    if steps:
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
        span = min(500.0, max(1.0, len(losses) / 20))
        ax.plot(steps, _smooth(losses, span), color="tab:blue", linewidth=1.8, label=f"EMA (span {span:.0f})")
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.11, right=0.97, top=0.96, bottom=0.12)  # tight_layout costs 30% more
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def _write_history(history: dict, out_dir: Path) -> None:
    _write_atomic_text(out_dir / "history.json", json.dumps(history))
    _write_loss_plot(history, out_dir / "loss.png")


# ---- the loop -----------------------------------------------------------------------------
def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a torch device or its name, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but CUDA is not available on this machine "
                         "(use cpu, or leave the device out)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r} asked for, but this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    return dev


def _tokenizer_fit_images(dataset, n: int, seed: int, collate_fn, device) -> torch.Tensor:
    take = min(n, len(dataset))
    g = torch.Generator().manual_seed(_derive_seed(seed, "tokenizer", 0))
    idx = torch.randperm(len(dataset), generator=g)[:take].tolist()
    images, _ = collate_fn([dataset[i] for i in idx])
    return images.to(device)


def train(model: nn.Module, dataset, *, out_dir, steps: int | None = None, minutes: float | None = None,
          batch_size: int = 64, lr: float = 1e-3, warmup_steps: int = 100, lr_decay: float = 0.0,
          weight_decay: float = 0.02,
          betas=(0.9, 0.95), grad_clip: float | None = 1.0, ema_decay: float = 0.999, ckpt_every: int = 500,
          seed: int = 0, device=None, amp: str = "auto", num_workers: int = 0, progress: bool = True,
          resume: bool = True, log_every: int = 10, callback: Callable[[StepInfo], Any] | None = None,
          collate_fn: Callable | None = None, tokenizer_fit_images: int = TOKENIZER_FIT_IMAGES,
          fsdp: bool = False) -> TrainResult:
    """Train `model` on `dataset` (items `(image (3,H,W), caption)`), writing to `out_dir`:
    `checkpoint.pt` (+ `checkpoint.prev.pt`) every `ckpt_every` steps and at the end,
    `history.json` and `loss.png`.

    steps: total optimizer steps of the run (a resumed run continues up to it).
    minutes: wall-clock budget of this call; training stops after the step that crosses it and
        writes a checkpoint. With both, whichever comes first.
    lr, warmup_steps: linear warmup from lr/warmup_steps to lr, then constant.
    lr_decay: a fraction of the run; > 0: the LR falls linearly to 0 over the last `lr_decay` of
        it (warmup-stable-decay; `lr_at`). The run's progress is step / steps, or with `minutes`
        the fraction of this call's budget spent (the larger of the two with both; so with
        `minutes` the decay follows the clock, and a resumed call starts its own budget).
    weight_decay: AdamW decay on matrices only (see `param_groups`); betas: AdamW's.
    grad_clip: max global grad norm (None: no clipping). ema_decay: EMA of trainable parameters.
    seed: data order (a permutation per epoch), per-step model randomness (a generator seeded
        from (seed, step), passed as `generator=`), global RNGs of a fresh run.
    device: None -> cuda if available else cpu; the model is moved there.
    amp: the precision: "auto" (bf16 autocast where the device computes bf16 natively: CUDA, CPUs
        with AVX512_BF16 or AMX; none elsewhere: `fluid_ops.backend.auto_precision`), "bf16", or
        "none" / "fp32". The resolved choice is in the checkpoint's train_args["precision"].
    resume: continue from `out_dir/checkpoint.pt` if present (refused if it is corrupt or the
        model's config differs; never silently restarted). resume=False with a checkpoint there
        is an error: nothing is overwritten.
    callback: called with a `StepInfo` every `log_every` steps; returning True stops training.
    collate_fn: batches list of items -> (images, captions); default `default_collate`.
    tokenizer_fit_images: how many training images `model.fit_tokenizer` sees (discrete variant).
    fsdp: shard parameters, gradients and optimizer state with FSDP2 (needs a process group:
        launch with torchrun); checkpoints are then torch.distributed.checkpoint folders.

    Under torchrun (or any initialised process group) `batch_size` is the global batch: it must
    divide by the number of ranks, each rank trains on its slice, rank 0 writes the files.

    Non-finite loss or gradient norm: training stops with FloatingPointError naming the step
    (checked every `log_every` steps and before each checkpoint, so no checkpoint holds a
    poisoned state); the last good checkpoint stays as it was.
    """
    _validate(model, dataset, steps=steps, minutes=minutes, batch_size=batch_size, lr=lr,
              warmup_steps=warmup_steps, lr_decay=lr_decay, weight_decay=weight_decay, betas=betas,
              grad_clip=grad_clip, ema_decay=ema_decay, ckpt_every=ckpt_every, seed=seed, amp=amp,
              num_workers=num_workers, log_every=log_every, callback=callback)
    run = _Run(model, dataset, _Settings(
        out_dir=Path(out_dir), steps=steps, minutes=minutes, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
        lr_decay=lr_decay, weight_decay=weight_decay, betas=tuple(betas), grad_clip=grad_clip, ema_decay=ema_decay,
        ckpt_every=ckpt_every, seed=seed, device=device, amp=amp, num_workers=num_workers, progress=progress,
        resume=resume, log_every=log_every, callback=callback, collate_fn=collate_fn or default_collate,
        tokenizer_fit_images=tokenizer_fit_images, fsdp=fsdp))
    try:
        run.restore(run.read_checkpoint())   # a fresh start when there is none
        run.start_clock()
        if steps is not None and run.step >= steps:
            return run.result("already_done")
        run.open_stream()
        try:
            while run.stopped_by is None:
                run.train_step(*next(run.batches))
                run.end_of_step()   # stop checks, history, callback, checkpoint
        finally:
            run.close()
        return run.result(run.stopped_by)
    finally:
        run.release_lock()


@dataclass
class _Settings:
    """`train`'s arguments, validated."""
    out_dir: Path
    steps: int | None
    minutes: float | None
    batch_size: int
    lr: float
    warmup_steps: int
    lr_decay: float
    weight_decay: float
    betas: tuple
    grad_clip: float | None
    ema_decay: float
    ckpt_every: int
    seed: int
    device: Any
    amp: str
    num_workers: int
    progress: bool
    resume: bool
    log_every: int
    callback: Callable | None
    collate_fn: Callable
    tokenizer_fit_images: int
    fsdp: bool


class _Run:
    """One call of `train`: the state its steps share (model, optimizer, EMA, step, data
    position, history, clock) and the steps themselves, in the order `train` calls them."""

    # ---- opening the run: devices, ranks, the run folder --------------------------------------
    def __init__(self, model: nn.Module, dataset, a: _Settings):
        self.model, self.dataset, self.a = model, dataset, a
        self.t_call = time.monotonic()
        self.ctx, device = D.setup(a.device, fsdp=a.fsdp)
        self.device = _resolve_device(device)
        ctx = self.ctx
        if a.fsdp and not ctx.enabled:
            raise ValueError("fsdp=True needs a process group: launch with torchrun (torchrun --nproc_per_node N "
                             "-m fluid_ops train ... --fsdp; --nproc_per_node 1 works too)")
        if a.batch_size % ctx.world_size:
            raise ValueError(f"batch_size: the global batch {a.batch_size} must be divisible by the number of ranks "
                             f"({ctx.world_size})")
        self.local_batch = a.batch_size // ctx.world_size
        self.split = ctx.world_size > 1
        if self.split and not getattr(model, "supports_batch_slice", False) and ctx.is_main:
            warnings.warn(f"{type(model).__name__} does not draw its randomness per global batch (no "
                          "supports_batch_slice): each rank draws its own, so this run is statistically, not "
                          "exactly, the one-process run", stacklevel=3)
        self.precision = backend.resolve_precision("fp32" if a.amp == "none" else a.amp, self.device)
        use_bf16 = self.precision == "bf16"
        self.amp_dtype = torch.bfloat16 if use_bf16 else None
        self.n_data = len(dataset)
        if a.out_dir.exists() and not a.out_dir.is_dir():
            raise NotADirectoryError(f"out_dir: {a.out_dir} exists and is not a folder")
        a.out_dir.mkdir(parents=True, exist_ok=True)
        self.lock = None
        self.ckpt_path = a.out_dir / CHECKPOINT_NAME
        self.stopped_by = None
        # one writer per run folder, held until train() returns (rank 0 writes every file); taken
        # before anything in the folder is read, cleaned up or written
        lock_error = None
        if ctx.is_main:
            try:
                self.lock = RunLock(a.out_dir)
            except RunInUseError as e:
                lock_error = e
        if lock_error is not None and not ctx.enabled:
            raise lock_error
        if ctx.enabled and D.any_rank(ctx, lock_error is not None):  # every rank stops, none waits at a barrier
            raise lock_error or RunInUseError(f"{a.out_dir}: rank 0 could not lock the run folder (another "
                                              "training holds it; see rank 0's error)")
        try:
            self.dcp_dir = D.latest_dcp_dir(a.out_dir)
        except BaseException:
            self.release_lock()
            raise

    def read_checkpoint(self):
        """The checkpoint to resume from (None: a fresh run); refuses every ambiguous case."""
        a, ckpt_path, dcp_dir, state = self.a, self.ckpt_path, self.dcp_dir, None
        if a.fsdp and ckpt_path.exists() and dcp_dir is None:
            raise CheckpointError(f"{ckpt_path} is a single-file checkpoint of a run without --fsdp; resume it "
                                  "without fsdp, or train with fsdp in another out_dir")
        if not a.fsdp and dcp_dir is not None:
            raise CheckpointError(f"{a.out_dir} holds an FSDP checkpoint ({dcp_dir.name}): resume it with fsdp=True "
                                  "(--fsdp), or write a single file with fluid_ops.distributed.consolidate "
                                  "(fluid-ops consolidate) for generate / evaluate")
        if a.fsdp:
            if dcp_dir is not None:
                if not a.resume:
                    raise FileExistsError(f"{dcp_dir} exists and resume=False: pass resume=True to continue that "
                                          "run, or choose another out_dir (nothing was overwritten)")
                state = D.load_dcp_meta(dcp_dir)
        elif ckpt_path.exists():
            if not a.resume:
                raise FileExistsError(f"{ckpt_path} exists and resume=False: pass resume=True to continue that run, "
                                      "or choose another out_dir (nothing was overwritten)")
            state = load_checkpoint(ckpt_path)  # raises CheckpointError for a bad file: never start over silently
        elif previous_path(ckpt_path).exists():
            raise CheckpointError(f"{ckpt_path} is missing but {previous_path(ckpt_path)} exists: the run's "
                                  f"latest checkpoint was removed. To resume from the previous one, copy it to "
                                  f"{ckpt_path}; to start over, use another out_dir")
        if self.ctx.is_main:
            remove_stale_temporaries(ckpt_path)
            for leftover in (*a.out_dir.glob(".history.json.*.tmp"), *a.out_dir.glob(".loss.png.*.tmp.png")):
                leftover.unlink(missing_ok=True)  # from a killed run
        return state

    # ---- restoring: model, optimizer, EMA, position, history, RNG -----------------------------
    def restore(self, state) -> None:
        model, a = self.model, self.a
        self.config = _config_dict(model)
        _check_payload(self.config, "model.config")  # fail now, not at the first checkpoint
        self.was_training = model.training
        model.to(self.device)
        if state is None:
            self._fresh_model()
        else:
            if state.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{self.ckpt_path}: checkpoint format {state.get('format')!r}, this version "
                                      f"reads {CHECKPOINT_FORMAT}")
            _check_config(_normalized_config(model, state["config"]), self.config, self.ckpt_path)
            if not a.fsdp:
                model.load_state_dict(state["model"], strict=True)
        # DDP (any process group) or FSDP2; `fwd` is what the loop calls, `model` the plain module
        self.fwd = D.wrap_model(model, self.ctx, self.device, fsdp=a.fsdp) if self.ctx.enabled else model
        self.trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.trainable]
        groups = param_groups(model, a.weight_decay)
        for g in groups:
            g.pop("names")
        fused = self.device.type == "cuda" and all(p.is_floating_point() for p in self.params)
        self.opt = torch.optim.AdamW(groups, lr=a.lr, betas=a.betas, fused=True if fused else None)
        if state is None:
            self.ema = {name: p.detach().float().clone() for name, p in self.trainable}
            self.step, self.epoch, self.index, self.elapsed_before = 0, 0, 0, 0.0
            self.history = {k: [] for k in _HISTORY_KEYS}
        else:
            self._restore_progress(state)
        self.ema_list = [self.ema[name] for name, _ in self.trainable]

    def _fresh_model(self) -> None:
        a, model = self.a, self.model
        _seed_everything(a.seed)
        if getattr(model, "needs_tokenizer_fit", False):
            fit = getattr(model, "fit_tokenizer", None)
            if not callable(fit):
                raise TypeError("model.needs_tokenizer_fit is True but the model has no fit_tokenizer(images)")
            fit(_tokenizer_fit_images(self.dataset, a.tokenizer_fit_images, a.seed, a.collate_fn, self.device))
        if self.ctx.rank > 0:  # the same fit on every rank, then distinct global RNGs (e.g. dropout)
            _seed_everything(_derive_seed(a.seed, f"rank{self.ctx.rank}", 0))

    def _restore_progress(self, state) -> None:
        a, ctx, opt = self.a, self.ctx, self.opt
        if a.fsdp:  # every rank reads its (resharded) part of model, AdamW state and EMA
            self.ema = {name: p.detach().float().clone() for name, p in self.trainable}
            D.load_dcp_checkpoint(self.dcp_dir, self.model, opt, self.ema)
        else:
            opt.load_state_dict(state["optimizer"])
            self.ema = {name: state["ema"][name].to(device=self.device, dtype=torch.float32).clone()
                        for name, _ in self.trainable}
        for g, wd in zip(opt.param_groups, (a.weight_decay, 0.0)):  # this call's hyperparameters win
            g["weight_decay"], g["betas"] = wd, a.betas
        self.step = int(state["step"])
        self.epoch, self.index = int(state["data"]["epoch"]), int(state["data"]["index"])
        if int(state["data"]["seed"]) != a.seed:
            warnings.warn(f"seed {a.seed} differs from the checkpoint's {state['data']['seed']}: data order and "
                          "per-step randomness from here on follow the new seed", stacklevel=4)
        if int(state["data"]["dataset_len"]) != self.n_data:
            warnings.warn(f"dataset has {self.n_data} items, the checkpoint's had {state['data']['dataset_len']}: "
                          "the data order after resuming is not the original run's", stacklevel=4)
            if self.index >= self.n_data:
                self.epoch, self.index = self.epoch + 1, 0
        self.elapsed_before = float(state["elapsed_s"])
        self.history = {k: list(state["history"][k]) for k in _HISTORY_KEYS}
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if ctx.rank < len(per_rank):
            _set_rng_state(per_rank[ctx.rank])
        else:  # more ranks than the run had: a fresh, distinct global RNG for this one
            _seed_everything(_derive_seed(a.seed, f"rank{ctx.rank}", self.step))

    # ---- the clock ---------------------------------------------------------------------------
    def start_clock(self) -> None:
        self.t_start = time.monotonic()
        # The clock share is measured once per step, after it: the deadline check and the next
        # step's LR both read it.
        self.share = self.clock_share() if self.a.minutes is not None else 0.0
        self.last_ckpt_step = self.step

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t_start)

    def clock_share(self) -> float:
        """This call's share of its `minutes` budget spent so far, the same on every rank (the
        largest): one scalar all-reduce under torch.distributed."""
        return D.max_over_ranks(self.ctx, (time.monotonic() - self.t_call) / (60.0 * self.a.minutes))

    def run_progress(self) -> float:
        """Fraction of the run done before this step: step / steps and / or this call's share of
        its `minutes` budget, at most 1."""
        p = self.step / self.a.steps if self.a.steps is not None else 0.0
        return min(max(p, self.share), 1.0)

    # ---- the step ----------------------------------------------------------------------------
    def open_stream(self) -> None:
        """The data (a resumable, deterministic stream of full batches), the progress bar, the
        per-step generator, and the buffers of values not yet flushed to `history`."""
        a, ctx, device = self.a, self.ctx, self.device
        loader = torch.utils.data.DataLoader(
            self.dataset, collate_fn=a.collate_fn, num_workers=a.num_workers, pin_memory=device.type == "cuda",
            batch_sampler=D.RankSlicedBatches(_BatchStream(self.n_data, a.batch_size, a.seed, self.epoch,
                                                           self.index), ctx),
            generator=torch.Generator().manual_seed(_derive_seed(a.seed, "loader", self.step)))
        self.batches = iter(loader)
        from tqdm.auto import tqdm
        self.bar = tqdm(total=a.steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=True if not a.progress or not ctx.is_main else None, desc="train")
        self.step_generator = torch.Generator(device=device)
        self.autocast = (torch.autocast(device_type=device.type, dtype=self.amp_dtype)
                         if self.amp_dtype is not None else contextlib.nullcontext())
        # Per-step losses and grad norms stay on the device until a flush (one sync per
        # `log_every` steps instead of one per step).
        self.pending: list[tuple[int, float, float]] = []  # (step, lr, time) not yet flushed
        self.pending_loss: list[torch.Tensor] = []
        self.pending_gnorm: list[torch.Tensor] = []
        # Detached views share storage with the parameters, so the optimizer's in-place updates
        # show through; parameters kept in low precision get an fp32 copy per step instead.
        self.ema_sources = [p.detach() for p in self.params]
        self.ema_sources_fp32 = all(p.dtype == torch.float32 for p in self.params)
        self.smoothed = None
        self.model.train()

    def train_step(self, images, captions) -> None:
        """One optimizer step on one batch, then the EMA; advances step and data position."""
        a, step = self.a, self.step
        images = images.to(self.device, non_blocking=True)
        cur_lr = lr_at(step, a.lr, a.warmup_steps, a.lr_decay, self.run_progress() if a.lr_decay else 0.0)
        for g in self.opt.param_groups:
            g["lr"] = cur_lr
        self.step_generator.manual_seed(_derive_seed(a.seed, "step", step))
        kw = {}
        if self.split and getattr(self.model, "supports_batch_slice", False):
            kw["batch_slice"] = (self.ctx.rank * self.local_batch, a.batch_size)  # draw for the global batch
        elif self.split:
            self.step_generator.manual_seed(_derive_seed(a.seed, f"step/rank{self.ctx.rank}", step))
        with self.autocast:
            loss = self.fwd(images, captions, generator=self.step_generator, **kw)
        _check_loss(loss, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.grad_clip is not None:
            gnorm = nn.utils.clip_grad_norm_(self.params, a.grad_clip)  # a DTensor under FSDP2
            self.pending_gnorm.append(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        self.opt.step()
        with torch.no_grad():
            src = self.ema_sources if self.ema_sources_fp32 else [p.float() for p in self.ema_sources]
            torch._foreach_lerp_(self.ema_list, src, 1.0 - a.ema_decay)
        self.pending_loss.append(loss.detach().float().reshape(()))
        self.step += 1
        self.epoch, self.index = divmod(self.epoch * self.n_data + self.index + a.batch_size, self.n_data)
        self.pending.append((self.step, cur_lr, self.elapsed()))
        self.bar.update(1)

    def end_of_step(self) -> None:
        """Whether to stop (steps, minutes, the callback), history every `log_every` steps, and a
        checkpoint every `ckpt_every` steps and at the end."""
        a = self.a
        if a.steps is not None and self.step >= a.steps:
            self.stopped_by = "steps"
        elif a.minutes is not None:
            self.share = self.clock_share()
            if self.share >= 1.0:
                self.stopped_by = "minutes"
        checkpoint_due = self.stopped_by is not None or self.step % a.ckpt_every == 0
        if len(self.pending) == a.log_every or checkpoint_due:
            if self.flush() and self.stopped_by is None:
                self.stopped_by, checkpoint_due = "callback", True
        if checkpoint_due:
            self.last_ckpt_step = self.save()

    # ---- history -----------------------------------------------------------------------------
    def flush(self) -> bool:
        """Move pending per-step values into `history`; check them; returns the callback's stop request."""
        if not self.pending:
            return False
        a, history, k = self.a, self.history, len(self.pending)
        losses = D.all_reduce_mean(self.ctx, torch.stack(self.pending_loss)).tolist()  # the global batch's mean
        gnorms = torch.stack(self.pending_gnorm).tolist() if self.pending_gnorm else [None] * k
        self.pending_loss.clear()
        self.pending_gnorm.clear()
        for (s, lr_s, t_s), loss_v, gn in zip(self.pending, losses, gnorms):
            if not math.isfinite(loss_v):
                raise FloatingPointError(
                    f"the loss at step {s} is {loss_v}: training stopped. The last good checkpoint "
                    f"(step {self.last_ckpt_step}) is kept at {self.ckpt_path}; lower lr or check the data and model.")
            if a.grad_clip is not None and not math.isfinite(gn):
                raise FloatingPointError(
                    f"the gradient norm at step {s} is {gn} (loss {loss_v:.4g}): training stopped. The last good "
                    f"checkpoint (step {self.last_ckpt_step}) is kept at {self.ckpt_path}.")
            for key, v in zip(_HISTORY_KEYS, (s, loss_v, lr_s, t_s, gn if a.grad_clip is not None else None)):
                history[key].append(v)
            self.smoothed = loss_v if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss_v
        self.pending.clear()
        self.bar.set_postfix(loss=f"{self.smoothed:.4f}", lr=f"{history['lr'][-1]:.2e}", refresh=False)
        if a.callback is not None:
            info = StepInfo(step=history["step"][-1], loss=sum(losses) / k, lr=history["lr"][-1],
                            elapsed_s=history["time"][-1], model=self.model, ema=self.ema)
            return D.any_rank(self.ctx, bool(a.callback(info)))
        return False

    # ---- checkpointing -----------------------------------------------------------------------
    def save(self) -> int:
        """Write the checkpoint of this step (refused if a parameter is not finite) and the
        history; returns the step."""
        ctx, a, model = self.ctx, self.a, self.model
        bad = [name for name, p in self.trainable if not bool(torch.isfinite(D.local_tensor(p)).all())]
        if D.any_rank(ctx, bool(bad)):
            raise FloatingPointError(f"parameters {bad[:5]} are not finite at step {self.step}; checkpoint not "
                                     f"written, the last good one ({self.ckpt_path}) is kept")
        rng_all = D.all_gather_object(ctx, _rng_state()) if ctx.enabled else None
        payload = self._payload()
        if ctx.enabled:
            payload["world_size"] = ctx.world_size
            payload["rng_per_rank"] = rng_all
        if a.fsdp:
            D.save_dcp_checkpoint(ctx, a.out_dir, self.step, model, self.opt, self.ema, payload)
        elif ctx.is_main:
            # frozen parameters and buffers of the EMA state dict share storage with "model"
            payload.update({"model": model.state_dict(), "ema": _ema_state_dict(model, self.ema),
                            "optimizer": self.opt.state_dict()})
            save_checkpoint(payload, self.ckpt_path)
        if ctx.is_main:
            _write_history(self.history, a.out_dir)
        ctx.barrier()
        return self.step

    def _payload(self) -> dict:
        a, step = self.a, self.step
        return {"format": CHECKPOINT_FORMAT, "step": step,
                "data": {"epoch": self.epoch, "index": self.index, "dataset_len": self.n_data, "seed": a.seed},
                "lr_schedule": {"kind": "linear_warmup_stable_decay" if a.lr_decay else "linear_warmup_constant",
                                "base_lr": float(a.lr), "warmup_steps": int(a.warmup_steps),
                                "decay": float(a.lr_decay), "step": step},
                "rng": _rng_state(), "config": self.config,
                "history": {k: list(v) for k, v in self.history.items()},
                "elapsed_s": self.elapsed(), "torch_version": str(torch.__version__),
                "train_args": {"batch_size": a.batch_size, "lr": float(a.lr), "warmup_steps": a.warmup_steps,
                               "lr_decay": float(a.lr_decay), "weight_decay": float(a.weight_decay),
                               "betas": [float(b) for b in a.betas],
                               "grad_clip": None if a.grad_clip is None else float(a.grad_clip),
                               "ema_decay": float(a.ema_decay), "seed": a.seed, "amp": a.amp,
                               "precision": self.precision, "cpu_simd_flags": backend.cpu_simd_flags()}}

    # ---- closing -----------------------------------------------------------------------------
    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def close(self) -> None:
        self.bar.close()
        del self.batches  # shuts down loader workers
        self.model.train(self.was_training)

    def result(self, stopped_by: str) -> TrainResult:
        if stopped_by == "already_done":
            self.model.train(self.was_training)
            elapsed = self.elapsed_before
        else:
            elapsed = self.elapsed()
        return TrainResult(self.model, self.step, self.epoch, self.index, self.history, self.ema, self.a.out_dir,
                           self.ckpt_path, elapsed, stopped_by)


def _check_loss(loss, step: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        got = (f"a {loss.dtype} tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
               else type(loss).__name__)
        raise TypeError(f"model forward at step {step} returned {got}; expected a scalar floating-point "
                        "loss tensor")
    if not loss.requires_grad:
        raise RuntimeError(f"the loss at step {step} does not require grad: no trainable parameter "
                           "contributes to it")
