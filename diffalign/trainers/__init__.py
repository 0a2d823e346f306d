"""Thin trainers on one shared accelerate loop: one small module per method.

Every method registers itself in :mod:`diffalign.trainers.registry` (its name, config dataclass and
kind of step); :func:`build_method` and :func:`run_recipe` go through it. Importing this package
imports no method: ``METHODS`` and the method and config classes (``DiffusionDPO``,
``MaPOConfig``, ...) are looked up in the registry when first asked for.
"""

from diffalign.trainers.registry import build_method, get_method, methods, register_method, run_recipe


def __getattr__(name: str):
    if name == "METHODS":  # every registered method (image and text) by name
        return {n: e.method_class for n, e in methods().items()}
    if name in ("Method", "StepOutput", "TrainBatch"):
        from diffalign.trainers import method

        return getattr(method, name)
    for entry in methods().values():
        for cls in (entry.method_class, entry.config_class):
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "build_method", "get_method", "methods", "register_method", "run_recipe", "Method",
           "StepOutput", "TrainBatch"]
