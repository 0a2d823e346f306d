"""Rewards of the Shapes world: the exact evaluator, the oracle annotator and the bundled tiny CLIP.

Prompts are captions of the Shapes grammar (strings, parsed by ``diffalign.shapes.grammar``) or
``ShapesPrompt`` objects. The Shapes modules are imported only when these rewards are built.
"""

from __future__ import annotations

import os

import torch

from diffalign.rewards.base import Images, Mode, RewardModel, to_pil
from diffalign.rewards.hf_clip import CLIPReward, load_hf_clip
from diffalign.rewards.preprocess import from_hf_processor


class ShapesEvalReward(RewardModel):
    """The share of the caption's claims that hold in the image (``EvalResult.fraction``, in [0, 1];
    1.0 iff the image is GenEval-correct). Not differentiable."""

    name = "shapes-eval"
    differentiable = False

    def __init__(self, mode: Mode = "exact", batch_size: int = 64):
        super().__init__(mode=mode, batch_size=batch_size)
        from diffalign.shapes.evaluate import evaluate

        self._evaluate = evaluate

    def _score(self, images: Images, prompts: list) -> torch.Tensor:
        return torch.tensor([self._evaluate(im, p).fraction for im, p in zip(to_pil(images), prompts)])


class ShapesOracleReward(RewardModel):
    """The oracle annotator's noise-free utility ``fidelity_weight · fidelity + quality_weight ·
    quality`` (in [0, 1.5] with the default weights). Keyword arguments go to ``Oracle``."""

    name = "shapes-oracle"
    differentiable = False

    def __init__(self, mode: Mode = "exact", batch_size: int = 64, **oracle_kw):
        super().__init__(mode=mode, batch_size=batch_size)
        from diffalign.shapes.oracle import Oracle

        self.oracle = Oracle(**oracle_kw)

    def _score(self, images: Images, prompts: list) -> torch.Tensor:
        return torch.tensor([self.oracle.utility(im, p) for im, p in zip(to_pil(images), prompts)])


class ShapesCLIP(CLIPReward):
    """The bundled learned Shapes reward, PickScore convention: ``logit_scale.exp() · cos`` on a tiny
    ``CLIPModel`` with its saved processor (64 px, mean = std = 0.5) and word-level tokenizer."""

    name = "shapes-clip"

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, allow_pickle: bool = False,
                        **kw) -> ShapesCLIP:
        """``weights``: the model folder (default: ``diffalign/shapes/assets/shapes-clip-reward``)."""
        if weights is None:
            from diffalign.shapes.model import reward_model_path

            weights = reward_model_path()
            if not (weights / "config.json").is_file():
                raise FileNotFoundError(f"the bundled Shapes reward is missing ({weights}); train it with "
                                        "`diffalign shapes pretrain-reward` or pass weights=DIR")
        model, tok, proc = load_hf_clip(weights, None, "Shapes CLIP", allow_pickle)
        return cls(model, tok, from_hf_processor(proc), scale="logit_scale", **kw)

    def _score(self, images: Images, prompts: list) -> torch.Tensor:
        return super()._score(images, [p if isinstance(p, str) else p.text for p in prompts])


class ShapesPickScore(ShapesCLIP):
    """The bundled Shapes CLIP fine-tuned on the oracle's preference pairs (``diffalign.shapes.pretrain_pickscore``),
    as PickScore is CLIP fine-tuned on Pick-a-Pic: scored the same way, but it ranks base-model samples as the
    oracle does (79 of 100 pairs of unseen prompts, ``shapes-clip`` 60: chance). Differentiable."""

    name = "shapes-pickscore"

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, allow_pickle: bool = False,
                        **kw) -> ShapesPickScore:
        """``weights``: the model folder (default: ``diffalign/shapes/assets/shapes-pickscore``)."""
        if weights is None:
            from diffalign.shapes.model import pickscore_model_path

            weights = pickscore_model_path()
            if not (weights / "config.json").is_file():
                raise FileNotFoundError(f"the bundled Shapes PickScore is missing ({weights}); train it with "
                                        "`diffalign shapes pretrain-pickscore` or pass weights=DIR")
        return super().from_pretrained(weights, allow_pickle=allow_pickle, **kw)
