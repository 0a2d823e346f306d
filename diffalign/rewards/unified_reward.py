"""UnifiedReward (CodeGoat24/UnifiedReward): a Qwen2.5-VL judge that writes its verdict as text.

Pointwise (``unifiedreward``), as the RL code uses it (flow_grpo ``unifiedreward_score_sglang``,
DiffusionNFT): one user turn = the image + the caption prompt, greedy decoding (``temperature=0``),
at most ``max_new_tokens`` (512) tokens, then::

    m     = re.search(r"Final Score:\\s*([1-5](?:\\.\\d+)?)", answer)
    score = float(m.group(1)) / 5        in [0.2, 1]
    score = 0.0                          when there is no match (a formatting failure becomes the
                                         worst reward, as in flow_grpo; ``failure_score=`` changes it)

Pairwise (``unifiedreward-pairwise``): two images and the caption in one turn; the answer
"Image 1 is better" gives ``P(1 ≻ 2) = 1``, "Image 2 is better" 0, "Both images are equally good" ½;
UnifiedReward-Think answers inside ``<answer>…</answer>`` (read first when present); no verdict
gives ½ (Pref-GRPO's rule). :meth:`UnifiedReward.prefer` is the pairwise interface
``prefer(images_a, images_b, prompts) -> P(a ≻ b) [n]`` of
:func:`diffalign.rewards.combine.win_rates_pairwise`; the registered pairwise reward scores each
image by its Pref-GRPO win rate within consecutive groups of ``group_size`` images of one prompt,
every ordered pair judged (both positions, so a position bias averages out).

Prompts: ``"qwen"`` (default) is the text of the Qwen checkpoints' own inference scripts
(``inference_qwen/image_generation/qwen_point_score_image_generation.py``, which also asks to list the
caption's key elements, and ``qwen_pair_rank_image_generation.py``), ``"short"`` the pointwise version
flow_grpo / DiffusionNFT send (without the element list, for the LLaVA-based ``UnifiedReward-7b-v1.5``),
``pair_prompt="think"`` UnifiedReward-Think's (``UnifiedReward-Think/inference_qwen/image_generation/
qwen_infer_cot_image_generation.py``). Images go through Qwen's sizing
(:mod:`diffalign.rewards.qwen_vl`). Decoding is greedy; other generation settings (e.g. a
``repetition_penalty``) come from the checkpoint's ``generation_config.json``, as the reference scripts'
``model.generate`` uses them.
Batches are left-padded for generation; the reference judges one conversation at a time, which gives
the same greedy answer up to floating-point ties.

Weights: a Hugging Face folder / hub id of ``Qwen2_5_VLForConditionalGeneration`` (default
``CodeGoat24/UnifiedReward-qwen-7b``; any ``UnifiedReward-qwen-*`` or ``UnifiedReward-2.0-qwen-*``
folder loads the same way), safetensors only unless ``allow_pickle``, never ``trust_remote_code``.
Not differentiable (the score is parsed from generated text).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import torch

from diffalign.rewards.base import Images, Mode, RewardModel, to_pil
from diffalign.rewards.combine import win_rates_pairwise
from diffalign.rewards.hf_clip import _from_pretrained, check_loading_info
from diffalign.rewards.qwen_vl import MAX_PIXELS, MIN_PIXELS, as_dtype, resize_pil

logger = logging.getLogger(__name__)

HUB_ID = "CodeGoat24/UnifiedReward-qwen-7b"
MAX_NEW_TOKENS = 512
SCORE_PATTERN = r"Final Score:\s*([1-5](?:\.\d+)?)"
_CRITERIA = (
    "1. Alignment with the Caption: Assess how well {this} image aligns with the provided caption. Consider the "
    "accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of {this} image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\n")
_POINT_HEAD = ("You are given a text caption and a generated image based on that caption. Your task is to evaluate "
               "this image based on two key criteria:\n" + _CRITERIA.format(this="this"))
POINT_PROMPTS = {
    "qwen": _POINT_HEAD + "Extract key elements from the provided text caption, evaluate their presence in the "
    "generated image using the format: 'element (type): value' (where value=0 means not generated, and value=1 means "
    "generated), and assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as follows:\n"
    "Text Caption: [{prompt}]",
    "short": _POINT_HEAD + "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\nText Caption: [{prompt}]",
}
PAIR_PROMPT = (
    "You are given a text caption and two generated images based on that caption. Your task is to evaluate and "
    "compare these images based on two key criteria:\n" + _CRITERIA.format(this="each") +
    "Compare both images using the above criteria and select the one that better aligns with the caption while "
    "exhibiting superior visual quality.\nProvide a clear conclusion such as \"Image 1 is better.\", "
    "\"Image 2 is better.\" and \"Both images are equally good.\"\nYour task is provided as follows:\n"
    "Text Caption: [{prompt}]")
THINK_PAIR_PROMPT = (
    "Given a caption and two images generated based on this caption, please analyze in detail the two provided "
    "images. Evaluate them on various dimensions such as semantic consistency (how closely the image content aligns "
    "with the caption), aesthetics (composition, color usage, artistic expression), authenticity (realism and "
    "attention to detail), and any other factors you deem relevant. For each evaluation dimension, provide a score "
    "between 1-10 for both images (e.g., Image 1: 8/10, Image 2: 6/10) and provide a concise rationale for the score. "
    "Calculate the total score for each image by summing all dimension scores. Use a chain-of-thought process to "
    "detail your reasoning steps, and enclose all your detailed reasoning within <think> and </think> tags. Then, in "
    "the <answer> tag, output exactly one of the following strings: 'Image 1 is better' or 'Image 2 is better' based "
    "on the total scores. No additional text is allowed in the <answer> section.\n\nExample output format:\n"
    "<think>\n1. Semantic consistency: Image 1 (9/10) - ...; Image 2 (7/10) - ...\n2. Aesthetics: Image 2 (8/10) - "
    "...; Image 1 (8/10) - ...\n3. Authenticity: Image 1 (8/10) - ...; Image 2 (5/10) - ...\n[Additional dimensions "
    "if any]: Image 2 (8/10) - ...; Image 1 (6/10) - ...\nTotal score:\nImage 1: 9+8+8+6=31\nImage 2: "
    "7+8+5+8=28\n</think>\n<answer>Image 1 is better</answer>\n**Note: In the example above, scores and the final "
    "answer are placeholders meant only to demonstrate the format. Your actual evaluation should be based on the "
    "quality of two given images.**\n\nYour task is provided as follows:\nText Caption: [{prompt}]")
# name -> (template, verdict only inside <answer>)
PAIR_PROMPTS = {"qwen": (PAIR_PROMPT, False), "think": (THINK_PAIR_PROMPT, True)}
VERDICTS = (("image 1 is better", 1.0), ("image 2 is better", 0.0), ("equally good", 0.5))


def parse_score(text: str, pattern: str = SCORE_PATTERN) -> float | None:
    """The judge's score (1–5) after ``Final Score:``, or None when the answer has none."""
    m = re.search(pattern, text or "")
    return float(m.group(1)) if m else None


def parse_preference(text: str, answer_tag: bool = False) -> float | None:
    """``P(image 1 ≻ image 2)`` from a pairwise answer: 1, 0 or ½ (the first verdict phrase found, inside the
    last ``<answer>…</answer>`` when the answer has that tag), or None when there is no verdict. With
    ``answer_tag`` (UnifiedReward-Think) only the tag counts: reasoning cut off before it is no verdict."""
    text = text or ""
    tags = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    if answer_tag and not tags:
        return None
    body = (tags[-1] if tags else text).lower()
    found = [(body.find(phrase), p) for phrase, p in VERDICTS if phrase in body]
    return min(found)[1] if found else None


class UnifiedReward(RewardModel):
    """UnifiedReward pointwise: ``Final Score`` / 5 parsed from the judge's greedy answer (module docstring).

    Args:
        model: the ``Qwen2_5_VLForConditionalGeneration``.
        processor: its processor (left padding is set for batched generation).
        prompt: "qwen", "short" or a template with ``{prompt}``.
        pair_prompt: "qwen", "think" (UnifiedReward-Think: the verdict is read from ``<answer>`` only) or a
            template with ``{prompt}``.
        pair_size: resize both images of a pair to this ``(w, h)`` first (None: Qwen's sizing only, as the
            reference scripts; some evaluation scripts use 512×512).
        max_new_tokens: answer length limit (512 as the reference).
        failure_score: the score of an answer without ``Final Score:`` (0.0 as flow_grpo).
        min_pixels, max_pixels: Qwen's image sizing (qwen_vl_utils defaults).
        dtype: of the judge (fp32 default; "bf16" as the reference's ``torch_dtype="auto"``).

    After each call ``last_answers`` holds the decoded answers; ``parse_failures`` / ``judged`` count
    answers without a verdict and all answers since construction.
    """

    name = "unifiedreward"
    differentiable = False

    def __init__(self, model, processor, prompt: str = "qwen", pair_prompt: str = "qwen",
                 pair_size: tuple[int, int] | None = None, max_new_tokens: int = MAX_NEW_TOKENS, failure_score: float = 0.0, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS, mode: Mode = "exact", batch_size: int = 8,
                 dtype: torch.dtype | str = torch.float32):
        super().__init__(mode=mode, batch_size=batch_size)
        self.model = model.to(as_dtype(dtype)).eval().requires_grad_(False)
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.template = POINT_PROMPTS.get(prompt, prompt)
        if "{prompt}" not in self.template:
            raise ValueError(f"prompt must be one of {sorted(POINT_PROMPTS)} or a template containing '{{prompt}}'")
        self.pair_template, self.answer_tag = PAIR_PROMPTS.get(pair_prompt, (pair_prompt, False))
        self.pair_size = tuple(pair_size) if pair_size is not None else None
        if "{prompt}" not in self.pair_template:
            raise ValueError(f"pair_prompt must be one of {sorted(PAIR_PROMPTS)} or a template containing '{{prompt}}'")
        self.max_new_tokens, self.failure_score = int(max_new_tokens), float(failure_score)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.last_answers: list[str] = []
        self.parse_failures = self.judged = 0

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, processor: str | os.PathLike | None = None,
                        allow_pickle: bool = False, dtype: torch.dtype | str = torch.float32, **kw) -> UnifiedReward:
        """``weights``: hub id or folder of the Qwen2.5-VL judge (default ``CodeGoat24/UnifiedReward-qwen-7b``);
        ``processor``: hub id or folder of its processor (default: ``weights``)."""
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        weights, dtype = weights or HUB_ID, as_dtype(dtype)
        model, info = _from_pretrained(Qwen2_5_VLForConditionalGeneration, weights, f"{cls.name} (Qwen2.5-VL)",
                                       "model.safetensors", allow_pickle=allow_pickle, output_loading_info=True,
                                       dtype=dtype)
        check_loading_info(info, f"{cls.name} ({weights})")
        proc = _from_pretrained(AutoProcessor, processor or weights, f"{cls.name} (processor)", "processor files")
        return cls(model, proc, dtype=dtype, **kw)

    # ------------------------------------------------------------------ judging
    def generate(self, conversations: list[list[dict]], images: list[list]) -> list[str]:
        """Greedy answers of the judge to ``conversations`` (each with its PIL ``images``), decoded without
        special tokens, in batches of ``batch_size``."""
        proc, answers = self.processor, []
        for i in range(0, len(conversations), self.batch_size):
            conv, ims = conversations[i:i + self.batch_size], images[i:i + self.batch_size]
            texts = [proc.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conv]
            batch = proc(text=texts, images=[im for group in ims for im in group], padding=True,
                         return_tensors="pt").to(self.device)
            with torch.no_grad():
                out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          temperature=None, top_p=None, top_k=None)
            answers += proc.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)
        return answers

    def _count(self, answers: list[str], parsed: list) -> None:
        failed = sum(p is None for p in parsed)
        self.last_answers, self.judged, self.parse_failures = answers, self.judged + len(answers), \
            self.parse_failures + failed
        if failed:
            logger.warning("%s: %d of %d answers had no verdict (scored as the failure value); first: %r",
                           self.name, failed, len(answers), next(a for a, p in zip(answers, parsed) if p is None)[:200])

    def point_conversation(self, prompt: str, image=None) -> list[dict]:
        """The pointwise user turn for ``prompt`` (image first, as the reference)."""
        return [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": self.template.format(prompt=prompt)}]}]

    def pair_conversation(self, prompt: str, image_1=None, image_2=None) -> list[dict]:
        """The pairwise user turn: Image 1, Image 2, then the comparison prompt."""
        return [{"role": "user", "content": [{"type": "image", "image": image_1}, {"type": "image", "image": image_2},
                                             {"type": "text", "text": self.pair_template.format(prompt=prompt)}]}]

    def _sized(self, images: Images, size: tuple[int, int] | None = None) -> list:
        return resize_pil(to_pil(images), self.min_pixels, self.max_pixels, size=size)

    def _score(self, images: Images, prompts: list[str]) -> torch.Tensor:
        pil = self._sized(images)
        answers = self.generate([self.point_conversation(p) for p in prompts], [[im] for im in pil])
        parsed = [parse_score(a) for a in answers]
        self._count(answers, parsed)
        return torch.tensor([self.failure_score if s is None else s / 5.0 for s in parsed], device=self.device)

    def prefer(self, images_a: Images, images_b: Images, prompts: Sequence[str]) -> torch.Tensor:
        """``P(a ≻ b) [n]`` judged with ``a`` as Image 1 and ``b`` as Image 2: 1, 0, ½ (½ without a verdict)."""
        if not (len(images_a) == len(images_b) == len(prompts)):
            raise ValueError(f"{len(images_a)} / {len(images_b)} images for {len(prompts)} prompts")
        a, b = self._sized(images_a, self.pair_size), self._sized(images_b, self.pair_size)
        answers = self.generate([self.pair_conversation(p) for p in prompts], [[x, y] for x, y in zip(a, b)])
        parsed = [parse_preference(t, self.answer_tag) for t in answers]
        self._count(answers, parsed)
        return torch.tensor([0.5 if p is None else p for p in parsed])


class UnifiedRewardPairwise(UnifiedReward):
    """UnifiedReward pairwise as a reward: each image's Pref-GRPO win rate among the ``group_size``
    consecutive images of its prompt, every ordered pair judged by :meth:`prefer` (values in [0, 1]).

    Args:
        group_size: images per prompt group (consecutive); ``score`` needs whole groups.
        (the rest as :class:`UnifiedReward`; ``batch_size`` is rounded to whole groups)
    """

    name = "unifiedreward-pairwise"

    def __init__(self, model, processor, group_size: int = 2, batch_size: int = 8, **kw):
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        super().__init__(model, processor, batch_size=max(group_size, batch_size // group_size * group_size), **kw)
        self.group_size = int(group_size)

    def score(self, images: Images, prompts: Sequence) -> torch.Tensor:
        """Win rates ``[B]``; ``B`` must be a multiple of ``group_size`` (consecutive images share a prompt)."""
        if len(images) % self.group_size:
            raise ValueError(f"{self.name}: {len(images)} images do not split into groups of {self.group_size} "
                             "(consecutive images of one prompt); pass group_size=")
        return super().score(images, prompts)

    def _score(self, images: Images, prompts: list[str]) -> torch.Tensor:
        for g in range(0, len(prompts), self.group_size):
            if len(set(prompts[g:g + self.group_size])) > 1:
                raise ValueError(f"{self.name}: the images of one group must share a prompt, got "
                                 f"{prompts[g:g + self.group_size]}")
        return win_rates_pairwise(images, prompts, self.group_size, self.prefer).to(self.device)
