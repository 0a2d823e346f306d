"""LLM caption perturbation for TPO: a minimally changed caption that no longer matches its image.

TPO builds ``(image, matched caption c_w, perturbed caption c_l)`` triplets; its perturbing LLM
follows four edit principles (content, attribute, spatial, contextual). Here any instruction-tuned
causal LM (e.g. ``Qwen/Qwen2.5-0.5B-Instruct``) is asked for one edit of one principle; its answer
is kept only when it is a *minimal* edit (it differs from the caption, and at most
``max_changed_words`` words were replaced, inserted or deleted). Otherwise the rule-based
perturbation of :mod:`diffalign.text.perturb` is the fallback (colour, count, object, relation
swaps), so every caption the rules understand gets a negative.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from diffalign.text.rewriter import PromptRewriter, RewriteConfig

PRINCIPLES: dict[str, str] = {
    "content": "add or remove one object, or change a count or what an object is",
    "attribute": "change one attribute: a colour, material, texture, size or style",
    "spatial": "change one spatial relation or arrangement (left/right, above/below, inside/outside)",
    "contextual": "change the background, setting, lighting, weather or time of day",
}
SYSTEM = ("You edit image captions to make hard negative examples. Make exactly one small edit so that the "
          "caption no longer describes the same image; keep every other word unchanged. Answer with the edited "
          "caption only.")
INSTRUCTION = "Edit ({principle}): {{prompt}}"
# rule kinds of diffalign.text.perturb that realise each principle
RULE_KINDS: dict[str, tuple[str, ...]] = {"content": ("count", "object"), "attribute": ("colour",),
                                          "spatial": ("relation",), "contextual": ("colour", "count", "object",
                                                                                   "relation")}


@dataclass
class Perturbation:
    """``perturbed`` is None when neither the LLM nor the rules produced a valid edit; ``source`` is
    ``llm``, ``rule`` or None."""

    caption: str
    perturbed: str | None
    principle: str
    source: str | None


def changed_words(a: str, b: str) -> int:
    """Words replaced, inserted or deleted between ``a`` and ``b`` (case-insensitive word diff)."""
    wa, wb = a.lower().split(), b.lower().split()
    n = 0
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).get_opcodes():
        if op != "equal":
            n += max(i2 - i1, j2 - j1)
    return n


def is_minimal_edit(caption: str, edited: str, max_changed_words: int = 4) -> bool:
    return 1 <= changed_words(caption, edited) <= max_changed_words


class LLMPerturber:
    """Perturb captions with an LLM, falling back to the rules.

    Args:
        rewriter: a :class:`PromptRewriter` around the LLM (its system/instruction are replaced).
        principles: which of :data:`PRINCIPLES` to draw from (uniformly per caption).
        max_changed_words: the largest edit accepted from the LLM.
        fallback: use :func:`diffalign.text.perturb.perturb_caption` when the LLM's edit is rejected.
        generation: sampling settings (default: sampling at temperature 0.7).
    """

    def __init__(self, rewriter: PromptRewriter, *, principles: Sequence[str] = tuple(PRINCIPLES),
                 max_changed_words: int = 4, fallback: bool = True, generation: RewriteConfig | None = None):
        unknown = set(principles) - set(PRINCIPLES)
        if unknown:
            raise ValueError(f"unknown principle(s) {sorted(unknown)}; choose from {list(PRINCIPLES)}")
        self.lm = rewriter.lm
        self.principles = list(principles)
        self.max_changed_words = max_changed_words
        self.fallback = fallback
        self.generation = generation or RewriteConfig(do_sample=True, temperature=0.7, max_new_tokens=77)

    def _asker(self, principle: str) -> PromptRewriter:
        return PromptRewriter(self.lm, system=SYSTEM,
                              instruction=INSTRUCTION.format(principle=PRINCIPLES[principle]))

    def perturb(self, captions: Sequence[str], *, seed: int = 0) -> list[Perturbation]:
        """One :class:`Perturbation` per caption; deterministic in ``seed``."""
        rng = random.Random(seed)
        chosen = [rng.choice(self.principles) for _ in captions]
        answers: dict[int, str] = {}
        for principle in dict.fromkeys(chosen):
            idx = [i for i, p in enumerate(chosen) if p == principle]
            cfg = RewriteConfig(**{**self.generation.__dict__, "seed": self.generation.seed + seed})
            outs = self._asker(principle).rewrite([captions[i] for i in idx], config=cfg)
            answers.update({i: o[0] for i, o in zip(idx, outs)})
        results = []
        for i, caption in enumerate(captions):
            edited = answers[i]
            if is_minimal_edit(caption, edited, self.max_changed_words):
                results.append(Perturbation(caption, edited, chosen[i], "llm"))
                continue
            rule = rule_perturbation(caption, rng, chosen[i]) if self.fallback else None
            results.append(Perturbation(caption, rule, chosen[i], "rule" if rule else None))
        return results


def rule_perturbation(caption: str, rng: random.Random, principle: str) -> str | None:
    """The rule-based edit realising ``principle`` (any rule kind when that principle has none that
    applies)."""
    from diffalign.text.perturb import KINDS, perturb_caption

    return perturb_caption(caption, rng, kinds=RULE_KINDS[principle]) or perturb_caption(caption, rng, kinds=KINDS)
