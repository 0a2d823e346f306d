"""The rewriter on the Shapes world: guidance, pair building, the eval option, SFT + DPO end to end."""

import json
import os

import pytest
import torch

from diffalign.text.guidance import backbone_for_pipeline, sample_original_centered


@pytest.fixture(scope="module")
def pipe():
    from diffalign.shapes.demo import load_base_pipeline

    return load_base_pipeline()


def test_original_centered_guidance_reduces_to_cfg(pipe):
    from diffalign.core.sampling import make_sampler, sample_trajectory

    bb = backbone_for_pipeline(pipe)
    orig, rew = ["a photo of a red circle"], ["a photo of two squares"]
    kw = dict(num_inference_steps=4, height=64, width=64)
    sampler = make_sampler(bb, 4, eta=0.0)

    def cfg_images(prompts, w):
        traj = sample_trajectory(bb, sampler, bb.encode_prompt(prompts), guidance_scale=w,
                                 generator=[torch.Generator().manual_seed(7)], height=64, width=64)
        return bb.decode_latents(traj.final)

    only_orig = sample_original_centered(bb, orig, rew, [7], w_original=5.0, w_rewrite=0.0, **kw)
    only_rew = sample_original_centered(bb, orig, rew, [7], w_original=0.0, w_rewrite=5.0, **kw)
    torch.testing.assert_close(only_orig, cfg_images(orig, 5.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(only_rew, cfg_images(rew, 5.0), atol=1e-4, rtol=0)
    mixed = sample_original_centered(bb, orig, rew, [7], w_original=2.5, w_rewrite=2.5, **kw)
    assert (mixed - only_orig).abs().max() > 1e-3 and (mixed - only_rew).abs().max() > 1e-3


def test_build_pairs_scores_candidates_against_the_original(pipe):
    from diffalign.rewards import load_reward
    from diffalign.shapes.evaluate import evaluate
    from diffalign.text.guidance import render_rewrites
    from diffalign.text.pairs import PairConfig, build_pairs
    from diffalign.text.rewriter import PromptRewriter
    from diffalign.text.shapes import _TokOnly, shapes_tokenizer

    fmt = PromptRewriter(_TokOnly(shapes_tokenizer()), system=None, instruction="{prompt}")
    cfg = PairConfig(images_per_candidate=2, num_inference_steps=10, semantic_alpha=1.0, seed=3)
    x = "a photo of a red circle"
    cands = [x, "a photo of a blue square", "a photo of three triangles"]
    rows, summary = build_pairs(fmt, pipe, [x], cfg, rewards={"shapes-eval": load_reward("shapes-eval")},
                                candidates=[cands],
                                embed=lambda t: torch.tensor([[1.0, 0.0] if "red circle" in s else [0.0, 1.0] for s in t]))
    # by hand: each candidate's images (seeds 3, 4 for prompt 0), ShapesEval against the ORIGINAL caption
    expect = []
    for c in cands:
        ims = render_rewrites(pipe, [x, x], [c, c], [3, 4], num_inference_steps=10, guidance_scale=5.0)
        expect.append(sum(evaluate(im, x).fraction for im in ims) / 2)
    assert summary["candidates"] == 3 and summary["mean_original_score"] == pytest.approx(expect[0], abs=1e-6)
    assert len(rows) == (1 if max(expect) > min(expect) else 0)
    for row in rows:
        a, b = cands.index(row["chosen_text"]), cands.index(row["rejected_text"])
        assert (row["chosen_score"], row["rejected_score"]) == pytest.approx((max(expect), min(expect)), abs=1e-6)
        assert expect[a] == max(expect) and expect[b] == min(expect)
        assert row["prompt"] == [{"role": "user", "content": x}] and row["original"] == x
        # Sem-DPO weight exp(-(1 - cos)) of the toy embedding: 1 for the original, e^-1 for the others
        assert row["weight"] == pytest.approx(1.0 if a == 0 else float(torch.exp(torch.tensor(-1.0))), rel=1e-6)


def test_eval_with_rewriter_scores_rewritten_images_against_original_prompts(tmp_path):
    """`diffalign eval --rewriter`: rewritten images, original-prompt metadata, compared with the originals."""
    from diffalign.cli import main
    from diffalign.text.rewriter import PromptRewriter
    from diffalign.text.shapes import _TokOnly, make_tiny_lm, shapes_tokenizer

    tok = shapes_tokenizer()
    make_tiny_lm(tok).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    PromptRewriter(_TokOnly(tok), system=None, instruction="{prompt}").save_format(tmp_path / "lm")
    out = tmp_path / "eval"
    rc = main(["eval", "--model", "bundled:shapes-sd-base", "--prompts", "shapes", "--limit", "1",
               "--images-per-prompt", "1", "--steps", "4", "--rewards", "shapes-eval", "--detector", "none",
               "--device", "cpu", "--rewriter", str(tmp_path / "lm"), "--output-dir", str(out)])
    assert rc == 0
    rewrites = [json.loads(x) for x in (out / "model-rewritten" / "rewrites.jsonl").read_text().splitlines()]
    assert rewrites and all(r["rewrite"] and r["prompt"] for r in rewrites)
    meta = json.loads((out / "model-rewritten" / f"{rewrites[0]['index']:05d}" / "metadata.jsonl").read_text())
    assert meta["prompt"] == rewrites[0]["prompt"]  # scored against the original prompt
    results = json.loads((out / "results.json").read_text())
    assert "rewriter" in json.dumps(results) and (out / "compare").is_dir()


@pytest.mark.slow
def test_shapes_rewriter_dpo_prefers_better_rewrites_on_heldout_pairs(tmp_path):
    """SFT then DPO from ShapesEval rewards: on its training pairs DPO raises log π(chosen) − log π(rejected)
    above the SFT model's, and the whole pipeline (held-out pairs, held-out images of the three rewriters)
    runs and reports.

    The held-out pair margin (DPO above SFT on pairs built the same way from held-out captions) is reported
    but not asserted: on a few held-out pairs of a random-init LM it is a claim of the float kernels, not
    of the method (seen, SFT -> DPO: -1.68 -> +0.07 under AVX2, -0.70 -> -2.36 under AVX-512, +1.28 -> +0.75 with
    the scalar kernels, on the same machine).
    Whether rewrites generalise belongs to the Shapes efficacy benchmark, pooled over seeds."""
    from diffalign.text.pairs import PairConfig
    from diffalign.text.rewriter import RewriteConfig
    from diffalign.text.shapes import ShapesRewriterConfig, run_shapes_rewriter

    cfg = ShapesRewriterConfig(out=str(tmp_path / "run"), train_per_task=4, heldout_per_task=3, sft_steps=150,
                               dpo_steps=40, eval_seeds=1,
                               pairs=PairConfig(num_candidates=3, images_per_candidate=1, num_inference_steps=8,
                                                sampling=RewriteConfig(do_sample=True, max_new_tokens=16)))
    r = run_shapes_rewriter(cfg)
    assert r["pairs"]["pairs"] > 0 and r["heldout_pairs"]["pairs"] > 0
    # mean over the training pairs of log pi(y_w) - log pi(y_l): DPO well above SFT
    # (seen: +0.39 -> +24.4 under AVX-512, +0.34 -> +25.1 under AVX2, -0.52 -> +31.8 with the scalar kernels;
    # -1.53 -> +40.7 under AVX-512 with TRL's tokenisation, no EOS after a chat template's end of turn)
    print(f"\npair margins: train {r['train_pair_margin']}, held-out {r['heldout_pair_margin']}")
    if os.environ.get("DIFFALIGN_EFFICACY_LOG"):  # as the Shapes efficacy tests: one JSON line per run
        with open(os.environ["DIFFALIGN_EFFICACY_LOG"], "a") as f:
            f.write(json.dumps({"method": "shapes-rewriter", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                "train_pair_margin": r["train_pair_margin"],
                                "heldout_pair_margin": r["heldout_pair_margin"]}) + "\n")
    assert r["train_pair_margin"]["dpo"] > r["train_pair_margin"]["sft"] + 5.0
    assert set(r["heldout_pair_margin"]) == {"sft", "dpo"}
    assert set(r["heldout_images"]) == {"original", "sft", "dpo"}
    assert (tmp_path / "run" / "dpo" / "final" / "rewriter.json").is_file()
