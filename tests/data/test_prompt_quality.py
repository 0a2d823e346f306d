"""FiFA's LLM prompt-quality judge: the expected digit rating by hand, batching, and the CLI into `data fifa`."""

import json
import math

import pytest
import torch

from diffalign.cli import main
from diffalign.data.prompt_quality import RATING_PROMPT, digit_token_ids, rate_prompts

WORDS = ["rate", "the", "following", "prompt", "a", "red", "circle", "blue", "square", "rating:", "prompt:", "from",
         "to", "text-to-image", "answer", "with", "one", "digit.", "big", "cat"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *[str(d) for d in range(10)], *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def _model(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def test_rating_is_the_expected_digit_of_the_next_token():
    tok, model = _tokenizer(), _model(_tokenizer())
    assert digit_token_ids(tok) == [[4 + d] for d in range(10)]
    prompts = ["a red circle", "a big blue square", "a red circle"]  # the repeat is rated once
    ratings = rate_prompts(prompts, model, tok, batch_size=2)
    assert list(ratings) == ["a red circle", "a big blue square"]
    for p, q in ratings.items():
        ids = torch.tensor([tok.encode(RATING_PROMPT.format(prompt=p))])
        with torch.no_grad():
            probs = torch.softmax(model(ids).logits[0, -1, 4:14], dim=-1)  # over the ten digits
        assert q == pytest.approx(float((probs * torch.arange(10)).sum() / 9), abs=1e-6)
        assert 0 <= q <= 1
    # right padding does not change a row: one batch of two equals two batches of one
    single = rate_prompts(list(ratings), model, tok, batch_size=1)
    assert single == pytest.approx(ratings, abs=1e-6)


class _FixedJudge(torch.nn.Module):
    """A stand-in LM whose next-token logits are ``logits`` ``[V]`` at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_ratings_of_judges_with_known_next_token_distributions():
    tok = _tokenizer()
    vocab = len(tok)
    nine = torch.full((vocab,), -1e4)
    nine[4 + 9] = 0.0
    assert rate_prompts(["a red circle"], _FixedJudge(nine), tok)["a red circle"] == pytest.approx(1.0)
    # only the digits count: mass elsewhere is renormalised away; 0 and 9 equally likely -> 0.5
    ends = torch.zeros(vocab)
    ends[4 + 0] = ends[4 + 9] = 5.0
    ends[4 + 1:4 + 9] = -1e4
    assert rate_prompts(["a red circle"], _FixedJudge(ends), tok)["a red circle"] == pytest.approx(0.5)
    # p(3) = 2 p(6): (2·3 + 6) / 3 / 9
    two = torch.full((vocab,), -1e4)
    two[4 + 3], two[4 + 6] = math.log(2.0), 0.0
    assert rate_prompts(["a red circle"], _FixedJudge(two), tok)["a red circle"] == pytest.approx(12 / 27)
    with pytest.raises(ValueError, match="must contain"):
        rate_prompts(["x"], _FixedJudge(nine), tok, template="no slot")


def test_cli_writes_ratings_that_data_fifa_reads(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from data_helpers import BLUE, RED, jpeg

    tok = _tokenizer()
    judge = tmp_path / "judge"
    _model(tok).save_pretrained(judge)
    tok.save_pretrained(judge)
    captions = ["a red circle", "a blue square", "a big cat", "a red square"]
    rows = {"caption": captions, "jpg_0": [jpeg(RED)] * 4, "jpg_1": [jpeg(BLUE)] * 4, "label_0": [1.0] * 4,
            "score_0": [1.0] * 4, "score_1": [0.0] * 4}  # equal margins: the quality decides
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table(rows), pairs)
    ratings = tmp_path / "ratings.json"
    assert main(["data", "rate-prompts", str(pairs), str(ratings), "--model", str(judge)]) == 0
    q = json.loads(ratings.read_text())
    assert set(q) == set(captions)
    out = tmp_path / "kept.parquet"
    assert main(["data", "fifa", str(pairs), str(out), "--budget", "2", "--gamma", "0", "--quality", str(ratings)]) == 0
    best = sorted(captions, key=lambda c: (-q[c], captions.index(c)))[:2]
    assert sorted(pq.read_table(out).column("caption").to_pylist()) == sorted(best)
