"""User preference embeddings for PPD, from a few of each user's pairwise examples and a frozen encoder.

    diffalign data user-embeddings PAIRS.parquet users.safetensors --encoder pickscore --examples 4

For user ``u`` with first ``K`` untied pairs ``(c_j, x_w^j, x_l^j)`` in data order (Pick-a-Pic's
``user_id``), the embedding is the mean preference direction in the frozen encoder's image space::

    e_u = (1/K)·Σ_j [f(x_w^j) − f(x_l^j)]      [E]

with ``f`` the encoder's L2-normalised image features (a CLIP-type reward's ``encode_image``: PickScore on
Pick-a-Pic, the bundled Shapes CLIP on Shapes). The paper takes a VLM's hidden states over the ``K``
examples instead (docs/methods/ppd.md). Pairs without a user id are skipped; a user with fewer than ``K``
pairs is embedded from those it has.

The file is safetensors: ``embeddings`` ``[U, E]`` float32, with metadata ``user_ids`` (a JSON list, row
order), ``encoder`` and ``examples``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.data.files import atomic_write
from diffalign.data.pairs import PreferencePair


@dataclass
class UserEmbeddings:
    """User ids and their embeddings ``[U, E]`` (row ``i`` is ``ids[i]``)."""

    ids: list[str]
    embeddings: torch.Tensor
    encoder: str = ""
    examples: int = 0

    def index(self, users: Iterable[str | None]) -> torch.Tensor:
        """Row indices ``[B]`` of ``users``; an unknown or missing user is an error naming it."""
        where = {u: i for i, u in enumerate(self.ids)}
        out = []
        for u in users:
            if u not in where:
                raise ValueError(f"user {u!r} has no embedding (the file has {len(self.ids)} users, e.g. "
                               f"{self.ids[:3]}); make it with `diffalign data user-embeddings` on this data")
            out.append(where[u])
        return torch.tensor(out, dtype=torch.long)

    def lookup(self, users: Iterable[str | None]) -> torch.Tensor:
        """The embeddings ``[B, E]`` of ``users``."""
        return self.embeddings[self.index(users)]


def user_examples(pairs: Iterable[PreferencePair], per_user: int) -> dict[str, list[PreferencePair]]:
    """The first ``per_user`` pairs of each user, users in order of first appearance."""
    if per_user < 1:
        raise ValueError(f"examples per user must be >= 1, got {per_user}")
    out: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        if p.user is None:
            continue
        got = out.setdefault(p.user, [])
        if len(got) < per_user:
            got.append(p)
    return out


def _image(im):
    return im.decode() if hasattr(im, "decode") else im


def embed_users(examples: dict[str, list[PreferencePair]],
                encode_image: Callable[[list], torch.Tensor]) -> UserEmbeddings:
    """``e_u = mean_j [f(x_w^j) − f(x_l^j)]`` for every user of ``examples`` (module docstring)."""
    ids, rows = [], []
    with torch.no_grad():
        for user, pairs in examples.items():
            fw = encode_image([_image(p.chosen) for p in pairs]).float().cpu()
            fl = encode_image([_image(p.rejected) for p in pairs]).float().cpu()
            ids.append(user)
            rows.append((fw - fl).mean(0))
    if not rows:
        raise ValueError("no pairs with a user id: PPD needs the data's user_id column")
    return UserEmbeddings(ids, torch.stack(rows))


def save_user_embeddings(users: UserEmbeddings, path: str | os.PathLike) -> Path:
    """Write ``users`` as safetensors (atomically)."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(
        {"embeddings": users.embeddings.float().contiguous()}, tmp,
        metadata={"user_ids": json.dumps(users.ids), "encoder": users.encoder, "examples": str(users.examples)}))


def load_user_embeddings(path: str | os.PathLike) -> UserEmbeddings:
    """Read a file written by :func:`save_user_embeddings`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no user-embeddings file (make one with `diffalign data user-embeddings`)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if "embeddings" not in f.keys() or "user_ids" not in meta:
            raise ValueError(f"{path}: not a user-embeddings file (needs 'embeddings' and user_ids metadata)")
        emb = f.get_tensor("embeddings")
    ids = json.loads(meta["user_ids"])
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise ValueError(f"{path}: {len(ids)} user ids but embeddings of shape {list(emb.shape)}")
    return UserEmbeddings([str(u) for u in ids], emb.float(), meta.get("encoder", ""), int(meta.get("examples", 0)))


def build_user_embeddings(source: str | os.PathLike | list, out: str | os.PathLike, encoder, *,
                          per_user: int = 4, split: str = "train", encoder_name: str = "") -> UserEmbeddings:
    """Embed every user of the Pick-a-Pic data ``source`` with ``encoder`` (a reward with ``encode_image``)
    from their first ``per_user`` pairs and write the file ``out``."""
    from diffalign.data.pickapic import read_pickapic

    encode = getattr(encoder, "encode_image", None)
    if encode is None:
        raise ValueError(f"{encoder_name or encoder}: the encoder must be a CLIP-type reward (with encode_image)")
    users = embed_users(user_examples(read_pickapic(source, split=split, decode=False), per_user), encode)
    users.encoder, users.examples = encoder_name, per_user
    save_user_embeddings(users, out)
    return users
