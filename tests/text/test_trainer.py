import json
import math

import pytest
import torch

from diffalign.text.batches import TextData
from diffalign.text.data import load_examples
from diffalign.text.methods import build_text_method
from diffalign.text.model import CausalLM
from diffalign.trainers.registry import method_section, recipe_from_dict
from diffalign.trainers.registry import run_recipe as train

PAIRS = [
    {"prompt": "a photo of", "chosen": " a red circle", "rejected": " a blue square"},
    {"prompt": [{"role": "user", "content": "rewrite a circle"}],
     "chosen": [{"role": "assistant", "content": "a red circle"}],
     "rejected": [{"role": "assistant", "content": "two squares"}]},
    {"prompt": "a photo of two", "chosen": " green triangles", "rejected": " big squares and a circle"},
    {"prompt": "a photo of a", "chosen": " small circle", "rejected": " yellow square"},
]


@pytest.fixture()
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


def _recipe(model_dir, data, out, method, **train):
    return recipe_from_dict({
        "model": {"pretrained": str(model_dir), "lora_rank": 4},
        "data": {"source": str(data), "format": "trl"},
        "method": method,
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 2, "learning_rate": 1e-3,
                  "checkpointing_steps": 0, **train},
    })


def test_dpo_loss_is_ln2_at_initialisation_with_gradient(tiny_lm_dir, pairs_file):
    lm = CausalLM.from_pretrained(tiny_lm_dir)
    lm.add_lora(rank=4)
    method = build_text_method(method_section({"name": "text-dpo", "beta": 0.1}), lm)
    data = TextData.build(load_examples(str(pairs_file), "pairs"), "pairs", lm.tokenizer, max_length=64,
                          batch_size=4, gradient_accumulation_steps=1, seed=0)
    out = method.loss(data.collate([0, 1, 2, 3]))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["implicit_acc"].item() == 0.5
    out.loss.backward()
    grads = [p.grad.abs().sum().item() for p in lm.trainable_parameters() if p.grad is not None]
    assert grads and sum(grads) > 0


@pytest.mark.parametrize("method", [
    {"name": "text-sft"},
    {"name": "text-dpo", "loss_type": ["sigmoid", "sft"]},
    {"name": "text-dpo", "loss_type": "ipo"},
    {"name": "text-dpo", "loss_type": "hinge"},
    {"name": "text-dpo", "loss_type": "robust", "label_smoothing": 0.1},
    {"name": "text-kto"},
    {"name": "text-simpo"},
    {"name": "text-orpo"},
])
def test_each_method_trains_on_the_shared_loop(tiny_lm_dir, pairs_file, tmp_path, method):
    run = train(_recipe(tiny_lm_dir, pairs_file, tmp_path / "run", method))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows)
    assert (run / "config.yaml").is_file() and (run / "final" / "adapter_config.json").is_file()


def test_dpo_raises_preference_and_lora_reloads_with_peft(tiny_lm_dir, pairs_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = train(_recipe(tiny_lm_dir, pairs_file, tmp_path / "run", {"name": "text-dpo", "beta": 0.5},
                        max_steps=15, batch_size=4))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"] and rows[-1]["implicit_acc"] == 1.0
    # plain peft loads the saved adapter; the merged model gives the trained log-probs
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    peft_model = PeftModel.from_pretrained(base, run / "final").eval()
    lm = CausalLM.from_pretrained(run / "final")  # adapter folder: base + adapter, merged
    data = TextData.build(load_examples(str(pairs_file), "pairs"), "pairs", lm.tokenizer, max_length=64,
                          batch_size=4, gradient_accumulation_steps=1, seed=0)
    tokens = data.collate([0, 1, 2, 3]).tokens
    with torch.no_grad():
        merged = lm.logprobs(tokens).sum
        via_peft = CausalLM(peft_model, lm.tokenizer).logprobs(tokens).sum
        plain = CausalLM(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), lm.tokenizer).logprobs(tokens).sum
    torch.testing.assert_close(merged, via_peft, atol=1e-4, rtol=1e-4)
    w, l = merged.chunk(2)
    pw, pl = plain.chunk(2)
    assert ((w - l) - (pw - pl) > 0).all()  # the trained adapter prefers every chosen completion more


def test_resume_latest_equals_unbroken_run(tiny_lm_dir, pairs_file, tmp_path):
    from safetensors.torch import load_file

    method = {"name": "text-dpo", "beta": 0.5}
    unbroken = train(_recipe(tiny_lm_dir, pairs_file, tmp_path / "a", method, max_steps=4, checkpointing_steps=2))
    train(_recipe(tiny_lm_dir, pairs_file, tmp_path / "b", method, max_steps=2, checkpointing_steps=2))
    resumed = train(_recipe(tiny_lm_dir, pairs_file, tmp_path / "b", method, max_steps=4, checkpointing_steps=2,
                            resume="latest"))
    assert (resumed / "checkpoints" / "step-2" / "adapter_model.safetensors").is_file()
    a = load_file(unbroken / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    la = [json.loads(x)["loss"] for x in (unbroken / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert lb == pytest.approx(la, rel=1e-5)


def test_text_recipe_errors(tiny_lm_dir, pairs_file, tmp_path):
    bad = _recipe(tiny_lm_dir, pairs_file, tmp_path / "x", {"name": "text-dpo"})
    bad.data.format = "pickapic"
    with pytest.raises(ValueError, match="data.format"):
        train(bad)
    with pytest.raises(ValueError, match="unknown loss type"):
        train(_recipe(tiny_lm_dir, pairs_file, tmp_path / "y", {"name": "text-dpo", "loss_type": "nope"}))


def test_diffalign_train_runs_a_text_recipe(tiny_lm_dir, pairs_file, tmp_path):
    from diffalign.cli import main
    from diffalign.text.methods import TextMethod
    from diffalign.trainers.registry import methods

    assert set(methods("text")) == {"text-sft", "text-dpo", "text-kto", "text-simpo", "text-orpo"}
    # the one loop runs them: the engine takes their model and data from the text methods' hooks
    assert all(issubclass(e.method_class, TextMethod) for e in methods("text").values())
    out = tmp_path / "run"
    assert main(["train", "-", f"--model.pretrained={tiny_lm_dir}", "--model.lora_rank=4", f"--data.source={pairs_file}",
                 "--data.format=trl", "--method.name=text-dpo", "--train.max_steps=1", "--train.batch_size=2",
                 f"--train.output_dir={out}", "--train.checkpointing_steps=0"]) == 0
    assert (out / "final" / "adapter_config.json").is_file()


def test_lora_saved_from_a_gathered_state_dict_is_peft_s_own(tiny_lm_dir, tmp_path):
    """Under FSDP / ZeRO-3 the loop passes the gathered full state dict: the adapter folder written from
    it holds what peft's own save_pretrained writes, and PeftModel loads it."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lm = CausalLM.from_pretrained(tiny_lm_dir)
    lm.add_lora(rank=4)
    with torch.no_grad():
        for name, p in lm.raw_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lm.save_trained(tmp_path / "own")
    lm.save_trained(tmp_path / "gathered", state_dict={k: v.clone() for k, v in lm.raw_model.state_dict().items()})
    own = load_file(str(tmp_path / "own" / "adapter_model.safetensors"))
    gathered = load_file(str(tmp_path / "gathered" / "adapter_model.safetensors"))
    assert sorted(gathered) == sorted(own)
    for key in own:
        torch.testing.assert_close(gathered[key], own[key])
    assert (json.loads((tmp_path / "gathered" / "adapter_config.json").read_text())
            == json.loads((tmp_path / "own" / "adapter_config.json").read_text()))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "gathered"))
    ids = lm.tokenizer("a photo of a red circle", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, lm.raw_model(ids).logits)


@pytest.mark.slow
def test_text_dpo_under_deepspeed_zero3_saves_the_plain_run_s_adapter(tiny_lm_dir, pairs_file, tmp_path):
    """The text side on the same loop under DeepSpeed ZeRO-3 (one CPU process): the gathered adapter
    equals the one of the same run without DeepSpeed."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    args = ["-m", "diffalign.cli", "train", "-", f"--model.pretrained={tiny_lm_dir}", "--model.lora_rank=4",
            f"--data.source={pairs_file}", "--data.format=trl", "--method.name=text-dpo", "--train.max_steps=2",
            "--train.batch_size=2", "--train.gradient_accumulation_steps=2", "--train.learning_rate=1e-3",
            "--train.checkpointing_steps=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, *args, f"--train.output_dir={tmp_path / 'plain'}"], check=True, env=env)
    ds_env = {**env, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
              "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29527",
                    *args, f"--train.output_dir={tmp_path / 'ds'}"], check=True, env=ds_env)
    want = load_file(str(tmp_path / "plain" / "final" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "ds" / "final" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    assert any(v.abs().max() > 0 for k, v in want.items() if "lora_B" in k)
