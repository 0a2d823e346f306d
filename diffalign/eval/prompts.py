"""Benchmark prompt sets as data: one :class:`PromptItem` per prompt, from the upstream files.

Nothing is vendored. :func:`load_prompt_set` reads a local copy (``path=``: the file, or a folder
holding it under its upstream or cache name) or downloads the upstream file once into a cache
(``$DIFFALIGN_CACHE/benchmarks`` or ``~/.cache/diffalign/benchmarks``). Every file is pinned to a
commit URL and a sha256; a file whose hash differs is refused (``verify=False`` reads it anyway).

Sets (prompt count; category; metadata; upstream and licence):

- ``geneval``: 553; task tag; the whole ``evaluation_metadata.jsonl`` line. djghosh13/geneval (MIT).
- ``t2i-compbench``: 8 × 300 ``*_val.txt``; the category of the file; index.
  Karine-Huang/T2I-CompBench (MIT).
- ``partiprompts``: 1632; Category; Challenge, Note. google-research/parti (Apache-2.0).
- ``drawbench``: 200; Category (upstream's trailing spaces stripped). The CSV copy in
  apple/ml-diffusion-alignment-gflownet; no licence upstream, so download only.
- ``hpdv2``: 4 styles × 800 (anime, concept-art, paintings, photo); style; index (duplicates kept,
  the benchmark scores all 800). The copy in apple/ml-diffusion-alignment-gflownet of HPDv2
  (Apache-2.0).
- ``imagereward``: 100; none; id. THUDM/ImageReward ``benchmark-prompts.json`` (Apache-2.0).
- ``ddpo-simple-animals``: 45; none. kvablack/ddpo-pytorch (MIT).
- ``pickapic-test``: the 500 unique captions of ``split``; none. Hub dataset
  ``yuvalkirstain/pickapic_v2_no_images`` (needs ``datasets``; no licence stated, download only).
- ``shapes``: 6 tasks × ``n_per_task``; task; GenEval-format metadata.
  :func:`diffalign.shapes.grammar.prompt_set` (held-out split).
- ``file``: your own prompts (``path=``): ``.txt``, one prompt per line; or ``.jsonl``, one object
  per line with ``prompt`` and optional ``category`` (GenEval metadata lines work as they are).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PromptItem:
    """One benchmark prompt: its ``text``, a ``category`` for per-category tables (or ``None``) and
    the benchmark's own fields in ``metadata`` (for GenEval, the whole metadata line)."""

    text: str
    category: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RemoteFile:
    """An upstream file pinned by commit URL and sha256. ``name`` is its path in the cache (and the
    name looked for in a local folder, along with the upstream file name)."""

    name: str
    url: str
    sha256: str

    @property
    def upstream_name(self) -> str:
        return urllib.request.url2pathname(self.url.rsplit("/", 1)[-1])


class ChecksumError(ValueError):
    """A benchmark file is not the pinned upstream version."""


def _gh(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{urllib.request.pathname2url(path)}"


_GENEVAL = ("djghosh13/geneval", "af4902f24d3ca90ebbb446dd9891a59e0f82725f")
_COMPBENCH = ("Karine-Huang/T2I-CompBench", "1b7094991a57f3c22abdd4f6e8ba6c1a15517073")
_PARTI = ("google-research/parti", "5a657978134374ce28973948331b319adef164bd")
_GFN = ("apple/ml-diffusion-alignment-gflownet", "12c59520669b195e919540b940a510cef6f46ae7")
_IMAGEREWARD = ("THUDM/ImageReward", "c1392c6dd0fd6ecd6d416c96959ab744a6d0a8fb")
_DDPO = ("kvablack/ddpo-pytorch", "1958463f020112c9a7bc85768d296daacc2e1b4b")

COMPBENCH_CATEGORIES: tuple[str, ...] = ("color", "shape", "texture", "spatial", "non_spatial", "complex",
                                         "numeracy", "3d_spatial")
HPDV2_STYLES: tuple[str, ...] = ("anime", "concept-art", "paintings", "photo")
PICKAPIC_ID = "yuvalkirstain/pickapic_v2_no_images"

FILES: dict[str, RemoteFile] = {
    "geneval": RemoteFile("geneval_evaluation_metadata.jsonl",
                          _gh(*_GENEVAL, "prompts/evaluation_metadata.jsonl"),
                          "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"),
    "geneval-object-names": RemoteFile("geneval_object_names.txt", _gh(*_GENEVAL, "prompts/object_names.txt"),
                                       "608f6a0e5c8ca1c7a92b818430141fe268c85b7930b50f4160f1d65893b5bacd"),
    "partiprompts": RemoteFile("PartiPrompts.tsv", _gh(*_PARTI, "PartiPrompts.tsv"),
                               "fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb"),
    "drawbench": RemoteFile("DrawBench_Prompts.csv", _gh(*_GFN, "alignment/assets/DrawBench Prompts.csv"),
                            "b6d99b3151798b34f2ac3604d3701f66d66927b9e0f55785f3e1d7fdbc1f5fea"),
    "imagereward": RemoteFile("imagereward_benchmark_prompts.json",
                              _gh(*_IMAGEREWARD, "benchmark/benchmark-prompts.json"),
                              "34682e824ebb3ad8e2531b3cde1b362dc72e1e29946ff6fab77bb49e9edb4b21"),
    "ddpo-simple-animals": RemoteFile("ddpo_simple_animals.txt", _gh(*_DDPO, "ddpo_pytorch/assets/simple_animals.txt"),
                                      "ee3d9b638ce2a40e896a34319af85709d3c1c3188da0b8feda739dcb7363188d"),
}
_COMPBENCH_SHA = {
    "color": "1634259756dbc77d13093d907d414480080ec9790a8c97ad09efaea7b2534f2d",
    "shape": "37e1a276906c7ea9516cbd7ac8501be896006c0c17ca7344f260562834455bae",
    "texture": "fbb5363515b4a28009e360afaaaf389d2dd2289e50dbb0c6ef4ea0c7fe4f3d4f",
    "spatial": "8707a1d7e42ce3002d95363cf55f74bd043c843ae27108f5125aaaa7840ca988",
    "non_spatial": "04c56cc9ac441dc9ea6c5157652058bd1635b5308526dd31bb29a1caab9a758d",
    "complex": "1b808018b8d9916db3d47d5aa2ef18377a3549a56901a474156f799824cdf3b4",
    "numeracy": "dad8df141604b70ba7554bec724e3db0a80023680769b5c514854ea2d2527bbe",
    "3d_spatial": "c9953597315f36a5fcb41291bb19bdc6ab5f64a0fa760d691b4854a73f5d1fe9",
}
_HPDV2_SHA = {
    "anime": "6b38a479cc6f899866e9b7a8bf91f096b4afc6883b95275a61891327182b14ae",
    "concept-art": "530d057deafcb82c581e9d1be2ffcb98828fe99f0b54257414d2ab8a5cf2b83e",
    "paintings": "6570d39467e08b24b64e5b8a4177b0f61c525631121dc5a91fe2ab956eab4d5f",
    "photo": "92a3c9a0f743f66eb87bd112cdda830d6bdb4c073c86021d53b74001fcb18052",
}
FILES.update({f"t2i-compbench/{c}": RemoteFile(f"t2i_compbench/{c}_val.txt",
                                               _gh(*_COMPBENCH, f"examples/dataset/{c}_val.txt"), sha)
              for c, sha in _COMPBENCH_SHA.items()})
FILES.update({f"hpdv2/{s}": RemoteFile(f"hpdv2_benchmark_{s}.json",
                                       _gh(*_GFN, f"alignment/assets/HPDv2/benchmark_{s}.json"), sha)
              for s, sha in _HPDV2_SHA.items()})


def default_cache_dir() -> Path:
    """``$DIFFALIGN_CACHE/benchmarks``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/diffalign/benchmarks``."""
    base = os.environ.get("DIFFALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "diffalign")
    return Path(base) / "benchmarks"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(data: bytes, expected: str, where: str) -> None:
    """Raise :class:`ChecksumError` naming ``where`` and both hashes unless ``data`` hashes to ``expected``."""
    got = sha256_of(data)
    if got != expected:
        raise ChecksumError(f"{where}: sha256 {got} does not match the pinned {expected}; the file is not the "
                            "upstream version this benchmark is pinned to (pass verify=False to read it anyway)")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_file(remote: RemoteFile, cache_dir: str | os.PathLike | None = None, *, timeout: float = 60.0) -> Path:
    """The cached copy of ``remote``, downloaded (and checksummed, and written atomically) if absent
    or corrupt. Nothing is written when the download fails or its hash is wrong."""
    target = Path(cache_dir or default_cache_dir()) / remote.name
    if target.is_file() and sha256_of(target.read_bytes()) == remote.sha256:
        return target
    try:
        with urllib.request.urlopen(remote.url, timeout=timeout) as r:
            data = r.read()
    except OSError as e:
        raise ConnectionError(f"could not download {remote.url} ({type(e).__name__}: {e}). Offline, download it "
                              f"elsewhere and pass path= (the file, or a folder holding {remote.upstream_name!r} "
                              f"or {remote.name!r})") from e
    check_sha256(data, remote.sha256, remote.url)
    _atomic_write(target, data)
    return target


def _local_file(path: Path, remote: RemoteFile) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / remote.name, path / Path(remote.name).name, path / remote.upstream_name):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{path}: no {remote.name!r} or {remote.upstream_name!r} in this folder "
                                f"(upstream: {remote.url})")
    raise FileNotFoundError(f"{path}: no such file or folder (upstream: {remote.url})")


def read_benchmark_file(key: str, path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                        verify: bool = True) -> tuple[str, str]:
    """``(text, where)`` of the pinned file ``FILES[key]``: from ``path`` if given, else downloaded."""
    remote = FILES[key]
    if path is None:
        file = fetch_file(remote, cache_dir)
    else:
        file = _local_file(Path(path), remote)
    data = file.read_bytes()
    if verify:
        check_sha256(data, remote.sha256, str(file))
    return data.decode("utf-8"), str(file)


# ---- parsers: text of one file -> items

def _geneval(text: str, where: str) -> list[PromptItem]:
    items = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
            items.append(PromptItem(meta["prompt"], meta["tag"], meta))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{where}, line {i}: not a GenEval metadata line ({type(e).__name__}: {e})") from e
    return items


def _partiprompts(text: str, where: str) -> list[PromptItem]:
    lines = text.splitlines()
    header = lines[0].split("\t") if lines else []
    if header[:3] != ["Prompt", "Category", "Challenge"]:
        raise ValueError(f"{where}, line 1: expected the header Prompt/Category/Challenge/Note, got {header}")
    items = []
    for i, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = dict(zip(header, line.split("\t")))
        if not fields.get("Prompt") or not fields.get("Category"):
            raise ValueError(f"{where}, line {i}: missing field Prompt or Category")
        items.append(PromptItem(fields["Prompt"], fields["Category"],
                                {"Challenge": fields.get("Challenge", ""), "Note": fields.get("Note", "")}))
    return items


def _drawbench(text: str, where: str) -> list[PromptItem]:
    items = []
    for i, row in enumerate(csv.DictReader(io.StringIO(text)), 2):
        if not row.get("Prompts") or row.get("Category") is None:
            raise ValueError(f"{where}, row {i}: missing field Prompts or Category")
        items.append(PromptItem(row["Prompts"], row["Category"].strip()))
    return items


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _json_list(text: str, where: str) -> list:
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a JSON list, got {type(data).__name__}")
    return data


def _imagereward(text: str, where: str) -> list[PromptItem]:
    items = []
    for i, row in enumerate(_json_list(text, where)):
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"{where}, entry {i}: expected an object with a 'prompt' field")
        items.append(PromptItem(row["prompt"], None, {"id": row.get("id")}))
    return items


def _one_file(key: str, parse: Callable[[str, str], list[PromptItem]]):
    def load(path=None, cache_dir=None, verify=True) -> list[PromptItem]:
        return parse(*read_benchmark_file(key, path, cache_dir, verify))
    return load


def _t2i_compbench(path=None, cache_dir=None, verify=True) -> list[PromptItem]:
    items = []
    for c in COMPBENCH_CATEGORIES:
        text, _ = read_benchmark_file(f"t2i-compbench/{c}", path, cache_dir, verify)
        items.extend(PromptItem(t, c, {"index": i}) for i, t in enumerate(_lines(text)))
    return items


def _hpdv2(path=None, cache_dir=None, verify=True) -> list[PromptItem]:
    items = []
    for s in HPDV2_STYLES:
        text, where = read_benchmark_file(f"hpdv2/{s}", path, cache_dir, verify)
        prompts = _json_list(text, where)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{where}: expected a JSON list of strings")
        items.extend(PromptItem(p, s, {"index": i}) for i, p in enumerate(prompts))
    return items


def _pickapic(path=None, cache_dir=None, verify=True, split: str = "test_unique") -> list[PromptItem]:
    """Unique captions of Pick-a-Pic v2 ``split`` (``test_unique`` or ``validation_unique``), in first
    -seen order, from the hub (needs ``datasets``) or a local parquet file / folder / text file."""
    if path is not None:
        captions = _local_captions(Path(path), split)
    else:
        captions = _hub_captions(split)
    seen: dict[str, None] = {}
    for c in captions:
        if c and c not in seen:
            seen[c] = None
    return [PromptItem(c, None, {"split": split}) for c in seen]


def _local_captions(path: Path, split: str) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.name.startswith(f"{split}-") or p.stem == split)
        if not files:
            raise FileNotFoundError(f"{path}: no {split}-*.parquet file in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    captions: list[str] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(f)
            if "caption" not in table.column_names:
                raise ValueError(f"{f}: no 'caption' column (columns: {table.column_names})")
            captions.extend(table.column("caption").to_pylist())
        else:
            captions.extend(_lines(f.read_text(encoding="utf-8")))
    return captions


def _hub_captions(split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        datasets = None
    if not hasattr(datasets, "load_dataset"):
        raise ImportError(f"the pickapic-test prompts come from the hub dataset {PICKAPIC_ID!r}, which needs the "
                          "`datasets` package (pip install 'diffalign[hub]'), or pass path= to its "
                          f"{split}-*.parquet file")
    try:
        ds = datasets.load_dataset(PICKAPIC_ID, split=split, streaming=True)
        return [row["caption"] for row in ds]
    except Exception as e:
        raise ConnectionError(f"could not read {PICKAPIC_ID!r} split {split!r} from the hub ({type(e).__name__}: {e})."
                              f" Offline, download data/{split}-*.parquet of that dataset elsewhere and pass "
                              "path= (the file or its folder)") from e


def _shapes(path=None, cache_dir=None, verify=True, n_per_task: int = 50, seed: int = 0,
            split: str = "heldout") -> list[PromptItem]:
    """``n_per_task`` prompts of each Shapes task from ``split``, with GenEval-format metadata."""
    if path is not None:
        raise ValueError("the shapes prompt set is generated by diffalign.shapes.grammar; it takes no path")
    from diffalign.shapes.grammar import prompt_set

    return [PromptItem(p.text, p.task, p.metadata()) for p in prompt_set(split, n_per_task, seed=seed)]


def load_prompt_file(path=None, cache_dir=None, verify=True) -> list[PromptItem]:
    """Prompts of a local ``.txt`` (one per line) or ``.jsonl`` file (``prompt``, optional ``category``
    or GenEval's ``tag``; the whole line is the metadata)."""
    if path is None:
        raise ValueError("the 'file' prompt set needs path= (a .txt or .jsonl file)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [PromptItem(t) for t in _lines(text)]
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: a prompt file must be .txt or .jsonl; for a benchmark's own file name its set, "
                         f"e.g. --prompts partiprompts:{path.name} (sets: {', '.join(LOADERS)})")
    items = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {i}: expected a JSON object with a 'prompt' field "
                             f"({type(e).__name__}: {e})") from e
        category = row.get("category", row.get("tag"))
        items.append(PromptItem(str(prompt), None if category is None else str(category), row))
    return items


LOADERS: dict[str, Callable[..., list[PromptItem]]] = {
    "geneval": _one_file("geneval", _geneval),
    "t2i-compbench": _t2i_compbench,
    "partiprompts": _one_file("partiprompts", _partiprompts),
    "drawbench": _one_file("drawbench", _drawbench),
    "hpdv2": _hpdv2,
    "imagereward": _one_file("imagereward", _imagereward),
    "ddpo-simple-animals": _one_file("ddpo-simple-animals",
                                     lambda text, where: [PromptItem(t) for t in _lines(text)]),
    "pickapic-test": _pickapic,
    "shapes": _shapes,
    "file": load_prompt_file,
}
PROMPT_SETS: tuple[str, ...] = tuple(LOADERS)


def load_prompt_set(name: str, path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                    *, verify: bool = True, **options) -> list[PromptItem]:
    """The prompts of benchmark ``name`` (one of :data:`PROMPT_SETS`), in upstream order.

    ``path``: a local copy (the file, or a folder holding the file(s) under their upstream or cache
    names); otherwise each file is downloaded from its pinned URL into ``cache_dir``. ``verify``
    checks each file's sha256 against the pin. ``options``: ``split`` for ``pickapic-test``
    (``test_unique`` or ``validation_unique``); ``n_per_task``, ``seed``, ``split`` for ``shapes``.
    """
    if name not in LOADERS:
        raise KeyError(f"unknown prompt set {name!r}; known: {', '.join(PROMPT_SETS)}")
    return LOADERS[name](path=path, cache_dir=cache_dir, verify=verify, **options)


def prompts_fields(value: str) -> dict[str, str | None]:
    """``--prompts`` (or an on-line method's ``prompts``) → ``{"name": ..., "path": ...}``: a set name,
    ``NAME:PATH``, or a prompt file."""
    if value in PROMPT_SETS:
        return {"name": value, "path": None}
    name, sep, path = value.partition(":")
    if sep and name in PROMPT_SETS:
        return {"name": name, "path": path}
    if Path(value).suffix in (".txt", ".jsonl"):
        return {"name": "file", "path": value}
    raise ValueError(f"--prompts {value!r}: not a prompt set ({', '.join(PROMPT_SETS)}), NAME:PATH, or a .txt/.jsonl "
                     "file of prompts")


def geneval_object_names(path: str | os.PathLike | None = None,
                         cache_dir: str | os.PathLike | None = None) -> list[str]:
    """GenEval's 80 COCO class names (``object_names.txt``), in detector-index order."""
    return _lines(read_benchmark_file("geneval-object-names", path, cache_dir)[0])
