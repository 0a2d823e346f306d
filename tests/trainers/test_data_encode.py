"""`diffalign data encode` fills the latent cache with every batch training can draw; a run on the encoded
set then loads no text encoder, drops the VAE encoder, and never encodes."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from diffalign.data.pickapic import write_pickapic_parquet


def _png(size, seed) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_encode_then_train_calls_no_encoder(tiny_models, tmp_path, capsys, monkeypatch):
    from diffalign.cli import main
    from diffalign.models.backbone import Backbone

    rows = [{"caption": f"shape {i}", "jpg_0": _png((48, 32), i), "jpg_1": b"broken" if i == 3 else _png((32, 40), 9 + i),
             "label_0": 0.5 if i == 5 else 1.0} for i in range(8)]
    data = write_pickapic_parquet(rows, tmp_path / "pairs.parquet")
    common = [f"--model.pretrained={tiny_models['sd']}", f"--data.source={data}", "--data.resolution=32",
              "--data.random_flip=true", "--data.caption_dropout=0.5", f"--data.cache_dir={tmp_path / 'cache'}",
              f"--train.output_dir={tmp_path / 'run'}"]
    assert main(["data", "encode", "-", *common]) == 0
    out = capsys.readouterr().out
    # 6 usable pairs × 2 images × 2 flips; 6 captions and ""; the tie and the broken row counted
    assert "encoded 8 rows into" in out and "24 images and 7 prompts encoded now, 0 already cached" in out
    assert "1 ties dropped, 1 bad rows skipped (1 undecodable image)" in out
    manifest = json.loads(next((tmp_path / "cache").glob("*/encoded-*.json")).read_text())
    assert manifest["complete"] and (manifest["rows"], manifest["kept"], manifest["bad_images"]) == (8, 6, 1)

    assert main(["data", "encode", "-", *common]) == 0  # a rerun (or a resumed one) encodes nothing again
    assert "0 images and 0 prompts encoded now, 31 already cached" in capsys.readouterr().out

    def refuse(self, *args, **kwargs):
        raise AssertionError("an encoder was called")

    monkeypatch.setattr(Backbone, "encode_images", refuse)
    monkeypatch.setattr(Backbone, "encode_prompt", refuse)
    for cls in Backbone.__subclasses__():
        monkeypatch.setattr(cls, "encode_images", refuse, raising=False)
        monkeypatch.setattr(cls, "encode_prompt", refuse, raising=False)
    assert main(["train", "-", *common, "--train.max_steps=6", "--train.batch_size=2", "--model.lora_rank=4",
                 "--train.checkpointing_steps=0"]) == 0
    out = capsys.readouterr().out
    assert f"data: {data} is encoded (8 rows, by diffalign data encode): no text encoder loaded, VAE encoder dropped" \
        in out
    assert (tmp_path / "run" / "final").is_dir()


def test_encode_refuses_random_crops_and_a_disabled_cache(tiny_models, tmp_path, capsys):
    from diffalign.cli import main

    data = write_pickapic_parquet([{"caption": "a", "jpg_0": _png((32, 32), 0), "jpg_1": _png((32, 32), 1),
                                    "label_0": 1.0}], tmp_path / "pairs.parquet")
    base = ["data", "encode", "-", f"--model.pretrained={tiny_models['sd']}", f"--data.source={data}",
            f"--train.output_dir={tmp_path / 'run'}"]
    assert main([*base, "--data.center_crop=false"]) == 2
    assert "random crops (data.center_crop: false) are drawn per step" in capsys.readouterr().err
    assert main([*base, "--data.cache_dir="]) == 2
    assert "the cache is off" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("what", ["--help"])
def test_data_help_lists_encode(capsys, what):
    from diffalign.cli import main

    with pytest.raises(SystemExit):
        main(["data", what])
    assert "encode" in capsys.readouterr().out
