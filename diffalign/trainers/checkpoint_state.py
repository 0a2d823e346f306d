"""A checkpoint's training state without pickle: the optimizer, the lr schedule and the random generators
as safetensors and JSON, so that ``--resume`` never unpickles anything (accelerate's ``save_state``
writes ``optimizer.bin``, ``scheduler.bin``/``custom_checkpoint_0.pkl`` and ``random_states_0.pkl``, and
reading them back runs whatever a crafted file holds).

Files (next to ``trainable.safetensors`` and ``trainer_state.json`` of the checkpoint):

* ``optimizer.safetensors``: every tensor of ``optimizer.state_dict()["state"]`` as ``state.<param>.<key>``;
* ``optimizer.json``: its ``param_groups`` and the non-tensor state entries;
* ``scheduler.json``: ``lr_scheduler.state_dict()`` (numbers and lists; a lambda schedule keeps no code);
* ``random_states.safetensors`` and ``random_states.json``: the torch CPU (and CUDA) generators, Python's
  and NumPy's.

FSDP and DeepSpeed shard the optimizer; their runs keep accelerate's own format (documented there).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
RNG_TENSORS, RNG_JSON = "random_states.safetensors", "random_states.json"
FILES = (OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_JSON, RNG_TENSORS, RNG_JSON)


def _plain(value):
    """JSON-ready: tuples as lists; anything else must already be a JSON scalar, list or dict."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} to a checkpoint's JSON: {value!r}")


def save_training_state(folder: Path, optimizer, lr_scheduler) -> None:
    """Write the optimizer, the lr schedule and the random generators' states into ``folder``."""
    folder = Path(folder)
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{param}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param), {})[key] = _plain(value)
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    (folder / OPTIMIZER_JSON).write_text(json.dumps({"param_groups": _plain(state["param_groups"]),
                                                      "scalars": scalars}))
    (folder / SCHEDULER_JSON).write_text(json.dumps(_plain(lr_scheduler.state_dict())))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = s
    save_file(rng, str(folder / RNG_TENSORS))
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    (folder / RNG_JSON).write_text(json.dumps({
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}))


def has_training_state(folder: Path) -> bool:
    return all((Path(folder) / f).is_file() for f in FILES)


def load_training_state(folder: Path, optimizer, lr_scheduler) -> None:
    """Read back what :func:`save_training_state` wrote (only safetensors and JSON are read)."""
    folder = Path(folder)
    meta = json.loads((folder / OPTIMIZER_JSON).read_text())
    entries: dict[int, dict] = {}
    for name, tensor in load_file(str(folder / OPTIMIZER_TENSORS)).items():
        _, param, key = name.split(".", 2)
        entries.setdefault(int(param), {})[key] = tensor
    for param, values in meta["scalars"].items():
        entries.setdefault(int(param), {}).update(values)
    optimizer.load_state_dict({"state": entries, "param_groups": meta["param_groups"]})
    lr_scheduler.load_state_dict(json.loads((folder / SCHEDULER_JSON).read_text()))
    rng = load_file(str(folder / RNG_TENSORS))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    states = json.loads((folder / RNG_JSON).read_text())
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


__all__ = ["FILES", "has_training_state", "load_training_state", "save_training_state"]
