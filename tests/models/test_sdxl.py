"""SDXL micro-conditioning comes from each image's true size and crop."""

import pytest
import torch

from diffalign.models import load_backbone


@pytest.fixture
def sdxl(tiny_folder):
    return load_backbone(tiny_folder("sdxl"))


def test_time_ids_from_true_sizes(sdxl):
    sizes = torch.tensor([[512, 768], [1024, 683]])
    crops = torch.tensor([[0, 128], [37, 0]])
    ids = sdxl.time_ids(sizes, crops, (32, 32))
    assert ids.shape == (2, 6)
    proj = sdxl.pipeline.text_encoder_2.config.projection_dim
    for row, size, crop in zip(ids, sizes.tolist(), crops.tolist()):
        expected = sdxl.pipeline._get_add_time_ids(tuple(size), tuple(crop), (32, 32), torch.float32, proj)
        torch.testing.assert_close(row[None], expected)
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        sdxl.time_ids(sizes, crops[:1], (32, 32))


def test_with_time_ids_attaches_a_copy(sdxl):
    cond = sdxl.encode_prompt(["a cat", "a dog"])
    with_ids = sdxl.with_time_ids(cond, torch.tensor([[64, 48], [32, 32]]), torch.tensor([[8, 0], [0, 0]]), (32, 32))
    assert cond.time_ids is None
    assert with_ids.time_ids.tolist() == [[64, 48, 8, 0, 32, 32], [32, 32, 0, 0, 32, 32]]
    assert with_ids.prompt_embeds is cond.prompt_embeds


def test_predict_uses_the_micro_conditioning(sdxl, inputs):
    x_t, t, cond = inputs(sdxl)
    with torch.no_grad():
        default = sdxl.predict(x_t, t, cond)
        assert cond.time_ids is None                       # predict does not write into the conditioning
        same = sdxl.predict(x_t, t, sdxl.with_time_ids(cond, torch.tensor([[32, 32]] * 2), torch.zeros(2, 2), (32, 32)))
        cropped = sdxl.predict(x_t, t, sdxl.with_time_ids(cond, torch.tensor([[300, 200]] * 2),
                                                          torch.tensor([[40, 10]] * 2), (32, 32)))
        ids = sdxl.pipeline._get_add_time_ids((300, 200), (40, 10), (32, 32), torch.float32,
                                              sdxl.pipeline.text_encoder_2.config.projection_dim).repeat(2, 1)
        direct = sdxl.pipeline.unet(x_t, t, encoder_hidden_states=cond.prompt_embeds,
                                    added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": ids}).sample
    torch.testing.assert_close(same, default)
    torch.testing.assert_close(cropped, direct)
    assert not torch.allclose(cropped, default, atol=1e-5)
