"""The text losses equal TRL 1.16's on the same batch: TRL's own trainers (``DPOTrainer``,
``KTOTrainer``, ``CPOTrainer`` for SimPO / CPO-SimPO, ``ORPOTrainer``) tokenise, collate and compute
the loss (``compute_loss``) of a tiny random Llama; diffalign's text method does the same from the
same rows and the same weights. Token ids, loss (rel. 1e-5) and gradients must agree, on plain-string
and on conversational data (the test tokenizer's chat template ends a turn with ``<|end|>``, not EOS,
as Qwen's does).

TRL is only the reference here (``pip install trl``); nothing of it is used by diffalign.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from text_helpers import make_model, make_tokenizer

pytest.importorskip("trl", reason="TRL is the reference of these tests: pip install 'trl==1.16.0' (the test extra)")
pytest.importorskip("datasets", reason="TRL's trainers need the datasets library")

from datasets import Dataset  # noqa: E402
from diffalign.text.batches import TextData  # noqa: E402
from diffalign.text.data import completion_example, preference_example  # noqa: E402
from diffalign.text.model import CausalLM  # noqa: E402
from diffalign.trainers.registry import build_method  # noqa: E402

MAX_LENGTH = 96
PLAIN = [  # uneven prompt and completion lengths
    {"prompt": "a photo of", "chosen": " a red circle", "rejected": " two squares"},
    {"prompt": "a", "chosen": " big triangle and a small square left of a circle", "rejected": " blue"},
    {"prompt": "rewrite this prompt", "chosen": " three green triangles",
     "rejected": " the small purple square above a big yellow circle"},
]


def _conversational(row: dict) -> dict:
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": row["rejected"].strip()}]}


CONVERSATIONAL = [_conversational(r) for r in PLAIN]
DATA = {"plain": PLAIN, "conversational": CONVERSATIONAL}


def _unpaired(rows: list[dict]) -> list[dict]:
    """KTO rows: chosen of pairs 0 and 2 desirable, rejected of pairs 1 and 2 undesirable."""
    return [{"prompt": rows[0]["prompt"], "completion": rows[0]["chosen"], "label": True},
            {"prompt": rows[1]["prompt"], "completion": rows[1]["rejected"], "label": False},
            {"prompt": rows[2]["prompt"], "completion": rows[2]["chosen"], "label": True},
            {"prompt": rows[2]["prompt"], "completion": rows[2]["rejected"], "label": False}]


def _qwen_like():
    """A Qwen2-style pair: no BOS, EOS = the template's end of turn ``<|end|>``, a tiny Qwen2ForCausalLM."""
    from text_helpers import CHAT_TEMPLATE, WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    special = ["<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(special + list(WORDS)))}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
                                  additional_special_tokens=special[3:])
    tok.chat_template = CHAT_TEMPLATE

    def model(seed):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                            bos_token_id=None, eos_token_id=tok.eos_token_id))
    return tok, model(0), model(1).eval().requires_grad_(False)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    """(tokenizer, policy, reference): a Llama with a BOS-prepending tokenizer whose chat template does
    not end in EOS, or a Qwen2-style model whose tokenizer has no BOS and EOS = end of turn."""
    if request.param == "qwen2":
        return _qwen_like()
    tok = make_tokenizer()
    return tok, make_model(tok, seed=0), make_model(tok, seed=1).eval().requires_grad_(False)


def _args(cls, tmp_path, n: int, **kwargs):
    # bf16=False: TRL 1.x defaults to bf16 autocast; the comparison is in fp32 on both sides
    return cls(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=n,
               max_length=MAX_LENGTH, **kwargs)


def _diffalign(spec: dict, policy, ref, tok, examples, kind: str):
    """diffalign's loss, gradients and tokenised rows."""
    lm = CausalLM(policy, tok)
    lm._reference_model = ref
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # label_smoothing on sigmoid warns: TRL ignores it too
        method = build_method(spec, lm)
    data = TextData.build(examples, kind, tok, max_length=MAX_LENGTH, batch_size=len(examples),
                          gradient_accumulation_steps=1, seed=0, tokenization=method.tokenization)
    batch = data.collate(list(range(len(examples))))
    loss = method.loss(batch).loss
    loss.backward()
    return loss.detach(), _grads(policy), data.tokenized, batch


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _assert_same(loss, grads, trl_loss, trl_grads):
    assert torch.isfinite(trl_loss)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    assert grads.shape == trl_grads.shape
    assert ((grads - trl_grads).norm() / trl_grads.norm().clamp_min(1e-12)).item() < 1e-4


# ----------------------------------------------------------------------------------------- DPO
DPO_CASES = {  # diffalign spec -> TRL DPOConfig kwargs
    "sigmoid": ({"loss_type": "sigmoid"}, {"loss_type": ["sigmoid"]}),
    "hinge": ({"loss_type": "hinge"}, {"loss_type": ["hinge"]}),
    "ipo": ({"loss_type": "ipo"}, {"loss_type": ["ipo"]}),
    "robust": ({"loss_type": "robust", "label_smoothing": 0.1}, {"loss_type": ["robust"], "label_smoothing": 0.1}),
    "rpo": ({"loss_type": ["sigmoid", "sft"]}, {"loss_type": ["sigmoid", "sft"]}),
    "weighted-sft": ({"loss_type": ["hinge", "sft"], "loss_weights": [1.0, 0.3]},
                     {"loss_type": ["hinge", "sft"], "loss_weights": [1.0, 0.3]}),
    "sigmoid-label-smoothing": ({"loss_type": "sigmoid", "label_smoothing": 0.2},
                                {"loss_type": ["sigmoid"], "label_smoothing": 0.2}),
}


@pytest.mark.parametrize("data", ["plain", "conversational"])
@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_equals_trl(tiny, tmp_path, case, data):
    from trl import DPOConfig, DPOTrainer

    tok, policy, ref = tiny
    spec, trl_kwargs = DPO_CASES[case]
    rows = DATA[data]
    trl_policy = copy.deepcopy(policy)
    trainer = DPOTrainer(trl_policy, ref_model=copy.deepcopy(ref), processing_class=tok,
                         args=_args(DPOConfig, tmp_path, len(rows), beta=0.5, **trl_kwargs),
                         train_dataset=Dataset.from_list(rows))
    features = [trainer.train_dataset[i] for i in range(len(rows))]
    inputs = trainer.data_collator(features)
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    examples = [preference_example(r, f"row {i}") for i, r in enumerate(rows)]
    loss, grads, tokenized, batch = _diffalign({"name": "text-dpo", "beta": 0.5, **spec}, copy.deepcopy(policy),
                                               ref, tok, examples, "pairs")
    assert [list(t) for t in tokenized] == [[f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]] for f in features]
    assert torch.equal(batch.tokens.input_ids, inputs["input_ids"])
    assert torch.equal(batch.tokens.completion_mask, inputs["completion_mask"])
    _assert_same(loss, grads, trl_loss.detach(), _grads(trl_policy))
    if case == "rpo":  # the kept per-sequence-mean SFT term is not TRL's (uneven lengths)
        other, *_ = _diffalign({"name": "text-dpo", "beta": 0.5, **spec, "sft_average": "sequences"},
                               copy.deepcopy(policy), ref, tok, examples, "pairs")
        assert abs(other.item() - trl_loss.item()) > 1e-4 * abs(trl_loss.item())  # 10x the tolerance


def test_conversational_completions_get_no_extra_eos():
    """DPO/KTO tokenisation: the chat template ends the turn; EOS is appended to strings only."""
    tok = make_tokenizer()
    ex = preference_example(CONVERSATIONAL[0], "row 0")
    data = TextData.build([ex], "pairs", tok, max_length=MAX_LENGTH, batch_size=1, gradient_accumulation_steps=1,
                          seed=0)
    _, chosen, _ = data.tokenized[0]
    assert tok.convert_ids_to_tokens(chosen) == ["a", "red", "circle", "<|end|>"]
    plain = TextData.build([preference_example(PLAIN[0], "row 0")], "pairs", tok, max_length=MAX_LENGTH,
                           batch_size=1, gradient_accumulation_steps=1, seed=0)
    assert tok.convert_ids_to_tokens(plain.tokenized[0][1]) == ["a", "red", "circle", "</s>"]


# ----------------------------------------------------------------------------------------- KTO
@pytest.mark.parametrize("data", ["plain", "conversational"])
def test_kto_equals_trl(tiny, tmp_path, data):
    from trl import KTOConfig, KTOTrainer

    tok, policy, ref = tiny
    rows = _unpaired(DATA[data])
    trl_policy = copy.deepcopy(policy)
    trainer = KTOTrainer(trl_policy, ref_model=copy.deepcopy(ref), processing_class=tok,
                         args=_args(KTOConfig, tmp_path, len(rows), beta=0.5, desirable_weight=1.0,
                                    undesirable_weight=1.3),
                         train_dataset=Dataset.from_list(rows))
    features = [trainer.train_dataset[i] for i in range(len(rows))]
    inputs = trainer.data_collator(features)
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    examples = [completion_example(r, f"row {i}", need_label=True) for i, r in enumerate(rows)]
    loss, grads, tokenized, batch = _diffalign(
        {"name": "text-kto", "beta": 0.5, "desirable_weight": 1.0, "undesirable_weight": 1.3},
        copy.deepcopy(policy), ref, tok, examples, "feedback")
    assert [list(t) for t in tokenized] == [[f["prompt_ids"], f["completion_ids"]] for f in features]
    n, ids = len(rows), batch.tokens.input_ids
    assert torch.equal(ids[:n, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(ids[n:, :inputs["KL_input_ids"].shape[1]], inputs["KL_input_ids"])
    _assert_same(loss, grads, trl_loss.detach(), _grads(trl_policy))


# ------------------------------------------------------------------------- SimPO, CPO-SimPO, ORPO
def _cpo_style_rows(trainer, n: int):
    features = [trainer.train_dataset[i] for i in range(n)]
    rows = []
    for f in features:
        prompt_len = sum(1 for x in f["chosen_labels"] if x == -100)
        assert prompt_len == sum(1 for x in f["rejected_labels"] if x == -100)
        rows.append([f["chosen_input_ids"][:prompt_len], f["chosen_input_ids"][prompt_len:],
                     f["rejected_input_ids"][prompt_len:]])
    return features, rows


SIMPO_CASES = {  # (sft_weight = cpo_alpha, label_smoothing)
    "simpo": (0.0, 0.0),
    "simpo-label-smoothing": (0.0, 0.1),
    "cpo-simpo": (0.7, 0.0),
}


@pytest.mark.parametrize("data", ["plain", "conversational"])
@pytest.mark.parametrize("case", list(SIMPO_CASES))
def test_simpo_equals_trl_cpo_trainer(tiny, tmp_path, case, data):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok, policy, _ = tiny
    sft_weight, eps = SIMPO_CASES[case]
    rows = DATA[data]
    trl_policy = copy.deepcopy(policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's experimental-API warning
        trainer = CPOTrainer(trl_policy, processing_class=tok, train_dataset=Dataset.from_list(rows),
                             args=_args(CPOConfig, tmp_path, len(rows), loss_type="simpo", beta=2.0,
                                        simpo_gamma=0.5, cpo_alpha=sft_weight, label_smoothing=eps))
    features, trl_rows = _cpo_style_rows(trainer, len(rows))
    inputs = trainer.data_collator(features)
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    examples = [preference_example(r, f"row {i}") for i, r in enumerate(rows)]
    loss, grads, tokenized, _ = _diffalign(
        {"name": "text-simpo", "beta": 2.0, "gamma": 0.5, "sft_weight": sft_weight, "label_smoothing": eps},
        copy.deepcopy(policy), None, tok, examples, "pairs")
    assert [list(t) for t in tokenized] == trl_rows
    _assert_same(loss, grads, trl_loss.detach(), _grads(trl_policy))


@pytest.mark.parametrize("data", ["plain", "conversational"])
def test_orpo_equals_trl(tiny, tmp_path, data):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok, policy, _ = tiny
    rows = DATA[data]
    trl_policy = copy.deepcopy(policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(trl_policy, processing_class=tok, train_dataset=Dataset.from_list(rows),
                              args=_args(ORPOConfig, tmp_path, len(rows), beta=0.25))
    features, trl_rows = _cpo_style_rows(trainer, len(rows))
    inputs = trainer.data_collator(features)
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    examples = [preference_example(r, f"row {i}") for i, r in enumerate(rows)]
    loss, grads, tokenized, _ = _diffalign({"name": "text-orpo", "beta": 0.25}, copy.deepcopy(policy), None, tok,
                                           examples, "pairs")
    assert [list(t) for t in tokenized] == trl_rows
    _assert_same(loss, grads, trl_loss.detach(), _grads(trl_policy))
    other, *_ = _diffalign({"name": "text-orpo", "beta": 0.25, "nll": "completion_mean"}, copy.deepcopy(policy),
                           None, tok, examples, "pairs")  # the kept completion-only NLL is not TRL's
    assert abs(other.item() - trl_loss.item()) > 1e-4 * abs(trl_loss.item())  # 10x the tolerance
