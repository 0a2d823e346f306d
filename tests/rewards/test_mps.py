"""MPS on a tiny random CLIP + a tiny Cross_model whose state dict is written key by key in the
original layout; scores checked against a functional re-computation of the published formula."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from diffalign.rewards import load_reward
from diffalign.rewards.mps import CONDITIONS, MPS
from tests.rewards.conftest import pil_to_tensor, smooth_images

PROMPTS = ["a red circle", "two blue squares", "a photo of a yellow triangle"]
LAYERS, HEADS, DIM_HEAD, FF_MULT = 2, 2, 8, 2
CROSS_KW = {"cross_layers": LAYERS, "cross_heads": HEADS, "cross_dim_head": DIM_HEAD, "cross_ff_mult": FF_MULT}


def cross_state_dict(dim: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random ``cross_model.*`` tensors named and shaped as in the original checkpoint."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    inner, ff = HEADS * DIM_HEAD, FF_MULT * dim
    sd = {}
    for k in range(LAYERS):
        a, b = f"cross_model.layers.{k}.0.fn.", f"cross_model.layers.{k}.1.fn."
        sd.update({
            a + "norm.weight": 1 + rnd(dim, scale=0.1), a + "norm.bias": torch.zeros(dim),
            a + "to_q.weight": rnd(inner, dim), a + "to_kv.weight": rnd(2 * DIM_HEAD, dim),
            a + "to_out.weight": rnd(dim, inner), a + "ff.0.weight": rnd(2 * ff, dim), a + "ff.2.weight": rnd(dim, ff),
            b + "norm.weight": 1 + rnd(dim, scale=0.1), b + "norm.bias": torch.zeros(dim),
            b + "rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, DIM_HEAD, 2).float() / DIM_HEAD)),
            b + "fused_attn_ff_proj.weight": rnd(inner + 2 * DIM_HEAD + 2 * ff, dim),
            b + "attn_out.weight": rnd(dim, inner), b + "ff_out.1.weight": rnd(dim, ff),
        })
    return sd


@pytest.fixture(scope="module")
def mps_file(tiny_hf_clip, tmp_path_factory):
    """A tiny MPS state dict (``model.*`` = the tiny CLIP, ``cross_model.*``) as safetensors."""
    clip = load_file(str(tiny_hf_clip / "model.safetensors"))
    dim = CLIPModel.from_pretrained(tiny_hf_clip).config.projection_dim
    sd = {f"model.{k}": v for k, v in clip.items()} | cross_state_dict(dim)
    path = tmp_path_factory.mktemp("mps") / "mps_tiny.safetensors"
    save_file(sd, str(path))
    return path


def load_mps(mps_file, clip, **kw):
    return load_reward("mps", weights=str(mps_file), clip=str(clip), **CROSS_KW, **kw)


# ---- an independent computation: the published eval script's steps, one image at a time, as tensor ops


def _ln(x, w):
    return F.layer_norm(x, x.shape[-1:], w, torch.zeros_like(w))


def _swiglu(x):
    x, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * x


def _rot(t, n):
    inv = 1.0 / (10000 ** (torch.arange(0, DIM_HEAD, 2).float() / DIM_HEAD))
    f = torch.outer(torch.arange(n).float(), inv)
    ang = torch.cat((f, f), -1)
    half = t.shape[-1] // 2
    return t * ang.cos() + torch.cat((-t[..., half:], t[..., :half]), -1) * ang.sin()


def reference_cross(sd, img, txt, mask):
    """Cross_model on ``img [1, N, D]``, ``txt [1, M, D]``, additive ``mask [1, N, M]``."""
    x = img
    for k in range(LAYERS):
        prefix = f"cross_model.layers.{k}."
        w = {name[len(prefix):]: v for name, v in sd.items() if name.startswith(prefix)}
        h = _ln(x, w["0.fn.norm.weight"])
        q = (h @ w["0.fn.to_q.weight"].T).unflatten(-1, (HEADS, DIM_HEAD)).transpose(1, 2) * DIM_HEAD ** -0.5
        kk, v = (txt @ w["0.fn.to_kv.weight"].T).chunk(2, -1)
        att = (q @ kk.transpose(-1, -2)[:, None] + mask[:, None]).softmax(-1)
        out = (att @ v[:, None]).transpose(1, 2).flatten(2) @ w["0.fn.to_out.weight"].T
        ff = _swiglu(h @ w["0.fn.ff.0.weight"].T) @ w["0.fn.ff.2.weight"].T
        x = x + out + ff
        h = _ln(x, w["1.fn.norm.weight"])
        inner, ffd = HEADS * DIM_HEAD, 2 * FF_MULT * x.shape[-1]
        q, kk, v, f = (h @ w["1.fn.fused_attn_ff_proj.weight"].T).split([inner, DIM_HEAD, DIM_HEAD, ffd], -1)
        q = _rot(q.unflatten(-1, (HEADS, DIM_HEAD)).transpose(1, 2), x.shape[1]) * DIM_HEAD ** -0.5
        kk = _rot(kk, x.shape[1])
        att = (q @ kk.transpose(-1, -2)[:, None]).softmax(-1)
        out = (att @ v[:, None]).transpose(1, 2).flatten(2) @ w["1.fn.attn_out.weight"].T
        x = x + out + _swiglu(f) @ w["1.fn.ff_out.1.weight"].T
    return x


def reference_scores(clip_dir, mps_file, images, prompts, threshold=0.3):
    sd = load_file(str(mps_file))
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    proc = CLIPImageProcessorPil.from_pretrained(clip_dir)

    def ids(text):
        return tok(text, max_length=tok.model_max_length, padding="max_length", truncation=True,
                   return_tensors="pt").input_ids

    out = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            t_out = clip.text_model(input_ids=ids(prompt))
            text_f = clip.text_projection(t_out.last_hidden_state)
            text_eos = clip.text_projection(t_out.pooler_output)
            cond_f = clip.text_projection(clip.text_model(input_ids=ids(CONDITIONS["overall"])).last_hidden_state)
            pixels = proc(images=image, return_tensors="pt")["pixel_values"]
            image_f = clip.visual_projection(clip.vision_model(pixel_values=pixels).last_hidden_state)
            sim = torch.einsum("bid,bjd->bji", text_f, cond_f).max(dim=1, keepdim=True)[0]
            sim = sim / sim.max()
            mask = torch.where(sim > threshold, 0.0, float("-inf")).repeat(1, image_f.shape[1], 1)
            v = reference_cross(sd, image_f, text_f, mask)[:, 0]
            v, t = v / v.norm(dim=-1, keepdim=True), text_eos / text_eos.norm(dim=-1, keepdim=True)
            out.append((clip.logit_scale.exp() * (t * v).sum(-1))[0])
    return torch.stack(out)


# ---- tests


def test_mps_equals_the_published_formula(tiny_hf_clip, mps_file):
    images = smooth_images(3)
    reward = load_mps(mps_file, tiny_hf_clip, batch_size=2)
    assert isinstance(reward, MPS) and reward.card is not None and reward.card.name == "mps"
    got = reward.score(images, PROMPTS)
    expected = reference_scores(tiny_hf_clip, mps_file, images, PROMPTS)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    assert expected.std() > 1e-3  # images and prompts are told apart
    # the tiny model keeps every token at 0.3; at 0.85 the mask drops some, and scores still match
    strict = load_mps(mps_file, tiny_hf_clip, threshold=0.85)
    mask = strict.text_mask(strict.text_tokens(PROMPTS)[0])
    assert torch.isinf(mask).any() and (mask == 0).any()
    other = reference_scores(tiny_hf_clip, mps_file, images, PROMPTS, threshold=0.85)
    assert torch.allclose(strict.score(images, PROMPTS), other, atol=1e-5)
    assert not torch.allclose(other, expected, atol=1e-3)


def test_mps_scores_do_not_depend_on_the_batch(tiny_hf_clip, mps_file):
    images = smooth_images(3)
    reward = load_mps(mps_file, tiny_hf_clip, batch_size=3)
    together = reward.score(images, PROMPTS)
    alone = torch.cat([reward.score(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_mps_exact_and_differentiable_agree_and_give_pixel_gradients(tiny_hf_clip, mps_file):
    images = smooth_images(3)
    reward = load_mps(mps_file, tiny_hf_clip)
    exact = reward.score(images, PROMPTS)
    reward.mode = "differentiable"
    x = pil_to_tensor(images).requires_grad_(True)
    diff = reward.score(x, PROMPTS)
    # tolerance: 1% of the logit scale (scores are logit_scale * cos, |cos| <= 1); the two paths
    # differ only in the resize (PIL on uint8 vs antialiased bicubic on floats)
    assert torch.allclose(diff.detach(), exact, atol=0.01 * reward.model.logit_scale.exp().item())
    diff.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_mps_strict_loading(tiny_hf_clip, mps_file, tmp_path):
    sd = load_file(str(mps_file))
    missing = dict(sd)
    del missing["cross_model.layers.1.0.fn.to_kv.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(KeyError, match=r"missing keys \[cross_model\.layers\.1\.0\.fn\.to_kv\.weight\]"):
        load_mps(tmp_path / "missing.safetensors", tiny_hf_clip)
    extra = dict(sd) | {"cross_model.layers.2.0.fn.to_q.weight": torch.zeros(16, 16)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(KeyError, match=r"unexpected keys \[cross_model\.layers\.2\.0\.fn\.to_q\.weight\]"):
        load_mps(tmp_path / "extra.safetensors", tiny_hf_clip)
    with pytest.raises(KeyError, match="missing keys"):  # a cross module of the wrong depth
        load_reward("mps", weights=str(mps_file), clip=str(tiny_hf_clip), **(CROSS_KW | {"cross_layers": 3}))


def test_mps_imscore_prefix_and_pickled_state_dicts(tiny_hf_clip, mps_file, tmp_path):
    images = smooth_images(2)
    expected = load_mps(mps_file, tiny_hf_clip).score(images, PROMPTS[:2])
    sd = load_file(str(mps_file))
    save_file({f"mps.{k}": v for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    # a folder holding model.safetensors (imscore's name and "mps." prefix)
    got = load_reward("mps", weights=str(tmp_path), clip=str(tiny_hf_clip), **CROSS_KW).score(images, PROMPTS[:2])
    assert torch.allclose(got, expected, atol=1e-6)
    # a folder that also holds the CLIP config, tokenizer and processor: ``clip`` defaults to it
    for f in tiny_hf_clip.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    got = load_reward("mps", weights=str(tmp_path), **CROSS_KW).score(images, PROMPTS[:2])
    assert torch.allclose(got, expected, atol=1e-6)
    torch.save(sd, tmp_path / "state_dict.pth")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_mps(tmp_path / "state_dict.pth", tiny_hf_clip)
    got = load_mps(tmp_path / "state_dict.pth", tiny_hf_clip, allow_pickle=True).score(images, PROMPTS[:2])
    assert torch.allclose(got, expected, atol=1e-6)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model_object.pth")  # a pickled module, like the original file
    with pytest.raises(ValueError, match="pickled model object"):
        load_mps(tmp_path / "model_object.pth", tiny_hf_clip, allow_pickle=True)


def test_mps_missing_files_are_named(tmp_path, mps_file):
    from diffalign.rewards import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="model.safetensors"):
        load_reward("mps", weights=str(tmp_path))
    with pytest.raises(MissingWeightsError, match="clip='DIR'"):
        load_reward("mps", weights=str(mps_file), clip=str(tmp_path / "no_clip_here"))
