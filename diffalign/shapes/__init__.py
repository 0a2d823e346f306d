"""The Shapes world: a renderer of coloured-shape scenes, a GenEval-style caption grammar, an exact
evaluator (ShapesEval) and an oracle preference annotator.

Only these four light modules (numpy, PIL, scipy) are imported here; the base model, tokenizer and
pretraining scripts (torch, diffusers) are imported from their own modules when needed.
"""

from diffalign.shapes.evaluate import (
                                      Detection,
                                      EvalResult,
                                      detect,
                                      evaluate,
                                      shapes_eval,
)
from diffalign.shapes.grammar import (
                                      TASKS,
                                      ShapesPrompt,
                                      all_prompts,
                                      make_prompt,
                                      parse_prompt,
                                      prompt_set,
                                      prompts_in_split,
                                      sample_prompt,
                                      scene_for_prompt,
                                      split_of,
)
from diffalign.shapes.oracle import Oracle, to_jpeg_bytes, to_png_bytes, visual_quality
from diffalign.shapes.scene import (
                                      COLORS,
                                      IMAGE_SIZE,
                                      SHAPES,
                                      Scene,
                                      ShapeObject,
                                      random_background,
                                      render,
)

__all__ = [
    "COLORS", "SHAPES", "IMAGE_SIZE", "ShapeObject", "Scene", "render", "random_background",
    "TASKS", "ShapesPrompt", "sample_prompt", "prompt_set", "scene_for_prompt", "parse_prompt", "make_prompt",
    "all_prompts", "prompts_in_split", "split_of",
    "Detection", "EvalResult", "detect", "evaluate", "shapes_eval",
    "Oracle", "visual_quality", "to_jpeg_bytes", "to_png_bytes",
]
