"""fluid_ops.viz: image grids (tile placement and pixel values read back from the PNG, labels,
argument checks) and the latent preview."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fluid_ops.viz import latents_preview, make_image_grid, save_image_grid


def rand_images(b, c=3, h=5, w=7, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def as_uint8(x):
    return (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("b,nrow,scale,pad", [(6, 3, 1, 2), (5, 2, 3, 0), (1, None, 2, 1), (7, None, 1, 3)])
def test_grid_places_every_image_exactly(tmp_path, b, nrow, scale, pad):
    x = rand_images(b)
    path = save_image_grid(x, tmp_path / "a" / "grid.png", nrow=nrow, scale=scale, pad=pad)
    grid = np.asarray(Image.open(path).convert("RGB"))
    n = nrow or int(np.ceil(np.sqrt(b)))
    rows = -(-b // n)
    th, tw = 5 * scale, 7 * scale
    assert grid.shape == (rows * th + (rows + 1) * pad, n * tw + (n + 1) * pad, 3)
    for i in range(b):
        r, c = divmod(i, n)
        y0, x0 = pad + r * (th + pad), pad + c * (tw + pad)
        want = as_uint8(x[i]).repeat(scale, 0).repeat(scale, 1)
        assert np.array_equal(grid[y0:y0 + th, x0:x0 + tw], want), i
    if b % n:  # the empty cells of the last row stay background
        assert (grid[-pad - th:, -pad - tw:] == 255).all()


def test_grid_accepts_lists_grey_and_clamps():
    x = rand_images(3) * 3 - 1  # values outside [0, 1]
    a = np.asarray(make_image_grid(list(x), nrow=3))
    b = np.asarray(make_image_grid(x.clamp(0, 1), nrow=3))
    assert np.array_equal(a, b)
    grey = np.asarray(make_image_grid(rand_images(2, c=1), nrow=2, pad=0))
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])


def test_row_labels_and_captions_add_text_beside_and_under(tmp_path):
    x = torch.full((4, 3, 8, 8), 0.5)
    plain = np.asarray(make_image_grid(x, nrow=2, pad=2))
    labelled = np.asarray(make_image_grid(x, nrow=2, pad=2, row_labels=["a red circle at the top left", "b"]))
    assert labelled.shape[0] == plain.shape[0] and labelled.shape[1] > plain.shape[1]
    label_w = labelled.shape[1] - plain.shape[1]
    assert np.array_equal(labelled[:, label_w:], plain)  # the images are shifted, not changed
    col = labelled[:, :label_w]
    assert (col < 128).any() and (col[: 2 + 8] < 128).any() and (col[2 + 8 + 2:] < 128).any()  # text in each row
    empty = np.asarray(make_image_grid(x, nrow=2, pad=2, row_labels=["", ""]))
    assert (empty[:, : empty.shape[1] - plain.shape[1]] == 255).all()
    # default nrow from the number of row labels: 4 images over 2 rows
    assert np.asarray(make_image_grid(x, row_labels=["p", "q"])).shape[0] == plain.shape[0]
    captioned = np.asarray(make_image_grid(x, nrow=2, pad=2, labels=["0", "1", "2", "3"]))
    assert captioned.shape[1] == plain.shape[1] and captioned.shape[0] > plain.shape[0]
    assert (captioned < 128).any()
    long = ["word " * 200, "x"]
    tall = np.asarray(make_image_grid(x, nrow=2, row_labels=long))  # cut to the row height, not taller
    assert tall.shape[0] == plain.shape[0]


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(images=torch.rand(2, 4, 5, 5)), ValueError, r"shape \(B, 3, H, W\)"),
    (dict(images=torch.rand(0, 3, 5, 5)), ValueError, "not be empty"),
    (dict(images=torch.full((1, 3, 2, 2), float("nan"))), ValueError, "NaN"),
    (dict(images=torch.zeros(1, 3, 2, 2, dtype=torch.uint8)), TypeError, "floating point"),
    (dict(images=[torch.rand(3, 2, 2), torch.rand(3, 2, 3)]), ValueError, "one shape"),
    (dict(images=np.zeros((1, 3, 2, 2))), TypeError, "must be a tensor"),
    (dict(labels=["a"]), ValueError, "labels must be a list of 2 strings"),
    (dict(row_labels=["a", "b"], nrow=2), ValueError, "row_labels must be a list of 1 strings"),
    (dict(row_labels="ab"), ValueError, "row_labels must be"),
    (dict(scale=0), ValueError, "scale must be an int >= 1"),
    (dict(pad=-1), ValueError, "pad"),
    (dict(nrow=0), ValueError, "nrow"),
])
def test_grid_rejects_bad_arguments(tmp_path, kwargs, err, match):
    args = dict(images=rand_images(2))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        save_image_grid(args.pop("images"), tmp_path / "g.png", **args)
    assert not (tmp_path / "g.png").exists()


def test_grid_path_must_be_png(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        save_image_grid(rand_images(1), tmp_path / "g.jpg")


def test_latents_preview_maps_channels_to_unit_range():
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(4, 16, 6, 6, generator=g) * 5 + 3
    img = latents_preview(lat, channels=(2, 0, 5), quantile=0.0)
    assert img.shape == (4, 3, 6, 6) and img.min() == 0 and img.max() == 1
    # per channel, linear and order-preserving in the chosen latent channel
    src = lat[:, 2].flatten()
    assert torch.equal(img[:, 0].flatten().argsort(stable=True), src.argsort(stable=True))
    with pytest.raises(ValueError, match="channels"):
        latents_preview(lat, channels=(0, 1, 16))
    with pytest.raises(ValueError, match="latents must be"):
        latents_preview(lat[0])
