"""PPD on the tiny SD: users read from the data, ln 2 at step 0, the loss by hand against the adapter-free
base UNet, the user changing the prediction, and a run through `diffalign train` whose LoRA and user
adapter load into a plain diffusers pipeline."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import _image
from run_helpers import read_metrics

from diffalign.cli import main
from diffalign.core.likelihood import denoising_error

USERS = ["alice", "bob"]


@pytest.fixture(scope="module")
def user_pairs(tmp_path_factory):
    """8 pairs: alice's (even rows) prefer the disc, bob's (odd rows) the stripes; user_id as text."""
    from diffalign.data.pickapic import write_pickapic_parquet

    rng = random.Random(0)
    rows = []
    for i in range(8):
        good, bad = _image(rng, 40, True), _image(rng, 40, False)
        user = USERS[i % 2]
        w, l = (good, bad) if user == "alice" else (bad, good)
        rows.append({"caption": f"a yellow disc {i}", "jpg_0": w, "jpg_1": l, "label_0": 1.0, "user_id": user})
    path = tmp_path_factory.mktemp("ppd") / "pairs.parquet"
    write_pickapic_parquet(rows, path)
    return path


@pytest.fixture(scope="module")
def user_file(user_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppd_users") / "users.safetensors"
    assert main(["data", "user-embeddings", str(user_pairs), str(out), "--encoder", "shapes-clip",
                 "--examples", "2"]) == 0
    return out


def _recipe(tiny_models, data, users, out, *extra, family="sd"):
    return [f"model.pretrained={tiny_models[family]}", "model.lora_rank=4", f"data.source={data}",
            "data.resolution=32", "method.name=ppd", f"method.user_embeddings={users}", f"train.output_dir={out}",
            "train.batch_size=2", "train.checkpointing_steps=0", "train.max_steps=3", "train.learning_rate=1e-3",
            *extra]


def _setup(tiny_models, user_pairs, user_file, tmp_path, *extra, family="sd"):
    from diffalign.trainers.loop import setup
    from diffalign.trainers.registry import load_recipe

    return setup(load_recipe(None, _recipe(tiny_models, user_pairs, user_file, tmp_path / "run", *extra,
                                           family=family)))


def test_user_embeddings_are_the_mean_preference_direction(user_pairs, user_file):
    from diffalign.data import read_pickapic
    from diffalign.data.users import load_user_embeddings
    from diffalign.rewards import load_reward

    users = load_user_embeddings(user_file)
    assert users.ids == USERS and users.examples == 2 and users.encoder == "shapes-clip"
    pairs = list(read_pickapic(user_pairs))
    assert [p.user for p in pairs] == USERS * 4
    clip = load_reward("shapes-clip")
    with torch.no_grad():
        for k, user in enumerate(USERS):
            mine = [p for p in pairs if p.user == user][:2]
            direction = clip.encode_image([p.chosen for p in mine]) - clip.encode_image([p.rejected for p in mine])
            assert torch.allclose(users.embeddings[k], direction.mean(0), atol=1e-6)
    # opposite preferences on similar images: the two users point (roughly) opposite ways
    assert F.cosine_similarity(users.embeddings[0], users.embeddings[1], dim=0) < 0
    with pytest.raises(ValueError, match="'carol' has no embedding"):
        users.lookup(["alice", "carol"])


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_loss_is_ln2_at_step_0_and_the_batch_carries_the_users(family, tiny_models, user_pairs, user_file, tmp_path):
    run = _setup(tiny_models, user_pairs, user_file, tmp_path, family=family)
    batch = run.data.batch(0, 0, 0, 1)
    positions = run.data.positions(0, 0, 0, 1)
    assert batch.users == [run.data.item_at(p).user for p in positions]
    out = run.method.loss(batch)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert float(out.metrics["implicit_acc"]) == 0.5
    out.loss.backward()  # the user's value projections get a gradient at step 0 (the keys and projection not yet)
    unet = run.backbone.raw_denoiser
    grads = {n: p.grad for n, p in unet.named_parameters() if "to_v_ip" in n}
    assert grads and any(g is not None and float(g.abs().max()) > 0 for g in grads.values())


def _perturb(unet, seed=0):
    """Random user value projections and LoRA B: the policy leaves the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "to_v_ip" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _base_unet(tiny_models):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_models["sd"], subfolder="unet").eval()


def test_loss_by_hand_against_the_base_unet_without_user_conditioning(tiny_models, user_pairs, user_file, tmp_path):
    from diffalign.models.user_adapter import user_tokens

    beta = 200.0
    run = _setup(tiny_models, user_pairs, user_file, tmp_path, f"method.beta={beta}")
    unet = run.backbone.raw_denoiser
    _perturb(unet)
    batch = run.data.batch(0, 0, 0, 1)
    out = run.method.loss(batch)

    emb = run.method.users.lookup(batch.users)
    text = batch.cond.prompt_embeds
    with torch.no_grad():
        tokens = user_tokens(unet, emb).repeat(2, 1, 1)
        policy = denoising_error(unet(batch.x_t, batch.timesteps, encoder_hidden_states=torch.cat([text, tokens], 1))
                                 .sample, batch.target)
        ref = denoising_error(_base_unet(tiny_models)(batch.x_t, batch.timesteps, encoder_hidden_states=text).sample,
                              batch.target)
    pw, pl = policy.chunk(2)
    rw, rl = ref.chunk(2)
    expected = -F.logsigmoid(-0.5 * beta * ((pw - pl) - (rw - rl))).mean()
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-4)
    assert abs(out.loss.item() - math.log(2)) > 1e-3  # the perturbation is visible in the loss


def test_the_user_embedding_changes_the_prediction(tiny_models, user_pairs, user_file, tmp_path):
    from diffalign.models.user_adapter import user_tokens

    run = _setup(tiny_models, user_pairs, user_file, tmp_path)
    unet = run.backbone.raw_denoiser
    batch = run.data.batch(0, 0, 0, 1)
    x, t, text = batch.x_t[:1], batch.timesteps[:1], batch.cond.prompt_embeds[:1]
    emb = run.method.users.embeddings

    def predict(tokens):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=torch.cat([text, tokens], 1)).sample

    with torch.no_grad():
        ta, tb = user_tokens(unet, emb[:1]), user_tokens(unet, emb[1:2])
        base = _base_unet(tiny_models)(x, t, encoder_hidden_states=text).sample
    # an untrained adapter leaves the UNet as it was, for every user
    # (to float rounding: the text tokens are a slice of the longer sequence, summed in another order)
    assert torch.allclose(predict(ta), base, atol=1e-5) and torch.allclose(predict(tb), base, atol=1e-5)
    _perturb(unet)
    assert (predict(ta) - predict(tb)).abs().max() > 1e-4
    with run.backbone.reference():  # LoRA off + zero user tokens: the base UNet, whatever the adapter learned
        assert torch.allclose(predict(torch.zeros_like(ta)), base, atol=1e-5)


def test_train_runs_and_final_loads_into_a_plain_pipeline(tiny_models, user_pairs, user_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffalign.data.users import load_user_embeddings
    from diffalign.models.user_adapter import (
        UserPipeline,
        load_user_adapter,
        user_tokens,
    )

    out = tmp_path / "run"
    args = ["train", "-", *("--" + a for a in _recipe(tiny_models, user_pairs, user_file, out))]
    assert main(args) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    final = out / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file() and (final / "user_adapter.safetensors").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(final)
    load_user_adapter(pipe.unet, final)
    users = load_user_embeddings(user_file)
    kw = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np", "guidance_scale": 5.0}

    def sample(embedding):
        return UserPipeline(pipe, embedding)(["a yellow disc"], generator=torch.Generator().manual_seed(0), **kw).images

    # UserPipeline is the pipeline with the tokens appended by hand
    text, neg = pipe.encode_prompt("a yellow disc", "cpu", 1, True, "")
    with torch.no_grad():
        tokens = user_tokens(pipe.unet, users.embeddings[:1])
    by_hand = pipe(prompt_embeds=torch.cat([text, tokens], 1), negative_prompt_embeds=torch.cat(
        [neg, torch.zeros_like(tokens)], 1), generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(sample(users.embeddings[0]) - by_hand).max() < 1e-6
    alice, bob = sample(users.embeddings[0]), sample(users.embeddings[1])
    assert abs(alice - bob).max() > 1e-5  # the trained adapter tells the users apart
    with pytest.raises(RuntimeError, match="already has a user adapter"):
        load_user_adapter(pipe.unet, final)


def test_resume_restores_the_user_adapter(tiny_models, user_pairs, user_file, tmp_path):
    """Stopped at step 2 and resumed to 4 gives the unbroken run's adapter (its weights are in the checkpoint)."""
    from safetensors.torch import load_file

    def train(out, steps, *extra):
        args = _recipe(tiny_models, user_pairs, user_file, out, f"train.max_steps={steps}",
                       "train.checkpointing_steps=2", "train.lr_scheduler=constant")
        assert main(["train", "-", *("--" + a for a in args), *extra]) == 0

    train(tmp_path / "a", 4)
    train(tmp_path / "b", 2)
    saved = load_file(tmp_path / "b" / "checkpoints" / "step-2" / "trainable.safetensors")
    assert any("to_v_ip" in k for k in saved) and any("ppd_user_projection" in k for k in saved)
    assert (tmp_path / "b" / "checkpoints" / "step-2" / "user_adapter.safetensors").is_file()  # loads like final/
    train(tmp_path / "b", 4, "--resume", "latest")
    wa = load_file(tmp_path / "a" / "final" / "user_adapter.safetensors")
    wb = load_file(tmp_path / "b" / "final" / "user_adapter.safetensors")
    assert wa.keys() == wb.keys() and any(float(v.abs().max()) > 0 for k, v in wa.items() if "to_v_ip" in k)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_user_pipeline_on_sdxl(tiny_models):
    """SDXL's pipeline through UserPipeline (its pooled embeddings pass as they are): untrained, the user does
    not matter and the image is the plain pipeline's; with trained value projections two users differ."""
    from diffusers import StableDiffusionXLPipeline

    from diffalign.models.user_adapter import UserPipeline, install_user_adapter

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models["sdxl"])
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np", "guidance_scale": 5.0}
    plain = pipe("a yellow disc", generator=torch.Generator().manual_seed(0), **kw).images
    install_user_adapter(pipe.unet, 8)
    a, b = torch.randn(8, generator=torch.Generator().manual_seed(1)), torch.randn(8)

    def sample(e):
        return UserPipeline(pipe, e)("a yellow disc", generator=torch.Generator().manual_seed(0), **kw).images

    assert abs(sample(a) - plain).max() < 1e-5
    _perturb(pipe.unet)
    assert abs(sample(a) - sample(b)).max() > 1e-5
