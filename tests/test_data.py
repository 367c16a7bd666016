"""fluid_ops.data: the synthetic shapes data set, its caption grammar, image-caption folders."""
import re

import numpy as np
import pytest
import torch

from fluid_ops.data import (
    CATEGORIES, COLOURS, KINDS, POSITIONS, SHAPES, ImageCaptionFolder, Prompt, ShapesDataset,
    caption, category_of, collate, geneval_prompts, parse_prompt, render_spec,
)


# ----------------------------------------------------------------------------- ShapesDataset

@pytest.mark.parametrize("size", [32, 64, 256])
def test_items_are_images_and_captions(size):
    ds = ShapesDataset(size=size, length=10)
    for i in range(3 if size == 256 else 10):
        img, text = ds[i]
        assert img.dtype == torch.float32 and img.shape == (3, size, size)
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert isinstance(text, str) and text
        # anti-aliased: a circle's edge has pixels between the background and the shape
        _, objects = ds.scene(i)
        assert objects
        if any(o.shape == "circle" for o in objects):
            s = (img - img[:, :1, :1]).abs().amax(0)
            assert ((s > 0.1) & (s < 0.6)).any(), "no partially covered edge pixels"


def test_items_are_deterministic_and_independent_of_global_rng():
    torch.manual_seed(1), np.random.seed(1)
    a = ShapesDataset(length=50, seed=3)
    first = [a[i] for i in (0, 7, 49)]
    torch.manual_seed(2), np.random.seed(2)
    b = ShapesDataset(length=50, seed=3)
    for (ia, ta), (ib, tb) in zip(first, [b[i] for i in (49, 7, 0)][::-1]):
        assert torch.equal(ia, ib) and ta == tb
    assert torch.equal(a[-1][0], a[49][0])
    c = ShapesDataset(length=50, seed=4)
    assert sum(torch.equal(a[i][0], c[i][0]) for i in range(10)) < 3, "seed does not change the items"
    assert len({a[i][1] for i in range(50)}) > 20, "captions barely vary"


def test_dataloader_workers_give_the_same_items():
    ds = ShapesDataset(length=8, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    imgs, caps = zip(*loader)
    ref_imgs, ref_caps = collate([ds[i] for i in range(8)])
    assert torch.equal(torch.cat(imgs), ref_imgs) and sum(caps, []) == ref_caps


def test_index_errors():
    ds = ShapesDataset(length=5)
    with pytest.raises(IndexError, match="out of range"):
        ds[5]
    with pytest.raises(IndexError):
        ds[-6]
    with pytest.raises(TypeError, match="index"):
        ds[1.5]
    assert [t for _, t in ds] == [ds[i][1] for i in range(5)]  # iteration stops at len


@pytest.mark.parametrize("bad, match", [
    (dict(size=8), "size"), (dict(size=32.0), "size"), (dict(length=-1), "length"),
    (dict(seed=-1), "seed"), (dict(kinds={"single": 1, "three": 1}), "three"),
    (dict(kinds={}), "kinds"), (dict(kinds={"single": -1}), "weights"), (dict(kinds={"single": 0}), "weights"),
])
def test_constructor_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        ShapesDataset(**bad)


def test_every_caption_parses_back_to_its_scene():
    ds = ShapesDataset(length=600, seed=11)
    kinds = set()
    for i in range(600):
        spec, objects = ds.scene(i)
        text = ds[i][1]
        assert text == caption(spec)
        assert parse_prompt(text) == spec, text
        kinds.add(spec.kind)
        # the layout shows what the caption says
        named = [(o.shape, o.colour) for o in spec.objects]
        drawn = [(o.shape, o.colour) for o in objects]
        if spec.kind == "count":
            assert len(objects) == spec.count and all(s == spec.objects[0].shape for s, _ in drawn)
            if spec.objects[0].colour:
                assert all(c == spec.objects[0].colour for _, c in drawn)
        else:
            assert [s for s, _ in drawn] == [s for s, _ in named]
            assert all(c == n for (_, c), (_, n) in zip(drawn, named) if n)
    assert kinds == set(KINDS)


def test_kinds_select_scene_kinds():
    ds = ShapesDataset(length=100, kinds={"single": 1.0})
    assert {ds.scene(i)[0].kind for i in range(100)} == {"single"}
    ds = ShapesDataset(length=300, kinds={"single": 0.5, "count": 0.5})
    counts = [ds.scene(i)[0].kind for i in range(300)]
    assert 100 < counts.count("count") < 200 and set(counts) == {"single", "count"}


@pytest.mark.parametrize("size", [32, 64, 256])
def test_layouts_are_inside_separate_and_as_captioned(size):
    ds = ShapesDataset(size=size, length=400, seed=2)
    scale = size / 32
    for i in range(400 if size < 256 else 100):
        spec, objects = ds.scene(i)
        for o in objects:
            assert o.radius >= 3.5 * scale * 0.9 and o.radius <= 7 * scale
            assert o.radius <= o.cx <= size - o.radius and o.radius <= o.cy <= size - o.radius
        for a in range(len(objects)):
            for b in range(a):
                p, q = objects[a], objects[b]
                gap = max(abs(p.cx - q.cx), abs(p.cy - q.cy)) - p.radius - q.radius
                assert gap >= 2.5 * scale - 1e-6, (caption(spec), gap)
        if spec.kind == "single":
            o = objects[0]
            assert 5 * scale <= o.radius <= 7 * scale
            col, row = int(3 * o.cx / size), int(3 * o.cy / size)
            assert POSITIONS[3 * row + col] == spec.position
        if spec.kind == "position":
            a, b = objects
            dx, dy = (b.cx - a.cx) / size, (b.cy - a.cy) / size
            along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[spec.relation]
            assert along >= 0.25


def test_colours_are_far_apart_and_named():
    assert len(COLOURS) == 6 and all(re.fullmatch("[a-z]+", c) for c in COLOURS)
    pal = np.array(list(COLOURS.values()))
    d = np.linalg.norm(pal[:, None] - pal[None], axis=-1) + 10 * np.eye(6)
    assert d.min() > 0.5
    assert SHAPES == ("circle", "square", "triangle")


# ----------------------------------------------------------------------------- grammar

@pytest.mark.parametrize("text, kind, n", [
    ("a red circle at the top left", "single", 1), ("A Red Circle at the top left.", "single", 1),
    ("a circle in the center", "single", 1), ("a photo of a blue square", "single", 1),
    ("a circle and a square", "two", 2), ("a red circle and a blue triangle", "attribution", 2),
    ("three green triangles", "count", 1), ("4 circles", "count", 1),
    ("a red circle to the left of a blue square", "position", 2), ("a square below a triangle", "position", 2),
])
def test_parse_prompt(text, kind, n):
    spec = parse_prompt(text)
    assert spec.kind == kind and len(spec.objects) == n
    assert parse_prompt(caption(spec)) == spec


def test_parse_prompt_fields():
    s = parse_prompt("a red circle to the left of a blue square")
    assert [(o.shape, o.colour) for o in s.objects] == [("circle", "red"), ("square", "blue")]
    assert s.relation == "left of"
    s = parse_prompt("three green triangles")
    assert s.count == 3 and s.objects[0].colour == "green" and s.objects[0].shape == "triangle"
    assert parse_prompt("a yellow square on the left").position == "left"
    assert parse_prompt("a triangle").position is None


@pytest.mark.parametrize("text", ["a dog", "five circles", "a red circle at the top middle left",
                                  "a red circle next to a blue square", "", "a magenta circle"])
def test_parse_prompt_errors_name_the_text(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_prompt(text)
    with pytest.raises(TypeError):
        parse_prompt(3)


def test_geneval_prompts():
    prompts = geneval_prompts(per_category=40, seed=0)
    assert len(prompts) == 240
    assert [p.category for p in prompts[::40]] == list(CATEGORIES)
    for p in prompts:
        assert isinstance(p, Prompt) and parse_prompt(p.text) == p.spec and category_of(p.spec) == p.category
    by = {c: [p for p in prompts if p.category == c] for c in CATEGORIES}
    assert all(p.spec.objects[0].colour is None and p.spec.position for p in by["single_object"])
    assert all(p.spec.objects[0].colour and p.spec.position for p in by["colors"])
    assert all(p.spec.kind == "count" and p.spec.objects[0].colour is None for p in by["counting"])
    assert all(o.colour for p in by["color_attr"] for o in p.spec.objects)
    assert all(o.colour is None for p in by["two_object"] + by["position"] for o in p.spec.objects)
    # distinct prompts first: two_object has 6, all 6 appear among the first 6
    assert len({p.text for p in by["two_object"][:6]}) == 6
    assert len({p.text for p in by["colors"]}) == 40
    assert geneval_prompts(per_category=40, seed=0) == prompts
    assert geneval_prompts(per_category=40, seed=1) != prompts
    only = geneval_prompts(per_category=3, categories=["counting", "position"])
    assert [p.category for p in only] == ["counting"] * 3 + ["position"] * 3


@pytest.mark.parametrize("bad, match", [(dict(per_category=0), "per_category"), (dict(seed=-2), "seed"),
                                        (dict(categories=["colours"]), "categories"),
                                        (dict(categories="counting"), "categories")])
def test_geneval_prompts_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        geneval_prompts(**bad)


def test_render_spec_accepts_text_and_is_seeded():
    a = render_spec("a red circle at the top left", 32, seed=1)
    assert torch.equal(a, render_spec(parse_prompt("a red circle at the top left"), 32, seed=1))
    assert not torch.equal(a, render_spec("a red circle at the top left", 32, seed=2))
    # the red is in the top-left cell
    red = (a[0] > 0.8) & (a[1] < 0.3)
    ys, xs = torch.nonzero(red, as_tuple=True)
    assert xs.float().mean() < 32 / 3 and ys.float().mean() < 32 / 3


# ----------------------------------------------------------------------------- folders, collate

def _write(folder, name, img, text):
    from PIL import Image
    Image.fromarray(img).save(folder / f"{name}.png")
    if text is not None:
        (folder / f"{name}.txt").write_text(text)


def test_image_caption_folder(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    _write(tmp_path, "b", b, "a blue square\n")
    _write(tmp_path, "a", a, "  a red\ncircle ")
    (tmp_path / "notes.md").write_text("ignored")
    ds = ImageCaptionFolder(tmp_path)
    assert len(ds) == 2
    img, text = ds[0]
    assert text == "a red circle" and img.dtype == torch.float32 and img.shape == (3, 20, 30)
    assert torch.allclose(img, torch.from_numpy(a).permute(2, 0, 1).float() / 255)
    assert ds[1][1] == "a blue square"
    with pytest.raises(ValueError, match="differ in shape"):
        collate([ds[0], ds[1]])
    ds = ImageCaptionFolder(tmp_path, size=8)
    images, captions = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 8, 8) and captions == ["a red circle", "a blue square"]
    assert 0 <= images.min() and images.max() <= 1


def test_image_caption_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageCaptionFolder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no images"):
        ImageCaptionFolder(tmp_path)
    img = np.zeros((4, 4, 3), np.uint8)
    _write(tmp_path, "x", img, None)
    with pytest.raises(FileNotFoundError, match="x.png"):
        ImageCaptionFolder(tmp_path)
    (tmp_path / "x.txt").write_text("  \n")
    with pytest.raises(ValueError, match="x.txt.*empty"):
        ImageCaptionFolder(tmp_path)
    with pytest.raises(ValueError, match="size"):
        ImageCaptionFolder(tmp_path, size=0)


def test_collate_errors():
    img = torch.zeros(3, 4, 4)
    with pytest.raises(ValueError, match="non-empty"):
        collate([])
    with pytest.raises(ValueError, match=r"batch\[1\].*caption"):
        collate([(img, "a"), (img, 3)])
    with pytest.raises(ValueError, match=r"batch\[0\].*image"):
        collate([(torch.zeros(4, 4), "a")])
    images, captions = collate([(img, "a"), (img + 1, "b")])
    assert images.shape == (2, 3, 4, 4) and captions == ["a", "b"] and images[1].eq(1).all()
