"""Benchmark generation: GenEval folder layout, the seed rule, resuming, refusing other settings, loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.eval.generate import (GENERATION_FILE, SEED_STRIDE, generate, generate_folder, image_seed,
                                     load_eval_pipeline, metadata_line, sample_path)
from diffalign.eval.prompts import PromptItem

ITEMS = [
    PromptItem("a photo of a cat", "single_object",
               {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}),
    PromptItem("a red hat and a blue tie", "Artifacts", {"Challenge": "Basic", "Note": ""}),
    PromptItem("the yellow dog", "Animals", {"Challenge": "Simple Detail", "Note": ""}),
]
KW = dict(num_inference_steps=2, guidance_scale=3.0, progress=None)


class CountingPipe:
    """Wraps a pipeline and records the prompts of each call."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, prompts, **kw):
        self.calls.append(list(prompts))
        return self.pipe(prompts, **kw)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return load_eval_pipeline(str(tiny_sd), device="cpu")


def test_seed_rule():
    assert image_seed(0, 0, 0) == 0
    assert image_seed(42, 3, 2) == 42 + 3 * SEED_STRIDE + 2
    with pytest.raises(ValueError, match="sample_index"):
        image_seed(0, 0, SEED_STRIDE)


def test_layout_metadata_and_record(pipe, tmp_path):
    res = generate_folder(pipe, ITEMS, tmp_path, images_per_prompt=2, batch_size=4, seed=7, **KW)
    assert (res.generated, res.skipped, res.total) == (6, 0, 6)
    for i, item in enumerate(ITEMS):
        # read the way GenEval's evaluate_images.py reads a folder
        folder = tmp_path / f"{i:05d}"
        with open(folder / "metadata.jsonl") as fp:
            meta = json.load(fp)
        assert meta == metadata_line(item) and meta["prompt"] == item.text
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert Image.open(folder / "samples" / "0000.png").size == (32, 32)
    assert json.loads((tmp_path / "00000" / "metadata.jsonl").read_text()) == ITEMS[0].metadata  # GenEval's own line
    assert json.loads((tmp_path / "00001" / "metadata.jsonl").read_text())["category"] == "Artifacts"
    record = json.loads((tmp_path / GENERATION_FILE).read_text())
    s = record["settings"]
    assert s["scheduler"] == "DDIMScheduler" and s["pipeline"] == "StableDiffusionPipeline"
    assert (s["num_inference_steps"], s["guidance_scale"], s["height"], s["width"]) == (2, 3.0, 32, 32)
    assert s["base_seed"] == 7 and "10000 * prompt_index + sample_index" in s["seed_rule"]
    assert set(record["versions"]) >= {"torch", "diffusers", "transformers", "diffalign"}
    assert record["complete"] and record["n_images"] == 6


def test_images_follow_the_seed_rule(pipe, tmp_path):
    generate_folder(pipe, ITEMS, tmp_path, indices=[2], images_per_prompt=2, batch_size=1, seed=5, **KW)
    assert not (tmp_path / "00000").exists() and not (tmp_path / "00001").exists()
    alone = generate(pipe, [ITEMS[2].text], [image_seed(5, 2, 1)], num_inference_steps=2, guidance_scale=3.0)[0]
    assert np.array_equal(np.asarray(Image.open(sample_path(tmp_path, 2, 1))), np.asarray(alone))


def test_resume_generates_only_missing_images_bit_identically(pipe, tmp_path):
    generate_folder(pipe, ITEMS, tmp_path, images_per_prompt=2, batch_size=4, **KW)
    before = {(i, j): sample_path(tmp_path, i, j).read_bytes() for i in range(3) for j in range(2)}

    counting = CountingPipe(pipe)
    again = generate_folder(counting, ITEMS, tmp_path, images_per_prompt=2, batch_size=4, **KW)
    assert (again.generated, again.skipped) == (0, 6) and counting.calls == []

    sample_path(tmp_path, 2, 0).unlink()  # second batch: (2, 0), (2, 1)
    redo = generate_folder(counting, ITEMS, tmp_path, images_per_prompt=2, batch_size=4, **KW)
    assert (redo.generated, redo.skipped) == (1, 5)
    assert counting.calls == [[ITEMS[2].text, ITEMS[2].text]]  # only the batch that held the missing image
    after = {(i, j): sample_path(tmp_path, i, j).read_bytes() for i in range(3) for j in range(2)}
    assert after == before  # the regenerated file is byte for byte the one deleted

    sample_path(tmp_path, 0, 1).unlink()  # first batch: four images, one missing, one written
    redo = generate_folder(counting, ITEMS, tmp_path, images_per_prompt=2, batch_size=4, **KW)
    assert redo.generated == 1 and len(counting.calls[-1]) == 4
    assert sample_path(tmp_path, 0, 1).read_bytes() == before[(0, 1)]
    assert not list(tmp_path.rglob("*.tmp"))


def test_resume_refuses_other_settings_and_prompts(pipe, tmp_path):
    generate_folder(pipe, ITEMS[:1], tmp_path, images_per_prompt=1, **KW)
    with pytest.raises(ValueError, match="num_inference_steps: 2 there, 3 now"):
        generate_folder(pipe, ITEMS[:1], tmp_path, images_per_prompt=1, num_inference_steps=3, progress=None,
                        guidance_scale=3.0)
    with pytest.raises(ValueError, match="00000/metadata.jsonl: holds a different prompt"):
        generate_folder(pipe, ITEMS[1:2], tmp_path, images_per_prompt=1, **KW)


def test_lora_and_finetuned_loading(tiny_sd, tiny_sd_lora, tmp_path):
    base = load_eval_pipeline(str(tiny_sd), device="cpu")
    lora = load_eval_pipeline(str(tiny_sd), lora=str(tiny_sd_lora), device="cpu")
    args = (["a photo of a cat"], [3])
    a, b = (np.asarray(generate(p, *args, num_inference_steps=2)[0], dtype=int) for p in (base, lora))
    assert np.abs(a - b).max() > 0
    other = load_eval_pipeline(str(tiny_sd), scheduler="EulerDiscreteScheduler", device="cpu")
    assert type(other.scheduler).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ValueError, match="unknown diffusers scheduler"):
        load_eval_pipeline(str(tiny_sd), scheduler="NoSuchScheduler", device="cpu")
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        load_eval_pipeline(str(tiny_sd), finetuned=str(tmp_path), device="cpu")
    # a full fine-tune's folder: unet/ with other weights
    changed = load_eval_pipeline(str(tiny_sd), device="cpu")
    with torch.no_grad():
        changed.unet.conv_out.weight.mul_(3.0)
    changed.unet.save_pretrained(tmp_path / "ft" / "unet")
    c = np.asarray(generate(changed, *args, num_inference_steps=2)[0], dtype=int)
    ft = load_eval_pipeline(str(tiny_sd), finetuned=str(tmp_path / "ft"), device="cpu")
    f = np.asarray(generate(ft, *args, num_inference_steps=2)[0], dtype=int)
    assert np.array_equal(f, c) and np.abs(f - a).max() > 0
