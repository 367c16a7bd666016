"""Checkpoint files that are written atomically and verified on load.

File layout (one file, no sidecar)::

    bytes 0..15    MAGIC  b"fluid_ops-ckpt\\n\\x01"  (format version in the last byte)
    bytes 16..23   payload length, uint64 little-endian
    bytes 24..55   sha256 of the payload
    bytes 56..     payload: the bytes of `torch.save(obj)`

Writing (`save_checkpoint`):
1. the payload streams into a temporary file in the destination folder, hashed as it goes (no
   second copy in memory); the header is written last, so an interrupted write leaves a file
   whose header is all zeros and that no loader accepts;
2. flush + fsync the temporary file;
3. the current `checkpoint.pt` (if its header and size look whole) is hard-linked (copied where
   links are not supported) to a temporary name and renamed onto `checkpoint.prev.pt`: at every
   instant both names hold a complete file;
4. `os.replace(temporary, checkpoint.pt)`, then fsync the folder so the renames are durable.
A write that fails or is killed at any point leaves the last good `checkpoint.pt` in place; the
temporary file is removed on failure (or by `remove_stale_temporaries` after a kill).

Loading (`load_checkpoint`) checks the magic, the length and the sha256 before unpickling, and
unpickles with `torch.load(weights_only=True)` (payloads hold only tensors, dicts, lists,
tuples, numbers, strings and None). A truncated, extended or modified file raises
`CheckpointError` naming the file and the previous checkpoint to fall back to.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
           "previous_path", "remove_stale_temporaries", "MAGIC", "HEADER_SIZE", "RunLock", "RunInUseError",
           "LOCK_NAME", "refuse_overwriting_run_file"]

MAGIC = b"fluid_ops-ckpt\n\x01"
_LENGTH = struct.Struct("<Q")
HEADER_SIZE = len(MAGIC) + _LENGTH.size + 32
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, modified or not a fluid_ops checkpoint."""


def previous_path(path: str | os.PathLike) -> Path:
    """`.../checkpoint.pt` -> `.../checkpoint.prev.pt`: where the previous good checkpoint is kept."""
    p = Path(path)
    return p.with_name(f"{p.stem}.prev{p.suffix}")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed `save_checkpoint(path)` left behind; returns what it removed."""
    p = Path(path)
    removed = []
    if p.parent.is_dir():
        for q in p.parent.glob(_temp_prefix(p) + "*.tmp"):
            try:
                q.unlink()
                removed.append(q)
            except OSError:
                pass
    return removed


# ---- one writer per run folder -------------------------------------------------------------
LOCK_NAME = ".lock"
# what a training run folder holds besides checkpoints: a command writing a report or an image
# never writes over one of these
_RUN_FILES = ("history.json", "loss.png", LOCK_NAME, "checkpoint.dcp.latest")


class RunInUseError(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive `fcntl.flock` on `<folder>/.lock` (the file holds the holder's pid), held until
    `release()`; a second lock on the same folder, from any process, fails at once with
    `RunInUseError` naming that pid. The kernel drops the lock when the holder dies (kill -9
    included), so a stale `.lock` file never blocks a later run."""

    def __init__(self, folder: str | os.PathLike, what: str = "training run"):
        import fcntl
        self.path = Path(folder) / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(self._fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(self._fd)
                self._fd = None
            raise RunInUseError(f"{Path(folder)} is in use by another {what} (pid {holder}, lock {self.path}); "
                                "wait for it to finish or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            import fcntl
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def _is_checkpoint_file(p: Path) -> bool:
    if p.suffix == ".pt" or p.name.endswith(".dcp") or p.name.startswith("ckpt-"):
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError:
        return False
    return head == MAGIC or head[:2] == b"PK"  # a fluid_ops checkpoint, or a torch.save zip


def refuse_overwriting_run_file(path: str | os.PathLike, arg: str = "--out") -> None:
    """Raise `FileExistsError` when `path` is a checkpoint (a `.pt` file, a DCP folder, anything
    with a checkpoint header), a run folder's own file (history.json, loss.png, .lock, the DCP
    pointer) or a folder: commands that write a report or an image never replace those."""
    p = Path(path)
    if p.is_dir():
        raise FileExistsError(f"{arg}: {p} is a folder; give a file name")
    if p.name in _RUN_FILES or (p.parent / LOCK_NAME).exists() and p.name.startswith("checkpoint"):
        raise FileExistsError(f"{arg}: {p} is a file of a training run folder; refusing to overwrite it")
    if _is_checkpoint_file(p) and (p.exists() or p.suffix == ".pt"):
        raise FileExistsError(f"{arg}: {p} is (or is named like) a checkpoint; refusing to overwrite it, "
                              "choose another file")


class _HashingWriter:
    """File-like object for `torch.save`: writes through to `f`, hashing and counting bytes."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        n = self.f.write(data)
        self.size += len(data)
        return n

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable (POSIX); not possible on Windows, where os.replace is
    # already as durable as the platform offers.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _looks_whole(path: Path) -> bool:
    """Cheap check (header + size, no hashing) that `path` is a completely written checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < HEADER_SIZE or head[:len(MAGIC)] != MAGIC:
        return False
    (length,) = _LENGTH.unpack_from(head, len(MAGIC))
    return size == HEADER_SIZE + length


_PLAIN = (str, int, float, bool, type(None), torch.dtype)


def _check_payload(obj: Any, where: str = "payload") -> None:
    """Refuse, at write time, anything `torch.load(weights_only=True)` would refuse at load time."""
    if isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, dict) and type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in _PLAIN:
                raise TypeError(f"checkpoint {where}: key {k!r} of type {type(k).__name__}; keys must be "
                                "str, int, float, bool or None")
            _check_payload(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_payload(v, f"{where}[{i}]")
    elif type(obj) not in _PLAIN:
        raise TypeError(f"checkpoint {where}: {type(obj).__module__}.{type(obj).__qualname__} cannot be loaded "
                        "with torch.load(weights_only=True); keep payloads to tensors, dicts, lists, tuples, "
                        "numbers, strings and None")


def _write_payload(obj: Any, f) -> None:
    """Writes header placeholder + payload + real header into the open file `f`; fsyncs it."""
    f.write(b"\0" * HEADER_SIZE)
    w = _HashingWriter(f)
    torch.save(obj, w)
    f.flush()
    f.seek(0)
    f.write(MAGIC + _LENGTH.pack(w.size) + w.sha.digest())
    f.flush()
    os.fsync(f.fileno())


def _keep_previous(path: Path) -> None:
    """Makes `checkpoint.prev.pt` a copy of the current `checkpoint.pt`, atomically, leaving
    `checkpoint.pt` in place."""
    prev = previous_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(path, tmp)          # instant, no extra disk space
        except OSError:                 # filesystems without hard links
            shutil.copyfile(path, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, prev)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(obj: Any, path: str | os.PathLike, *, keep_previous: bool = True) -> Path:
    """Atomically write `obj` (tensors, dicts, lists, numbers, strings) to `path`.

    With `keep_previous`, the file `path` held before becomes `previous_path(path)`
    (`checkpoint.prev.pt`). Returns `path`. See the module docstring for the guarantees."""
    path = Path(path)
    _check_payload(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _write_payload(obj, f)
        if keep_previous and path.exists():
            if _looks_whole(path):
                _keep_previous(path)
            else:
                warnings.warn(f"{path} is incomplete or not a fluid_ops checkpoint; it is replaced "
                              f"without being kept as {previous_path(path).name}", stacklevel=2)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _refuse(path: Path, problem: str) -> CheckpointError:
    prev = previous_path(path)
    if path.name == prev.name or path.stem.endswith(".prev"):
        hint = "no earlier checkpoint is kept"
    elif prev.exists():
        hint = (f"the previous checkpoint is {prev}: to resume from it, "
                f"copy it over the bad one (cp {prev} {path})")
    else:
        hint = f"there is no previous checkpoint ({prev} does not exist)"
    return CheckpointError(f"refusing checkpoint {path}: {problem}; {hint}")


class _PayloadView(io.RawIOBase):
    """Read-only view of bytes [start, start+length) of an open file, as its own seekable file,
    so `torch.load` reads the payload in place (no copy of a multi-GB checkpoint in memory)."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf):
        n = max(0, min(len(buf), self.length - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buf)[:n])
        self.pos += got
        return got


def _open_verified(path: Path):
    """Opens `path`, checks header, length and sha256; returns (file, payload length)."""
    if not path.exists():
        raise _refuse(path, "the file does not exist")
    f = open(path, "rb")
    try:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            raise _refuse(path, f"the file is truncated ({size} bytes, shorter than the "
                                f"{HEADER_SIZE}-byte header)")
        if head[:len(MAGIC)] != MAGIC:
            if head[:len(MAGIC)] == b"\0" * len(MAGIC):
                raise _refuse(path, "the header is empty: the write of this file never finished")
            raise _refuse(path, "it does not start with the fluid_ops checkpoint header "
                                "(not a fluid_ops checkpoint, or its first bytes were modified)")
        (length,) = _LENGTH.unpack_from(head, len(MAGIC))
        expected_sha = head[len(MAGIC) + _LENGTH.size:]
        if size != HEADER_SIZE + length:
            what = "truncated" if size < HEADER_SIZE + length else "longer than written"
            raise _refuse(path, f"the file is {what} ({size} bytes, the header says "
                                f"{HEADER_SIZE + length})")
        sha = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
        if sha.digest() != expected_sha:
            raise _refuse(path, f"its sha256 {sha.hexdigest()[:16]}... does not match the "
                                f"{expected_sha.hex()[:16]}... recorded when it was written "
                                "(the file was corrupted or modified)")
        return f, length
    except BaseException:
        f.close()
        raise


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raises `CheckpointError` unless `path` is a complete, unmodified checkpoint."""
    f, _ = _open_verified(Path(path))
    f.close()


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> Any:
    """Verify and load a checkpoint written by `save_checkpoint` (`torch.load(weights_only=True)`).

    A folder is read as `folder/checkpoint.pt`. Raises `CheckpointError` (naming the file and the
    previous checkpoint) for a truncated, modified or foreign file."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    f, length = _open_verified(path)
    with f:
        try:
            return torch.load(io.BufferedReader(_PayloadView(f, HEADER_SIZE, length)),
                              map_location=map_location, weights_only=True)
        except Exception as e:  # hash matched, so the writer stored something unloadable
            raise CheckpointError(f"checkpoint {path} passed its integrity check but could not be "
                                  f"loaded with torch.load(weights_only=True): {e}") from e
