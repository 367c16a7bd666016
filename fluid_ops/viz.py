"""Image grids for samples: `save_image_grid` writes a batch of images as one PNG, optionally
with a caption under each image and a label left of each row (e.g. one prompt per row, several
samples of it across), and `latents_preview` turns VAE latents into something viewable when no
decoder is at hand.

    from fluid_ops.viz import save_image_grid
    save_image_grid(images, "grid.png", nrow=4, row_labels=["a red circle", "a blue square"], scale=2)

Needs Pillow (imported on first use). Text uses PIL's default font.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch

__all__ = ["save_image_grid", "make_image_grid", "latents_preview"]


def _as_batch(op, images) -> torch.Tensor:
    """(B, C, H, W) float tensor from a tensor or a list of (C, H, W) tensors; C in {1, 3}."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{op}: images must not be empty")
        bad = [i for i, im in enumerate(images) if not isinstance(im, torch.Tensor) or im.dim() != 3]
        if bad:
            raise ValueError(f"{op}: images given as a list must be (C, H, W) tensors; item {bad[0]} is "
                             f"{_what(images[bad[0]])}")
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"{op}: images in a list must all have one shape, got {sorted(shapes)}")
        images = torch.stack([im.detach().cpu() for im in images])
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{op}: images must be a tensor (B, 3, H, W) or a list of (3, H, W) tensors, got "
                        f"{type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"{op}: images must have shape (B, 3, H, W) (or 1 channel), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{op}: images must not be empty, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{op}: images must be floating point with values in [0, 1], got {images.dtype}")
    images = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(images).all():
        raise ValueError(f"{op}: images contain NaN or inf")
    return images


def _what(x):
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_int(op, name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {v!r}")


def _check_strings(op, name, v, n, what):
    if v is None:
        return None
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or len(v) != n:
        got = repr(v) if isinstance(v, str) else \
            f"{type(v).__name__} of length {len(v)}" if hasattr(v, "__len__") else type(v).__name__
        raise ValueError(f"{op}: {name} must be a list of {n} strings ({what}), got {got}")
    return [str(s) for s in v]


def _fit_lines(text, wrap, max_lines):
    """Wrap `text` at `wrap` characters; keep at most max_lines, the last one ending in '...'
    when text was cut."""
    lines = textwrap.wrap(text, width=wrap) or [""]
    if len(lines) > max_lines:
        lines = lines[:max(max_lines, 1)]
        lines[-1] = lines[-1][: max(wrap - 3, 1)].rstrip() + "..."
    return lines


def make_image_grid(images, *, nrow: int | None = None, labels=None, row_labels=None, scale: int = 1,
                    pad: int = 2, label_wrap: int = 24, background=(255, 255, 255), text_color=(0, 0, 0)):
    """The grid `save_image_grid` writes, as a PIL RGB image (see there for the arguments)."""
    from PIL import Image, ImageDraw, ImageFont

    op = "make_image_grid"
    x = _as_batch(op, images)
    b, c, h, w = x.shape
    _check_int(op, "scale", scale, 1)
    _check_int(op, "pad", pad, 0)
    _check_int(op, "label_wrap", label_wrap, 4)
    if nrow is None:
        nrow = math.ceil(b / len(row_labels)) if isinstance(row_labels, (list, tuple)) and row_labels \
            else math.ceil(math.sqrt(b))
    _check_int(op, "nrow", nrow, 1)
    rows = math.ceil(b / nrow)
    labels = _check_strings(op, "labels", labels, b, "one per image")
    row_labels = _check_strings(op, "row_labels", row_labels, rows, f"one per row: {b} images, nrow={nrow}")

    if c == 1:
        x = x.expand(b, 3, h, w)
    x = x.clamp(0, 1)
    if scale > 1:  # nearest neighbour: a 16x16 latent stays crisp
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    tile_h, tile_w = h * scale, w * scale
    pixels = (x * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    asc = probe.textbbox((0, 0), "Ag", font=font)
    line_h = asc[3] - asc[1] + 2

    caption_h = 0
    caption_lines = None
    if labels is not None:
        caption_lines = [_fit_lines(s, max(4, tile_w // 6), 2) for s in labels]
        caption_h = line_h * max(len(ls) for ls in caption_lines) + pad
    cell_h = tile_h + caption_h
    label_w = 0
    row_lines = None
    if row_labels is not None:
        row_lines = [_fit_lines(s, label_wrap, max(1, cell_h // line_h)) for s in row_labels]
        widths = [probe.textbbox((0, 0), ln, font=font)[2] for ls in row_lines for ln in ls]
        label_w = max(widths + [0]) + 2 * max(pad, 2)

    width = label_w + nrow * tile_w + (nrow + 1) * pad
    height = rows * cell_h + (rows + 1) * pad
    canvas = Image.new("RGB", (width, height), tuple(background))
    draw = ImageDraw.Draw(canvas)
    for i in range(b):
        r, col = divmod(i, nrow)
        x0 = label_w + pad + col * (tile_w + pad)
        y0 = pad + r * (cell_h + pad)
        canvas.paste(Image.fromarray(pixels[i], "RGB"), (x0, y0))
        if caption_lines is not None:
            for j, ln in enumerate(caption_lines[i]):
                draw.text((x0, y0 + tile_h + pad // 2 + j * line_h), ln, fill=tuple(text_color), font=font)
    if row_lines is not None:
        for r, lines in enumerate(row_lines):
            y_mid = pad + r * (cell_h + pad) + tile_h // 2
            y = y_mid - len(lines) * line_h // 2
            for j, ln in enumerate(lines):
                draw.text((max(pad, 2), y + j * line_h), ln, fill=tuple(text_color), font=font)
    return canvas


def save_image_grid(images, path, *, nrow: int | None = None, labels=None, row_labels=None, scale: int = 1,
                    pad: int = 2, label_wrap: int = 24) -> Path:
    """Write images as one PNG grid and return the path (parent folders are created).

    images: (B, 3, H, W) (or 1-channel) float tensor with values in [0, 1] (clamped; NaN / inf
      refused), or a list of (3, H, W) tensors of one shape. nrow: images per row (default:
      B / len(row_labels) rounded up when row_labels are given, else ceil(sqrt(B))).
    labels: one caption per image, written under it (wrapped, at most 2 lines).
    row_labels: one text per row, written left of the row in PIL's default font, wrapped at
      `label_wrap` characters and cut with '...' to the row's height.
    scale: integer upscaling (nearest neighbour); pad: pixels between and around tiles (white)."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"save_image_grid: path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_image_grid: path must end in .png, got {path.name!r}")
    grid = make_image_grid(images, nrow=nrow, labels=labels, row_labels=row_labels, scale=scale, pad=pad,
                           label_wrap=label_wrap)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")
    return path


def latents_preview(latents: torch.Tensor, channels=(0, 1, 2), *, quantile: float = 0.01) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, h, w) in [0, 1] for a look without a decoder: the given
    channels, each mapped linearly from its [quantile, 1 - quantile] range over the whole batch
    to [0, 1] (one mapping for the batch, so images stay comparable)."""
    op = "latents_preview"
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or not latents.is_floating_point():
        raise ValueError(f"{op}: latents must be a float tensor (B, C, h, w), got {_what(latents)}")
    channels = list(channels)
    if len(channels) != 3 or any(not isinstance(k, int) or not 0 <= k < latents.shape[1] for k in channels):
        raise ValueError(f"{op}: channels must be 3 indices in [0, {latents.shape[1]}), got {channels}")
    if not 0 <= quantile < 0.5:
        raise ValueError(f"{op}: quantile must be in [0, 0.5), got {quantile}")
    x = latents.detach().to("cpu", torch.float32)[:, channels]
    x = torch.nan_to_num(x)
    flat = x.transpose(0, 1).reshape(3, -1)
    lo = torch.quantile(flat, quantile, dim=1).view(1, 3, 1, 1)
    hi = torch.quantile(flat, 1 - quantile, dim=1).view(1, 3, 1, 1)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
