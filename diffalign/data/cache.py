"""On-disk cache of VAE latents and text embeddings (safetensors shards keyed by content).

After the first pass over the data a training step runs no VAE encoder and no text encoder.
Layout: ``ROOT/NAMESPACE/shard-<id>.safetensors``, each with its index file ``shard-<id>.json``
(the list of tensor names it holds). Both are written through a temp file and a rename, the index
last, so a reader never sees half a shard and several processes can add shards at once; reopening
reads the indexes. ``NAMESPACE`` must change whenever the encoders, resolution or dtype change (the
caller derives it from the model id, resolution and dtype).

Keys are content keys (``PreferencePair.key`` plus whatever else changes the pixels, e.g. crop and
flip): the same image bytes in another row or file hit the same entry.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffalign.data.files import atomic_write
from diffalign.data.pairs import content_key


class LatentCache:
    """Latents (one tensor per key) and text embeddings (a dict of tensors per prompt) on disk.

    ``hits`` / ``misses`` count lookups (for ``diffalign bench``); at most ``max_loaded_shards`` shards
    are kept in memory (least recently used dropped first).
    """

    def __init__(self, root: str | Path, namespace: str, *, max_loaded_shards: int = 256):
        if not namespace or "/" in namespace or namespace in (".", ".."):
            raise ValueError(f"namespace must be a plain non-empty name, got {namespace!r}")
        self.dir = Path(root) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_loaded_shards = max_loaded_shards
        self.index: dict[str, str] = {}  # tensor name -> shard file name
        self._loaded: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._fields: dict[str, set[str]] = {}  # "text:<hash>/" -> its tensor names
        self._shards: set[str] = set()  # shard files already indexed
        self.hits = self.misses = 0
        self.refresh()

    def refresh(self) -> None:
        """Pick up shards written since opening (e.g. by other processes)."""
        for meta in sorted(self.dir.glob("shard-*.json")):
            shard = meta.with_suffix(".safetensors").name
            if shard in self._shards or not (self.dir / shard).exists():
                continue
            try:
                names = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # unreadable index: treat its entries as misses
            self._add(names, shard)

    def _add(self, names: list[str], shard: str) -> None:
        self._shards.add(shard)
        for n in names:
            self.index[n] = shard
            if n.startswith("text:"):
                self._fields.setdefault(n[: n.index("/") + 1], set()).add(n)

    def __len__(self) -> int:
        return len(self.index)

    def stats(self) -> dict[str, int | float]:
        """Lookup counters and size, for reports."""
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "entries": len(self.index), "shards": len(set(self.index.values()))}

    # ---- generic tensors
    def _shard(self, shard: str) -> dict[str, torch.Tensor] | None:
        """A shard's tensors; ``None`` (with a warning, once) for a shard that cannot be read: its entries
        are dropped from the index and become misses, encoded again, and its index file is removed (the
        shard file is left for inspection, never read again)."""
        if shard in self._loaded:
            self._loaded.move_to_end(shard)
        else:
            try:
                self._loaded[shard] = load_file(self.dir / shard)
            except Exception as e:  # truncated or corrupt file: safetensors raises several types
                import warnings

                warnings.warn(f"latent cache: {self.dir / shard} is unreadable ({type(e).__name__}: {e}); its "
                              "entries are treated as misses and encoded again", stacklevel=3)
                # shards are renamed into place whole, so this one will never read: unindex it for good, or a
                # later opening could index it over the shard its entries are encoded into again
                (self.dir / shard).with_suffix(".json").unlink(missing_ok=True)
                for name in [n for n, sh in self.index.items() if sh == shard]:
                    del self.index[name]
                    if name.startswith("text:"):
                        self._fields.get(name[: name.index("/") + 1], set()).discard(name)
                return None
            while len(self._loaded) > self.max_loaded_shards:
                self._loaded.popitem(last=False)
        return self._loaded[shard]

    def _get(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            shard = self.index.get(name)
            if shard is not None:
                tensors = self._shard(shard)
                if tensors is not None and name in tensors:
                    out[name] = tensors[name]
        return out

    def has_latent(self, key: str) -> bool:
        """Whether ``key``'s latent is indexed (no shard is read)."""
        return "latent:" + content_key(key) in self.index

    def has_text(self, prompt: str) -> bool:
        """Whether ``prompt``'s embeddings are indexed (no shard is read)."""
        return bool(self._fields.get("text:" + content_key(prompt) + "/"))

    def _put(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v for k, v in tensors.items() if k not in self.index}
        if not tensors:
            return
        sid = uuid.uuid4().hex[:16]
        shard, meta = self.dir / f"shard-{sid}.safetensors", self.dir / f"shard-{sid}.json"
        data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}  # no shared storage
        names = sorted(data)
        atomic_write(shard, lambda p: save_file(data, str(p)))
        atomic_write(meta, lambda p: p.write_text(json.dumps(names)))
        self._loaded[shard.name] = data
        self._add(names, shard.name)

    # ---- latents: one tensor per key
    def get_latents(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Cached latents ``{key: [C, h, w]}`` for the keys that are present (others are misses)."""
        names = {k: "latent:" + content_key(k) for k in keys}
        found = self._get(list(names.values()))
        out = {k: found[n] for k, n in names.items() if n in found}
        self.hits += len(out)
        self.misses += len(keys) - len(out)
        return out

    def put_latents(self, items: dict[str, torch.Tensor]) -> None:
        """Store ``{key: latent}`` (keys already present are left as they are)."""
        self._put({"latent:" + content_key(k): v for k, v in items.items()})

    # ---- text: a dict of tensors per prompt
    def get_text(self, prompts: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Cached embeddings ``{prompt: {field: tensor}}`` for the prompts that are present."""
        out = {}
        for p in prompts:
            base = "text:" + content_key(p) + "/"
            fields = sorted(self._fields.get(base, ()))
            if fields:
                got = self._get(fields)
                if len(got) == len(fields):  # all of them, or a miss (a field in an unreadable shard)
                    out[p] = {n[len(base):]: t for n, t in got.items()}
        self.hits += len(out)
        self.misses += len(prompts) - len(out)
        return out

    def put_text(self, items: dict[str, dict[str, torch.Tensor]]) -> None:
        """Store ``{prompt: {field: tensor}}`` (e.g. ``prompt_embeds``, ``pooled_prompt_embeds``)."""
        self._put({"text:" + content_key(p) + "/" + f: t for p, d in items.items() for f, t in d.items()})


# The dataset and collate live in diffalign.data.dataset; importable from here too.
from diffalign.data.dataset import PreferenceDataset, collate_pairs  # noqa: E402,F401
