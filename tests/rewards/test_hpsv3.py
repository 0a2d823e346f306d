"""HPSv3 on a tiny random Qwen2-VL saved in the published layout (HPSv3.safetensors + base Qwen2-VL files)."""

import csv

import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.rewards import load_reward
from tests.rewards.conftest import pil_to_tensor, smooth_images
from tests.rewards.qwen_vl_helpers import save_hpsv3

PROMPTS = ["a red circle", "two blue squares and a small yellow triangle on the left", "a cat"]


@pytest.fixture(scope="module")
def tiny_hpsv3(tmp_path_factory):
    return save_hpsv3(tmp_path_factory.mktemp("hpsv3"))


def reference_scores(weights_dir, base_dir, images, prompts):
    """The reference computation written out: Qwen2-VL built from the base config with the checkpoint's
    vocabulary, the transformers-4 keys renamed by hand, the reference's messages and its 448-ish resize,
    the processor, the last hidden state at <|Reward|>, the ranknet head as explicit matrix products."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

    from diffalign.rewards.hpsv3 import INSTRUCTION

    sd = load_file(str(weights_dir / "HPSv3.safetensors"))
    config = AutoConfig.from_pretrained(base_dir)
    config.text_config.vocab_size = sd["model.embed_tokens.weight"].shape[0]
    model = Qwen2VLForConditionalGeneration(config).eval()
    renamed = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            renamed["model." + k] = v
        elif k.startswith("model."):
            renamed["model.language_model." + k[6:]] = v
        elif k.startswith("lm_head."):
            renamed[k] = v
    model.load_state_dict(renamed, strict=True)
    processor = AutoProcessor.from_pretrained(base_dir, padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    reward_id = processor.tokenizer.convert_tokens_to_ids("<|Reward|>")
    assert reward_id == len(processor.tokenizer) - 1
    messages = [[{"role": "user", "content": [
        {"type": "image", "image": im},
        {"type": "text", "text": INSTRUCTION.format(text_prompt=p)
         + "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"}]}] for im, p in zip(images, prompts)]
    # smart resize with min_pixels = max_pixels = 256*28*28 of a 52x40 (w x h) image: 532 x 420, by hand
    resized = [im.resize((532, 420), Image.BICUBIC) for im in images]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    batch = processor(text=texts, images=resized, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
        h = hidden[batch["input_ids"] == reward_id]
        z = torch.relu(h @ sd["rm_head.0.weight"].T + sd["rm_head.0.bias"])
        z = torch.relu(z @ sd["rm_head.3.weight"].T + sd["rm_head.3.bias"])
        logits = z @ sd["rm_head.5.weight"].T + sd["rm_head.5.bias"]
    return logits[:, 0], logits[:, 1].exp(), batch


def test_score_equals_the_reference_forward_and_head(tiny_hpsv3):
    weights, base = tiny_hpsv3
    images = smooth_images(3, (40, 52))
    reward = load_reward("hpsv3", weights=str(weights), batch_size=3)
    assert reward.card is not None and reward.card.name == "hpsv3"
    mu, sigma = reward.predict(images, PROMPTS)
    ref_mu, ref_sigma, _ = reference_scores(weights, base, images, PROMPTS)
    torch.testing.assert_close(mu, ref_mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sigma, ref_sigma, atol=1e-5, rtol=1e-5)
    assert mu.std() > 1e-3                                 # the images/prompts are told apart
    # right padding: the batch gives each prompt its own score
    one_by_one = torch.cat([reward.score(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(reward.score(images, PROMPTS), one_by_one, atol=1e-5, rtol=1e-5)


def test_diffalign_score_cli_and_a_separate_base_folder(tiny_hpsv3, tmp_path):
    weights, base = tiny_hpsv3
    images = smooth_images(3, (40, 52))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"img_{i}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "scores.csv"
    assert main(["score", "--reward", "hpsv3", "--images", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(out), "--reward-weights", f"hpsv3={weights}", "--batch-size", "2"]) == 0
    rows = list(csv.DictReader(out.open()))
    ref_mu, _, _ = reference_scores(weights, base, images, PROMPTS)
    assert [float(r["hpsv3"]) for r in rows] == pytest.approx(ref_mu.tolist(), abs=1e-5)
    # the weights file alone plus base= (the Qwen2-VL folder) gives the same scores
    alone = load_reward("hpsv3", weights=str(weights / "HPSv3.safetensors"), base=str(base))
    assert alone.score(images, PROMPTS).tolist() == pytest.approx(ref_mu.tolist(), abs=1e-5)


def test_missing_base_files_and_bad_checkpoints_are_clear_errors(tiny_hpsv3, tmp_path):
    from safetensors.torch import load_file, save_file

    from diffalign.models.backbone import PickledWeightsError
    from diffalign.rewards.loading import MissingWeightsError

    weights, base = tiny_hpsv3
    with pytest.raises(MissingWeightsError, match="base="):
        load_reward("hpsv3", weights=str(weights / "HPSv3.safetensors"), base=str(tmp_path / "nowhere"))
    sd = load_file(str(weights / "HPSv3.safetensors"))
    torch.save(sd, tmp_path / "HPSv3.pt")
    with pytest.raises(PickledWeightsError, match="--allow-pickle"):
        load_reward("hpsv3", weights=str(tmp_path / "HPSv3.pt"), base=str(base))
    assert load_reward("hpsv3", weights=str(tmp_path / "HPSv3.pt"), base=str(base), allow_pickle=True) is not None
    del sd["rm_head.5.bias"]
    save_file(sd, str(tmp_path / "HPSv3.safetensors"))
    with pytest.raises(KeyError, match="rm_head.5.bias"):
        load_reward("hpsv3", weights=str(tmp_path / "HPSv3.safetensors"), base=str(base))


def test_differentiable_mode_matches_the_processor_and_has_pixel_gradients(tiny_hpsv3):
    from diffalign.rewards.qwen_vl import patchify

    weights, base = tiny_hpsv3
    reward = load_reward("hpsv3", weights=str(weights), pixels=4 * 28 * 28, batch_size=2)
    images = smooth_images(2, (56, 56), seed=3)             # already the smart-resize size: no resize either way
    exact = reward.inputs(images, PROMPTS[:2])
    x = pil_to_tensor(images)
    ip = reward.processor.image_processor
    pixel_values, grid = patchify(x, ip.image_mean, ip.image_std)
    torch.testing.assert_close(pixel_values, exact["pixel_values"], atol=1e-5, rtol=1e-5)
    assert grid.tolist() == exact["image_grid_thw"].tolist()
    reward.mode = "differentiable"
    diff = reward.inputs(x, PROMPTS[:2])
    assert torch.equal(diff["input_ids"], exact["input_ids"])
    assert torch.equal(diff["mm_token_type_ids"], exact["mm_token_type_ids"])
    x.requires_grad_(True)
    s = reward.score(x, PROMPTS[:2])
    reward.mode = "exact"
    torch.testing.assert_close(s.detach(), reward.score(images, PROMPTS[:2]), atol=1e-5, rtol=1e-5)
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_folder_with_reward_yaml_loads_in_bf16(tiny_hpsv3, tmp_path):
    import shutil

    weights, _ = tiny_hpsv3
    folder = tmp_path / "hpsv3_bf16"
    shutil.copytree(weights, folder)
    (folder / "reward.yaml").write_text("reward: hpsv3\ndtype: bf16\n")
    reward = load_reward(str(folder))
    assert next(reward.model.parameters()).dtype == torch.bfloat16 and reward.rm_head[0].weight.dtype == torch.float32
    images = smooth_images(3, (40, 52))
    full = load_reward("hpsv3", weights=str(weights)).score(images, PROMPTS)
    torch.testing.assert_close(reward.score(images, PROMPTS), full, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="dtype must be"):
        load_reward("hpsv3", weights=str(weights), dtype="int7")
