"""`diffalign train` end to end for InPO, Inversion-DPO, SmPO, RankDPO, DCPO and TPO on tiny pipelines."""

import json
import math
from pathlib import Path

import pytest

from diffalign.cli import main


@pytest.fixture(scope="module")
def scored_parquet(tmp_path_factory, pair_parquet):
    """The conftest pairs with score_0/score_1 columns (image 0 scored higher when it is the winner)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pair_parquet)
    labels = table.column("label_0").to_pylist()
    s0 = [0.3 if lab == 1.0 else 0.1 for lab in labels]
    s1 = [0.1 if lab == 1.0 else 0.3 for lab in labels]
    table = table.append_column("score_0", pa.array(s0, pa.float64())).append_column("score_1", pa.array(s1, pa.float64()))
    path = tmp_path_factory.mktemp("scored") / "scored.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def ranked_parquet(tmp_path_factory, pair_parquet):
    """Ranked lists of 3 images per prompt (parquet with image bytes), from the conftest pairs."""
    import pyarrow.parquet as pq

    from diffalign.data.label import write_ranked

    rows = [r for r in pq.read_table(pair_parquet).to_pylist() if r["label_0"] in (0.0, 1.0)]
    records = []
    for r in rows:
        good, bad = (r["jpg_0"], r["jpg_1"]) if r["label_0"] == 1.0 else (r["jpg_1"], r["jpg_0"])
        records.append({"caption": r["caption"], "images": [bad, good, bad], "names": ["b0", "g", "b1"],
                        "scores": [0.0, 1.0, -0.5], "ranking": [1, 0, 2], "rewards": {}})
    path = tmp_path_factory.mktemp("ranked") / "ranked.parquet"
    write_ranked(records, path)
    return path


def _train(model_dir, data, out, *extra):
    args = ["train", "-", f"--model.pretrained={model_dir}", f"--data.source={data}", "--data.resolution=32",
            f"--train.output_dir={out}", "--train.batch_size=2", "--train.learning_rate=1e-3",
            "--train.checkpointing_steps=0", "--model.lora_rank=4", "--train.max_steps=2", *extra]
    assert main(args) == 0
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


CASES = {
    "inpo": ("sd", "pairs", ["--method.num_inversion_steps=4"]),
    "inpo-sdxl": ("sdxl", "pairs", ["--method.name=inpo", "--method.num_inversion_steps=3"]),
    "inpo-sd3": ("sd3", "pairs", ["--method.name=inpo", "--method.num_inversion_steps=3", "--method.eta=0",
                                  "--method.beta=500"]),
    "inversion-dpo": ("sd", "pairs", ["--method.num_inversion_steps=3"]),
    "smpo": ("sd", "scored", ["--method.num_inversion_steps=3"]),
    "rankdpo": ("sd", "ranked", ["--data.format=ranked"]),
    "dcpo": ("sd", "pairs", []),
    "tpo": ("sd", "pairs", []),
    "tpo-kto": ("sd", "pairs", ["--method.name=tpo", "--method.form=kto"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_train_runs_and_saves_a_lora(case, tiny_models, pair_parquet, scored_parquet, ranked_parquet, tmp_path):
    family, data, extra = CASES[case]
    source = {"pairs": pair_parquet, "scored": scored_parquet, "ranked": ranked_parquet}[data]
    name = [f"--method.name={case}"] if not any(e.startswith("--method.name") for e in extra) else []
    rows = _train(tiny_models[family], source, tmp_path / "run", *name, *extra)
    assert [r["step"] for r in rows] == [1, 2]
    at_init = 0.5 if case == "tpo-kto" else math.log(2)
    assert rows[0]["loss"] == pytest.approx(at_init, abs=1e-4)  # policy == reference at step 1
    assert rows[0]["implicit_acc"] == 0.5
    assert all(not r["skipped"] and r["grad_norm"] > 0 for r in rows)
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
