"""Synthetic captioned shapes: a text-to-image data set small models learn in minutes on a CPU,
and the GenEval-style prompts (with their grammar) that `fluid_ops.eval` scores.

A scene is filled circles / squares / triangles in six far-apart colours on a near-black
background. Five scene kinds, each with a small fixed caption grammar:

    single       "a red circle at the top left"            (colour left out 20% of the time)
    two          "a circle and a square"                    (shapes only; colours random)
    count        "three green triangles" / "three triangles" (2-4; colour named half the time)
    position     "a red circle to the left of a blue square" (colours named half the time)
    attribution  "a red circle and a blue triangle"         (two shapes, two colours, both named)

Every caption parses back to its `Spec` (`parse_prompt`), so captions, prompts and plain strings
given to the evaluator are one language. Items are deterministic from (seed, index) alone: each
draws from its own `numpy.random.Generator`, never from a global RNG, so a DataLoader worker
gives the same item as the main process.

Geometry (in pixels at size 32; everything scales with size / 32):
* single-object scenes: radius 5-7, centred on one of a 3x3 grid of cells (cell centres at
  1/6, 1/2, 5/6 of the side) with +-1 px jitter, kept 1 px inside the canvas. A shape's
  "radius" is the circle's radius, the square's half side and the triangle's half base and
  half height (apex up), so all three fill the same bounding box 2r x 2r.
* multi-object scenes: smaller radii (4.5-6 for two objects, 4-5.5 for three, 4-5 for four),
  placed at random with their bounding boxes at least 2.5 px apart, so a detector can always
  separate them; position scenes put the pair at least a quarter of the side apart along the
  named axis and at most half that across it, so the relation is unambiguous.
Edges are anti-aliased by rendering each shape's coverage on a 4x4 sub-pixel grid.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "SHAPES", "COLOURS", "BACKGROUND", "POSITIONS", "RELATIONS", "KINDS", "CATEGORIES",
    "DEFAULT_KINDS", "ObjectSpec", "Spec", "Prompt", "PlacedObject", "ShapesDataset",
    "caption", "category_of", "parse_prompt", "geneval_prompts", "sample_spec", "sample_layout",
    "render", "render_spec", "degrade", "position_cell",
]

SHAPES = ("circle", "square", "triangle")
# Far apart in RGB (closest pair: blue / purple, 0.61) and bright against the background in at
# least one channel; names are plain words a sentence encoder knows.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.15, 0.25, 1.00),
    "yellow": (0.95, 0.90, 0.15),
    "purple": (0.75, 0.20, 0.90),
    "cyan": (0.15, 0.90, 0.95),
}
BACKGROUND = (0.04, 0.04, 0.05)
# Row-major 3x3 grid: POSITIONS[3 * row + col].
POSITIONS = ("top left", "top", "top right", "left", "centre", "right",
             "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("single", "two", "count", "position", "attribution")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
DEFAULT_KINDS = {"single": 0.6, "two": 0.1, "count": 0.1, "position": 0.1, "attribution": 0.1}

_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
_COUNTS = tuple(_NUMBER_WORDS)
# How often a caption names the colour where the grammar makes it optional. Unnamed colours
# teach the model the prompts GenEval asks ("a circle at the top", "three triangles").
_P_COLOUR_SINGLE = 0.8
_P_COLOUR_COUNT = 0.5
_P_COLOUR_POSITION = 0.5
# Radius ranges (pixels at size 32) by number of objects in the scene.
_RADIUS_RANGE = {1: (5.0, 7.0), 2: (4.5, 6.0), 3: (4.0, 5.5), 4: (4.0, 5.0)}
_JITTER = 1.0      # single-object centre jitter, px at size 32
_MARGIN = 1.0      # shapes stay this far inside the canvas, px at size 32
_GAP = 2.5         # minimum gap between bounding boxes of different objects, px at size 32
_SUPERSAMPLE = 4


# ----------------------------------------------------------------------------- specs and text

@dataclass(frozen=True)
class ObjectSpec:
    """One object a caption names: a shape and, if the caption names it, a colour."""
    shape: str
    colour: str | None = None


@dataclass(frozen=True)
class Spec:
    """What a caption says, as data.

    kind: one of KINDS. objects: single -> 1; two / attribution -> 2; position -> 2 with
    `objects[0] <relation> objects[1]`; count -> 1, the counted object, with `count` copies.
    position: the grid cell of a single object (one of POSITIONS, or None: not named).
    """
    kind: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    position: str | None = None
    relation: str | None = None

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {"kind": self.kind, "objects": [{"shape": o.shape, "colour": o.colour} for o in self.objects],
                "count": self.count, "position": self.position, "relation": self.relation}


@dataclass(frozen=True)
class Prompt:
    """A GenEval-style prompt: its category (one of CATEGORIES), its text and the parsed spec."""
    category: str
    text: str
    spec: Spec = field(compare=False)

    @classmethod
    def from_text(cls, text: str) -> "Prompt":
        spec = parse_prompt(text)
        return cls(category_of(spec), caption(spec), spec)


def _noun(o: ObjectSpec, plural: bool = False) -> str:
    name = o.shape + ("s" if plural else "")
    return f"{o.colour} {name}" if o.colour else name


def _where(position: str) -> str:
    # Natural prepositions; parse_prompt accepts any of at / on / in before any cell name.
    if position == "centre":
        return "in the centre"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def caption(spec: Spec) -> str:
    """The caption of a spec (the grammar's one canonical sentence for it)."""
    o = spec.objects
    if spec.kind == "single":
        text = f"a {_noun(o[0])}"
        return f"{text} {_where(spec.position)}" if spec.position else text
    if spec.kind in ("two", "attribution"):
        return f"a {_noun(o[0])} and a {_noun(o[1])}"
    if spec.kind == "count":
        if spec.count not in _NUMBER_WORDS:
            raise ValueError(f"spec.count: expected one of {_COUNTS}, got {spec.count!r}")
        return f"{_NUMBER_WORDS[spec.count]} {_noun(o[0], plural=True)}"
    if spec.kind == "position":
        rel = spec.relation if spec.relation in ("above", "below") else f"to the {spec.relation}"
        return f"a {_noun(o[0])} {rel} a {_noun(o[1])}"
    raise ValueError(f"spec.kind: expected one of {KINDS}, got {spec.kind!r}")


def category_of(spec: Spec) -> str:
    """The GenEval category a spec is scored under."""
    if spec.kind == "single":
        return "colors" if spec.objects[0].colour else "single_object"
    return {"two": "two_object", "attribution": "color_attr", "count": "counting",
            "position": "position"}[spec.kind]


_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_OBJ = rf"(?:({_COLOUR_RE}) )?({_SHAPE_RE})"
_POS_NAMES = {p: p for p in POSITIONS} | {"center": "centre", "middle": "centre"}
_POS_RE = "|".join(sorted(_POS_NAMES, key=len, reverse=True))
_REL_NAMES = {"to the left of": "left of", "left of": "left of", "to the right of": "right of",
              "right of": "right of", "above": "above", "below": "below"}
_REL_RE = "|".join(sorted(_REL_NAMES, key=len, reverse=True))
_NUM_NAMES = {"two": 2, "three": 3, "four": 4, "2": 2, "3": 3, "4": 4}
_SINGLE = re.compile(rf"an? {_OBJ}(?: (?:at|on|in) the ({_POS_RE}))?")
_PAIR = re.compile(rf"an? {_OBJ} and an? {_OBJ}")
_RELATIVE = re.compile(rf"an? {_OBJ} ({_REL_RE}) an? {_OBJ}")
_COUNT = re.compile(rf"({'|'.join(_NUM_NAMES)}) (?:({_COLOUR_RE}) )?({_SHAPE_RE})s")


def parse_prompt(text: str) -> Spec:
    """Inverse of `caption`: the Spec a caption / prompt describes.

    Case, surrounding spaces, repeated spaces, a trailing full stop and "a photo of" are
    ignored; "center" / "middle" mean "centre"; numbers may be digits. Anything else outside
    the grammar (see the module docstring) raises ValueError naming the text.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_prompt: text must be a str, got {type(text).__name__}")
    t = " ".join(text.lower().strip().rstrip(".").split())
    if t.startswith("a photo of "):
        t = t[len("a photo of "):]
    if m := _SINGLE.fullmatch(t):
        pos = _POS_NAMES[m[3]] if m[3] else None
        return Spec("single", (ObjectSpec(m[2], m[1]),), position=pos)
    if m := _RELATIVE.fullmatch(t):
        a, b = ObjectSpec(m[2], m[1]), ObjectSpec(m[5], m[4])
        return Spec("position", (a, b), relation=_REL_NAMES[m[3]])
    if m := _PAIR.fullmatch(t):
        a, b = ObjectSpec(m[2], m[1]), ObjectSpec(m[4], m[3])
        kind = "attribution" if a.colour and b.colour else "two"
        return Spec(kind, (a, b))
    if m := _COUNT.fullmatch(t):
        return Spec("count", (ObjectSpec(m[3], m[2]),), count=_NUM_NAMES[m[1]])
    raise ValueError(
        f"parse_prompt: {text!r} is not in the shapes grammar; expected e.g. 'a red circle at the "
        f"top left', 'a circle and a square', 'three green triangles', 'a red circle to the left "
        f"of a blue square' or 'a red circle and a blue triangle' (shapes {SHAPES}, colours "
        f"{tuple(COLOURS)}, counts 2-4)")


# ----------------------------------------------------------------------------- random specs

def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _two_shapes(rng):
    a, b = rng.choice(len(SHAPES), size=2, replace=False)
    return SHAPES[a], SHAPES[b]


def sample_spec(kind: str, rng: np.random.Generator) -> Spec:
    """A random caption spec of one scene kind (see the module docstring for the odds)."""
    colours = tuple(COLOURS)
    if kind == "single":
        colour = _pick(rng, colours) if rng.random() < _P_COLOUR_SINGLE else None
        return Spec("single", (ObjectSpec(_pick(rng, SHAPES), colour),), position=_pick(rng, POSITIONS))
    if kind == "two":
        a, b = _two_shapes(rng)
        return Spec("two", (ObjectSpec(a), ObjectSpec(b)))
    if kind == "count":
        colour = _pick(rng, colours) if rng.random() < _P_COLOUR_COUNT else None
        return Spec("count", (ObjectSpec(_pick(rng, SHAPES), colour),), count=_pick(rng, _COUNTS))
    if kind == "position":
        a, b = _two_shapes(rng)
        ca = cb = None
        if rng.random() < _P_COLOUR_POSITION:
            ca, cb = _pick(rng, colours), _pick(rng, colours)
        return Spec("position", (ObjectSpec(a, ca), ObjectSpec(b, cb)), relation=_pick(rng, RELATIONS))
    if kind == "attribution":
        a, b = _two_shapes(rng)
        i, j = rng.choice(len(colours), size=2, replace=False)
        return Spec("attribution", (ObjectSpec(a, colours[i]), ObjectSpec(b, colours[j])))
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class PlacedObject:
    """An object in a rendered scene: centre and radius in pixels."""
    shape: str
    colour: str
    cx: float
    cy: float
    radius: float


def position_cell(cx: float, cy: float) -> str:
    """The grid cell (one of POSITIONS) of a point given in [0, 1] image coordinates."""
    col = min(max(int(cx * 3), 0), 2)
    row = min(max(int(cy * 3), 0), 2)
    return POSITIONS[3 * row + col]


def _objects_to_place(spec: Spec, rng) -> list[tuple[str, str]]:
    """(shape, colour) of every object of a scene; unnamed colours drawn at random."""
    colours = tuple(COLOURS)
    out = []
    for o in spec.objects:
        for _ in range(spec.count if spec.kind == "count" else 1):
            out.append((o.shape, o.colour or _pick(rng, colours)))
    return out


def _boxes_apart(x1, y1, r1, x2, y2, r2, gap) -> bool:
    # Axis-aligned bounding boxes (every shape fits its 2r x 2r box) separated by >= gap.
    return abs(x1 - x2) >= r1 + r2 + gap or abs(y1 - y2) >= r1 + r2 + gap


def _relation_holds(rel, ax, ay, bx, by, size) -> bool:
    d_along, d_across = {"left of": (bx - ax, by - ay), "right of": (ax - bx, ay - by),
                         "above": (by - ay, bx - ax), "below": (ay - by, ax - bx)}[rel]
    return d_along >= 0.25 * size and abs(d_across) <= 0.5 * d_along


def sample_layout(spec: Spec, size: int, rng: np.random.Generator) -> list[PlacedObject]:
    """Where each object of `spec` goes in a size x size image (see the module docstring)."""
    scale = size / 32.0
    objs = _objects_to_place(spec, rng)
    lo, hi = _RADIUS_RANGE[len(objs)]
    radii = [float(rng.uniform(lo, hi)) * scale for _ in objs]
    margin = _MARGIN * scale
    if spec.kind == "single":
        (shape, colour), r = objs[0], radii[0]
        if spec.position is None:
            cell = int(rng.integers(9))
        else:
            cell = POSITIONS.index(spec.position)
        row, col = divmod(cell, 3)
        jx, jy = rng.uniform(-_JITTER, _JITTER, size=2) * scale
        cx = float(np.clip((col + 0.5) * size / 3 + jx, r + margin, size - r - margin))
        cy = float(np.clip((row + 0.5) * size / 3 + jy, r + margin, size - r - margin))
        return [PlacedObject(shape, colour, cx, cy, r)]
    # Rejection sampling, one object at a time; a dead end restarts the scene, and radii shrink a
    # little after many restarts so the loop always ends (rarely needed at these densities).
    gap = _GAP * scale
    for attempt in range(200):
        shrink = 0.97 ** (attempt // 20)
        rs = [r * shrink for r in radii]
        placed: list[tuple[float, float]] = []
        for r in rs:
            for _ in range(100):
                x, y = rng.uniform(r + margin, size - r - margin, size=2)
                if not all(_boxes_apart(x, y, r, px, py, pr, gap) for (px, py), pr in zip(placed, rs)):
                    continue
                if spec.kind == "position" and placed:
                    (ax, ay), = placed
                    if not _relation_holds(spec.relation, ax, ay, x, y, size):
                        continue
                placed.append((float(x), float(y)))
                break
            else:
                break
        if len(placed) == len(objs):
            return [PlacedObject(s, c, x, y, r) for (s, c), (x, y), r in zip(objs, placed, rs)]
    raise RuntimeError(f"sample_layout: could not place {caption(spec)!r} at size {size}")


# ----------------------------------------------------------------------------- rendering

def _coverage(shape: str, cx: float, cy: float, r: float, x0: int, x1: int, y0: int, y1: int):
    """Fraction of each pixel in [y0:y1, x0:x1] the shape covers (4x4 sub-pixel samples)."""
    ss = _SUPERSAMPLE
    xs = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss
    ys = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss
    dx, dy = xs[None, :] - cx, ys[:, None] - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "triangle":
        # apex (cx, cy - r); base y = cy + r from cx - r to cx + r
        inside = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")
    return inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3), dtype=np.float32)


def render(objects: list[PlacedObject], size: int) -> np.ndarray:
    """float32 (3, size, size) image in [0, 1]: the objects painted over the background."""
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size: expected an int >= 8, got {size!r}")
    img = np.empty((3, size, size), np.float32)
    img[:] = np.asarray(BACKGROUND, np.float32)[:, None, None]
    for o in objects:
        x0, x1 = max(int(np.floor(o.cx - o.radius)) - 1, 0), min(int(np.ceil(o.cx + o.radius)) + 1, size)
        y0, y1 = max(int(np.floor(o.cy - o.radius)) - 1, 0), min(int(np.ceil(o.cy + o.radius)) + 1, size)
        cov = _coverage(o.shape, o.cx, o.cy, o.radius, x0, x1, y0, y1)
        colour = np.asarray(COLOURS[o.colour], np.float32)[:, None, None]
        region = img[:, y0:y1, x0:x1]
        img[:, y0:y1, x0:x1] = region + (colour - region) * cov
    return img


def render_spec(spec: Spec | str, size: int = 32, seed: int = 0) -> torch.Tensor:
    """A (3, size, size) image that satisfies `spec` (a Spec or a caption), drawn with `seed`:
    the "perfect model" for a prompt, used to check the evaluator and as an upper bound."""
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    rng = np.random.default_rng([int(seed), 0x5EED])
    return torch.from_numpy(render(sample_layout(spec, size, rng), size))


def degrade(images: torch.Tensor, *, blur_px: float = 0.0, noise: float = 0.0, contrast: float = 1.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Renders made to look like a small model's samples, to check the detector on: (B, 3, H, W)
    images in [0, 1] pulled toward the background (`contrast` < 1), blurred by a Gaussian of
    sigma `blur_px` pixels (edges replicated), plus N(0, noise^2) noise drawn from `generator`,
    clipped to [0, 1]. One batched call (per-image convolutions crawl on a busy machine)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a (B, 3, H, W) tensor, got {got}")
    for name, v in (("blur_px", blur_px), ("noise", noise), ("contrast", contrast)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    images = images.float()
    if contrast != 1.0:
        bg = torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        images = bg + contrast * (images - bg)
    if blur_px > 0:
        k = int(np.ceil(3 * blur_px))
        x = torch.arange(-k, k + 1, dtype=images.dtype, device=images.device)
        g = torch.exp(-x ** 2 / (2 * blur_px ** 2))
        g = (g / g.sum()).repeat(3, 1, 1, 1)
        im = torch.nn.functional.pad(images, (k, k, k, k), mode="replicate")
        conv = torch.nn.functional.conv2d
        images = conv(conv(im, g.view(3, 1, 1, -1), groups=3), g.view(3, 1, -1, 1), groups=3)
    if noise > 0:
        images = images + noise * torch.randn(images.shape, generator=generator, device=images.device)
    return images.clamp(0, 1)


# ----------------------------------------------------------------------------- data set

def _check_kinds(kinds) -> tuple[tuple[str, ...], np.ndarray]:
    if kinds is None:
        kinds = DEFAULT_KINDS
    if not isinstance(kinds, dict) or not kinds:
        raise ValueError(f"kinds: expected a non-empty dict {{kind: weight}} with kinds from {KINDS}, got {kinds!r}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"kinds: unknown scene kind(s) {unknown}; expected some of {KINDS}")
    w = np.array([float(v) for v in kinds.values()], np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"kinds: weights must be finite, >= 0 and not all 0, got {kinds!r}")
    return tuple(kinds), w / w.sum()


class ShapesDataset(torch.utils.data.Dataset):
    """Synthetic captioned shapes: `ds[i] -> (image, caption)`, image float32 (3, size, size)
    in [0, 1], caption a str. Deterministic from (seed, i) alone.

    kinds: {kind: weight} over KINDS (default DEFAULT_KINDS: 60% single-object scenes).
    """

    def __init__(self, size: int = 32, length: int = 100_000, seed: int = 0, kinds: dict | None = None):
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 16:
            raise ValueError(f"size: expected an int >= 16, got {size!r}")
        if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 0:
            raise ValueError(f"length: expected an int >= 0, got {length!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        self.size, self.length, self.seed = int(size), int(length), int(seed)
        self.kinds, self._kind_p = _check_kinds(kinds)

    def __len__(self) -> int:
        return self.length

    def _index(self, index) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index: expected an int, got {type(index).__name__}")
        i = int(index) + (self.length if index < 0 else 0)
        if not 0 <= i < self.length:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.length}")
        return i

    def scene(self, index: int) -> tuple[Spec, list[PlacedObject]]:
        """The spec and the placed objects of item `index` (what `ds[index]` renders)."""
        rng = np.random.default_rng([self.seed, self._index(index)])
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self._kind_p))]
        spec = sample_spec(kind, rng)
        return spec, sample_layout(spec, self.size, rng)

    def __getitem__(self, index) -> tuple[torch.Tensor, str]:
        spec, objects = self.scene(index)
        return torch.from_numpy(render(objects, self.size)), caption(spec)

    def __repr__(self) -> str:
        kinds = dict(zip(self.kinds, np.round(self._kind_p, 3).tolist()))
        return f"ShapesDataset(size={self.size}, length={self.length}, seed={self.seed}, kinds={kinds})"


# ----------------------------------------------------------------------------- GenEval prompts

def _all_specs(category: str) -> list[Spec]:
    """Every distinct prompt of a category in our grammar."""
    pairs = list(itertools.permutations(SHAPES, 2))
    if category == "single_object":
        return [Spec("single", (ObjectSpec(s),), position=p) for s in SHAPES for p in POSITIONS]
    if category == "colors":
        return [Spec("single", (ObjectSpec(s, c),), position=p) for c in COLOURS for s in SHAPES for p in POSITIONS]
    if category == "two_object":
        return [Spec("two", (ObjectSpec(a), ObjectSpec(b))) for a, b in pairs]
    if category == "counting":
        return [Spec("count", (ObjectSpec(s),), count=n) for s in SHAPES for n in _COUNTS]
    if category == "position":
        return [Spec("position", (ObjectSpec(a), ObjectSpec(b)), relation=r) for a, b in pairs for r in RELATIONS]
    if category == "color_attr":
        return [Spec("attribution", (ObjectSpec(a, ca), ObjectSpec(b, cb)))
                for a, b in pairs for ca, cb in itertools.permutations(COLOURS, 2)]
    raise ValueError(f"categories: expected names from {CATEGORIES}, got {category!r}")


def geneval_prompts(per_category: int = 50, seed: int = 0, categories=None) -> list[Prompt]:
    """GenEval-style prompts in our grammar: `per_category` of each category (GenEval's names,
    CATEGORIES), in category order. Each category's distinct prompts are shuffled (seeded) and
    taken in turn, so every distinct prompt appears before any repeats.

    single_object: "a circle at the top left"; colors: "a red circle at the top left";
    two_object: "a circle and a square"; counting: "three triangles";
    position: "a circle to the left of a square"; color_attr: "a red circle and a blue triangle".
    """
    if not isinstance(per_category, (int, np.integer)) or isinstance(per_category, bool) or per_category < 1:
        raise ValueError(f"per_category: expected an int >= 1, got {per_category!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if categories is None:
        categories = CATEGORIES
    if isinstance(categories, str) or not all(c in CATEGORIES for c in categories):
        raise ValueError(f"categories: expected a list of names from {CATEGORIES}, got {categories!r}")
    prompts = []
    for category in categories:
        specs = _all_specs(category)
        rng = np.random.default_rng([int(seed), CATEGORIES.index(category)])
        order: list[int] = []
        while len(order) < per_category:
            order.extend(rng.permutation(len(specs)).tolist())
        prompts.extend(Prompt(category, caption(specs[i]), specs[i]) for i in order[:per_category])
    return prompts
