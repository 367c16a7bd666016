"""Image-caption pairs from a folder (`img.png` + `img.txt`), and the batch collate function."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["ImageCaptionFolder", "collate", "IMAGE_SUFFIXES", "DataError", "decode_image", "read_caption"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# files with these suffixes and a caption next to them are reported as skipped, never silently
_OTHER_IMAGE_SUFFIXES = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".ico", ".psd", ".svg", ".exr", ".raw",
                         ".dng", ".cr2", ".nef", ".ppm", ".pgm", ".tga")


class DataError(ValueError):
    """An image or caption of a data set cannot be read; the message names the file (or shard
    and member)."""


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pillow is needed only here
        raise ImportError("ImageCaptionFolder needs Pillow: pip install pillow") from e
    return Image


_HIGH_BIT_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def _to_tensor(im, size: int | None) -> torch.Tensor:
    """A PIL image -> float32 (3, H, W) in [0, 1], RGB; with `size`, centre-cropped to a square
    and resized to size x size (Lanczos). 16-bit images (modes I;16*, I) are scaled by 1/65535
    instead of being clipped at 255; float images (mode F) are clipped to [0, 1]."""
    Image = _pil()
    if im.mode in _HIGH_BIT_MODES or im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if im.mode != "F":
            arr = arr / _HIGH_BIT_MODES[im.mode]
        im = Image.fromarray(np.clip(arr, 0.0, 1.0).astype(np.float32), mode="F")
    else:
        im = im.convert("RGB")
    if size is not None:
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        if s != size:
            im = im.resize((size, size), Image.LANCZOS)
    if im.mode == "F":
        arr = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
        return torch.from_numpy(np.ascontiguousarray(arr))[None].expand(3, -1, -1).contiguous()
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def decode_image(data, size: int | None, where: str) -> torch.Tensor:
    """Open and fully decode an image (a path or bytes) -> `_to_tensor`; any failure is a
    `DataError` naming `where` (a file, or a shard and member)."""
    import io
    Image = _pil()
    try:
        src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        with Image.open(src) as im:
            im.load()
            return _to_tensor(im, size)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {where}: {type(e).__name__}: {e}") from None


def read_caption(data: bytes, where: str) -> str:
    """Caption bytes -> one line of text: UTF-8 (a BOM is dropped), whitespace collapsed, not
    empty; otherwise a `DataError` naming `where`."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"caption {where} is not UTF-8 text (byte {e.start}: {e.reason}); re-save it as UTF-8") \
            from None
    text = " ".join(text.replace("\ufeff", " ").split())
    if not text:
        raise DataError(f"caption {where} is empty")
    return text


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):
        return False


class ImageCaptionFolder(torch.utils.data.Dataset):
    """`ds[i] -> (image, caption)` from the image files of `root` (sorted by name; suffixes
    IMAGE_SUFFIXES) and, for each, the caption file with the same stem and `.txt`.

    image: float32 (3, H, W) in [0, 1], RGB (16-bit images scaled by 1/65535). size: None keeps
    each image's own size; an int centre-crops to a square and resizes to size x size (Lanczos),
    so batches stack. Captions: UTF-8, a BOM dropped, whitespace collapsed, not empty.

    Everything is checked when the data set is built, so a bad folder fails at once rather than
    in the middle of training (where a resume would fail at the same place again):
    * verify=True (default) decodes every image once (a progress bar with `progress`); a file that
      cannot be read is a `DataError` naming it. on_bad="skip" drops such pairs instead, with one
      warning that counts and names them (`self.skipped` lists them);
    * an image or caption that is a symlink leading outside `root` is refused (or skipped);
    * files of other image formats that have a caption next to them are reported in a warning.
    """

    def __init__(self, root, size: int | None = None, *, verify: bool = True, on_bad: str = "error",
                 progress: bool | None = None):
        if size is not None and (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1):
            raise ValueError(f"size: expected None or an int >= 1, got {size!r}")
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad: expected 'error' or 'skip', got {on_bad!r}")
        if not isinstance(verify, bool):
            raise TypeError(f"verify: expected a bool, got {type(verify).__name__}")
        self.root, self.size = Path(root), None if size is None else int(size)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageCaptionFolder: root folder {str(self.root)!r} does not exist "
                                    f"or is not a folder")
        real_root = self.root.resolve()
        files = sorted(p for p in self.root.iterdir() if p.is_file())
        other = [p for p in files if p.suffix.lower() in _OTHER_IMAGE_SUFFIXES and p.with_suffix(".txt").is_file()]
        if other:
            warnings.warn(f"ImageCaptionFolder: {len(other)} image(s) in a format it does not read were skipped "
                          f"(supported: {', '.join(IMAGE_SUFFIXES)}): {', '.join(p.name for p in other[:5])}"
                          f"{' ...' if len(other) > 5 else ''}", stacklevel=2)
        self.skipped: list[tuple[str, str]] = []   # (file, why) of pairs dropped under on_bad="skip"

        def bad(msg: str, path: Path) -> None:
            if on_bad == "error":
                raise DataError(f"ImageCaptionFolder: {msg}")
            self.skipped.append((str(path), msg))

        self.images, self.captions = [], []
        candidates = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        bar = None
        if verify and candidates:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(candidates), desc="checking images", unit="img",
                       disable=None if progress is None else not progress)
        try:
            for img in candidates:
                if bar is not None:
                    bar.update(1)
                txt = img.with_suffix(".txt")
                if not txt.is_file():
                    raise FileNotFoundError(f"ImageCaptionFolder: image {str(img)!r} has no caption file "
                                            f"{txt.name!r}")
                outside = [p for p in (img, txt) if not _inside(p, real_root)]
                if outside:
                    bad(f"{str(outside[0])!r} is a symlink to {str(outside[0].resolve())!r}, outside the data "
                        "folder (refused)", img)
                    continue
                try:
                    text = read_caption(txt.read_bytes(), repr(str(txt)))
                    if verify:
                        decode_image(img, self.size, repr(str(img)))
                except DataError as e:
                    bad(str(e), img)
                    continue
                self.images.append(img)
                self.captions.append(text)
        finally:
            if bar is not None:
                bar.close()
        if self.skipped:
            warnings.warn(f"ImageCaptionFolder: skipped {len(self.skipped)} of {len(candidates)} pairs that cannot "
                          f"be read (on_bad='skip'): "
                          + "; ".join(why for _, why in self.skipped[:3]) + (" ..." if len(self.skipped) > 3 else ""),
                          stacklevel=2)
        if not self.images:
            raise ValueError(f"ImageCaptionFolder: no {'readable ' if self.skipped else ''}images "
                             f"({', '.join(IMAGE_SUFFIXES)}) in {str(self.root)!r}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> tuple[torch.Tensor, str]:
        path = self.images[index]
        return decode_image(path, self.size, repr(str(path))), self.captions[index]

    def __repr__(self) -> str:
        return f"ImageCaptionFolder({str(self.root)!r}, size={self.size}, n={len(self)})"


def collate(batch) -> tuple[torch.Tensor, list[str]]:
    """[(image (3, H, W), caption), ...] -> (images (B, 3, H, W), [caption, ...])."""
    if not isinstance(batch, (list, tuple)) or not batch:
        raise ValueError(f"collate: batch must be a non-empty list of (image, caption) pairs, got {batch!r:.80}")
    images, captions = [], []
    for i, item in enumerate(batch):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"collate: batch[{i}] must be an (image, caption) pair, got {type(item).__name__}")
        image, text = item
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            raise ValueError(f"collate: batch[{i}] image must be a (C, H, W) tensor, got "
                             f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
        if not isinstance(text, str):
            raise ValueError(f"collate: batch[{i}] caption must be a str, got {type(text).__name__}")
        if image.shape != batch[0][0].shape:
            raise ValueError(f"collate: images differ in shape, batch[0] {tuple(batch[0][0].shape)} vs "
                             f"batch[{i}] {tuple(image.shape)} (give the data set a size to resize to)")
        images.append(image)
        captions.append(text)
    return torch.stack(images), captions
