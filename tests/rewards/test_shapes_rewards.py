"""Shapes rewards: the exact evaluator and the oracle through the reward interface."""

import random

import pytest
import torch

from diffalign.rewards import load_reward
from diffalign.shapes.evaluate import evaluate
from diffalign.shapes.grammar import parse_prompt, scene_for_prompt
from diffalign.shapes.oracle import Oracle
from diffalign.shapes.scene import render

CAPTIONS = ["a photo of a red square", "a photo of three triangles"]


def scenes():
    rng = random.Random(0)
    return [render(scene_for_prompt(parse_prompt(c), rng)) for c in CAPTIONS]


def test_shapes_eval_is_the_fraction_of_satisfied_claims():
    images = scenes()
    reward = load_reward("shapes-eval")
    right = reward.score(images, CAPTIONS)
    wrong = reward.score(images, CAPTIONS[::-1])  # each image scored against the other caption
    assert torch.equal(right, torch.tensor([evaluate(i, c).fraction for i, c in zip(images, CAPTIONS)]))
    assert (right == 1).all() and (wrong < 1).all()
    assert torch.equal(reward.score(images, [parse_prompt(c) for c in CAPTIONS]), right)  # ShapesPrompt objects


def test_shapes_oracle_is_the_noise_free_utility():
    images = scenes()
    got = load_reward("shapes-oracle", quality_weight=0.25).score(images, CAPTIONS)
    oracle = Oracle(quality_weight=0.25)
    assert torch.allclose(got, torch.tensor([oracle.utility(i, c) for i, c in zip(images, CAPTIONS)]), atol=1e-6)
    with pytest.raises(ValueError, match="differentiable"):
        load_reward("shapes-oracle", mode="differentiable")
