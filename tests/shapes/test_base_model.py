"""The bundled Shapes base model and learned reward load with stock diffusers / transformers and work."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

from diffalign.shapes.model import DEFAULT_SAMPLING, base_model_path, reward_model_path
from diffalign.shapes.tokenizer import WORDS, build_tokenizer


def _grammar_words() -> set[str]:
    from diffalign.shapes.grammar import TASKS, prompt_set, sample_prompt

    rng = random.Random(0)
    texts = [p.text for split in ("train", "heldout") for p in prompt_set(split, n_per_task=30, seed=1)]
    texts += [sample_prompt(rng, task=t).text for t in TASKS for _ in range(50)]
    return {w for t in texts for w in t.lower().split()}


def test_built_tokenizer_has_one_token_per_word(tmp_path):
    tok = build_tokenizer(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    for word in WORDS:
        assert reloaded.tokenize(word) == [word + "</w>"], word
    assert len(reloaded) == len(tok)


def test_bundled_tokenizer_covers_the_grammar_and_round_trips():
    tok = CLIPTokenizer.from_pretrained(base_model_path(), subfolder="tokenizer")
    for word in _grammar_words():
        assert len(tok.tokenize(word)) == 1, word
    text = "a photo of three red circles left of a blue square"
    ids = tok(text, padding="max_length", return_tensors="pt").input_ids[0]
    assert ids[0] == tok.bos_token_id and len(ids) == tok.model_max_length
    assert len([i for i in ids.tolist() if i not in (tok.bos_token_id, tok.eos_token_id)]) == len(text.split())
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_bundled_pipeline_loads_and_generates():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_model_path())
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    out = pipe("a photo of two green triangles", num_inference_steps=3,
               guidance_scale=DEFAULT_SAMPLING["guidance_scale"], generator=torch.Generator().manual_seed(0))
    image = out.images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 1.0  # not a blank image


def test_bundled_reward_prefers_true_captions():
    from diffalign.shapes.grammar import prompt_set, scene_for_prompt
    from diffalign.shapes.pretrain_reward import perturb_caption
    from diffalign.shapes.scene import render

    model = CLIPModel.from_pretrained(reward_model_path()).eval()
    processor = CLIPProcessor.from_pretrained(reward_model_path())
    rng = random.Random(0)
    wins, n = 0, 0
    for prompt in prompt_set("heldout", n_per_task=5, seed=3):
        wrong = perturb_caption(prompt.text, rng)
        if wrong == prompt.text:
            continue
        inputs = processor(text=[prompt.text, wrong], images=render(scene_for_prompt(prompt, rng)),
                           return_tensors="pt", padding="max_length")
        with torch.no_grad():
            logits = model(**inputs).logits_per_image[0]  # logit_scale.exp() * cos, as PickScore
        wins += int(logits[0] > logits[1])
        n += 1
    assert n >= 20 and wins / n >= 0.7, (wins, n)


@pytest.mark.parametrize("path", [base_model_path(), reward_model_path()])
def test_bundled_weights_are_small_safetensors(path):
    files = list(path.rglob("*"))
    assert any(f.suffix == ".safetensors" for f in files) and not any(f.suffix == ".bin" for f in files)
    assert sum(f.stat().st_size for f in files if f.is_file()) < 20 * 2**20
