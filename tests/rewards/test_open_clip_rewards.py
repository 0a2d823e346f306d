"""HPSv2/2.1 and LAION aesthetic on tiny open_clip models of the real architectures, and the real head."""

import hashlib
import re

import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF

from diffalign.rewards import MissingWeightsError, load_reward
from diffalign.rewards.open_clip_rewards import AestheticHead
from tests.rewards.conftest import LAYOUTS, SHARED_WEIGHTS, pil_to_tensor, smooth_images

PROMPTS = ["a red circle", "two blue squares", "a cat"]
HEAD = SHARED_WEIGHTS / "laion_aesthetic_v2_sac+logos+ava1-l14-linearMSE.pth"
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def hps_checkpoint(tiny_open_clip_names, tmp_path_factory):
    torch.manual_seed(1)
    model = open_clip.create_model(tiny_open_clip_names[0], pretrained=None)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, path)
    return path, model.eval()


def hps_reference_pixels(images, size=32):
    out = []
    for im in images:
        t = TF.to_tensor(im)
        h, w = t.shape[1:]
        nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
        t = TF.resize(t, [nh, nw], TF.InterpolationMode.BICUBIC, antialias=False)
        t = TF.pad(t, [(size - nw) // 2, (size - nh) // 2, size - nw - (size - nw) // 2, size - nh - (size - nh) // 2])
        out.append(TF.normalize(t, MEAN, STD))
    return torch.stack(out)


def test_hps_is_the_raw_cosine(hps_checkpoint, tiny_open_clip_names):
    path, model = hps_checkpoint
    images = smooth_images(3, (40, 52))
    reward = load_reward("hpsv2.1", allow_pickle=True, weights=str(path), model_name=tiny_open_clip_names[0])
    with torch.no_grad():
        out = model(hps_reference_pixels(images), open_clip.get_tokenizer(tiny_open_clip_names[0])(PROMPTS))
        img, txt = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    expected = (img * txt).sum(-1)
    assert reward.name == "hpsv2.1" and reward.card.weights["files"] == ["HPS_v2.1_compressed.pt"]
    assert torch.allclose(reward.score(images, PROMPTS), expected, atol=1e-5)
    bench = load_reward("hpsv2.1", allow_pickle=True, weights=str(path.parent), model_name=tiny_open_clip_names[0], benchmark_scale=True)
    assert torch.allclose(bench.score(images, PROMPTS), 100 * expected, atol=1e-3)


def test_hps_modes_agree_and_give_gradients(hps_checkpoint, tiny_open_clip_names):
    path, _ = hps_checkpoint
    images = smooth_images(2, (40, 52))
    reward = load_reward("hpsv2.1", allow_pickle=True, weights=str(path), model_name=tiny_open_clip_names[0])
    exact = reward.score(images, PROMPTS[:2])
    reward.mode = "differentiable"
    x = pil_to_tensor(images).requires_grad_(True)
    diff = reward.score(x, PROMPTS[:2])
    assert torch.allclose(diff.detach(), exact, atol=1e-5)  # same tensor ops once the image is a tensor
    diff.sum().backward()
    assert x.grad.abs().sum() > 0


def test_hps_version_is_explicit(hps_checkpoint, tiny_open_clip_names):
    with pytest.raises(ValueError, match="explicit version"):
        load_reward("hpsv2", weights=str(hps_checkpoint[0]), model_name=tiny_open_clip_names[0])


def test_hps_strict_loading(hps_checkpoint, tiny_open_clip_names, tmp_path):
    path, model = hps_checkpoint
    sd = model.state_dict()
    prefixed = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, prefixed)
    load_reward("hpsv2.1", allow_pickle=True, weights=str(prefixed), model_name=tiny_open_clip_names[0])  # DDP prefix stripped
    for broken, key in [({k: v for k, v in sd.items() if k != "logit_scale"}, "logit_scale"),
                        ({**sd, "visual.extra": torch.zeros(1)}, "visual.extra")]:
        torch.save({"state_dict": broken}, prefixed)
        with pytest.raises(KeyError, match=re.escape(key)):
            load_reward("hpsv2.1", allow_pickle=True, weights=str(prefixed), model_name=tiny_open_clip_names[0])
    torch.save(model, tmp_path / "pickled_model.pt")  # a pickled module is refused, never unpickled
    with pytest.raises(ValueError, match="weights_only"):
        load_reward("hpsv2.1", allow_pickle=True, weights=str(tmp_path / "pickled_model.pt"), model_name=tiny_open_clip_names[0])


def test_hps_missing_file_error(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        load_reward("hpsv2.0", weights=str(tmp_path))
    assert "HPS_v2_compressed.pt" in str(err.value) and "xswu/HPSv2" in str(err.value)


@pytest.mark.skipif(not LAYOUTS.is_dir(), reason="shared/reference/checkpoint_layouts is not next to the checkout")
def test_tiny_open_clip_has_the_hpsv2_key_layout(hps_checkpoint):
    """No remapping: the open_clip model family has exactly HPSv2's checkpoint keys (up to depth)."""
    def depthless(keys):
        return {re.sub(r"\.resblocks\.\d+\.", ".resblocks.N.", k) for k in keys}

    ref = (LAYOUTS / "hpsv2_vendored_openclip_vith14.tsv").read_text().splitlines()
    assert depthless(hps_checkpoint[1].state_dict()) == depthless(line.split("\t")[0] for line in ref)


# ---------------------------------------------------------------------------- LAION aesthetic

needs_head = pytest.mark.skipif(not HEAD.is_file(), reason="shared/weights (real LAION head) is not next to the checkout")


@needs_head
def test_real_aesthetic_head_loads_strictly_and_is_affine(monkeypatch):
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    head = AestheticHead.from_file(HEAD, allow_pickle=True)
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert hashlib.sha256(HEAD.read_bytes()).hexdigest() == \
        "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
    sd = real_load(HEAD, map_location="cpu", weights_only=True)
    assert sorted(sd) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    # hand computation: the head collapses to one affine map w·x + b
    w, b = torch.eye(768, dtype=torch.float64), torch.zeros(768, dtype=torch.float64)
    for i in (0, 2, 4, 6, 7):
        W, B = sd[f"layers.{i}.weight"].double(), sd[f"layers.{i}.bias"].double()
        w, b = W @ w, W @ b + B
    assert abs(w.norm().item() - 17.9956) < 1e-3 and abs(b.item() - 5.2366) < 1e-3  # reference values
    x = torch.nn.functional.normalize(torch.randn(4, 768, dtype=torch.float64), dim=-1)
    with torch.no_grad():
        assert torch.allclose(head(x.float()).double(), (x @ w.T + b).squeeze(-1), atol=1e-4)


@needs_head
def test_aesthetic_reward_with_tiny_quickgelu_backbone(tiny_open_clip_names, tmp_path):
    torch.manual_seed(2)
    backbone = open_clip.create_model(tiny_open_clip_names[1], pretrained=None)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pt")
    reward = load_reward("laion-aesthetic", allow_pickle=True, weights=str(HEAD), backbone=tiny_open_clip_names[1],
                         backbone_weights=str(tmp_path / "backbone.pt"))
    assert isinstance(reward.clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    images = smooth_images(3, (40, 52))
    pixels = torch.stack([open_clip.image_transform(32, is_train=False)(im) for im in images])
    with torch.no_grad():
        emb = backbone.eval().encode_image(pixels)
        emb = emb / emb.norm(dim=-1, keepdim=True)
    sd = torch.load(HEAD, map_location="cpu", weights_only=True)
    h = emb
    for i in (0, 2, 4, 6, 7):
        h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    got = reward.score(images, ["ignored"] * 3)
    assert torch.allclose(got, h.squeeze(-1), atol=1e-4)
    reward.mode = "differentiable"
    x = pil_to_tensor(images).requires_grad_(True)
    diff = reward.score(x, ["ignored"] * 3)
    assert torch.allclose(diff.detach(), got, atol=0.05)  # AVA-scale points; PIL uint8 vs float resize
    diff.sum().backward()
    assert x.grad.abs().sum() > 0
