"""Rule-based caption perturbation: a caption that no longer matches its image (TPO, DCPO-p negatives).

One edit per call, of one of four kinds (GenEval's failure modes):

========== =============================================== ==========================================
kind       edit                                            example
========== =============================================== ==========================================
colour     a colour word becomes another colour            a red circle -> a blue circle
count      a count (word, digit, or the article "a"/"an"   three squares -> two squares,
           before an object) becomes another count; the   a circle -> four circles
           object's number agrees
object     an object noun becomes another object of the    a cat and a dog -> a cat and a horse
           same group (shapes, animals, things...);
           plural stays plural
relation   a spatial relation becomes its opposite         a circle left of a square
                                                           -> a circle right of a square
========== =============================================== ==========================================

    rng = random.Random(0)
    perturb_caption("a photo of a red circle", rng)                  # e.g. "a photo of a green circle"
    perturb_caption("a photo of a red circle", rng, kinds=["count"])  # e.g. "a photo of three red circles"

The kind is drawn uniformly among the requested kinds that apply, then the site and the
replacement uniformly. ``None`` means no rule applies (no known colour, count, object or relation).
The word lists are module constants; ``vocab`` overrides them per call: ``{"colour": [...],
"count": [1, 2, 3], "object": [...] (one group), "relation": {phrase: opposite}}``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

KINDS: tuple[str, ...] = ("colour", "count", "object", "relation")
_ALIASES = {"color": "colour", "colours": "colour", "colors": "colour", "counts": "count", "objects": "object",
            "relations": "relation", "position": "relation", "spatial": "relation"}

COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
                            "gray")
_COLOUR_SYNONYMS = {"grey": "gray"}

# object groups: a replacement comes from the group of the word it replaces; irregular plurals listed
OBJECT_GROUPS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "rectangle", "star", "disc", "dot", "box", "heart", "diamond"),
    "animal": ("cat", "dog", "horse", "bird", "cow", "sheep", "elephant", "bear", "zebra", "giraffe", "mouse",
               "rabbit", "fish"),
    "vehicle": ("car", "bus", "truck", "bicycle", "motorcycle", "train", "boat", "airplane"),
    "food": ("apple", "banana", "pizza", "cake", "sandwich", "donut", "carrot"),
    "thing": ("chair", "table", "cup", "bottle", "book", "clock", "vase", "umbrella", "bowl", "laptop", "couch",
              "bench", "backpack", "suitcase", "ball", "hat", "lamp"),
    "person": ("person", "man", "woman", "child"),
}
IRREGULAR_PLURALS: dict[str, str] = {"box": "boxes", "bus": "buses", "sheep": "sheep", "fish": "fish",
                                     "mouse": "mice", "person": "people", "man": "men", "woman": "women",
                                     "child": "children", "sandwich": "sandwiches", "couch": "couches",
                                     "bench": "benches", "knife": "knives"}

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_COUNT = 10

# each relation and its opposite (multi-word phrases are matched as a unit)
RELATIONS: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above",
                             "on top of": "under", "under": "on top of", "over": "under",
                             "in front of": "behind", "behind": "in front of", "inside": "outside",
                             "outside": "inside"}

_WORD = re.compile(r"[A-Za-z]+|\d+")


@dataclass(frozen=True)
class Perturbation:
    """One candidate edit: replace ``caption[start:end]`` by ``replacement``; ``text`` is the result."""

    kind: str
    start: int
    end: int
    replacement: str
    text: str


def plural(noun: str) -> str:
    """The plural of a lexicon noun (irregular table, else ``+es`` after s/x/ch/sh, else ``+s``)."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _match_case(word: str, like: str) -> str:
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def _normalise_kinds(kinds: Sequence[str] | str) -> list[str]:
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    out = []
    for k in kinds:
        k = _ALIASES.get(k.lower(), k.lower())
        if k not in KINDS:
            raise ValueError(f"unknown perturbation kind {k!r}; choose from {KINDS}")
        if k not in out:
            out.append(k)
    if not out:
        raise ValueError("no perturbation kinds given")
    return out


class _Lexicon:
    def __init__(self, vocab: Mapping[str, Sequence[str]] | None):
        vocab = dict(vocab or {})
        unknown = set(vocab) - {"colour", "count", "object", "relation"}
        if unknown:
            raise ValueError(f"vocab may override 'colour', 'count', 'object' and 'relation', not {sorted(unknown)}")
        self.colours = tuple(vocab.get("colour", COLOURS))
        self.counts = tuple(int(n) for n in vocab.get("count", range(1, MAX_COUNT + 1)))
        if any(n < 1 for n in self.counts):
            raise ValueError(f"vocab['count'] must hold counts >= 1, got {self.counts}")
        groups = {"custom": tuple(vocab["object"])} if "object" in vocab else OBJECT_GROUPS
        self.group_of: dict[str, str] = {}  # singular -> group
        self.singular: dict[str, tuple[str, bool]] = {}  # surface form -> (singular, is_plural)
        for name, nouns in groups.items():
            for n in nouns:
                self.group_of.setdefault(n, name)
                self.singular.setdefault(n, (n, False))
                self.singular.setdefault(plural(n), (n, True))
        self.groups = groups
        if "relation" in vocab:
            rel = vocab["relation"]
            self.relations = dict(rel) if isinstance(rel, Mapping) else {r: o for r, o in zip(rel[::2], rel[1::2])}
        else:
            self.relations = RELATIONS


def _words(caption: str) -> list[tuple[str, int, int]]:
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(caption)]


def _count_of(word: str) -> int | None:
    w = word.lower()
    if w in ("a", "an"):
        return 1
    if w in NUMBER_WORDS:
        return NUMBER_WORDS.index(w)
    if w.isdigit():
        return int(w)
    return None


def _count_word(n: int, digits: bool, next_word: str) -> str:
    if digits:
        return str(n)
    if n == 1:
        return "an" if next_word[:1].lower() in "aeiou" else "a"
    return NUMBER_WORDS[n]


def perturbations(caption: str, kinds: Sequence[str] | str = KINDS,
                  vocab: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[list[Perturbation]]]:
    """Every possible edit of ``caption``: ``{kind: [sites]}``, each site a list of alternative edits
    (one per replacement). Kinds with no site are left out."""
    lex = _Lexicon(vocab)
    words = _words(caption)
    lower = caption.lower()
    out: dict[str, list[list[Perturbation]]] = {}

    def edit(kind: str, start: int, end: int, replacement: str) -> Perturbation:
        # keep "a"/"an" before the edit in agreement with the new word ("a red" -> "an orange")
        article = re.search(r"\b(an?)(\s+)$", caption[:start], flags=re.IGNORECASE)
        if article:
            a = _match_case("an" if replacement[:1].lower() in "aeiou" else "a", article.group(1))
            start = article.start(1)
            replacement = a + article.group(2) + replacement
        return Perturbation(kind, start, end, replacement, caption[:start] + replacement + caption[end:])

    for kind in _normalise_kinds(kinds):
        sites: list[list[Perturbation]] = []
        if kind == "colour":
            for w, s, e in words:
                c = _COLOUR_SYNONYMS.get(w.lower(), w.lower())
                if c in lex.colours:
                    sites.append([edit(kind, s, e, _match_case(o, w)) for o in lex.colours if o != c])
        elif kind == "object":
            for w, s, e in words:
                if w.lower() not in lex.singular:
                    continue
                noun, is_plural = lex.singular[w.lower()]
                others = [o for o in lex.groups[lex.group_of[noun]] if o != noun]
                sites.append([edit(kind, s, e, _match_case(plural(o) if is_plural else o, w)) for o in others])
        elif kind == "count":
            for i, (w, s, e) in enumerate(words):
                n = _count_of(w)
                if n is None:
                    continue
                # the counted object: the first lexicon noun within two words (skipping e.g. a colour)
                j = next((k for k in range(i + 1, min(i + 4, len(words))) if words[k][0].lower() in lex.singular),
                         None)
                if j is None or any(_count_of(words[k][0]) is not None for k in range(i + 1, j)):
                    continue
                noun_word, ns, ne = words[j]
                noun = lex.singular[noun_word.lower()][0]
                alts = []
                for m in lex.counts:
                    if m == n or (m >= len(NUMBER_WORDS) and not w.isdigit()):
                        continue
                    between = caption[e:ns]
                    first_next = words[i + 1][0] if i + 1 < j else noun_word
                    new_count = _match_case(_count_word(m, w.isdigit(), first_next), w)
                    new_noun = _match_case(noun if m == 1 else plural(noun), noun_word)
                    alts.append(edit(kind, s, ne, new_count + between + new_noun))
                sites.append(alts)
        else:  # relation: longest phrases first, non-overlapping
            taken: list[tuple[int, int]] = []
            for phrase in sorted(lex.relations, key=len, reverse=True):
                for m in re.finditer(rf"\b{re.escape(phrase)}\b", lower):
                    if any(m.start() < b and a < m.end() for a, b in taken):
                        continue
                    taken.append((m.start(), m.end()))
                    original = caption[m.start():m.end()]
                    sites.append([edit(kind, m.start(), m.end(), _match_case(lex.relations[phrase], original))])
            sites.sort(key=lambda alts: alts[0].start)
        if sites:
            out[kind] = sites
    return out


def perturb_caption(caption: str, rng: random.Random, kinds: Sequence[str] | str = KINDS,
                    vocab: Mapping[str, Sequence[str]] | None = None) -> str | None:
    """``caption`` with one rule-based edit of one of ``kinds`` (module docstring), or ``None`` when no
    rule applies. ``rng`` (a ``random.Random``) makes the choice: kind, then site, then replacement."""
    found = perturbations(caption, kinds, vocab)
    if not found:
        return None
    kind = rng.choice(sorted(found, key=KINDS.index))
    site = rng.choice(found[kind])
    return rng.choice(site).text


__all__ = [
    "COLOURS",
    "KINDS",
    "OBJECT_GROUPS",
    "RELATIONS",
    "Perturbation",
    "perturb_caption",
    "perturbations",
    "plural",
]
