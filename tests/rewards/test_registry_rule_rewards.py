"""Registry and cards, JPEG rewards, combination (weighted sum, Pref-GRPO win rates)."""

import io

import pytest
import torch
from PIL import Image

from diffalign.rewards import RewardModel, WeightedReward, WinRateReward, get_card, list_rewards, load_reward, \
    register_reward, weighted_sum, win_rates
from diffalign.rewards.combine import win_rates_pairwise
from tests.rewards.conftest import pil_to_tensor, smooth_images


def test_every_registered_concrete_reward_has_a_card():
    generic = {"hpsv2", "clipscore"}  # need a version / variant, resolve to a named card
    for name in set(list_rewards()) - generic:
        card = get_card(name)
        assert card is not None and card.name == name and card.score and card.license, name


def test_unknown_reward_lists_the_registered_ones():
    with pytest.raises(KeyError, match="pickscore"):
        load_reward("no-such-reward")


def test_register_reward_rejects_duplicates():
    @register_reward("test-constant")
    def make(**kw):
        class Const(RewardModel):
            name = "test-constant"

            def _score(self, images, prompts):
                return torch.ones(len(prompts))
        return Const(**kw)

    assert "test-constant" in list_rewards()
    assert torch.equal(load_reward("test-constant").score(torch.rand(3, 3, 8, 8), ["a"] * 3), torch.ones(3))
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test-constant")(lambda **kw: None)


def test_jpeg_rewards_are_signed_kilobytes():
    images = smooth_images(2, (64, 64))
    sizes = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    inc, comp = load_reward("jpeg-incompressibility"), load_reward("jpeg-compressibility")
    assert torch.allclose(inc.score(images, ["", ""]), torch.tensor(sizes))
    assert torch.allclose(comp.score(pil_to_tensor(images), ["", ""]), -torch.tensor(sizes))  # tensor input
    noisy = Image.effect_noise((64, 64), 80).convert("RGB")
    assert inc.score([noisy], [""])[0] > inc.score(images[:1], [""])[0]
    with pytest.raises(ValueError, match="differentiable"):
        comp.mode = "differentiable"


def test_weighted_sum_by_hand():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 10.0, 40.0])
    za = (a - a.mean()) / a.std()
    zb = (b - b.mean()) / b.std()
    assert torch.allclose(weighted_sum({"a": a, "b": b}, {"a": 2.0, "b": 0.5}), 2 * za + 0.5 * zb, atol=1e-6)
    fixed = weighted_sum({"a": a}, normalize="fixed", stats={"a": (1.0, 2.0)})
    assert torch.allclose(fixed, (a - 1) / 2)
    with pytest.raises(ValueError, match="no fixed"):
        weighted_sum({"a": a}, normalize="fixed")


def test_weighted_reward_combines_models():
    images = smooth_images(4, (48, 48))
    inc, comp = load_reward("jpeg-incompressibility"), load_reward("jpeg-compressibility")
    both = WeightedReward([inc, comp], {"jpeg-incompressibility": 1.0, "jpeg-compressibility": 1.0})
    assert torch.allclose(both.score(images, [""] * 4), torch.zeros(4), atol=1e-5)  # z(s) + z(-s) = 0
    with pytest.raises(ValueError, match="card normalization"):
        WeightedReward([inc], normalize="card")


def test_win_rates_by_hand():
    s = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 5.0, 5.0, 5.0])
    # group 1: 3 beats all -> 1; 1 beats none -> 0; the two 2s beat 1, tie each other -> (1 + .5) / 3
    expected = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 2 / 3, 2 / 3, 2 / 3])
    assert torch.allclose(win_rates(s, 4), expected)
    soft = win_rates(s, 4, temperature=1.0)
    assert torch.allclose(soft[:4].sum(), torch.tensor(2.0))  # pairwise probabilities sum to G(G-1)/2 / (G-1)
    with pytest.raises(ValueError):
        win_rates(s, 3)


def test_win_rate_reward_and_pairwise_preferences():
    images = smooth_images(4, (48, 48))
    inc = load_reward("jpeg-incompressibility")
    sizes = inc.score(images, [""] * 4)
    wr = WinRateReward(inc, group_size=2).score(images, ["p", "p", "q", "q"])
    assert torch.allclose(wr, win_rates(sizes, 2))

    def prefer(a, b, prompts):  # a pairwise preference model: bigger JPEG wins
        return (inc.score(a, prompts) > inc.score(b, prompts)).float()

    assert torch.allclose(win_rates_pairwise(images, ["p"] * 4, 4, prefer), win_rates(sizes, 4))


def test_cards_are_package_data():
    """``diffalign/rewards/cards`` (what a wheel installs) holds every card of ``reward_models/``."""
    import tomllib
    from pathlib import Path

    import diffalign.rewards

    root = Path(__file__).resolve().parents[2]
    cards = Path(diffalign.rewards.__file__).parent / "cards"
    expected = {p.name for p in (root / "reward_models").glob("*.yaml")}
    assert expected and {p.name for p in cards.glob("*.yaml")} == expected
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "rewards/cards/*.yaml" in package_data["diffalign"]
