"""Reward models behind one interface, by name from a registry with a card per model.

    from diffalign.rewards import load_reward
    reward = load_reward("pickscore")                 # or "hpsv2.1", "laion-aesthetic", a folder, ...
    scores = reward.score(images, prompts)            # tensor [B]
    reward.mode = "differentiable"                    # gradients flow to tensor images
    reward = load_reward("remote:http://127.0.0.1:8123")  # served by `diffalign reward serve NAME`

See :mod:`diffalign.rewards.base` for the interface, :mod:`~diffalign.rewards.registry` for names,
``reward_models/<name>.yaml`` for each model's card (weights, preprocessing, score scale, license).
"""

from diffalign.rewards.base import RewardCard, RewardModel
from diffalign.rewards.combine import (
           WeightedReward,
           WinRateReward,
           weighted_sum,
           win_rates,
)
from diffalign.rewards.loading import MissingWeightsError
from diffalign.rewards.registry import (
           get_card,
           is_reward,
           list_rewards,
           load_reward,
           register_reward,
)

__all__ = ["RewardCard", "RewardModel", "MissingWeightsError", "WeightedReward", "WinRateReward", "get_card",
           "is_reward", "list_rewards", "load_reward", "register_reward", "weighted_sum", "win_rates"]
