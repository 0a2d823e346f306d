# python docs/results/shapes-efficacy/rewriter_headroom.py docs/results/shapes-efficacy/rewriter-headroom.json  (OMP_NUM_THREADS=1)
"""Headroom of the Shapes prompt rewriter: the bundled SD base given each claim-preserving rewrite
(`equivalent_rewrites`) of the efficacy bench's held-out captions, judged against the original caption,
same image seeds. Rules: `original`, `to_train` (the first rewrite that is a train-split caption, else the
caption), `oracle` (per caption, the rewrite with the best mean ShapesEval over its images: an upper bound)."""
import json, sys
from collections import defaultdict
import numpy as np, torch
from diffalign.shapes.demo import heldout_eval_set, load_base_pipeline
from diffalign.shapes.efficacy import heldout_results
from diffalign.shapes.grammar import parse_prompt, split_of
from diffalign.text.shapes import equivalent_rewrites

torch.set_num_threads(1)
prompts, seeds = heldout_eval_set(12, 4)  # 12 captions a task x 4 seeds
pipe = load_base_pipeline()
cands = {p.text: equivalent_rewrites(p.text) for p in prompts}
k = max(len(v) for v in cands.values())
res = {}
for j in range(k):
    texts = [cands[p.text][min(j, len(cands[p.text]) - 1)] for p in prompts]
    res[j] = heldout_results(pipe, prompts, seeds, texts=texts)
    print(j, np.mean(res[j]["correct"]), flush=True)
by_cap = defaultdict(list)
for i, p in enumerate(prompts):
    by_cap[p.text].append(i)
def pick(rule):
    out = np.zeros(len(prompts))
    for cap, idx in by_cap.items():
        c = cands[cap]
        if rule == "original": j = 0
        elif rule == "to_train":
            j = next((jj for jj, t in enumerate(c) if jj and split_of(parse_prompt(t)) == "train"), 0)
        else:
            j = max(range(len(c)), key=lambda jj: np.mean([res[jj]["correct"][i] for i in idx]))
        for i in idx: out[i] = res[j]["correct"][i]
    return out
table = {}
for rule in ("original", "to_train", "oracle"):
    s = pick(rule)
    per_task = {t: float(np.mean([s[i] for i, p in enumerate(prompts) if p.task == t])) for t in dict.fromkeys(p.task for p in prompts)}
    table[rule] = {"overall": float(np.mean(list(per_task.values()))), **per_task}
    print(rule, json.dumps(table[rule]), flush=True)
json.dump({"table": table, "n_images": len(prompts)}, open(sys.argv[1], "w"), indent=1)
