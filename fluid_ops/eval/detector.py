"""A deterministic object detector for the synthetic shapes images (no learning).

Steps, and why each is there:
1. Images larger than 64 px are area-averaged down to 64-127 px: shapes stay >= 16 px across
   there, and the per-pixel work stops growing with the image.
2. Background = per-channel median of the 2-px border ring (shapes are kept inside the canvas,
   so the ring is background even with several objects; a median shrugs off a shape that does
   touch the edge).
3. Foreground strength s = max over channels of |pixel - background|: every palette colour is
   bright in at least one channel, blue included. Segment on s smoothed by a [1 2 1]^2 kernel
   (cuts pixel noise by ~2.7x but leaks little into the >= 2.5 px gaps between objects) with
   a fixed threshold of 0.35 (the shapes' contrast is ~0.85: an anti-aliased edge pixel half
   covered lands near 0.42, so the mask follows the true edge).
4. 4-connected components (a run-length union-find); components under `min_area` of the image
   are specks of noise and are dropped.
5. Per component, a soft mask a = clip((s - noise floor) / (contrast - noise floor), 0, 1) over
   the component and a 1-px ring around it (anti-aliased and blurred edges carry part of the
   shape's mass). From a, the central moments give the shape (all shapes are axis-aligned):
     * vertical skewness mu03 / mu02^1.5 (y down): an apex-up triangle has its mass low,
       -0.57 ideally, -0.4 under a 1-px blur; circles and squares are symmetric (0) -> triangle
       if below -0.25;
     * "corner" ratio mu22 / (mu20 mu02): 1 for a square (x and y independent), 2/3 for a disc
       (0.75 under a 1-px blur), 0.8 for a triangle -> square if above 0.87, else circle.
   Blur adds sigma^2 to the second moments, which pulls every shape's ratios toward those of a
   Gaussian blob (skew 0, corner 1); the thresholds leave room for a blur of ~1 px at size 32.
6. Colour: the mean RGB of the component's core (a >= 0.75: edge pixels are mixed with the
   background), matched to the nearest palette colour in RGB after letting each palette
   colour's offset from the background scale by 0.4-1.25 (a small model's colours come out
   dim; plain nearest-RGB calls a dim yellow red and a dim cyan green).
Centre and size come from the component's bounding box (the generator places a shape by its
box centre; a triangle's centroid sits r/3 below it, which would blur the grid cells).
7. Only compact filled shapes are objects. Steps 3-6 read a shape into any blob, and a broken
   model's samples are blobs without shape: pixel noise (every pixel independently black or a
   saturated colour, the prompt's colour more often) smooths into large ragged components whose
   moments look square and whose mean colour is the favoured one, so noise scored ~0.5. A
   component is kept only if
     a. its box is at least MIN_SIDE and at most MAX_SIDE of the image on both sides (the
        generator's shapes are 8-14 px across at size 32: radius 4-7) and at most MAX_ASPECT
        long for its width (every shape fills a 2r x 2r box);
     b. it is filled with one colour: of its interior pixels (the component eroded by 1 px, away
        from the anti-aliased edge) at least MIN_PURITY are strong (s > threshold, unsmoothed) and
        of the component's palette class (per-pixel nearest palette colour, same rule as step 6).
        A filled shape is ~1.0 even blurred and noisy; pixel noise is its own density (<= ~0.7);
     c. its outline is the shape's: the IoU of the component mask with the ideal classified shape
        inscribed in its box is at least MIN_IOU[shape]; ragged noise blobs and clusters of
        patches (an L of three squares is no circle) fall below;
     d. its mean colour is within MAX_COLOUR_DISTANCE of the (scaled) palette colour: a mixture
        of colours is no palette colour;
     e. the objects of a colour gather that colour: the components of palette class k that
        pass a and b (compact one-colour blobs), with their 1-px rings, hold at least
        MIN_GATHERED of all strong pixels of class k in the image. A shape is drawn whole; one
        lucky blob among scattered patches and specks is not.
   The numbers come from measurements on renders (clean, blurred, noisy, dim; 32 and 64 px) vs
   the noise images of tests/test_eval_noise.py (see the constants' comments).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from fluid_ops.data.shapes import COLOURS, position_cell

__all__ = ["Detection", "detect", "to_numpy_image", "TRIANGLE_SKEW", "SQUARE_CORNER"]

TRIANGLE_SKEW = -0.25     # vertical skewness below this: triangle (apex up)
SQUARE_CORNER = 0.87      # corner ratio above this (and not a triangle): square
_COLOUR_SCALE = (0.4, 1.25)  # how much dimmer / brighter than the palette an object may be
_WORK_SIZE = 64           # images larger than this are area-averaged down to [64, 128)
_PALETTE_NAMES = tuple(COLOURS)
# Step 7 (numbers: candidate components of 600 renders, 32 + 64 px, clean / blur 1 px + noise
# 0.1 / dim 0.6 + blur + noise, vs the noise images of tests/test_eval_noise.py):
MIN_SIDE = 0.15           # box side >= this fraction of the image (renders: min 0.156 = 5 px at 32)
MAX_SIDE = 0.6            # ... and <= this (renders: max 0.5; radius 7 + blur; noise blobs reach 1.0)
MAX_ASPECT = 1.4          # longer / shorter box side <= this (every shape fills a 2r x 2r box)
MIN_PURITY = 0.8          # interior pixels of the object's colour class (renders: 1% quantile 0.78
                          # in the worst condition, median 1.0; mixed pixel noise: 99% quantile 0.65)
MIN_IOU = {"circle": 0.7, "square": 0.72, "triangle": 0.45}  # outline vs the ideal shape (renders:
                          # 1% quantiles 0.78 / 0.78 / 0.55, minima 0.69 / 0.67 / 0.47 (small blurred
                          # triangles lose their apex); patch clusters: medians 0.5-0.7)
MIN_GATHERED = 0.7        # of a colour's strong pixels, its compact blobs (7a + 7b, with their
                          # 1-px rings) must hold at least this (renders: ~1; scattered patches:
                          # one passing blob among 4-12 patches holds a small part)
MAX_COLOUR_DISTANCE = 0.2  # object colour vs the scaled palette colour (renders: max 0.11;
                          # mixed pixel noise: 5% quantile 0.19, median 0.34)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], np.float64)


@dataclass(frozen=True)
class Detection:
    """One detected object. cx, cy: centre of its bounding box and width, height: the box size,
    all as fractions of the image width / height; area: soft area as a fraction of the image.
    colour_distance: RGB distance of the object's mean colour to the (scaled) named palette colour.
    skew, corner: the shape features (see the module docstring)."""
    shape: str
    colour: str
    cx: float
    cy: float
    width: float
    height: float
    area: float
    colour_distance: float
    skew: float
    corner: float

    @property
    def cell(self) -> str:
        """Grid cell (one of fluid_ops.data.POSITIONS) of the centre."""
        return position_cell(self.cx, self.cy)

    def to_dict(self) -> dict:
        d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        d["cell"] = self.cell
        return d


def to_numpy_image(image, name: str = "image") -> np.ndarray:
    """A (3, H, W) tensor / array in [0, 1] as a float32 numpy array (checked, clipped)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image if image.dtype == torch.float32 else image.float()).numpy()
    elif isinstance(image, np.ndarray):
        image = image.astype(np.float32, copy=False)
    else:
        raise TypeError(f"{name}: expected a (3, H, W) torch.Tensor or numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 8:
        raise ValueError(f"{name}: expected shape (3, H, W) with H, W >= 8, got {tuple(image.shape)}")
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{name}: contains NaN or inf")
    return np.clip(image, 0.0, 1.0)


def _downsample(img: np.ndarray) -> np.ndarray:
    f = min(img.shape[1:]) // _WORK_SIZE
    if f <= 1:
        return img
    c, h, w = img.shape
    h, w = h - h % f, w - w % f
    return img[:, :h, :w].reshape(c, h // f, f, w // f, f).mean(axis=(2, 4))


def _quantile(x: np.ndarray, q: float) -> float:
    """The q-quantile (lower element) of a 1-D array; np.percentile costs ~0.3 ms a call here."""
    k = int(q * (x.size - 1))
    return float(np.partition(x, k)[k])


def _smooth(s: np.ndarray) -> np.ndarray:
    """[1 2 1] / 4 along each axis, edges replicated."""
    p = np.pad(s, 1, mode="edge")
    s = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (s[:, :-2] + 2 * s[:, 1:-1] + s[:, 2:]) / 4


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = background, 1..n), by runs of each row + union-find."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # same row-major order as starts: runs pair up
    parent = list(range(len(starts)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev_lo = prev_hi = 0  # runs of the previous row: indices [prev_lo, prev_hi)
    row_lo = 0
    for k in range(len(starts)):
        if k == 0 or rows[k] != rows[k - 1]:
            if k > 0 and rows[k] == rows[k - 1] + 1:
                prev_lo, prev_hi = row_lo, k
            else:
                prev_lo = prev_hi = k
            row_lo = k
        for j in range(prev_lo, prev_hi):  # runs overlap in columns -> 4-connected
            if starts[j] < ends[k] and starts[k] < ends[j]:
                a, b = find(j), find(k)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    labels = np.zeros((h, w), np.int32)
    roots = {}
    for k in range(len(starts)):
        lab = roots.setdefault(find(k), len(roots) + 1)
        labels[rows[k], starts[k]:ends[k]] = lab
    return labels


def _nearest_colour(mean_rgb: np.ndarray, background: np.ndarray) -> tuple[int, float]:
    """Palette index and distance: each palette colour's offset from the background may be
    scaled by 0.4-1.25 to fit the object's offset (a dim or washed-out red is still red)."""
    v = mean_rgb - background
    q = _PALETTE - background[None, :]
    alpha = np.clip(q @ v / (q * q).sum(axis=1), _COLOUR_SCALE[0], _COLOUR_SCALE[1])
    dist = np.linalg.norm(v[None, :] - alpha[:, None] * q, axis=1)
    k = int(dist.argmin())
    return k, float(dist[k])


def _pixel_classes(img: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(H, W) palette index of every pixel, by the same scaled-offset rule as _nearest_colour."""
    v = (img - background[:, None, None]).reshape(3, -1)
    q = _PALETTE - background[None, :]
    alpha = np.clip((q @ v) / (q * q).sum(axis=1)[:, None], _COLOUR_SCALE[0], _COLOUR_SCALE[1])
    d2 = ((v[None, :, :] - alpha[:, None, :] * q[:, :, None]) ** 2).sum(axis=1)
    return d2.argmin(axis=0).reshape(img.shape[1:])


def _erode(c: np.ndarray) -> np.ndarray:
    """4-neighbour erosion (pixels outside the array count as outside)."""
    e = c.copy()
    e[1:] &= c[:-1]; e[:-1] &= c[1:]; e[:, 1:] &= c[:, :-1]; e[:, :-1] &= c[:, 1:]
    e[0] = e[-1] = False
    e[:, 0] = e[:, -1] = False
    return e


def _template_iou(shape: str, c: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> float:
    """IoU of the binary component mask c with the ideal `shape` inscribed in its box
    [y0, y1) x [x0, x1) (window coordinates), the template's coverage sampled 4x4 per pixel."""
    h, w = c.shape
    ss = 4
    ys = (np.arange(h * ss) + 0.5) / ss
    xs = (np.arange(w * ss) + 0.5) / ss
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    u = (xs[None, :] - cx) / rx
    v = (ys[:, None] - cy) / ry
    if shape == "circle":
        inside = u * u + v * v <= 1
    elif shape == "square":
        inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    else:  # apex-up triangle
        inside = (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    cov = inside.reshape(h, ss, w, ss).mean(axis=(1, 3))
    m = c.astype(np.float64)
    return float(np.minimum(cov, m).sum() / max(np.maximum(cov, m).sum(), 1e-9))


def _classify(skew: float, corner: float) -> str:
    if skew < TRIANGLE_SKEW:
        return "triangle"
    return "square" if corner > SQUARE_CORNER else "circle"


def detect(image, *, threshold: float = 0.35, min_area: float = 0.006, debug: list | None = None) -> list[Detection]:
    """Objects in one image: (3, H, W) tensor or array in [0, 1], any size >= 8.

    threshold: foreground strength (max channel distance from the background) that counts as
    an object. min_area: components smaller than this fraction of the image are dropped as
    specks (the smallest shape the generator draws covers ~3%). Returns detections sorted
    by area, largest first. debug: a list that receives (label, shape, colour, box width,
    box height, {purity, iou, colour_distance}) for every component that reaches step 7b
    (accepted or not), to measure the step 7 rules.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold: expected a float in (0, 1), got {threshold!r}")
    if not 0.0 <= min_area < 1.0:
        raise ValueError(f"min_area: expected a float in [0, 1), got {min_area!r}")
    img = _downsample(to_numpy_image(image)).astype(np.float64)
    _, h, w = img.shape
    ring = np.concatenate([img[:, :2].reshape(3, -1), img[:, -2:].reshape(3, -1),
                           img[:, 2:-2, :2].reshape(3, -1), img[:, 2:-2, -2:].reshape(3, -1)], axis=1)
    k = ring.shape[1] // 2
    background = np.partition(ring, k, axis=1)[:, k]
    s = np.abs(img - background[:, None, None]).max(axis=0)
    mask = _smooth(s) > threshold
    labels = _components(mask)
    sizes = np.bincount(labels.ravel())
    min_pixels = max(3, min_area * h * w)
    kept = [lab for lab in range(1, len(sizes)) if sizes[lab] >= min_pixels]
    if not kept:
        return []
    # Noise floor: what background pixels (away from any object) reach.
    near = mask.copy()
    near[1:] |= mask[:-1]; near[:-1] |= mask[1:]; near[:, 1:] |= mask[:, :-1]; near[:, :-1] |= mask[:, 1:]
    floor = _quantile(s[~near], 0.95) if (~near).any() else 0.0
    ys, xs = np.mgrid[0:h, 0:w]
    # Per-pixel colour class (step 7): strong pixels only, -1 elsewhere.
    pix_class = np.where(s > threshold, _pixel_classes(img, background), -1)
    side = min(h, w)
    held = np.zeros((h, w), bool)  # pixels of kept components and their rings
    out = []
    for lab in kept:
        comp = labels == lab
        cy_idx, cx_idx = np.nonzero(comp)
        y0, y1, x0, x1 = cy_idx.min(), cy_idx.max() + 1, cx_idx.min(), cx_idx.max() + 1
        bw, bh = x1 - x0, y1 - y0
        # Step 7a: size and aspect of the box (cheap, before any moment).
        if (min(bw, bh) < MIN_SIDE * side or max(bw, bh) > MAX_SIDE * side
                or max(bw, bh) > MAX_ASPECT * min(bw, bh)):
            continue
        # window: the box grown by one pixel; region: the component plus its 1-px ring,
        # excluding pixels of other components
        Y0, Y1, X0, X1 = max(y0 - 1, 0), min(y1 + 1, h), max(x0 - 1, 0), min(x1 + 1, w)
        c = comp[Y0:Y1, X0:X1]
        grown = c.copy()
        grown[1:] |= c[:-1]; grown[:-1] |= c[1:]; grown[:, 1:] |= c[:, :-1]; grown[:, :-1] |= c[:, 1:]
        grown &= (labels[Y0:Y1, X0:X1] == 0) | c
        sw = s[Y0:Y1, X0:X1]
        contrast = _quantile(s[comp], 0.90)
        lo = min(floor, 0.5 * contrast)
        a = np.clip((sw - lo) / max(contrast - lo, 1e-6), 0.0, 1.0) * grown
        m00 = a.sum()
        yy, xx = ys[Y0:Y1, X0:X1], xs[Y0:Y1, X0:X1]
        mx, my = (a * xx).sum() / m00, (a * yy).sum() / m00
        dx, dy = xx - mx, yy - my
        mu20, mu02 = (a * dx * dx).sum() / m00, (a * dy * dy).sum() / m00
        mu22 = (a * dx * dx * dy * dy).sum() / m00
        mu03 = (a * dy ** 3).sum() / m00
        skew = float(mu03 / max(mu02, 1e-9) ** 1.5)
        corner = float(mu22 / max(mu20 * mu02, 1e-9))
        core = (a >= 0.75) & c
        if not core.any():
            core = c
        k, dist = _nearest_colour(img[:, Y0:Y1, X0:X1][:, core].mean(axis=1), background)
        shape = _classify(skew, corner)
        # Step 7b: the interior is one colour, filled (purity); 7c: the outline is the shape's.
        inner = _erode(c)
        if inner.sum() < 4:
            inner = c
        purity = float((pix_class[Y0:Y1, X0:X1][inner] == k).mean())
        iou = _template_iou(shape, c, y0 - Y0, y1 - Y0, x0 - X0, x1 - X0)
        feats = {"purity": purity, "iou": iou, "colour_distance": dist}
        if debug is not None:
            debug.append((lab, shape, _PALETTE_NAMES[k], bw, bh, feats))
        if purity < MIN_PURITY:
            continue
        held[Y0:Y1, X0:X1] |= grown  # a compact one-colour blob (7a, 7b): counts for 7e
        if iou < MIN_IOU[shape] or dist > MAX_COLOUR_DISTANCE:
            continue
        out.append(Detection(
            shape=shape, colour=_PALETTE_NAMES[k],
            cx=float((x0 + x1) / 2 / w), cy=float((y0 + y1) / 2 / h),
            width=float(bw / w), height=float(bh / h), area=float(m00 / (h * w)),
            colour_distance=dist, skew=skew, corner=corner))
    if out:  # step 7e
        strong = pix_class[pix_class >= 0]
        inside = pix_class[held & (pix_class >= 0)]
        total, got = np.bincount(strong, minlength=len(_PALETTE)), np.bincount(inside, minlength=len(_PALETTE))
        ok = {_PALETTE_NAMES[k] for k in range(len(_PALETTE)) if got[k] >= MIN_GATHERED * total[k]}
        out = [d for d in out if d.colour in ok]
    out.sort(key=lambda d: -d.area)
    return out
