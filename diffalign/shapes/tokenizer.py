"""A word-level vocabulary for the Shapes grammar, written as a real ``transformers.CLIPTokenizer``.

CLIP's tokenizer is byte-pair encoding: a word is split into characters (the last one marked ``</w>``)
and merges from ``merges.txt`` are applied by rank. We write merges that rebuild every grammar word
from its characters, so each word is exactly one token and the folder loads with
``CLIPTokenizer.from_pretrained`` like any Stable Diffusion tokenizer. Words outside the list still
encode (as character pieces), they just carry no learned meaning.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 20

# Every word the Shapes grammar uses, plus spares (synonyms, larger counts, more colours) so that
# grammar extensions do not need a new vocabulary.
WORDS: tuple[str, ...] = (
    # articles, glue
    "a", "an", "the", "of", "and", "with", "no", "without", "on", "in", "to", "is", "are", "there",
    "photo", "picture", "image", "drawing", "scene", "background", "some", "only", "one", "next",
    # counts
    "zero", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    # colours
    "red", "green", "blue", "yellow", "purple", "orange", "cyan", "magenta", "pink", "white", "black",
    "gray", "grey", "brown", "teal", "colored", "coloured",
    # shapes
    "circle", "circles", "square", "squares", "triangle", "triangles", "shape", "shapes", "object",
    "objects", "disc", "discs", "box", "boxes", "dot", "dots", "star", "stars", "rectangle", "rectangles",
    # positions
    "left", "right", "above", "below", "top", "bottom", "under", "over", "beside", "behind", "front",
    "center", "middle", "corner", "near", "far",
    # sizes / spares
    "big", "small", "large", "tiny", "bright", "dark",
)


def _char_pieces(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + "</w>"]


def _base_vocab() -> list[str]:
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    return [c for c in chars] + [c + "</w>" for c in chars]


def _write(folder: Path, vocab: list[str], merges: list[tuple[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), bos_token=BOS, eos_token=EOS,
                  unk_token=EOS, pad_token=EOS, model_max_length=MODEL_MAX_LENGTH).save_pretrained(folder)


def build_tokenizer(folder: str | Path, words: tuple[str, ...] = WORDS) -> CLIPTokenizer:
    """Write vocab.json + merges.txt (+ tokenizer config) to ``folder`` and return the loaded tokenizer.

    Each word gets a left-to-right merge chain (``r e`` -> ``re``, ``re d</w>`` -> ``red</w>``). A chain
    can be cut by another word's higher-priority merge; such words get extra merges appended (which can
    only fire after every earlier merge is exhausted) until every word is a single token.
    """
    folder = Path(folder)
    vocab, merges, seen = _base_vocab(), [], set()

    def add_chain(pieces: list[str]) -> None:
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
                if left + right not in vocab:
                    vocab.append(left + right)
            left = left + right

    words = tuple(dict.fromkeys(w.lower() for w in words))
    for w in words:
        add_chain(_char_pieces(w))
    for _ in range(10):
        _write(folder, vocab + [BOS, EOS], merges)
        tok = CLIPTokenizer.from_pretrained(folder)
        split = {w: tok.tokenize(w) for w in words}
        broken = {w: p for w, p in split.items() if len(p) != 1}
        if not broken:
            return tok
        for pieces in broken.values():
            add_chain(pieces)
    raise RuntimeError(f"could not make single tokens of {sorted(broken)}")


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Load a tokenizer folder written by :func:`build_tokenizer` (plain ``from_pretrained``)."""
    return CLIPTokenizer.from_pretrained(folder)
