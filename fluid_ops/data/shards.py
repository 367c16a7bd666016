"""WebDataset tar shards, read with random access so training can resume anywhere.

A shard is a plain tar in the WebDataset layout: the members of one sample share a key
(`000000123.png`, `000000123.txt`; the key is the member name up to its first dot), and a
sample's members are adjacent. Two kinds of shards are read:

* image-caption shards (any WebDataset writer): an image member (`png`, `jpg`, `jpeg`, `webp`,
  `bmp`) and a caption member (`txt`) per sample -> items `(image (3, H, W) in [0, 1], caption)`;
* prepared shards (`fluid-ops prepare`, a `prepared.json` beside them): `tokens.npy` (views, L,
  C) cached VAE latents or pixel patches, `text.npy` (n, D) the frozen text encoder's output,
  `txt` the caption -> items `(tokens, text)`, batched by `collate` into `PreparedTokens` /
  `PreparedText`, which `Fluid.forward` takes in place of images and captions.

Why not WebDataset's streaming pipeline: the training loop (`fluid_ops.train`) orders data as
one seeded permutation per epoch over a map-style data set and stores the position in it, which
is what makes resume exact on any number of ranks and workers. So this reader indexes every
shard once (tar headers only; member offsets and sizes) and reads a sample by seeking to it.
Each index appears once per epoch in the permutation and the loop gives each rank a disjoint
slice of each global batch (DataLoader workers take whole batches), so every sample is read
exactly once per epoch across ranks and workers, with no duplicates and none skipped.

Broken data fails when the data set is built, naming the file: a truncated or corrupt shard
(tar error, a member running past the end of the file, or no end-of-archive blocks), a sample
without its caption or image.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch

from fluid_ops.nn.prepared import PreparedText, PreparedTokens

__all__ = ["ShardError", "ShardDataset", "write_shards", "list_shards", "IMAGE_EXTS", "PREPARED_META"]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
PREPARED_META = "prepared.json"
_BLOCK = 512


class ShardError(ValueError):
    """A shard is truncated, corrupt, or a sample in it lacks a member."""


def list_shards(source) -> list[Path]:
    """A folder (its `*.tar`, sorted), one `.tar` file, or a list of them -> shard paths."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        p = Path(source)
        if p.is_dir():
            paths = sorted(p.glob("*.tar"))
            if not paths:
                raise FileNotFoundError(f"no .tar shards in folder {str(p)!r}")
        else:
            paths = [p]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"shard {str(p)!r} does not exist")
    return paths


def _split(name: str) -> tuple[str, str]:
    """'dir/000123.tokens.npy' -> ('dir/000123', 'tokens.npy') (WebDataset's key convention)."""
    folder, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{folder}/{key}" if folder else key), ext.lower()


def _index_shard(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (offset, size)}), ...] in file order, from the tar headers."""
    size = path.stat().st_size
    samples: list[tuple[str, dict]] = []
    end = 0
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    raise ShardError(f"shard {str(path)!r} is truncated: member {m.name!r} needs bytes up to "
                                     f"{m.offset_data + m.size}, the file has {size}")
                key, ext = _split(m.name)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (m.offset_data, m.size)
                end = m.offset_data + -(-m.size // _BLOCK) * _BLOCK
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"shard {str(path)!r} is truncated or not a tar file: {e}") from e
    if size < end + 2 * _BLOCK:  # a complete tar ends with two zero blocks after the last member
        raise ShardError(f"shard {str(path)!r} is truncated: it ends {size - end} bytes after its last member "
                         f"(a complete tar has {2 * _BLOCK} bytes of end-of-archive blocks there)")
    if not samples:
        raise ShardError(f"shard {str(path)!r} holds no samples")
    return samples


class ShardDataset(torch.utils.data.Dataset):
    """`ds[i]` over the samples of WebDataset tar shards (see the module docstring).

    source: a folder of `*.tar` (and, for prepared shards, `prepared.json`), a `.tar` file, or
    a list of them. size: image-caption shards only, as in `ImageCaptionFolder` (None keeps each
    image's own size; an int centre-crops and resizes to size x size)."""

    def __init__(self, source, size: int | None = None, *, verify: bool = False, on_bad: str = "error",
                 progress: bool | None = None):
        """verify=True decodes every sample once now (a bar with `progress`), so a member that
        cannot be read is a `ShardError` naming shard and member before training starts; without
        it the same error comes when the sample is read. on_bad="skip" instead reads the next
        readable sample in its place, with one warning per bad sample naming it (`skipped` counts
        them in this process): the same substitution on every read, so a resumed run sees the
        data the interrupted one saw instead of dying where it died."""
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad: expected 'error' or 'skip', got {on_bad!r}")
        self.on_bad = on_bad
        self.skipped: dict[int, str] = {}   # index -> why, for samples replaced under on_bad="skip"
        self.paths = list_shards(source)
        folder = self.paths[0].parent
        self.meta = None
        if not isinstance(source, (list, tuple)) and (Path(source) / PREPARED_META).is_file():
            self.meta = json.loads((Path(source) / PREPARED_META).read_text())
        self.size = size
        self.keys: list[str] = []
        self._where: list[tuple[int, dict]] = []
        kind = None
        for si, path in enumerate(self.paths):
            for key, members in _index_shard(path):
                k = "prepared" if "tokens.npy" in members else "images"
                if kind is None:
                    kind = k
                elif k != kind:
                    raise ShardError(f"shard {str(path)!r}: sample {key!r} is {k}, earlier samples are {kind}: "
                                     "one data set holds one kind of sample")
                need = ("tokens.npy", "text.npy") if k == "prepared" else ("txt",)
                for ext in need:
                    if ext not in members:
                        what = "caption" if ext == "txt" else ext
                        raise ShardError(f"shard {str(path)!r}: sample {key!r} has no {what} member "
                                         f"({key}.{ext}); it has {sorted(members)}")
                if k == "images" and not any(e in members for e in IMAGE_EXTS):
                    raise ShardError(f"shard {str(path)!r}: sample {key!r} has no image member "
                                     f"({'/'.join(IMAGE_EXTS)}); it has {sorted(members)}")
                self.keys.append(key)
                self._where.append((si, members))
        self.kind = kind
        self.prepared = kind == "prepared"
        if self.meta is not None and self.meta.get("n") not in (None, len(self.keys)):
            raise ShardError(f"{str(folder)!r}: {PREPARED_META} says {self.meta['n']} samples, the shards hold "
                             f"{len(self.keys)} (a shard is missing or was not finished)")
        self._files: dict[int, object] = {}
        self._pid = None
        if verify:
            from tqdm.auto import tqdm
            for i in tqdm(range(len(self.keys)), desc="checking shards", unit="sample",
                          disable=None if progress is None else not progress):
                self[i]

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):  # DataLoader workers open their own file handles
        d = dict(self.__dict__)
        d["_files"], d["_pid"] = {}, None
        return d

    def _read(self, si: int, where: tuple[int, int]) -> bytes:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(si)
        if f is None:
            f = self._files[si] = open(self.paths[si], "rb")
        offset, size = where
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ShardError(f"shard {str(self.paths[si])!r} is truncated (changed since it was indexed)")
        return data

    def member(self, index: int, ext: str) -> bytes:
        si, members = self._where[index]
        return self._read(si, members[ext])

    def _member_name(self, index: int, ext: str) -> str:
        si, _ = self._where[index]
        return f"{self.keys[index]}.{ext} of shard {str(self.paths[si])!r}"

    def caption(self, index: int) -> str:
        from fluid_ops.data.folder import DataError, read_caption
        try:
            return read_caption(self.member(index, "txt"), self._member_name(index, "txt"))
        except DataError as e:
            raise ShardError(str(e)) from None

    def __getitem__(self, index):
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index: expected an int, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a ShardDataset of {len(self)} samples")
        index = int(index) % len(self)
        if self.on_bad == "error":
            return self._sample(index)
        for i in (index + j for j in range(len(self))):
            i %= len(self)
            try:
                return self._sample(i)
            except (ShardError, ValueError, OSError) as e:
                if i not in self.skipped:
                    self.skipped[i] = str(e)
                    warnings.warn(f"on_bad='skip': {e}; the next readable sample is read in its place", stacklevel=2)
        raise ShardError(f"no sample of the {len(self.paths)} shard(s) can be read (on_bad='skip')")

    def _sample(self, index: int):
        if self.prepared:
            tokens = torch.from_numpy(np.load(io.BytesIO(self.member(index, "tokens.npy")), allow_pickle=False))
            text = torch.from_numpy(np.load(io.BytesIO(self.member(index, "text.npy")), allow_pickle=False))
            return tokens, text
        from fluid_ops.data.folder import DataError, decode_image
        _, members = self._where[index]
        ext = next(e for e in IMAGE_EXTS if e in members)
        try:
            image = decode_image(self.member(index, ext), self.size, self._member_name(index, ext))
        except DataError as e:
            raise ShardError(str(e)) from None
        return image, self.caption(index)

    def collate(self, items):
        """Prepared shards: [(tokens, text), ...] -> (PreparedTokens, PreparedText); image-caption
        shards: `fluid_ops.data.collate`."""
        if not self.prepared:
            from fluid_ops.data.folder import collate
            return collate(items)
        return PreparedTokens(torch.stack([t for t, _ in items]).float()), \
            PreparedText.collate([e.float() for _, e in items])

    collate_fn = collate

    def check_model_config(self, config) -> None:
        """Prepared shards: refuse a model whose tokenizer / image size / text encoder differ
        from what the cache was prepared with (ValueError naming the fields)."""
        if not self.prepared or self.meta is None:
            return
        import dataclasses

        from fluid_ops.nn.text import is_hash_spec
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        meta = self.meta["model"]
        # a word-hash encoder has no layers (build_text_encoder ignores `layer` for it), so its
        # text_layer names nothing the cache depends on
        hashed = is_hash_spec(meta.get("text_encoder")) and is_hash_spec(cfg.get("text_encoder"))
        ignored = {"text_layer"} if hashed else set()
        diffs = [f"{k}: cache {v!r}, model {cfg.get(k)!r}" for k, v in meta.items()
                 if k not in ignored and cfg.get(k) != v]
        if diffs:
            raise ValueError(f"the prepared data in {str(self.paths[0].parent)!r} was encoded for another model "
                             f"({'; '.join(diffs)}): prepare it again for this config")

    def __repr__(self) -> str:
        return f"ShardDataset({len(self.paths)} shards, n={len(self)}, kind={self.kind})"


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def write_shards(samples, out_dir, *, samples_per_shard: int = 1000, prefix: str = "shard", first_shard: int = 0,
                 stride: int = 1):
    """Write `samples` (an iterable of dicts {"__key__": str, ext: bytes | str | np.ndarray})
    into `out_dir/prefix-000000.tar`, ... in the WebDataset layout (with `webdataset.TarWriter`
    when installed, else the standard library's tarfile: the same format). Each shard is written
    to a temporary name and renamed when complete. Shard numbers go first_shard, first_shard +
    stride, ... (several writers can fill one folder). Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, shard_no, count, writer, tmp, f = [], first_shard, 0, None, None, None

    def close():
        nonlocal writer, f, tmp
        if writer is not None:
            writer.close()
            if not f.closed:
                f.close()
            final = out / f"{prefix}-{shard_no:06d}.tar"
            os.replace(tmp, final)
            written.append(final)
            writer = f = tmp = None

    try:
        for sample in samples:
            if writer is None:
                tmp = out / f".{prefix}-{shard_no:06d}.tar.tmp"
                f = open(tmp, "wb")
                writer = _TarWriter(f)
            enc = {"__key__": sample["__key__"]}
            for k, v in sample.items():
                if k != "__key__":
                    enc[k] = _npy(v) if isinstance(v, np.ndarray) else v.encode("utf-8") if isinstance(v, str) else v
            writer.write(enc)
            count += 1
            if count == samples_per_shard:
                close()
                count, shard_no = 0, shard_no + stride
        close()
    finally:
        if f is not None and not f.closed:
            f.close()
        if tmp is not None and Path(tmp).exists():
            Path(tmp).unlink()
    return written


class _TarWriter:
    """webdataset.TarWriter when installed (raw bytes, no re-encoding), else tarfile."""

    def __init__(self, f):
        try:
            import webdataset
        except ImportError:
            webdataset = None
        self.f = f
        if webdataset is not None:
            self.w = webdataset.TarWriter(f, encoder=False, mtime=0.0)
            self.tf = None
        else:
            self.w = None
            self.tf = tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT)

    def write(self, sample: dict):
        if self.w is not None:
            self.w.write(sample)
            return
        key = sample["__key__"]
        for ext, data in sample.items():
            if ext == "__key__":
                continue
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self.tf.addfile(info, io.BytesIO(data))

    def close(self):
        if self.w is not None:
            self.w.close()
        else:
            self.tf.close()
