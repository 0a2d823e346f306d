"""On-disk cache of VAE latents and text embeddings (safetensors shards keyed by content).

After the first pass over the data a training step runs no VAE encoder and no text encoder.
Layout: ``ROOT/NAMESPACE/shard-<id>.safetensors`` with a ``shard-<id>.json`` list of its keys,
each written through a temp file and a rename (a reader never sees half a shard; several
processes can add shards at once). ``NAMESPACE`` must change whenever the encoders, resolution or
dtype change (the trainer derives it from the model id, resolution and dtype).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffalign.data.pairs import content_key


class LatentCache:
    def __init__(self, root: str | Path, namespace: str):
        self.dir = Path(root) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, str] = {}  # key -> shard file name
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}
        self._fields: dict[str, list[str]] = {}  # "text:<hash>/" -> its tensor names
        self.hits = self.misses = 0
        for meta in sorted(self.dir.glob("shard-*.json")):
            shard = meta.with_suffix(".safetensors").name
            if (self.dir / shard).exists():
                self._add(json.loads(meta.read_text()), shard)

    def _add(self, names, shard: str) -> None:
        for n in names:
            self.index[n] = shard
            if n.startswith("text:"):
                self._fields.setdefault(n[: n.index("/") + 1], []).append(n)

    def __len__(self) -> int:
        return len(self.index)

    # ---- generic tensors
    def _get(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            shard = self.index.get(name)
            if shard is None:
                continue
            if shard not in self._loaded:
                self._loaded[shard] = load_file(self.dir / shard)
            out[name] = self._loaded[shard][name]
        return out

    def _put(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        sid = uuid.uuid4().hex[:12]
        shard, meta = self.dir / f"shard-{sid}.safetensors", self.dir / f"shard-{sid}.json"
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(data, str(shard) + ".tmp")
        os.replace(str(shard) + ".tmp", shard)
        meta.with_suffix(".json.tmp").write_text(json.dumps(sorted(data)))
        os.replace(meta.with_suffix(".json.tmp"), meta)
        self._loaded[shard.name] = data
        self._add(sorted(data), shard.name)

    # ---- latents: one tensor per key
    def get_latents(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Cached latents ``{key: [C, h, w]}`` for the keys that are present."""
        names = {k: "latent:" + content_key(k) for k in keys}
        found = self._get(list(names.values()))
        out = {k: found[n] for k, n in names.items() if n in found}
        self.hits += len(out)
        self.misses += len(keys) - len(out)
        return out

    def put_latents(self, items: dict[str, torch.Tensor]) -> None:
        self._put({"latent:" + content_key(k): v for k, v in items.items()})

    # ---- text: a dict of tensors per prompt
    def get_text(self, prompts: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Cached embeddings ``{prompt: {field: tensor}}`` for the prompts that are present."""
        out = {}
        for p in prompts:
            base = "text:" + content_key(p) + "/"
            fields = self._fields.get(base, [])
            if fields:
                out[p] = {n[len(base):]: t for n, t in self._get(fields).items()}
        self.hits += len(out)
        self.misses += len(prompts) - len(out)
        return out

    def put_text(self, items: dict[str, dict[str, torch.Tensor]]) -> None:
        self._put({"text:" + content_key(p) + "/" + f: t for p, d in items.items() for f, t in d.items()})
