"""Segment-labelled video pairs: the JSONL reader, clip formats, segment -> latent-frame masks, structural pairs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.data.video import (
    assign_latent_frames,
    check_latent_coverage,
    load_clip,
    parse_segment_label,
    read_video_pairs,
    save_clip,
    segment_masks,
    uniform_segment_starts,
)

WAN_SPANS_17 = [(0, 1), (1, 5), (5, 9), (9, 13), (13, 17)]   # Wan's causal 4x VAE on 17 frames


def _clip(frames=17, seed=0):
    return torch.rand(3, frames, 8, 8, generator=torch.Generator().manual_seed(seed))


def _write(tmp_path, rows, frames=17):
    save_clip(tmp_path / "a.npy", _clip(frames))
    save_clip(tmp_path / "b.npy", _clip(frames, 1))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "a cat", "video_0": "a.npy", "video_1": "b.npy", **r}) + "\n"
                            for r in rows))
    return path


def test_labels_and_segment_layouts(tmp_path):
    path = _write(tmp_path, [{"segment_frames": 4, "segment_labels": ["win", "LOSE", "tie", 1, 0.5]},
                             {"segment_starts": [0, 5, 9], "segment_labels": [0, "w", "t"], "weight": 2}])
    first, second = read_video_pairs(path)
    assert first.segment_starts == [0, 4, 8, 12, 16] and first.labels == [1, -1, 0, 1, 0]
    assert second.segment_starts == [0, 5, 9] and second.labels == [-1, 1, 0] and second.weight == 2.0
    assert first.num_frames == 17 and first.key == second.key   # same clips and prompt, same cache key
    assert uniform_segment_starts(10, 4) == [0, 4, 8]
    with pytest.raises(ValueError, match="segment label 'better'"):
        parse_segment_label("better", "here")


@pytest.mark.parametrize("row, message", [
    ({"segment_frames": 4, "segment_labels": ["win"] * 4}, "4 segment labels for 5 segments"),
    ({"segment_frames": 4}, "'segment_labels' must be a non-empty list"),
    ({"segment_labels": ["win"]}, "no 'segment_frames' or 'segment_starts'"),
    ({"segment_starts": [0, 9, 5], "segment_labels": ["win"] * 3}, "'segment_starts' must be increasing"),
    ({"segment_frames": 4, "segment_labels": ["win"] * 5, "weight": -1}, "'weight' is -1"),
    ({"segment_frames": 4, "segment_labels": ["win"] * 5, "video_1": "missing.npy"}, "'video_1': clip .* does not exist"),
])
def test_bad_rows_name_the_line_and_field(tmp_path, row, message):
    path = _write(tmp_path, [{"segment_frames": 17, "segment_labels": ["win"]}, row])
    with pytest.raises((ValueError, FileNotFoundError), match=f"pairs.jsonl:line 2: .*{message}"):
        read_video_pairs(path)


def test_clips_of_different_lengths_are_refused(tmp_path):
    path = _write(tmp_path, [{"segment_frames": 4, "segment_labels": ["win"] * 5}])
    save_clip(tmp_path / "b.npy", _clip(13))
    with pytest.raises(ValueError, match="video_0 has 17 frames but video_1 has 13"):
        read_video_pairs(path)


def test_latent_frames_go_to_the_segment_holding_most_of_their_pixel_frames():
    # uniform 4-frame segments [0-3], [4-7], [8-11], [12-15], [16]: latent 1 = frames 1-4 (3 in segment 0)
    assert assign_latent_frames(uniform_segment_starts(17, 4), 17, WAN_SPANS_17) == [0, 0, 1, 2, 3]
    assert assign_latent_frames([0, 5, 9, 13], 17, WAN_SPANS_17) == [0, 0, 1, 2, 3]
    assert assign_latent_frames([0, 3], 17, WAN_SPANS_17) == [0, 0, 1, 1, 1]   # 2 of 4 each: the earlier one
    masks = segment_masks([0, 5, 9, 13], 17, WAN_SPANS_17)
    assert masks.tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert torch.all(segment_masks(uniform_segment_starts(17, 4), 17, WAN_SPANS_17).sum(0) == 1)


def test_a_labelled_segment_without_latent_frames_is_an_error(tmp_path):
    path = _write(tmp_path, [{"segment_frames": 4, "segment_labels": ["win", "win", "win", "win", "lose"]},
                             {"segment_frames": 4, "segment_labels": ["win", "win", "win", "win", "tie"]}])
    bad, ok = read_video_pairs(path)
    with pytest.raises(ValueError, match=r"line 1: labelled segment\(s\) \[4\]"):
        check_latent_coverage(bad, WAN_SPANS_17)
    check_latent_coverage(ok, WAN_SPANS_17)   # an empty tie segment is harmless


def test_clip_formats(tmp_path):
    clip = _clip(5)
    save_clip(tmp_path / "c.npy", clip)
    expected = (clip * 255).round() / 255
    torch.testing.assert_close(load_clip(tmp_path / "c.npy"), expected)
    frames = (expected.permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)
    np.savez(tmp_path / "c.npz", frames=frames)
    torch.testing.assert_close(load_clip(tmp_path / "c.npz"), expected)
    (tmp_path / "frames").mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / "frames" / f"{i:03d}.png")
    torch.testing.assert_close(load_clip(tmp_path / "frames"), expected)
    np.save(tmp_path / "bad.npy", frames[..., :2])
    with pytest.raises(ValueError, match=r"must be \[T, H, W, 3\]"):
        load_clip(tmp_path / "bad.npy")


def test_segments_labelled_by_mean_per_frame_reward():
    from diffalign.data.video import label_segments_by_reward
    from diffalign.rewards import load_reward

    reward = load_reward("brightness")
    bright, dark = torch.full((3, 4, 8, 8), 0.9), torch.full((3, 4, 8, 8), 0.1)
    clip_0 = torch.cat([bright, dark, bright], 1)
    clip_1 = torch.cat([dark, bright, bright], 1)
    assert label_segments_by_reward(reward, clip_0, clip_1, "x", [0, 4, 8]) == ["win", "lose", "tie"]
    assert label_segments_by_reward(reward, clip_0, clip_1, "x", [0, 4, 8], tie_margin=1.0) == ["tie"] * 3
