"""diffalign: align text-to-image diffusion models with preferences on one shared core."""

__version__ = "0.1.0"
