import math

import pytest
import torch
from structured_helpers import (
    beta_scaled_tolerance,
    group_batch,
    move_lora,
    tiny_backbone,
)

from diffalign.core.likelihood import denoising_error
from diffalign.trainers import build_method


@pytest.fixture(scope="module")
def vpred(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("dcpo") / "sd-v", prediction_type="v_prediction")


@pytest.fixture(scope="module")
def dcpo_parquet(tmp_path_factory):
    """Pick-a-Pic rows with a loser caption (caption_1); half of them with label_0 = 0."""
    import io

    from PIL import Image

    from diffalign.data.pickapic import write_pickapic_parquet

    def png(c):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), c).save(buf, format="PNG")
        return buf.getvalue()

    rows = [{"caption": f"a red hat {i}", "caption_1": f"a blue cat {i}", "jpg_0": png((200, 20 * i, 0)),
             "jpg_1": png((0, 20 * i, 200)), "label_0": float(i % 2)} for i in range(4)]
    path = tmp_path_factory.mktemp("dcpo-data") / "pairs.parquet"
    write_pickapic_parquet(rows, path)
    return path


def test_target_is_v_on_a_v_prediction_model_and_loser_captions_condition_the_losers(vpred, dcpo_parquet, tmp_path):
    from diffalign.trainers.data import load_training_data
    from diffalign.trainers.registry import recipe_from_dict

    recipe = recipe_from_dict({"data": {"source": str(dcpo_parquet), "resolution": 32},
                               "train": {"batch_size": 2, "output_dir": str(tmp_path)}})
    batch = load_training_data(recipe, "pairs", vpred, tmp_path).batch(0, 0, 0, 1)
    a = vpred.forward_process.alphas_cumprod[batch.timesteps].float().reshape(-1, 1, 1, 1)
    v = a.sqrt() * batch.noise - (1 - a).sqrt() * batch.latents  # by hand
    torch.testing.assert_close(batch.target, v)
    assert float((batch.target - batch.noise).abs().max()) > 1e-3  # not epsilon
    b = 2
    for w, l in zip(batch.prompts[:b], batch.prompts[b:]):
        i = w.split()[-1]
        # caption_1 belongs to image 1: the winner carries it exactly when label_0 = 0 (odd i: label 1)
        assert (w, l) == ((f"a red hat {i}", f"a blue cat {i}") if int(i) % 2 else (f"a blue cat {i}", f"a red hat {i}"))

    method = build_method({"name": "dcpo"}, vpred)
    out = method.loss(batch)
    assert float(out.loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(out.metrics["distinct_captions"]) == 1.0
    move_lora(vpred, 0.05)
    try:
        out = method.loss(batch)
        with torch.no_grad():
            lp = denoising_error(vpred.predict(batch.x_t, batch.timesteps, batch.cond), v)
            with vpred.reference():
                lr = denoising_error(vpred.predict(batch.x_t, batch.timesteps, batch.cond), v)
        z = -0.5 * 500.0 * ((lp[:b] - lp[b:]) - (lr[:b] - lr[b:])).double()
        assert float(out.loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(z).mean()),
                                                abs=beta_scaled_tolerance(500.0, lp, lr))
        # the loser's own caption matters: with the winner's caption everywhere the loss changes
        same = group_batch(vpred, [batch.prompts[:b], batch.prompts[:b]])
        same.latents, same.x_t, same.target, same.noise, same.timesteps = (batch.latents, batch.x_t, batch.target,
                                                                           batch.noise, batch.timesteps)
        assert abs(float(method.loss(same).loss) - float(out.loss)) > 1e-5
    finally:
        move_lora(vpred, 0.0)
