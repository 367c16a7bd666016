"""Image-caption pairs from a folder (`img.png` + `img.txt`), and the batch collate function."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["ImageCaptionFolder", "collate", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pillow is needed only here
        raise ImportError("ImageCaptionFolder needs Pillow: pip install pillow") from e
    return Image


def _to_tensor(im, size: int | None) -> torch.Tensor:
    """A PIL image -> float32 (3, H, W) in [0, 1], RGB; with `size`, centre-cropped to a square
    and resized to size x size (Lanczos)."""
    Image = _pil()
    im = im.convert("RGB")
    if size is not None:
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        if s != size:
            im = im.resize((size, size), Image.LANCZOS)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class ImageCaptionFolder(torch.utils.data.Dataset):
    """`ds[i] -> (image, caption)` from the image files of `root` (sorted by name; suffixes
    IMAGE_SUFFIXES) and, for each, the caption file with the same stem and `.txt`.

    image: float32 (3, H, W) in [0, 1], RGB. size: None keeps each image's own size; an int
    centre-crops to a square and resizes to size x size (Lanczos), so batches stack.
    Captions are read (and checked: present, not empty) when the data set is built, so a bad
    folder fails at once rather than in the middle of training.
    """

    def __init__(self, root, size: int | None = None):
        if size is not None and (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1):
            raise ValueError(f"size: expected None or an int >= 1, got {size!r}")
        self.root, self.size = Path(root), None if size is None else int(size)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageCaptionFolder: root folder {str(self.root)!r} does not exist "
                                    f"or is not a folder")
        self.images = sorted(p for p in self.root.iterdir()
                             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise ValueError(f"ImageCaptionFolder: no images ({', '.join(IMAGE_SUFFIXES)}) in {str(self.root)!r}")
        self.captions = []
        for img in self.images:
            txt = img.with_suffix(".txt")
            if not txt.is_file():
                raise FileNotFoundError(f"ImageCaptionFolder: image {str(img)!r} has no caption file {txt.name!r}")
            text = " ".join(txt.read_text(encoding="utf-8").split())
            if not text:
                raise ValueError(f"ImageCaptionFolder: caption file {str(txt)!r} is empty")
            self.captions.append(text)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> tuple[torch.Tensor, str]:
        with _pil().open(self.images[index]) as im:
            image = _to_tensor(im, self.size)
        return image, self.captions[index]

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
