import math

import pytest
import torch
from text_helpers import make_model, make_tokenizer

from diffalign.text.logprobs import (
    collate,
    sequence_logprobs,
    token_logprobs,
    tokenize_completion,
)


def test_tokenize_standard_masks_prompt_and_appends_eos():
    tok = make_tokenizer()
    p, c = tokenize_completion(tok, "a photo of", " a red circle")
    assert tok.convert_ids_to_tokens(p) == ["<s>", "a", "photo", "of"]
    assert tok.convert_ids_to_tokens(c) == ["a", "red", "circle", "</s>"]


def test_tokenize_conversational_uses_chat_template():
    tok = make_tokenizer()
    p, c = tokenize_completion(tok, [{"role": "user", "content": "rewrite a circle"}],
                               [{"role": "assistant", "content": "a red circle"}])
    assert tok.convert_ids_to_tokens(p) == ["<|user|>", "rewrite", "a", "circle", "<|end|>", "<|assistant|>"]
    # the template's end of turn ends the completion: no EOS after it (TRL's DPO/KTO tokenisation)
    assert tok.convert_ids_to_tokens(c) == ["a", "red", "circle", "<|end|>"]


def test_cpo_tokenization_adds_bos_and_eos_to_every_completion():
    """TRL's CPO/ORPO trainers: strings without special tokens, BOS prepended, EOS id appended even after
    the chat template's end of turn."""
    tok = make_tokenizer()
    p, c = tokenize_completion(tok, [{"role": "user", "content": "rewrite a circle"}],
                               [{"role": "assistant", "content": "a red circle"}], tokenization="cpo")
    assert tok.convert_ids_to_tokens(p) == ["<s>", "<|user|>", "rewrite", "a", "circle", "<|end|>", "<|assistant|>"]
    assert tok.convert_ids_to_tokens(c) == ["a", "red", "circle", "<|end|>", "</s>"]
    p, c = tokenize_completion(tok, "a photo of", " a red circle", tokenization="cpo")
    assert tok.convert_ids_to_tokens(p) == ["<s>", "a", "photo", "of"]
    assert tok.convert_ids_to_tokens(c) == ["a", "red", "circle", "</s>"]
    with pytest.raises(ValueError, match="tokenization"):
        tokenize_completion(tok, "a", " b", tokenization="sft")


def test_conversational_without_template_is_an_error():
    with pytest.raises(ValueError, match="chat template"):
        tokenize_completion(make_tokenizer(chat=False), [{"role": "user", "content": "a"}],
                            [{"role": "assistant", "content": "b"}])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sequence_logprobs_match_hand_computation(kind):
    tok = make_tokenizer()
    model = make_model(tok, kind=kind).eval()
    rows = [tokenize_completion(tok, "a photo of", " a red circle"),
            tokenize_completion(tok, "a", " two squares and a big triangle")]
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        out = sequence_logprobs(model, batch)
        for i, (p, c) in enumerate(rows):  # one row at a time, no padding, explicit loop over tokens
            ids = torch.tensor([p + c])
            logp = model(ids).logits[0].log_softmax(-1)
            total = sum(logp[t - 1, ids[0, t]].item() for t in range(len(p), len(p) + len(c)))
            assert out.sum[i].item() == pytest.approx(total, abs=1e-4)
            assert out.mean[i].item() == pytest.approx(total / len(c), abs=1e-4)
            assert out.num_tokens[i].item() == len(c)
    # padding and prompt positions contribute exactly 0
    assert (out.tokens[batch.completion_mask[:, 1:] == 0] == 0).all()


def test_max_length_cuts_the_completion_end():
    batch = collate([([1, 2, 3], [4, 5, 6])], pad_token_id=0, max_length=4)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4]]
    assert batch.completion_mask.tolist() == [[0, 0, 0, 1]]


def test_token_logprobs_equals_log_softmax_gather():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    expect = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, targets), expect)
    assert math.isfinite(token_logprobs(logits * 1e3, targets).sum().item())
