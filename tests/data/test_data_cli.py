import json

import pyarrow.parquet as pq

from data_helpers import BLUE, RED, jpeg
from diffalign.cli import main
from diffalign.data import read_pickapic, write_pickapic_parquet


def test_inspect(tmp_path, capsys, rows):
    rows[0]["jpg_0"] = b"broken"
    path = write_pickapic_parquet(rows, tmp_path / "p.parquet")
    assert main(["data", "inspect", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["rows"], out["kept"], out["ties_dropped"], out["bad_images"]) == (3, 1, 1, 1)
    assert out["labels"] == {"0.0": 1, "0.5": 1, "1.0": 1} and out["bad_rows"] == [f"{path}:row 0"]
    assert main(["data", "inspect", str(tmp_path / "missing.parquet")]) == 1
    assert "missing.parquet" in capsys.readouterr().err


def test_convert_jsonl_to_parquet(tmp_path):
    (tmp_path / "r.jpg").write_bytes(jpeg(RED))
    (tmp_path / "b.jpg").write_bytes(jpeg(BLUE))
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"prompt": "p", "chosen": "r.jpg", "rejected": "b.jpg"}) + "\n"
                   + json.dumps({"prompt": "q", "chosen": "b.jpg", "rejected": "r.jpg", "prompt_rejected": "q2",
                                 "weight": 0.25}) + "\n")
    out = tmp_path / "out" / "pairs.parquet"
    assert main(["data", "convert", str(src), str(out)]) == 0
    table = pq.read_table(out)
    assert table.column("jpg_0").to_pylist()[0] == jpeg(RED)  # bytes kept as they were
    pairs = list(read_pickapic(out))
    assert [(p.prompt, p.prompt_rejected, p.weight) for p in pairs] == [("p", None, 1.0), ("q", "q2", 0.25)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "r.jpg"}) + "\n")
    assert main(["data", "convert", str(bad), str(tmp_path / "never.parquet")]) == 1
    assert not (tmp_path / "never.parquet").exists() and not list(tmp_path.glob(".*.tmp"))
