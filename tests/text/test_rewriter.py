import json

import pytest
import torch
from text_helpers import make_model, make_tokenizer

from diffalign.text.llm_perturb import LLMPerturber, changed_words, is_minimal_edit
from diffalign.text.model import CausalLM
from diffalign.text.pairs import candidate_lists, select_pairs, semantic_weights
from diffalign.text.rewriter import (
    PromptRewriter,
    RewriteConfig,
    clean_rewrite,
    stop_token_ids,
)


def _rewriter(chat=True, **kw):
    tok = make_tokenizer(chat=chat)
    return PromptRewriter(CausalLM(make_model(tok).eval(), tok), **kw)


def test_training_prompt_matches_what_generation_reads():
    rw = _rewriter(system=None, instruction="rewrite this prompt {prompt}")
    assert rw.training_prompt("a circle") == [{"role": "user", "content": "rewrite this prompt a circle"}]
    assert rw.completion("a red circle") == [{"role": "assistant", "content": "a red circle"}]
    plain = _rewriter(chat=False)
    assert plain.training_prompt("a circle") == "a circle Rephrase:" and plain.completion("x") == " x"


def test_rewrite_batches_are_deterministic_and_shaped():
    rw = _rewriter(system=None, instruction="{prompt}")
    cfg = RewriteConfig(do_sample=True, max_new_tokens=5, batch_size=2, seed=3)
    a = rw.rewrite(["a circle", "two squares", "a red triangle"], num_return_sequences=2, config=cfg)
    assert [len(r) for r in a] == [2, 2, 2] and all(isinstance(t, str) and t for r in a for t in r)
    assert a == rw.rewrite(["a circle", "two squares", "a red triangle"], num_return_sequences=2, config=cfg)
    with pytest.raises(ValueError, match="do_sample"):
        rw.rewrite(["a circle"], num_return_sequences=2)


def test_greedy_rewrite_is_the_models_argmax_continuation():
    rw = _rewriter(system=None, instruction="{prompt}")
    out = rw.rewrite(["a circle"], config=RewriteConfig(max_new_tokens=3))[0][0]
    tok, model = rw.tokenizer, rw.lm.raw_model
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "a circle"}], tokenize=False,
                                      add_generation_prompt=True), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expect = clean_rewrite(tok.decode(ids[0, -3:], skip_special_tokens=True), "a circle")
    assert out == expect


def test_format_file_travels_with_saved_models(tmp_path):
    rw = _rewriter(system=None, instruction="{prompt}")
    rw.lm.model.save_pretrained(tmp_path / "m")
    rw.tokenizer.save_pretrained(tmp_path / "m")
    rw.save_format(tmp_path / "m")
    loaded = PromptRewriter.from_pretrained(tmp_path / "m")
    assert (loaded.system, loaded.instruction) == (None, "{prompt}")
    loaded.lm.save_trained(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "rewriter.json").read_text())["instruction"] == "{prompt}"


def test_generation_stops_at_eos_or_the_end_of_turn():
    """Conversational completions are trained without EOS after the template's end of turn (as TRL),
    so generation stops at that token too."""
    tok = make_tokenizer()
    assert tok.convert_ids_to_tokens(stop_token_ids(tok)) == ["</s>", "<|end|>"]
    assert stop_token_ids(make_tokenizer(chat=False)) == [tok.eos_token_id]


def test_clean_rewrite_first_line_or_original():
    assert clean_rewrite("\n  a  red circle \nsecond", "x") == "a red circle"
    assert clean_rewrite("   \n", "a circle") == "a circle"


def test_select_pairs_by_hand():
    assert select_pairs([0.2, 0.9, 0.5]) == [(1, 0)]
    assert select_pairs([0.5, 0.5]) == []  # ties give no pair
    assert select_pairs([0.2, 0.9, 0.5], "all") == [(1, 0), (1, 2), (2, 0)]
    assert select_pairs([0.2, 0.9, 0.5], "all", min_margin=0.45) == [(1, 0)]  # 0.7 > 0.45 >= 0.4, 0.3
    assert candidate_lists(["a"], [["b", "a", "b"]], True) == [["a", "b"]]


def test_semantic_weights_by_hand():
    table = {"x": [1.0, 0.0], "same": [2.0, 0.0], "orth": [0.0, 3.0], "half": [1.0, 1.0]}
    embed = lambda texts: torch.tensor([table[t] for t in texts])
    w = semantic_weights(embed, ["x", "x", "x"], ["same", "orth", "half"], alpha=2.0)
    cos_half = 2 ** -0.5
    assert w == pytest.approx([1.0, torch.exp(torch.tensor(-2.0)).item(),
                               torch.exp(torch.tensor(-2.0 * (1 - cos_half))).item()], rel=1e-6)
    assert semantic_weights(embed, ["x"], ["orth"], alpha=0.0) == [1.0]


def test_minimal_edit_check():
    assert changed_words("a photo of a red circle", "a photo of a blue circle") == 1
    assert changed_words("a red circle", "a red circle") == 0
    assert is_minimal_edit("a photo of a red circle", "a photo of two red circles")
    assert not is_minimal_edit("a photo of a red circle", "a photo of a red circle")
    assert not is_minimal_edit("a photo of a red circle", "completely different words here now and more", 4)


def test_llm_perturbation_falls_back_to_rules_when_the_edit_is_not_minimal():
    rw = _rewriter()  # a random model: its "edits" are word salad, rejected as non-minimal
    pert = LLMPerturber(rw, principles=["attribute"], max_changed_words=1,
                        generation=RewriteConfig(do_sample=True, max_new_tokens=12))
    res = pert.perturb(["a photo of a red circle", "a photo of two squares"], seed=0)
    for r in res:
        assert r.source in ("llm", "rule") and r.perturbed and r.perturbed != r.caption
        if r.source == "llm":
            assert changed_words(r.caption, r.perturbed) == 1
    assert res[0].source == "rule" and res[0].perturbed != "a photo of a red circle"
    no_fallback = LLMPerturber(rw, principles=["attribute"], max_changed_words=1, fallback=False,
                               generation=RewriteConfig(do_sample=True, max_new_tokens=12)).perturb(["a photo of a red circle"])
    assert no_fallback[0].source in ("llm", None)


def test_llm_perturbation_accepts_a_minimal_llm_edit(tmp_path):
    """An LM trained to answer with the edited caption is taken at its word (source 'llm')."""
    from diffalign.trainers.registry import recipe_from_dict
    from diffalign.trainers.registry import run_recipe as train

    tok = make_tokenizer()
    make_model(tok).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    asker = LLMPerturber(PromptRewriter(CausalLM(make_model(tok), tok)), principles=["attribute"])._asker("attribute")
    rows = [{"prompt": asker.training_prompt("a photo of a red circle"),
             "completion": asker.completion("a photo of a blue circle")}]
    (tmp_path / "sft.jsonl").write_text(json.dumps(rows[0]) + "\n")
    run = train(recipe_from_dict({"model": {"pretrained": str(tmp_path / "lm"), "lora_rank": 0},
                                  "data": {"source": str(tmp_path / "sft.jsonl"), "format": "trl"},
                                  "method": {"name": "text-sft"},
                                  "train": {"output_dir": str(tmp_path / "run"), "max_steps": 40, "batch_size": 1,
                                            "learning_rate": 1e-2, "checkpointing_steps": 0}}))
    pert = LLMPerturber(PromptRewriter.from_pretrained(run / "final"), principles=["attribute"],
                        generation=RewriteConfig(do_sample=False, max_new_tokens=8))
    (r,) = pert.perturb(["a photo of a red circle"])
    assert (r.perturbed, r.source) == ("a photo of a blue circle", "llm")
