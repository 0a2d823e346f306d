"""Claims across training seeds: every method trained from the bundled Shapes base at several training
seeds, on the oracle's labels and on flipped labels (the control), each compared with base on held-out
prompt combinations.

    diffalign shapes efficacy --methods diffusion-dpo,mapo,kto --seeds 0,1,2 --out runs/efficacy

One *run* is (method, training seed, labels or flipped): train the method's Shapes recipe with
``train.seed`` set, sample the held-out set (:func:`~diffalign.shapes.demo.heldout_eval_set`: unseen
combinations, fixed image seeds, the same for every model) with the LoRA in the plain diffusers pipeline,
and keep each image's noise-free oracle utility and ShapesEval verdict in ``DIR/runs/<method>/seed<k>-<arm>.json``.
A run whose file exists is not trained again (the command resumes), and each run is claimed with a lock
file, so two processes given the same arguments share the work. When every run of the arguments is in,
``DIR/table.md`` and ``DIR/table.json`` are written from the files.

Win rate of A over B: the share of held-out images whose utility under A beats B's (utilities closer
than the oracle's tie margin tie and count ½), as :meth:`~diffalign.shapes.oracle.Oracle.win_rate`.
Per seed, its 95 % interval resamples prompts. *Pooled* is the mean over seeds of the per-seed rates;
its interval (:func:`pooled_win_rate`) resamples the training seeds and the prompts together, so it
counts both sources of chance: the held-out sample and which seeds were trained.

The control: offline methods train on the same data with every label flipped (SmPO: scores ``1 − u``;
RankDPO: the reversed ranking; TPO: its caption preferences flipped; SePPO: the rejected images as its
winners); on-line methods train with the oracle reward negated (``fidelity_weight``, ``quality_weight`` of
the oracle sign-flipped); the reward-backpropagation methods (AlignProp, DRaFT, ReFL) minimise their differentiable
reward (the bundled Shapes PickScore, `shapes-pickscore`) instead of maximising it.

The prompt rewriter's row (``rewriter``): the tiny LM rewriter of :mod:`diffalign.text.shapes` (SFT on
claim-preserving rewrites, then DPO on pairs of its rewrites that the base rendered and ShapesEval scored
against the original caption; the control: DPO on the same pairs swapped). Its "model" is the base T2I
model given the rewriter's greedy rewrite of each held-out caption, judged against the original caption; so
"over base" compares images of rewritten captions with images of the unrewritten ones at the same seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EVAL_PER_TASK, EVAL_SEEDS = 12, 2  # 144 held-out images, as the efficacy tests and the demo
SAMPLING = {"num_inference_steps": 20, "guidance_scale": 5.0}
NEGATED_ORACLE = "{fidelity_weight: -1.0, quality_weight: -0.5}"  # the Oracle's default weights, sign-flipped


@dataclass(frozen=True)
class MethodSpec:
    """How one method is trained for the table.

    Attributes:
        recipe: a bundled recipe (``pipelines/``).
        overrides: dotted overrides applied to both arms.
        data: ``pairs`` (the oracle-labelled candidate pairs), ``scored`` (the same with each image's
            utility as ``score_0/score_1``), ``dual-caption`` (the same with a perturbed loser caption),
            ``ranked`` (lists of fresh base samples ranked by the oracle), ``none`` (on-line: the recipe
            samples its own prompts) or ``rewriter`` (the prompt rewriter's own pairs, module docstring).
        control: overrides of the control arm; empty means the data's labels are flipped instead.
        note: what the row's settings are, for the table.
    """

    recipe: str
    overrides: tuple[str, ...] = ()
    data: str = "pairs"
    control: tuple[str, ...] = ()
    note: str = ""


# on-line: 40 updates on the oracle's utility; the control negates it
ONLINE_ORACLE = ("method.reward=shapes-oracle", "train.max_steps=40", "train.checkpointing_steps=1000")
NEGATED_REWARD = (f"method.reward_options={{shapes-oracle: {NEGATED_ORACLE}}}",)
# reward backprop: 60 updates on the differentiable Shapes reward that agrees with the oracle (the bundled
# Shapes PickScore; the contrastive Shapes CLIP ranks base samples at chance); the control minimises it
SHAPES_PICKSCORE = ("method.reward=shapes-pickscore", "train.max_steps=60")
MINIMISED = ("method.reward_sign=-1",)
METHODS: dict[str, MethodSpec] = {
    "diffusion-dpo": MethodSpec("shapes-diffusion-dpo.yaml", note="β 500, lr 2e-3, 300 × 8 pairs"),
    "mapo": MethodSpec("shapes-mapo.yaml", note="β 0.1, lr 1e-3 cosine, 300 × 8 pairs"),
    "kto": MethodSpec("shapes-kto.yaml", note="pairs as feedback, paired_noise, β 2000, 300 × 4 pairs"),
    "sft": MethodSpec("shapes-sft.yaml", note="reference line: the chosen images (control: the rejected ones)"),
    "inpo": MethodSpec("shapes-inpo.yaml", note="β 500, 10 inversion steps"),
    "inversion-dpo": MethodSpec("shapes-inversion-dpo.yaml", note="β 500, 10-step inversion, 2 steps an update"),
    "smpo": MethodSpec("shapes-smpo.yaml", data="scored", note="oracle utilities as scores"),
    "rankdpo": MethodSpec("shapes-rankdpo.yaml", data="ranked", note="4 fresh samples of 200 prompts, oracle-ranked"),
    "dcpo": MethodSpec("shapes-dcpo.yaml", data="dual-caption",
                       note="DCPO-p: the loser captioned by a perturbed prompt; β 500, lr 2e-3, 300 × 8 pairs"),
    "tpo": MethodSpec("shapes-tpo.yaml", control=("method.flip_labels=true",), note="control: caption labels flipped"),
    "grpo": MethodSpec("shapes-grpo.yaml", ONLINE_ORACLE, data="none", control=NEGATED_REWARD,
                       note="oracle utility reward, 40 updates"),
    "d3po": MethodSpec("shapes-d3po.yaml", ("train.max_steps=40", "train.checkpointing_steps=1000"), data="none",
                       control=(f"method.oracle_options={{noise: 0.1, {NEGATED_ORACLE[1:-1]}}}",),
                       note="oracle labels (noise 0.1), 40 updates"),
    "ddpo": MethodSpec("shapes-ddpo.yaml", ONLINE_ORACLE, data="none", control=NEGATED_REWARD,
                       note="oracle utility reward, 16 prompts × 1 image, 40 updates"),
    "seppo": MethodSpec("shapes-seppo.yaml", ("method.winners=data", "data.format=pickapic", "data.drop_ties=true",
                                              "train.max_steps=40"),
                        note="winners: the oracle pairs' chosen images (control: the rejected), 40 updates"),
    "draft": MethodSpec("shapes-draft.yaml", SHAPES_PICKSCORE, data="none", control=MINIMISED,
                        note="DRaFT-1, Shapes PickScore reward, 60 × 4 prompts"),
    "alignprop": MethodSpec("shapes-alignprop.yaml", SHAPES_PICKSCORE, data="none", control=MINIMISED,
                            note="the whole 20-step chain, Shapes PickScore, 60 × 4"),
    "refl": MethodSpec("shapes-refl.yaml", SHAPES_PICKSCORE, data="none", control=MINIMISED,
                       note="Shapes PickScore reward + pretraining loss, 60 × 4"),
    "rewriter": MethodSpec("shapes-rewriter-dpo.yaml", data="rewriter",
                           note="prompt rewriter: SFT 1500 steps, 40 train captions a task, 6 candidates; DPO 100"),
}
ARMS = ("labels", "flipped")


# --- data -------------------------------------------------------------------------------------------------

def oracle_pairs(candidates, *, flip: bool) -> list[dict]:
    """The demo's training data: each prompt's best and worst candidate, labelled by the noisy oracle
    (noise 0.1, seed 0); ``flip`` flips every label."""
    from diffalign.shapes.demo import preference_rows
    from diffalign.shapes.oracle import Oracle

    return preference_rows(candidates, Oracle(noise=0.1, seed=0), flip=flip)


def scored_rows(candidates, *, flip: bool) -> list[dict]:
    """:func:`oracle_pairs` with each image's noise-free utility ``u`` as ``score_0``/``score_1`` (SmPO);
    the flipped arm scores ``1 − u``."""
    from diffalign.data.pairs import decode_image
    from diffalign.shapes.oracle import Oracle

    rows, judge = oracle_pairs(candidates, flip=flip), Oracle(noise=0.0)
    for row, prompt in zip(rows, candidates.prompts):
        for j in (0, 1):
            u = judge.utility(decode_image(row[f"jpg_{j}"], "candidate"), prompt)
            row[f"score_{j}"] = 1.0 - u if flip else u
    return rows


def dual_caption_rows(candidates, *, flip: bool, seed: int = 0) -> list[dict]:
    """:func:`oracle_pairs` with a loser caption (DCPO-p, the perturbed-prompt variant): the loser image is
    captioned by the prompt with one colour, count, shape or relation changed
    (:func:`~diffalign.shapes.pretrain_reward.perturb_caption`); ``caption`` is image 0's, ``caption_1``
    image 1's. Under ``flip`` the labels are flipped first, so the perturbed caption follows the new loser."""
    import random

    from diffalign.shapes.pretrain_reward import perturb_caption

    rng, rows = random.Random(seed), oracle_pairs(candidates, flip=flip)
    for row in rows:
        perturbed = perturb_caption(row["caption"], rng)
        if row["label_0"] == 0.0:      # image 0 lost
            row["caption"], row["caption_1"] = perturbed, row["caption"]
        else:                          # image 1 lost (a tie is dropped by the reader: its captions do not matter)
            row["caption_1"] = perturbed
    return rows


def ranked_records(lists, *, flip: bool) -> list[dict]:
    """Ranked-list records (``diffalign data label`` format) of ``lists`` (:class:`~diffalign.shapes.demo.Candidates`
    with several images a prompt), ranked by utility (flipped: by ``1 − u``, the reversed ranking)."""
    from diffalign.shapes.oracle import to_png_bytes

    records = []
    for prompt, group, utils in zip(lists.prompts, lists.images, lists.utilities):
        scores = [1.0 - u if flip else u for u in utils]
        records.append({"caption": prompt.text, "images": [to_png_bytes(im) for im in group],
                        "names": [str(i) for i in range(len(group))], "scores": scores,
                        "ranking": sorted(range(len(group)), key=lambda i: -scores[i]), "rewards": {}})
    return records


RANKED_PROMPTS, RANKED_K = 200, 4


def write_training_data(kind: str, path: Path, candidates, *, flip: bool, ranked_lists=None) -> Path:
    """Write the training data of ``kind`` (:class:`MethodSpec`'s ``data``) to ``path``."""
    from diffalign.data.label import write_ranked
    from diffalign.data.pickapic import write_pickapic_parquet

    if kind == "ranked":
        write_ranked(ranked_records(ranked_lists, flip=flip), path)
    elif kind in ("pairs", "scored"):
        rows = (scored_rows if kind == "scored" else oracle_pairs)(candidates, flip=flip)
        write_pickapic_parquet(rows, path)
    elif kind == "dual-caption":
        write_pickapic_parquet(dual_caption_rows(candidates, flip=flip), path, optional_columns=("caption_1",))
    else:
        raise ValueError(f"no training data of kind {kind!r}")
    return path


# --- statistics -------------------------------------------------------------------------------------------

def win_indicators(utility_a: Sequence[float], utility_b: Sequence[float], tie_margin: float) -> np.ndarray:
    """``[N]`` per image: 1 where A's utility beats B's by at least ``tie_margin``, 0 where B's beats A's,
    ½ for a tie."""
    d = np.asarray(utility_a, dtype=np.float64) - np.asarray(utility_b, dtype=np.float64)
    d[np.abs(d) < tie_margin] = 0.0
    return np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))


def pooled_win_rate(wins: np.ndarray, groups: Sequence, *, n_boot: int = 4000, seed: int = 0
                    ) -> tuple[float, float, float]:
    """``(rate, lo, hi)`` of ``wins [S, N]`` (S training seeds × N held-out images, the same images at
    every seed): the rate is the mean over seeds and images; the 95 % interval resamples the S seeds
    and the prompts (``groups[i]``, the prompt of image ``i``: a prompt's images move together) with
    replacement in each of ``n_boot`` draws, the same prompts for every seed of a draw."""
    wins = np.asarray(wins, dtype=np.float64)
    if wins.ndim != 2 or wins.shape[1] != len(groups):
        raise ValueError(f"wins must be [seeds, {len(groups)}], got {list(wins.shape)}")
    ids: dict = {}
    index = np.array([ids.setdefault(g, len(ids)) for g in groups])
    n_seeds, n_groups = wins.shape[0], len(ids)
    sums = np.stack([np.bincount(index, weights=w, minlength=n_groups) for w in wins])  # [S, G]
    counts = np.bincount(index, minlength=n_groups).astype(np.float64)  # [G]
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    group_draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    # draw b: mean over its seeds of (sum over its prompts of wins) / (its images)
    per_draw = sums[seed_draws[:, :, None], group_draws[:, None, :]].sum(axis=2)  # [B, S]
    stats = per_draw.mean(axis=1) / counts[group_draws].sum(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(wins.mean()), float(lo), float(hi)


# --- one run ----------------------------------------------------------------------------------------------

def heldout_results(pipe, prompts, seeds, texts: Sequence[str] | None = None) -> dict:
    """Sample ``prompts`` (image ``i`` with ``seeds[i]``, :data:`SAMPLING`; from ``texts[i]`` instead of the
    prompt's caption when given) and judge each image against its prompt:
    ``{"utility": [N] noise-free oracle utilities, "correct": [N] ShapesEval verdicts (0/1)}``."""
    from diffalign.eval.generate import generate
    from diffalign.shapes.evaluate import evaluate
    from diffalign.shapes.oracle import Oracle

    judge = Oracle(noise=0.0)
    images = generate(pipe, list(texts) if texts is not None else [p.text for p in prompts], seeds, **SAMPLING)
    return {"utility": [float(judge.utility(im, p)) for im, p in zip(images, prompts)],
            "correct": [float(evaluate(im, p).correct) for im, p in zip(images, prompts)]}


def train_run(method: str, spec: MethodSpec, seed: int, arm: str, work: Path, candidates, ranked_lists,
              extra_overrides: Sequence[str] = ()) -> tuple[Path, float]:
    """Train one run; returns its ``final/`` folder and the training minutes."""
    from diffalign.trainers.loop import train
    from diffalign.trainers.registry import load_recipe

    flip = arm == "flipped"
    overrides = [*spec.overrides, *(spec.control if flip else ())]
    if spec.data != "none":
        data = write_training_data(spec.data, work / "train.parquet", candidates,
                                   flip=flip and not spec.control, ranked_lists=ranked_lists)
        overrides.append(f"data.source={data}")
    overrides += [f"train.output_dir={work / 'run'}", f"train.seed={seed}", "train.checkpointing_steps=100000",
                  *extra_overrides]
    config = load_recipe(spec.recipe, overrides)
    start = time.perf_counter()
    run_dir = train(config)
    return Path(run_dir) / "final", (time.perf_counter() - start) / 60


def rewriter_run(seed: int, arm: str, shared: Path, work: Path, prompts, image_seeds,
                 overrides: Sequence[str] = ()) -> tuple[dict, float]:
    """One run of the rewriter row: SFT and its pairs once per seed in ``shared`` (both arms use them; a
    lock lets two processes share it), DPO on the pairs (the control: swapped) in ``work``, then the base
    samples the DPO model's greedy rewrite of each held-out caption. Returns (:func:`heldout_results` judged
    against the original captions, with ``"rewrites"``: the texts sampled; training minutes of SFT, pairs
    and DPO)."""
    from filelock import FileLock

    from diffalign.data.files import atomic_write
    from diffalign.shapes.demo import load_base_pipeline
    from diffalign.text.data import write_jsonl
    from diffalign.text.rewriter import PromptRewriter, RewriteConfig
    from diffalign.text.shapes import (ShapesRewriterConfig, pair_rewards, swapped_pairs, train_dpo,
                                       train_sft_and_pairs)

    cfg = ShapesRewriterConfig(out=str(shared), seed=seed, overrides=list(overrides))
    pipe = load_base_pipeline()
    done = shared / "stage.json"
    shared.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(shared) + ".lock"):
        if not done.is_file():
            shutil.rmtree(shared, ignore_errors=True)
            start = time.perf_counter()
            sft, rows, summary = train_sft_and_pairs(cfg, shared, pipe, pair_rewards(cfg))
            write_jsonl(swapped_pairs(rows), shared / "pairs-swapped.jsonl")
            stage = {"sft": str(sft.relative_to(shared)), "pairs": summary,
                     "minutes": (time.perf_counter() - start) / 60}
            atomic_write(done, lambda tmp: tmp.write_text(json.dumps(stage)))
    stage = json.loads(done.read_text())
    start = time.perf_counter()
    pairs = shared / ("pairs-swapped.jsonl" if arm == "flipped" else "pairs.jsonl")
    dpo = train_dpo(cfg, shared / stage["sft"], pairs, work / "dpo")
    minutes = stage["minutes"] + (time.perf_counter() - start) / 60
    greedy = RewriteConfig(do_sample=False, max_new_tokens=cfg.pairs.sampling.max_new_tokens)
    rewrites = [r[0] for r in PromptRewriter.from_pretrained(dpo).rewrite([p.text for p in prompts], config=greedy)]
    res = heldout_results(pipe, prompts, image_seeds, texts=rewrites)
    res.update(rewrites=rewrites, pairs=stage["pairs"])
    return res, minutes


class Bench:
    """The runs of one benchmark folder (``out``): the held-out set, base's results, each run's file."""

    def __init__(self, out: Path, extra_overrides: Sequence[str] = (), eval_per_task: int = EVAL_PER_TASK):
        from diffalign.shapes.demo import heldout_eval_set

        self.out, self.extra_overrides = Path(out), list(extra_overrides)
        self.prompts, self.seeds = heldout_eval_set(eval_per_task, EVAL_SEEDS)
        self._candidates = self._ranked = None

    def result_path(self, method: str, seed: int, arm: str) -> Path:
        return self.out / "runs" / method / f"seed{seed}-{arm}.json"

    @property
    def candidates(self):
        if self._candidates is None:
            from diffalign.shapes.demo import BUNDLED_CANDIDATES, Candidates

            self._candidates = Candidates.load(BUNDLED_CANDIDATES)
        return self._candidates

    def ranked_lists(self):
        """RankDPO's lists: ``RANKED_K`` fresh base samples of the first ``RANKED_PROMPTS`` candidate prompts,
        sampled once per folder (``DIR/ranked-lists``) and shared by every run."""
        from filelock import FileLock

        from diffalign.shapes.demo import Candidates, load_base_pipeline, sample_candidates

        if self._ranked is None:
            folder = self.out / "ranked-lists"
            with FileLock(str(self.out / "ranked-lists.lock")):
                if not (folder / "candidates.parquet").is_file():
                    lists = sample_candidates(load_base_pipeline(), self.candidates.prompts[:RANKED_PROMPTS],
                                              images_per_prompt=RANKED_K, seed=0, progress=None)
                    lists.save(folder / "candidates.parquet")
            self._ranked = Candidates.load(folder / "candidates.parquet")
        return self._ranked

    def base(self) -> dict:
        """Base's held-out results (sampled once per folder, ``DIR/base.json``)."""
        from filelock import FileLock

        from diffalign.data.files import atomic_write
        from diffalign.shapes.demo import load_base_pipeline

        path = self.out / "base.json"
        self.out.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.out / "base.json.lock")):
            if not path.is_file():
                res = heldout_results(load_base_pipeline(), self.prompts, self.seeds)
                atomic_write(path, lambda tmp: tmp.write_text(json.dumps(res)))
        return json.loads(path.read_text())

    def run(self, method: str, seed: int, arm: str) -> bool:
        """Train and judge one run unless its file exists or another process holds it; True if it ran."""
        from filelock import FileLock, Timeout

        from diffalign.data.files import atomic_write
        from diffalign.shapes.demo import load_base_pipeline

        path = self.result_path(method, seed, arm)
        if path.is_file():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            if path.is_file():
                return False
            spec = METHODS[method]
            work = path.parent / f"seed{seed}-{arm}"
            shutil.rmtree(work, ignore_errors=True)  # a run that stopped half-way starts again
            if spec.data == "rewriter":
                res, minutes = rewriter_run(seed, arm, path.parent / f"seed{seed}-sft", work, self.prompts,
                                            self.seeds, self.extra_overrides)
            else:
                ranked = self.ranked_lists() if spec.data == "ranked" else None
                final, minutes = train_run(method, spec, seed, arm, work, self.candidates, ranked,
                                           self.extra_overrides)
                pipe = load_base_pipeline()
                pipe.load_lora_weights(str(final))
                res = heldout_results(pipe, self.prompts, self.seeds)
            res.update(method=method, seed=seed, arm=arm, training_minutes=minutes, recipe=spec.recipe,
                       overrides=[*spec.overrides, *(spec.control if arm == "flipped" else ()), *self.extra_overrides])
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(res)))
            shutil.rmtree(work, ignore_errors=True)  # its data and LoRA: the run's numbers are in the file
            return True
        finally:
            lock.release()


# --- the table --------------------------------------------------------------------------------------------

def method_summary(bench: Bench, method: str, seeds: Sequence[int], base: dict) -> dict | None:
    """Per-seed and pooled win rates of aligned over base, control over base, aligned over control, and
    held-out ShapesEval; None while a run of ``method`` is missing."""
    from diffalign.shapes.oracle import Oracle

    paths = {(s, a): bench.result_path(method, s, a) for s in seeds for a in ARMS}
    if not all(p.is_file() for p in paths.values()):
        return None
    runs = {k: json.loads(p.read_text()) for k, p in paths.items()}
    margin = Oracle(noise=0.0).tie_margin
    groups = [p.text for p in bench.prompts]
    comparisons = {"aligned_over_base": ("labels", None), "control_over_base": ("flipped", None),
                   "aligned_over_control": ("labels", "flipped")}
    out: dict = {"method": method, "note": METHODS[method].note, "seeds": list(seeds), "per_seed": {}, "pooled": {}}
    for name, (a, b) in comparisons.items():
        wins = np.stack([win_indicators(runs[s, a]["utility"], (runs[s, b] if b else base)["utility"], margin)
                         for s in seeds])
        out["pooled"][name] = pooled_win_rate(wins, groups)
        for s, w in zip(seeds, wins):
            out["per_seed"].setdefault(str(s), {})[name] = pooled_win_rate(w[None], groups)
    for s in seeds:
        out["per_seed"][str(s)]["shapes_eval"] = {arm: float(np.mean(runs[s, arm]["correct"])) for arm in ARMS}
        out["per_seed"][str(s)]["training_minutes"] = runs[s, "labels"]["training_minutes"]
    out["pooled"]["shapes_eval"] = {arm: float(np.mean([runs[s, arm]["correct"] for s in seeds])) for arm in ARMS}
    rates = [out["per_seed"][str(s)]["aligned_over_base"][0] for s in seeds]
    out["verdict"] = {
        "beats_base_pooled": out["pooled"]["aligned_over_base"][1] > 0.5,
        "seeds_above_base": sum(r > 0.5 for r in rates),
        "control_beats_base_pooled": out["pooled"]["control_over_base"][1] > 0.5,
        "beats_control_pooled": out["pooled"]["aligned_over_control"][1] > 0.5,
    }
    return out


def _rate(r: Sequence[float]) -> str:
    return f"{r[0]:.3f} ({r[1]:.3f}–{r[2]:.3f})"


def table_markdown(summaries: list[dict], base: dict, seeds: Sequence[int], missing: list[str],
                   overrides: Sequence[str] = ()) -> str:
    """The README table: one row a method, pooled first, then each seed's aligned-over-base rate."""
    head = ["method", "aligned over base, pooled", *[f"seed {s}" for s in seeds], "seeds > 0.5",
            "control over base, pooled", "aligned over control, pooled", "ShapesEval aligned / control", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in summaries:
        v = m["verdict"]
        ok = v["beats_base_pooled"] and v["seeds_above_base"] == len(seeds) and not v["control_beats_base_pooled"]
        verdict = "holds" if ok else "does not hold: " + ", ".join(
            x for x, bad in (("pooled CI reaches 0.5", not v["beats_base_pooled"]),
                             (f"{v['seeds_above_base']}/{len(seeds)} seeds", v["seeds_above_base"] < len(seeds)),
                             ("control beats base", v["control_beats_base_pooled"])) if bad)
        se = m["pooled"]["shapes_eval"]
        lines.append("| " + " | ".join([
            f"{m['method']} ({m['note']})" if m["note"] else m["method"], _rate(m["pooled"]["aligned_over_base"]),
            *[f"{m['per_seed'][str(s)]['aligned_over_base'][0]:.3f}" for s in seeds],
            f"{v['seeds_above_base']}/{len(seeds)}", _rate(m["pooled"]["control_over_base"]),
            _rate(m["pooled"]["aligned_over_control"]), f"{se['labels']:.3f} / {se['flipped']:.3f}", verdict]) + " |")
    lines.append("")
    lines.append(f"Base: held-out ShapesEval {np.mean(base['correct']):.3f}, mean oracle utility "
                 f"{np.mean(base['utility']):.3f} ({len(base['utility'])} images).")
    if overrides:
        lines.append(f"Every run with: {' '.join(overrides)}.")
    for name in missing:
        lines.append(f"- {name}: not measured in this run")
    return "\n".join(lines) + "\n"


def write_table(bench: Bench, methods: Sequence[str], seeds: Sequence[int]) -> dict:
    """``DIR/table.json`` and ``DIR/table.md`` from the run files there (methods with a missing run are
    listed as not measured)."""
    from diffalign.data.files import atomic_write

    base = bench.base()
    summaries, missing = [], []
    for m in methods:
        s = method_summary(bench, m, seeds, base)
        (summaries.append(s) if s else missing.append(m))
    table = {"seeds": list(seeds), "methods": summaries, "missing": missing, "overrides": bench.extra_overrides,
             "base": {"shapes_eval": float(np.mean(base["correct"])), "utility": float(np.mean(base["utility"]))}}
    atomic_write(bench.out / "table.json", lambda tmp: tmp.write_text(json.dumps(table, indent=1)))
    atomic_write(bench.out / "table.md",
                 lambda tmp: tmp.write_text(table_markdown(summaries, base, seeds, missing, bench.extra_overrides)))
    return table


def _names(text: str, allowed) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        from diffalign.errors import UsageError

        raise UsageError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffalign shapes efficacy", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    p.add_argument("--out", required=True, help="the benchmark folder (resumed if it holds runs)")
    p.add_argument("--eval-per-task", type=int, default=EVAL_PER_TASK,
                   help=f"held-out prompts per task, each sampled at {EVAL_SEEDS} seeds (default {EVAL_PER_TASK})")
    p.add_argument("--table-only", action="store_true", help="write the table from the runs there; train nothing")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run (e.g. train.max_steps=10)")
    a = p.parse_args(argv)
    methods, seeds = _names(a.methods, METHODS), [int(s) for s in a.seeds.split(",") if s.strip()]
    bench = Bench(Path(a.out), a.overrides, a.eval_per_task)
    bench.base()
    if not a.table_only:
        failed = set()
        for m in methods:
            for s in seeds:
                for arm in ARMS:
                    if m in failed:
                        continue
                    try:
                        if bench.run(m, s, arm):
                            print(f"efficacy: {m} seed {s} {arm} done", file=sys.stderr, flush=True)
                    except Exception as e:  # noqa: BLE001 - one method's failure must not stop the others' runs
                        failed.add(m)
                        print(f"efficacy: {m} seed {s} {arm} FAILED ({type(e).__name__}: {e}); its other runs are "
                              "skipped, the other methods go on", file=sys.stderr, flush=True)
    table = write_table(bench, methods, seeds)
    print((bench.out / "table.md").read_text())
    return 0 if not table["missing"] else 3
