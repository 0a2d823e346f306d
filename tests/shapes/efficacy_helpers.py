"""What the Shapes efficacy tests share (imported by name from the test files of this folder).

The training candidates are the bundled ``datasets/shapes-candidates`` (the demo's own 400 prompts × 4
samples of the bundled base model; made by ``diffalign shapes candidates`` and checked against a fresh
sample in test_demo.py), so the tests spend their time on training. Held-out means unseen prompt
combinations (the grammar's held-out split) and fixed seeds, the same for every model compared; the
base model's held-out images are sampled once per test session, by whichever efficacy test first needs
them (after its own training), and shared with the other workers through the session's temporary folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image

from diffalign.eval.generate import generate
from diffalign.shapes.demo import (
    Candidates,
    compare_images,
    heldout_eval_set,
    load_base_pipeline,
)
from diffalign.shapes.efficacy import oracle_pairs  # noqa: F401 - the tests' data, as the efficacy table's
from diffalign.shapes.oracle import Oracle
from diffalign.trainers.loop import train
from diffalign.trainers.registry import load_recipe

ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = ROOT / "datasets" / "shapes-candidates" / "candidates.parquet"
EVAL_PER_TASK, EVAL_SEEDS = 12, 2  # 144 held-out images
STEPS = {"num_inference_steps": 20, "guidance_scale": 5.0}


class HeldoutWorld:
    """The candidates, the held-out prompts and seeds, and (:attr:`base_imgs`, sampled on first use) the
    base model's images for them. One torch thread: the measured margins are those of single-threaded
    numerics, whatever the CPU count."""

    def __init__(self, shared_dir: Path):
        torch.set_num_threads(1)
        self.candidates = Candidates.load(CANDIDATES)
        self.eval_prompts, self.eval_seeds = heldout_eval_set(EVAL_PER_TASK, EVAL_SEEDS)
        self._base_file = shared_dir / f"shapes-heldout-base-{EVAL_PER_TASK}x{EVAL_SEEDS}.npy"
        self._base_imgs = None

    @property
    def base_imgs(self) -> list[Image.Image]:
        """The base model's held-out images (the first caller of the session samples and saves them,
        losslessly; the others wait on the lock and read them)."""
        if self._base_imgs is None:
            with FileLock(f"{self._base_file}.lock"):
                if not self._base_file.is_file():
                    torch.manual_seed(0)
                    imgs = generate(load_base_pipeline(), [p.text for p in self.eval_prompts], self.eval_seeds,
                                    **STEPS)
                    np.save(self._base_file, np.stack([np.asarray(im.convert("RGB")) for im in imgs]))
                self._base_imgs = [Image.fromarray(a) for a in np.load(self._base_file)]
        return self._base_imgs


def heldout_world(tmp_path_factory) -> HeldoutWorld:
    """The :class:`HeldoutWorld` of this session: its base images live in the folder that every xdist
    worker of the session shares (the parent of the workers' own temporary roots)."""
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    return HeldoutWorld(shared)


def train_and_compare(world, tmp: Path, recipe: str, overrides: list[str],
                      write_data: Callable[[Path], None] | None) -> tuple[dict, list]:
    """Train ``pipelines/<recipe>`` (with ``overrides``) on what ``write_data(path)`` writes (``None``: an
    on-line method, no data), sample the held-out set with the LoRA and compare it with base
    (:func:`~diffalign.shapes.demo.compare_images`)."""
    tmp.mkdir(parents=True, exist_ok=True)
    data_overrides = []
    if write_data is not None:
        write_data(tmp / "train.parquet")
        data_overrides = [f"data.source={tmp / 'train.parquet'}"]
    config = load_recipe(ROOT / "pipelines" / recipe, [*data_overrides, f"train.output_dir={tmp / 'run'}",
                                                       "train.seed=0", "train.checkpointing_steps=100000", *overrides])
    run_dir = train(config)
    aligned = load_base_pipeline()
    aligned.load_lora_weights(run_dir / "final")
    imgs = generate(aligned, [p.text for p in world.eval_prompts], world.eval_seeds, **STEPS)
    return compare_images(world.base_imgs, imgs, world.eval_prompts), imgs


def labels_and_flipped_runs(world, tmp: Path, recipe: str) -> list[tuple[dict, list]]:
    """:func:`train_and_compare` of ``recipe`` on the oracle pairs and on the same pairs with flipped labels."""
    from diffalign.data.pickapic import write_pickapic_parquet

    return [train_and_compare(world, tmp / name, recipe, [],
                              lambda path, flip=flip: write_pickapic_parquet(oracle_pairs(world.candidates, flip=flip),
                                                                             path))
            for name, flip in (("labels", False), ("flipped", True))]


CLAIMS = {
    "over_base_significant": "aligned beats base significantly (95% CI above 0.5)",
    "over_base": "aligned beats base (win rate above 0.5)",
    "control_below_base": "the control trained on flipped labels is below 0.5 against base",
    "over_control_significant": "aligned beats the flipped-label control significantly (95% CI above 0.5)",
    "shapes_eval_rises": "aligned's held-out ShapesEval overall is at least 0.04 above base's",
}
FULL_CLAIMS = ("over_base_significant", "control_below_base", "over_control_significant")


def efficacy_measures(world, aligned: tuple[dict, list], control: tuple[dict, list]) -> dict:
    """Win rates (with 95% CIs) of aligned over base, control over base and aligned over control, and
    held-out ShapesEval overall of base, aligned and control."""
    (aligned, aligned_imgs), (control, control_imgs) = aligned, control
    d_rate, d_lo, d_hi = Oracle(noise=0.0).win_rate(aligned_imgs, control_imgs, world.eval_prompts)
    return {
        "aligned_over_base": [aligned["oracle_win_rate"]["aligned_over_base"], *aligned["oracle_win_rate"]["ci95"]],
        "control_over_base": [control["oracle_win_rate"]["aligned_over_base"], *control["oracle_win_rate"]["ci95"]],
        "aligned_over_control": [d_rate, d_lo, d_hi],
        "shapes_eval": {"base": aligned["shapes_eval"]["base"]["overall"],
                        "aligned": aligned["shapes_eval"]["aligned"]["overall"],
                        "control": control["shapes_eval"]["aligned"]["overall"]},
    }


def failed_claims(m: dict, claims) -> list[str]:
    """The names of ``claims`` (keys of :data:`CLAIMS`) that the measures ``m`` do not meet."""
    holds = {
        "over_base_significant": m["aligned_over_base"][1] > 0.5,
        "over_base": m["aligned_over_base"][0] > 0.5,
        "control_below_base": m["control_over_base"][0] < 0.5,
        "over_control_significant": m["aligned_over_control"][1] > 0.5,
        "shapes_eval_rises": m["shapes_eval"]["aligned"] >= m["shapes_eval"]["base"] + 0.04,
    }
    return [c for c in claims if not holds[c]]


def assert_labels_beat_flipped_labels(method: str, world, aligned: tuple[dict, list], control: tuple[dict, list],
                                      claims=FULL_CLAIMS) -> dict:
    """Assert ``claims`` (names in :data:`CLAIMS`; by default the issue's three: aligned beats base
    significantly, the flipped-label control is below base, aligned beats that control significantly)
    and return the measures. With ``DIFFALIGN_EFFICACY_LOG`` set, each run's measures are appended to that
    file as one JSON line (how the README's rows under other CPU kernels were collected).

    Which claims a test asserts is the set that held at every training seed measured (README, Shapes
    table): a fixed-seed run under other float kernels (AVX2, AVX-512, scalar) behaves like another
    training seed, so a claim that holds at one seed only checks the numerics, not the method. Methods
    with a supervised pull on the preferred image (MaPO's ``L_w`` term) fine-tune the model on its own
    samples whichever way the labels point."""
    import json

    m = efficacy_measures(world, aligned, control)
    print(f"\n{method}: {json.dumps(m)}")
    if os.environ.get("DIFFALIGN_EFFICACY_LOG"):
        with open(os.environ["DIFFALIGN_EFFICACY_LOG"], "a") as f:
            f.write(json.dumps({"method": method, "cpu_capability": torch.backends.cpu.get_cpu_capability(), **m})
                    + "\n")
    failed = failed_claims(m, claims)
    assert not failed, f"{method}: " + "; ".join(CLAIMS[c] for c in failed) + f" does not hold: {m}"
    return m
