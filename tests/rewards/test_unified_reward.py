"""UnifiedReward on tiny Qwen2.5-VL judges saved as transformers checkpoints: a random one, and "scripted"
ones whose greedy answer is fixed (tests.rewards.qwen_vl_helpers.script_answer)."""

import csv
import re

import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.rewards import load_reward
from diffalign.rewards.unified_reward import parse_preference, parse_score
from tests.rewards.conftest import smooth_images
from tests.rewards.qwen_vl_helpers import save_unified_reward

PROMPTS = ["a red circle", "two blue squares", "a cat"]


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    root = tmp_path_factory.mktemp("unified_reward")
    return {name: save_unified_reward(root / name, script=script) for name, script in
            [("random", None), ("score4", "Final Score: 4"), ("first", "Image 1 is better."),
             ("second", "Image 2 is better.")]}


def reference_answers(folder, conversations, max_new_tokens):
    """The Qwen inference script written out: one conversation at a time, chat template, processor,
    greedy generate, the new tokens decoded without special tokens."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    answers = []
    for conv, images in conversations:
        text = processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=images, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)[0])
    return answers


def point_conversations(images, prompts):
    from diffalign.rewards.unified_reward import POINT_PROMPTS

    # qwen_vl_utils sizing of a 52x40 (w x h) image with the default pixel limits: 84 x 56, by hand
    return [([{"role": "user", "content": [{"type": "image", "image": im},
                                           {"type": "text", "text": POINT_PROMPTS["qwen"].format(prompt=p)}]}],
             [im.resize((84, 56), Image.BICUBIC)]) for im, p in zip(images, prompts)]


@pytest.mark.parametrize("judge, expected", [("score4", [0.8] * 3), ("random", [0.0] * 3)])
def test_pointwise_score_is_the_parsed_greedy_answer(judges, judge, expected):
    images = smooth_images(3, (40, 52))
    reward = load_reward("unifiedreward", weights=str(judges[judge]), max_new_tokens=24, batch_size=3)
    assert reward.card is not None and reward.card.name == "unifiedreward" and not reward.differentiable
    scores = reward.score(images, PROMPTS)
    answers = reference_answers(judges[judge], point_conversations(images, PROMPTS), 24)
    assert reward.last_answers == answers
    parsed = [re.search(r"Final Score:\s*([1-5](?:\.\d+)?)", a) for a in answers]
    assert scores.tolist() == pytest.approx([float(m.group(1)) / 5 if m else 0.0 for m in parsed])
    assert scores.tolist() == pytest.approx(expected)
    assert (reward.judged, reward.parse_failures) == (3, 0 if judge == "score4" else 3)


def test_pairwise_verdict_refers_to_positions_so_swapping_flips_the_winner(judges):
    a, b = smooth_images(2, (40, 52), seed=1), smooth_images(2, (40, 52), seed=2)
    second = load_reward("unifiedreward-pairwise", weights=str(judges["second"]), max_new_tokens=24)
    first = load_reward("unifiedreward-pairwise", weights=str(judges["first"]), max_new_tokens=24)
    # "Image 2 is better": b wins when second, a wins once the two are swapped
    assert second.prefer(a, b, PROMPTS[:2]).tolist() == [0.0, 0.0]
    assert second.prefer(b, a, PROMPTS[:2]).tolist() == [0.0, 0.0]
    assert second.last_answers == ["Image 2 is better."] * 2
    assert first.prefer(a, b, PROMPTS[:2]).tolist() == [1.0, 1.0]
    # the reference's own pairwise turn (Image 1, Image 2, the prompt; Qwen sizing 84x56) gives the same answer
    from diffalign.rewards.unified_reward import PAIR_PROMPT

    conv = [([{"role": "user", "content": [{"type": "image", "image": x}, {"type": "image", "image": y},
                                           {"type": "text", "text": PAIR_PROMPT.format(prompt=p)}]}],
             [x.resize((84, 56), Image.BICUBIC), y.resize((84, 56), Image.BICUBIC)])
            for x, y, p in zip(a, b, PROMPTS)]
    assert reference_answers(judges["second"], conv, 24) == ["Image 2 is better."] * 2
    # a judge that only ever names one position has no preference once both orders are asked: win rates 1/2
    group = [a[0], b[0], a[1], b[1]]
    torch.testing.assert_close(second.score(group, ["p", "p", "q", "q"]), torch.full((4,), 0.5))


def test_parsing_rules():
    assert parse_score("The image ... Final Score: 3.5") == 3.5
    assert parse_score("Final Score:4") == 4.0
    assert parse_score("Final Score: 7") is None and parse_score("score 4") is None and parse_score("") is None
    assert parse_preference("Image 2 is better than Image 1.") == 0.0
    assert parse_preference("Overall, image 1 is better.") == 1.0
    assert parse_preference("Both images are equally good.") == 0.5
    # UnifiedReward-Think: the <answer> tag decides, not the reasoning before it
    assert parse_preference("<think>Image 1 is better lit, but</think><answer>Image 2 is better</answer>") == 0.0
    assert parse_preference("I cannot tell.") is None
    # a Think answer cut off before its <answer> tag has no verdict, whatever the reasoning says
    assert parse_preference("<think>Image 1 is better lit", answer_tag=True) is None
    assert parse_preference("<think>...</think><answer>Image 1 is better</answer>", answer_tag=True) == 1.0


def test_think_prompt_reads_the_answer_tag_only(judges):
    from diffalign.rewards.unified_reward import THINK_PAIR_PROMPT

    think = load_reward("unifiedreward-pairwise", weights=str(judges["second"]), pair_prompt="think",
                        max_new_tokens=24)
    assert think.pair_conversation("a cat")[0]["content"][2]["text"] == THINK_PAIR_PROMPT.format(prompt="a cat")
    a, b = smooth_images(1, (40, 52), seed=1), smooth_images(1, (40, 52), seed=2)
    # the scripted judge answers "Image 2 is better." with no <answer> tag: no verdict, 1/2 (Pref-GRPO's rule)
    assert think.prefer(a, b, ["a cat"]).tolist() == [0.5] and think.parse_failures == 1


def test_cli_scores_and_clear_errors(judges, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(smooth_images(4, (40, 52))):
        im.save(folder / f"img_{i}.png")
    (tmp_path / "prompts.txt").write_text("a red circle\na red circle\na cat\na cat\n")
    out = tmp_path / "scores.csv"
    assert main(["score", "--reward", "unifiedreward,unifiedreward-pairwise", "--images", str(folder),
                 "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), "--batch-size", "2",
                 "--reward-weights", f"unifiedreward={judges['score4']}",
                 "--reward-weights", f"unifiedreward-pairwise={judges['first']}"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [float(r["unifiedreward"]) for r in rows] == pytest.approx([0.8] * 4)
    assert [float(r["unifiedreward-pairwise"]) for r in rows] == pytest.approx([0.5] * 4)

    pair = load_reward("unifiedreward-pairwise", weights=str(judges["first"]), group_size=2)
    with pytest.raises(ValueError, match="groups of 2"):
        pair.score(smooth_images(3, (40, 52)), ["a"] * 3)
    with pytest.raises(ValueError, match="share a prompt"):
        pair.score(smooth_images(2, (40, 52)), ["a", "b"])
    from diffalign.models.backbone import PickledWeightsError

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in judges["random"].iterdir():
        if f.name != "model.safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(str(judges["random"] / "model.safetensors")), pickled / "pytorch_model.bin")
    with pytest.raises(PickledWeightsError, match="--allow-pickle"):
        load_reward("unifiedreward", weights=str(pickled))
