"""Adv-GRPO on tiny models: the DINOv2 features against transformers' own forward, the discriminator's hinge
step, the alternation of discriminator and generator epochs, the discriminator's checkpoint and resume, and
clear errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from run_helpers import PROMPTS, read_metrics

from diffalign.cli import main


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    from diffalign import testing

    return testing.make_tiny_dinov2(tmp_path_factory.mktemp("dino") / "dino")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """A JSON {prompt: [files]} of bright reference images of other sizes than the generations."""
    folder = tmp_path_factory.mktemp("refs")
    mapping = {}
    for i, prompt in enumerate(PROMPTS):
        names = []
        for k in range(2):
            Image.new("RGB", (40 + 4 * k, 36), (250, 240 - 20 * k, 230 - 10 * i)).save(folder / f"{i}-{k}.png")
            names.append(f"{i}-{k}.png")
        mapping[prompt] = names
    (folder / "refs.json").write_text(json.dumps(mapping))
    return folder / "refs.json"


def _args(model_dir, out, dino, references, *extra):
    return ["train", "-", f"--model.pretrained={model_dir}", "--model.lora_rank=4", "--method.name=adv-grpo",
            f"--method.reference_images={references}", f"--method.features={dino}", "--method.num_steps=3",
            "--method.guidance_scale=3.0", "--method.eta=1.0", "--method.resolution=32", "--method.n_patches=4",
            "--method.timestep_fraction=1.0", "--method.prompts_per_epoch=2", "--method.images_per_prompt=2",
            "--method.d_times=2", "--method.d_lr=1e-2", f"--train.output_dir={out}", "--train.learning_rate=1e-2",
            "--train.batch_size=2", "--train.lr_scheduler=constant", *extra]


def test_dinov2_features_are_transformers_last_hidden_state(dino):
    from transformers import Dinov2Model

    from diffalign.rewards.adversarial import VisionFeatures

    features = VisionFeatures.from_pretrained(dino, image_size=32)
    images = torch.rand(3, 3, 48, 40)
    cls, patches = features(images)
    assert cls.shape == (3, 32) and patches.shape == (3, 16, 32)   # (32 / 8)² patches
    pixels = F.interpolate(images, size=(32, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = Dinov2Model.from_pretrained(dino).eval()(pixel_values=(pixels - mean) / std).last_hidden_state
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(patches, tokens[:, 1:])
    assert VisionFeatures.from_pretrained(dino).image_size == 518   # the original's resize for DINOv2


def test_pickled_feature_checkpoints_are_refused(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from diffalign.rewards.adversarial import VisionFeatures

    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     patch_size=8, image_size=32))
    (tmp_path / "m").mkdir()
    model.config.save_pretrained(tmp_path / "m")
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")   # only pickled weights
    with pytest.raises(Exception, match="allow-pickle"):
        VisionFeatures.from_pretrained(tmp_path / "m")


def _setup(tiny_models, tmp_path, dino, references, *extra):
    from diffalign.trainers.loop import setup
    from diffalign.trainers.registry import load_recipe

    args = _args(tiny_models["sd"], tmp_path / "run", dino, references, "--train.max_steps=2", *extra)
    return setup(load_recipe(None, [a.removeprefix("--") for a in args[2:]]))


def test_discriminator_epoch_takes_one_hinge_step_and_no_generator_step(tiny_models, tmp_path, dino, references):
    from diffalign.objectives.adversarial import hinge_discriminator_loss
    from diffalign.trainers.online import epoch_plans, run_rollout

    run = _setup(tiny_models, tmp_path, dino, references, "--method.n_patches=0")  # CLS only: no random patches
    method = run.method
    head = method.reward.head
    before = {k: v.clone() for k, v in head.state_dict().items()}
    lora = [p.detach().clone() for p in run.backbone.trainable_parameters()]
    rollout = run_rollout(run)                     # epoch 0: (0 + 1) % 2 != 0, a discriminator epoch
    assert epoch_plans(run, rollout)[0] == []      # no generator step
    assert all(torch.equal(a, b) for a, b in zip(lora, run.backbone.trainable_parameters()))
    # the logged loss is the hinge loss of the head before its step, on features computed independently
    fake = run.backbone.decode_latents(rollout.traj.final)
    real = [Image.open(p).convert("RGB") for p in _chosen_references(run, rollout.prompts)]
    trained = {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(before)
    with torch.no_grad():
        (cr, _), (cf, _) = method.reward.features(real), method.reward.features(fake)
        expected, terms = hinge_discriminator_loss(head(cr), head(cf))
        gap_before = float(head(cr).mean() - head(cf).mean())
        head.load_state_dict(trained)
        gap_after = float(head(cr).mean() - head(cf).mean())
    assert rollout.metrics["d_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert rollout.metrics["accuracy"] == pytest.approx(float(terms["accuracy"]))
    assert gap_after > gap_before                  # one step: references score higher relative to generations


def _chosen_references(run, prompts):
    """The reference files the epoch-0 rollout drew (the same seeded choice as the method)."""
    import random

    from diffalign.core.positions import stable_seed

    rng = random.Random(stable_seed(run.recipe.train.seed, "adv-references", 0, 0))
    return [rng.choice(run.method.references[p]) for p in prompts]


def test_adv_grpo_run_alternates_and_lora_loads_in_diffusers(tiny_models, tmp_path, dino, references):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(_args(tiny_models["sd"], out, dino, references, "--train.max_steps=4",
                      "--train.checkpointing_steps=2")) == 0
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 1, 3, 3]      # epochs 0 and 2 train the discriminator only
    assert [r["d_epoch"] for r in rows] == [0.0, 0.0, 2.0, 2.0]
    assert rows[0]["ratio_max_dev"] == 0.0 and all(r["d_loss"] > 0 for r in rows)
    ckpt = out / "checkpoints" / "step-2"
    head = load_file(ckpt / "discriminator.safetensors")
    assert {"head.net.0.weight", "head.net.2.bias"} <= set(head) and any(k.startswith("optimizer.") for k in head)
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd"])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", num_inference_steps=2, output_type="np", height=32, width=32)
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out / "final")
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(before - after).max() > 1e-4


def test_resume_restores_the_discriminator(tiny_models, tmp_path, dino, references):
    from safetensors.torch import load_file

    unbroken, stopped = tmp_path / "a", tmp_path / "b"
    common = ["--train.checkpointing_steps=2"]
    assert main(_args(tiny_models["sd"], unbroken, dino, references, *common, "--train.max_steps=4")) == 0
    assert main(_args(tiny_models["sd"], stopped, dino, references, *common, "--train.max_steps=2")) == 0
    assert main(_args(tiny_models["sd"], stopped, dino, references, *common, "--train.max_steps=4",
                      "--resume", "latest")) == 0
    for name in ("pytorch_lora_weights.safetensors", "discriminator.safetensors"):
        a = load_file(unbroken / "checkpoints" / "step-4" / name)
        b = load_file(stopped / "checkpoints" / "step-4" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [r["d_loss"] for r in read_metrics(stopped)] == pytest.approx([r["d_loss"] for r in read_metrics(unbroken)])


def test_adv_grpo_bad_options(tiny_models, tmp_path, dino, references):
    with pytest.raises(ValueError, match="leave method.reward empty"):
        main(_args(tiny_models["sd"], tmp_path / "r", dino, references, "--method.reward=brightness",
                   "--train.max_steps=1"))
    with pytest.raises(ValueError, match="no reference image"):
        main(_args(tiny_models["sd"], tmp_path / "r", dino, references, "--method.prompts=[\"a purple hexagon\"]",
                   "--train.max_steps=1"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        main(_args(tiny_models["sd"], tmp_path / "r", dino, tmp_path / "none.json", "--train.max_steps=1"))


@pytest.mark.slow
def test_shapes_recipe_trains_on_rendered_references(tmp_path):
    """`diffalign shapes render` writes references.json; the Shapes recipe trains on it."""
    from pathlib import Path

    refs = tmp_path / "refs"
    assert main(["shapes", "render", "--out", str(refs), "--split", "train", "--n-per-task", "1"]) == 0
    mapping = json.loads((refs / "references.json").read_text())
    assert sum(map(len, mapping.values())) == len((refs / "prompts.txt").read_text().splitlines())
    recipe = Path(__file__).resolve().parents[2] / "pipelines" / "shapes-adv-grpo.yaml"
    out = tmp_path / "run"
    assert main(["train", str(recipe), f"--method.reference_images={refs / 'references.json'}",
                 "--method.num_steps=3", "--method.images_per_prompt=2", "--method.d_steps=2",
                 "--train.batch_size=4", "--train.max_steps=1", f"--train.output_dir={out}",
                 "--train.checkpointing_steps=0"]) == 0
    row = read_metrics(out)[0]
    assert row["epoch"] == 1 and row["d_loss"] > 0 and row["grad_norm"] > 0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
