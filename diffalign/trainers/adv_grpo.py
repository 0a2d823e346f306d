"""Adv-GRPO ("The Image as Its Own Reward", showlab/Adv-GRPO, arXiv 2511.20256): GRPO whose reward model is a
discriminator trained alongside the generator, reference images as positives and the generator's own samples
as negatives.

The discriminator is a frozen vision foundation model (DINOv2, transformers' ``Dinov2Model``) with a small
trainable head on its CLS and patch tokens (:mod:`diffalign.rewards.adversarial`). Epochs alternate as coded
(``scripts/train_sd3_fast_dino_patch.py``): with ``train_d``, an epoch whose ``(epoch + 1) % d_times != 0``
samples the rollout and takes one Adam step of the head on it (the hinge loss
:func:`~diffalign.objectives.adversarial.hinge_discriminator_loss`, one reference image of the same prompt per
generated image), and the generator is not updated; every ``d_times``-th epoch is a GRPO epoch on the reward
``0.7·D(cls) + 0.3·mean D(64 random patches)`` (:func:`~diffalign.objectives.adversarial.discriminator_reward`)
with the DDPO/GRPO loss of :mod:`diffalign.trainers.ddpo`. ``train.max_steps`` counts generator steps only.

Reference images: ``reference_images`` is a JSON file ``{prompt: [image file, ...]}`` (the original's
``json_path`` layout; relative paths are read from the JSON's folder). ``prompts: references`` trains on its
prompts; any other prompt source must have references for each of its prompts.

The head and its optimizer are checkpointed (``discriminator.safetensors`` / ``discriminator.json``, no pickle)
and restored by ``--resume``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffalign.core.positions import stable_seed
from diffalign.objectives.adversarial import hinge_discriminator_loss
from diffalign.rewards.adversarial import (
    DINO_ID,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AdversarialReward,
    DiscriminatorHead,
    VisionFeatures,
    sample_patches,
)
from diffalign.trainers.ddpo import ADVANTAGE_MODES, DDPO, DDPOConfig, PerPromptStatTracker
from diffalign.trainers.method import register_method
from diffalign.trainers.online import OnlineMethod, Rollout, gather_float, load_prompts

HEAD_FILE, HEAD_JSON = "discriminator.safetensors", "discriminator.json"


@dataclass
class AdvGRPOConfig(DDPOConfig):
    """Adv-GRPO with the DINO discriminator; defaults from Adv-GRPO ``config/grpo.py``
    (``dino_cotrain_sd3_patch_fast``) and ``train_dino`` unless noted. The GRPO knobs are DDPO's
    (:class:`~diffalign.trainers.ddpo.DDPOConfig`); ``reward`` must stay empty (the discriminator is the reward).

    Attributes:
        reference_images: JSON ``{prompt: [image files]}`` of reference images (required).
        prompts: ``references`` (the JSON's prompts, default) or any prompt source of :class:`RolloutConfig`.
        features: the frozen vision model: hub id, folder or ``bundled:NAME`` (``facebook/dinov2-base``; the
            original's timm ``vit_base_patch14_dinov2.lvd142m``).
        feature_image_size: the side images are resized to (None: 518 for DINOv2, as the original).
        feature_mean, feature_std: normalisation of the [0, 1] pixels (ImageNet's).
        allow_pickle: allow a feature checkpoint without safetensors.
        head_hidden: hidden width of the head ``Linear(D, 512)–GELU–Linear(512, 1)`` (512).
        head_weights: a safetensors file of a trained head to start from (None: fresh).
        n_patches: patch tokens sampled per image, in the loss and the reward (64).
        patch_weight: weight of the patch hinge term in the head's loss (0.3).
        cls_weight: weight of ``D(cls)`` in the reward, ``1 − cls_weight`` on the patches' mean (0.7).
        d_lr: Adam learning rate of the head (1e-4); d_betas: its betas ((0.5, 0.999)).
        d_steps: Adam steps of the head per discriminator epoch, on the same samples (1, as coded).
        d_times: one generator epoch every ``d_times`` epochs, the others train the head (10).
        train_d: train the head at all (True; False keeps ``head_weights`` fixed and every epoch is GRPO's).
        normalize_scored_features: L2-normalise the features when scoring, as the original's scorer does
            although its head trains on unnormalised features (False here: train and score agree).
        num_steps, eta, guidance_scale, images_per_prompt, prompts_per_epoch, advantage, timestep_fraction,
            clip_range, kl_beta: 10 SDE steps, noise level 0.8, CFG 4.5, groups of 16, 6 prompts per process
            (48 groups over 8 GPUs), group mean with the epoch's std (``global_std``), 0.99, 1e-5, no KL.
    """

    reference_images: str = ""
    prompts: str | list[str] = "references"
    features: str = DINO_ID
    feature_image_size: int | None = None
    feature_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    feature_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    allow_pickle: bool = False
    head_hidden: int = 512
    head_weights: str | None = None
    n_patches: int = 64
    patch_weight: float = 0.3
    cls_weight: float = 0.7
    d_lr: float = 1e-4
    d_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    d_steps: int = 1
    d_times: int = 10
    train_d: bool = True
    normalize_scored_features: bool = False
    num_steps: int = 10
    eta: float | None = 0.8
    guidance_scale: float = 4.5
    images_per_prompt: int = 16
    prompts_per_epoch: int = 6
    advantage: str = "group_global_std"
    timestep_fraction: float = 0.99
    clip_range: float = 1e-5
    kl_beta: float = 0.0


def load_reference_images(path: str | Path) -> dict[str, list[Path]]:
    """``{prompt: [image paths]}`` from a JSON file mapping prompts to image files (relative to its folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"method.reference_images {path}: no such file (a JSON {{prompt: [image files]}})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"method.reference_images {path}: not JSON ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"method.reference_images {path}: expected a non-empty {{prompt: [image files]}} mapping")
    out = {}
    for prompt, files in raw.items():
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise ValueError(f"method.reference_images {path}: prompt {prompt!r} needs a list of image files")
        out[prompt] = [p if p.is_absolute() else path.parent / p for p in map(Path, files)]
        missing = [str(p) for p in out[prompt] if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"method.reference_images {path}: prompt {prompt!r}: no such image {missing[0]}")
    return out


@register_method("adv-grpo", AdvGRPOConfig, kind="online")
class AdvGRPO(DDPO):
    """GRPO on an adversarially trained DINO reward (module docstring)."""

    def __init__(self, config: AdvGRPOConfig, backbone):
        if config.reward:
            raise ValueError("adv-grpo's reward is its discriminator: leave method.reward empty")
        if not config.reference_images:
            raise ValueError("adv-grpo needs method.reference_images: a JSON {prompt: [image files]}")
        if len(config.feature_mean) != 3 or len(config.feature_std) != 3 or len(config.d_betas) != 2:
            raise ValueError("feature_mean and feature_std need 3 numbers, d_betas 2")
        if config.d_times < 1 or config.d_steps < 1:
            raise ValueError(f"d_times and d_steps must be >= 1, got {config.d_times}, {config.d_steps}")
        if not 0 <= config.cls_weight <= 1:
            raise ValueError(f"cls_weight must be in [0, 1], got {config.cls_weight}")
        if config.advantage not in ADVANTAGE_MODES:
            raise ValueError(f"unknown advantage {config.advantage!r}; choose from {ADVANTAGE_MODES}")
        if config.advantage.startswith("group") and config.images_per_prompt < 2:
            raise ValueError(f"advantage {config.advantage!r} needs images_per_prompt >= 2")
        OnlineMethod.__init__(self, config, backbone)
        self.references = load_reference_images(config.reference_images)
        if config.prompts == "references":
            self.prompts = list(self.references)
        else:
            self.prompts = load_prompts(config.prompts, config.prompt_options)
            missing = [p for p in self.prompts if p not in self.references]
            if missing:
                raise ValueError(f"{len(missing)} training prompt(s) have no reference image in "
                                 f"{config.reference_images}, e.g. {missing[0]!r}")
        features = VisionFeatures.from_pretrained(config.features, image_size=config.feature_image_size,
                                                  mean=config.feature_mean, std=config.feature_std,
                                                  allow_pickle=config.allow_pickle)
        head = DiscriminatorHead(features.dim, config.head_hidden)
        if config.head_weights:
            from safetensors.torch import load_file

            head.load_state_dict(load_file(config.head_weights))
        self.reward = AdversarialReward(features, head, n_patches=config.n_patches, cls_weight=config.cls_weight,
                                        normalize_scored_features=config.normalize_scored_features)
        self.reward.to(backbone.device)
        self.d_optimizer = torch.optim.Adam(head.parameters(), lr=config.d_lr, betas=tuple(config.d_betas))
        self.tracker = PerPromptStatTracker(config.buffer_size, config.min_count)
        self.d_metrics: dict[str, float] = {}

    def discriminator_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` trains the head (and not the generator)."""
        return self.config.train_d and (epoch + 1) % self.config.d_times != 0

    # ---- rollout
    def rollout(self, run, epoch: int) -> Rollout:
        cfg, acc = self.config, run.accelerator
        seed = run.recipe.train.seed
        self.reward.generator = torch.Generator().manual_seed(stable_seed(seed, "adv-score", epoch, acc.process_index))
        if not self.discriminator_epoch(epoch):
            rollout = super().rollout(run, epoch)
            rollout.metrics.update(self.d_metrics)
            return rollout
        g = cfg.images_per_prompt
        texts = [p for p in self.epoch_prompts(run, epoch, self.prompts) for _ in range(g)]
        traj = self.sample(run, texts, epoch, shared_noise=g if cfg.same_initial_noise else 1)
        fake = self.backbone.decode_latents(traj.final)
        rng = random.Random(stable_seed(seed, "adv-references", epoch, acc.process_index))
        real = [self._open(rng.choice(self.references[t])) for t in texts]
        with torch.enable_grad():
            self.d_metrics = self.train_discriminator(run, real, fake, epoch)
        return Rollout(traj, texts, metrics=dict(self.d_metrics), extra={"train_generator": False})

    @staticmethod
    def _open(path: Path):
        from PIL import Image

        with Image.open(path) as im:
            return im.convert("RGB")

    def train_discriminator(self, run, real, fake: torch.Tensor, epoch: int) -> dict[str, float]:
        """``d_steps`` Adam steps of the head on reference images ``real`` (PIL) vs generations ``fake``
        ``[B, 3, H, W]`` (``train_dino``; the frozen features are computed once), gradients averaged over
        processes. Returns the last step's metrics (its loss is before that step's update; gathered)."""
        cfg, acc, head = self.config, run.accelerator, self.reward.head
        g = torch.Generator().manual_seed(stable_seed(run.recipe.train.seed, "adv-patches", epoch, acc.process_index))
        (cls_r, patch_r), (cls_f, patch_f) = self.reward.features(real), self.reward.features(fake)
        head.train()
        for _ in range(cfg.d_steps):
            real_patch = fake_patch = None
            if cfg.n_patches > 0 and patch_r.shape[1] > 0:
                real_patch = head(sample_patches(patch_r, cfg.n_patches, g))
                fake_patch = head(sample_patches(patch_f, cfg.n_patches, g))
            loss, terms = hinge_discriminator_loss(head(cls_r), head(cls_f), real_patch, fake_patch,
                                                   patch_weight=cfg.patch_weight)
            self.d_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if acc.num_processes > 1:
                for p in head.parameters():
                    p.grad = acc.reduce(p.grad, reduction="mean")
            self.d_optimizer.step()
        head.eval()
        out = {"d_loss": loss.detach(), **terms}
        return {k: float(gather_float(acc, v.reshape(1)).mean()) for k, v in out.items()} | {"d_epoch": float(epoch)}

    def plan(self, rollout: Rollout, run, generator: torch.Generator):
        if not rollout.extra.get("train_generator", True):
            return []  # a discriminator epoch: no generator step
        return super().plan(rollout, run, generator)

    # ---- state
    def save_state(self, folder: Path) -> None:
        from safetensors.torch import save_file

        super().save_state(folder)
        tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in self.reward.head.state_dict().items()}
        state = self.d_optimizer.state_dict()
        scalars = {}
        for param, entries in state["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{param}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(param), {})[key] = value
        save_file(tensors, str(folder / HEAD_FILE))
        groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in grp.items()} for grp in state["param_groups"]]
        (folder / HEAD_JSON).write_text(json.dumps({"param_groups": groups, "scalars": scalars,
                                                    "metrics": self.d_metrics}))

    def load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        super().load_state(folder)
        if not (folder / HEAD_FILE).is_file():
            raise FileNotFoundError(f"{folder / HEAD_FILE}: the checkpoint has no discriminator state")
        tensors = load_file(str(folder / HEAD_FILE), device=str(self.backbone.device))
        meta = json.loads((folder / HEAD_JSON).read_text())
        self.reward.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        entries: dict[int, dict] = {}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, param, key = name.split(".", 2)
                entries.setdefault(int(param), {})[key] = value.cpu() if key == "step" else value
        for param, values in meta["scalars"].items():
            entries.setdefault(int(param), {}).update(values)
        groups = [{k: tuple(v) if k == "betas" else v for k, v in grp.items()} for grp in meta["param_groups"]]
        self.d_optimizer.load_state_dict({"state": entries, "param_groups": groups})
        self.d_metrics = meta.get("metrics", {})
