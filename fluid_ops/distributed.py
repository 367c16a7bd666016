"""Training on several processes: `torchrun` + DDP or FSDP2, and sharded checkpoints.

    torchrun --nproc_per_node 8 -m fluid_ops train --config fluid-166m --data shards/ --batch-size 256 ...
    torchrun --nproc_per_node 8 -m fluid_ops train ... --fsdp          # shard params, grads, AdamW state

`fluid_ops.train` calls `setup()` itself: under torchrun (WORLD_SIZE > 1 in the environment) it
joins the process group (NCCL on CUDA, gloo on CPU), one device per local rank; without it
nothing changes (world size 1, the single-process path as before).

Why N ranks give the run of one rank with N times the per-rank batch (a contract-level promise of
issue 9; to float rounding):
* `batch_size` is the GLOBAL batch. The data stream (one seeded permutation per epoch) is cut
  into global batches exactly as in one process; rank r takes the r-th contiguous slice of each.
  The data position stored in checkpoints is the global one, so a run resumes on any number of
  ranks that divides the global batch;
* every rank seeds its step generator from (seed, step), the same on all ranks, and a model that
  supports it (`Fluid`: `supports_batch_slice = True`) draws its randomness (orders, mask ratio,
  text dropout, diffusion t and noise, flips) for the whole global batch and keeps the rows of
  its slice: rank r sees the draws rows [r*b, (r+1)*b) of the one-process run would see;
* each rank's loss is the mean over its rows, every rank has the same number of rows, and DDP
  / FSDP average gradients over ranks: the mean over the global batch, as in one process. Grad
  clipping then sees the global gradient (under FSDP2 `clip_grad_norm_` reduces the DTensor
  shards' norms), and AdamW, the LR schedule and the EMA are per global step.

FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block, then the root, is
sharded over all ranks; the frozen text encoder and the VAE hold no parameters of the model
(they live outside its state) and are not sharded: every rank keeps a full replica. The EMA is
kept as DTensors sharded like the parameters. Checkpoints under FSDP are written with
`torch.distributed.checkpoint` (every rank writes its shards) into a fresh folder
`ckpt-<step>.dcp/`, which becomes current only when the pointer file `checkpoint.dcp.latest` is
atomically replaced, after every rank finished and rank 0 recorded the sha256 of every file of
the folder. A kill at any moment leaves the previous folder and pointer intact.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "setup", "context", "wrap_model", "rank_slice", "all_gather_object",
           "DCP_POINTER", "save_dcp_checkpoint", "load_dcp_checkpoint", "latest_dcp_dir", "consolidate"]

DCP_POINTER = "checkpoint.dcp.latest"
_META = "meta.pt"
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def context() -> DistContext:
    """The current process group's rank / world size (world size 1 when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistContext()


def setup(device=None, *, fsdp: bool = False) -> tuple[DistContext, torch.device | None]:
    """Join the torchrun process group if the environment asks for one (WORLD_SIZE > 1; with
    `fsdp` also a torchrun group of 1 process, e.g. to resume an FSDP run on one rank).
    Returns (context, device): on CUDA each local rank gets `cuda:LOCAL_RANK`. Idempotent."""
    want = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (fsdp and "WORLD_SIZE" in os.environ)
    if want and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("WORLD_SIZE is set but MASTER_ADDR is not: launch with torchrun "
                               "(torchrun --nproc_per_node N -m fluid_ops train ...)")
        use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=int(os.environ.get(
            "FLUID_OPS_DIST_TIMEOUT_MIN", "30"))))
    ctx = context()
    if ctx.enabled and device is None:
        device = torch.device(f"cuda:{ctx.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    elif ctx.enabled and torch.device(device).type == "cuda" and torch.device(device).index is None:
        device = torch.device(f"cuda:{ctx.local_rank}")
    return ctx, device


def all_gather_object(ctx: DistContext, obj):
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (SUM / world: gloo has no AVG)."""
    if not ctx.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / ctx.world_size


def any_rank(ctx: DistContext, flag: bool) -> bool:
    if not ctx.enabled:
        return flag
    return max_over_ranks(ctx, 1.0 if flag else 0.0) > 0


def max_over_ranks(ctx: DistContext, x: float) -> float:
    """The largest of every rank's x (x itself without a process group)."""
    if not ctx.enabled:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_slice(batch: list, ctx: DistContext) -> list:
    """Rank r's contiguous slice of a global batch (len divisible by the world size)."""
    b = len(batch) // ctx.world_size
    return batch[ctx.rank * b:(ctx.rank + 1) * b]


class RankSlicedBatches:
    """Batch sampler: each global batch of `stream` cut to this rank's slice."""

    def __init__(self, stream, ctx: DistContext):
        self.stream, self.ctx = stream, ctx

    def __iter__(self):
        for batch in self.stream:
            yield rank_slice(batch, self.ctx)


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    """Submodules to shard one by one (so only one block's parameters are gathered at a time):
    the blocks of every `Transformer` (fluid_ops.nn.transformer), the diffusion head's net."""
    from fluid_ops.nn.transformer import Transformer
    units = []
    for m in model.modules():
        if isinstance(m, Transformer):
            units.extend(m.blocks)
    head = getattr(model, "head", None)
    head = getattr(head, "net", head)  # Fluid calls head.net(...) directly: shard what is called
    if isinstance(head, nn.Module) and any(p.requires_grad for p in head.parameters()):
        units.append(head)
    return units


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device, *, fsdp: bool,
               amp_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP (default) or FSDP2 around `model` (already on `device`). Returns the module to call;
    under FSDP2 it is `model` itself (sharded in place), under DDP the wrapper."""
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (ctx.world_size,))
        for unit in _fsdp_units(model):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    # a model whose forward leaves some trainable parameter out of the loss (Fluid without text
    # dropout never uses its null embedding) says so: DDP then looks for unused ones every step
    unused = bool(getattr(model, "ddp_find_unused_parameters", False))
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=unused)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (or the tensor itself)."""
    return t.to_local() if hasattr(t, "to_local") else t


# ---- checkpoints under FSDP: torch.distributed.checkpoint -----------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def latest_dcp_dir(out_dir: Path) -> Path | None:
    """The folder `checkpoint.dcp.latest` points to (None if there is no pointer)."""
    pointer = Path(out_dir) / DCP_POINTER
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        from fluid_ops.checkpoint import CheckpointError
        raise CheckpointError(f"{pointer}: does not name a checkpoint folder (got {name!r})")
    return Path(out_dir) / name


def verify_dcp_dir(folder: Path) -> dict:
    """Checks every file of `folder` against its manifest (sha256 + size); returns the manifest."""
    from fluid_ops.checkpoint import CheckpointError
    manifest_path = folder / _MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"refusing checkpoint {folder}: the folder does not exist")
    if not manifest_path.exists():
        raise CheckpointError(f"refusing checkpoint {folder}: no {_MANIFEST} (the write never finished)")
    manifest = json.loads(manifest_path.read_text())
    for name, (size, sha) in manifest["files"].items():
        p = folder / name
        if not p.exists():
            raise CheckpointError(f"refusing checkpoint {folder}: file {name} is missing")
        if p.stat().st_size != size:
            raise CheckpointError(f"refusing checkpoint {folder}: file {name} has {p.stat().st_size} bytes, "
                                  f"the manifest says {size} (truncated or modified)")
        if _sha256(p) != sha:
            raise CheckpointError(f"refusing checkpoint {folder}: file {name} does not match its sha256 "
                                  "(corrupted or modified)")
    return manifest


# ---- reading DCP folders without running code from them ----------------------------------------
# torch.distributed.checkpoint reads `.metadata` with a plain `pickle.load` and every non-tensor
# value ("bytes" items: optimizer hyper-parameters, ints) with `torch.load(weights_only=False)`:
# a run folder written by someone else could run code on `consolidate` or an FSDP resume, and a
# manifest does not help (whoever writes the files writes their sha256 too). Both readers below
# are used instead of torch's: the metadata goes through an allow-list unpickler, bytes items
# through `torch.load(weights_only=True)`.
_DCP_META_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint._extension": {"StreamTransformExtension"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex"},
}


def _restricted_unpickler():
    import pickle

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if name in _DCP_META_ALLOWED.get(module, ()):
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format,
                                                                               torch.layout)):
                return getattr(torch, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
    return _Unpickler


def read_dcp_metadata(path):
    """`torch.distributed.checkpoint`'s `.metadata` file, unpickled with an allow-list of the DCP
    metadata classes (no code can run); raises `CheckpointError` for anything else."""
    import pickle
    from torch.distributed.checkpoint.metadata import Metadata
    from fluid_ops.checkpoint import CheckpointError
    try:
        with open(path, "rb") as f:
            md = _restricted_unpickler()(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
        raise CheckpointError(f"refusing checkpoint metadata {path}: {e} (only torch.distributed.checkpoint "
                              "metadata classes are read; nothing was executed)") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"refusing checkpoint metadata {path}: expected a DCP Metadata, got "
                              f"{type(md).__name__}")
    return md


def _safe_reader(folder):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md = read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md
    return SafeFileSystemReader(str(folder))


def _weights_only_load_bytes(self, read_item, value) -> None:
    from torch.distributed.checkpoint._traverse import set_element
    obj = torch.load(value, weights_only=True)
    if getattr(self, "flatten_state_dict", False):
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def _safe_planner(empty: bool = False):
    if empty:
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner as Base
    else:
        from torch.distributed.checkpoint import DefaultLoadPlanner as Base

    class SafeLoadPlanner(Base):
        load_bytes = _weights_only_load_bytes
    return SafeLoadPlanner()


def _state_dicts(model, opt, ema) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "ema": ema}


def save_dcp_checkpoint(ctx: DistContext, out_dir: Path, step: int, model, opt, ema: dict, meta: dict,
                        keep: int = 2) -> Path:
    """All ranks: write model / optimizer / EMA (sharded DTensors) with
    torch.distributed.checkpoint into `out_dir/ckpt-<step>.dcp`, rank 0 adds `meta.pt` (an
    ordinary sha256-verified fluid_ops checkpoint: step, data position, RNG of every rank,
    config, history) and the manifest, then switches the pointer; folders beyond the newest
    `keep` are removed."""
    import torch.distributed.checkpoint as dcp
    from fluid_ops.checkpoint import save_checkpoint
    out_dir = Path(out_dir)
    folder = out_dir / f"ckpt-{step:08d}.dcp"
    if ctx.is_main and folder.exists():  # a killed earlier write of the same step, never pointed to
        current = latest_dcp_dir(out_dir)
        if current is None or current.name != folder.name:
            shutil.rmtree(folder)
    ctx.barrier()
    dcp.save(_state_dicts(model, opt, ema), checkpoint_id=str(folder))
    if ctx.is_main:
        save_checkpoint(meta, folder / _META, keep_previous=False)
        files = {p.name: (p.stat().st_size, _sha256(p)) for p in sorted(folder.iterdir()) if p.is_file()}
        tmp = folder / f".{_MANIFEST}.tmp"
        tmp.write_text(json.dumps({"step": step, "files": files}))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / _MANIFEST)
        ptmp = out_dir / f".{DCP_POINTER}.tmp"
        ptmp.write_text(folder.name)
        with open(ptmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(ptmp, out_dir / DCP_POINTER)
        old = sorted(out_dir.glob("ckpt-*.dcp"))
        for p in old[:-keep] if keep > 0 else []:
            if p.name != folder.name:
                shutil.rmtree(p, ignore_errors=True)
    ctx.barrier()
    return folder


def load_dcp_meta(folder: Path) -> dict:
    from fluid_ops.checkpoint import load_checkpoint
    verify_dcp_dir(folder)
    return load_checkpoint(folder / _META)


def load_dcp_checkpoint(folder: Path, model, opt, ema: dict) -> None:
    """All ranks: load model, optimizer and EMA (in place, current sharding) from `folder`,
    resharded by torch.distributed.checkpoint for any number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    read_dcp_metadata(Path(folder) / ".metadata")  # a clear CheckpointError before DCP wraps it
    sd = _state_dicts(model, opt, ema)
    dcp.load(sd, storage_reader=_safe_reader(folder), planner=_safe_planner())
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def consolidate(run_dir, out=None) -> Path:
    """An FSDP run folder -> one ordinary `checkpoint.pt` (model, EMA, config, step, history;
    no optimizer) that `fluid-ops generate` / `load_ema` read. Runs in one process, no GPU."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    from fluid_ops.checkpoint import save_checkpoint
    run_dir = Path(run_dir)
    folder = latest_dcp_dir(run_dir)
    if folder is None:
        raise FileNotFoundError(f"{run_dir}: no {DCP_POINTER} (not an FSDP run folder)")
    meta = load_dcp_meta(folder)
    out = Path(out) if out is not None else run_dir / "checkpoint.pt"
    read_dcp_metadata(folder / ".metadata")  # a clear CheckpointError before DCP wraps it
    full: dict = {}
    _load_state_dict(full, storage_reader=_safe_reader(folder), planner=_safe_planner(empty=True), no_dist=True)
    model_sd = dict(full["model"])
    ema = dict(model_sd)
    ema.update(full["ema"])
    payload = {k: v for k, v in meta.items() if k not in ("rng_per_rank",)}
    payload.update({"model": model_sd, "ema": ema, "optimizer": None, "consolidated_from": folder.name})
    save_checkpoint(payload, out)
    return out


def warn_once(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)
