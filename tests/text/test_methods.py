"""The forms diffalign keeps besides TRL's (named config options) compute what their docstrings say;
TRL's own forms are checked against TRL in test_trl_equivalence.py."""

from __future__ import annotations

import pytest
import torch
from text_helpers import make_model, make_tokenizer

from diffalign.objectives import dpo_loss, orpo_loss
from diffalign.text.batches import TextData
from diffalign.text.data import preference_example
from diffalign.text.model import CausalLM
from diffalign.trainers.registry import build_method

ROWS = [
    {"prompt": "a photo of", "chosen": " a red circle", "rejected": " two squares"},
    {"prompt": "a", "chosen": " big triangle and a small square left of a circle", "rejected": " blue"},
]


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    lm = CausalLM(make_model(tok, seed=0), tok)
    lm._reference_model = make_model(tok, seed=1).eval().requires_grad_(False)
    examples = [preference_example(r, f"row {i}") for i, r in enumerate(ROWS)]
    batch = TextData.build(examples, "pairs", tok, max_length=64, batch_size=2, gradient_accumulation_steps=1,
                           seed=0).collate([0, 1])
    weights = torch.tensor([1.0, 3.0])
    batch.weights = weights
    return lm, batch, weights


def _loss(lm, batch, **spec):
    with torch.no_grad():
        return build_method(spec, lm).loss(batch).loss


def test_sft_average_tokens_and_sequences(setup):
    lm, batch, w = setup
    with torch.no_grad():
        lp = lm.logprobs(batch.tokens)
    s, n = lp.sum[:2], lp.num_tokens[:2]
    tokens = -(w * s).sum() / (w * n).sum()
    sequences = (w * (-s / n)).sum() / w.sum()
    assert (n[0] != n[1]).item()  # uneven lengths: the two averages differ
    torch.testing.assert_close(_loss(lm, batch, name="text-dpo", loss_type="sft"), tokens)
    torch.testing.assert_close(_loss(lm, batch, name="text-dpo", loss_type="sft", sft_average="sequences"), sequences)
    simpo = _loss(lm, batch, name="text-simpo", sft_weight=1.0) - _loss(lm, batch, name="text-simpo")
    torch.testing.assert_close(simpo, tokens)


def test_orpo_nll_options(setup):
    lm, batch, w = setup
    with torch.no_grad():
        lp = lm.logprobs(batch.tokens)
    mw, ml = lp.mean.chunk(2)
    out = orpo_loss(mw, ml, beta=0.1)
    old = (w * out.losses).sum() / w.sum()
    torch.testing.assert_close(_loss(lm, batch, name="text-orpo", nll="completion_mean"), old)
    full = -(w * lp.full_sum[:2]).sum() / (w * lp.full_num_tokens[:2]).sum()
    odds = (w * (out.losses + mw)).sum() / w.sum()
    torch.testing.assert_close(_loss(lm, batch, name="text-orpo"), full + odds)
    assert (lp.full_num_tokens > lp.num_tokens).all()  # the prompt's tokens count in TRL's NLL


def test_label_smoothing_on_sigmoid_needs_conservative(setup):
    lm, batch, w = setup
    with torch.no_grad():
        pw, pl = lm.logprobs(batch.tokens).sum.chunk(2)
        rw, rl = lm.logprobs(batch.tokens, reference=True).sum.chunk(2)
    cdpo = dpo_loss(pw, pl, rw, rl, beta=0.1, label_smoothing=0.2).losses
    plain = _loss(lm, batch, name="text-dpo")
    with pytest.warns(UserWarning, match="no effect on the sigmoid"):
        ignored = _loss(lm, batch, name="text-dpo", label_smoothing=0.2)
    torch.testing.assert_close(ignored, plain)
    torch.testing.assert_close(_loss(lm, batch, name="text-dpo", label_smoothing=0.2, conservative=True),
                               (w * cdpo).sum() / w.sum())


@pytest.mark.parametrize("spec", [{"name": "text-dpo", "sft_average": "pairs"}, {"name": "text-orpo", "nll": "all"},
                                  {"name": "text-simpo", "tokenization": "sft"}])
def test_bad_option_values_are_errors(setup, spec):
    with pytest.raises(ValueError):
        build_method(spec, setup[0])


def test_tokenization_follows_the_trl_trainer_and_can_be_chosen(setup):
    lm = setup[0]
    assert build_method({"name": "text-dpo"}, lm).tokenization == "dpo"
    assert build_method({"name": "text-kto"}, lm).tokenization == "dpo"
    assert build_method({"name": "text-simpo"}, lm).tokenization == "cpo"
    assert build_method({"name": "text-orpo"}, lm).tokenization == "cpo"
    assert build_method({"name": "text-orpo", "tokenization": "dpo"}, lm).tokenization == "dpo"
