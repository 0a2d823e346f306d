"""FiFA: automated filtering of preference data (Yang et al., ICLR 2025, arXiv 2410.10166).

    diffalign data fifa IN.parquet OUT.parquet --budget 0.2 --reward pickscore

Choose the ``K`` pairs of a Pick-a-Pic-schema set that a Diffusion-DPO run should train on. The
paper's objective, over subsets ``S`` of the set ``D`` with ``|S| = K``::

    max_S  Σ_{i∈S} m_i  +  α·Σ_{i∈S} q_i  +  γ·Ĥ(S)

* ``m_i = |r(c_i, x_w) − r(c_i, x_l)|``: the preference margin of pair ``i`` under a proxy reward ``r``
  (PickScore in the paper; any registered reward here, or the ``score_0``/``score_1`` columns);
  ``margin="signed"`` uses ``r_w − r_l`` instead (a pair the proxy thinks mislabelled scores low);
* ``q_i``: a text-quality rating of the prompt ``c_i`` (an LLM judge in the paper; here a cached
  ``{prompt: rating}`` file, optional: without one ``q = 0``);
* ``Ĥ(S)``: the Kozachenko–Leonenko k-NN entropy estimate of the prompts' text embeddings ``e_i``
  (``[N, d]``, L2-normalised, from the proxy reward's text tower or ``text_encoder``)::

      Ĥ = ψ(N) − ψ(k) + log V_d + (d/N)·Σ_i log ρ_k(i),   V_d = π^{d/2} / Γ(d/2 + 1)

  with ``ρ_k(i)`` the Euclidean distance from ``e_i`` to its k-th nearest neighbour (itself excluded).

As in the paper, the set objective is approximated by a per-pair importance score, computed once on
the whole set, and the top ``K`` pairs are kept::

    score_i = m_i + α·q_i + γ·log ρ_k(i; D)

The surrogate ``J(S) = Σ_{i∈S} score_i`` is what top-K maximises exactly; :func:`set_objective`
evaluates the paper's objective (with ``Ĥ`` of ``S`` itself) for reporting. ``ρ`` is floored at
``1e-6`` so a duplicated prompt (``ρ = 0``) gets a large negative, finite diversity term.

Ties (``label_0 = 0.5``) are never kept (Diffusion-DPO drops them). The output keeps every input
column and row as it was (in input order), adds ``score_0`` / ``score_1`` when they were computed,
and is written whole or not at all.
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

MARGINS = ("abs", "signed")
DISTANCE_FLOOR = 1e-6


@dataclass
class FifaStats:
    """What filtering saw and kept."""

    rows: int = 0
    ties: int = 0
    candidates: int = 0
    kept: int = 0
    mean_margin_all: float = float("nan")
    mean_margin_kept: float = float("nan")
    entropy_all: float = float("nan")
    entropy_kept: float = float("nan")

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        return (f"{self.rows} rows ({self.ties} ties dropped) -> kept {self.kept} of {self.candidates} pairs; "
                f"mean margin {self.mean_margin_kept:.4g} (all: {self.mean_margin_all:.4g}); prompt k-NN entropy "
                f"{self.entropy_kept:.4g} (all: {self.entropy_all:.4g})")


# ---------------------------------------------------------------------------- the objective


def budget_size(budget: float, n: int) -> int:
    """``K`` for a budget: an ``int`` is a count (at most ``n``), a ``float`` in ``(0, 1]`` a fraction of
    ``n`` rounded half up (at least 1 when ``n > 0``)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a count (int) or a fraction (float), got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"a budget count must be >= 1, got {budget}")
        return min(budget, n)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"a budget fraction must be in (0, 1], got {budget}")
    return 0 if n == 0 else min(n, max(1, math.floor(budget * n + 0.5)))


def parse_budget(text: str) -> float:
    """``"0.2"`` / ``"20%"`` → the fraction 0.2; ``"5000"`` → the count 5000."""
    text = text.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text) if any(ch in text for ch in ".eE") else int(text)
    except ValueError:
        raise ValueError(f"--budget expects a fraction (0.2, 20%) or a count (5000), got {text!r}") from None


def knn_distances(emb: torch.Tensor, k: int, *, block_entries: int = 1 << 25) -> torch.Tensor:
    """``ρ_k(i)`` ``[N]``: the Euclidean distance from row ``i`` of ``emb`` ``[N, d]`` to its k-th nearest
    other row. Exact, in blocks of rows (``block_entries`` distances at a time) on ``emb``'s device:
    O(N²·d) work, so put ``emb`` on a GPU for a set of a million pairs."""
    n = emb.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k-NN needs 1 <= k < N, got k={k}, N={n}")
    x = emb.double() if emb.device.type == "cpu" else emb.float()
    rows = max(1, block_entries // n)
    out = []
    for start in range(0, n, rows):
        d = torch.cdist(x[start:start + rows], x)
        block = torch.arange(d.shape[0], device=d.device)
        d[block, block + start] = float("inf")  # not its own neighbour
        out.append(d.kthvalue(k, dim=1).values.double().cpu())
    return torch.cat(out)


def knn_entropy(emb: torch.Tensor, k: int) -> float:
    """Kozachenko–Leonenko entropy estimate (nats) of the points ``emb`` ``[N, d]``:
    ``ψ(N) − ψ(k) + log V_d + (d/N)·Σ log ρ_k(i)``, ``V_d`` the volume of the unit d-ball."""
    n, dim = emb.shape
    rho = knn_distances(emb, k).clamp_min(DISTANCE_FLOOR)
    log_vd = (dim / 2) * math.log(math.pi) - math.lgamma(dim / 2 + 1)
    psi = torch.special.digamma(torch.tensor([float(n), float(k)], dtype=torch.float64))
    return float(psi[0] - psi[1] + log_vd + dim * rho.log().mean())


def importance_scores(margins: torch.Tensor, quality: torch.Tensor | None, emb: torch.Tensor, *,
                      alpha: float = 1.0, gamma: float = 1.0, k: int = 5) -> torch.Tensor:
    """``score_i = m_i + α·q_i + γ·log ρ_k(i)`` ``[N]`` (``margins``, ``quality``: ``[N]``; ``emb``: ``[N, d]``)."""
    score = margins.double().clone()
    if quality is not None:
        score += alpha * quality.double()
    if gamma != 0:
        score += gamma * knn_distances(emb, k).clamp_min(DISTANCE_FLOOR).log()
    return score


def select_top(scores: torch.Tensor, size: int) -> list[int]:
    """The indices of the ``size`` largest scores, in input order (ties: the earlier row first)."""
    order = sorted(range(scores.shape[0]), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:size])


def set_objective(subset: Sequence[int], margins: torch.Tensor, quality: torch.Tensor | None, emb: torch.Tensor,
                  *, alpha: float = 1.0, gamma: float = 1.0, k: int = 5) -> float:
    """The paper's objective of one subset: ``Σ_S m + α·Σ_S q + γ·Ĥ(S)`` (``Ĥ`` of the subset's
    embeddings; 0 when ``γ = 0`` or the subset has ``<= k`` points)."""
    idx = torch.as_tensor(list(subset), dtype=torch.long)
    value = float(margins.double()[idx].sum())
    if quality is not None:
        value += alpha * float(quality.double()[idx].sum())
    if gamma != 0 and len(idx) > k:
        value += gamma * knn_entropy(emb[idx], k)
    return value


def pair_margins(score_w: torch.Tensor, score_l: torch.Tensor, margin: str = "abs") -> torch.Tensor:
    """``m = |r_w − r_l|`` (``"abs"``) or ``r_w − r_l`` (``"signed"``), ``[N]``."""
    if margin not in MARGINS:
        raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
    diff = score_w.double() - score_l.double()
    return diff.abs() if margin == "abs" else diff


# ---------------------------------------------------------------------------- input


def read_quality(path: str | os.PathLike) -> dict[str, float]:
    """Cached prompt ratings: a JSON object ``{prompt: rating}`` or JSONL rows ``{"prompt", "quality"}``."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        out = {}
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                if "prompt" not in row or "quality" not in row:
                    raise ValueError(f"{path}, line {n}: expected fields 'prompt' and 'quality'")
                out[str(row["prompt"])] = float(row["quality"])
        return out
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{prompt: rating}}")
    return {str(p): float(v) for p, v in data.items()}


def _files(source: str | os.PathLike | list, split: str | None) -> list[Path]:
    from diffalign.data.pickapic import resolve_sources

    files = resolve_sources(source if isinstance(source, list) else str(source), split=split)
    if files is None:
        raise ValueError(f"{source}: a hub dataset id; download its parquet files and filter those")
    bad = [f for f in files if not f.name.endswith(".parquet")]
    if bad:
        raise ValueError(f"{bad[0]}: FiFA filters parquet files (Pick-a-Pic schema)")
    return files


def _decode(data: bytes, where: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as e:
        raise ValueError(f"{where}: undecodable image ({e})") from None


def _read_columns(files: list[Path], reward, batch_size: int):
    """Captions, labels, and per-pair proxy scores ``(score_0, score_1)`` of every row (from ``reward``
    when given, else from the rows' score columns)."""
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    captions, labels, s0, s1 = [], [], [], []
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    with tqdm(total=total, desc="fifa: scoring" if reward is not None else "fifa: reading", unit="pair") as bar:
        for f in files:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            need = ["caption", "label_0"] + (["jpg_0", "jpg_1"] if reward is not None else ["score_0", "score_1"])
            missing = [c for c in need if c not in names]
            if missing:
                hint = "" if reward is not None else " (or pass --reward to score the images)"
                raise ValueError(f"{f}: missing column(s) {missing}{hint}")
            row = 0
            for batch in pf.iter_batches(columns=need, batch_size=batch_size):
                rows = batch.to_pylist()
                for i, r in enumerate(rows):
                    if r["label_0"] not in (0, 0.5, 1):
                        raise ValueError(f"{f}: row {row + i}, field 'label_0' is {r['label_0']!r}; expected 0, "
                                         "0.5 or 1")
                    if not isinstance(r["caption"], str):
                        raise ValueError(f"{f}: row {row + i}, field 'caption' is not text")
                captions += [r["caption"] for r in rows]
                labels += [float(r["label_0"]) for r in rows]
                if reward is not None:
                    prompts = [r["caption"] for r in rows]
                    for col, out in (("jpg_0", s0), ("jpg_1", s1)):
                        images = [_decode(r[col], f"{f}: row {row + i}, {col}") for i, r in enumerate(rows)]
                        out += [float(v) for v in reward.score(images, prompts).detach().cpu()]
                else:
                    for i, r in enumerate(rows):
                        for col in ("score_0", "score_1"):
                            v = r[col]
                            if not isinstance(v, (int, float)) or not math.isfinite(v):
                                raise ValueError(f"{f}: row {row + i}, field {col!r} is {v!r}; expected a number")
                    s0 += [float(r["score_0"]) for r in rows]
                    s1 += [float(r["score_1"]) for r in rows]
                row += len(rows)
                bar.update(len(rows))
    return captions, labels, torch.tensor(s0, dtype=torch.float64), torch.tensor(s1, dtype=torch.float64)


def embed_prompts(encode: Callable[[list[str]], torch.Tensor], prompts: Sequence[str],
                  batch_size: int = 64) -> torch.Tensor:
    """L2-normalised embeddings ``[N, d]`` of ``prompts``; each distinct prompt is encoded once."""
    unique = list(dict.fromkeys(prompts))
    parts = []
    with torch.no_grad():
        for i in range(0, len(unique), batch_size):
            parts.append(encode(unique[i:i + batch_size]).detach().double().cpu())
    table = torch.cat(parts) if parts else torch.zeros(0, 1, dtype=torch.float64)
    table = table / table.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    where = {p: j for j, p in enumerate(unique)}
    return table[torch.tensor([where[p] for p in prompts], dtype=torch.long)]


def _write(files: list[Path], keep: set[int], out: Path, scores: tuple[list, list] | None,
           batch_size: int) -> None:
    """The kept rows (global indices over ``files``) with all their columns, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    writer, schema, base = None, None, 0
    try:
        for f in files:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=batch_size):
                rows = [j for j in range(batch.num_rows) if base + j in keep]
                table = pa.Table.from_batches([batch]).take(pa.array(rows, pa.int64()))
                if scores is not None:
                    for name, values in zip(("score_0", "score_1"), scores):
                        col = pa.array([values[base + j] for j in rows], pa.float64())
                        if name in table.column_names:
                            table = table.set_column(table.column_names.index(name), name, col)
                        else:
                            table = table.append_column(name, col)
                base += batch.num_rows
                if schema is None:
                    schema = table.schema
                    writer = pq.ParquetWriter(tmp, schema)
                elif table.schema != schema:
                    try:
                        table = table.cast(schema)
                    except (pa.ArrowInvalid, ValueError):
                        raise ValueError(f"{f}: its columns differ from the first file's ({schema.names})") from None
                if table.num_rows:
                    writer.write_table(table)
        if writer is None:
            raise ValueError("no rows to write")
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------- the whole step


def fifa_filter(source: str | os.PathLike | list, out: str | os.PathLike, *, budget: float,
                reward=None, text_encoder: Callable[[list[str]], torch.Tensor] | None = None,
                quality: Mapping[str, float] | None = None, alpha: float = 1.0, gamma: float = 1.0, k: int = 5,
                margin: str = "abs", batch_size: int = 16, split: str | None = "train",
                device: str | torch.device = "cpu") -> FifaStats:
    """Keep the FiFA top-``K`` pairs of ``source`` (Pick-a-Pic parquet file, glob, list, or a folder in the
    Hub's layout, of which the files of ``split`` are read) and write them to ``out``.

    ``reward``: the proxy reward (a :class:`~diffalign.rewards.base.RewardModel`) scoring both images of
    every pair; ``None`` reads the rows' ``score_0`` / ``score_1``. ``text_encoder``: prompts → ``[B, d]``
    (default: ``reward.encode_text``, the proxy's own text tower). ``quality``: ``{prompt: q}`` for every
    candidate's prompt (``None``: no quality term). ``device``: where the k-NN distances are computed.
    Formula and defaults in the module docstring.
    """
    out = Path(out)
    if out.suffix != ".parquet":
        raise ValueError(f"{out}: the filtered pairs are written as Pick-a-Pic parquet; the output must end in "
                         ".parquet")
    if margin not in MARGINS:
        raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
    files = _files(source, split)
    if any(f.resolve() == out.resolve() for f in files if out.exists()):
        raise ValueError(f"{out}: the output is one of the inputs")
    if text_encoder is None and gamma != 0:
        text_encoder = getattr(reward, "encode_text", None)
        if text_encoder is None:
            raise ValueError("the diversity term needs prompt embeddings: give a text encoder (the proxy reward "
                             "has no encode_text), or gamma=0")
    captions, labels, s0, s1 = _read_columns(files, reward, batch_size)
    stats = FifaStats(rows=len(captions))
    cand = [i for i, lab in enumerate(labels) if lab != 0.5]
    stats.ties, stats.candidates = len(captions) - len(cand), len(cand)
    if not cand:
        raise ValueError(f"{source}: no untied pairs to choose from")
    idx = torch.tensor(cand, dtype=torch.long)
    win_first = torch.tensor([labels[i] == 1.0 for i in cand])
    sw = torch.where(win_first, s0[idx], s1[idx])
    sl = torch.where(win_first, s1[idx], s0[idx])
    m = pair_margins(sw, sl, margin)
    q = None
    if quality is not None:
        missing = [captions[i] for i in cand if captions[i] not in quality]
        if missing:
            raise ValueError(f"the quality ratings have no entry for {len(missing)} prompt(s), e.g. {missing[0]!r}")
        q = torch.tensor([quality[captions[i]] for i in cand], dtype=torch.float64)
    prompts = [captions[i] for i in cand]
    emb = embed_prompts(text_encoder, prompts) if gamma != 0 else torch.zeros(len(cand), 1, dtype=torch.float64)
    emb = emb.to(device)
    if gamma != 0 and len(cand) <= k:
        raise ValueError(f"the diversity term's k-NN needs more than k={k} candidate pairs, got {len(cand)}")
    size = budget_size(budget, len(cand))
    chosen = select_top(importance_scores(m, q, emb, alpha=alpha, gamma=gamma, k=k), size)
    stats.kept = len(chosen)
    stats.mean_margin_all, stats.mean_margin_kept = float(m.mean()), float(m[chosen].mean())
    chosen_t = torch.tensor(chosen, dtype=torch.long, device=emb.device)
    if gamma != 0:
        stats.entropy_all = knn_entropy(emb, k)
        if len(chosen) > k:
            stats.entropy_kept = knn_entropy(emb[chosen_t], k)
    keep = {cand[j] for j in chosen}
    _write(files, keep, out, (s0.tolist(), s1.tolist()) if reward is not None else None, batch_size=max(64, batch_size))
    return stats
