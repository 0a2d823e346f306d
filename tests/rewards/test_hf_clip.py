"""PickScore, CLIPScore and the Shapes CLIP on a tiny random CLIPModel saved in the HF layout."""

from pathlib import Path

import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from diffalign.rewards import MissingWeightsError, load_reward
from tests.rewards.conftest import LAYOUTS, pil_to_tensor, smooth_images

PROMPTS = ["a red circle", "two blue squares", "a photo of a yellow triangle"]


def reference_cos(folder: Path, images, prompts, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, logit_scale.exp()) from CLIPModel.forward on the HF PIL processor's pixels."""
    model = CLIPModel.from_pretrained(folder).eval()
    tok = CLIPTokenizer.from_pretrained(folder)
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    text = tok([prefix + p for p in prompts], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    scale = model.logit_scale.exp()
    return out.logits_per_image.diagonal() / scale, scale


def test_pickscore_equals_logit_scale_times_cosine(tiny_hf_clip):
    images = smooth_images(3)
    reward = load_reward("pickscore", weights=str(tiny_hf_clip))
    cos, scale = reference_cos(tiny_hf_clip, images, PROMPTS)
    assert reward.card is not None and reward.card.weights["hub_id"] == "yuvalkirstain/PickScore_v1"
    got = reward.score(images, PROMPTS)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert torch.allclose(got, scale * cos, atol=1e-5)
    assert cos.abs().max() > 1e-3  # a non-degenerate check


def test_pickscore_batches_and_modes(tiny_hf_clip):
    images = smooth_images(3)
    reward = load_reward("pickscore", weights=str(tiny_hf_clip), batch_size=2)
    exact = reward.score(images, PROMPTS)
    reward.mode = "differentiable"
    x = pil_to_tensor(images).requires_grad_(True)
    diff = reward.score(x, PROMPTS)
    # tolerance: 1% of the logit scale (scores are scale * cos with |cos| <= 1)
    assert torch.allclose(diff.detach(), exact, atol=0.01 * reward.model.logit_scale.exp().item())
    diff.sum().backward()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


@pytest.mark.parametrize("variant,scale,clamp,prefix", [
    ("hessel", 2.5, True, "A photo depicts "), ("torchmetrics", 100.0, False, ""), ("raw", 1.0, False, "")])
def test_clipscore_variants(tiny_hf_clip, variant, scale, clamp, prefix):
    images = smooth_images(3, size=(32, 32))  # square: both crop conventions agree with the HF reference
    reward = load_reward(f"clipscore-{variant}", weights=str(tiny_hf_clip))
    cos, _ = reference_cos(tiny_hf_clip, images, PROMPTS, prefix)
    expected = scale * (cos.clamp(min=0) if clamp else cos)
    assert torch.allclose(reward.score(images, PROMPTS), expected, atol=1e-5)
    if variant == "torchmetrics":
        assert reward.aggregate(torch.tensor([-3.0, 1.0])) == 0.0  # max(mean, 0)


def test_clipscore_needs_explicit_variant(tiny_hf_clip):
    with pytest.raises(ValueError, match="explicit variant"):
        load_reward("clipscore", weights=str(tiny_hf_clip))


def test_missing_key_in_checkpoint_is_an_error(tiny_hf_clip, tmp_path):
    from safetensors.torch import load_file, save_file

    for f in tiny_hf_clip.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(tiny_hf_clip / "model.safetensors"))
    del sd["text_projection.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="text_projection.weight"):
        load_reward("pickscore", weights=str(tmp_path))


def test_missing_weights_offline_names_file_and_hub_id(tmp_path):
    with pytest.raises(MissingWeightsError, match="model.safetensors") as err:
        load_reward("pickscore", weights=str(tmp_path / "nowhere"))
    assert "--local-dir" in str(err.value) or "weights=" in str(err.value)


def _depthless(keys):
    import re

    return {re.sub(r"\.layers\.\d+\.", ".layers.N.", k) for k in keys}


@pytest.mark.skipif(not LAYOUTS.is_dir(), reason="shared/reference/checkpoint_layouts is not next to the checkout")
def test_tiny_clip_has_the_pickscore_key_layout(tiny_hf_clip):
    """The tiny model has PickScore's checkpoint key names (up to depth); position_ids may be absent."""
    ours = _depthless(CLIPModel.from_pretrained(tiny_hf_clip).state_dict())
    ref = _depthless(l.split("\t")[0] for l in (LAYOUTS / "pickscore_hf_clip_vith14.tsv").read_text().splitlines())
    assert ours == ref - {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}


def test_local_folder_with_reward_yaml(tiny_hf_clip, tmp_path):
    """``load_reward(DIR)``: DIR/reward.yaml names the reward and its keyword arguments."""
    for f in tiny_hf_clip.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "reward.yaml").write_text("reward: shapes-clip\nbatch_size: 2\n")
    reward = load_reward(str(tmp_path))
    assert reward.name == "shapes-clip" and reward.batch_size == 2 and reward.card.name == "shapes-clip"
    images = smooth_images(3)
    cos, scale = reference_cos(tiny_hf_clip, images, PROMPTS)
    assert torch.allclose(reward.score(images, PROMPTS), scale * cos, atol=1e-5)
