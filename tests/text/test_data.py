import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffalign.text.data import load_examples, read_rows

STANDARD = {"prompt": "a photo of", "chosen": " a red circle", "rejected": " a blue square"}
CONVERSATIONAL = {
    "prompt": [{"role": "user", "content": "rewrite a circle"}],
    "chosen": [{"role": "assistant", "content": "a red circle"}],
    "rejected": [{"role": "assistant", "content": "a square"}],
}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trl_standard_and_conversational_pairs_load(tmp_path):
    src = _jsonl(tmp_path / "pairs.jsonl", [STANDARD, CONVERSATIONAL, dict(STANDARD, weight=0.5)])
    ex = load_examples(str(src), "pairs")
    assert [e.prompt for e in ex[:1]] == ["a photo of"]
    assert ex[1].chosen == CONVERSATIONAL["chosen"] and ex[1].prompt == CONVERSATIONAL["prompt"]
    assert [e.weight for e in ex] == [1.0, 1.0, 0.5]


def test_implicit_prompt_is_the_common_prefix(tmp_path):
    conv = {"chosen": CONVERSATIONAL["prompt"] + CONVERSATIONAL["chosen"],
            "rejected": CONVERSATIONAL["prompt"] + CONVERSATIONAL["rejected"]}
    src = _jsonl(tmp_path / "implicit.jsonl", [{"chosen": "a photo of a red circle", "rejected": "a photo of a square"},
                                               conv])
    std, c = load_examples(str(src), "pairs")
    assert (std.prompt, std.chosen, std.rejected) == ("a photo of a ", "red circle", "square")
    assert c.prompt == CONVERSATIONAL["prompt"] and c.rejected == CONVERSATIONAL["rejected"]


def test_parquet_folder_and_derived_kinds(tmp_path):
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist([STANDARD, STANDARD]), tmp_path / "d" / "part-0.parquet")
    assert len(read_rows(str(tmp_path / "d"))) == 2
    fb = load_examples(str(tmp_path / "d"), "feedback")
    assert [(e.completion, e.label) for e in fb[:2]] == [(" a red circle", True), (" a blue square", False)]
    sft = load_examples(str(tmp_path / "d" / "part-0.parquet"), "completion")
    assert [e.completion for e in sft] == [" a red circle"] * 2


def test_unpaired_and_sft_formats(tmp_path):
    src = _jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": " b", "label": False},
                                          {"messages": CONVERSATIONAL["prompt"] + CONVERSATIONAL["chosen"]}])
    kto = load_examples(str(src), "feedback", max_samples=1)
    assert (kto[0].completion, kto[0].label) == (" b", False)
    sft = load_examples(str(src), "completion")
    assert sft[1].completion == CONVERSATIONAL["chosen"]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "chosen": "b"}, "line 2: missing field 'rejected'"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "line 2: field 'chosen' must be text"),
    (dict(STANDARD, weight=-1), "line 2: field 'weight'"),
    ({"prompt": CONVERSATIONAL["prompt"], "chosen": "b", "rejected": "c"}, "line 2: 'prompt' and 'chosen'"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    src = _jsonl(tmp_path / "bad.jsonl", [STANDARD, row])
    with pytest.raises(ValueError, match=message):
        load_examples(str(src), "pairs")


def test_kto_rows_need_a_label(tmp_path):
    src = _jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match="line 1: missing field 'label'"):
        load_examples(str(src), "feedback")
