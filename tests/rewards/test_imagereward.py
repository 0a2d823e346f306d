"""ImageReward on a tiny BLIP/BERT saved in the original ``ImageReward.pt`` key layout."""

import re

import pytest
import torch
from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

from diffalign.rewards import load_reward
from tests.rewards.conftest import LAYOUTS, pil_to_tensor, smooth_images

WORDS = ["a", "red", "circle", "two", "blue", "squares", "cat", "photo", "of"]
TINY = {"vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              patch_size=8, image_size=32),
        "text_config": dict(vocab_size=30524, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, encoder_hidden_size=32)}
PROMPTS = ["a red circle", "two blue squares", "a photo of a cat " * 12]  # the last is cut at 35 tokens


def to_original_layout(sd):
    """transformers BLIP keys -> ImageReward.pt keys (the table in checkpoint_layouts/README.md, reversed)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("itm_head."):
            continue
        m = re.match(r"vision_model\.(.*)", k)
        if m:
            rest = m.group(1)
            rest = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed"}.get(rest, rest)
            rest = re.sub(r"^embeddings\.patch_embedding\.", "patch_embed.proj.", rest)
            rest = re.sub(r"^encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2.", rest)
            rest = re.sub(r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv.", rest)
            rest = re.sub(r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj.", rest)
            rest = re.sub(r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp.", rest)
            rest = re.sub(r"^post_layernorm\.", "norm.", rest)
            out["blip.visual_encoder." + rest] = v
        else:
            out["blip." + k] = v
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(512)[None]
    return out


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("imagereward")
    blip = BlipForImageTextRetrieval(BlipConfig(**TINY)).eval()
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()
    sd = to_original_layout(blip.state_dict())
    sd.update({f"mlp.layers.{k}": v for k, v in mlp.state_dict().items()})
    torch.save(sd, folder / "ImageReward.pt")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return folder, blip, mlp, sd


@pytest.mark.skipif(not LAYOUTS.is_dir(), reason="shared/reference/checkpoint_layouts is not next to the checkout")
def test_tiny_checkpoint_has_the_original_key_layout(tiny_imagereward):
    def depthless(keys):
        return {re.sub(r"\.(blocks|layer)\.\d+\.", r".\1.N.", k) for k in keys}

    ref = [line.split("\t")[0] for line in (LAYOUTS / "imagereward_state_dict.tsv").read_text().splitlines()]
    assert depthless(tiny_imagereward[3]) == depthless(ref)


def test_imagereward_score_by_hand(tiny_imagereward):
    import open_clip

    folder, blip, mlp, _ = tiny_imagereward
    images = smooth_images(3, (40, 52))
    reward = load_reward("imagereward", allow_pickle=True, weights=str(folder), blip_config=TINY)
    assert reward.card.weights["hub_id"] == "THUDM/ImageReward"
    tok = BertTokenizer(str(folder / "vocab.txt"))
    text = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert text["input_ids"].shape == (3, 35)
    pixels = torch.stack([open_clip.image_transform(32, is_train=False)(im) for im in images])
    with torch.no_grad():
        img = blip.vision_model(pixel_values=pixels).last_hidden_state
        hid = blip.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                encoder_hidden_states=img).last_hidden_state[:, 0]
        expected = (mlp(hid).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    got = reward.score(images, PROMPTS)
    assert torch.allclose(got, expected, atol=1e-4)
    reward.mode = "differentiable"
    x = pil_to_tensor(images).requires_grad_(True)
    diff = reward.score(x, PROMPTS)
    assert torch.allclose(diff.detach(), got, atol=0.05)  # z-units; PIL uint8 vs float resize
    diff.sum().backward()
    assert x.grad.abs().sum() > 0


def test_imagereward_strict_loading(tiny_imagereward, tmp_path):
    folder, _, _, sd = tiny_imagereward
    (tmp_path / "vocab.txt").write_text((folder / "vocab.txt").read_text())
    broken = {k: v for k, v in sd.items() if k != "blip.visual_encoder.blocks.1.attn.qkv.weight"}
    torch.save(broken, tmp_path / "ImageReward.pt")
    with pytest.raises(KeyError, match=r"vision_model\.encoder\.layers\.1\.self_attn\.qkv\.weight"):
        load_reward("imagereward", allow_pickle=True, weights=str(tmp_path), blip_config=TINY)
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ImageReward.pt")  # DDP prefix
    load_reward("imagereward", allow_pickle=True, weights=str(tmp_path), blip_config=TINY)
