"""GenEval-style evaluation on the synthetic shapes: a rule-based detector and the scorer.

    from fluid_ops.eval import geneval_prompts, evaluate
    prompts = geneval_prompts(per_category=50)
    images = model.generate([p.text for p in prompts])      # (B, 3, H, W) in [0, 1]
    result = evaluate(images, prompts)                       # {"overall", "categories", "prompts"}
"""
from fluid_ops.data.shapes import CATEGORIES, Prompt, geneval_prompts, parse_prompt, render_spec  # noqa: F401
from fluid_ops.eval.detector import Detection, detect  # noqa: F401
from fluid_ops.eval.geneval import POSITION_MARGIN, evaluate, score_prompt  # noqa: F401

__all__ = ["CATEGORIES", "Detection", "POSITION_MARGIN", "Prompt", "detect", "evaluate",
           "geneval_prompts", "parse_prompt", "render_spec", "score_prompt"]
