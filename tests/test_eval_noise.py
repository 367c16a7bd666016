"""fluid_ops.eval on images that show no object: coloured pixel noise must score ~0.

A broken or barely trained generator draws images with no coherent object: every pixel drawn
independently (black, or a saturated colour, the prompt's colour more often than the others),
or a few clean patches of the prompt's colour scattered over the canvas. An evaluator that
reads shapes into those would reward noise, so every category must score near 0 on them
(the renders themselves must still score >= 0.95: tests/test_eval.py).

Why <= 0.1: a detector that reports only compact filled shapes sees nothing in these images,
and with nothing detected every category scores exactly 0 (counting asks for 2-4 objects).
The rare chance blob that really has a shape's outline (two by two patches that happen to
tile a square) may be read as that shape; 0.1 (5 of 50 prompts) leaves room for such coincidences
and still fails a detector that finds shapes in noise by construction: the detector before the
compact-shape rules (detector.py step 7) scored these cases up to 1.00 on single_object, 0.98 on
colors and 0.75 overall (single colour noise, p_bg 0.7), 0.40 / 0.48 on scattered patches.
"""
import numpy as np
import pytest
import torch

from fluid_ops.data import BACKGROUND, COLOURS
from fluid_ops.eval import CATEGORIES, detect, evaluate, geneval_prompts

# What a broken sampler puts in a pixel besides the palette: black and white.
_EXTRA = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0)}
_NAMES = tuple(COLOURS)


def _favoured(prompt, rng) -> list[str]:
    """The colours a prompt names (a random palette colour when it names none)."""
    named = [o.colour for o in prompt.spec.objects if o.colour]
    return named or [_NAMES[int(rng.integers(len(_NAMES)))]]


def noise_image(prompt, kind: str, size: int, rng: np.random.Generator, p_bg: float = 0.5,
                weight: float = 4.0, patch: int = 4, n_patches: tuple[int, int] = (4, 12)) -> torch.Tensor:
    """A (3, size, size) image with no object in it, biased toward the prompt's colour(s).

    kind "mixed": each pixel independently background / black (prob p_bg, split evenly) or a
    palette colour / white, the prompt's colour(s) `weight` times as likely as each other one.
    kind "single": each pixel background (prob p_bg) or the prompt's colour.
    kind "patches" / "grid-patches": background with n_patches patch x patch squares (scaled
    by size / 32) of the prompt's colour at random positions (free, or aligned to a patch grid,
    as a patch-token model draws them); patches may touch or overlap.
    """
    fav = _favoured(prompt, rng)
    bg = np.asarray(BACKGROUND, np.float32)
    img = np.empty((3, size, size), np.float32)
    img[:] = bg[:, None, None]
    if kind in ("mixed", "single"):
        if kind == "mixed":
            names = list(_NAMES) + ["white"]
            cols = np.array([COLOURS.get(n, _EXTRA.get(n)) for n in names], np.float32)
            w = np.array([weight if n in fav else 1.0 for n in names])
        else:
            cols = np.array([COLOURS[n] for n in fav], np.float32)
            w = np.ones(len(fav))
        pick = rng.choice(len(cols), size=(size, size), p=w / w.sum())
        fg = rng.random((size, size)) >= p_bg
        img = np.where(fg[None], cols[pick].transpose(2, 0, 1), img)
        black = (~fg) & (rng.random((size, size)) < 0.5)
        img[:, black] = 0.0
    elif kind in ("patches", "grid-patches"):
        p = max(1, round(patch * size / 32))
        n = int(rng.integers(n_patches[0], n_patches[1] + 1))
        for _ in range(n):
            c = np.asarray(COLOURS[fav[int(rng.integers(len(fav)))]], np.float32)
            if kind == "grid-patches":
                y, x = rng.integers(size // p, size=2) * p
            else:
                y, x = rng.integers(size - p + 1, size=2)
            img[:, y:y + p, x:x + p] = c[:, None, None]
    else:
        raise ValueError(kind)
    return torch.from_numpy(img)


def noise_images(prompts, kind, size=32, seed=0, **kw) -> torch.Tensor:
    rng = np.random.default_rng([seed, size, len(kind), int(100 * kw.get("p_bg", 0.5))])
    return torch.stack([noise_image(p, kind, size, rng, **kw) for p in prompts])


PROMPTS = geneval_prompts(per_category=50, seed=5)  # 300 prompts, every category

CASES = [("mixed", 32, {"p_bg": 0.3}), ("mixed", 32, {"p_bg": 0.5}), ("mixed", 32, {"p_bg": 0.7}),
         ("mixed", 64, {"p_bg": 0.5}),
         ("single", 32, {"p_bg": 0.3}), ("single", 32, {"p_bg": 0.5}), ("single", 32, {"p_bg": 0.7}),
         ("single", 64, {"p_bg": 0.5}),
         ("patches", 32, {}), ("grid-patches", 32, {}), ("patches", 64, {}), ("grid-patches", 64, {})]


@pytest.mark.parametrize("kind, size, kw", CASES,
                         ids=[f"{k}-{s}-" + "-".join(f"{a}{b}" for a, b in kw.items()) for k, s, kw in CASES])
def test_noise_scores_near_zero_in_every_category(kind, size, kw):
    images = noise_images(PROMPTS, kind, size, seed=1, **kw)
    result = evaluate(images, PROMPTS, detections=False)
    assert set(result["categories"]) == set(CATEGORIES)
    for name, c in result["categories"].items():
        assert c["accuracy"] <= 0.1, (kind, size, kw, name, c)
    assert result["overall"] <= 0.05, (kind, size, kw, result["overall"])


def test_mixed_noise_has_no_objects_at_all():
    # pixel noise of any density: no detection at all in the large majority of images
    rng = np.random.default_rng(7)
    for p_bg in (0.2, 0.4, 0.6, 0.8):
        found = sum(bool(detect(noise_image(p, "mixed", 32, rng, p_bg=p_bg))) for p in PROMPTS[:100])
        assert found <= 5, (p_bg, found)


def test_a_shape_drawn_with_noise_around_it_is_still_found():
    # the detector rejects noise, not objects: a clean render with sparse coloured specks
    # scattered over the background (2% of the pixels) still reads right
    from fluid_ops.data import render_spec
    rng = np.random.default_rng(3)
    prompts = geneval_prompts(per_category=50, seed=2, categories=["colors"])
    ok = 0
    for i, p in enumerate(prompts):
        img = render_spec(p.spec, 32, seed=i).numpy().copy()
        speck = rng.random((32, 32)) < 0.02
        cols = np.array(list(COLOURS.values()), np.float32)
        img[:, speck] = cols[rng.integers(len(cols), size=int(speck.sum()))].T
        d = detect(torch.from_numpy(img))
        o = p.spec.objects[0]
        ok += any(x.shape == o.shape and x.colour == o.colour for x in d)
    assert ok >= 0.9 * len(prompts), ok
