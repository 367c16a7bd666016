"""Data sets for text-to-image training: synthetic captioned shapes, image-caption folders and
WebDataset tar shards (raw image-caption pairs, or caches written by `fluid-ops prepare`)."""
from fluid_ops.data.folder import IMAGE_SUFFIXES, DataError, ImageCaptionFolder, collate  # noqa: F401
from fluid_ops.data.shapes import (  # noqa: F401
    BACKGROUND, CATEGORIES, COLOURS, DEFAULT_KINDS, KINDS, POSITIONS, RELATIONS, SHAPES,
    ObjectSpec, PlacedObject, Prompt, ShapesDataset, Spec, caption, category_of, degrade, geneval_prompts,
    parse_prompt, position_cell, render, render_spec, sample_layout, sample_spec,
)
from fluid_ops.data.shards import ShardDataset, ShardError, list_shards, write_shards  # noqa: F401
