"""Thin trainers on one shared accelerate loop: one small module per method.

Every method registers itself where it is defined (``@register_method`` of
:mod:`diffalign.trainers.method`: its name, config dataclass and kind of step);
:mod:`diffalign.trainers.registry` imports them all, loads recipes into typed configs and routes a
recipe to its trainer. Importing this package imports no method: the registry's functions
(``load_recipe``, ``build_method``, ``run_recipe``, ...), ``METHODS`` and the method and config
classes (``DiffusionDPO``, ``MaPOConfig``, ...) are looked up when first asked for.
"""

_REGISTRY_NAMES = ("build_method", "get_method", "load_recipe", "methods", "recipe_from_dict", "register_method",
                   "run_recipe")


def __getattr__(name: str):
    import importlib

    if name in ("registry", "method", "config"):  # a submodule not imported yet (``from diffalign.trainers import x``)
        return importlib.import_module(f"{__name__}.{name}")
    registry = importlib.import_module(f"{__name__}.registry")

    if name in _REGISTRY_NAMES:
        return getattr(registry, name)
    if name == "METHODS":  # every registered method (image and text) by name
        return {n: e.method_class for n, e in registry.methods().items()}
    if name in ("Method", "StepOutput", "TrainBatch"):
        return getattr(importlib.import_module(f"{__name__}.method"), name)
    for entry in registry.methods().values():
        for cls in (entry.method_class, entry.config_class):
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", *_REGISTRY_NAMES, "Method", "StepOutput", "TrainBatch"]
