"""DenseDPO: per-segment logits by hand, tie segments without gradient, ln 2 at init, and the segment-mask
efficacy test (a flipped segment label moves only that segment the other way)."""

import json
import math

import pytest
import torch

from diffalign import testing
from diffalign.cli import main
from diffalign.data.video import read_video_pairs, save_clip
from diffalign.models import load_backbone
from diffalign.trainers import METHODS, build_method, run_recipe
from diffalign.trainers.densedpo import (
    DenseDPOConfig,
    VideoPairData,
    densedpo_loss,
    segment_errors,
)
from diffalign.trainers.registry import recipe_from_dict


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return testing.make_tiny_wan(tmp_path_factory.mktemp("wan") / "wan")


def moving_disc(frames: int = 17, size: int = 32) -> torch.Tensor:
    """A clip ``[3, T, H, W]`` in [0, 1]: a disc crossing the frame left to right."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for t in range(frames):
        blob = torch.exp(-((xx - (-0.6 + 1.2 * t / (frames - 1))) ** 2 + yy ** 2) / 0.1)
        out.append(torch.stack([blob, 0.3 + 0 * blob, 1 - blob]))
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory, wan_folder):
    """One structural pair of the moving disc (η = 1, 4 steps) made by ``diffalign data video-pairs``, and
    label files over its segments, starting at frames 0, 5, 9, 13 (latent frames {0,1}, {2}, {3}, {4})."""
    root = tmp_path_factory.mktemp("densedpo")
    save_clip(root / "src.npy", moving_disc())
    (root / "clips.jsonl").write_text(json.dumps({"prompt": "a red disc", "video": "src.npy"}) + "\n")
    assert main(["data", "video-pairs", str(root / "clips.jsonl"), "--model", str(wan_folder), "--out",
                 str(root / "pairs"), "--strength", "1.0", "--steps", "4", "--segment-frames", "4"]) == 0
    row = json.loads((root / "pairs" / "pairs.jsonl").read_text())
    assert row["segment_labels"] is None and row["segment_starts"] == [0, 5, 9, 13]   # labels left for annotators
    for name, labels in {"allwin": ["win"] * 4, "flip": ["win", "win", "lose", "win"],
                         "ties": ["tie", "win", "tie", "lose"]}.items():
        (root / "pairs" / f"{name}.jsonl").write_text(json.dumps(dict(row, segment_labels=labels)) + "\n")
    return root / "pairs"


def test_registered_with_a_recipe():
    from pathlib import Path

    from diffalign.trainers import densedpo
    from diffalign.trainers.registry import get_method, load_recipe

    assert "densedpo" in METHODS and get_method("densedpo").kind == "video" and hasattr(densedpo.DenseDPO, "load_model")
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "pipelines" / "wan-densedpo.yaml")
    assert recipe.data.format == "video-segments" and recipe.model.pretrained.startswith("Wan-AI/")
    spec = dict(recipe.method)
    assert isinstance(METHODS[spec.pop("name")].config_class(**spec), DenseDPOConfig)
    with pytest.raises(ValueError, match="unknown loss type"):
        DenseDPOConfig(loss_type="orpo")


def test_segment_errors_are_means_over_the_segment_frames():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 5, 2, 2, generator=g), torch.randn(2, 3, 5, 2, 2, generator=g)
    masks = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1.]]).expand(2, 3, 5)
    errors = segment_errors(pred, target, masks)
    se = (pred - target) ** 2
    expected = torch.stack([se[:, :, :2].mean((1, 2, 3, 4)), se[:, :, 2].mean((1, 2, 3)),
                            se[:, :, 3:].mean((1, 2, 3, 4))], 1)
    torch.testing.assert_close(errors, expected)


def test_per_segment_logits_by_hand():
    beta = 10.0
    # two pairs, three segments; rows: video_0 of pair 0, 1, then video_1 of pair 0, 1
    policy = torch.tensor([[0.50, 0.40, 0.30], [0.20, 0.25, 0.60],
                           [0.52, 0.38, 0.35], [0.21, 0.20, 0.50]])
    ref = torch.tensor([[0.51, 0.41, 0.31], [0.22, 0.22, 0.55],
                        [0.50, 0.40, 0.30], [0.20, 0.21, 0.52]])
    labels = torch.tensor([[1, -1, 0], [-1, 0, 1]])
    weights = torch.tensor([1.0, 3.0])
    out = densedpo_loss(policy, ref, labels, weights, DenseDPOConfig(beta=beta))

    def z(b, s, y):   # -½β·y·((Lθ0 − Lθ1) − (Lr0 − Lr1))
        return -0.5 * beta * y * ((policy[b, s] - policy[b + 2, s]) - (ref[b, s] - ref[b + 2, s]))

    terms = [(1.0, z(0, 0, 1)), (1.0, z(0, 1, -1)), (3.0, z(1, 0, -1)), (3.0, z(1, 2, 1))]
    expected = sum(w * -math.log(1 / (1 + math.exp(-float(v)))) for w, v in terms) / 8.0
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["labelled_segments"].item() == 4 and out.metrics["tie_segments"].item() == 2
    acc = sum(float(v) > 0 for _, v in terms) / 4
    assert out.metrics["implicit_acc"].item() == pytest.approx(acc)


def test_tie_segments_get_zero_gradient():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 3, 5, 2, 2, generator=g, requires_grad=True)   # one pair: video_0, video_1
    target = torch.randn(2, 3, 5, 2, 2, generator=g)
    masks = torch.tensor([[[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1.]]])
    ref = torch.rand(2, 3, generator=g)
    out = densedpo_loss(segment_errors(pred, target, masks.repeat(2, 1, 1)), ref, torch.tensor([[1, 0, -1]]),
                        torch.ones(1), DenseDPOConfig(beta=50.0))
    out.loss.backward()
    grad = pred.grad.abs().amax(dim=(1, 3, 4))   # [2 rows, 5 frames]
    assert torch.all(grad[:, 2] == 0)            # the tie segment's frame
    assert torch.all(grad[:, [0, 1, 3, 4]] > 0)

    pred.grad = None                              # a batch of ties only: loss 0, still differentiable, no gradient
    out = densedpo_loss(segment_errors(pred, target, masks.repeat(2, 1, 1)), ref, torch.zeros(1, 3, dtype=torch.long),
                        torch.ones(1), DenseDPOConfig())
    assert out.loss.item() == 0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.all(pred.grad == 0)


def test_loss_is_ln2_at_init_on_the_video_backbone(wan_folder, pair_dir):
    backbone = load_backbone(wan_folder)
    backbone.add_lora(rank=4)
    method = build_method({"name": "densedpo", "beta": 1000.0}, backbone)
    data = VideoPairData(items=read_video_pairs(pair_dir / "ties.jsonl"), kind="segment-pairs", backbone=backbone,
                         resolution=0, batch_size=1, gradient_accumulation_steps=1, seed=0)
    batch = data.batch(0, 0, 0, 1)
    assert batch.x_t.shape == (2, 4, 5, 4, 4) and batch.segment_masks.shape == (1, 4, 5)
    assert batch.segment_labels.tolist() == [[0, 1, 0, -1]]
    torch.testing.assert_close(batch.x_t[0] - batch.x_t[1], (batch.latents[0] - batch.latents[1])
                               * (1 - batch.timesteps[0] / 1000))   # shared noise and timestep
    out = method.loss(batch)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["implicit_acc"].item() == 0.5
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.trainable_parameters())


def _train(pair_file, out_dir, wan_folder, steps: int = 40):
    recipe = recipe_from_dict({
        "model": {"pretrained": str(wan_folder), "lora_rank": 8},
        "data": {"source": str(pair_file), "format": "video-segments", "cache_dir": ""},
        "method": {"name": "densedpo", "beta": 1000.0},
        "train": {"output_dir": str(out_dir), "max_steps": steps, "learning_rate": 1e-2, "checkpointing_steps": 0}})
    return run_recipe(recipe)


def _segment_margins(wan_folder, run_dir, pair_file, draws: int = 16) -> torch.Tensor:
    """Mean over fixed (noise, t) draws of ``(Lθ1 − Lr1) − (Lθ0 − Lr0)`` per segment ``[S]``: > 0 where the
    trained model favours video_0 there more than the reference does."""
    policy = load_backbone(wan_folder)
    policy.load_trained(run_dir / "final")
    data = VideoPairData(items=read_video_pairs(pair_file), kind="segment-pairs", backbone=policy, resolution=0,
                         batch_size=1, gradient_accumulation_steps=1, seed=123)
    margins = []
    with torch.no_grad():
        for step in range(draws):
            batch = data.batch(step, 0, 0, 1)
            masks = batch.segment_masks.repeat(2, 1, 1)
            err = segment_errors(policy.predict(batch.x_t, batch.timesteps, batch.cond), batch.target, masks)
            with policy.reference():
                err = err - segment_errors(policy.predict(batch.x_t, batch.timesteps, batch.cond), batch.target, masks)
            margins.append(err[1] - err[0])
    return torch.stack(margins).mean(0)


def test_flipped_segment_label_moves_only_that_segment(tmp_path, wan_folder, pair_dir):
    """Efficacy (issue 7): trained on [win, win, lose, win] the third segment's frames move toward video_1
    while the others move toward video_0; trained on all-win every segment moves toward video_0."""
    runs = {name: _train(pair_dir / f"{name}.jsonl", tmp_path / name, wan_folder) for name in ("allwin", "flip")}
    for run in runs.values():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 40 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert rows[-1]["loss"] < 0.6
        assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    allwin = _segment_margins(wan_folder, runs["allwin"], pair_dir / "allwin.jsonl")
    flip = _segment_margins(wan_folder, runs["flip"], pair_dir / "allwin.jsonl")
    assert torch.all(allwin > 0), allwin
    assert flip[2] < 0 < flip[[0, 1, 3]].min(), flip
    assert flip[2] - allwin[2] < 0


def test_structural_pairs_share_the_clip_structure(wan_folder):
    """Two denoisings of one partly noised clip: reproducible per seed, different across seeds, and the
    less noise (η), the closer the two are to each other and to the source."""
    from diffalign.data.video import structural_pair

    backbone = load_backbone(wan_folder)
    backbone.max_sequence_length = 16
    clip = moving_disc()
    a, b = structural_pair(backbone, clip, "a red disc", strength=0.3, seeds=(0, 1), num_inference_steps=10)
    assert a.shape == clip.shape and 0 <= a.min() and a.max() <= 1
    again, _ = structural_pair(backbone, clip, "a red disc", strength=0.3, seeds=(0, 7), num_inference_steps=10)
    torch.testing.assert_close(again, a)
    far_a, far_b = structural_pair(backbone, clip, "a red disc", strength=1.0, seeds=(0, 1), num_inference_steps=10)
    assert 0 < (a - b).abs().mean() < (far_a - far_b).abs().mean()
    assert (a - clip).abs().mean() < (far_a - clip).abs().mean()
    with pytest.raises(ValueError, match="strength"):
        structural_pair(backbone, clip, "a red disc", strength=0.0)
