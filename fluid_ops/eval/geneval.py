"""GenEval-style scoring of generated shapes images against their prompts.

GenEval (Ghosh et al., 2023) asks an object detector whether an image has what its prompt
names, per category; the overall score is the mean of the category accuracies. Here the
detector is `fluid_ops.eval.detect` and the rules, per category (an object "matches" a named
one when the shape is the same and, where the prompt names a colour, the colour too):

    single_object  the named shape is present (the named grid cell is reported apart, as
                   `position`, not scored: GenEval's single-object prompts name no place)
    colors         a shape of that name in that colour is present (cell reported apart)
    two_object     both named shapes are present
    counting       exactly n objects match the named one (other objects do not count)
    position       both objects are present (`present`) and some matching pair has the
                   relation: the centres differ by more than POSITION_MARGIN of the image
                   along the named axis, the right way round
    color_attr     both (shape, colour) pairs are present, as two different objects

For single_object / colors prompts the detection that best matches the prompt (full match,
else the named shape, else the named colour, else the largest) is also scored on its `shape`,
`colour` (colors only) and `position` (cell) alone: a tiny model often gets one of them right
before the others, and these accuracies show which.
"""
from __future__ import annotations

import sys

from fluid_ops.data.shapes import CATEGORIES, Prompt, Spec
from fluid_ops.eval.detector import Detection, detect

__all__ = ["evaluate", "score_prompt", "POSITION_MARGIN"]

POSITION_MARGIN = 0.1  # fraction of the image side (GenEval's rule of thumb)


def _matches(det: Detection, obj) -> bool:
    return det.shape == obj.shape and (obj.colour is None or det.colour == obj.colour)


def _relation(rel: str, a: Detection, b: Detection) -> bool:
    m = POSITION_MARGIN
    if rel == "left of":
        return a.cx < b.cx - m
    if rel == "right of":
        return a.cx > b.cx + m
    if rel == "above":
        return a.cy < b.cy - m
    if rel == "below":
        return a.cy > b.cy + m
    raise ValueError(f"relation: expected left of / right of / above / below, got {rel!r}")


def _pairs(dets, a, b):
    """(da, db): two different detections matching objects a and b."""
    return [(da, db) for i, da in enumerate(dets) if _matches(da, a)
            for j, db in enumerate(dets) if j != i and _matches(db, b)]


def _primary(dets, obj):
    for ok in (lambda d: _matches(d, obj), lambda d: d.shape == obj.shape,
               lambda d: obj.colour is not None and d.colour == obj.colour):
        found = [d for d in dets if ok(d)]
        if found:
            return found[0]  # dets are sorted largest first
    return dets[0] if dets else None


def score_prompt(spec: Spec, category: str, dets: list[Detection]) -> dict:
    """The verdict for one prompt, given the detections in its image."""
    out: dict = {}
    o = spec.objects
    if category in ("single_object", "colors"):
        out["correct"] = any(_matches(d, o[0]) for d in dets)
        p = _primary(dets, o[0])
        out["shape"] = p is not None and p.shape == o[0].shape
        if category == "colors":
            out["colour"] = p is not None and p.colour == o[0].colour
        if spec.position is not None:
            out["position"] = p is not None and p.cell == spec.position
    elif category in ("two_object", "color_attr"):
        out["correct"] = bool(_pairs(dets, o[0], o[1]))
    elif category == "counting":
        n = sum(_matches(d, o[0]) for d in dets)
        out["correct"] = n == spec.count
        out["detected_count"] = n
    elif category == "position":
        pairs = _pairs(dets, o[0], o[1])
        out["present"] = bool(pairs)
        out["correct"] = any(_relation(spec.relation, da, db) for da, db in pairs)
    else:
        raise ValueError(f"category: expected one of {CATEGORIES}, got {category!r}")
    return out


def _as_prompt(p, i) -> Prompt:
    if isinstance(p, Prompt):
        return p
    if isinstance(p, str):
        return Prompt.from_text(p)
    raise TypeError(f"prompts[{i}]: expected a Prompt or a str, got {type(p).__name__}")


def evaluate(images, prompts, *, progress: bool | None = None, detections: bool = True) -> dict:
    """Score images against their prompts, GenEval style (rules in the module docstring).

    images: a (B, 3, H, W) tensor in [0, 1] or a list of (3, H, W) tensors / arrays;
    prompts: B `Prompt`s or strings of the shapes grammar (parsed; the category follows from
    the text). progress: tqdm bar (default: when stderr is a terminal). detections: include
    each image's detections in the per-prompt records.

    Returns a JSON-serialisable dict: {"overall": mean of the category accuracies,
    "categories": {name: {"accuracy", "n", and for single_object / colors the "shape",
    "colour", "position" accuracies}}, "prompts": [{"text", "category", "correct", ...}]}.
    """
    if hasattr(images, "ndim") and getattr(images, "ndim", None) == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images: expected a (B, 3, H, W) tensor or a list of (3, H, W) images, "
                        f"got {type(images).__name__}"
                        + (f" of shape {tuple(images.shape)}" if hasattr(images, "shape") else ""))
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts: expected a list of Prompt or str, got {type(prompts).__name__}")
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts: expected one image per prompt, got {len(images)} images "
                         f"and {len(prompts)} prompts")
    prompts = [_as_prompt(p, i) for i, p in enumerate(prompts)]
    if progress is None:
        progress = sys.stderr.isatty()
    items = zip(images, prompts)
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, total=len(prompts), desc="evaluate", leave=False)
    records = []
    for i, (image, prompt) in enumerate(items):
        try:
            dets = detect(image)
        except (TypeError, ValueError) as e:
            raise type(e)(f"images[{i}]: {e}") from None
        rec = {"text": prompt.text, "category": prompt.category}
        rec.update(score_prompt(prompt.spec, prompt.category, dets))
        if detections:
            rec["detections"] = [d.to_dict() for d in dets]
        records.append(rec)
    categories = {}
    for name in CATEGORIES:
        recs = [r for r in records if r["category"] == name]
        if not recs:
            continue
        entry = {"accuracy": sum(r["correct"] for r in recs) / len(recs), "n": len(recs)}
        for key in ("shape", "colour", "position"):
            vals = [r[key] for r in recs if key in r]
            if vals:
                entry[key] = sum(vals) / len(vals)
        categories[name] = entry
    overall = sum(c["accuracy"] for c in categories.values()) / len(categories) if categories else float("nan")
    return {"overall": overall, "categories": categories, "prompts": records}
