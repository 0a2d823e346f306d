"""Text training data in TRL's formats, so a TRL user's data loads unchanged.

================ ============================================ ====================================
kind             standard                                     conversational
================ ============================================ ====================================
preference       ``{"prompt", "chosen", "rejected"}``         the three are lists of messages
(implicit)       ``{"chosen", "rejected"}``: the prompt is    full message lists; the prompt is the
                 their common prefix                          shared leading messages
unpaired (KTO)   ``{"prompt", "completion", "label": bool}``  messages + ``label``
SFT              ``{"prompt", "completion"}`` or ``{"text"}``  ``{"messages"}``: the last assistant
                                                              message is the completion
================ ============================================ ====================================

Preference rows may carry ``weight`` (a per-pair loss weight, e.g. Sem-DPO's semantic weight).
Sources: a JSONL/JSON file, a parquet file, folder or glob, or a hub dataset id (needs
``pip install datasets``). A bad row is an error naming the source, row and field.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass
from pathlib import Path

from diffalign.text.logprobs import Text, is_conversational


@dataclass
class PreferenceExample:
    """One pair: the prompt and the chosen/rejected completions (strings or message lists)."""

    prompt: Text
    chosen: Text
    rejected: Text
    weight: float = 1.0


@dataclass
class CompletionExample:
    """One prompt and completion; ``label`` is KTO's desirable flag (None for SFT)."""

    prompt: Text
    completion: Text
    label: bool | None = None
    weight: float = 1.0


# ---------------------------------------------------------------------------- reading rows
def read_rows(source: str | list[str], *, split: str = "train", max_rows: int | None = None) -> list[tuple[str, dict]]:
    """``(where, row)`` pairs from JSONL/JSON, parquet (file, folder, glob) or a hub dataset id."""
    if isinstance(source, list):
        out: list[tuple[str, dict]] = []
        for s in source:
            out.extend(read_rows(s, split=split))
        return out[:max_rows] if max_rows is not None else out
    if not source:
        raise ValueError("no data source: set data.source to a JSONL/parquet file or a hub dataset id")
    path = Path(source)
    rows: list[tuple[str, dict]]
    if path.suffix in (".jsonl", ".json") and path.is_file():
        rows = list(_read_json(path))
    elif path.suffix == ".parquet" or path.is_dir() or any(c in source for c in "*?["):
        files = sorted(glob.glob(str(path / "**" / "*.parquet"), recursive=True)) if path.is_dir() else \
            sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]
        if not files:
            raise FileNotFoundError(f"{source}: no parquet files")
        rows = []
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"{f} does not exist")
            import pyarrow.parquet as pq

            rows.extend((f"{f}:row {i}", r) for i, r in enumerate(pq.read_table(f).to_pylist()))
    elif path.exists():
        raise ValueError(f"{source}: unsupported file type (use .jsonl, .json or .parquet)")
    else:
        rows = _read_hub(source, split)
    return rows[:max_rows] if max_rows is not None else rows


def _read_json(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        for i, row in enumerate(json.loads(text)):
            yield f"{path}:item {i}", row
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:line {n}: expected a JSON object")
        yield f"{path}:line {n}", row


def _read_hub(name: str, split: str) -> list[tuple[str, dict]]:
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError(f"{name!r} is not a local file; loading it from the Hugging Face hub needs the "
                          f"datasets library: pip install 'diffalign[hub]'") from e
    ds = load_dataset(name, split=split)
    return [(f"{name}[{split}]:row {i}", dict(r)) for i, r in enumerate(ds)]


# ---------------------------------------------------------------------------- validation
def _field(row: dict, name: str, where: str, optional: bool = False) -> Text | None:
    if name not in row or row[name] is None:
        if optional:
            return None
        raise ValueError(f"{where}: missing field {name!r} (have {sorted(row)})")
    value = row[name]
    if isinstance(value, str) or is_conversational(value):
        return value
    raise ValueError(f"{where}: field {name!r} must be text or a list of {{role, content}} messages, "
                     f"not {type(value).__name__}")


def _weight(row: dict, where: str) -> float:
    w = row.get("weight", 1.0)
    if w is None:
        return 1.0
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"{where}: field 'weight' must be a finite number >= 0, not {w!r}")
    return float(w)


def _split_shared(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """TRL's implicit prompt: the shared leading messages, or the longest common string prefix
    (cut back to a whitespace boundary, so no word is split)."""
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def preference_example(row: dict, where: str) -> PreferenceExample:
    chosen, rejected = _field(row, "chosen", where), _field(row, "rejected", where)
    prompt = _field(row, "prompt", where, optional=True)
    if is_conversational(chosen) != is_conversational(rejected):
        raise ValueError(f"{where}: 'chosen' and 'rejected' must both be text or both be messages")
    if prompt is None:
        prompt, chosen, rejected = _split_shared(chosen, rejected)
        if not prompt:
            raise ValueError(f"{where}: no 'prompt' field and 'chosen'/'rejected' share no prompt prefix")
    elif is_conversational(prompt) != is_conversational(chosen):
        raise ValueError(f"{where}: 'prompt' and 'chosen' must both be text or both be messages")
    return PreferenceExample(prompt, chosen, rejected, _weight(row, where))


def completion_example(row: dict, where: str, *, need_label: bool) -> CompletionExample:
    label = None
    if need_label:
        if "label" not in row:
            raise ValueError(f"{where}: missing field 'label' (KTO data: prompt, completion, label)")
        if not isinstance(row["label"], (bool, int)) or row["label"] not in (0, 1, True, False):
            raise ValueError(f"{where}: field 'label' must be true/false, not {row['label']!r}")
        label = bool(row["label"])
    if "messages" in row and "completion" not in row:
        messages = _field(row, "messages", where)
        if not isinstance(messages, list) or len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: 'messages' must end with an assistant message after at least one other")
        return CompletionExample(messages[:-1], messages[-1:], label)
    if "text" in row and "completion" not in row:
        text = _field(row, "text", where)
        return CompletionExample("", text, label)
    prompt = _field(row, "prompt", where)
    completion = _field(row, "completion", where)
    if is_conversational(prompt) != is_conversational(completion):
        raise ValueError(f"{where}: 'prompt' and 'completion' must both be text or both be messages")
    return CompletionExample(prompt, completion, label, _weight(row, where))


def load_examples(source: str | list[str], kind: str, *, split: str = "train",
                  max_samples: int | None = None) -> list[PreferenceExample] | list[CompletionExample]:
    """Examples of ``kind`` (``pairs``, ``feedback`` or ``completion``) from ``source``.

    Preference rows also serve the other kinds: ``feedback`` takes chosen as desirable and rejected
    as undesirable (two examples per pair), ``completion`` (SFT) takes the chosen completion.
    """
    rows = read_rows(source, split=split)
    if not rows:
        raise ValueError(f"{source}: no rows")
    out: list = []
    for where, row in rows:
        is_pair = "chosen" in row and "rejected" in row
        if kind == "pairs":
            out.append(preference_example(row, where))
        elif is_pair:
            ex = preference_example(row, where)
            if kind == "feedback":
                out.append(CompletionExample(ex.prompt, ex.chosen, True, ex.weight))
                out.append(CompletionExample(ex.prompt, ex.rejected, False, ex.weight))
            else:
                out.append(CompletionExample(ex.prompt, ex.chosen, None, ex.weight))
        elif kind in ("feedback", "completion"):
            out.append(completion_example(row, where, need_label=kind == "feedback"))
        else:
            raise ValueError(f"unknown data kind {kind!r}")
        if max_samples is not None and len(out) >= max_samples:
            break
    return out


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSONL atomically (temp file, then rename)."""
    from diffalign.data.files import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return atomic_write(path, write)
