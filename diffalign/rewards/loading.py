"""Finding and loading reward weights: hub id or local path, no unpickling by default, strict keys.

Every loader takes a ``weights`` argument that is either ``None`` (the card's hub id), a hub id,
a local folder, or a local file. When a file cannot be found (offline, or not downloaded) the
error names the file, the hub id and how to place the file locally.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch


class MissingWeightsError(FileNotFoundError):
    """A weight file is neither local nor downloadable (e.g. offline)."""


def missing_weights(what: str, filename: str, hub_id: str | None, url: str | None = None,
                    cause: BaseException | None = None) -> MissingWeightsError:
    """The error for a weight file that is not available, saying how to place it locally."""
    where = f"hub repo {hub_id!r}" if hub_id else f"{url}"
    how = (f"`huggingface-cli download {hub_id} {filename} --local-dir DIR`" if hub_id
           else f"put {filename} into a folder DIR")
    msg = (f"{what}: weight file {filename!r} from {where} is not available"
           f"{' (' + type(cause).__name__ + ')' if cause else ''}. On a machine with internet run {how}, "
           f"then pass weights='DIR' (or the file path) to load_reward, or --reward-weights on the command line.")
    return MissingWeightsError(msg)


def resolve_file(weights: str | os.PathLike | None, filename: str, hub_id: str | None, *, what: str,
                 url: str | None = None) -> Path:
    """A local path to ``filename``: ``weights`` as a file, as a folder holding ``filename``, as a hub
    id, or (``weights=None``) ``hub_id`` / ``url`` through their caches."""
    if weights is not None:
        path = Path(weights)
        if path.is_file():
            return path
        if path.is_dir():
            if (path / filename).is_file():
                return path / filename
            raise missing_weights(what, filename, hub_id, url, FileNotFoundError(str(path / filename)))
        if path.is_absolute() or str(weights).startswith("."):
            raise missing_weights(what, filename, hub_id, url, FileNotFoundError(str(path)))
        hub_id, url = str(weights), None
    if hub_id:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(hub_id, filename))
        except Exception as e:  # offline, gated, missing: one clear message
            raise missing_weights(what, filename, hub_id, None, e) from e
    if url:
        target = Path(torch.hub.get_dir()) / "diffalign" / filename
        if not target.is_file():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(target), progress=False)
            except Exception as e:
                raise missing_weights(what, filename, None, url, e) from e
        return target
    raise ValueError(f"{what}: no weights given and no default source")


def pickled_reward_error(path: str | os.PathLike, what: str = "reward checkpoint"):
    """The refusal of a pickled reward file without ``allow_pickle``, naming ``--allow-pickle``."""
    from diffalign.models.backbone import PickledWeightsError

    return PickledWeightsError(
        f"{path}: a pickled {what} (not .safetensors), and unpickling a file can run code: convert it once "
        "where you trust it (safetensors.torch.save_file of its state dict), or pass --allow-pickle "
        "(allow_pickle=True) if you trust the file")


def load_state_dict_file(path: str | os.PathLike, key: str | None = None,
                         allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or (``allow_pickle=True`` only, ``--allow-pickle``) of a pickled
    checkpoint read with ``torch.load(weights_only=True)`` (never full unpickling); without it a pickled
    file is a :class:`~diffalign.models.backbone.PickledWeightsError`, raised before the file is opened.
    ``key`` picks a sub-dict (e.g. ``"state_dict"``); a leading ``module.`` (DDP) is stripped from every key."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    elif not allow_pickle:
        raise pickled_reward_error(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({e}); only plain "
                             "state dicts are accepted, never pickled model objects") from e
    if key is not None:
        if not isinstance(sd, Mapping) or key not in sd:
            raise KeyError(f"{path}: checkpoint has no {key!r} entry (top-level keys: {list(sd)[:10]})")
        sd = sd[key]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                ignore: tuple[str, ...] = (), assign: bool = False) -> None:
    """``module.load_state_dict(state_dict)`` that fails listing missing and unexpected keys (keys
    in ``ignore`` may be absent from either side, e.g. non-persistent ``position_ids`` buffers).
    ``assign=True`` puts the given tensors in place of the parameters (for a module built on the meta
    device, e.g. under ``accelerate.init_empty_weights``)."""
    own = set(module.state_dict())
    given = {k: v for k, v in state_dict.items() if k not in ignore or k in own}
    missing = sorted(own - set(given) - set(ignore))
    unexpected = sorted(set(given) - own)
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        raise KeyError(f"{what}: state dict does not match the model: missing keys [{show(missing)}], "
                       f"unexpected keys [{show(unexpected)}]")
    module.load_state_dict(given, strict=not ignore, assign=assign)
