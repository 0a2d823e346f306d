"""Run positions: the one map from where a run is to what it sees.

Every training example of a run has a *position*: the ``k``-th example the run consumes. A micro-batch
of one process at one optimizer step reads the positions :func:`micro_batch_positions` gives; the
example at a position is the data set's item :class:`EpochOrder` puts there (a seeded shuffle per
epoch); and all randomness of that example (crop, flip, caption dropout, noise, timestep) comes from
:func:`position_generator`, seeded by ``(seed, stream, position)``. Noise and timestep are then drawn
by the forward process (:meth:`diffalign.core.forward.ForwardProcess.noise_examples`), the members of a
pair or list sharing them. So a batch is a pure function of ``(seed, position)``: a resumed run sees
what an unbroken one would, and 2 processes with half the accumulation see what 1 process sees.
"""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*parts) -> int:
    """A 63-bit seed from any parts (their ``str`` joined by ``/``), the same on every machine and
    Python process (unlike ``hash``)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def position_generator(*parts, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded by :func:`stable_seed` of ``parts`` (e.g. ``(seed, "example", position)``)."""
    return torch.Generator(device).manual_seed(stable_seed(*parts))


def micro_batch_positions(step: int, micro: int, process: int, num_processes: int, batch_size: int,
                          gradient_accumulation_steps: int) -> list[int]:
    """The ``batch_size`` run positions of micro-batch ``micro`` of process ``process`` at optimizer step
    ``step``. An optimizer step consumes ``batch_size × accumulation × num_processes`` positions,
    interleaved so that 2 processes with half the accumulation read what 1 process reads."""
    per_step = batch_size * gradient_accumulation_steps * num_processes
    start = step * per_step + (micro * num_processes + process) * batch_size
    return list(range(start, start + batch_size))


class EpochOrder:
    """Which of ``n`` items sits at each run position: epoch ``position // n`` visits all of them in the
    order of a permutation seeded by ``(seed, stream, epoch)`` (one epoch's permutation is kept)."""

    def __init__(self, n: int, seed: int, stream: str = "epoch"):
        if n <= 0:
            raise ValueError("EpochOrder needs at least one item")
        self.n, self.seed, self.stream = n, seed, stream
        self._epoch, self._perm = None, None

    def __call__(self, position: int) -> int:
        """The index of the item at ``position``."""
        epoch, i = divmod(position, self.n)
        if epoch != self._epoch:
            g = position_generator(self.seed, self.stream, epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[i]


class BlockOrder:
    """Which of the items sits at each run position when they come in blocks best read together (parquet
    row groups, tar shards; ``block_sizes`` in item order): each epoch visits the blocks in a permutation
    seeded by ``(seed, stream, epoch)``, ``window`` blocks at a time, and the items of each window in a
    permutation of their own. So a run reads each block once an epoch while keeping ``window`` blocks in
    memory. With ``window`` blocks or fewer this is :class:`EpochOrder` exactly."""

    def __init__(self, block_sizes: list[int], seed: int, stream: str = "epoch", window: int = 8):
        sizes = [int(n) for n in block_sizes if n > 0]
        self.n, self.seed, self.stream, self.window = sum(sizes), seed, stream, max(1, window)
        if self.n <= 0:
            raise ValueError("BlockOrder needs at least one item")
        self._flat = EpochOrder(self.n, seed, stream) if len(sizes) <= self.window else None
        self._sizes = torch.tensor(sizes, dtype=torch.long)
        self._starts = torch.cumsum(self._sizes, 0) - self._sizes
        self._epoch = self._perm = self._bounds = None
        self._window_key, self._window_items = None, None

    def __call__(self, position: int) -> int:
        """The index of the item at ``position``."""
        if self._flat is not None:
            return self._flat(position)
        epoch, i = divmod(position, self.n)
        if epoch != self._epoch:
            g = position_generator(self.seed, self.stream, "blocks", epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self._sizes), generator=g)
            totals = self._sizes[self._perm].split(self.window)
            self._bounds = torch.cumsum(torch.tensor([0] + [int(t.sum()) for t in totals]), 0)
        w = int(torch.searchsorted(self._bounds, torch.tensor(i), right=True)) - 1
        if self._window_key != (epoch, w):
            blocks = self._perm[w * self.window:(w + 1) * self.window]
            items = torch.cat([torch.arange(int(self._starts[b]), int(self._starts[b] + self._sizes[b]))
                               for b in blocks])
            g = position_generator(self.seed, self.stream, "window", epoch, w)
            self._window_key, self._window_items = (epoch, w), items[torch.randperm(len(items), generator=g)]
        return int(self._window_items[i - int(self._bounds[w])])


__all__ = ["BlockOrder", "EpochOrder", "micro_batch_positions", "position_generator", "stable_seed"]
