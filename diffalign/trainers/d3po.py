"""D3PO (Yang et al., CVPR 2024): DPO on the denoising chain, no reward model needed in the loss.

Two trajectories per prompt start from the same initial noise (yk7333/d3po ``scripts/rm/train_d3po.py``);
a label says which final image is preferred. Each denoising step of the pair is one DPO comparison
on the per-step log-ratio to the reference, the ratio clamped as in D3PO's code::

    r = clamp(exp(log π_θ(x_{j+1} | x_j) − log π_ref(x_{j+1} | x_j)), 1 − ε, 1 + ε)
    L = −log σ(β · (log r_w − log r_l))              β = 0.1, ε = 0.1 (D3PO config/base.py)

The clamp stops the gradient of a ratio outside ``[1−ε, 1+ε]`` (D3PO issue #4: ε = 0.1, not 0.2).
Both members of a pair are trained at the same step ``j`` (the pair shares ``x_0``); steps are shuffled
per pair and the first ``int(S·timestep_fraction)`` are trained.

Labels (``labels``):

* ``reward``: the higher-scoring image of a registered reward (or ``{name: weight}`` mix) wins;
  scores within ``tie_margin`` are ties (D3PO's ``compare``; ties give ``log 2`` and no gradient:
  they are kept with weight 0 so every process runs the same number of steps).
* ``oracle``: the Shapes oracle annotator (:class:`diffalign.shapes.Oracle`, noisy like a human).
* ``file``: human labels (D3PO's ``scripts/sample.py`` → ``scripts/train.py``). The first run with
  an empty ``rollout_dir`` samples ``images_per_prompt`` images for each of ``prompts_per_epoch``
  prompts, saves the trajectories, the images and ``labels.jsonl`` (one row per prompt:
  ``{"group", "prompt", "images", "scores"}`` with ``scores`` null) and stops. Fill ``scores``
  (one number per image, higher is better; several annotators: one file each, averaged as D3PO's
  ``load_data_from_json``), list the files in ``label_files`` and run again: every epoch trains on
  all pairs of a prompt with unequal scores.

Reference (``reference``): ``base`` is D3PO's frozen initial model (the LoRA disabled). Its
log-prob of a stored transition is computed once per epoch, on first use, and cached; while the
policy still is the base model (the first rollout, and every ``file`` rollout, sampled before any
update) the stored sampling log-probs are the reference's and are reused without any forward pass.
``rollout`` takes the sampling policy as the reference (the stored log-probs, never recomputed): an
iterated, trust-region form of the same loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffalign.core.positions import stable_seed
from diffalign.core.sampling import (
    Trajectory,
    sampler_from_config,
    transition_log_probs,
)
from diffalign.models.base import Conditioning
from diffalign.objectives.online import d3po_loss
from diffalign.trainers.method import StepOutput, register_method, weighted_mean
from diffalign.trainers.online import (
    Micro,
    OnlineMethod,
    Rollout,
    RolloutConfig,
    StopForInput,
    build_reward,
    gather_float,
    load_prompts,
)

LABEL_SOURCES = ("reward", "oracle", "file")


@dataclass
class D3POConfig(RolloutConfig):
    """D3PO; defaults from yk7333/d3po ``config/base.py`` (SD1.5, LoRA, lr 3e-5 in its train section).

    Attributes:
        beta: β on the clamped log-ratios (0.1).
        eps: ratio clamp ε (0.1).
        labels: ``reward``, ``oracle`` or ``file`` (module docstring).
        reward, reward_options, reward_normalize: the reward (``labels: reward``), as for DDPO.
        tie_margin: reward differences ``<= tie_margin`` are ties (0: only equal scores).
        oracle_options: keyword arguments of :class:`diffalign.shapes.Oracle` (noise, tie_margin, ...).
        images_per_prompt: images per prompt sharing one initial noise: 2 for ``reward``/``oracle``;
            ``file`` takes any number (D3PO's human runs: 7).
        rollout_dir: where ``file`` mode keeps its sampled trajectories and images.
        label_files: the filled-in ``labels.jsonl`` files (``file`` mode).
        reference: ``base`` (D3PO's frozen initial model) or ``rollout`` (the sampling policy).
    """

    num_steps: int = 20
    eta: float | None = 1.0
    guidance_scale: float = 5.0
    prompts_per_epoch: int = 20
    beta: float = 0.1
    eps: float = 0.1
    labels: str = "reward"
    reward: str | dict[str, float] = ""
    reward_options: dict[str, dict] = field(default_factory=dict)
    reward_normalize: str | None = "batch"
    tie_margin: float = 0.0
    oracle_options: dict = field(default_factory=dict)
    images_per_prompt: int = 2
    rollout_dir: str | None = None
    label_files: list[str] = field(default_factory=list)
    reference: str = "base"


class LabelsNeeded(StopForInput):
    """``file`` mode sampled a rollout that has no human labels yet."""


@register_method("d3po", D3POConfig, kind="online")
class D3PO(OnlineMethod):
    """D3PO on pairs of trajectories from one initial noise (module docstring)."""

    units_per_sample = 2

    def __init__(self, config: D3POConfig, backbone):
        super().__init__(config, backbone)
        if config.labels not in LABEL_SOURCES:
            raise ValueError(f"unknown labels {config.labels!r}; choose from {LABEL_SOURCES}")
        if config.reference not in ("base", "rollout"):
            raise ValueError(f"reference must be 'base' or 'rollout', not {config.reference!r}")
        if config.labels != "file" and config.images_per_prompt != 2:
            raise ValueError(f"labels {config.labels!r} compare two images per prompt; images_per_prompt must be 2")
        if config.images_per_prompt < 2:
            raise ValueError("images_per_prompt must be >= 2")
        if config.labels == "file" and not config.rollout_dir:
            raise ValueError("labels 'file' needs method.rollout_dir (where the images to label are written)")
        self.prompts = load_prompts(config.prompts, config.prompt_options)
        self.reward = None
        if config.labels == "reward":
            self.reward = build_reward(config.reward, config.reward_options, config.reward_normalize)
            self.reward.to(backbone.device)
        self._file_rollout: tuple[Trajectory, list[str]] | None = None

    # ---- rollout
    def rollout(self, run, epoch: int) -> Rollout:
        cfg = self.config
        if cfg.labels == "file":
            traj, texts, pairs, weights, metrics = self._labelled_rollout(run)
            policy_is_reference = True  # sampled once, before any update
        else:
            texts = [p for p in self.epoch_prompts(run, epoch, self.prompts) for _ in range(2)]
            traj = self.sample(run, texts, epoch, shared_noise=2)
            label0, metrics = self._label_pairs(run, epoch, traj, texts)
            first = torch.arange(0, len(texts), 2)
            pairs = torch.stack([torch.where(label0 >= 0.5, first, first + 1),
                                 torch.where(label0 >= 0.5, first + 1, first)], dim=1)
            weights = (label0 != 0.5).float()
            policy_is_reference = run.global_step == 0
        device = traj.latents.device
        if cfg.reference == "rollout" or policy_is_reference:
            ref = traj.log_probs.clone()
        else:
            ref = torch.full_like(traj.log_probs, float("nan"))
        return Rollout(traj, texts, tensors={"pairs": pairs.to(device), "weights": weights.to(device),
                                             "ref_log_probs": ref}, metrics=metrics)

    def num_units(self, rollout: Rollout) -> int:
        return len(rollout.tensors["pairs"])

    def _label_pairs(self, run, epoch: int, traj: Trajectory, texts: list[str]) -> tuple[torch.Tensor, dict]:
        """``label_0`` ``[P]`` per pair (1: the first image wins, 0: the second, 0.5: tie) and metrics."""
        cfg, acc = self.config, run.accelerator
        images = self.backbone.decode_latents(traj.final)
        metrics: dict[str, float] = {}
        if cfg.labels == "reward":
            scores = self.reward.score(images, texts).float().cpu()
            gap = scores[0::2] - scores[1::2]
            label0 = torch.where(gap > cfg.tie_margin, 1.0, torch.where(gap < -cfg.tie_margin, 0.0, 0.5))
            all_scores = gather_float(acc, scores)
            metrics.update(reward_mean=float(all_scores.mean()),
                           reward_gap_mean=float(gather_float(acc, gap.abs()).mean()))
        else:
            from diffalign.rewards.base import to_pil
            from diffalign.shapes.oracle import Oracle

            oracle = Oracle(**{**cfg.oracle_options,
                               "seed": stable_seed(run.recipe.train.seed, "oracle", epoch, acc.process_index)})
            pil = to_pil(images)
            label0 = torch.tensor(oracle.label_pairs(pil[0::2], pil[1::2], texts[0::2]))
            utilities = torch.tensor([oracle.utility(im, p) for im, p in zip(pil, texts)])
            metrics["oracle_utility_mean"] = float(gather_float(acc, utilities).mean())
        metrics["tie_frac"] = float(gather_float(acc, (label0 == 0.5).float()).mean())
        return label0, metrics

    # ---- loss
    def loss(self, rollout: Rollout, micro: Micro) -> StepOutput:
        cfg = self.config
        pairs = rollout.tensors["pairs"][micro.units]                 # [b, 2] (winner, other)
        idx = pairs.T.reshape(-1)                                     # [2b]: winners then others
        steps = micro.steps.repeat(2)
        traj = rollout.traj[idx]
        logp = transition_log_probs(self.backbone, traj, steps).log_prob[:, 0]
        ref = self._reference_log_probs(rollout, idx, steps, traj)
        (logp_w, logp_l), (ref_w, ref_l) = logp.chunk(2), ref.chunk(2)
        losses, logits, r_w, r_l = d3po_loss(logp_w, logp_l, ref_w, ref_l, beta=cfg.beta, eps=cfg.eps)
        weights = rollout.tensors["weights"][micro.units]
        ratio = torch.exp(logp.detach() - ref)
        return StepOutput(weighted_mean(losses, weights), {
            "implicit_acc": weighted_mean((logits.detach() > 0).float() + 0.5 * (logits.detach() == 0).float(), weights),
            "logit_mean": weighted_mean(logits.detach(), weights),
            "ratio_mean": ratio.mean(),
            "ratio_max_dev": (ratio - 1).abs().max(),
            "clampfrac": ((ratio - 1).abs() > cfg.eps).float().mean(),
        })

    def _reference_log_probs(self, rollout: Rollout, idx: torch.Tensor, steps: torch.Tensor,
                             traj: Trajectory) -> torch.Tensor:
        """``[2b]`` reference log-probs of the transitions, from the cache when known; missing ones are
        computed (no grad, LoRA off) for the whole micro-batch and cached."""
        cache = rollout.tensors["ref_log_probs"]
        steps = steps.to(cache.device)
        values = cache[idx, steps]
        missing = torch.isnan(values)
        if missing.any():
            with torch.no_grad(), self.backbone.reference():
                fresh = transition_log_probs(self.backbone, traj, steps).log_prob[:, 0]
            cache[idx[missing], steps[missing]] = fresh[missing]
            values = torch.where(missing, fresh, values)
        return values

    # ---- human labels
    def _labelled_rollout(self, run):
        """``file`` mode: the saved rollout and the pairs of its label files (samples it first if absent)."""
        cfg, acc = self.config, run.accelerator
        folder = Path(cfg.rollout_dir)
        if self._file_rollout is None:
            if not (folder / ROLLOUT_FILE).is_file():
                if run.global_step > 0:
                    raise FileNotFoundError(f"{folder / ROLLOUT_FILE} is gone; the run trained on it")
                g = cfg.images_per_prompt
                texts = [p for p in self.epoch_prompts(run, 0, self.prompts) for _ in range(g)]
                traj = self.sample(run, texts, 0, shared_noise=g)
                if acc.num_processes > 1:
                    raise RuntimeError("sample the rollout to label on one process (accelerate launch is for training)")
                save_rollout(folder, traj, texts, g, self.backbone.decode_latents(traj.final))
                raise LabelsNeeded(f"sampled {len(texts)} images to label in {folder}: fill 'scores' in "
                                   f"{folder / 'labels.jsonl'} (one number per image, higher is better), then "
                                   f"run again with --method.label_files='[{folder / 'labels.jsonl'}]'")
            self._file_rollout = load_rollout(folder, self.backbone.device)
        traj, texts, group = self._file_rollout
        if not cfg.label_files:
            raise ValueError(f"labels 'file': list the filled-in label files in method.label_files "
                             f"(the template is {folder / 'labels.jsonl'})")
        pairs = pairs_from_label_files(cfg.label_files, len(texts) // group, group)
        n = len(pairs) // acc.num_processes  # the same number of pairs on every process
        if n == 0:
            raise ValueError(f"the label files {cfg.label_files} give no pair with unequal scores")
        pairs = pairs[acc.process_index * n:(acc.process_index + 1) * n]
        return traj, texts, pairs, torch.ones(len(pairs)), {"labelled_pairs": float(n * acc.num_processes)}


ROLLOUT_FILE = "trajectories.safetensors"


def save_rollout(folder: Path, traj: Trajectory, texts: list[str], group: int, images: torch.Tensor) -> None:
    """Write trajectories (safetensors), their images (PNG) and a ``labels.jsonl`` template."""
    from safetensors.torch import save_file

    from diffalign.rewards.base import to_pil

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    tensors = {"latents": traj.latents, "log_probs": traj.log_probs, "timesteps": traj.timesteps}
    tensors |= {f"cond.{k}": v for k, v in traj.cond.to_dict().items() if v is not None}
    if traj.uncond is not None:
        tensors |= {f"uncond.{k}": v for k, v in traj.uncond.to_dict().items() if v is not None}
    meta = {"prompts": texts, "images_per_prompt": group, "guidance_scale": traj.guidance_scale,
            "sampler": traj.sampler.config}
    rows = []
    for i, im in enumerate(to_pil(images)):
        im.save(folder / "images" / f"{i // group:05d}-{i % group}.png")
    for g in range(len(texts) // group):
        rows.append({"group": g, "prompt": texts[g * group],
                     "images": [f"images/{g:05d}-{k}.png" for k in range(group)], "scores": [None] * group})
    (folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "rollout.json").write_text(json.dumps(meta, default=list))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / ROLLOUT_FILE))


def load_rollout(folder: Path, device) -> tuple[Trajectory, list[str], int]:
    """What :func:`save_rollout` wrote: ``(trajectories, prompts, images_per_prompt)``."""
    from safetensors.torch import load_file

    t = load_file(str(folder / ROLLOUT_FILE), device=str(device))
    meta = json.loads((folder / "rollout.json").read_text())
    cond = Conditioning.from_dict({k[5:]: v for k, v in t.items() if k.startswith("cond.")})
    unc = {k[7:]: v for k, v in t.items() if k.startswith("uncond.")}
    traj = Trajectory(t["latents"], t["timesteps"].cpu(), t["log_probs"], cond,
                      Conditioning.from_dict(unc) if unc else None, meta["guidance_scale"],
                      sampler_from_config(meta["sampler"]))
    return traj, meta["prompts"], meta["images_per_prompt"]


def pairs_from_label_files(paths: list[str], num_groups: int, group: int) -> torch.Tensor:
    """``[P, 2]`` (preferred, other) trajectory indices: every pair of a group whose scores,
    averaged over the files, differ. Each file has one row per group: ``{"group", "scores"}``."""
    totals = torch.zeros(num_groups, group, dtype=torch.float64)
    for path in paths:
        seen = set()
        for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                row = json.loads(line)
                g, scores = int(row["group"]), row["scores"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: expected {{'group': int, 'scores': [...]}} ({e})") from None
            if not 0 <= g < num_groups:
                raise ValueError(f"{where}: field 'group' = {g} is not in [0, {num_groups})")
            if not isinstance(scores, list) or len(scores) != group or any(
                    not isinstance(s, (int, float)) or isinstance(s, bool) for s in scores):
                raise ValueError(f"{where}: field 'scores' must list {group} numbers, got {scores!r}")
            totals[g] += torch.tensor(scores, dtype=torch.float64)
            seen.add(g)
        if len(seen) != num_groups:
            raise ValueError(f"{path}: no scores for group(s) {sorted(set(range(num_groups)) - seen)[:10]}")
    pairs = []
    for g in range(num_groups):
        for i in range(group):
            for j in range(i + 1, group):
                a, b = g * group + i, g * group + j
                if totals[g, i] != totals[g, j]:
                    pairs.append((a, b) if totals[g, i] > totals[g, j] else (b, a))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
