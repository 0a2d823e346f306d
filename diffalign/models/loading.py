"""Load a backbone by name: ``bundled:NAME`` models, and the family of a hub id or folder from its
``model_index.json``."""

from __future__ import annotations

from pathlib import Path

from diffalign.errors import UsageError
from diffalign.models.backbone import Backbone, ModelNotFoundError, check_local_weights, model_not_found
from diffalign.models.flux import FluxBackbone
from diffalign.models.qwen_image import QwenImageBackbone
from diffalign.models.sd import SDBackbone
from diffalign.models.sd3 import SD3Backbone
from diffalign.models.sdxl import SDXLBackbone
from diffalign.models.video import WanBackbone
from diffalign.models.z_image import ZImageBackbone

FAMILIES: dict[str, type[Backbone]] = {b.family: b for b in (SDBackbone, SDXLBackbone, SD3Backbone, WanBackbone,
                                                             QwenImageBackbone, ZImageBackbone, FluxBackbone)}
_BY_PIPELINE = {b.pipeline_class_name: b.family for b in FAMILIES.values()}
# the models shipped in the package (the Shapes world's base models); a path, so models/ imports nothing of shapes/
BUNDLED_MODELS = Path(__file__).resolve().parents[1] / "shapes" / "assets"


def resolve_pretrained(name: str) -> str:
    """``bundled:NAME`` names a model shipped in the package (``diffalign/shapes/assets/NAME``);
    anything else (hub id or folder) is passed to diffusers unchanged."""
    if not name.startswith("bundled:"):
        return name
    path = BUNDLED_MODELS / name.split(":", 1)[1]
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"{name}: no bundled model at {path}")
    return str(path)


def detect_family(name_or_path: str | Path, revision: str | None = None) -> str:
    """``"sd"``, ``"sdxl"``, ``"sd3"``, ``"wan"``, ``"qwen-image"``, ``"z-image"`` or ``"flux"`` from
    ``model_index.json``'s ``_class_name`` (folder or hub).

    Task variants (``StableDiffusionXLImg2ImgPipeline``, ...) map to their family; a later generation named by a
    digit after the family's prefix (``Flux2Pipeline``) does not.
    """
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(str(name_or_path), revision=revision)
    except (OSError, ValueError) as e:
        raise model_not_found(name_or_path, e) from e
    cls = config.get("_class_name") or ""
    if cls in _BY_PIPELINE:
        return _BY_PIPELINE[cls]
    # task variants: the longest matching prefix ("StableDiffusionXL" before "StableDiffusion")
    for name in sorted(_BY_PIPELINE, key=len, reverse=True):
        prefix = name.removesuffix("Pipeline")
        if cls.startswith(prefix) and not cls[len(prefix):len(prefix) + 1].isdigit():
            return _BY_PIPELINE[name]
    raise UsageError(f"{name_or_path}: unsupported pipeline {cls!r}; supported: {sorted(_BY_PIPELINE)}")


def check_model(name_or_path: str | Path, revision: str | None = None, allow_pickle: bool = False) -> None:
    """Before any work that needs the model: it exists (a folder with ``model_index.json``, or a hub id
    whose ``model_index.json`` is in reach: offline, in the cache), and a local folder holds every
    component's safetensors weights. Raises :class:`~diffalign.models.backbone.ModelNotFoundError` or
    :class:`~diffalign.models.backbone.PickledWeightsError` (both one-line usage errors)."""
    from diffusers import DiffusionPipeline

    name = resolve_pretrained(str(name_or_path))
    try:
        index = DiffusionPipeline.load_config(name, revision=revision)
    except (OSError, ValueError) as e:
        raise model_not_found(name_or_path, e) from e
    if Path(name).is_dir():
        check_local_weights(name, index, skip={"safety_checker"}, allow_pickle=allow_pickle)


def _class_name(folder: str | Path) -> str:
    import json

    return json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name") or "?"


def load_backbone(name_or_path: str | Path, family: str | None = None, **kwargs) -> Backbone:
    """A backbone from a hub id or a local diffusers folder, as a user types it.

    ``family`` (``"sd"``, ``"sdxl"``, ``"sd3"``, ``"wan"``, ``"qwen-image"``, ``"z-image"``, ``"flux"``) is detected
    unless given; a given family that does not match a local folder's ``model_index.json`` is a
    :class:`~diffalign.errors.UsageError` naming both (one line from the command line). ``kwargs``
    (``torch_dtype``, ``variant``, ``revision``, pipeline components) go to :meth:`Backbone.from_pretrained`.
    ``bundled:NAME`` (a Shapes base shipped in the package) loads as in recipes.
    """
    name_or_path = resolve_pretrained(str(name_or_path))
    if family is None:
        family = detect_family(name_or_path, kwargs.get("revision"))
    if family not in FAMILIES:
        raise UsageError(f"unknown backbone family {family!r}; choose from {sorted(FAMILIES)}")
    if (Path(name_or_path) / "model_index.json").is_file():
        try:
            found = detect_family(name_or_path)
        except UsageError:  # a pipeline class we do not map: trust the family given
            found = family
        if found != family:
            raise UsageError(f"model.family is {family!r} but {name_or_path}/model_index.json is a {found!r} "
                             f"pipeline ({_class_name(name_or_path)}); set model.family={found} or leave it unset")
    return FAMILIES[family].from_pretrained(name_or_path, **kwargs)
