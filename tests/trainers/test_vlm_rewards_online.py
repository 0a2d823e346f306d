"""Pref-GRPO with the UnifiedReward pairwise judge as its reward (tiny scripted Qwen2.5-VL judge)."""

import json

from run_helpers import PROMPTS, read_metrics

from diffalign.cli import main
from tests.rewards.qwen_vl_helpers import save_unified_reward


def test_pref_grpo_trains_on_unified_reward_win_rates(tiny_models, tmp_path):
    """The judge's win rates are the reward (``win_rate`` off: the reward already is one). A judge that
    always answers "Image 1 is better" names a position, not an image: asked both orders, every image
    wins half its comparisons, so each rollout reward is exactly 1/2."""
    judge = save_unified_reward(tmp_path / "judge", script="Image 1 is better.")
    options = {"unifiedreward-pairwise": {"weights": str(judge), "group_size": 3, "max_new_tokens": 8}}
    out = tmp_path / "run"
    args = ["train", "-", f"--model.pretrained={tiny_models['sd']}", "--model.lora_rank=4", "--method.name=pref-grpo",
            f"--method.prompts={json.dumps(PROMPTS)}", "--method.num_steps=3", "--method.guidance_scale=3.0",
            "--method.resolution=32", f"--train.output_dir={out}", "--train.learning_rate=1e-2",
            "--method.reward=unifiedreward-pairwise", f"--method.reward_options={json.dumps(options)}",
            "--method.win_rate=false", "--method.prompts_per_epoch=2", "--method.images_per_prompt=3",
            "--train.batch_size=3", "--train.max_steps=1"]
    assert main(args) == 0
    row = read_metrics(out)[0]
    assert row["reward_mean"] == 0.5 and row["reward_std"] == 0.0
