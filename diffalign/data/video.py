"""Video pairs with segment-level preferences (DenseDPO), and the structural pairs they are made from.

**File format**: JSONL, one pair per line; clip paths are relative to the JSONL file (or ``video_root``)::

    {"prompt": "a cat jumps", "video_0": "clips/0001_a.npy", "video_1": "clips/0001_b.npy",
     "segment_frames": 4, "segment_labels": ["win", "tie", "lose", "win", "win"]}

* ``segment_labels``: one label per temporal segment, from ``video_0``'s side: ``"win"`` (``video_0`` is
  better in that segment), ``"lose"`` (``video_1`` is better) or ``"tie"``. Numbers are read as
  Pick-a-Pic's ``label_0`` per segment: ``1`` = win, ``0`` = lose, ``0.5`` = tie.
* The segments: ``segment_frames: s`` cuts the clip into ``ceil(T / s)`` segments of ``s`` pixel frames
  (the last may be shorter; DenseDPO's layout), or ``segment_starts: [0, 5, 9, 13]`` gives the first
  pixel frame of each (what :func:`make_structural_pairs` writes, :func:`causal_segment_starts`). One of
  the two (or the reader's ``segment_frames`` default) is required.
* Optional ``weight`` (a finite number ≥ 0) scales the pair's loss.
* Clips: ``.npy`` / ``.npz`` arrays ``[T, H, W, 3]`` (uint8, or float in [0, 1]), a folder of frame
  images (sorted by name), or a video file that ``diffusers.utils.load_video`` reads (``.gif`` with
  PIL; ``.mp4`` needs ``imageio``). Both clips of a pair must have the same frame count.

**Segments and latent frames**: the denoiser sees latent frames. Each latent frame goes to the segment
holding most of the pixel frames it encodes (:func:`assign_latent_frames`; ties go to the earlier
segment), so every latent frame counts in exactly one segment. With Wan's causal 4× VAE the clean
layout is segments starting at frames ``0, 1 + s, 1 + 2s, ...`` with ``s`` a multiple of 4; a labelled segment that gets no latent frame
is an error, not a silent zero.

**Structural pairs** (:func:`structural_pair`): DenseDPO's way to make pairs that share motion and
layout: partially noise one real clip to level η and denoise it twice with different seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from diffalign.data.jsonl import iter_jsonl, require_text
from diffalign.data.pairs import content_key

WIN, LOSE, TIE = 1, -1, 0
_LABELS = {"win": WIN, "w": WIN, "lose": LOSE, "l": LOSE, "loss": LOSE, "tie": TIE, "t": TIE}
_NUMERIC = {1.0: WIN, 0.0: LOSE, 0.5: TIE}
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class VideoPair:
    """One clip pair with per-segment labels (``+1`` video_0 better, ``-1`` video_1 better, ``0`` tie).

    ``segment_starts`` ``[S]``: first pixel frame of each segment; ``labels`` ``[S]``; ``num_frames``: ``T``.
    ``source`` names the file and line for errors; ``key`` changes when either clip file does.
    """

    prompt: str
    video_0: Path
    video_1: Path
    segment_starts: list[int]
    labels: list[int]
    num_frames: int
    weight: float = 1.0
    source: str = ""
    key: str = ""


def parse_segment_label(value, where: str) -> int:
    """``"win"``/``"lose"``/``"tie"`` (or ``1``/``0``/``0.5``) → ``+1``/``-1``/``0``."""
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) in _NUMERIC:
        return _NUMERIC[float(value)]
    raise ValueError(f"{where}: segment label {value!r} is not 'win', 'lose' or 'tie' (or 1, 0, 0.5)")


def uniform_segment_starts(num_frames: int, segment_frames: int) -> list[int]:
    """``ceil(T / s)`` segments of ``s`` frames: ``[0, s, 2s, ...]``."""
    if segment_frames < 1:
        raise ValueError(f"segment_frames must be >= 1, not {segment_frames}")
    return list(range(0, num_frames, segment_frames))


def causal_segment_starts(num_frames: int, segment_frames: int) -> list[int]:
    """Segments of ``s`` frames for a causal video VAE: frame 0 joins the first segment, ``[0, s+1, 2s+1, ...]``.

    With ``s`` a multiple of the VAE's temporal compression every segment owns whole latent frames
    (Wan, 81 frames, ``s = 16``: five segments of latent frames ``{0..4}, {5..8}, ..., {17..20}``).
    """
    if segment_frames < 1:
        raise ValueError(f"segment_frames must be >= 1, not {segment_frames}")
    return [0, *range(segment_frames + 1, num_frames, segment_frames)]


def assign_latent_frames(segment_starts: Sequence[int], num_frames: int,
                         latent_spans: Sequence[tuple[int, int]]) -> list[int]:
    """Segment index ``[F]`` of each latent frame: the segment holding most of its pixel frames
    (``latent_spans[j] = (start, end)``, half-open; equal shares go to the earlier segment)."""
    bounds = list(segment_starts) + [num_frames]
    out = []
    for a, b in latent_spans:
        overlap = [max(0, min(b, bounds[s + 1]) - max(a, bounds[s])) for s in range(len(segment_starts))]
        out.append(int(np.argmax(overlap)))
    return out


def segment_masks(segment_starts: Sequence[int], num_frames: int,
                  latent_spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``[S, F]`` float masks: row ``s`` is 1 on the latent frames of segment ``s``."""
    owner = torch.tensor(assign_latent_frames(segment_starts, num_frames, latent_spans))
    return (owner[None, :] == torch.arange(len(segment_starts))[:, None]).float()


# ---------------------------------------------------------------- clips


def load_clip(path: str | Path) -> torch.Tensor:
    """A clip ``[3, T, H, W]`` float in [0, 1] from an ``.npy``/``.npz`` array ``[T, H, W, 3]``, a folder of
    frame images, or a video file."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: a clip folder with no frame images ({', '.join(FRAME_SUFFIXES)})")
        array = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    elif path.suffix.lower() in (".npy", ".npz"):
        loaded = np.load(path, allow_pickle=False)
        array = loaded[loaded.files[0]] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        from diffusers.utils import load_video

        try:
            array = np.stack([np.asarray(f.convert("RGB")) for f in load_video(str(path))])
        except ImportError as e:
            raise ImportError(f"{path}: reading {path.suffix} needs imageio (pip install 'diffalign[video]'), "
                              "or store clips as .npy frame arrays") from e
    elif not path.exists():
        raise FileNotFoundError(f"clip {path} does not exist")
    else:
        raise ValueError(f"{path}: unknown clip format; use .npy/.npz [T, H, W, 3], a folder of frames, or a video")
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"{path}: a clip must be [T, H, W, 3], got {list(array.shape)}")
    clip = torch.from_numpy(np.ascontiguousarray(array))
    clip = clip.float() / 255.0 if clip.dtype == torch.uint8 else clip.float()
    if clip.min() < 0 or clip.max() > 1:
        raise ValueError(f"{path}: float frames must be in [0, 1]")
    return clip.permute(3, 0, 1, 2).contiguous()


def save_clip(path: str | Path, clip: torch.Tensor) -> Path:
    """Write a clip ``[3, T, H, W]`` in [0, 1] as an ``.npy`` uint8 array ``[T, H, W, 3]``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (clip.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    np.save(path, array)
    return path


def clip_num_frames(path: Path) -> int:
    """``T`` of a clip, without decoding ``.npy`` arrays or frame folders."""
    if path.is_dir():
        return sum(1 for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if path.suffix.lower() == ".npy":
        return int(np.load(path, mmap_mode="r").shape[0])
    return int(load_clip(path).shape[1])


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


# ---------------------------------------------------------------- reading


def read_video_pairs(path: str | Path, *, video_root: str | Path | None = None,
                     segment_frames: int | None = None) -> list[VideoPair]:
    """Validated :class:`VideoPair` rows of a segment-labelled JSONL file (see the module docstring).

    ``segment_frames`` is the default segment length for rows that give neither ``segment_frames`` nor
    ``segment_starts``. Any bad row is an error naming the file, line and field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segment-labelled pairs file {path} does not exist")
    root = Path(video_root) if video_root is not None else path.parent
    pairs = []
    for n, obj in iter_jsonl(path):
        src = f"{path}:line {n}"
        prompt = require_text(obj, "prompt", src)
        clips = []
        for fld in ("video_0", "video_1"):
            rel = require_text(obj, fld, src)
            clip = Path(rel) if Path(rel).is_absolute() else root / rel
            if not clip.exists():
                raise FileNotFoundError(f"{src}: field {fld!r}: clip {clip} does not exist")
            clips.append(clip)
        frames = [clip_num_frames(c) for c in clips]
        if frames[0] != frames[1]:
            raise ValueError(f"{src}: video_0 has {frames[0]} frames but video_1 has {frames[1]}")
        raw = obj.get("segment_labels")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{src}: field 'segment_labels' must be a non-empty list of 'win'/'lose'/'tie'")
        labels = [parse_segment_label(v, f"{src}: field 'segment_labels'[{i}]") for i, v in enumerate(raw)]
        starts = _segment_starts(obj, frames[0], segment_frames, src)
        if len(starts) != len(labels):
            raise ValueError(f"{src}: {len(labels)} segment labels for {len(starts)} segments "
                             f"(starts {starts} of {frames[0]} frames)")
        weight = obj.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{src}: field 'weight' is {weight!r}, not a finite number >= 0")
        key = content_key(prompt, _file_key(clips[0]), _file_key(clips[1]))
        pairs.append(VideoPair(prompt, clips[0], clips[1], starts, labels, frames[0], float(weight), src, key))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def _segment_starts(obj: dict, num_frames: int, default: int | None, src: str) -> list[int]:
    if "segment_starts" in obj:
        starts = obj["segment_starts"]
        if (not isinstance(starts, list) or not starts or starts[0] != 0
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in starts)
                or any(b <= a for a, b in pairwise(starts)) or starts[-1] >= num_frames):
            raise ValueError(f"{src}: field 'segment_starts' must be increasing frame indices starting at 0 and "
                             f"below {num_frames}, got {starts!r}")
        return list(starts)
    s = obj.get("segment_frames", default)
    if s is None:
        raise ValueError(f"{src}: no 'segment_frames' or 'segment_starts' (and no default segment length)")
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ValueError(f"{src}: field 'segment_frames' is {s!r}, not a positive integer")
    return uniform_segment_starts(num_frames, s)


def check_latent_coverage(pair: VideoPair, latent_spans: Sequence[tuple[int, int]]) -> None:
    """A labelled (non-tie) segment that owns no latent frame cannot be trained: an error naming the row."""
    owner = set(assign_latent_frames(pair.segment_starts, pair.num_frames, latent_spans))
    empty = [s for s, y in enumerate(pair.labels) if y != TIE and s not in owner]
    if empty:
        raise ValueError(f"{pair.source}: labelled segment(s) {empty} (starts {pair.segment_starts}) hold no latent "
                         f"frame of the model (latent frames cover pixel frames {list(latent_spans)}); align "
                         "segments with the VAE's temporal compression or label them 'tie'")


# ---------------------------------------------------------------- structural pairs


VIDEO_TO_VIDEO_PIPELINES = {"wan": "WanVideoToVideoPipeline"}


@torch.no_grad()
def structural_pair(backbone, clip: torch.Tensor, prompt: str, *, strength: float = 0.6,
                    seeds: tuple[int, int] = (0, 1), num_inference_steps: int = 30, guidance_scale: float = 5.0,
                    negative_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DenseDPO's StructuralDPO pair: two denoisings of corrupted copies of one clip.

    ``clip`` ``[3, T, H, W]`` in [0, 1] is encoded, noised to the scheduler step that
    ``strength`` (η) selects, ``x_n = (1 − σ_n)·x + σ_n·ε_k`` with ``ε_k`` drawn from ``seeds[k]``, and
    denoised from there to the end (``round(η·N)`` of ``N`` steps), once per seed, through the family's
    diffusers video-to-video pipeline (same components, no copy). Both results keep the clip's motion
    and layout and differ in local detail. Returns two clips ``[3, T, H, W]`` in [0, 1].

    ``σ_n`` is the (shifted) scheduler's sigma at that step, which equals η only for an unshifted schedule.
    """
    import diffusers

    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], not {strength}")
    name = VIDEO_TO_VIDEO_PIPELINES.get(backbone.family)
    if name is None:
        raise ValueError(f"no video-to-video pipeline for backbone family {backbone.family!r}")
    _, t, h, w = clip.shape
    backbone.check_num_frames(t)
    backbone.check_frame_size(h, w)
    components = {k: v for k, v in backbone.pipeline.components.items() if k in ("tokenizer", "text_encoder",
                                                                                    "vae", "scheduler", "transformer")}
    pipe = getattr(diffusers, name)(**components)
    pipe.set_progress_bar_config(disable=True)
    frames = clip.permute(1, 0, 2, 3)[None]  # [1, T, 3, H, W]: a batch of one video for the video processor
    out = []
    with backbone.reference():  # the model as loaded (a LoRA being trained is switched off)
        for seed in seeds:
            video = pipe(video=frames, prompt=prompt, negative_prompt=negative_prompt, height=h, width=w,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, strength=strength,
                         generator=torch.Generator().manual_seed(int(seed)), output_type="pt",
                         max_sequence_length=getattr(backbone, "max_sequence_length", 512)).frames
            out.append(video[0].permute(1, 0, 2, 3).float().cpu())  # [T, 3, H, W] -> [3, T, H, W]
    return out[0], out[1]


def make_structural_pairs(backbone, clips_file: str | Path, out_dir: str | Path, *, strength: float = 0.6,
                          seed: int = 0, num_inference_steps: int = 30, guidance_scale: float = 5.0,
                          segment_frames: int | None = None, reward=None, tie_margin: float = 0.0) -> Path:
    """Structural pairs for every ``{"prompt", "video"}`` line of ``clips_file``; writes ``out_dir/clips/*.npy``
    and ``out_dir/pairs.jsonl`` (atomically, at the end) and returns the JSONL path.

    Row ``i`` uses seeds ``(seed + 2i, seed + 2i + 1)``. Rows carry ``segment_starts`` of
    ``segment_frames``-frame segments (:func:`causal_segment_starts` for a causal VAE). Without ``reward``
    they have ``"segment_labels": null`` for annotators to fill in (the reader refuses
    unlabelled rows). With a :class:`~diffalign.rewards.RewardModel`, each segment is labelled by its
    mean per-frame reward (:func:`label_segments_by_reward`).
    """
    clips_file, out_dir = Path(clips_file), Path(out_dir)
    rows = []
    for n, obj in iter_jsonl(clips_file):
        src = f"{clips_file}:line {n}"
        prompt = require_text(obj, "prompt", src)
        rel = require_text(obj, "video", src)
        clip_path = Path(rel) if Path(rel).is_absolute() else clips_file.parent / rel
        clip = load_clip(clip_path)
        a, b = structural_pair(backbone, clip, prompt, strength=strength, seeds=(seed + 2 * len(rows),
                               seed + 2 * len(rows) + 1), num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale)
        stem = f"{len(rows):06d}"
        save_clip(out_dir / "clips" / f"{stem}_0.npy", a)
        save_clip(out_dir / "clips" / f"{stem}_1.npy", b)
        row = {"prompt": prompt, "video_0": f"clips/{stem}_0.npy", "video_1": f"clips/{stem}_1.npy",
               "source_video": str(rel), "strength": strength}
        s = segment_frames or int(obj.get("segment_frames") or 0) or None
        if s is None:
            raise ValueError(f"{src}: give segment_frames (the segment length in frames)")
        starts = (causal_segment_starts if getattr(backbone, "causal_vae", False) else uniform_segment_starts)(
            a.shape[1], s)
        row["segment_starts"] = starts
        row["segment_labels"] = (label_segments_by_reward(reward, a, b, prompt, starts, tie_margin=tie_margin)
                                 if reward is not None else None)
        rows.append(row)
    if not rows:
        raise ValueError(f"{clips_file}: no clips")
    out = out_dir / "pairs.jsonl"
    from diffalign.data.files import atomic_write

    return atomic_write(out, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))


@torch.no_grad()
def label_segments_by_reward(reward, clip_0: torch.Tensor, clip_1: torch.Tensor, prompt: str,
                             segment_starts: Sequence[int], *, tie_margin: float = 0.0) -> list[str]:
    """Per-segment labels from a per-frame image reward: ``"win"`` where ``video_0``'s mean frame reward in
    the segment beats ``video_1``'s by more than ``tie_margin``, ``"lose"`` the other way, else ``"tie"``.
    Clips are ``[3, T, H, W]`` in [0, 1]."""
    t = clip_0.shape[1]
    scores = [reward.score(c.permute(1, 0, 2, 3).contiguous(), [prompt] * t).float().cpu() for c in (clip_0, clip_1)]
    bounds = list(segment_starts) + [t]
    labels = []
    for s in range(len(segment_starts)):
        d = float(scores[0][bounds[s]:bounds[s + 1]].mean() - scores[1][bounds[s]:bounds[s + 1]].mean())
        labels.append("win" if d > tie_margin else "lose" if d < -tie_margin else "tie")
    return labels
