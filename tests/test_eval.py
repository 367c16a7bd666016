"""fluid_ops.eval: the rule-based shapes detector and the GenEval-style scorer.

The detector must find what the generator drew (clean, and blurred + noisy like a small
generative model's samples), and the scorer must fail images that do not show the prompt.
"""
import json

import numpy as np
import pytest
import torch

from fluid_ops.data import COLOURS, POSITIONS, SHAPES, ObjectSpec, ShapesDataset, Spec, caption, degrade, render
from fluid_ops.data.shapes import PlacedObject
from fluid_ops.eval import CATEGORIES, Prompt, detect, evaluate, geneval_prompts, render_spec


def renders(prompts, size, blur=0.0, noise=0.0, contrast=1.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.stack([render_spec(p.spec, size, seed=seed * 10_000 + i) for i, p in enumerate(prompts)])
    return degrade(images, blur_px=blur * size / 32, noise=noise, contrast=contrast, generator=g)


PROMPTS = geneval_prompts(per_category=50, seed=3)  # 300 prompts, every category


# ----------------------------------------------------------------------------- detector

def test_detector_reads_every_single_object_exactly():
    # every shape x colour x cell, at the radius extremes
    for r in (5.0, 7.0):
        for shape in SHAPES:
            for colour in COLOURS:
                for cell, pos in enumerate(POSITIONS):
                    row, col = divmod(cell, 3)
                    cx = float(np.clip((col + 0.5) * 32 / 3 + 0.7, r + 1, 31 - r))
                    cy = float(np.clip((row + 0.5) * 32 / 3 - 0.6, r + 1, 31 - r))
                    dets = detect(torch.from_numpy(render([PlacedObject(shape, colour, cx, cy, r)], 32)))
                    assert len(dets) == 1, (shape, colour, pos, dets)
                    d = dets[0]
                    assert (d.shape, d.colour, d.cell) == (shape, colour, pos), (r, d)
                    assert abs(d.cx - cx / 32) < 0.04 and abs(d.cy - cy / 32) < 0.04
                    assert abs(d.width - 2 * r / 32) < 0.08


def test_detector_counts_objects_in_data_set_scenes():
    # all scene kinds, 32 and 64 px: one detection per drawn object, right shape and colour
    for size in (32, 64):
        ds = ShapesDataset(size=size, length=150, seed=9)
        for i in range(150):
            _, objects = ds.scene(i)
            dets = detect(ds[i][0])
            assert len(dets) == len(objects), (ds[i][1], dets)
            got = sorted((d.shape, d.colour) for d in dets)
            assert got == sorted((o.shape, o.colour) for o in objects), ds[i][1]


def test_degrade_against_its_formulas():
    """fluid_ops.data.degrade: contrast pulls toward BACKGROUND linearly, the blur is a separable
    Gaussian of sigma blur_px (a centred impulse comes out as its written-out outer product), the
    noise has std `noise`, and the result is clipped to [0, 1]."""
    from fluid_ops.data import BACKGROUND
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    torch.testing.assert_close(degrade(x), x, atol=0, rtol=0)
    bg = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    torch.testing.assert_close(degrade(x, contrast=0.25), bg + 0.25 * (x - bg))
    torch.testing.assert_close(degrade(x, contrast=0.0), bg.expand_as(x))
    imp = torch.zeros(1, 3, 21, 21)
    imp[..., 10, 10] = 1.0
    sigma = 1.3
    t = torch.arange(21, dtype=torch.float64) - 10
    w = torch.exp(-t ** 2 / (2 * sigma ** 2)) * (t.abs() <= 4)        # 3 sigma, rounded up: 4 taps
    want = torch.outer(w, w) / w.sum() ** 2
    got = degrade(imp, blur_px=sigma)
    for c in range(3):
        torch.testing.assert_close(got[0, c].double(), want, atol=1e-6, rtol=1e-5)
    grey = torch.full((1, 3, 64, 64), 0.5)
    torch.testing.assert_close(degrade(grey, blur_px=2.0), grey, atol=1e-6, rtol=0)   # edges replicated
    noisy = degrade(grey, noise=0.05, generator=torch.Generator().manual_seed(1))
    assert abs((noisy - 0.5).std().item() - 0.05) < 0.003 and abs((noisy - 0.5).mean().item()) < 0.003
    assert degrade(x * 3 - 1, contrast=1.0).min() >= 0 and degrade(x * 3 - 1).max() <= 1
    for bad, match in ((dict(noise=-0.1), "noise"), (dict(blur_px=float("nan")), "blur_px"),
                       (dict(contrast=True), "contrast")):
        with pytest.raises(ValueError, match=match):
            degrade(x, **bad)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        degrade(x[0])


def test_detector_sees_nothing_in_blank_or_noise_images():
    g = torch.Generator().manual_seed(0)
    blank = torch.tensor([0.04, 0.04, 0.05]).view(3, 1, 1).expand(3, 32, 32)
    assert detect(blank) == []
    assert detect(degrade(blank[None], noise=0.08, generator=g)[0]) == []
    assert detect(torch.full((3, 64, 64), 0.7)) == []  # flat colour: all background


def test_detector_input_checks():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        detect(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        detect(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        detect(torch.full((3, 16, 16), float("nan")))
    with pytest.raises(TypeError, match="image"):
        detect([[0.0]])
    with pytest.raises(ValueError, match="threshold"):
        detect(torch.zeros(3, 16, 16), threshold=1.5)
    # numpy arrays and other dtypes are accepted
    img = render_spec("a red square in the centre", 32)
    assert detect(img.numpy())[0].shape == "square"
    assert detect(img.double())[0].colour == "red"


# ----------------------------------------------------------------------------- evaluate

@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("blur, noise, contrast", [(0.0, 0.0, 1.0), (0.6, 0.06, 1.0), (0.6, 0.06, 0.6)],
                         ids=["clean", "noisy", "dim-noisy"])
def test_renders_of_the_prompts_score_high(size, blur, noise, contrast):
    result = evaluate(renders(PROMPTS, size, blur, noise, contrast), PROMPTS)
    json.dumps(result)  # JSON-serialisable
    assert set(result["categories"]) == set(CATEGORIES)
    for name, c in result["categories"].items():
        assert c["n"] == 50
        assert c["accuracy"] >= 0.95, (name, c)
    for name in ("single_object", "colors"):
        c = result["categories"][name]
        assert c["shape"] >= 0.95 and c["position"] >= 0.95
    assert result["categories"]["colors"]["colour"] >= 0.95
    assert abs(result["overall"] - np.mean([c["accuracy"] for c in result["categories"].values()])) < 1e-12
    assert len(result["prompts"]) == len(PROMPTS)
    assert all({"text", "category", "correct", "detections"} <= set(r) for r in result["prompts"])


def test_renders_of_other_prompts_score_low():
    # same category, shuffled pairing: a prompt is scored against another prompt's image
    images = renders(PROMPTS, 32)
    perm = np.random.default_rng(0).permutation(50)
    shuffled = [images[50 * (i // 50) + perm[i % 50]] for i in range(len(PROMPTS))]
    result = evaluate(shuffled, PROMPTS)
    assert result["overall"] < 0.5, result["categories"]
    assert result["categories"]["color_attr"]["accuracy"] < 0.2


def _wrong(spec: Spec) -> Spec:
    """A spec that the image of `spec` must fail: the nearest wrong answer per kind."""
    o = spec.objects
    other = {"circle": "square", "square": "triangle", "triangle": "circle"}
    if spec.kind == "single" and o[0].colour:  # colors: keep the shape, change the colour
        names = list(COLOURS)
        return Spec("single", (ObjectSpec(o[0].shape, names[(names.index(o[0].colour) + 1) % 6]),), position=spec.position)
    if spec.kind == "single":
        return Spec("single", (ObjectSpec(other[o[0].shape]),), position=spec.position)
    if spec.kind == "two":  # one of the two shapes is missing
        missing = ({"circle", "square", "triangle"} - {o[0].shape, o[1].shape}).pop()
        return Spec("two", (o[0], ObjectSpec(missing)))
    if spec.kind == "count":  # one more (one fewer than four)
        return Spec("count", o, count=spec.count + 1 if spec.count < 4 else 3)
    if spec.kind == "position":  # the opposite relation
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return Spec("position", o, relation=flip[spec.relation])
    if spec.kind == "attribution":  # colours swapped between the shapes
        return Spec("attribution", (ObjectSpec(o[0].shape, o[1].colour), ObjectSpec(o[1].shape, o[0].colour)))
    raise AssertionError(spec)


def test_near_misses_fail():
    # each image is scored against the prompt that differs from its own in the one tested thing
    images = renders(PROMPTS, 32, blur=0.6, noise=0.06)
    wrong = [Prompt(p.category, caption(_wrong(p.spec)), _wrong(p.spec)) for p in PROMPTS]
    result = evaluate(images, wrong)
    for name, c in result["categories"].items():
        assert c["accuracy"] <= 0.05, (name, c)
    # ... while the attribute that was kept still reads right
    assert result["categories"]["colors"]["shape"] >= 0.95
    assert result["categories"]["colors"]["position"] >= 0.95
    assert result["categories"]["colors"]["colour"] <= 0.05
    assert result["categories"]["single_object"]["position"] >= 0.95
    pos = [r for r in result["prompts"] if r["category"] == "position"]
    assert all(r["present"] for r in pos)


def test_evaluate_accepts_strings_and_a_batch_tensor():
    texts = ["a red circle at the top left", "three triangles", "a square to the left of a circle"]
    images = torch.stack([render_spec(t, 32, seed=1) for t in texts])
    result = evaluate(images, texts, detections=False)
    assert [r["category"] for r in result["prompts"]] == ["colors", "counting", "position"]
    assert result["overall"] == 1.0 and "detections" not in result["prompts"][0]
    assert result["prompts"][1]["detected_count"] == 3
    # one category present -> overall is its accuracy
    r = evaluate(images[:1], [Prompt.from_text(texts[0])])
    assert r["overall"] == 1.0 and list(r["categories"]) == ["colors"]


def test_evaluate_input_checks():
    img = render_spec("a circle", 32)
    with pytest.raises(ValueError, match="one image per prompt"):
        evaluate([img, img], ["a circle"])
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        evaluate([img], ["a dog"])
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        evaluate([img], [3])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        evaluate([img, torch.zeros(32, 32)], ["a circle", "a square"])
    with pytest.raises(TypeError, match="images"):
        evaluate(torch.zeros(3, 32, 32), ["a circle"])
